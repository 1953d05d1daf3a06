"""The report stage: figures, report.html and report.md from summary.json and the analysis.

Reads dicts and files; never trains or quantizes. Entry point: :func:`write_report`.

    OUT/report.html        one self-contained page (figures embedded as data URIs)
    OUT/report.md          the same for terminals, figures as relative links
    OUT/plots/*.png        every figure (each also carries its data, see plots.read_plot_data)
    OUT/analysis.json      the analysis the figures were drawn from (when given)
    OUT/sensitivity.csv    the per-layer sensitivity ranking (analysis level full)
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Optional

from bvvit.io import atomic_write_json, atomic_write_text
from bvvit.report.html import render_html
from bvvit.report.markdown import render_markdown
from bvvit.report.plots import Figure, make_figures

SENSITIVITY_COLUMNS = ["rank", "layer", "op", "target", "bits", "kl_div", "top1_drop", "top1",
                       "agreement", "sqnr_db", "images"]


def write_sensitivity_csv(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """The ranked sensitivity rows, most damaging first, with a 1-based ``rank``."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SENSITIVITY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for rank, row in enumerate(rows, start=1):
        writer.writerow({"rank": rank, **row})
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def find_training_dir(summary: dict[str, Any]) -> Optional[Path]:
    """The folder of the model file when it holds training_curves.png (run.py's output)."""
    model_path = summary.get("model_path")
    if not model_path:
        return None
    folder = Path(model_path).parent
    return folder if (folder / "training_curves.png").is_file() else None


def write_report(out_dir: str | Path, summary: dict[str, Any], analysis: Optional[dict[str, Any]] = None,
                 training_dir: Optional[Path] = None, *, embed_images: bool = True) -> Path:
    """Draw every figure and write report.html and report.md under ``out_dir``.

    ``summary``: the summary.json dict of post_training.py; ``analysis``: what
    :func:`bvvit.evaluate.analysis.run_analysis` returned (None: figures from the summary
    only); ``training_dir``: where run.py left training_curves.png (default: the model
    file's folder when it has one). Returns the path of report.html.
    """
    out = Path(out_dir)
    if training_dir is None:
        training_dir = find_training_dir(summary)
    figures = make_figures(summary, analysis, out, training_dir)
    if analysis:
        atomic_write_json(out / "analysis.json", analysis)
        rows = (analysis.get("sensitivity") or {}).get("rows")
        if rows:
            write_sensitivity_csv(out / "sensitivity.csv", rows)
    atomic_write_text(out / "report.md", render_markdown(summary, analysis, figures, out))
    path = out / "report.html"
    atomic_write_text(path, render_html(summary, analysis, figures, out, embed=embed_images))
    return path


__all__ = ["write_report", "write_sensitivity_csv", "find_training_dir", "make_figures", "Figure",
           "SENSITIVITY_COLUMNS"]
