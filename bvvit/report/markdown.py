"""report.md: the report for terminals and code review, figures as relative links."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from bvvit.report.html import (at_a_glance, collect_warnings, coverage_groups, headline_columns,
                               headline_rows, kernel_notes, library_items, sensitivity_snippet,
                               settings_items)
from bvvit.report.style import Figure, main_recipe


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(columns: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |",
             "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(summary: dict[str, Any], analysis: Optional[dict[str, Any]], figures: list[Figure],
                    out_dir: Path) -> str:
    """The same content as report.html; images are links relative to ``out_dir``."""
    out_dir = Path(out_dir)
    config = summary.get("model_config") or {}
    lines = ["# BV-ViT quantization report", "",
             f"{summary.get('model_path', '')} · ViT {config.get('depth', '?')}x{config.get('embed_dim', '?')} · "
             f"{summary.get('data', '')} · {summary.get('num_eval_images', '?')} evaluation images · "
             f"recipe {main_recipe(summary) or '-'}", ""]
    lines += [f"- {text}" for text in at_a_glance(summary, figures)]
    lines += ["", "## Results", "", _table(headline_columns(summary), headline_rows(summary)), ""]
    lines += [f"_{note}_  " for note in kernel_notes(summary)]

    lines += ["", "## Figures", ""]
    skipped = []
    for figure in figures:
        if figure.path is None or not Path(figure.path).is_file():
            skipped.append(figure)
            continue
        link = Path(os.path.relpath(figure.path, out_dir)).as_posix()
        lines += [f"### {figure.title}", "", f"![{figure.title}]({link})", "", figure.caption, ""]
    if skipped:
        lines += ["Not drawn:", ""] + [f"- **{f.title}:** {f.caption}" for f in skipped] + [""]

    lines += ["## Suggested overrides", ""]
    snippet = sensitivity_snippet(analysis)
    if snippet and snippet["overrides"]:
        lines += [f"The layers that hurt most when quantized alone (bits {snippet['bits']}, "
                  f"{snippet['images']} images), to add to the post_training.py command line:", "",
                  "```", snippet["cli"], "```", ""]
    elif snippet:
        lines += ["No layer did measurable damage on its own; no override suggested.", ""]
    else:
        lines += ["Run with `--analysis full` for a per-layer sensitivity ranking and suggested overrides.", ""]

    lines += ["## Quantization coverage", ""]
    for group in coverage_groups(summary):
        lines += [f"**{group['title']}**", "",
                  _table(["Op", "Tensor", "Bits", "Granularity", "Count"], group["rows"]), ""]

    lines += ["## Warnings", ""]
    lines += [f"- {w}" for w in collect_warnings(summary)] or ["None."]
    lines += ["", "## Settings and versions", ""]
    lines += [f"- **{k}:** {v}" for k, v in settings_items(summary, analysis)]
    libraries = library_items(summary)
    if libraries:
        lines += ["", _table(["Library", "Version"], [list(item) for item in libraries])]
    return "\n".join(lines) + "\n"


__all__ = ["render_markdown"]
