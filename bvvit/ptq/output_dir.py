"""The output folder of a PTQ job, claimed for one model (:mod:`bvvit.run_dir`): one writer
at a time; a folder holding another model's results (or results without a manifest) is
refused unless ``overwrite`` moves it aside; ``manifest.json`` records the model's sha256,
the settings and every file the run wrote or reused, and a finished run removes the files
earlier runs of the folder wrote that it did not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from bvvit.io import json_safe, recording_writes
from bvvit.model_file import load_model_file
from bvvit.ptq.cache import model_digest, packed_path, result_path
from bvvit.run_dir import MANIFEST_NAME, RunManifest, claim_output_dir, read_manifest

log = logging.getLogger(__name__)

# What marks a folder as holding post_training results.
RESULT_MARKERS = (MANIFEST_NAME, "summary.json", "summary.csv", "report.html", "report.md",
                  "analysis.json", "sensitivity.csv", "models", "onnx", "plots")
# Job fields that do not change its results (left out of the manifest's settings).
_NOT_SETTINGS = {"model_path", "output_dir", "progress", "overwrite"}


def run_in_claimed_folder(job: Any, work: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``work(out)`` in ``job.output_dir`` claimed for the job's model: locked, its manifest
    kept up to date, and the files earlier runs left that this one did not make removed.
    Returns what ``work`` returned (the summary)."""
    out = Path(job.output_dir)
    digest = _model_digest(job.model_path)
    with _claimed_output_dir(job, out, digest) as manifest:
        with recording_writes(on_write=manifest.note_written) as written:
            summary = work(out)
        removed = manifest.finish(written + _variant_files(out, summary), {"data": summary["data"]})
        if removed:
            log.info(f"removed {len(removed)} file(s) an earlier run left in {out} that this run did "
                     f"not make: {', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''}")
    return summary


def _model_digest(model_path: str) -> str:
    """sha256 of the model file or model folder (the loader's one-line error when it is
    neither)."""
    if not Path(model_path).is_file() and not Path(model_path).is_dir():
        load_model_file(model_path)  # raises the loader's one-line error (missing, ...)
    return model_digest(model_path)


@contextlib.contextmanager
def _claimed_output_dir(job: Any, out: Path, digest: str) -> Iterator[RunManifest]:
    """Lock ``out`` and start its manifest for the model with sha256 ``digest``. Earlier
    results of the same model are continued (finished bit depths reused); those of another
    model, or without a manifest, are refused unless ``job.overwrite`` moves them aside."""
    def refusal(folder: Path, found: list[str]) -> Optional[str]:
        previous = read_manifest(folder)
        if previous is None:
            return (f"{folder} holds post_training results ({', '.join(found[:3])}) without a "
                    f"{MANIFEST_NAME}, so they may be another model's; pass --overwrite to move "
                    "them aside or choose another --output-dir")
        model = previous.get("model") or {}
        if model.get("sha256") != digest:
            return (f"{folder} holds the results of another model ({model.get('path')}, sha256 "
                    f"{str(model.get('sha256'))[:12]}) but {job.model_path} has sha256 {digest[:12]}; "
                    "pass --overwrite to move them aside or choose another --output-dir")
        return None

    inputs = [job.model_path, job.data_path or ""]
    with claim_output_dir(out, RESULT_MARKERS, refusal, job.overwrite, inputs):
        identity = {"tool": "post_training.py",
                    "model": {"path": str(Path(job.model_path).resolve()), "sha256": digest}}
        yield RunManifest.begin(out, identity, job_settings(job), read_manifest(out))


def job_settings(job: Any) -> dict[str, Any]:
    """The job's settings that define its results (for the manifest)."""
    return json_safe({k: v for k, v in dataclasses.asdict(job).items() if k not in _NOT_SETTINGS})


def _variant_files(out: Path, summary: dict[str, Any]) -> list[Path]:
    """The packed file and result record of every quantized variant in ``summary`` (written
    or reused by this run)."""
    names = [name for name, v in summary["variants"].items() if v.get("quant_config")]
    return [path for name in names for path in (packed_path(out, name), result_path(out, name))]


__all__ = ["run_in_claimed_folder", "job_settings", "RESULT_MARKERS"]
