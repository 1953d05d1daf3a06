"""Which format a ``--model-path`` is, from its files and keys, read once.

- a folder: ``config.json`` with ``model_type`` (Hugging Face transformers) or with
  ``architecture`` (timm's save_for_hf / hub folder);
- a file (``.pth``/``.pt``/``.bin``/``.safetensors``): a BV-ViT model file or training
  checkpoint (``format_version``), else a state dict recognised by its keys: timm
  (``patch_embed.proj.weight``, ``blocks.N.``), torchvision (``class_token``,
  ``encoder.layers.encoder_layer_N.``), or transformers weights (``vit.embeddings.``: their
  folder's config.json is needed).

``--model-format`` forces a format: the file is then read as that format and its own
errors name what is missing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from bvvit.errors import CheckpointError
from bvvit.formats import hf, timm, torchvision
from bvvit.formats.common import read_json, read_weights, unwrap_state_dict

FORMATS = ("bvvit", "timm", "hf", "torchvision")
# State-dict formats recognised by their keys, in the order they are tried.
_KEY_DETECTORS = (("timm", timm.looks_like), ("torchvision", torchvision.looks_like), ("hf", hf.looks_like))
MODEL_FORMATS = ("auto",) + FORMATS  # the --model-format choices


@dataclass
class Checkpoint:
    """A checkpoint read from disk: its format and what was read (a file's dict, or a
    folder's config.json)."""

    format: str
    path: Path
    payload: dict[str, Any]  # the file's dict, or the folder's config.json
    is_folder: bool


def read_checkpoint(path: str | os.PathLike, model_format: str = "auto") -> Checkpoint:
    """Read ``path`` (a file or a folder) and tell its format (``model_format`` forces it)."""
    if model_format not in MODEL_FORMATS:
        raise CheckpointError(f"--model-format {model_format!r} is unknown; use one of "
                              f"{', '.join(MODEL_FORMATS)}")
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, model_format)
    payload = read_weights(path)
    if model_format != "auto":
        return Checkpoint(model_format, path, payload, False)
    return Checkpoint(_file_format(payload, path), path, payload, False)


def _read_folder(folder: Path, model_format: str) -> Checkpoint:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder} is a folder without config.json; pass a checkpoint file "
                              "(.pth, .bin, .safetensors) or a Hugging Face / timm model folder")
    config = read_json(config_path, str(folder))
    found = "hf" if hf.is_hf_folder(config) else "timm" if timm.is_timm_folder(config) else None
    fmt = found if model_format == "auto" else model_format
    if fmt not in ("hf", "timm"):
        what = f"a {found} folder" if found else "a folder whose config.json is neither transformers' " \
            "(model_type) nor timm's (architecture)"
        raise CheckpointError(f"{folder} is {what}; --model-format {model_format} needs "
                              + ("a file" if fmt in ("bvvit", "torchvision") else "an hf or timm folder"))
    return Checkpoint(fmt, folder, config, True)


def _file_format(payload: dict[str, Any], path: Path) -> str:
    if "format_version" in payload:
        return "bvvit"
    state = unwrap_state_dict(payload)
    for name, looks_like in _KEY_DETECTORS:
        if looks_like(state):
            return name
    raise CheckpointError(f"{path} is not a BV-ViT model file nor a ViT checkpoint BV-ViT knows: "
                          f"{_what_it_holds(state)}; "
                          f"formats: {', '.join(FORMATS)} (force one with --model-format)")


def _what_it_holds(state: dict[str, Any]) -> str:
    """A short description of an unknown dict (its size and first keys)."""
    tensors = [k for k, v in state.items() if isinstance(v, torch.Tensor)]
    keys = ", ".join(str(k) for k in list(state)[:3])
    if not tensors:
        return f"a dict of {len(state)} entries without tensors (keys {keys})"
    return f"{len(tensors)} tensors, first keys {keys}"


def hf_folder_of(path: Path) -> Optional[Path]:
    """The folder holding transformers weights ``path`` when it has config.json."""
    return path.parent if (path.parent / "config.json").is_file() else None
