"""The figures of a PTQ run, drawn from the summary.json and analysis dicts alone.

Every ``plot_*`` function takes those dicts and ``out_dir`` and returns ``(path, caption)``:
a PNG under ``out_dir/plots/`` (written atomically) and ONE sentence computed from this
run's numbers. When its data is absent, no file is written, the path is None and the
caption says why. The numbers a figure shows are also stored in the PNG itself (text
chunk ``bvvit-data``, JSON), so a figure can be checked against summary.json.

This module holds :func:`make_figures`, the report's figures in reading order, and
re-exports the figures and helpers from where they live: :mod:`bvvit.report.style`
(shared helpers), :mod:`bvvit.report.accuracy_plots` (accuracy, drop, per class,
confusion), :mod:`bvvit.report.cost_plots` (size, latency, Pareto) and
:mod:`bvvit.report.analysis_plots` (histograms, SQNR, sensitivity, training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

# Re-exported: the tests import these from here.
from bvvit.report.accuracy_plots import (accuracy_caption, confusion_caption, drop_caption, per_class_caption,
                                         per_class_change, plot_accuracy, plot_confusion,
                                         plot_drop_and_agreement, plot_per_class)
from bvvit.report.analysis_plots import (activation_caption, by_bits, default_variant,
                                         plot_activation_histograms, plot_sensitivity, plot_sqnr_heatmap,
                                         plot_weight_histograms, sensitivity_caption, sqnr_caption,
                                         training_figure, weight_caption)
from bvvit.report.cost_plots import (latency_caption, pareto_caption, pareto_front, plot_latency, plot_pareto,
                                     plot_size, size_caption)
from bvvit.report.style import (FLOAT, PLOTS_DIR, SIMULATED, Figure, bits_label, display_name, fp_row,
                                lowest_main, main_recipe, main_series, noise_floor, num, read_plot_data,
                                rows_of, series, signed)


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
