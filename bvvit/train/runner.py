"""The training run behind ``run.py``: data, model, optimizer, epochs, checkpoints, logs.

``fit(model_config, train_config, source)`` is the whole job; the CLI only parses flags.
Exactness of resume comes from four rules: every epoch reseeds the global RNG (dropout,
drop-path) and the loader's shuffle from ``(seed, epoch)``; each image's augmentation is
seeded from ``(seed, epoch, index)``, whichever worker reads it; optimizer, scheduler, scaler
and RNG states travel in the checkpoint; the metric history travels with them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from bvvit import __version__
from bvvit.config import ModelConfig, Preprocessing, TrainConfig
from bvvit.data import (DataSource, build_dataset, build_loader, build_transform, set_epoch)
from bvvit.data.loaders import SeededAugmentation, epoch_seed
from bvvit.distributed import DistInfo, ShardSampler, all_reduce_sums, barrier, init_distributed
from bvvit.errors import CheckpointError, ConfigError, WriteError
from bvvit.io import atomic_torch_save, atomic_write_json
from bvvit.model import VisionTransformer, count_parameters, load_pretrained
from bvvit.model_file import PretrainedWeights, model_file_holds, model_payload, read_pretrained
from bvvit.run_dir import claim_training_dir
from bvvit.system import library_versions, resolve_device
from bvvit.train.checkpoint import (LAST, find_resume_checkpoint, restore_rng_state,
                                    restore_training_state, save_checkpoint, training_payload)
from bvvit.train.engine import (EpochProgress, NonFiniteLossError, choose_precision, epoch_metrics,
                                train_one_epoch, validation_metrics, validation_sums)
from bvvit.train.log import (TensorBoardSink, epoch_row, plot_training_curves,
                             write_metrics_csv)
from bvvit.train.sampler import ShardedEpochSampler
from bvvit.train.settings import check_model_fits, check_resume, settings_in_use
from bvvit.train.signals import StopRequest, StopRequested

log = logging.getLogger(__name__)

MODEL_FILE = "vit_model.pth"


def _nothing(_: int) -> None:
    pass


@dataclass
class TrainHooks:
    """Callbacks the training loop calls at fixed points; they do nothing by default. Tests
    inject faults through them (a signal after N optimizer steps, a kill after an epoch's
    checkpoint); the loop itself reads no environment."""

    after_step: Callable[[int], None] = _nothing  # optimizer steps taken so far, after each step
    after_epoch: Callable[[int], None] = _nothing  # epochs done, after the epoch is saved and logged


@dataclass
class TrainResult:
    output_dir: Path
    model_path: Path
    history: list[dict[str, Any]]
    best_val_acc: float
    total_time_s: float


def model_config_for_data(source: DataSource, img_size: Optional[int], num_classes: Optional[int],
                          **hyper: Any) -> ModelConfig:
    """Model hyperparameters from flags; channels and classes come from the data."""
    if num_classes is not None and num_classes != source.num_classes:
        raise ConfigError(f"--num-classes {num_classes} disagrees with the data: {source.describe()} "
                          f"has {source.num_classes} classes; drop the flag or fix the data")
    size = img_size or source.native_size or 224
    return ModelConfig(img_size=size, in_chans=source.in_chans, num_classes=source.num_classes,
                       **hyper)


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float):
    """lr multiplier per optimizer step: linear warmup, then cosine down to ``min_ratio``."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model: VisionTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, class token and positional embeddings."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda  # the fused kernel pays off on GPUs
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused or None)


def _load_pretrained_file(model: VisionTransformer, pretrained: PretrainedWeights, path: str) -> list[str]:
    try:
        return load_pretrained(model, pretrained.state_dict)
    except (KeyError, RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0].strip("'\"")
        raise CheckpointError(f"pretrained file {path} does not fit this model "
                              f"({first[:200]}); use matching --embed-dim/--depth/--patch-size") from None


def _pretrained_normalisation(pre: Preprocessing, pretrained: Optional[PretrainedWeights]) -> Preprocessing:
    """The data's preprocessing with the mean/std and interpolation another library's
    checkpoint was trained with (fine-tuning sees its inputs as it did)."""
    theirs = pretrained.preprocessing if pretrained is not None else None
    if theirs is None or theirs.in_chans != pre.in_chans:
        return pre
    log.info(f"preprocessing of the {pretrained.source_format} checkpoint: mean {list(theirs.mean)}, "
             f"std {list(theirs.std)}, {theirs.interpolation}")
    return dataclasses.replace(pre, mean=theirs.mean, std=theirs.std, interpolation=theirs.interpolation)


def fit(model_cfg: ModelConfig, cfg: TrainConfig, source: DataSource,
        argv: Optional[list[str]] = None, overwrite: bool = False,
        hooks: Optional[TrainHooks] = None) -> TrainResult:
    """Train into ``cfg.output_dir``, claimed first (bvvit.run_dir): one writer at a time,
    and a folder holding another run is refused unless resumed or, with ``overwrite``,
    moved aside whole. ``hooks``: callbacks at fixed points of the loop (tests)."""
    inputs = [source.root, cfg.pretrained_path or ""]
    with claim_training_dir(Path(cfg.output_dir), cfg.resume, overwrite, inputs):
        return _fit(model_cfg, cfg, source, argv, hooks or TrainHooks())


def _fit(model_cfg: ModelConfig, cfg: TrainConfig, source: DataSource, argv: Optional[list[str]],
         hooks: TrainHooks) -> TrainResult:
    cfg, warnings = settings_in_use(cfg)  # absolute data path, workers capped: what is recorded
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    device = resolve_device(cfg.device)
    info = init_distributed(device.type)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    for warning in warnings:
        log.warning(warning)
    pretrained = read_pretrained(cfg.pretrained_path, cfg.pretrained_format, model_cfg.num_heads) \
        if cfg.pretrained_path else None
    if pretrained is not None:  # its tokens, pooling, norms and activation; dims from the flags
        model_cfg = pretrained.architecture_for(model_cfg)
    check_model_fits(model_cfg, device)
    precision = choose_precision(device, cfg.amp)
    torch.manual_seed(cfg.seed)

    pre: Preprocessing = _pretrained_normalisation(source.default_preprocessing(model_cfg.img_size),
                                                   pretrained)
    # augmentation is seeded per (seed, epoch, image): the same for any --workers and on resume
    train_set = SeededAugmentation(build_dataset(source, "train", subset=cfg.train_subset),
                                   build_transform(pre, train=True, augment=cfg.augment), cfg.seed)
    val_set = build_dataset(source, "val", build_transform(pre, train=False), subset=cfg.val_subset)
    if len(train_set) < cfg.batch_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} is larger than the training split "
                          f"({len(train_set)} images); lower it")
    sampler = ShardedEpochSampler(len(train_set), cfg.batch_size, info, cfg.seed)
    train_loader = build_loader(train_set, sampler.local_batch, shuffle=False, workers=cfg.workers,
                                seed=cfg.seed + info.rank, drop_last=True, sampler=sampler)
    val_loader = build_loader(val_set, cfg.eval_batch_size or max(sampler.local_batch, 256),
                              shuffle=False, workers=cfg.workers,
                              sampler=ShardSampler(len(val_set), info) if info.enabled else None)

    point = find_resume_checkpoint(cfg.resume, out) if cfg.resume else None
    model = VisionTransformer(model_cfg)
    if cfg.pretrained_path and point is None:
        skipped = _load_pretrained_file(model, pretrained, cfg.pretrained_path)
        log.info(f"loaded pretrained weights from {cfg.pretrained_path}"
                 + (f" (new head: {', '.join(skipped)})" if skipped else ""))
    model.to(device)
    optimizer = build_optimizer(model, cfg)
    steps_per_epoch = sampler.steps_per_epoch
    total_steps = cfg.epochs * steps_per_epoch
    # Warmup never takes more than half the run (short smoke runs still anneal).
    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(
        total_steps, warmup_steps, cfg.min_lr / cfg.lr))
    scaler = torch.amp.GradScaler(device.type) if precision.use_grad_scaler else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    start_epoch, history, best_acc = 0, [], -1.0
    partial: Optional[EpochProgress] = None
    rng_at_stop: Optional[dict[str, Any]] = None
    if cfg.resume and point is None:
        log.info(f"--resume auto: no checkpoint in {ckpt_dir} yet, starting from scratch")
    elif point is not None:
        start_epoch, history, best_acc = restore_training_state(point.payload, str(point.path), model,
                                                  optimizer, scheduler, scaler, model_cfg)
        check_resume(point.payload.get("train_config") or {}, cfg, str(point.path))
        if point.payload.get("epoch_progress"):
            partial = EpochProgress.from_dict(point.payload["epoch_progress"])
            rng_at_stop = point.payload.get("rng")
        note = " (last.pth was unreadable: used the backup)" if point.fell_back else ""
        where = f", {partial.steps} steps into epoch {start_epoch + 1}" if partial else ""
        log.info(f"resumed from {point.path}{note}: epoch {start_epoch} of {cfg.epochs} done{where}")
    finished_before = start_epoch >= cfg.epochs  # --resume of a finished run: nothing to train

    train_model: nn.Module = model
    if cfg.compile:
        train_model = _try_compile(model, model_cfg, device)
    if info.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None)

    class_names = list(source.class_names)
    data_info = {"data_path": cfg.data_path, "kind": source.kind, "root": str(source.root)}
    if info.is_main and not (finished_before and (out / "config.json").exists()):
        atomic_write_json(out / "config.json",
                          _run_info(model_cfg, cfg, source, pre, model, precision.name, argv, info))
    log.info(f"data: {source.describe()}; train {len(train_set)}, val {len(val_set)} images")
    log.info(f"model: ViT {model_cfg.depth}x{model_cfg.embed_dim}, patch {model_cfg.patch_size}, "
             f"{count_parameters(model) / 1e6:.2f}M parameters; device {device}, {precision.name}, "
             f"{torch.get_num_threads()} threads" + (f", {info.world_size} processes" if info.enabled else ""))

    tensorboard = TensorBoardSink(out / "tensorboard") if cfg.tensorboard and info.is_main else None
    stop = StopRequest().install()

    def should_stop() -> bool:  # after every optimizer step
        hooks.after_step(scheduler.last_epoch)
        return stop()

    run_start = time.perf_counter()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            # model randomness (dropout, drop-path); ranks draw different masks
            torch.manual_seed(epoch_seed(cfg.seed + 7919 * info.rank, epoch))
            set_epoch(train_loader, epoch)
            state = None
            if partial is not None:  # continue an interrupted epoch exactly where it stopped
                sampler.set_start_step(partial.steps)
                state, partial = partial, None
                if rng_at_stop:
                    restore_rng_state(rng_at_stop)
            progress = cfg.progress and info.is_main
            try:
                state, interrupted = train_one_epoch(
                    train_model, train_loader, optimizer, scheduler, criterion, device, precision,
                    scaler, cfg.clip_grad, progress, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                    state=state, should_stop=should_stop)
                if not interrupted:
                    val_sums = validation_sums(model, val_loader, device, precision, progress,
                                               should_stop=stop)
            except NonFiniteLossError as exc:
                raise _diverged(exc, epoch, optimizer.param_groups[0]["lr"], cfg, ckpt_dir) from None
            except StopRequested:  # during validation: the epoch is trained, a resume validates it
                interrupted = True
            if interrupted:
                payload = training_payload(model, class_names, pre, data_info, optimizer, scheduler,
                                           scaler, epoch, best_acc, history, cfg, state)
                if info.is_main:
                    with stop.writing():
                        save_checkpoint(ckpt_dir, payload, is_best=False)
                barrier(info)
                log.info(f"saved {ckpt_dir / LAST} at epoch {epoch + 1}, step {state.steps}; "
                         "continue with the same command plus --resume auto")
                raise TrainingInterrupted(128 + (stop.signum or signal.SIGINT))
            train_sums = all_reduce_sums([state.loss_sum, state.correct, state.images], info, device)
            train_metrics = epoch_metrics(*train_sums, state.time_s)
            train_metrics["images_per_s"] *= info.world_size if info.enabled else 1
            val_metrics = validation_metrics(all_reduce_sums(val_sums, info, device))
            row = epoch_row(epoch + 1, train_metrics, val_metrics, optimizer.param_groups[0]["lr"],
                            state.time_s)
            history.append(row)
            is_best = row["val_acc"] > best_acc
            best_acc = max(best_acc, row["val_acc"])
            if info.is_main:
                payload = training_payload(model, class_names, pre, data_info, optimizer, scheduler,
                                           scaler, epoch + 1, best_acc, history, cfg, None)
                with stop.writing():
                    save_checkpoint(ckpt_dir, payload, is_best)
                write_metrics_csv(out / "metrics.csv", history)
                if tensorboard:
                    tensorboard.log(row)
            barrier(info)
            log.info(f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
                     f"acc {row['train_acc']:.2f}% | val loss {row['val_loss']:.4f} "
                     f"top-1 {row['val_acc']:.2f}% top-5 {row['val_top5']:.2f}% | lr {row['lr']:.2e} | "
                     f"{row['epoch_time_s']:.1f}s, {row['train_images_per_s']:.0f} img/s")
            hooks.after_epoch(epoch + 1)
    finally:
        stop.restore()
        if tensorboard:
            tensorboard.close()

    final_metrics = {"val_acc": history[-1]["val_acc"] if history else None,
                     "best_val_acc": best_acc, "epochs": cfg.epochs}
    model_path = out / MODEL_FILE
    written = "written to"
    if info.is_main:
        final = model_payload(model, class_names, pre, data_info, final_metrics)
        if finished_before and model_file_holds(model_path, final):
            written = "already in"  # leave its bytes alone: post_training's reuse checks them
        else:
            _write_model_file(model_path, final, ckpt_dir)
            write_metrics_csv(out / "metrics.csv", history)
            plot_training_curves(out / "training_curves.png", history,
                                 title=f"ViT {model_cfg.depth}x{model_cfg.embed_dim}/p"
                                       f"{model_cfg.patch_size} on {source.kind}")
    barrier(info)
    total = time.perf_counter() - run_start
    log.info(f"done: final val top-1 {final_metrics['val_acc']:.2f}%, best {best_acc:.2f}%; "
             f"model {written} {model_path}")
    return TrainResult(out, model_path, history, best_acc, total)


def _write_model_file(path: Path, payload: dict[str, Any], ckpt_dir: Path) -> None:
    """Write vit_model.pth; if the path cannot be written, say that the training itself is safe."""
    try:
        atomic_torch_save(payload, path)
    except WriteError as exc:
        reason = os.strerror(exc.errno) if exc.errno else "not writable"
        raise WriteError(f"cannot write {path}: {reason}; training finished and {ckpt_dir / LAST} "
                         f"holds the trained weights: make {path.name} writable (or move what is in "
                         "its way) and rerun the same command with --resume auto to write it",
                         exc.errno) from None


def _diverged(exc: NonFiniteLossError, epoch: int, lr: float, cfg: TrainConfig,
              ckpt_dir: Path) -> ConfigError:
    last = ckpt_dir / LAST
    kept = f"the last good checkpoint {last} is untouched" if last.exists() \
        else "no checkpoint was written yet"
    clip = "" if cfg.clip_grad else " or set --clip-grad 1"
    return ConfigError(f"training diverged: the loss became {exc.loss} at epoch {epoch + 1}, step "
                       f"{exc.step} (learning rate {lr:.2e}); {kept}; lower --lr (now {cfg.lr:g})"
                       f"{clip} and train again with --overwrite or another --output-dir")


def _try_compile(model: nn.Module, model_cfg: ModelConfig, device: torch.device) -> nn.Module:
    """torch.compile, checked on one small forward/backward; eager with a warning if it fails
    (no C++ compiler, unsupported platform, ...)."""
    try:
        compiled = torch.compile(model)
        probe = torch.zeros(2, model_cfg.in_chans, model_cfg.img_size, model_cfg.img_size, device=device)
        compiled(probe).sum().backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as exc:  # noqa: BLE001 - any compiler failure means: run eager
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        log.warning(f"warning: --compile failed ({first}); training without torch.compile")
        model.zero_grad(set_to_none=True)
        return model


class TrainingInterrupted(Exception):
    """Raised after a signal-triggered checkpoint; carries the exit code (128 + signal)."""

    def __init__(self, exit_code: int):
        super().__init__(f"training interrupted (exit code {exit_code})")
        self.exit_code = exit_code


def _run_info(model_cfg: ModelConfig, cfg: TrainConfig, source: DataSource, pre: Preprocessing,
              model: nn.Module, precision: str, argv: Optional[list[str]],
              info: DistInfo) -> dict[str, Any]:
    return {
        "world_size": info.world_size,
        "bvvit_version": __version__,
        "command": argv,
        "model": model_cfg.to_dict(),
        "train": cfg.to_dict(),
        "data": {"kind": source.kind, "root": str(source.root), "classes": list(source.class_names)},
        "preprocessing": pre.to_dict(),
        "parameters": count_parameters(model),
        "precision": precision,
        "threads": torch.get_num_threads(),
        "versions": library_versions(),
    }


__all__ = ["fit", "TrainHooks", "TrainResult", "TrainingInterrupted", "model_config_for_data", "MODEL_FILE"]
