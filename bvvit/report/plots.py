"""The figures of a PTQ run, drawn from the summary.json and analysis dicts alone.

Every ``plot_*`` function takes those dicts and ``out_dir`` and returns ``(path, caption)``:
a PNG under ``out_dir/plots/`` (written atomically) and ONE sentence computed from this
run's numbers. When its data is absent, no file is written, the path is None and the
caption says why. The numbers a figure shows are also stored in the PNG itself (text
chunk ``bvvit-data``, JSON), so a figure can be checked against summary.json.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from bvvit.io import atomic_path

PLOTS_DIR = "plots"
DPI = 110
DATA_KEY = "bvvit-data"
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
         "axes.spines.right": False, "figure.facecolor": "white"}
MAIN_COLOR, BASELINE_COLOR, FP_COLOR = "#1f77b4", "#ff7f0e", "#222222"
EXTRA_COLORS = ["#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]
BREAKDOWN = [("packed_weights", "packed integer weights", "#1f77b4"),
             ("scales", "scales / zero points", "#ff7f0e"),
             ("float_parameters", "float parameters", "#2ca02c"),
             ("header_and_metadata", "header and metadata", "#bbbbbb")]
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


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def _style() -> Iterator[Any]:
    plt = _pyplot()
    with plt.rc_context(STYLE):
        yield plt


def _save(fig: Any, out_dir: Path, filename: str, data: Any) -> Path:
    path = Path(out_dir) / PLOTS_DIR / filename
    metadata = {"Software": "bvvit", DATA_KEY: json.dumps(data, default=str, allow_nan=True)}
    with atomic_path(path) as tmp:
        # tight: nothing (rotated class names, titles) is cut off, no empty margins
        fig.savefig(tmp, format="png", dpi=DPI, metadata=metadata, bbox_inches="tight", pad_inches=0.12)
    _pyplot().close(fig)
    return path


def read_plot_data(path: str | Path) -> Any:
    """The data stored in a figure written here (for tests and checks)."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[DATA_KEY])


def rows_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return list(summary.get("rows") or [])


def fp_row(summary: dict[str, Any]) -> Optional[dict[str, Any]]:
    return next((r for r in rows_of(summary) if r.get("recipe") == FLOAT or r["name"] == "fp32"), None)


def main_recipe(summary: dict[str, Any]) -> Optional[str]:
    quantized = [r for r in rows_of(summary) if r.get("recipe") != FLOAT]
    recipes = [r["recipe"] for r in quantized]
    return summary.get("recipe") if summary.get("recipe") in recipes else (recipes[0] if recipes else None)


def series(summary: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Quantized rows by series (recipe, plus the kernel when it is not simulated; a row
    named other than ``wXaY[-recipe]`` is a series of its own), main recipe first; each
    series sorted by (w_bits, a_bits)."""
    main = main_recipe(summary)
    out: dict[str, list[dict[str, Any]]] = {}
    quantized = [r for r in rows_of(summary) if r.get("recipe") != FLOAT]
    quantized.sort(key=lambda r: (r.get("recipe") != main, r.get("kernel") != SIMULATED))
    for row in quantized:
        kernel = row.get("kernel") or SIMULATED
        canonical = re.fullmatch(rf"w{row['w_bits']}a{row['a_bits']}(-{re.escape(str(row['recipe']))})?",
                                 row["name"])
        if kernel != SIMULATED:
            label = f"{row['recipe']} · {kernel}"
        else:  # a recipe's sweep; anything else (e.g. a mixed-precision variant) stands alone
            label = row["recipe"] if canonical else row["name"]
        out.setdefault(label, []).append(row)
    for rows in out.values():
        rows.sort(key=lambda r: (r["w_bits"], r["a_bits"]))
    return out


def main_series(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return series(summary).get(main_recipe(summary) or "", [])


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


def _bits_of(name: str) -> Optional[int]:
    match = re.match(r"w(\d+)a(\d+)", name)
    return int(match.group(2)) if match else None


def lowest_main(summary: dict[str, Any]) -> Optional[dict[str, Any]]:
    rows = main_series(summary)
    return rows[0] if rows else None


def noise_floor(summary: dict[str, Any]) -> float:
    """Accuracy points one evaluation image is worth."""
    n = summary.get("num_eval_images") or 0
    return 100.0 / n if n else 0.0


def _tolerance(summary: dict[str, Any]) -> float:
    return max(0.1, noise_floor(summary))


def _series_style(index: int, label: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The run's recipe solid blue, the naive baseline dashed orange, others (other recipes,
    real-kernel rows) dotted in further colours."""
    if label == main_recipe(summary):
        return {"color": MAIN_COLOR, "marker": "o", "linestyle": "-", "linewidth": 2}
    if label == summary.get("baseline"):
        return {"color": BASELINE_COLOR, "marker": "s", "linestyle": "--", "linewidth": 1.5}
    return {"color": EXTRA_COLORS[index % len(EXTRA_COLORS)], "marker": "^", "linestyle": ":"}


def _series_label(label: str, summary: dict[str, Any]) -> str:
    if label == main_recipe(summary):
        return f"{label} (this run's recipe)"
    if label == summary.get("baseline"):
        return f"{label} (naive baseline)"
    return label


class _BitAxis:
    """x positions for bit-depth pairs: the bit count when W == A everywhere, else categories."""

    def __init__(self, rows: list[dict[str, Any]]):
        pairs = sorted({(r["w_bits"], r["a_bits"]) for r in rows})
        self.numeric = all(w == a for w, a in pairs)
        self.pos = {p: (p[0] if self.numeric else i) for i, p in enumerate(pairs)}
        self.ticks = [self.pos[p] for p in pairs]
        self.labels = [f"W{w}A{a}" for w, a in pairs]
        self.xlabel = "bit depth (weights = activations)" if self.numeric else "bit depths"

    def apply(self, ax: Any) -> None:
        ax.set_xticks(self.ticks, self.labels, rotation=0 if len(self.ticks) <= 8 else 45)
        ax.set_xlabel(self.xlabel)


def _log_y(ax: Any) -> None:
    """Log counts with decade ticks only (minor log ticks make drawing several times slower)."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    ax.yaxis.set_minor_locator(NullLocator())


def _figure_legend(fig: Any, axes: Any, columns: int = 4) -> None:
    """One legend below all panels (never over the data), each label once."""
    handles: dict[str, Any] = {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=columns, frameon=False)


def _skip(reason: str) -> tuple[None, str]:
    return None, reason


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


# ------------------------------------------------------------------ accuracy

def accuracy_caption(summary: dict[str, Any]) -> str:
    rows, fp = main_series(summary), fp_row(summary)
    if not rows or fp is None:
        return "No quantized variants to compare with FP32."
    tol = _tolerance(summary)
    worst = max(rows, key=lambda r: num(r["top1_drop"]) or 0.0)
    drop = num(worst["top1_drop"]) or 0.0
    ok_from = None
    for i in range(len(rows)):
        if all(abs(num(r["top1_drop"]) or 0.0) <= tol for r in rows[i:]):
            ok_from = rows[i]
            break
    if drop <= tol:
        text = (f"Every {main_recipe(summary)} bit depth stays within {tol:.2f} points of FP32's "
                f"top-1 ({fp['top1']:.2f}%), the worst being {bits_label(worst)} ({signed(-drop)})")
    else:
        text = f"{bits_label(worst)} loses {drop:.2f} points of top-1 against FP32's {fp['top1']:.2f}%"
        if ok_from is not None:
            text += f"; {bits_label(ok_from)} and above stay within {tol:.2f} of FP32"
        else:
            text += f"; no bit depth stays within {tol:.2f} points of FP32"
    baseline = [r for r in series(summary).get(summary.get("baseline") or "", [])
                if (r["w_bits"], r["a_bits"]) == (worst["w_bits"], worst["a_bits"])]
    if baseline:
        text += (f", while the naive {baseline[0]['recipe']} baseline loses "
                 f"{num(baseline[0]['top1_drop']):.2f} there")
    return text + "."


def plot_accuracy(summary: dict[str, Any], out_dir: Path) -> tuple[Optional[Path], str]:
    """Top-1 and top-5 per bit depth, one line per recipe, with the FP32 level."""
    groups, fp = series(summary), fp_row(summary)
    if not groups:
        return _skip("No quantized variants in summary.json, so there is no accuracy-vs-bits figure.")
    main = main_recipe(summary)
    axis = _BitAxis([r for rows in groups.values() for r in rows])
    top_k = ((summary.get("variants") or {}).get("fp32", {}).get("metrics", {}).get("top5_k")) or 5
    data = {"fp32": {"top1": fp and fp["top1"], "top5": fp and fp["top5"]},
            "series": {k: [{key: r[key] for key in ("name", "w_bits", "a_bits", "top1", "top5")}
                           for r in rows] for k, rows in groups.items()}}
    with _style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        for ax, metric, title in zip(axes, ("top1", "top5"), ("Top-1 accuracy", f"Top-{top_k} accuracy")):
            if fp is not None:
                ax.axhline(fp[metric], color=FP_COLOR, linestyle="--", linewidth=1.2, label="FP32")
                ax.annotate(f"FP32 {fp[metric]:.2f}%", (0.99, fp[metric]), xycoords=("axes fraction", "data"),
                            textcoords="offset points", xytext=(0, -10), ha="right", fontsize=7, color=FP_COLOR)
            for index, (label, rows) in enumerate(groups.items()):
                xs = [axis.pos[(r["w_bits"], r["a_bits"])] for r in rows]
                ys = [r[metric] for r in rows]
                ax.plot(xs, ys, label=_series_label(label, summary), **_series_style(index, label, summary))
                if label == main:
                    for x, y in zip(xs, ys):
                        ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 7),
                                    ha="center", fontsize=7, color=MAIN_COLOR)
            axis.apply(ax)
            ax.set(ylabel="accuracy (%)", title=title)
            ax.margins(y=0.15)
            ax.set_ylim(top=min(ax.get_ylim()[1], 101.0))  # nothing above 100%
            ax.grid(alpha=0.3)
        _figure_legend(fig, axes)
        fig.suptitle(f"Accuracy vs bit depth on {summary.get('num_eval_images', '?')} evaluation images")
        path = _save(fig, out_dir, "accuracy_vs_bits.png", data)
    return path, accuracy_caption(summary)


def drop_caption(summary: dict[str, Any]) -> str:
    rows = main_series(summary)
    if not rows:
        return "No quantized variants to compare with FP32."
    lo, hi = rows[0], rows[-1]
    worst = max((r for rs in series(summary).values() for r in rs), key=lambda r: num(r["top1_drop"]) or 0.0)
    return (f"Top-1 agreement with FP32 goes from {lo['agreement']:.2f}% at {bits_label(lo)} to "
            f"{hi['agreement']:.2f}% at {bits_label(hi)} ({main_recipe(summary)}), the largest top-1 "
            f"drop is {signed(num(worst['top1_drop']))} points ({display_name(worst['name'])}), and one "
            f"image is worth {noise_floor(summary):.2f} points here.")


def plot_drop_and_agreement(summary: dict[str, Any], out_dir: Path) -> tuple[Optional[Path], str]:
    """Top-1 drop against FP32 and prediction agreement with FP32, per bit depth."""
    groups = series(summary)
    if not groups:
        return _skip("No quantized variants in summary.json, so there is no accuracy-drop figure.")
    axis = _BitAxis([r for rows in groups.values() for r in rows])
    floor = noise_floor(summary)
    data = {"noise_floor": floor, "series": {k: [{key: r[key] for key in ("name", "w_bits", "a_bits",
                                                                            "top1_drop", "agreement")}
                                                 for r in rows] for k, rows in groups.items()}}
    with _style() as plt:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
        for ax, metric, ylabel, title in ((axes[0], "top1_drop", "points (FP32 - quantized)", "Top-1 drop"),
                                          (axes[1], "agreement", "% of images", "Top-1 agreement with FP32")):
            for index, (label, rows) in enumerate(groups.items()):
                ax.plot([axis.pos[(r["w_bits"], r["a_bits"])] for r in rows], [r[metric] for r in rows],
                        label=_series_label(label, summary), **_series_style(index, label, summary))
            if metric == "top1_drop":
                ax.axhline(0, color=FP_COLOR, linewidth=1)
                if floor:
                    ax.axhspan(-floor, floor, color="#999999", alpha=0.15,
                               label=f"±1 image ({floor:.2f} points)")
            else:
                ax.axhline(100, color=FP_COLOR, linestyle="--", linewidth=1, label="FP32 (100%)")
            axis.apply(ax)
            ax.set(ylabel=ylabel, title=title)
            ax.margins(y=0.15)
            ax.grid(alpha=0.3)
        _figure_legend(fig, axes)
        path = _save(fig, out_dir, "accuracy_drop.png", data)
    return path, drop_caption(summary)


# ------------------------------------------------------------------ size

def _files(summary: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    variants = summary.get("variants") or {}
    return [(row, variants[row["name"]]["file"]) for row in rows_of(summary)
            if (variants.get(row["name"]) or {}).get("file")]


def size_caption(summary: dict[str, Any]) -> str:
    files = dict((r["name"], f) for r, f in _files(summary))
    fp, low = fp_row(summary), lowest_main(summary)
    if fp is None or low is None or low["name"] not in files or fp["name"] not in files:
        return "No FP32 and quantized file sizes to compare."
    info, fp_size = files[low["name"]], files[fp["name"]]["size_bytes"]
    parts = info.get("breakdown", {})
    return (f"The {bits_label(low)} file is {_kib(info['size_bytes'])}, "
            f"{100 * info['size_bytes'] / fp_size:.1f}% of FP32's {_kib(fp_size)}: packed weights take "
            f"{_kib(parts.get('packed_weights', 0))} (ideal {_kib(info.get('ideal_bytes', 0))}) and the "
            f"header and metadata {_kib(parts.get('header_and_metadata', 0))}.")


def plot_size(summary: dict[str, Any], out_dir: Path) -> tuple[Optional[Path], str]:
    """Real file size per variant, stacked by part, with the ideal packed-weight bound."""
    files = _files(summary)
    if not files:
        return _skip("summary.json has no file sizes, so there is no model-size figure.")
    fp_bytes = max(f["size_bytes"] for _, f in files)
    unit, scale = ("MiB", 1 << 20) if fp_bytes >= 1 << 20 else ("KiB", 1024)
    names = [display_name(r["name"]) for r, _ in files]
    data = {"unit": unit, "bars": [{"name": r["name"], "size_bytes": f["size_bytes"],
                                    "breakdown": f.get("breakdown", {}),
                                    "ideal_bytes": f.get("ideal_bytes")} for r, f in files]}
    with _style() as plt:
        fig, ax = plt.subplots(figsize=(max(7.0, 0.85 * len(files) + 3), 4.6), constrained_layout=True)
        x = np.arange(len(files))
        bottom = np.zeros(len(files))
        for key, label, color in BREAKDOWN:
            values = np.array([f.get("breakdown", {}).get(key, 0) for _, f in files], dtype=float) / scale
            if values.any():
                ax.bar(x, values, 0.65, bottom=bottom, label=label, color=color)
                bottom += values
        ideal_drawn = False
        for i, (row, f) in enumerate(files):
            if f.get("ideal_bytes"):
                ax.hlines(f["ideal_bytes"] / scale, i - 0.42, i + 0.42, color="black", linewidth=2,
                          label=None if ideal_drawn else "ideal: weights at exactly bits/8 bytes")
                ideal_drawn = True
            ratio = f"{100 * row['size_ratio']:.0f}%" if row.get("size_ratio") else ""
            ax.annotate(f"{f['size_bytes'] / scale:.1f}\n{ratio}", (i, f["size_bytes"] / scale),
                        textcoords="offset points", xytext=(0, 3), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, names, rotation=30 if len(files) > 6 else 0, ha="right" if len(files) > 6 else "center")
        ax.set(ylabel=f"file size ({unit})", title="Real model file size (.safetensors), by part")
        ax.margins(y=0.18)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper right")
        path = _save(fig, out_dir, "model_size.png", data)
    return path, size_caption(summary)


# ------------------------------------------------------------------ latency

LATENCY_COLUMNS = {1: "latency_ms_b1", 64: "latency_ms_b64"}


def _kernel_style(kernel: str, extra: dict[str, str]) -> dict[str, Any]:
    if kernel == FLOAT:
        return {"color": MAIN_COLOR}
    if kernel == SIMULATED:
        return {"color": "#d9d9d9", "hatch": "///", "edgecolor": "#7f7f7f"}
    return {"color": extra.setdefault(kernel, EXTRA_COLORS[len(extra) % len(EXTRA_COLORS)])}


def _kernel_label(kernel: str) -> str:
    if kernel == FLOAT:
        return "float (FP32)"
    if kernel == SIMULATED:
        return "simulated fake-quant: NOT integer-kernel speed"
    return f"{kernel} (real kernel)"


def latency_caption(summary: dict[str, Any]) -> str:
    fp = fp_row(summary)
    batch = next((b for b in (64, 1) if fp and num(fp.get(LATENCY_COLUMNS[b]))), None)
    if fp is None or batch is None:
        return "No FP32 latency to compare with."
    column, fp_ms = LATENCY_COLUMNS[batch], num(fp[LATENCY_COLUMNS[batch]])
    timed = [r for r in rows_of(summary) if r is not fp and num(r.get(column))]
    real = [r for r in timed if r.get("kernel") not in (SIMULATED, FLOAT)]
    if real:
        best = min(real, key=lambda r: num(r[column]))
        return (f"At batch {batch} the fastest real kernel is {display_name(best['name'])} "
                f"({best['kernel']}, {num(best[column]):.2f} ms), {fp_ms / num(best[column]):.2f}x the "
                f"speed of FP32's {fp_ms:.2f} ms; hatched rows are simulated and not integer speed.")
    if not timed:
        return f"Only FP32 was timed ({fp_ms:.2f} ms at batch {batch})."
    ratio = float(np.median([num(r[column]) / fp_ms for r in timed]))
    return (f"Every quantized row is simulated fake-quant, a median {ratio:.2f}x FP32's {fp_ms:.2f} ms "
            f"at batch {batch}, so these bars show the cost of simulation, not integer-kernel speed.")


def plot_latency(summary: dict[str, Any], out_dir: Path) -> tuple[Optional[Path], str]:
    """Median latency per variant at batch 1 and 64 (p90 whiskers), kernels kept apart."""
    rows = rows_of(summary)
    batches = [b for b, col in LATENCY_COLUMNS.items() if any(num(r.get(col)) for r in rows)]
    if not batches:
        return _skip("summary.json has no latency measurements, so there is no latency figure.")
    variants = summary.get("variants") or {}
    extra: dict[str, str] = {}
    data = {"batches": batches, "bars": [{"name": r["name"], "kernel": r.get("kernel"),
                                          **{LATENCY_COLUMNS[b]: r.get(LATENCY_COLUMNS[b]) for b in batches}}
                                         for r in rows]}
    with _style() as plt:
        fig, axes = plt.subplots(1, len(batches), figsize=(max(7.0, 0.7 * len(rows) + 2) * len(batches) / 1.4,
                                                           4.4), constrained_layout=True, squeeze=False)
        seen: set[str] = set()
        for ax, batch in zip(axes[0], batches):
            column = LATENCY_COLUMNS[batch]
            for i, row in enumerate(rows):
                value = num(row.get(column))
                if value is None:
                    continue
                kernel = row.get("kernel") or SIMULATED
                p90 = num(((variants.get(row["name"]) or {}).get("latency") or {}).get(str(batch), {})
                          .get("p90_ms"))
                err = [[0], [max(0.0, p90 - value)]] if p90 else None
                ax.bar(i, value, 0.7, yerr=err, capsize=3, ecolor="#555555",
                       label=None if kernel in seen else _kernel_label(kernel), **_kernel_style(kernel, extra))
                seen.add(kernel)
                ax.annotate(f"{value:.2f}", (i, value), textcoords="offset points", xytext=(0, 2),
                            ha="center", va="bottom", fontsize=7,
                            bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5, "alpha": 0.85})
            ax.set_xticks(range(len(rows)), [display_name(r["name"]) for r in rows], rotation=35, ha="right")
            ax.set(ylabel="median latency (ms)", title=f"Batch {batch} (whisker: p90)")
            ax.margins(y=0.15)
            ax.grid(axis="y", alpha=0.3)
        _figure_legend(fig, axes, columns=3)
        threads = (summary.get("system") or {}).get("torch_threads")
        fig.suptitle("Inference time per variant" + (f" ({threads} thread{'s' * (threads != 1)})"
                                                     if threads else ""))
        path = _save(fig, out_dir, "latency.png", data)
    return path, latency_caption(summary)


# ------------------------------------------------------------------ Pareto

def pareto_front(points: list[tuple[float, float, str]]) -> list[str]:
    """Names on the front of (cost, accuracy, name): no other point is cheaper and better."""
    front, best = [], -math.inf
    for cost, accuracy, name in sorted(points, key=lambda p: (p[0], -p[1])):
        if accuracy > best:
            front.append(name)
            best = accuracy
    return front


def _label_points(ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Name each point, trying sides in turn until the label covers no other point or label."""
    from matplotlib.transforms import Bbox

    ax.autoscale_view()
    renderer = ax.figure.canvas.get_renderer()
    sides = [(6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
             (-6, -4, "right", "top"), (0, 8, "center", "bottom"), (0, -8, "center", "top")]
    centres = ax.transData.transform([(x, y) for x, y, _ in points])
    markers = [Bbox.from_bounds(cx - 5, cy - 5, 10, 10) for cx, cy in centres]
    labels: list[Any] = []
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    for i in order:
        x, y, name = points[i]
        others = labels + [m for j, m in enumerate(markers) if j != i]
        for attempt, (dx, dy, ha, va) in enumerate(sides + [sides[0]]):
            label = ax.annotate(name, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va,
                                fontsize=7)
            box = label.get_window_extent(renderer)
            if attempt == len(sides) or not any(box.overlaps(other) for other in others):
                break  # a free side, or crowded everywhere: the first side
            label.remove()
        labels.append(box)


def pareto_caption(summary: dict[str, Any]) -> str:
    fp = fp_row(summary)
    sized = [r for r in rows_of(summary) if num(r.get("size_bytes"))]
    if fp is None or not sized:
        return "No sizes to build a Pareto front from."
    tol = _tolerance(summary)
    front = pareto_front([(num(r["size_bytes"]), r["top1"], r["name"]) for r in sized])
    close = [r for r in sized if r is not fp and fp["top1"] - r["top1"] <= tol]
    text = f"The size-accuracy Pareto front is {' → '.join(display_name(n) for n in front)}"
    if close:
        best = min(close, key=lambda r: num(r["size_bytes"]))
        text += (f", and the smallest variant within {tol:.2f} points of FP32's top-1 is "
                 f"{display_name(best['name'])} at {100 * num(best['size_ratio'] or 0):.1f}% of its size")
    else:
        text += f", and no quantized variant stays within {tol:.2f} points of FP32's top-1"
    return text + "."


def plot_pareto(summary: dict[str, Any], out_dir: Path) -> tuple[Optional[Path], str]:
    """Top-1 against file size and against latency; the Pareto fronts as step lines."""
    rows = rows_of(summary)
    latency_col = next((c for c in ("latency_ms_b64", "latency_ms_b1") if any(num(r.get(c)) for r in rows)), None)
    panels = [(c, t) for c, t in (("size_bytes", "file size (KiB)"),
                                  (latency_col, f"latency, batch {'64' if latency_col == 'latency_ms_b64' else '1'} (ms)"))
              if c and any(num(r.get(c)) for r in rows)]
    if not panels:
        return _skip("summary.json has neither sizes nor latencies, so there is no Pareto figure.")
    main = main_recipe(summary)
    data = {"points": [{k: r.get(k) for k in ("name", "recipe", "kernel", "top1", "size_bytes", latency_col)
                        if k} for r in rows]}
    with _style() as plt:
        fig, axes = plt.subplots(1, len(panels), figsize=(5.6 * len(panels), 4.4), constrained_layout=True,
                                 squeeze=False)
        for ax, (column, xlabel) in zip(axes[0], panels):
            scale = 1024.0 if column == "size_bytes" else 1.0
            pts = [(num(r[column]) / scale, r["top1"], r) for r in rows if num(r.get(column))]
            front = pareto_front([(x, y, r["name"]) for x, y, r in pts])
            front_pts = sorted((x, y) for x, y, r in pts if r["name"] in front)
            ax.step([p[0] for p in front_pts], [p[1] for p in front_pts], where="post", color="#999999",
                    linewidth=1, zorder=1, label="Pareto front")
            for x, y, r in pts:
                color = FP_COLOR if r.get("recipe") == FLOAT else MAIN_COLOR if r.get("recipe") == main \
                    else BASELINE_COLOR
                hollow = r.get("kernel") == SIMULATED and column != "size_bytes"
                ax.scatter([x], [y], s=46, zorder=2, edgecolors=color, linewidths=1.5,
                           facecolors="white" if hollow else color)
            ax.set(xlabel=xlabel, ylabel="top-1 accuracy (%)")
            if column != "size_bytes":
                ax.set_title("Latency vs accuracy (hollow = simulated, not integer speed)")
            else:
                ax.set_title("File size vs accuracy")
            ax.margins(x=0.12, y=0.12)
            ax.grid(alpha=0.3)
            _label_points(ax, [(x, y, display_name(r["name"])) for x, y, r in pts])
        from matplotlib.lines import Line2D

        kinds = [("FP32", FP_COLOR), (f"{main} (this run's recipe)", MAIN_COLOR)]
        if any(r.get("recipe") not in (FLOAT, main) for r in rows):
            kinds.append(("other recipes", BASELINE_COLOR))
        handles = [Line2D([], [], marker="o", linestyle="", color=c, label=t) for t, c in kinds]
        handles.append(Line2D([], [], color="#999999", label="Pareto front"))
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), frameon=False)
        path = _save(fig, out_dir, "pareto.png", data)
    return path, pareto_caption(summary)


# ------------------------------------------------------------------ per class and confusion

MAX_HEATMAP_CLASSES = 40


def per_class_change(summary: dict[str, Any]) -> Optional[dict[str, Any]]:
    """Per-class accuracy change (points) against FP32: classes x variants."""
    variants = summary.get("variants") or {}
    fp = fp_row(summary)
    if fp is None or "per_class_accuracy" not in (variants.get(fp["name"], {}).get("metrics") or {}):
        return None
    columns = main_series(summary)
    extra = [r for k, rs in series(summary).items() if k != main_recipe(summary) for r in rs]
    if len(columns) + len(extra) <= 12:
        columns = sorted(columns + extra, key=lambda r: (r["w_bits"], r["a_bits"], r["recipe"] != main_recipe(summary)))
    columns = [r for r in columns if "per_class_accuracy" in (variants.get(r["name"], {}).get("metrics") or {})]
    if not columns:
        return None
    fp_metrics = variants[fp["name"]]["metrics"]
    class_names = summary.get("class_names") or fp_metrics.get("class_names") or \
        [str(i) for i in range(len(fp_metrics["per_class_accuracy"]))]
    base = [num(v) for v in fp_metrics["per_class_accuracy"]]
    change = [[None if num(v) is None or b is None else num(v) - b
               for v, b in zip(variants[r["name"]]["metrics"]["per_class_accuracy"], base)] for r in columns]
    return {"classes": list(class_names), "variants": [r["name"] for r in columns],
            "counts": fp_metrics.get("per_class_count"), "change": change}  # change[variant][class]


def per_class_caption(summary: dict[str, Any]) -> str:
    table = per_class_change(summary)
    if table is None:
        return "No per-class accuracy in summary.json."
    cells = [(v, table["variants"][j], table["classes"][i]) for j, col in enumerate(table["change"])
             for i, v in enumerate(col) if v is not None]
    worst = min(cells, key=lambda c: c[0])
    mains = [r["name"] for r in main_series(summary) if r["name"] in table["variants"]]
    last = mains[-1] if mains else table["variants"][-1]
    spread = max(abs(v) for v, name, _ in cells if name == last)
    if worst[0] >= 0:
        text = "No class loses accuracy at any bit depth"
    else:
        count = (table.get("counts") or [None] * len(table["classes"]))[table["classes"].index(worst[2])]
        text = (f"The largest per-class loss is {worst[2]} at {display_name(worst[1])} "
                f"({signed(worst[0])} points" + (f" on {count} images)" if count else ")"))
    return text + f", and at {display_name(last)} no class moves by more than {spread:.2f} points."


def plot_per_class(summary: dict[str, Any], out_dir: Path) -> tuple[Optional[Path], str]:
    """Heatmap of per-class accuracy change against FP32 (classes x bit depths)."""
    table = per_class_change(summary)
    if table is None:
        return _skip("summary.json has no per-class accuracy, so there is no per-class figure.")
    matrix = np.array([[np.nan if v is None else v for v in col] for col in table["change"]]).T
    classes = list(table["classes"])
    title = "Per-class top-1 change vs FP32 (points)"
    if len(classes) > MAX_HEATMAP_CLASSES:  # keep the classes that move most at the lowest bits
        keep = np.argsort(-np.nan_to_num(np.abs(matrix[:, 0])))[:MAX_HEATMAP_CLASSES]
        keep.sort()
        matrix, classes = matrix[keep], [classes[i] for i in keep]
        title += f", the {MAX_HEATMAP_CLASSES} of {len(table['classes'])} classes that move most"
    limit = max(1.0, float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0)
    with _style() as plt:
        rows, cols = matrix.shape
        fig, ax = plt.subplots(figsize=(2.8 + 0.95 * cols + 0.06 * max(len(c) for c in classes),
                                        1.4 + 0.34 * rows), constrained_layout=True)
        image = ax.imshow(matrix, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        if rows * cols <= 600:
            for (i, j), value in np.ndenumerate(matrix):
                if np.isfinite(value):
                    ax.text(j, i, signed(value, 1), ha="center", va="center", fontsize=7,
                            color="white" if abs(value) > 0.6 * limit else "black")
        ax.set_xticks(range(cols), [display_name(n) for n in table["variants"]], rotation=30, ha="right")
        ax.set_yticks(range(rows), classes)
        ax.set_title(title)
        fig.colorbar(image, ax=ax, label="points (red: worse than FP32)", shrink=0.8)
        path = _save(fig, out_dir, "per_class_change.png", table)
    return path, per_class_caption(summary)


def confusion_caption(summary: dict[str, Any], name: str) -> str:
    variants = summary.get("variants") or {}
    fp = fp_row(summary)
    metrics = (variants.get(name) or {}).get("metrics") or {}
    row = next((r for r in rows_of(summary) if r["name"] == name), None)
    if fp is None or "confusion" not in metrics or row is None:
        return f"No confusion matrix for {name}."
    diff = np.array(metrics["confusion"]) - np.array(variants[fp["name"]]["metrics"]["confusion"])
    n = metrics.get("num_images") or int(np.array(metrics["confusion"]).sum())
    changed = round((100.0 - row["agreement"]) * n / 100.0)
    classes = summary.get("class_names") or [str(i) for i in range(diff.shape[0])]
    off = diff.copy()
    np.fill_diagonal(off, 0)
    text = (f"At {display_name(name)}, {changed} of {n} images get a different top-1 class than FP32 "
            f"(agreement {row['agreement']:.2f}%)")
    if np.abs(off).max() > 0:
        i, j = np.unravel_index(np.abs(off).argmax(), off.shape)
        text += (f", the largest shift being {int(off[i, j]):+d} images of {classes[i]} predicted as "
                 f"{classes[j]}")
    return text + "."


def plot_confusion(summary: dict[str, Any], out_dir: Path, name: str) -> tuple[Optional[Path], str]:
    """FP32's confusion matrix, ``name``'s, and their difference (counts)."""
    variants = summary.get("variants") or {}
    fp = fp_row(summary)
    metrics = (variants.get(name) or {}).get("metrics") or {}
    if fp is None or "confusion" not in metrics or "confusion" not in variants[fp["name"]]["metrics"]:
        return _skip(f"summary.json has no confusion matrix for {name}, so there is no figure.")
    reference = np.array(variants[fp["name"]]["metrics"]["confusion"])
    matrix = np.array(metrics["confusion"])
    diff = matrix - reference
    classes = list(summary.get("class_names") or [str(i) for i in range(len(matrix))])
    k = len(classes)
    annotate, show_ticks = k <= 15, k <= 40
    side = min(5.5, 1.3 + 0.32 * k)
    data = {"classes": classes, "fp32": reference.tolist(), name: matrix.tolist(), "difference": diff.tolist()}
    with _style() as plt:
        fig, axes = plt.subplots(1, 3, figsize=(3 * side + 1.8, side + 1.6), constrained_layout=True)
        limit = max(1, int(np.abs(diff).max()))
        panels = [(reference, "FP32", "Blues", 0, reference.max()),
                  (matrix, display_name(name), "Blues", 0, reference.max()),
                  (diff, f"{display_name(name)} - FP32", "RdBu_r", -limit, limit)]
        for ax, (values, title, cmap, vmin, vmax) in zip(axes, panels):
            image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=max(vmax, 1))
            if annotate:
                for (i, j), value in np.ndenumerate(values):
                    if value != 0 or cmap != "RdBu_r":
                        strong = abs(value) > 0.6 * max(abs(vmax), 1)
                        ax.text(j, i, f"{value:+d}" if cmap == "RdBu_r" else str(value), ha="center",
                                va="center", fontsize=7, color="white" if strong else "black")
            if show_ticks:
                ax.set_xticks(range(k), classes, rotation=45, ha="right")
                ax.set_yticks(range(k), classes if ax is axes[0] else [""] * k)
            ax.set(title=title, xlabel="predicted")
            fig.colorbar(image, ax=ax, shrink=0.7)
        axes[0].set_ylabel("true class")
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        path = _save(fig, out_dir, f"confusion_{safe}.png", data)
    return path, confusion_caption(summary, name)


# ------------------------------------------------------------------ activations and weights

def _short_tensor(tensor_id: str) -> str:
    layer, _, kind = tensor_id.rpartition(":")
    role = {"linear_input": "input", "image": "input", "softmax": "", "residual": ""}.get(kind, kind)
    return f"{layer} {role}".strip()


def by_bits(names: list[str]) -> list[str]:
    """Variant names by activation bits, plain names (the run's recipe) before suffixed ones."""
    return sorted(names, key=lambda n: (_bits_of(n) or 99, "-" in n, n))


def default_variant(summary: Optional[dict[str, Any]], available: list[str]) -> Optional[str]:
    """The variant whose grids are drawn: the lowest bit depth of the main recipe."""
    low = lowest_main(summary) if summary else None
    if low is not None and low["name"] in available:
        return low["name"]
    return (by_bits(available) or [None])[0]


def _pick(items: list[Any], count: int = 3) -> list[Any]:
    if len(items) <= count:
        return items
    return [items[0], items[len(items) // 2], items[-1]]


def activation_caption(activations: dict[str, Any], variant: Optional[str]) -> str:
    tensors = activations.get("tensors") or []
    if not tensors:
        return "No activation statistics."
    widest = max(tensors, key=lambda t: num(t["abs_max"]))
    tail = f"the widest tensor is {_short_tensor(widest['id'])} (|x| up to {num(widest['abs_max']):.3g})"
    quantized = [t for t in tensors if variant in t.get("quant", {})]
    if not quantized:
        return f"Across {len(tensors)} tensors, {tail}."
    worst = max(quantized, key=lambda t: t["quant"][variant]["clipped_fraction"])
    q = worst["quant"][variant]
    return (f"At {display_name(variant)} the most clipped tensor is {_short_tensor(worst['id'])} "
            f"({activations.get('groups', {}).get(worst['group'], worst['group'])}), with "
            f"{100 * q['clipped_fraction']:.3f}% of its values outside [{num(q['lo']):.3g}, "
            f"{num(q['hi']):.3g}], and {tail}.")


def plot_activation_histograms(analysis: Optional[dict[str, Any]], out_dir: Path,
                               variant: Optional[str] = None,
                               summary: Optional[dict[str, Any]] = None) -> tuple[Optional[Path], str]:
    """Float activation histograms per tensor kind (log counts) with ``variant``'s ranges."""
    activations = (analysis or {}).get("activations")
    if not activations or not activations.get("tensors"):
        return _skip("No activation statistics (run with --analysis basic or full).")
    tensors = activations["tensors"]
    names = sorted({v for t in tensors for v in t.get("quant", {})})
    variant = variant or default_variant(summary, names)
    from matplotlib.transforms import blended_transform_factory

    groups = [g for g in activations.get("groups", {}) if any(t["group"] == g for t in tensors)]
    columns = 2
    rows = math.ceil(len(groups) / columns)
    shown: dict[str, list[str]] = {}
    with _style() as plt:
        fig, axes = plt.subplots(rows, columns, figsize=(12, 3.1 * rows), constrained_layout=True,
                                 squeeze=False)
        colors = ["#1f77b4", "#d62728", "#2ca02c"]
        for ax, group in zip(axes.flat, groups):
            members = _pick([t for t in tensors if t["group"] == group])
            shown[group] = [t["id"] for t in members]
            rug = blended_transform_factory(ax.transData, ax.transAxes)  # x: data, y: axes fraction
            for index, (color, t) in enumerate(zip(colors, members)):
                edges = np.array(t["histogram"]["edges"], dtype=float)
                counts = np.array(t["histogram"]["counts"], dtype=float)
                label = _short_tensor(t["id"])
                q = t.get("quant", {}).get(variant)
                if q:
                    label += f" (clips {100 * q['clipped_fraction']:.2f}%"
                    label += ", reparameterized: range not drawn)" if q.get("reparameterized") else ")"
                ax.stairs(np.where(counts > 0, counts, np.nan), edges, color=color, label=label, linewidth=1.2)
                if q and not q.get("reparameterized"):
                    for bound in (num(q["lo"]), num(q["hi"])):
                        ax.axvline(bound, color=color, linestyle="--", linewidth=1, alpha=0.8)
                    if q.get("levels"):  # few enough levels: mark each one along the bottom
                        ax.plot(q["levels"], [0.03 + 0.04 * index] * len(q["levels"]), "|", color=color,
                                markersize=6, transform=rug)
            _log_y(ax)
            top = max((max(t["histogram"]["counts"]) for t in members), default=1)
            ax.set_ylim(0.5, max(top, 1) * 80)  # headroom for the legend above the curves
            ax.set(title=activations["groups"][group], ylabel="count (log)", xlabel="value")
            ax.grid(alpha=0.25)
            ax.legend(loc="upper right", fontsize=7)
        for ax in list(axes.flat)[len(groups):]:
            ax.set_visible(False)
        grid_text = f"; dashed: {display_name(variant)} clipping range, ticks: its levels" if variant else ""
        fig.suptitle(f"Float activations on {activations.get('images', '?')} evaluation images"
                     f" (first, middle and last layer of each kind{grid_text})")
        data = {"variant": variant, "shown": shown,
                "tensors": [{k: t[k] for k in ("id", "group", "min", "max", "quant")} for t in tensors]}
        path = _save(fig, out_dir, "activation_histograms.png", data)
    return path, activation_caption(activations, variant)


def weight_caption(weights: dict[str, Any], variant: Optional[str]) -> str:
    layers = [w for w in weights.get("layers") or [] if variant in w.get("quant", {})]
    if not layers:
        return f"Weight histograms of {len(weights.get('layers') or [])} layers (none quantized here)."
    worst = min(layers, key=lambda w: num(w["quant"][variant]["sqnr_db"]))
    best = max(layers, key=lambda w: num(w["quant"][variant]["sqnr_db"]))
    return (f"At {display_name(variant)}, {worst['layer']} has the lowest weight SQNR of the layers shown "
            f"({num(worst['quant'][variant]['sqnr_db']):.1f} dB) and {best['layer']} the highest "
            f"({num(best['quant'][variant]['sqnr_db']):.1f} dB).")


def plot_weight_histograms(analysis: Optional[dict[str, Any]], out_dir: Path,
                           variant: Optional[str] = None,
                           summary: Optional[dict[str, Any]] = None) -> tuple[Optional[Path], str]:
    """Float weight histograms of selected layers with ``variant``'s grid."""
    weights = (analysis or {}).get("weights")
    if not weights or not weights.get("layers"):
        return _skip("No weight statistics (run with --analysis basic or full).")
    layers = weights["layers"]
    names = sorted({v for w in layers for v in w.get("quant", {})})
    variant = variant or default_variant(summary, names)
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    with _style() as plt:
        fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns, 3.2 * rows), constrained_layout=True,
                                 squeeze=False)
        for ax, w in zip(axes.flat, layers):
            edges = np.array(w["histogram"]["edges"], dtype=float)
            counts = np.array(w["histogram"]["counts"], dtype=float)
            ax.stairs(np.where(counts > 0, counts, np.nan), edges, color=MAIN_COLOR, fill=True, alpha=0.6)
            q = w.get("quant", {}).get(variant)
            if q and q.get("reparameterized"):
                ax.text(0.02, 0.95, f"{display_name(variant)}: SQNR {num(q['sqnr_db']):.1f} dB\n"
                                    "reparameterized: grid not in these coordinates",
                        transform=ax.transAxes, va="top", fontsize=7,
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            elif q:
                for level in q.get("levels", []):
                    ax.axvline(level, color="#555555", linewidth=0.6, alpha=0.35)
                for bound in (num(q["lo"]), num(q["hi"])):
                    ax.axvline(bound, color="#d62728", linestyle="--", linewidth=1.1)
                if q.get("granularity") != "tensor":
                    for bound in (num(q["lo_median"]), num(q["hi_median"])):
                        ax.axvline(bound, color="#d62728", linestyle=":", linewidth=1.1)
                ax.text(0.02, 0.95, f"{display_name(variant)}: SQNR {num(q['sqnr_db']):.1f} dB\n"
                                    f"step {num(q['step']):.2g} ({q['granularity']})",
                        transform=ax.transAxes, va="top", fontsize=7,
                        bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            _log_y(ax)
            ax.set_ylim(0.5, max(counts.max(), 1) * 30)  # headroom for the text box
            ax.set(title=f"{w['layer']} {tuple(w['shape'])}", xlabel="weight", ylabel="count (log)")
            ax.grid(alpha=0.25)
        for ax in list(axes.flat)[len(layers):]:
            ax.set_visible(False)
        if variant:
            fig.suptitle(f"Float weights with the {display_name(variant)} grid (dashed: widest channel's "
                         "range, dotted: median channel's, grey: levels when per-tensor)")
        data = {"variant": variant, "layers": [{k: w[k] for k in ("layer", "shape", "min", "max", "quant")}
                                               for w in layers]}
        path = _save(fig, out_dir, "weight_histograms.png", data)
    return path, weight_caption(weights, variant)


# ------------------------------------------------------------------ SQNR heatmap

def sqnr_caption(sqnr: dict[str, Any], summary: Optional[dict[str, Any]] = None) -> str:
    names = [n for n in sqnr.get("variants", []) if any(v is not None for v in sqnr["sqnr_db"][n])]
    if not names:
        return "No quantized tensors to compare."
    main = main_recipe(summary) if summary else None
    main_names = [r["name"] for r in main_series(summary)] if summary else [n for n in names if "-" not in n]
    ordered = by_bits([n for n in names if n in main_names] or names)
    low, high = ordered[0], ordered[-1]
    values = [(num(v), t) for v, t in zip(sqnr["sqnr_db"][low], sqnr["tensors"]) if v is not None]
    worst_value, worst = min(values, key=lambda p: p[0])
    text = (f"At {display_name(low)} the noisiest quantized activation is {_short_tensor(worst['id'])} "
            f"({worst_value:.1f} dB)")
    medians = {n: float(np.median([num(v) for v in sqnr["sqnr_db"][n] if v is not None and
                                   math.isfinite(num(v))] or [np.nan])) for n in (low, high)}
    bits_low, bits_high = _bits_of(low), _bits_of(high)
    if high != low and bits_low and bits_high and bits_high != bits_low:
        slope = (medians[high] - medians[low]) / (bits_high - bits_low)
        text += (f", and the median tensor SQNR{' (' + main + ')' if main else ''} rises {slope:.1f} dB per "
                 f"bit from {medians[low]:.1f} dB to {medians[high]:.1f} dB at {display_name(high)}")
    return text + "."


def plot_sqnr_heatmap(analysis: Optional[dict[str, Any]], out_dir: Path,
                      summary: Optional[dict[str, Any]] = None) -> tuple[Optional[Path], str]:
    """SQNR of every quantized activation (model order) and weight, per variant."""
    sqnr = (analysis or {}).get("sqnr")
    if not sqnr or not sqnr.get("variants") or not sqnr.get("tensors"):
        return _skip("No per-tensor SQNR (run with --analysis basic or full).")
    names = sqnr["variants"]
    acts = np.array([[np.nan if v is None else num(v) for v in sqnr["sqnr_db"][n]] for n in names]).T
    keep = ~np.all(np.isnan(acts), axis=1)  # tensors no variant quantizes (e.g. residuals)
    acts = acts[keep]
    act_labels = [_short_tensor(t["id"]) for t, k in zip(sqnr["tensors"], keep) if k]
    weights = sqnr.get("weights") or {}
    wmat = np.array([[np.nan if v is None else num(v) for v in weights.get("sqnr_db", {}).get(n, [])]
                     for n in names]).T if weights.get("layers") else np.zeros((0, len(names)))
    finite = np.concatenate([acts[np.isfinite(acts)], wmat[np.isfinite(wmat)]])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    data = {"variants": names, "tensors": act_labels, "activation_sqnr_db": acts.tolist(),
            "weight_layers": weights.get("layers", []), "weight_sqnr_db": wmat.tolist()}
    panels = [(acts, act_labels, "Activations (quantizer outputs)"),
              (wmat, weights.get("layers", []), "Weights")]
    panels = [p for p in panels if p[0].shape[0]]
    with _style() as plt:
        # Stacked, one row per tensor: wide figures get scaled down (and unreadable) in a page.
        heights = [p[0].shape[0] for p in panels]
        fig, axes = plt.subplots(len(panels), 1, figsize=(3.4 + max(0.62 * len(names), 3.0),
                                                           1.8 + 0.19 * sum(heights) + 0.6 * len(panels)),
                                 constrained_layout=True, squeeze=False, gridspec_kw={"height_ratios": heights})
        axes = axes[:, 0]
        cmap = plt.get_cmap("viridis").with_extremes(bad="#eeeeee")
        for ax, (matrix, labels, title) in zip(axes, panels):
            shown = np.clip(matrix, vmin, vmax)
            image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
            if matrix.size and matrix.size <= 900:
                for (i, j), value in np.ndenumerate(matrix):
                    if not np.isnan(value):
                        text = "inf" if np.isinf(value) else f"{value:.0f}"
                        ax.text(j, i, text, ha="center", va="center", fontsize=6.5,
                                color="white" if shown[i, j] < vmin + 0.55 * (vmax - vmin) else "black")
            ax.set_xticks(range(len(names)), [display_name(n) for n in names], rotation=35, ha="right")
            ax.set_yticks(range(len(labels)), labels, fontsize=7.5)
            ax.set_title(title)
        fig.colorbar(image, ax=list(axes), label="SQNR (dB, higher is better)", shrink=0.5, aspect=40)
        fig.suptitle(f"Per-tensor SQNR against FP32, layers in model order ({sqnr.get('images', '?')} images)")
        path = _save(fig, out_dir, "sqnr_heatmap.png", data)
    return path, sqnr_caption(sqnr, summary)


# ------------------------------------------------------------------ sensitivity

def sensitivity_caption(sens: dict[str, Any]) -> str:
    rows = sens.get("rows") or []
    if not rows:
        return "No sensitivity rows."
    top = rows[0]
    text = (f"Quantizing {top['layer']}'s {top['target']} alone to {top['bits']} bits does the most damage "
            f"(KL {num(top['kl_div']):.3g} nats, top-1 drop {num(top['top1_drop']):+.2f} points on "
            f"{top['images']} images)")
    if sens.get("suggested_overrides"):
        text += f", so the suggested overrides are {', '.join(sens['suggested_overrides'])}"
    return text + "."


def plot_sensitivity(analysis: Optional[dict[str, Any]], out_dir: Path, top: int = 20
                     ) -> tuple[Optional[Path], str]:
    """The ``top`` most damaging single-layer quantizations, ranked."""
    sens = (analysis or {}).get("sensitivity")
    if not sens or not sens.get("rows"):
        return _skip("No sensitivity ranking (run with --analysis full).")
    rows = sens["rows"][:top]
    bits = sorted({r["bits"] for r in sens["rows"]})
    values = np.array([max(num(r["kl_div"]), 1e-12) for r in rows])
    colors = {"weights": "#ff7f0e", "activations": "#9467bd"}
    with _style() as plt:
        fig, ax = plt.subplots(figsize=(10, 1.4 + 0.3 * len(rows)), constrained_layout=True)
        y = np.arange(len(rows))
        for i, r in enumerate(rows):
            ax.barh(i, values[i], color=colors.get(r["target"], "#888888"),
                    alpha=1.0 if r["bits"] == bits[0] else 0.5)
            ax.annotate(f"top-1 {signed(-num(r['top1_drop']))}", (values[i], i), textcoords="offset points",
                        xytext=(4, 0), va="center", fontsize=7)
        ax.set_yticks(y, [f"{r['layer']} · {r['target']} · {r['bits']}-bit" for r in rows])
        ax.invert_yaxis()
        if values.max() / values.min() > 100:
            ax.set_xscale("log")
        ax.margins(x=0.15)
        ax.set(xlabel="KL(FP32 || one layer quantized), nats", title=f"Most sensitive layers: one layer "
               f"quantized at a time, all else float ({rows[0]['images']} images)")
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=c, label=t) for t, c in colors.items()] +
                  [Patch(color="#888888", alpha=a, label=f"{b}-bit") for b, a in
                   zip(bits, [1.0] + [0.5] * (len(bits) - 1))], loc="lower right")
        ax.grid(axis="x", alpha=0.3)
        path = _save(fig, out_dir, "sensitivity.png", {"rows": rows})
    return path, sensitivity_caption(sens)


# ------------------------------------------------------------------ training and all figures

def training_figure(training_dir: Optional[Path]) -> Optional[Figure]:
    """training_curves.png next to the model file, if there; caption from metrics.csv."""
    if training_dir is None or not (Path(training_dir) / "training_curves.png").is_file():
        return None
    training_dir = Path(training_dir)
    caption = f"Training curves of the model in {training_dir}."
    metrics = training_dir / "metrics.csv"
    if metrics.is_file():
        try:
            with open(metrics, newline="") as handle:
                history = [r for r in csv.DictReader(handle) if r.get("val_acc")]
            best = max(history, key=lambda r: float(r["val_acc"]))
            caption = (f"Training reached its best validation top-1 of {float(best['val_acc']):.2f}% at "
                       f"epoch {best['epoch']} of {len(history)}.")
        except (OSError, ValueError, KeyError):
            pass
    return Figure("training", "Training curves", training_dir / "training_curves.png", caption)


def make_figures(summary: dict[str, Any], analysis: Optional[dict[str, Any]], out_dir: Path,
                 training_dir: Optional[Path] = None, variant: Optional[str] = None) -> list[Figure]:
    """Every figure of the report, in reading order (skipped ones have ``path=None``)."""
    out_dir = Path(out_dir)
    figures = [
        Figure("accuracy", "Accuracy vs bit depth", *plot_accuracy(summary, out_dir)),
        Figure("drop", "Accuracy drop and agreement", *plot_drop_and_agreement(summary, out_dir)),
        Figure("size", "Model file size", *plot_size(summary, out_dir)),
        Figure("latency", "Inference time", *plot_latency(summary, out_dir)),
        Figure("pareto", "Size and latency vs accuracy", *plot_pareto(summary, out_dir)),
        Figure("per_class", "Per-class accuracy change", *plot_per_class(summary, out_dir)),
    ]
    for row in main_series(summary):
        figures.append(Figure(f"confusion_{row['name']}", f"Confusion: FP32 vs {display_name(row['name'])}",
                              *plot_confusion(summary, out_dir, row["name"])))
    figures += [
        Figure("activations", "Activation histograms",
               *plot_activation_histograms(analysis, out_dir, variant, summary)),
        Figure("weights", "Weight histograms", *plot_weight_histograms(analysis, out_dir, variant, summary)),
        Figure("sqnr", "Per-layer SQNR", *plot_sqnr_heatmap(analysis, out_dir, summary)),
        Figure("sensitivity", "Layer sensitivity", *plot_sensitivity(analysis, out_dir)),
    ]
    training = training_figure(training_dir)
    if training is not None:
        figures.append(training)
    return figures


__all__ = ["Figure", "make_figures", "plot_accuracy", "plot_drop_and_agreement", "plot_size",
           "plot_latency", "plot_pareto", "plot_per_class", "plot_confusion",
           "plot_activation_histograms", "plot_weight_histograms", "plot_sqnr_heatmap",
           "plot_sensitivity", "training_figure", "read_plot_data", "pareto_front", "PLOTS_DIR"]
