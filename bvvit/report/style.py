"""What every figure of the report shares: the :class:`Figure` record, colours, the save
that stores a figure's numbers in the file (text chunk ``bvvit-data``, read back with
:func:`read_plot_data`; matplotlib's setup and style are :mod:`bvvit.plotting`'s), the
readers of summary.json's rows, and the wording (``W4A4``, ``+0.39``) and tolerances that
captions use.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bvvit.plotting import save_png

PLOTS_DIR = "plots"
DATA_KEY = "bvvit-data"
MAIN_COLOR, BASELINE_COLOR, FP_COLOR = "#1f77b4", "#ff7f0e", "#222222"
EXTRA_COLORS = ["#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
SIMULATED, FLOAT = "simulated", "float"


@dataclass
class Figure:
    key: str
    title: str
    path: Optional[Path]
    caption: str


# ------------------------------------------------------------------ shared helpers

def num(value: Any) -> Optional[float]:
    """A float from a summary value (``"inf"`` strings included); None stays None."""
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def save_figure(fig: Any, out_dir: Path, filename: str, data: Any) -> Path:
    """``fig`` as ``out_dir/plots/filename``, cropped to what is drawn (rotated class names
    and titles are never cut off), with ``data`` (the numbers it shows) stored inside."""
    metadata = {"Software": "bvvit", DATA_KEY: json.dumps(data, default=str, allow_nan=True)}
    return save_png(fig, Path(out_dir) / PLOTS_DIR / filename, metadata=metadata, tight=True)


def read_plot_data(path: str | Path) -> Any:
    """The data stored in a figure written here (for tests and checks)."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[DATA_KEY])


DEFAULT_LATENCY_BATCHES = (1, 64)  # post_training's --latency-batches default


def latency_column(batch: int) -> str:
    """The summary row column of the median latency at ``batch`` (``latency_ms_b8``)."""
    return f"latency_ms_b{int(batch)}"


def latency_batches(summary: dict[str, Any]) -> list[int]:
    """The batch sizes the summary's rows carry latencies for (``--latency-batches``;
    summaries written before it existed: 1 and 64), ascending."""
    return sorted({int(b) for b in summary.get("latency_batches") or DEFAULT_LATENCY_BATCHES})


def rows_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return list(summary.get("rows") or [])


def fp_row(summary: dict[str, Any]) -> Optional[dict[str, Any]]:
    return next((r for r in rows_of(summary) if r.get("recipe") == FLOAT or r["name"] == "fp32"), None)


def main_recipe(summary: dict[str, Any]) -> Optional[str]:
    quantized = [r for r in rows_of(summary) if r.get("recipe") != FLOAT]
    recipes = [r["recipe"] for r in quantized]
    return summary.get("recipe") if summary.get("recipe") in recipes else (recipes[0] if recipes else None)


def is_sweep_row(row: dict[str, Any]) -> bool:
    """Whether ``row`` is a point of its recipe's bit-depth sweep: named ``wXaY`` (or
    ``wXaY-recipe``) from its own ``w_bits``/``a_bits``/``recipe``, not e.g. a mixed-precision
    variant."""
    sweep_name = f"w{row['w_bits']}a{row['a_bits']}"
    return row["name"] in (sweep_name, f"{sweep_name}-{row['recipe']}")


def series(summary: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Quantized rows by series (recipe, plus the kernel when it is not simulated; a row
    that is not a point of a sweep (:func:`is_sweep_row`) is a series of its own), main
    recipe first; each series sorted by (w_bits, a_bits)."""
    main = main_recipe(summary)
    out: dict[str, list[dict[str, Any]]] = {}
    quantized = [r for r in rows_of(summary) if r.get("recipe") != FLOAT]
    quantized.sort(key=lambda r: (r.get("recipe") != main, r.get("kernel") != SIMULATED))
    for row in quantized:
        kernel = row.get("kernel") or SIMULATED
        if kernel != SIMULATED:
            label = f"{row['recipe']} · {kernel}"
        else:  # a recipe's sweep; anything else (e.g. a mixed-precision variant) stands alone
            label = row["recipe"] if is_sweep_row(row) else row["name"]
        out.setdefault(label, []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: (r["w_bits"], r["a_bits"]))
    return out


def main_series(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return series(summary).get(main_recipe(summary) or "", [])


def activation_bits(summary: Optional[dict[str, Any]], name: str) -> Optional[int]:
    """The activation bits of variant ``name``, from its row in summary.json (None without one)."""
    row = next((r for r in rows_of(summary or {}) if r["name"] == name), None)
    return None if row is None else int(row["a_bits"])


def bits_label(row: dict[str, Any]) -> str:
    return f"W{row['w_bits']}A{row['a_bits']}"


def signed(value: float, digits: int = 2) -> str:
    """``+0.39`` / ``-1.20``, and ``0.00`` rather than ``-0.00``."""
    text = f"{value:+.{digits}f}"
    return text[1:] if float(text) == 0 else text


def display_name(name: str) -> str:
    """``w4a4-minmax`` -> ``W4A4-minmax``, ``fp32`` -> ``FP32``."""
    if name == "fp32":
        return "FP32"
    return re.sub(r"^w(\d+)a(\d+)", lambda m: f"W{m.group(1)}A{m.group(2)}", name)


def lowest_main(summary: dict[str, Any]) -> Optional[dict[str, Any]]:
    rows = main_series(summary)
    return rows[0] if rows else None


def noise_floor(summary: dict[str, Any]) -> float:
    """Accuracy points one evaluation image is worth."""
    n = summary.get("num_eval_images") or 0
    return 100.0 / n if n else 0.0


def tolerance(summary: dict[str, Any]) -> float:
    return max(0.1, noise_floor(summary))


def figure_legend(fig: Any, axes: Any, columns: int = 4) -> None:
    """One legend below all panels (never over the data), each label once."""
    handles: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=columns, frameon=False)


def skipped(reason: str) -> tuple[None, str]:
    """What a ``plot_*`` function returns when its data is absent: no file, and why."""
    return None, reason


__all__ = ["Figure", "PLOTS_DIR", "DATA_KEY", "MAIN_COLOR", "BASELINE_COLOR", "FP_COLOR", "EXTRA_COLORS",
           "SIMULATED", "FLOAT", "num", "save_figure", "read_plot_data", "rows_of", "fp_row", "main_recipe",
           "is_sweep_row", "series", "main_series", "activation_bits", "bits_label", "signed", "display_name",
           "lowest_main", "noise_floor", "tolerance", "figure_legend", "skipped", "DEFAULT_LATENCY_BATCHES",
           "latency_column", "latency_batches"]
