"""One epoch of training, and validation, as plain functions returning metric dicts."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm

from bvvit.evaluate.classification import collect_logits
from bvvit.train.signals import StopRequested


@dataclass
class Precision:
    """Autocast settings for one device: ``dtype`` None means float32."""

    device_type: str
    dtype: Optional[torch.dtype]
    use_grad_scaler: bool

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]


def choose_precision(device: torch.device, amp: bool) -> Precision:
    """bf16 autocast where the device supports it; fp16 + GradScaler on older GPUs."""
    if not amp:
        return Precision(device.type, None, False)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("cuda", torch.bfloat16, False)
        return Precision("cuda", torch.float16, True)
    return Precision(device.type, torch.bfloat16, False)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite at ``step`` (1-based, within the epoch)."""

    def __init__(self, loss: float, step: int):
        super().__init__(f"loss became {loss} at step {step}; lower --lr or enable --clip-grad")
        self.loss, self.step = loss, step


@dataclass
class EpochProgress:
    """Running sums of one training epoch; saved in mid-epoch checkpoints."""

    steps: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    time_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EpochProgress":
        return cls(**{k: data[k] for k in ("steps", "loss_sum", "correct", "images", "time_s")})


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, criterion: nn.Module,
                    device: torch.device, precision: Precision,
                    scaler: Optional[torch.amp.GradScaler] = None,
                    clip_grad: Optional[float] = None, progress: bool = True,
                    desc: str = "train", state: Optional[EpochProgress] = None,
                    should_stop: Optional[Callable[[], bool]] = None) -> tuple[EpochProgress, bool]:
    """Train over ``loader`` (the scheduler steps once per batch), continuing ``state``.

    Returns the epoch's running sums and whether it stopped early because
    ``should_stop()`` turned true (checked after every step, e.g. on SIGINT/SIGTERM).
    """
    model.train()
    state = state or EpochProgress()
    start = time.perf_counter() - state.time_s
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for images, targets in bar:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)  # (B, num_classes)
            loss = criterion(logits, targets)
        if not math.isfinite(loss.item()):  # before the update: the weights stay finite
            raise NonFiniteLossError(loss.item(), state.steps + 1)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
        scheduler.step()
        batch = images.shape[0]
        state.steps += 1
        state.loss_sum += loss.item() * batch
        state.correct += int((logits.argmax(dim=1) == targets).sum().item())
        state.images += batch
        state.time_s = time.perf_counter() - start
        if progress:
            bar.set_postfix(loss=f"{state.loss_sum / state.images:.4f}",
                            img_s=f"{state.images / max(state.time_s, 1e-9):.0f}")
        if should_stop is not None and should_stop():
            bar.close()
            return state, True
    return state, False


def epoch_metrics(loss_sum: float, correct: float, images: float, time_s: float) -> dict[str, float]:
    return {"loss": loss_sum / max(images, 1), "acc": 100.0 * correct / max(images, 1),
            "images": images, "time_s": time_s,
            "images_per_s": images / time_s if time_s > 0 else 0.0}


@torch.no_grad()
def validation_sums(model: nn.Module, loader: Iterable, device: torch.device, precision: Precision,
                    progress: bool = True,
                    should_stop: Optional[Callable[[], bool]] = None) -> list[float]:
    """[loss sum, top-1 correct, top-5 correct, images] over this process's share.

    Raises :class:`StopRequested` before a batch once ``should_stop()`` is true."""
    forward = model if should_stop is None else _stoppable(model, should_stop)
    was_training = model.training
    model.eval()
    try:
        with precision.autocast():
            logits, labels = collect_logits(forward, loader, device=device, progress=progress,
                                            desc="val")
    finally:
        model.train(was_training)
    logits = logits.float()
    if logits.shape[0] == 0:
        return [0.0, 0.0, 0.0, 0.0]
    loss_sum = float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
    k = min(5, logits.shape[1])
    topk = logits.topk(k, dim=1).indices
    correct1 = float((topk[:, 0] == labels).sum())
    correct5 = float((topk == labels.unsqueeze(1)).any(dim=1).sum())
    return [loss_sum, correct1, correct5, float(labels.numel())]


def _stoppable(model: nn.Module, should_stop: Callable[[], bool]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s forward, raising :class:`StopRequested` instead once ``should_stop()``."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        if should_stop():
            raise StopRequested
        return model(images)

    return forward


def validation_metrics(sums: list[float]) -> dict[str, float]:
    loss_sum, correct1, correct5, images = sums
    images = max(images, 1.0)
    return {"loss": loss_sum / images, "acc": 100.0 * correct1 / images, "top5": 100.0 * correct5 / images}
