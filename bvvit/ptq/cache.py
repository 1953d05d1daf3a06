"""Result records: what a finished variant's files are called, what its results depend on,
and reusing them when a rerun (maybe after an interruption) asks for the same variant.

Each quantized variant leaves two files under ``OUT/models/``: its packed model
(``vit_NAME.safetensors``) and its result record (``vit_NAME.result.json``: a key, the
metrics, the quantization report and the packed file's description). The key hashes
everything the results depend on (:func:`cache_base` plus the QuantConfig), so a record is
reused only for the same model file, data, calibration images, evaluation images and config.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from torch import nn

from bvvit import __version__
from bvvit.errors import BVViTError
from bvvit.io import atomic_write_json, json_safe, sha256_file
from bvvit.quant.config import QuantConfig
from bvvit.quant.storage import load_quantized_model

log = logging.getLogger(__name__)

# 2: metrics keyed as summary.csv's columns (lost_vs_fp32, ...), nested QuantConfig options
RECORD_FORMAT = 2


def result_path(out: Path, name: str) -> Path:
    return out / "models" / f"vit_{name}.result.json"


def packed_path(out: Path, name: str) -> Path:
    return out / "models" / f"vit_{name}.safetensors"


def cache_base(model_path: str, data_desc: str, calib_indices: list[int], num_eval: int,
               float_dtype: str) -> dict[str, Any]:
    """What a finished variant's result depends on besides its QuantConfig (and the record
    layout: a record of an older layout is recomputed, never misread)."""
    return {"record_format": RECORD_FORMAT, "model_sha256": model_digest(model_path), "data": data_desc,
            "calib_indices_sha256": hashlib.sha256(json.dumps(calib_indices).encode()).hexdigest(),
            "num_eval": num_eval, "float_dtype": float_dtype, "bvvit_version": __version__}


def model_digest(model_path: str) -> str:
    """SHA-256 of a model file, or of every file of a model folder (a Hugging Face or timm
    folder: weights and JSON), names included."""
    path = Path(model_path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):  # its own files, not sub-folders
        digest.update(f"{file.relative_to(path)}\0{sha256_file(file)}\0".encode())
    return digest.hexdigest()


def variant_key(base: dict[str, Any], cfg: QuantConfig) -> str:
    text = json.dumps({**base, "quant_config": cfg.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def save_result(out: Path, name: str, base: dict[str, Any], cfg: QuantConfig, metrics: dict[str, Any],
                report: dict[str, Any], file_info: dict[str, Any]) -> None:
    """Write the result record of variant ``name`` (after its packed file)."""
    atomic_write_json(result_path(out, name), json_safe({
        "key": variant_key(base, cfg), "metrics": metrics, "report": report, "file": file_info}))


def load_result(out: Path, name: str, cfg: QuantConfig, base: dict[str, Any]
                ) -> Optional[tuple[nn.Module, dict[str, Any]]]:
    """A variant finished by an earlier (maybe interrupted) run with the same checkpoint,
    data and config: its reloaded packed model and stored record (``metrics``, ``report``,
    ``file``), or None. The file must hold exactly the tensors its results were computed
    from (content hash in the result record = hash in the file = hash of its tensors);
    otherwise the variant is recomputed, and a line says why."""
    record_file, model_file = result_path(out, name), packed_path(out, name)
    if not record_file.is_file() or not model_file.is_file():
        return None
    try:
        stored = json.loads(record_file.read_text())
        if stored.get("key") != variant_key(base, cfg):
            return None  # other settings: not this variant's results
        recorded = stored["file"].get("tensors_sha256")
        qmodel, meta = load_quantized_model(model_file)  # checks the file against its own hash
        if recorded is None or meta.get("tensors_sha256") != recorded:
            raise BVViTError(f"{model_file.name} is not the file its results in {record_file.name} "
                             "were computed from (content hashes differ or are missing)")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, BVViTError) as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.info(f"{name}: not reusing the earlier result ({reason}); recomputing")
        return None
    log.info(f"{name}: reusing {model_file.name} and its results from an earlier run "
             f"(same checkpoint, data and config; content hash verified)")
    return qmodel, stored


__all__ = ["packed_path", "result_path", "cache_base", "model_digest", "variant_key", "save_result", "load_result"]
