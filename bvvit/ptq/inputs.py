"""What a PTQ job reads: the model (a BV-ViT model file, or a timm, Hugging Face or
torchvision checkpoint: :mod:`bvvit.formats`) and the data set it is evaluated and
calibrated on, checked against each other.

The data defaults to what the model file records it was trained on; another library's
checkpoint records nothing, so it needs ``--data-path`` (an ImageNet-style folder whose
class folders match its head).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from bvvit.config import ModelConfig
from bvvit.data import DataSource, resolve_data
from bvvit.errors import DataError
from bvvit.model_file import LoadedModel, load_model_file
from bvvit.ptq.classes import map_classes

log = logging.getLogger(__name__)


def load_inputs(model_path: str, data_path: Optional[str], num_heads: Optional[int] = None,
                model_format: str = "auto", preprocessing: Sequence[str] = ()
                ) -> tuple[LoadedModel, DataSource]:
    """The model at ``model_path`` (``model_format``: auto or forced) and its data set
    (``data_path``, or the one the file records), with classes and channels checked: a
    disagreement is one DataError line. ``preprocessing``: ``KEY=VALUE`` items replacing
    fields of the model's evaluation transform."""
    loaded = load_model_file(model_path, num_heads=num_heads, model_format=model_format)
    for note in loaded.notes:
        log.info(f"{loaded.source_format} checkpoint: {note}")
    if preprocessing:
        loaded.preprocessing = loaded.preprocessing.overridden(preprocessing)
        log.info(f"preprocessing changed by --preprocessing: {loaded.preprocessing.to_dict()}")
    if loaded.source_format != "bvvit":
        source = _foreign_data(loaded, model_path, data_path)
    else:
        source = resolve_data(data_path or stored_data_path(loaded, model_path))
    _map_classes(loaded, source, model_path)
    if source.in_chans != loaded.config.in_chans:
        raise DataError(f"{source.describe()} has {source.in_chans}-channel images but the model "
                        f"expects {loaded.config.in_chans}; pass the --data-path it was trained on")
    return loaded, source


def _foreign_data(loaded: LoadedModel, model_path: str, data_path: Optional[str]) -> DataSource:
    """The data of another library's checkpoint: ``data_path`` is required (its classes are
    matched to the head by :func:`_map_classes`)."""
    if not data_path:
        raise DataError(f"{model_path} is a {loaded.source_format} checkpoint, which records no data "
                        "set: pass --data-path (an ImageNet-style folder whose class folders match its head)")
    source = resolve_data(data_path)
    c, pre = loaded.config, loaded.preprocessing
    log.info(f"{loaded.source_format} checkpoint: ViT depth {c.depth}, dim {c.embed_dim}, {c.num_heads} "
             f"heads, patch {c.patch_size}, {c.img_size}px, {_architecture_words(c)}; preprocessing "
             f"{pre.interpolation}, crop_pct {pre.crop_pct:g} ({pre.crop_mode}), mean {list(pre.mean)}, "
             f"std {list(pre.std)}")
    return source


def _architecture_words(config: ModelConfig) -> str:
    """A few words on the tokens and pooling of ``config`` (for the console)."""
    tokens = "class + distillation tokens" if config.dist_token else \
        "class token" if config.class_token else "no class token"
    pool = "mean of both heads" if config.head_dist else \
        "average pooling" + (" + fc_norm" if config.fc_norm else "") if config.global_pool == "avg" \
        else "class-token head"
    return f"{tokens}, {pool}"


def stored_data_path(loaded: LoadedModel, model_path: str) -> str:
    """The data set the model was trained on, as its file records it: the absolute folder
    run.py resolved (``root``) when it exists, else the ``data_path`` given then. A stored
    path that does not exist here is one line naming it (the user never passed it)."""
    stored = loaded.data.get("data_path") or "fashion-mnist"
    if str(stored).strip().lower() == "fashion-mnist":
        return stored
    root = loaded.data.get("root")
    candidates = [str(c) for c in (root if root and Path(root).is_absolute() else None, stored) if c]
    for candidate in candidates:
        if Path(candidate).expanduser().exists():
            return candidate
    where = " or ".join(dict.fromkeys(candidates))
    raise DataError(f"the data set stored in {model_path} ({where}) does not exist here; pass "
                    "--data-path with the folder the model was trained on")


def _map_classes(loaded: LoadedModel, source: DataSource, model_path: str) -> None:
    """Which head output each class of the data is (:func:`bvvit.ptq.classes.map_classes`):
    ``loaded.class_names`` become every output's name, ``loaded.class_indices`` the outputs
    of a data set with only some classes (said in one line)."""
    mapping = map_classes(source.class_names, loaded.class_names, loaded.config.num_classes,
                          source.describe(), model_path)
    loaded.class_names = list(mapping.head_names)
    loaded.class_indices = None if mapping.is_identity else mapping.head_indices
    if mapping.describe():
        log.info(mapping.describe())


__all__ = ["load_inputs", "stored_data_path"]
