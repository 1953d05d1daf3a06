"""The accuracy figures drawn from summary.json: top-1/top-5 per bit depth, the top-1 drop
and agreement with FP32, the per-class accuracy change (classes x variants) and, per
variant, the confusion matrix next to FP32's. Each ``plot_*`` returns ``(path, caption)``
(see :mod:`bvvit.report.plots`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bvvit.plotting import styled_pyplot
from bvvit.report.style import (BASELINE_COLOR, EXTRA_COLORS, FP_COLOR, MAIN_COLOR, bits_label, display_name,
                                figure_legend, fp_row, main_recipe, main_series, noise_floor, num, rows_of,
                                save_figure, series, signed, skipped, tolerance)


# ------------------------------------------------------------------ lines per bit depth

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


# ------------------------------------------------------------------ accuracy

def accuracy_caption(summary: dict[str, Any]) -> str:
    rows, fp = main_series(summary), fp_row(summary)
    if not rows or fp is None:
        return "No quantized variants to compare with FP32."
    tol = tolerance(summary)
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
    return text + _significance(rows, main_recipe(summary)) + "."


SIGNIFICANT = 0.05  # McNemar exact p below which an accuracy change is called real


def _significance(rows: list[dict[str, Any]], recipe: Optional[str]) -> str:
    """Which of these variants differ from FP32 by more than chance (paired test per image),
    as a clause that ends the caption's one sentence."""
    tested = [r for r in rows if num(r.get("drop_p_value")) is not None]
    if not tested:
        return ""
    real = [r for r in tested if num(r["drop_p_value"]) < SIGNIFICANT]
    if not real:
        return (f"; no {recipe} variant differs from FP32 beyond chance (McNemar exact test on "
                f"the images each gets right, p >= {SIGNIFICANT})")
    listed = ", ".join(f"{bits_label(r)} ({int(num(r['lost_vs_fp32']))} images lost, "
                       f"{int(num(r['gained_vs_fp32']))} gained, p {num(r['drop_p_value']):.2g})" for r in real)
    return (f"; of the {recipe} variants, {'only ' if len(real) < len(tested) else ''}{listed} "
            f"differ{'s' if len(real) == 1 else ''} from FP32 beyond chance (McNemar exact p < {SIGNIFICANT})")


def plot_accuracy(summary: dict[str, Any], out_dir: Path) -> tuple[Optional[Path], str]:
    """Top-1 and top-5 per bit depth, one line per recipe, with the FP32 level."""
    groups, fp = series(summary), fp_row(summary)
    if not groups:
        return skipped("No quantized variants in summary.json, so there is no accuracy-vs-bits figure.")
    main = main_recipe(summary)
    axis = _BitAxis([r for rows in groups.values() for r in rows])
    top_k = ((summary.get("variants") or {}).get("fp32", {}).get("metrics", {}).get("top5_k")) or 5
    data = {"fp32": {"top1": fp and fp["top1"], "top5": fp and fp["top5"]},
            "series": {k: [{key: r[key] for key in ("name", "w_bits", "a_bits", "top1", "top5")}
                           for r in rows] for k, rows in groups.items()}}
    with styled_pyplot() as plt:
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
        figure_legend(fig, axes)
        fig.suptitle(f"Accuracy vs bit depth on {summary.get('num_eval_images', '?')} evaluation images")
        path = save_figure(fig, out_dir, "accuracy_vs_bits.png", data)
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
        return skipped("No quantized variants in summary.json, so there is no accuracy-drop figure.")
    axis = _BitAxis([r for rows in groups.values() for r in rows])
    floor = noise_floor(summary)
    data = {"noise_floor": floor, "series": {k: [{key: r[key] for key in ("name", "w_bits", "a_bits",
                                                                            "top1_drop", "agreement")}
                                                 for r in rows] for k, rows in groups.items()}}
    with styled_pyplot() as plt:
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
        figure_legend(fig, axes)
        path = save_figure(fig, out_dir, "accuracy_drop.png", data)
    return path, drop_caption(summary)


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
    class_names = fp_metrics.get("class_names") or summary.get("class_names") or \
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
        return skipped("summary.json has no per-class accuracy, so there is no per-class figure.")
    matrix = np.array([[np.nan if v is None else v for v in col] for col in table["change"]]).T
    classes = list(table["classes"])
    title = "Per-class top-1 change vs FP32 (points)"
    if len(classes) > MAX_HEATMAP_CLASSES:  # keep the classes that move most at the lowest bits
        keep = np.argsort(-np.nan_to_num(np.abs(matrix[:, 0])))[:MAX_HEATMAP_CLASSES]
        keep.sort()
        matrix, classes = matrix[keep], [classes[i] for i in keep]
        title += f", the {MAX_HEATMAP_CLASSES} of {len(table['classes'])} classes that move most"
    limit = max(1.0, float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0)
    with styled_pyplot() as plt:
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
        path = save_figure(fig, out_dir, "per_class_change.png", table)
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
    classes = metrics.get("class_names") or summary.get("class_names") or [str(i) for i in range(diff.shape[0])]
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
        return skipped(f"summary.json has no confusion matrix for {name}, so there is no figure.")
    reference = np.array(variants[fp["name"]]["metrics"]["confusion"])
    matrix = np.array(metrics["confusion"])
    diff = matrix - reference
    classes = list(metrics.get("class_names") or summary.get("class_names") or [str(i) for i in range(len(matrix))])
    k = len(classes)
    annotate, show_ticks = k <= 15, k <= 40
    side = min(5.5, 1.3 + 0.32 * k)
    data = {"classes": classes, "fp32": reference.tolist(), name: matrix.tolist(), "difference": diff.tolist()}
    with styled_pyplot() as plt:
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
        path = save_figure(fig, out_dir, f"confusion_{safe}.png", data)
    return path, confusion_caption(summary, name)
