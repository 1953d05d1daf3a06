"""The results of a PTQ job: one row per variant (:data:`SUMMARY_COLUMNS`, the columns of
summary.csv), the rows of the deployment files in ONNX Runtime and OpenVINO, ``summary.json`` / ``summary.csv`` and
the console table.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional, Sequence

from bvvit import __version__
from bvvit.io import atomic_write_json, atomic_write_text, json_safe
from bvvit.model_file import LoadedModel
from bvvit.ptq.variants import Variant
from bvvit.quant.softmax_grid import grid_summary
from bvvit.report.style import DEFAULT_LATENCY_BATCHES, latency_batches, latency_column
from bvvit.system import system_info

SUMMARY_COLUMNS = ["name", "w_bits", "a_bits", "recipe", "top1", "top5", "top1_drop", "agreement",
                   "lost_vs_fp32", "gained_vs_fp32", "drop_p_value", "sqnr_db", "kl_div", "size_bytes",
                   "size_ratio", "latency_ms_b1", "latency_ms_b64", "kernel", "calibration_time_s", "softmax_grid"]
# (the latency columns are one per --latency-batches size: these two with the default)


def summary_columns(batches: Sequence[int] = DEFAULT_LATENCY_BATCHES) -> list[str]:
    """summary.csv's columns for a run timed at ``batches``: ``latency_ms_b{N}`` for each."""
    i = SUMMARY_COLUMNS.index("latency_ms_b1")
    return SUMMARY_COLUMNS[:i] + [latency_column(b) for b in sorted(set(batches))] + SUMMARY_COLUMNS[i + 2:]
NOTES = {
    "kernel": "'simulated' = fake-quant in float (accuracy is exact for the integer model, "
              "latency is NOT an integer-kernel speed); 'float' = the FP32 model; 'onnxruntime-*' / "
              "'openvino-*' = the exported file in that runtime (openvino-int8: int8 matmuls, the other "
              "layers at OpenVINO's default float precision; openvino-bf16 / -f32: the FP32 file)",
    "size_bytes": "bytes of the real .safetensors file under models/ (packed integer "
                  "weights for quantized variants; the float32 state dict for fp32)",
    "softmax_grid": "grid of the attention probabilities: uniform, or log with base 2^(1/k) (log2, "
                    "log-sqrt2, log-2^(1/4), ... up to k = 16; chosen per block by calibration "
                    "error under the vit recipes, from 8 bits among uniform ranges only: 'mixed' "
                    "lists the blocks' choices; per-block errors in variants.*.softmax_grids)",
}


def variant_row(v: Variant, latency: dict[int, Any], fp_bytes: int,
                batches: Sequence[int] = DEFAULT_LATENCY_BATCHES) -> dict[str, Any]:
    """The summary.csv row of a PyTorch variant (FP32 or simulated quantized), with its
    median latency at each of ``batches``."""
    m = v.metrics
    size = v.file["size_bytes"] if v.file else None
    return {
        "name": v.name,
        "w_bits": v.config.w_bits if v.config else 32,
        "a_bits": v.config.a_bits if v.config else 32,
        "recipe": v.config.recipe if v.config else "float",
        "top1": round(m["top1"], 4), "top5": round(m["top5"], 4),
        "top1_drop": round(m["top1_drop"], 4), "agreement": round(m["agreement"], 4),
        "lost_vs_fp32": m.get("lost_vs_fp32"), "gained_vs_fp32": m.get("gained_vs_fp32"),
        "drop_p_value": _p(m.get("drop_p_value")),
        "sqnr_db": m["sqnr_db"], "kl_div": m["kl_div"],
        "size_bytes": size, "size_ratio": round(size / fp_bytes, 4) if size else None,
        **{latency_column(b): _lat(latency, b) for b in batches},
        "kernel": "float" if v.config is None else "simulated",
        "calibration_time_s": round(v.report.get("calibration_time_s", 0.0), 3),
        "softmax_grid": softmax_grid_of(v),
    }


def softmax_grid_of(v: Variant) -> Optional[str]:
    """The softmax grid of a variant: the per-block choice, the config's method, or None
    (float model, or attention probabilities kept float)."""
    chosen = v.report.get("extras", {}).get("softmax_grids")
    if chosen:
        return grid_summary(chosen)
    if v.config is None or not v.config.softmax_output:
        return None
    return v.config.softmax.method


def onnx_rows(result: dict[str, Any], fp_top1: float, fp_bytes: int,
              batches: Sequence[int] = DEFAULT_LATENCY_BATCHES) -> list[dict[str, Any]]:
    """summary.csv rows for the deployment files in their runtimes (real kernels), with their
    median latency at each of ``batches``."""
    float_precision = (result.get("openvino") or {}).get("precision", "default")
    # session -> (row name, w_bits, a_bits, kernel, file, recipe)
    names = {"ort_fp32": ("onnx-fp32", 32, 32, "onnxruntime-float", "fp32", "onnx"),
             "ort_w8a8": ("onnx-w8a8", 8, 8, "onnxruntime-int8", "w8a8", "onnx"),
             "ort_w8a8_fused": ("onnx-w8a8-fused-attention", 8, 8, "onnxruntime-int8-qattention",
                                "w8a8_fused", "onnx"),
             "ort_w4": ("onnx-w4", 4, 32, "onnxruntime-int4-weight-only", "w4", "onnx"),
             "ov_fp32": ("openvino-fp32", 32, 32, f"openvino-{float_precision}", "fp32", "openvino"),
             "ov_fp32_f32": ("openvino-fp32-f32", 32, 32, "openvino-f32", "fp32", "openvino"),
             "ov_w8a8": ("openvino-w8a8", 8, 8, "openvino-int8", "ov_w8a8", "openvino")}
    latency = {(r["name"], r["batch_size"]): r["median_ms"] for r in result.get("latency", [])}
    rows = []
    for acc_key, (name, w_bits, a_bits, kernel, file_key, recipe) in names.items():
        if file_key not in result.get("files", {}) or acc_key not in result.get("accuracy", {}):
            continue
        acc = result["accuracy"][acc_key]
        size = result["size_bytes"].get(file_key)
        rows.append({"name": name, "w_bits": w_bits, "a_bits": a_bits, "recipe": recipe,
                     "top1": round(acc["top1"], 4), "top5": None,
                     "top1_drop": round(fp_top1 - acc["top1"], 4),
                     "agreement": round(acc.get("agreement", float("nan")), 4),
                     "lost_vs_fp32": acc.get("lost_vs_fp32"), "gained_vs_fp32": acc.get("gained_vs_fp32"),
                     "drop_p_value": _p(acc.get("drop_p_value")),
                     "sqnr_db": acc.get("sqnr_db_vs_sim"), "kl_div": None, "size_bytes": size,
                     "size_ratio": round(size / fp_bytes, 4) if size else None,
                     **{latency_column(b): latency.get((acc_key, b)) for b in batches},
                     "kernel": kernel, "calibration_time_s": 0.0, "softmax_grid": None})
    return rows


def build_summary(job: Any, loaded: LoadedModel, data_desc: str, calibration: dict[str, Any],
                  variants: list[Variant], latency: dict[str, dict[int, Any]], fp_bytes: int) -> dict[str, Any]:
    """The summary.json dict of the PyTorch variants (the job adds ONNX rows and its extras)."""
    return json_safe({
        "bvvit_version": __version__,
        "model_path": str(job.model_path),
        "model_config": loaded.config.to_dict(),
        "model_format": loaded.source_format,  # bvvit | timm | hf | torchvision
        "load_notes": list(loaded.notes),  # what loading it assumed, one line each
        "preprocessing": loaded.preprocessing.to_dict(),  # the evaluation transform, as deployed
        "class_names": loaded.class_names,
        "data": data_desc,
        "num_eval_images": variants[0].metrics["num_images"],
        "seed": job.seed,
        "calibration": calibration,  # source, size, distance to the evaluation images (ptq/calibration.py)
        "recipe": job.recipe, "baseline": job.baseline,
        "system": system_info(),
        "latency_batches": sorted(set(job.latency_batches)),  # the rows' latency_ms_b{N} columns
        "rows": [variant_row(v, latency.get(v.name, {}), fp_bytes, job.latency_batches) for v in variants],
        "variants": {v.name: {"metrics": v.metrics, "quant_config": v.config.to_dict() if v.config else None,
                              "coverage": v.report.get("coverage"), "layers": v.report.get("layers"),
                              "warnings": v.report.get("warnings", []),
                              "calibration_time_s": v.report.get("calibration_time_s"),
                              "softmax_grids": v.report.get("extras", {}).get("softmax_grids"),
                              "rotation": v.report.get("extras", {}).get("rotation"),
                              # per-unit steps, images and errors; what --time-budget did
                              "reconstruction": v.report.get("extras", {}).get("reconstruct"),
                              "file": v.file, "latency": latency.get(v.name)}
                     for v in variants},
        "notes": NOTES,
    })


def _p(value: Optional[float]) -> Optional[float]:
    """A p-value to 4 significant digits (tiny ones stay visible, unlike round(p, 4))."""
    return None if value is None else float(f"{value:.4g}")


def _lat(lat: dict[int, Any], batch: int) -> Optional[float]:
    entry = lat.get(batch)
    return round(entry["median_ms"], 4) if entry else None


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` (everything) and ``summary.csv`` (the rows, :data:`SUMMARY_COLUMNS`)."""
    atomic_write_json(out / "summary.json", summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=summary_columns(latency_batches(summary)), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary["rows"])
    atomic_write_text(out / "summary.csv", buffer.getvalue())


def format_table(rows: list[dict[str, Any]], batches: Sequence[int] = DEFAULT_LATENCY_BATCHES) -> str:
    """The console table of the summary rows (latency at the smallest and largest of ``batches``)."""
    shown = sorted({min(batches), max(batches)})
    header = f"{'name':<16}{'top1':>8}{'drop':>8}{'agree':>8}{'lost/gain':>11}{'p':>6}{'SQNR dB':>9}" \
             f"{'size KiB':>10}{'ratio':>7}" + "".join(f"{f'b{b} ms':>8}" for b in shown) + "  kernel"
    lines = [header, "-" * len(header)]
    for r in rows:
        sqnr = r["sqnr_db"] if isinstance(r["sqnr_db"], str) else \
            "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}"
        flips = "-" if r.get("lost_vs_fp32") is None else f"{r['lost_vs_fp32']}/{r['gained_vs_fp32']}"
        p = "-" if r.get("drop_p_value") is None else \
            f"{r['drop_p_value']:.2f}" if r["drop_p_value"] >= 0.01 else "<.01"
        lines.append(f"{r['name']:<16}{r['top1']:>8.2f}{r['top1_drop']:>+8.2f}{r['agreement']:>8.2f}"
                     f"{flips:>11}{p:>6}{sqnr:>9}{(r['size_bytes'] or 0) / 1024:>10.1f}{r['size_ratio'] or 0:>7.3f}"
                     + "".join(f"{r.get(latency_column(b)) or 0:>8.2f}" for b in shown) + f"  {r['kernel']}")
    return "\n".join(lines)


__all__ = ["SUMMARY_COLUMNS", "summary_columns", "variant_row", "softmax_grid_of", "onnx_rows", "build_summary", "write_summary", "format_table"]
