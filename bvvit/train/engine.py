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

from bvvit.evaluate.classification import classification_metrics, collect_logits


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
    pass


def train_one_epoch(model: nn.Module, loader: Iterable, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, criterion: nn.Module,
                    device: torch.device, precision: Precision,
                    scaler: Optional[torch.amp.GradScaler] = None,
                    clip_grad: Optional[float] = None, progress: bool = True,
                    desc: str = "train", on_step: Optional[Callable[[int], None]] = None
                    ) -> dict[str, float]:
    """Train for one pass over ``loader``; the scheduler steps once per batch.

    Returns ``loss`` (mean over images), ``acc`` (percent top-1 on the augmented batches),
    ``images``, ``time_s`` and ``images_per_s``.
    """
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(images)  # (B, num_classes)
            loss = criterion(logits, targets)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"loss became {loss.item()} at step {step}; "
                                     "lower --lr or enable --clip-grad")
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
        total_loss += loss.item() * batch
        correct += (logits.argmax(dim=1) == targets).sum().item()
        seen += batch
        if progress:
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", img_s=f"{seen / elapsed:.0f}")
        if on_step is not None:
            on_step(step)
    elapsed = time.perf_counter() - start
    return {
        "loss": total_loss / max(seen, 1),
        "acc": 100.0 * correct / max(seen, 1),
        "images": seen,
        "time_s": elapsed,
        "images_per_s": seen / elapsed if elapsed > 0 else 0.0,
    }


def validate(model: nn.Module, loader: Iterable, device: torch.device, precision: Precision,
             progress: bool = True) -> dict[str, Any]:
    """Top-1, top-5 and loss on the validation split (float32 unless autocast is on)."""
    with precision.autocast():
        logits, labels = collect_logits(model, loader, device=device, progress=progress, desc="val")
    metrics = classification_metrics(logits.float(), labels)
    return {"loss": metrics["loss"], "acc": metrics["top1"], "top5": metrics["top5"]}
