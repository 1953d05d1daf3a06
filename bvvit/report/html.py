"""report.html: one self-contained page (inline CSS, figures as data URIs) that opens from
disk with no network. The table builders here are shared with :mod:`bvvit.report.markdown`.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any, Optional

from bvvit.report.style import (FLOAT, SIMULATED, Figure, display_name, fp_row, latency_batches, latency_column,
                                main_recipe, main_series, num, rows_of, signed)

HEADLINE_COLUMNS = ["Variant", "W / A bits", "Recipe", "Top-1 %", "Top-5 %", "Top-1 drop (pts)",
                    "Agreement %", "Lost / gained vs FP32 (p)", "SQNR dB", "File size", "Size ratio",
                    "Latency b1 (ms)", "Latency b64 (ms)", "Kernel"]  # with the default --latency-batches


def headline_columns(summary: dict[str, Any]) -> list[str]:
    """The headline table's header: one latency column per batch size the run timed."""
    return HEADLINE_COLUMNS[:11] + [f"Latency b{b} (ms)" for b in latency_batches(summary)] + ["Kernel"]


# ------------------------------------------------------------------ shared table builders

def _fmt(value: Any, digits: int = 2) -> str:
    number = num(value)
    if number is None:
        return "—"
    if number in (float("inf"), float("-inf")):
        return "∞" if number > 0 else "-∞"
    return f"{number:.{digits}f}"


def _size(value: Any) -> str:
    number = num(value)
    if number is None:
        return "—"
    return f"{number / 1024:.1f} KiB" if number < 1 << 20 else f"{number / (1 << 20):.2f} MiB"


def _flips(row: dict[str, Any]) -> str:
    """"12 / 9 (p 0.66)": images only FP32 / only this variant gets right, and the McNemar
    exact p-value of that split (small p: the accuracy change is not chance)."""
    lost, gained, p = num(row.get("lost_vs_fp32")), num(row.get("gained_vs_fp32")), num(row.get("drop_p_value"))
    if lost is None or gained is None:
        return "—"
    text = f"{int(lost)} / {int(gained)}"
    return text if p is None else f"{text} (p {p:.2g})" if p < 0.01 else f"{text} (p {p:.2f})"


def headline_rows(summary: dict[str, Any]) -> list[list[str]]:
    """One row of display strings per summary row (see :func:`headline_columns`)."""
    out = []
    columns = [latency_column(b) for b in latency_batches(summary)]
    for r in rows_of(summary):
        is_float = r.get("recipe") == FLOAT
        out.append([display_name(r["name"]), "32 / 32" if is_float else f"{r['w_bits']} / {r['a_bits']}",
                    r.get("recipe", ""), _fmt(r.get("top1")), _fmt(r.get("top5")),
                    "—" if is_float else signed(num(r.get("top1_drop")) or 0.0),
                    _fmt(r.get("agreement")), "—" if is_float else _flips(r), _fmt(r.get("sqnr_db"), 1),
                    _size(r.get("size_bytes")),
                    _fmt(r.get("size_ratio"), 3), *(_fmt(r.get(c)) for c in columns),
                    r.get("kernel") or ""])
    return out


def coverage_groups(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Coverage tables (op x tensor x bits x granularity x count), one per distinct layout.

    Variants whose coverage differs only in their own bit-widths share one table; its bits
    column lists each variant's value (``4, 8``). Returns ``[{"title", "variants", "rows":
    [[op, tensor, bits, granularity, count], ...]}]``.
    """
    variants = summary.get("variants") or {}
    groups: dict[tuple, dict[str, Any]] = {}
    for row in rows_of(summary):
        coverage = (variants.get(row["name"]) or {}).get("coverage")
        if row.get("recipe") == FLOAT or not coverage:
            continue
        layout = tuple((c["op"], c["tensor"], c["granularity"], c["count"], _bits_role(c, row)) for c in coverage)
        group = groups.setdefault((row.get("recipe"), layout), {"recipe": row.get("recipe"), "rows": [],
                                                                "layout": layout})
        group["rows"].append(row)
    out = []
    for group in groups.values():
        table = []
        for op, tensor, granularity, count, role in group["layout"]:
            if role in ("W", "A"):
                key = "w_bits" if role == "W" else "a_bits"
                bits = ", ".join(str(b) for b in sorted({r[key] for r in group["rows"]}))
            else:
                bits = role
            table.append([op, tensor, bits, granularity, str(count)])
        names = [display_name(r["name"]) for r in group["rows"]]
        out.append({"title": f"{group['recipe']}: {', '.join(names)}", "variants": names, "rows": table})
    return out


def _bits_role(entry: dict[str, Any], row: dict[str, Any]) -> str:
    """"W"/"A" when the entry has the variant's own width (so layouts can be shared)."""
    own = row["w_bits"] if entry["tensor"] == "weight" else row["a_bits"]
    return ("W" if entry["tensor"] == "weight" else "A") if entry["bits"] == own else str(entry["bits"])


def collect_warnings(summary: dict[str, Any]) -> list[str]:
    """Each distinct warning once, with the variants that raised it."""
    seen: dict[str, list[str]] = {}
    for name, variant in (summary.get("variants") or {}).items():
        for warning in variant.get("warnings") or []:
            seen.setdefault(str(warning), []).append(display_name(name))
    return [f"{text} ({', '.join(names)})" for text, names in seen.items()]


def preprocessing_text(pre: Optional[dict[str, Any]]) -> str:
    """The evaluation transform in words (the one written into the packed files and ONNX)."""
    if not pre:
        return "—"
    size, crop = pre.get("img_size"), pre.get("crop_pct", 1.0)
    resize = int(size / crop + 1e-6) if size and crop else size  # as the transform floors it
    how = (f"resize both sides to {resize}" if pre.get("crop_mode") == "squash"
           else f"resize the shorter side to {resize}")
    return (f"{how} ({pre.get('interpolation')}), centre crop {size}, mean {pre.get('mean')}, "
            f"std {pre.get('std')}")


def calibration_text(calibration: dict[str, Any]) -> str:
    """``1024 from the train split; Frechet distance to the evaluation images 3.1 (a training
    subset: 3.1)``: which images calibrated the run and how far they are from the evaluated ones."""
    size, split = calibration.get("size", "—"), calibration.get("split", "?")
    text = f"{size} from the {split} split" if calibration.get("source", "train") == "train" else f"{size} from {split}"
    if calibration.get("frechet_to_eval") is None:
        return text
    return text + (f"; Frechet distance to the evaluation images {calibration['frechet_to_eval']:.1f} "
            f"(a training subset: {calibration.get('frechet_train_to_eval', float('nan')):.1f})")


def settings_items(summary: dict[str, Any], analysis: Optional[dict[str, Any]]) -> list[tuple[str, str]]:
    """(label, value) pairs describing how this run was made."""
    config = summary.get("model_config") or {}
    calibration = summary.get("calibration") or {}
    fmt = summary.get("model_format")
    items = [("Model file", str(summary.get("model_path", "—"))
              + (f" ({fmt} checkpoint)" if fmt and fmt != "bvvit" else "")),
             ("Architecture", f"ViT depth {config.get('depth')} x width {config.get('embed_dim')}, "
                              f"{config.get('num_heads')} heads, patch {config.get('patch_size')}, image "
                              f"{config.get('img_size')}x{config.get('img_size')}x{config.get('in_chans')}, "
                              f"{config.get('num_classes')} classes" if config else "—"),
             ("Preprocessing", preprocessing_text(summary.get("preprocessing"))),
             ("Data", str(summary.get("data", "—"))),
             ("Evaluation images", str(summary.get("num_eval_images", "—"))),
             ("Calibration images", calibration_text(calibration)),
             ("Recipe / baseline", f"{summary.get('recipe', '—')} / {summary.get('baseline') or 'none'}"),
             ("Seed", str(summary.get("seed", "—"))),
             ("BV-ViT version", str(summary.get("bvvit_version", "—")))]
    low = (main_series(summary) or [None])[0]
    quant = ((summary.get("variants") or {}).get(low["name"], {}) if low else {}).get("quant_config")
    if quant:
        for key in ("weight", "activation", "softmax"):
            spec = quant.get(key) or {}
            items.append((f"{key.capitalize()} quantizer",
                          f"{'symmetric' if spec.get('symmetric') else 'asymmetric'}, per-"
                          f"{spec.get('granularity')}, {spec.get('observer')} observer, {spec.get('method', 'uniform')}"))
        switches = [k for k in ("linear", "attention_matmul", "softmax_output", "softmax_renorm", "residual",
                                "patch_embed", "head") if k in quant]
        items.append(("Quantized ops", ", ".join(f"{k}={'on' if quant[k] else 'off'}" for k in switches)))
        overrides = quant.get("overrides") or []
        items.append(("Overrides", ", ".join(f"{o['pattern']}={'float' if o.get('keep_float') else o.get('bits')}"
                                             for o in overrides) or "none"))
    if analysis:
        settings = analysis.get("settings") or {}
        timing = ", ".join(f"{k} {num(v):.1f}s" for k, v in (analysis.get("timing_s") or {}).items())
        items.append(("Analysis", f"level {analysis.get('level')}; "
                                  + ", ".join(f"{k}={v}" for k, v in settings.items())
                                  + (f"; took {timing}" if timing else "")))
    system = summary.get("system") or {}
    if system:
        flags = [k for k, v in (system.get("isa_flags") or {}).items() if v]
        items.append(("Machine", f"{system.get('cpu_model', '?')}; {system.get('usable_cores', '?')} usable cores, "
                                 f"{system.get('torch_threads', '?')} torch threads; "
                                 f"{system.get('cpu_capability', '?')}; ISA: {', '.join(flags) or 'unknown'}"
                                 + (f"; GPU {system['cuda_device_name']}" if system.get("cuda_device_name") else "")))
    return items


def library_items(summary: dict[str, Any]) -> list[tuple[str, str]]:
    libraries = (summary.get("system") or {}).get("libraries") or {}
    return [(name, str(version)) for name, version in libraries.items()]


def at_a_glance(summary: dict[str, Any], figures: list[Figure]) -> list[str]:
    """The captions a reader wants first: accuracy, size, latency, sensitivity."""
    wanted = ("accuracy", "size", "latency", "sensitivity")
    by_key = {f.key: f for f in figures}
    return [by_key[k].caption for k in wanted if k in by_key and by_key[k].path is not None]


def sensitivity_snippet(analysis: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    sens = (analysis or {}).get("sensitivity")
    if not sens:
        return None
    return {"overrides": sens.get("suggested_overrides") or [], "cli": sens.get("cli") or "",
            "bits": sens.get("bits"), "images": sens.get("images")}


def kernel_notes(summary: dict[str, Any]) -> list[str]:
    return [f"{key}: {text}" for key, text in (summary.get("notes") or {}).items()]


# ------------------------------------------------------------------ HTML

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dfe3ea; --bg: #f6f7f9; --accent: #1f77b4; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 28px 24px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 36px 0 12px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 8px; }
.sub { color: var(--muted); margin: 0 0 18px; }
nav { margin: 12px 0 8px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; margin-right: 14px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px 20px; }
ul.glance { margin: 0; padding-left: 20px; } ul.glance li { margin: 4px 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; background: #fff; }
th, td { padding: 6px 8px; border-bottom: 1px solid var(--line); text-align: right; white-space: nowrap; }
th { background: #eef1f5; font-weight: 600; white-space: normal; vertical-align: bottom; }
td:first-child, th:first-child, td.text, th.text { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
table.compact { width: auto; min-width: 420px; }
tr.float td { font-weight: 600; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; }
.badge.float { background: #dbe9f6; color: #174a7c; }
.badge.simulated { background: #eceff3; color: #4a5261; border: 1px dashed #9aa3b2; }
.badge.real { background: #dcf2dc; color: #1e5e1e; }
figure { margin: 0 0 22px; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px; }
figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { margin-top: 10px; color: var(--fg); font-size: 14px; }
figcaption b { margin-right: 4px; }
pre { background: #1f2430; color: #e6e9ef; padding: 12px 14px; border-radius: 6px; overflow-x: auto;
  font: 13px/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
dl.settings { display: grid; grid-template-columns: max-content 1fr; gap: 4px 18px; margin: 0; }
dl.settings dt { color: var(--muted); } dl.settings dd { margin: 0; word-break: break-word; }
.warn { border-left: 4px solid #e0a800; background: #fff8e1; padding: 8px 12px; margin: 6px 0; border-radius: 4px; }
.muted { color: var(--muted); }
details { margin: 8px 0; } summary { cursor: pointer; font-weight: 600; }
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _image_src(path: Path, out_dir: Path, embed: bool) -> str:
    if embed:
        return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return Path(os.path.relpath(path, out_dir)).as_posix()


def _kernel_badge(kernel: str) -> str:
    kind = "float" if kernel == FLOAT else "simulated" if kernel == SIMULATED else "real"
    return f'<span class="badge {kind}">{_e(kernel)}</span>'


def _table(columns: list[str], rows: list[list[str]], text_columns: int = 1, compact: bool = True) -> str:
    head = "".join(f'<th class="{"text" if i < text_columns else ""}">{_e(c)}</th>' for i, c in enumerate(columns))
    body = "".join("<tr>" + "".join(f'<td class="{"text" if i < text_columns else ""}">{_e(v)}</td>'
                                    for i, v in enumerate(row)) + "</tr>" for row in rows)
    kind = ' class="compact"' if compact else ""
    return f'<div class="scroll"><table{kind}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _headline_table(summary: dict[str, Any]) -> str:
    columns = headline_columns(summary)
    head = "".join(f'<th class="{"text" if c in ("Variant", "Recipe", "Kernel") else ""}">{_e(c)}</th>'
                   for c in columns)
    body = []
    fp = fp_row(summary)
    for row, cells in zip(rows_of(summary), headline_rows(summary)):
        tds = [f'<td class="{"text" if c in ("Variant", "Recipe") else ""}">{_e(v)}</td>'
               for c, v in zip(columns[:-1], cells[:-1])]
        tds.append(f'<td class="text">{_kernel_badge(cells[-1])}</td>')
        body.append(f'<tr class="{"float" if row is fp else ""}">{"".join(tds)}</tr>')
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def render_html(summary: dict[str, Any], analysis: Optional[dict[str, Any]], figures: list[Figure],
                out_dir: Path, embed: bool = True) -> str:
    """The whole page. ``embed``: figures as base64 data URIs (the page stands alone);
    otherwise relative links to the PNG files."""
    out_dir = Path(out_dir)
    config = summary.get("model_config") or {}
    recipe = main_recipe(summary) or "—"
    title = "BV-ViT quantization report"
    subtitle = (f"{_e(summary.get('model_path', ''))} · ViT {config.get('depth', '?')}×{config.get('embed_dim', '?')} · "
                f"{_e(summary.get('data', ''))} · {summary.get('num_eval_images', '?')} evaluation images · "
                f"recipe {_e(recipe)}")
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
             f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{_e(title)}</h1><p class='sub'>{subtitle}</p>",
             "<nav><a href='#results'>Results</a><a href='#figures'>Figures</a><a href='#overrides'>Overrides</a>"
             "<a href='#coverage'>Coverage</a><a href='#warnings'>Warnings</a><a href='#settings'>Settings</a></nav>"]
    glance = at_a_glance(summary, figures)
    if glance:
        parts.append("<div class='card'><ul class='glance'>" + "".join(f"<li>{_e(g)}</li>" for g in glance)
                     + "</ul></div>")
    parts.append("<h2 id='results'>Results</h2>" + _headline_table(summary))
    notes = kernel_notes(summary)
    if notes:
        parts.append("<p class='muted'>" + "<br>".join(_e(n) for n in notes) + "</p>")

    parts.append("<h2 id='figures'>Figures</h2>")
    skipped = []
    for figure in figures:
        if figure.path is None or not Path(figure.path).is_file():
            skipped.append(figure)
            continue
        src = _image_src(figure.path, out_dir, embed)
        parts.append(f"<figure id='fig-{_e(figure.key)}'><img src='{src}' alt='{_e(figure.title)}'>"
                     f"<figcaption><b>{_e(figure.title)}.</b>{_e(figure.caption)}</figcaption></figure>")
    if skipped:
        parts.append("<h3>Not drawn</h3><ul>" + "".join(f"<li><b>{_e(f.title)}:</b> {_e(f.caption)}</li>"
                                                          for f in skipped) + "</ul>")

    parts.append("<h2 id='overrides'>Suggested overrides</h2>")
    snippet = sensitivity_snippet(analysis)
    if snippet and snippet["overrides"]:
        parts.append(f"<p>The layers that hurt most when quantized alone (bits {_e(snippet['bits'])}, "
                     f"{_e(snippet['images'])} images), to add to the post_training.py command line:</p>"
                     f"<pre>{_e(snippet['cli'])}</pre><p class='muted'>As a list: "
                     f"{_e(', '.join(snippet['overrides']))}</p>")
    elif snippet:
        parts.append("<p>No layer did measurable damage on its own; no override suggested.</p>")
    else:
        parts.append("<p class='muted'>Run with <code>--analysis full</code> for a per-layer sensitivity "
                     "ranking and suggested overrides.</p>")

    parts.append("<h2 id='coverage'>Quantization coverage</h2>")
    groups = coverage_groups(summary)
    for group in groups:
        parts.append(f"<h3>{_e(group['title'])}</h3>"
                     + _table(["Op", "Tensor", "Bits", "Granularity", "Count"], group["rows"], 4))
    if not groups:
        parts.append("<p class='muted'>No quantized variants.</p>")

    parts.append("<h2 id='warnings'>Warnings</h2>")
    warnings = collect_warnings(summary)
    parts.append("".join(f"<div class='warn'>{_e(w)}</div>" for w in warnings) or "<p class='muted'>None.</p>")

    parts.append("<h2 id='settings'>Settings and versions</h2><div class='card'><dl class='settings'>"
                 + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in settings_items(summary, analysis))
                 + "</dl></div>")
    libraries = library_items(summary)
    if libraries:
        parts.append("<h3>Libraries</h3>" + _table(["Library", "Version"], libraries, 2))
    parts.append("</main></body></html>\n")
    return "\n".join(parts)


__all__ = ["render_html", "headline_rows", "coverage_groups", "collect_warnings", "settings_items",
           "library_items", "at_a_glance", "sensitivity_snippet", "kernel_notes", "HEADLINE_COLUMNS", "headline_columns"]
