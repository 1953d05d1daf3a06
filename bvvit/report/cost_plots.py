"""What quantization buys, from summary.json: the real file size by part, the latency per
variant with real and simulated kernels kept apart, and the size / latency vs accuracy
Pareto fronts. Each ``plot_*`` returns ``(path, caption)`` (see :mod:`bvvit.report.plots`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bvvit.plotting import styled_pyplot
from bvvit.report.style import (BASELINE_COLOR, EXTRA_COLORS, FLOAT, FP_COLOR, MAIN_COLOR, SIMULATED, bits_label,
                                display_name, figure_legend, fp_row, latency_batches, latency_column, lowest_main,
                                main_recipe, num, rows_of, save_figure, skipped, tolerance)


# ------------------------------------------------------------------ size

BREAKDOWN = [("packed_weights", "packed integer weights", "#1f77b4"),
             ("scales", "scales / zero points", "#ff7f0e"),
             ("float_parameters", "float parameters", "#2ca02c"),
             ("header_and_metadata", "header and metadata", "#bbbbbb")]


def _files(summary: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    variants = summary.get("variants") or {}
    return [(row, variants[row["name"]]["file"]) for row in rows_of(summary)
            if (variants.get(row["name"]) or {}).get("file")]


def _kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


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
        return skipped("summary.json has no file sizes, so there is no model-size figure.")
    fp_bytes = max(f["size_bytes"] for _, f in files)
    unit, scale = ("MiB", 1 << 20) if fp_bytes >= 1 << 20 else ("KiB", 1024)
    names = [display_name(r["name"]) for r, _ in files]
    data = {"unit": unit, "bars": [{"name": r["name"], "size_bytes": f["size_bytes"],
                                    "breakdown": f.get("breakdown", {}),
                                    "ideal_bytes": f.get("ideal_bytes")} for r, f in files]}
    with styled_pyplot() as plt:
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
        path = save_figure(fig, out_dir, "model_size.png", data)
    return path, size_caption(summary)


# ------------------------------------------------------------------ latency

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
    batch = next((b for b in reversed(latency_batches(summary)) if fp and num(fp.get(latency_column(b)))), None)
    if fp is None or batch is None:
        return "No FP32 latency to compare with."
    column, fp_ms = latency_column(batch), num(fp[latency_column(batch)])
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
    """Median latency per variant at each timed batch size (p90 whiskers), kernels kept apart."""
    rows = rows_of(summary)
    batches = [b for b in latency_batches(summary) if any(num(r.get(latency_column(b))) for r in rows)]
    if not batches:
        return skipped("summary.json has no latency measurements, so there is no latency figure.")
    variants = summary.get("variants") or {}
    extra: dict[str, str] = {}
    data = {"batches": batches, "bars": [{"name": r["name"], "kernel": r.get("kernel"),
                                          **{latency_column(b): r.get(latency_column(b)) for b in batches}}
                                         for r in rows]}
    with styled_pyplot() as plt:
        fig, axes = plt.subplots(1, len(batches), figsize=(max(7.0, 0.7 * len(rows) + 2) * len(batches) / 1.4,
                                                           4.4), constrained_layout=True, squeeze=False)
        seen: set[str] = set()
        for ax, batch in zip(axes[0], batches):
            column = latency_column(batch)
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
        figure_legend(fig, axes, columns=3)
        threads = (summary.get("system") or {}).get("torch_threads")
        fig.suptitle("Inference time per variant" + (f" ({threads} thread{'s' * (threads != 1)})"
                                                     if threads else ""))
        path = save_figure(fig, out_dir, "latency.png", data)
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
    tol = tolerance(summary)
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
    batch = next((b for b in reversed(latency_batches(summary))
                  if any(num(r.get(latency_column(b))) for r in rows)), None)
    latency_col = None if batch is None else latency_column(batch)
    panels = [(c, t) for c, t in (("size_bytes", "file size (KiB)"), (latency_col, f"latency, batch {batch} (ms)"))
              if c and any(num(r.get(c)) for r in rows)]
    if not panels:
        return skipped("summary.json has neither sizes nor latencies, so there is no Pareto figure.")
    main = main_recipe(summary)
    data = {"points": [{k: r.get(k) for k in ("name", "recipe", "kernel", "top1", "size_bytes", latency_col)
                        if k} for r in rows]}
    with styled_pyplot() as plt:
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
        path = save_figure(fig, out_dir, "pareto.png", data)
    return path, pareto_caption(summary)
