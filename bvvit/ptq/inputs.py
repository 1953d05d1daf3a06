"""What a PTQ job reads: the model file (a BV-ViT model file or a bare timm state dict) and
the data set it is evaluated and calibrated on, checked against each other.

The data defaults to what the model file records it was trained on; a bare timm state dict
records nothing, so it needs ``--data-path`` (an ImageNet-style folder whose class folders
match its head).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from bvvit.data import DataSource, resolve_data
from bvvit.errors import DataError
from bvvit.model_file import LoadedModel, load_model_file

log = logging.getLogger(__name__)


def load_inputs(model_path: str, data_path: Optional[str], num_heads: Optional[int] = None
                ) -> tuple[LoadedModel, DataSource]:
    """The model file at ``model_path`` and its data set (``data_path``, or the one the file
    records), with classes and channels checked: a disagreement is one DataError line."""
    loaded = load_model_file(model_path, num_heads=num_heads)
    if loaded.data.get("kind") == "timm-state-dict":
        source = _timm_data(loaded, model_path, data_path)
    else:
        source = resolve_data(data_path or stored_data_path(loaded, model_path))
    _check_classes(loaded, list(source.class_names), source.describe(), model_path)
    if source.in_chans != loaded.config.in_chans:
        raise DataError(f"{source.describe()} has {source.in_chans}-channel images but the model "
                        f"expects {loaded.config.in_chans}; pass the --data-path it was trained on")
    return loaded, source


def _timm_data(loaded: LoadedModel, model_path: str, data_path: Optional[str]) -> DataSource:
    """The data of a bare timm state dict: ``data_path`` is required, and its classes name
    the head's outputs."""
    if not data_path:
        raise DataError(f"{model_path} is a bare timm state dict: pass --data-path (an "
                        "ImageNet-style folder whose class folders match its head)")
    source = resolve_data(data_path)
    if source.num_classes != loaded.config.num_classes:
        raise DataError(f"{source.describe()} has {source.num_classes} classes but the head of "
                        f"{model_path} has {loaded.config.num_classes}")
    loaded.class_names = list(source.class_names)
    c = loaded.config
    log.info(f"timm state dict: inferred ViT depth {c.depth}, dim {c.embed_dim}, {c.num_heads} heads, "
             f"patch {c.patch_size}, {c.img_size}px; ImageNet normalisation")
    return source


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


def _check_classes(loaded: LoadedModel, source_classes: list[str], data_desc: str, model_path: str) -> None:
    if list(source_classes) != list(loaded.class_names):
        raise DataError(f"{data_desc} has classes {_short(source_classes)} but {model_path} was trained "
                        f"on {_short(loaded.class_names)}; pass the --data-path it was trained on")


def _short(names: list[str]) -> str:
    return "[" + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") + f"] ({len(names)})"


__all__ = ["load_inputs", "stored_data_path"]
