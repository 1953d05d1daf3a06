"""The figures drawn from the analysis (:func:`bvvit.evaluate.analysis.run_analysis`):
activation and weight histograms against a variant's grid, the per-tensor SQNR heatmap and
the layer-sensitivity ranking; and the training curves found next to the model file.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Optional

import numpy as np

from bvvit.plotting import styled_pyplot
from bvvit.report.style import (MAIN_COLOR, Figure, activation_bits, display_name, lowest_main, main_recipe,
                                main_series, num, rows_of, save_figure, signed, skipped)


# ------------------------------------------------------------------ activations and weights

def _log_y(ax: Any) -> None:
    """Log counts with decade ticks only (minor log ticks make drawing several times slower)."""
    from matplotlib.ticker import LogLocator, NullLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=8))
    ax.yaxis.set_minor_locator(NullLocator())


def _short_tensor(tensor_id: str) -> str:
    layer, _, kind = tensor_id.rpartition(":")
    role = {"linear_input": "input", "image": "input", "softmax": "", "residual": ""}.get(kind, kind)
    return f"{layer} {role}".strip()


def by_bits(names: list[str], summary: Optional[dict[str, Any]]) -> list[str]:
    """Variant names by activation bits (their rows in summary.json say), the run's own recipe
    before the others; names without a row keep their order, after those with one."""
    rows = {r["name"]: r for r in rows_of(summary or {})}
    main = main_recipe(summary) if summary else None
    known = sorted((n for n in names if n in rows),
                   key=lambda n: (int(rows[n]["a_bits"]), rows[n].get("recipe") != main, n))
    return known + [n for n in names if n not in rows]


def default_variant(summary: Optional[dict[str, Any]], available: list[str]) -> Optional[str]:
    """The variant whose grids are drawn: the lowest bit depth of the main recipe."""
    low = lowest_main(summary) if summary else None
    if low is not None and low["name"] in available:
        return low["name"]
    return (by_bits(available, summary) or [None])[0]


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
        return skipped("No activation statistics (run with --analysis basic or full).")
    tensors = activations["tensors"]
    names = sorted({v for t in tensors for v in t.get("quant", {})})
    variant = variant or default_variant(summary, names)
    from matplotlib.transforms import blended_transform_factory

    groups = [g for g in activations.get("groups", {}) if any(t["group"] == g for t in tensors)]
    columns = 2
    rows = math.ceil(len(groups) / columns)
    shown: dict[str, list[str]] = {}
    with styled_pyplot() as plt:
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
        path = save_figure(fig, out_dir, "activation_histograms.png", data)
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
        return skipped("No weight statistics (run with --analysis basic or full).")
    layers = weights["layers"]
    names = sorted({v for w in layers for v in w.get("quant", {})})
    variant = variant or default_variant(summary, names)
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    with styled_pyplot() as plt:
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
        path = save_figure(fig, out_dir, "weight_histograms.png", data)
    return path, weight_caption(weights, variant)


# ------------------------------------------------------------------ SQNR heatmap

def sqnr_caption(sqnr: dict[str, Any], summary: Optional[dict[str, Any]] = None) -> str:
    names = [n for n in sqnr.get("variants", []) if any(v is not None for v in sqnr["sqnr_db"][n])]
    if not names:
        return "No quantized tensors to compare."
    main = main_recipe(summary) if summary else None
    main_names = [r["name"] for r in main_series(summary)] if summary else names
    ordered = by_bits([n for n in names if n in main_names] or names, summary)
    low, high = ordered[0], ordered[-1]
    values = [(num(v), t) for v, t in zip(sqnr["sqnr_db"][low], sqnr["tensors"]) if v is not None]
    worst_value, worst = min(values, key=lambda p: p[0])
    text = (f"At {display_name(low)} the noisiest quantized activation is {_short_tensor(worst['id'])} "
            f"({worst_value:.1f} dB)")
    medians = {n: float(np.median([num(v) for v in sqnr["sqnr_db"][n] if v is not None and
                                   math.isfinite(num(v))] or [np.nan])) for n in (low, high)}
    bits_low, bits_high = activation_bits(summary, low), activation_bits(summary, high)
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
        return skipped("No per-tensor SQNR (run with --analysis basic or full).")
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
    with styled_pyplot() as plt:
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
        path = save_figure(fig, out_dir, "sqnr_heatmap.png", data)
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
        return skipped("No sensitivity ranking (run with --analysis full).")
    rows = sens["rows"][:top]
    bits = sorted({r["bits"] for r in sens["rows"]})
    values = np.array([max(num(r["kl_div"]), 1e-12) for r in rows])
    colors = {"weights": "#ff7f0e", "activations": "#9467bd"}
    with styled_pyplot() as plt:
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
        path = save_figure(fig, out_dir, "sensitivity.png", {"rows": rows})
    return path, sensitivity_caption(sens)


# ------------------------------------------------------------------ training

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
