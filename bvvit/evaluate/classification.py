"""Classification metrics: accuracy, per-class accuracy, confusion, and how far a
(quantized) model's logits drift from a reference model's.

Everything here returns plain Python data (ints, floats, lists, dicts) so results can be
written to JSON by the report stage; nothing draws. The only non-JSON values are
``float('inf')`` / ``float('nan')`` (an SQNR of identical logits is infinite):
:func:`bvvit.io.json_safe` turns them into the strings ``"inf"``, ``"-inf"`` and ``"nan"``.

The stage knows nothing of how a model was built or quantized: it takes any
``torch.nn.Module`` or plain callable mapping a batch of images to logits ``(B, C)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from bvvit.distributed import gather_shards
from bvvit.evaluate.significance import paired_comparison
from bvvit.metrics import agreement, kl_divergence, sqnr_db, top1_accuracy

ModelOrFn = torch.nn.Module | Callable[[torch.Tensor], torch.Tensor]


def collect_logits(
    model_or_fn: ModelOrFn,
    loader: Iterable,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "eval",
    max_batches: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model_or_fn`` over ``loader`` and gather its logits.

    ``loader`` yields ``(images, labels)`` (extra items are ignored); images are moved to
    ``device``, the model is not (put it there first). A Module is switched to eval mode
    for the pass and its previous mode restored afterwards. For the logits to line up with
    another run's (``reference_logits``), the loader must not shuffle.

    Returns ``(logits, labels)``: float32 CPU ``(N, C)`` and int64 CPU ``(N,)``.

    Under torchrun, a loader whose sampler is a ``ShardSampler(..., gather=True)`` is this
    rank's shard: the shards are gathered so that every rank returns all N rows in dataset
    order (a collective call: every rank must make it). ``max_batches`` passes stay local.
    """
    is_module = isinstance(model_or_fn, torch.nn.Module)
    was_training = is_module and model_or_fn.training
    if is_module:
        model_or_fn.eval()

    total_images = _dataset_size(loader)
    if max_batches is not None:
        total_images = None  # unknown without walking the loader
    logits_chunks: list[torch.Tensor] = []
    label_chunks: list[torch.Tensor] = []
    bar = tqdm(total=total_images, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for batch_index, batch in enumerate(loader):
                if max_batches is not None and batch_index >= max_batches:
                    break
                images, labels = batch[0], batch[1]
                logits = model_or_fn(images.to(device, non_blocking=True))
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise TypeError(
                        "model must return a logits tensor of shape (B, C), got "
                        f"{type(logits).__name__} {getattr(logits, 'shape', '')}"
                    )
                logits_chunks.append(logits.detach().float().cpu())
                label_chunks.append(torch.as_tensor(labels).long().cpu().reshape(-1))
                bar.update(images.shape[0])
    finally:
        bar.close()
        if is_module:
            model_or_fn.train(was_training)

    if not logits_chunks:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    logits, labels = torch.cat(logits_chunks), torch.cat(label_chunks)
    sampler = getattr(loader, "sampler", None)
    if getattr(sampler, "gather", False) and max_batches is None:
        # torchrun evaluation: this rank saw its shard; every rank gets all rows, in order
        logits = gather_shards(logits, sampler.info, sampler.num_samples)
        labels = gather_shards(labels, sampler.info, sampler.num_samples)
    return logits, labels


def classification_metrics(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    class_names: Sequence[str] | None = None,
    reference_logits: torch.Tensor | np.ndarray | None = None,
    class_indices: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Accuracy figures for logits ``(N, C)`` against integer labels ``(N,)``.

    Keys: ``num_images``, ``num_classes``, ``top1``, ``top5`` and ``top5_k`` (top-k with
    k = min(5, C)), ``loss`` (mean cross-entropy, nats), ``per_class_accuracy`` (percent
    per class, ``None`` for a class with no samples), ``per_class_count``, ``confusion``
    (``C x C`` ints, rows = true class, columns = predicted), ``class_names`` when given.
    Accuracies are percent.

    With ``reference_logits`` (the float model's: same shape, same image order) also the
    comparison with it, keyed as the columns of summary.csv: ``reference_top1``,
    ``top1_drop`` (reference top1 - top1, points), ``agreement`` (percent of images with the
    same top-1 class), ``lost_vs_fp32`` / ``gained_vs_fp32`` (images only the reference /
    only these logits classify correctly), ``drop_p_value`` (McNemar exact test on those two
    counts: how likely a difference at least this uneven is by chance), ``sqnr_db``
    (10 log10(sum ref^2 / sum (ref - test)^2); ``inf`` when identical) and ``kl_div``
    (mean KL(softmax(ref) || softmax(test)), nats). Each is computed by
    :mod:`bvvit.metrics`.

    ``class_indices``: the outputs the data's classes are (a partial data set: some classes
    of a larger head, e.g. 10 ImageNet synsets of 1000). Top-1/top-5/loss stay over every
    output; the per-class figures and the confusion matrix (rows and columns: those classes,
    in that order; predictions of other outputs count as errors outside it) cover those
    classes; ``class_names`` (every output's) is reduced to them; ``num_outputs`` and
    ``head_indices`` say so.
    """
    logits_t = torch.as_tensor(logits).detach().cpu().double()
    labels_t = torch.as_tensor(labels).detach().cpu().long().reshape(-1)
    if logits_t.dim() != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits_t.shape)}")
    num_images, num_classes = logits_t.shape
    if num_images == 0:
        raise ValueError("no images to evaluate")
    if labels_t.numel() != num_images:
        raise ValueError(f"{labels_t.numel()} labels for {num_images} rows of logits")
    if labels_t.min() < 0 or labels_t.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got "
                         f"[{int(labels_t.min())}, {int(labels_t.max())}]")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")

    predictions = logits_t.argmax(dim=1)
    top1 = top1_accuracy(logits_t, labels_t)
    k = min(5, num_classes)
    topk_indices = logits_t.topk(k, dim=1).indices
    top5 = _percent(int((topk_indices == labels_t[:, None]).any(dim=1).sum()), num_images)
    loss = float(F.cross_entropy(logits_t, labels_t))

    if class_indices is None:
        confusion = torch.bincount(
            labels_t * num_classes + predictions, minlength=num_classes * num_classes
        ).reshape(num_classes, num_classes)
        per_class_count = confusion.sum(dim=1)
    else:
        confusion, per_class_count = _partial_confusion(labels_t, predictions, class_indices, num_classes)
    per_class_correct = confusion.diagonal()
    per_class_accuracy = [
        _percent(int(correct), int(count)) if count > 0 else None
        for correct, count in zip(per_class_correct, per_class_count)
    ]

    metrics: dict[str, Any] = {
        "num_images": int(num_images),
        "num_classes": int(num_classes),
        "top1": top1,
        "top5": top5,
        "top5_k": k,
        "loss": loss,
        "per_class_accuracy": per_class_accuracy,
        "per_class_count": [int(c) for c in per_class_count],
        "confusion": confusion.tolist(),
    }
    if class_names is not None:
        metrics["class_names"] = list(class_names)
    if class_indices is not None:
        metrics["num_outputs"], metrics["num_classes"] = int(num_classes), len(class_indices)
        metrics["head_indices"] = [int(i) for i in class_indices]
        if class_names is not None:
            metrics["class_names"] = [class_names[i] for i in class_indices]

    if reference_logits is not None:
        reference_t = torch.as_tensor(reference_logits).detach().cpu().double()
        if reference_t.shape != logits_t.shape:
            raise ValueError(f"reference_logits shape {tuple(reference_t.shape)} differs "
                             f"from logits shape {tuple(logits_t.shape)}")
        reference_predictions = reference_t.argmax(dim=1)
        reference_top1 = top1_accuracy(reference_t, labels_t)
        metrics["reference_top1"] = reference_top1
        metrics["top1_drop"] = reference_top1 - top1
        metrics["agreement"] = agreement(reference_t, logits_t)
        paired = paired_comparison(reference_predictions == labels_t, predictions == labels_t)
        metrics["lost_vs_fp32"], metrics["gained_vs_fp32"] = paired.only_a, paired.only_b
        metrics["drop_p_value"] = paired.p_value
        metrics["sqnr_db"] = sqnr_db(reference_t, logits_t)
        metrics["kl_div"] = kl_divergence(reference_t, logits_t)
    return metrics


def _partial_confusion(labels: torch.Tensor, predictions: torch.Tensor, class_indices: Sequence[int],
                       num_outputs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K x K confusion among the K classes ``class_indices``, images per class): a
    prediction of another output is in no column."""
    local = torch.full((num_outputs,), -1, dtype=torch.long)
    local[torch.as_tensor(list(class_indices), dtype=torch.long)] = torch.arange(len(class_indices))
    true, predicted = local[labels], local[predictions]
    if bool((true < 0).any()):
        raise ValueError("a label is not among class_indices")
    k = len(class_indices)
    inside = predicted >= 0
    confusion = torch.bincount(true[inside] * k + predicted[inside], minlength=k * k).reshape(k, k)
    return confusion, torch.bincount(true, minlength=k)


def evaluate_classifier(
    model: ModelOrFn,
    loader: Iterable,
    class_names: Sequence[str] | None = None,
    reference_logits: torch.Tensor | np.ndarray | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    max_batches: int | None = None,
    class_indices: Sequence[int] | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """:func:`collect_logits` then :func:`classification_metrics` (``class_indices``: the
    outputs a partial data set's classes are).

    Returns ``(metrics, logits)``; keep ``logits`` of the float model to pass as
    ``reference_logits`` when evaluating its quantized versions on the same loader.
    """
    logits, labels = collect_logits(model, loader, device=device, progress=progress,
                                    max_batches=max_batches)
    metrics = classification_metrics(logits, labels, class_names=class_names,
                                     reference_logits=reference_logits, class_indices=class_indices)
    return metrics, logits


def accuracy_noise_floor(num_images: int) -> float:
    """What one image is worth in accuracy points (100 / num_images).

    Accuracy differences at or below this are a single image and say nothing.
    """
    if num_images <= 0:
        raise ValueError(f"num_images must be positive, got {num_images}")
    return 100.0 / num_images


def _percent(count: int, total: int) -> float:
    return 100.0 * count / total


def _dataset_size(loader: Iterable) -> int | None:
    """Number of images a DataLoader will yield, or None when it cannot tell."""
    try:
        return len(loader.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


__all__ = ["collect_logits", "classification_metrics", "evaluate_classifier", "accuracy_noise_floor",
           "ModelOrFn"]
