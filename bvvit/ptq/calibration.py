"""The calibration images of a PTQ job and how far they are from the evaluation images.

Three sources (``--calib-data`` / ``--calib-path``):

* ``train`` (default): a seeded subset of the model's training split;
* a folder (``--calib-path FOLDER``): any images users have (another data set, pictures from
  the deployment), in the model's channels and size (:mod:`bvvit.data.calibration`);
* ``synthetic``: no images at all; inputs optimised from the float model itself
  (PSAQ-ViT-style, :mod:`bvvit.quant.datafree`).

Whichever is used, the run records it and its distance from the evaluation data: the
Frechet distance between Gaussians fitted to the float model's features at the head input
(the class token after the final LayerNorm) of the calibration images and of the first
:data:`DISTANCE_IMAGES` evaluation images, beside the same distance for a training subset
of the same size (what "near" means for this model and data).
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn
from tqdm import tqdm

from bvvit.data import build_dataset, build_loader, calibration_loader
from bvvit.data.calibration import folder_calibration_loader
from bvvit.errors import ConfigError
from bvvit.metrics import frechet_distance
from bvvit.quant.datafree import SyntheticOptions, synthetic_calibration_batches

log = logging.getLogger(__name__)

CALIB_SOURCES = ("train", "synthetic")  # --calib-data; --calib-path FOLDER is the third
DISTANCE_IMAGES = 1000  # evaluation images the distance is measured against


@dataclass
class CalibrationSet:
    """The calibration images of a job: ``loader`` (batches of ``(images, labels)``),
    ``identity`` (what the result cache keys on: the same identity means the same images)
    and ``record`` (summary.json's ``calibration``: source, size, distance)."""

    loader: Iterable
    identity: list[Any]
    record: dict[str, Any]


def build_calibration_set(job: Any, source: Any, pre: Any, fp_model: nn.Module, val_set: Any,
                          device: torch.device | str = "cpu",
                          eval_features: Optional[Tensor] = None) -> CalibrationSet:
    """The calibration set ``job`` asks for (``job.calib_data``, ``job.calib_path``,
    ``job.calib_size``, ``job.seed``), with its distance from ``val_set``.

    ``eval_features``: the float model's head inputs for the first :data:`DISTANCE_IMAGES`
    images of ``val_set`` when the caller already has them (:func:`capture_head_features`
    around the FP32 evaluation), so they are not computed a second time."""
    batch_size = min(64, job.batch_size)
    calib_data = getattr(job, "calib_data", "train")
    calib_path = getattr(job, "calib_path", None)
    if calib_data not in CALIB_SOURCES:
        raise ConfigError(f"--calib-data {calib_data!r}: choose one of {', '.join(CALIB_SOURCES)}")
    if calib_path is not None and calib_data != "train":
        raise ConfigError("--calib-path and --calib-data synthetic exclude each other: pass one")
    if calib_path is not None:
        loader, available = folder_calibration_loader(calib_path, pre, job.calib_size, job.seed, batch_size)
        files = [path for path, _ in loader.dataset.samples]
        identity: list[Any] = ["folder", str(Path(calib_path).resolve()), files]
        record = {"source": "folder", "split": f"folder {calib_path}", "path": str(calib_path),
                  "size": len(files), "available": available}
    elif calib_data == "synthetic":
        options = SyntheticOptions(seed=job.seed)
        start = time.perf_counter()
        log.info(f"making {job.calib_size} synthetic calibration images ({options.steps} steps per batch "
                 f"of {options.batch_size}; no data used)")
        loader = synthetic_calibration_batches(fp_model, job.calib_size, options)
        identity = ["synthetic", job.calib_size, asdict(options)]
        record = {"source": "synthetic", "split": "synthetic (data-free)", "size": job.calib_size,
                  "generator": asdict(options), "time_s": round(time.perf_counter() - start, 2)}
    else:
        loader, identity = calibration_loader(source, pre, job.calib_size, job.seed, batch_size=batch_size)
        record = {"source": "train", "split": "train", "size": len(identity), "indices": identity}
    train_loader = loader if record["source"] == "train" else _train_reference(source, pre, record["size"], job.seed,
                                                                               batch_size)
    record.update(_distances(fp_model, loader, train_loader, val_set, batch_size, device,
                             same_as_train=loader is train_loader, eval_features=eval_features,
                             progress=getattr(job, "progress", False)))
    return CalibrationSet(loader, identity, record)


def _train_reference(source: Any, pre: Any, size: int, seed: int, batch_size: int) -> Iterable:
    """A training subset of ``size`` images (fewer when the split is smaller): the reference
    distance of a calibration set that is not the training split."""
    available = len(build_dataset(source, "train"))
    return calibration_loader(source, pre, min(size, available), seed, batch_size=batch_size)[0]


def _distances(fp_model: nn.Module, loader: Iterable, train_loader: Iterable, val_set: Any, batch_size: int,
               device: torch.device | str, same_as_train: bool,
               eval_features: Optional[Tensor] = None, progress: bool = False) -> dict[str, Any]:
    """{"frechet_to_eval": the calibration set's distance, "frechet_train_to_eval": a
    training subset's of the same size (the reference), "distance": how they were measured}."""
    val_subset = val_set.select(list(range(min(DISTANCE_IMAGES, len(val_set)))))
    if eval_features is None or len(eval_features) != len(val_subset):
        eval_features = head_features(fp_model, build_loader(val_subset, batch_size, shuffle=False), device,
                                      progress, "distance: evaluation images")
    train_distance = frechet_distance(head_features(fp_model, train_loader, device, progress,
                                                    "distance: training images"), eval_features)
    distance = train_distance if same_as_train else \
        frechet_distance(head_features(fp_model, loader, device, progress, "distance: calibration images"),
                         eval_features)
    return {"frechet_to_eval": round(distance, 4), "frechet_train_to_eval": round(train_distance, 4),
            "distance": f"Frechet distance of the float model's head-input features to the first "
                        f"{len(val_subset)} evaluation images"}


def _head(model: nn.Module) -> nn.Module:
    return model.get_submodule(getattr(model, "head_names", ("head",))[0])


@contextmanager
def capture_head_features(model: nn.Module, limit: Optional[int] = DISTANCE_IMAGES) -> Iterator[list[Tensor]]:
    """Collect the inputs of ``model``'s classifier head (float32, CPU) for the first ``limit``
    images (None: all) of whatever runs through it inside the ``with`` block, in order (the FP32
    evaluation of an unsharded loader: its first images are :func:`build_calibration_set`'s
    evaluation images). Yields the list the rows are appended to (``torch.cat`` it)."""
    rows: list[Tensor] = []
    taken = [0]

    def hook(module: nn.Module, inputs: tuple) -> None:
        if limit is None or taken[0] < limit:
            batch = inputs[0] if limit is None else inputs[0][: limit - taken[0]]
            batch = batch.detach().float().cpu()
            rows.append(batch)
            taken[0] += len(batch)

    handle = _head(model).register_forward_pre_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


@torch.no_grad()
def head_features(model: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                  progress: bool = False, desc: str = "head features") -> Tensor:
    """(N, D) inputs of the model's classifier head (the class token after the final
    LayerNorm) over every image of ``loader`` (a progress bar of batches with ``progress``)."""
    model.eval()
    with capture_head_features(model, limit=None) as features:
        for images, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            model(images.to(device))
    return torch.cat(features)


def describe(record: dict[str, Any]) -> str:
    """One line for the log: which images, and how far from the evaluation data."""
    return (f"calibrating on {record['size']} images from {record['split']} (Frechet distance to the "
            f"evaluation images {record['frechet_to_eval']:.1f}; a training subset: "
            f"{record['frechet_train_to_eval']:.1f})")


__all__ = ["CALIB_SOURCES", "DISTANCE_IMAGES", "CalibrationSet", "build_calibration_set", "head_features",
           "capture_head_features", "describe"]
