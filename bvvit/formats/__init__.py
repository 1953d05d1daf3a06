"""Checkpoint formats users bring: timm, Hugging Face transformers and torchvision ViTs.

:func:`read_checkpoint` reads a ``--model-path`` (file or folder) and tells its format;
:func:`convert` maps a foreign checkpoint to our model (:class:`Converted`: a timm-named
state dict, ModelConfig, Preprocessing, class names). BV-ViT's own model file is read by
:mod:`bvvit.model_file`, which dispatches here for the others. One module per source:
:mod:`~bvvit.formats.timm`, :mod:`~bvvit.formats.hf`, :mod:`~bvvit.formats.torchvision`.
"""

from __future__ import annotations

from typing import Optional

from bvvit.errors import CheckpointError
from bvvit.formats import hf, timm, torchvision
from bvvit.formats.common import Converted, read_json, unwrap_state_dict
from bvvit.formats.detect import FORMATS, MODEL_FORMATS, Checkpoint, hf_folder_of, read_checkpoint


def convert(checkpoint: Checkpoint, num_heads: Optional[int] = None) -> Converted:
    """A timm, hf or torchvision ``checkpoint`` as our model (``num_heads`` overrides the
    head count the state-dict formats assume)."""
    source = str(checkpoint.path)
    if checkpoint.format == "hf":
        folder = checkpoint.path if checkpoint.is_folder else hf_folder_of(checkpoint.path)
        if folder is None:
            raise CheckpointError(f"{source} holds transformers weights without their config.json; "
                                  "pass the model folder (config.json, model.safetensors, "
                                  "preprocessor_config.json)")
        config = checkpoint.payload if checkpoint.is_folder else read_json(folder / "config.json", source)
        weights = None if checkpoint.is_folder else checkpoint.payload
        return hf.convert_folder(folder, config, source, weights)
    if checkpoint.format == "timm" and checkpoint.is_folder:
        return timm.convert_folder(checkpoint.path, checkpoint.payload, source, num_heads)
    state = unwrap_state_dict(checkpoint.payload)
    if checkpoint.format == "timm":
        return timm.convert_state_dict(state, source, num_heads)
    if checkpoint.format == "torchvision":
        return torchvision.convert_state_dict(state, source, num_heads)
    raise ValueError(f"convert() takes timm, hf or torchvision checkpoints, not {checkpoint.format!r}")


__all__ = ["FORMATS", "MODEL_FORMATS", "Checkpoint", "Converted", "convert", "read_checkpoint"]
