"""Figures: each is a real PNG of sensible size, its data (stored in the PNG) agree with
summary.json, and its caption is computed from this run's numbers.

The summary here is synthetic with chosen numbers (so captions can be checked exactly) and
the schema of post_training.py's summary.json; the analysis is real, from a tiny model.
``make_summary``/``make_analysis`` are shared with test_html.py and test_browser.py.
"""

import json
import struct

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bvvit.evaluate.significance import mcnemar_exact_p
from bvvit.report import write_report
from bvvit.report.plots import (PLOTS_DIR, accuracy_caption, confusion_caption, latency_caption,
                                make_figures, pareto_front, per_class_caption, plot_activation_histograms,
                                plot_latency, plot_sensitivity, plot_size, read_plot_data, size_caption)

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Ankle boot"]
PER_CLASS_IMAGES = 500
COVERAGE = [{"op": "Conv2d", "tensor": "image", "granularity": "tensor", "count": 1},
            {"op": "Conv2d", "tensor": "weight", "granularity": "channel", "count": 1},
            {"op": "Linear", "tensor": "linear_input", "granularity": "tensor", "count": 9},
            {"op": "Linear", "tensor": "weight", "granularity": "channel", "count": 9},
            {"op": "Softmax", "tensor": "softmax", "granularity": "tensor", "count": 2}]
# name: (recipe, bits, kernel, correct per class, agreement, sqnr, size, b1 ms, b64 ms)
VARIANTS = {
    "fp32": ("float", 32, "float", [450, 475, 425, 450], 100.0, "inf", 400_000, 2.0, 40.0),
    "w4a4": ("mse", 4, "simulated", [440, 475, 399, 460], 95.5, 18.0, 70_000, 4.0, 80.0),
    "w4a4-minmax": ("minmax", 4, "simulated", [400, 450, 350, 400], 85.0, 12.0, 66_000, 4.1, 79.0),
    "w6a6": ("mse", 6, "simulated", [450, 475, 424, 450], 99.8, 30.0, 90_000, 4.0, 81.0),
    "w8a8": ("mse", 8, "simulated", [450, 475, 425, 450], 100.0, 42.0, 110_000, 4.2, 82.0),
    "w8a8-ort": ("mse", 8, "onnxruntime-int8", [449, 475, 424, 450], 99.7, 41.0, 110_000, 1.5, 20.0),
}


def _confusion(correct):
    """Each class's errors all go to the next class."""
    k = len(correct)
    matrix = [[0] * k for _ in range(k)]
    for i, c in enumerate(correct):
        matrix[i][i] = c
        matrix[i][(i + 1) % k] = PER_CLASS_IMAGES - c
    return matrix


def make_summary():
    n = PER_CLASS_IMAGES * len(CLASSES)
    fp_top1 = 100.0 * sum(VARIANTS["fp32"][3]) / n
    rows, variants = [], {}
    for name, (recipe, bits, kernel, correct, agreement, sqnr, size, b1, b64) in VARIANTS.items():
        top1 = 100.0 * sum(correct) / n
        is_float = recipe == "float"
        lost = sum(max(0, f - c) for f, c in zip(VARIANTS["fp32"][3], correct))
        gained = sum(max(0, c - f) for f, c in zip(VARIANTS["fp32"][3], correct))
        rows.append({"name": name, "w_bits": bits, "a_bits": bits, "recipe": recipe, "top1": top1,
                     "top5": 100.0, "top1_drop": 0.0 if is_float else fp_top1 - top1, "agreement": agreement,
                     "lost_vs_fp32": lost, "gained_vs_fp32": gained, "drop_p_value": mcnemar_exact_p(lost, gained),
                     "sqnr_db": sqnr, "kl_div": 0.0 if is_float else 0.01 / bits, "size_bytes": size,
                     "size_ratio": round(size / 400_000, 4), "latency_ms_b1": b1, "latency_ms_b64": b64,
                     "kernel": kernel, "calibration_time_s": 0.0 if is_float else 1.5})
        breakdown = ({"float_parameters": size - 2000, "header_and_metadata": 2000} if is_float else
                     {"packed_weights": size * 6 // 10, "scales": size // 20, "float_parameters": size // 5,
                      "header_and_metadata": size - size * 6 // 10 - size // 20 - size // 5})
        file = {"path": f"models/vit_{name}.safetensors", "size_bytes": size, "breakdown": breakdown}
        if not is_float:
            file["ideal_bytes"] = size * 6 // 10
        variants[name] = {
            "metrics": {"num_images": n, "num_classes": len(CLASSES), "top1": top1, "top5": 100.0, "top5_k": 4,
                        "loss": 0.3, "per_class_accuracy": [100.0 * c / PER_CLASS_IMAGES for c in correct],
                        "per_class_count": [PER_CLASS_IMAGES] * len(CLASSES), "confusion": _confusion(correct),
                        "class_names": CLASSES, "agreement": agreement, "sqnr_db": sqnr},
            "quant_config": None if is_float else {
                "recipe": recipe, "w_bits": bits, "a_bits": bits,
                "weight": {"bits": bits, "symmetric": True, "granularity": "channel", "observer": "mse"},
                "activation": {"bits": bits, "symmetric": False, "granularity": "tensor", "observer": "mse"},
                "softmax": {"bits": bits, "symmetric": False, "granularity": "tensor", "observer": "mse"},
                "linear": True, "attention_matmul": True, "softmax_output": True, "residual": False,
                "patch_embed": True, "head": True, "overrides": []},
            "coverage": None if is_float else [{**c, "bits": bits} for c in COVERAGE],
            "warnings": ["override pattern 'blocks.9.*' matched no layer"] if bits in (4, 8) and not is_float
            else [],
            "file": file,
            "latency": {"1": {"median_ms": b1, "p90_ms": b1 * 1.1}, "64": {"median_ms": b64, "p90_ms": b64 * 1.05}},
        }
    return {"bvvit_version": "0.1.0", "model_path": "/nonexistent/vit_model.pth",
            "model_config": {"img_size": 16, "patch_size": 4, "in_chans": 1, "num_classes": 4,
                             "embed_dim": 16, "depth": 2, "num_heads": 2},
            "class_names": CLASSES, "data": "synthetic", "num_eval_images": n, "seed": 0,
            "calibration": {"size": 32, "split": "train", "indices": list(range(32))},
            "recipe": "mse", "baseline": "minmax",
            "system": {"cpu_model": "Test CPU", "usable_cores": 2, "torch_threads": 1,
                       "cpu_capability": "AVX2", "isa_flags": {"avx2": True, "avx512f": False},
                       "libraries": {"torch": "2.14.1", "matplotlib": "3.11.2"}},
            "rows": rows, "variants": variants,
            "notes": {"kernel": "'simulated' = fake-quant in float"}}


def make_analysis():
    """A real full analysis of a tiny model, with the summary's variant names."""
    from bvvit.config import ModelConfig
    from bvvit.evaluate.analysis import run_analysis
    from bvvit.model import VisionTransformer
    from bvvit.quant.quantize import quantize_model
    from bvvit.quant.recipes import make_quant_config

    torch.manual_seed(0)
    model = VisionTransformer(ModelConfig(img_size=16, patch_size=4, in_chans=1, num_classes=4,
                                          embed_dim=16, depth=2, num_heads=2)).eval()
    generator = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(64, 1, 16, 16, generator=generator),
                         torch.randint(0, 4, (64,), generator=generator))
    loader = DataLoader(data, batch_size=32)
    qmodels = {}
    # w4a4 uses the ViT-aware recipe: reparameterized LayerNorms and log2 softmax get drawn too.
    for name, recipe, bits in (("w4a4", "vit", 4), ("w4a4-minmax", "minmax", 4), ("w8a8", "mse", 8)):
        qmodels[name], _ = quantize_model(model, make_quant_config(recipe, bits, bits, calib_size=32), loader)
    return run_analysis("full", model, qmodels, loader, loader, None,
                        lambda bits, overrides: make_quant_config("mse", bits, bits, overrides=overrides),
                        max_batches=2, sensitivity_bits=(4,), sensitivity_images=32)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary = make_summary()
    (out / "summary.json").write_text(json.dumps(summary))
    training = tmp_path_factory.mktemp("training")
    (training / "metrics.csv").write_text("epoch,train_loss,val_acc\n1,1.0,71.5\n2,0.8,80.25\n3,0.7,79.0\n")
    analysis = make_analysis()
    figures = make_figures(summary, analysis, out, None)
    return out, summary, analysis, {f.key: f for f in figures}


def test_every_figure_is_a_sensible_png(report):
    out, summary, _, figures = report
    expected = {"accuracy", "drop", "size", "latency", "pareto", "per_class", "confusion_w4a4",
                "confusion_w6a6", "confusion_w8a8", "activations", "weights", "sqnr", "sensitivity"}
    assert set(figures) == expected
    for key, figure in figures.items():
        assert figure.path is not None and figure.path.parent == out / PLOTS_DIR, key
        assert figure.path.stat().st_size > 10_000, key
        width, height = png_size(figure.path)
        assert 400 <= width <= 4000 and 250 <= height <= 4000, (key, width, height)
        caption = figure.caption
        assert caption.endswith(".") and caption.count(". ") == 0, (key, caption)  # one sentence
    assert not list((out / PLOTS_DIR).glob(".*.tmp"))  # atomic writes left nothing behind


def test_accuracy_figure_shows_the_summary_rows(report):
    out, _, _, figures = report
    summary = json.loads((out / "summary.json").read_text())
    data = read_plot_data(figures["accuracy"].path)
    rows = {r["name"]: r for r in summary["rows"]}
    assert data["fp32"] == {"top1": rows["fp32"]["top1"], "top5": rows["fp32"]["top5"]}
    assert [p["name"] for p in data["series"]["mse"]] == ["w4a4", "w6a6", "w8a8"]
    assert [p["name"] for p in data["series"]["minmax"]] == ["w4a4-minmax"]
    assert [p["name"] for p in data["series"]["mse · onnxruntime-int8"]] == ["w8a8-ort"]
    for points in data["series"].values():
        for point in points:
            assert point["top1"] == rows[point["name"]]["top1"] and point["top5"] == rows[point["name"]]["top5"]
    drop = read_plot_data(figures["drop"].path)
    assert {p["name"]: p["agreement"] for s in drop["series"].values() for p in s} == \
        {n: r["agreement"] for n, r in rows.items() if n != "fp32"}
    assert drop["noise_floor"] == pytest.approx(100 / 2000)


def test_accuracy_captions_use_this_runs_numbers(report):
    _, summary, _, figures = report
    expected = ("W4A4 loses 1.30 points of top-1 against FP32's 90.00%; W6A6 and above stay within "
                "0.10 of FP32, while the naive minmax baseline loses 10.00 there; of the mse variants, "
                "only W4A4 (36 images lost, 10 gained, p 0.00016) differs from FP32 beyond chance "
                "(McNemar exact p < 0.05).")
    assert accuracy_caption(summary) == figures["accuracy"].caption == expected
    better = make_summary()
    for row in better["rows"]:
        row["top1_drop"] = min(row["top1_drop"], 0.05)
    assert accuracy_caption(better).startswith("Every mse bit depth stays within 0.10 points of FP32's top-1")
    for row in better["rows"]:
        row["drop_p_value"] = max(row["drop_p_value"], 0.2)
    assert accuracy_caption(better).endswith("; no mse variant differs from FP32 beyond chance (McNemar "
                                             "exact test on the images each gets right, p >= 0.05).")
    assert figures["drop"].caption.startswith("Top-1 agreement with FP32 goes from 95.50% at W4A4 to 100.00% "
                                              "at W8A8 (mse), the largest top-1 drop is +10.00 points "
                                              "(W4A4-minmax)")


def test_size_figure_uses_the_real_file_sizes(report):
    out, summary, _, figures = report
    data = read_plot_data(figures["size"].path)
    assert [b["name"] for b in data["bars"]] == [r["name"] for r in summary["rows"]]
    for bar in data["bars"]:
        file = summary["variants"][bar["name"]]["file"]
        assert bar["size_bytes"] == file["size_bytes"] and bar["breakdown"] == file["breakdown"]
        assert sum(bar["breakdown"].values()) == bar["size_bytes"]
        assert bar["ideal_bytes"] == file.get("ideal_bytes")
    assert size_caption(summary) == ("The W4A4 file is 68.4 KiB, 17.5% of FP32's 390.6 KiB: packed weights "
                                     "take 41.0 KiB (ideal 41.0 KiB) and the header and metadata 10.3 KiB.")


def test_latency_keeps_real_kernels_apart_from_simulated(report, tmp_path):
    _, summary, _, figures = report
    data = read_plot_data(figures["latency"].path)
    assert {b["name"]: b["kernel"] for b in data["bars"]} == {r["name"]: r["kernel"] for r in summary["rows"]}
    assert {b["name"]: b["latency_ms_b64"] for b in data["bars"]} == \
        {r["name"]: r["latency_ms_b64"] for r in summary["rows"]}
    assert latency_caption(summary) == ("At batch 64 the fastest real kernel is W8A8-ort (onnxruntime-int8, "
                                        "20.00 ms), 2.00x the speed of FP32's 40.00 ms; hatched rows are "
                                        "simulated and not integer speed.")
    simulated_only = make_summary()
    simulated_only["rows"] = [r for r in simulated_only["rows"] if r["name"] != "w8a8-ort"]
    path, caption = plot_latency(simulated_only, tmp_path)
    assert path.is_file()
    assert caption == ("Every quantized row is simulated fake-quant, a median 2.01x FP32's 40.00 ms at batch "
                       "64, so these bars show the cost of simulation, not integer-kernel speed.")


def test_pareto_front():
    assert pareto_front([(400, 90.0, "fp32"), (70, 88.7, "w4a4"), (66, 80.0, "w4a4-minmax"),
                         (110, 90.0, "w8a8"), (90, 89.95, "w6a6")]) == ["w4a4-minmax", "w4a4", "w6a6", "w8a8"]


def test_per_class_and_confusion_figures_match_summary(report):
    _, summary, _, figures = report
    data = read_plot_data(figures["per_class"].path)
    assert data["classes"] == CLASSES
    fp = summary["variants"]["fp32"]["metrics"]["per_class_accuracy"]
    for name, change in zip(data["variants"], data["change"]):
        own = summary["variants"][name]["metrics"]["per_class_accuracy"]
        assert change == pytest.approx([a - b for a, b in zip(own, fp)])
    assert per_class_caption(summary) == figures["per_class"].caption == (
        "The largest per-class loss is Pullover at W4A4-minmax (-15.00 points on 500 images), and at W8A8 "
        "no class moves by more than 0.00 points.")
    confusion = read_plot_data(figures["confusion_w4a4"].path)
    assert confusion["w4a4"] == summary["variants"]["w4a4"]["metrics"]["confusion"]
    assert confusion["fp32"] == summary["variants"]["fp32"]["metrics"]["confusion"]
    assert confusion["difference"][2][3] == 26
    assert confusion_caption(summary, "w4a4") == (
        "At W4A4, 90 of 2000 images get a different top-1 class than FP32 (agreement 95.50%), the largest "
        "shift being +26 images of Pullover predicted as Ankle boot.")


def test_analysis_figures_match_the_analysis(report):
    _, _, analysis, figures = report
    acts = read_plot_data(figures["activations"].path)
    assert acts["variant"] == "w4a4"  # the lowest bit depth of the run's recipe
    tensors = {t["id"]: t for t in analysis["activations"]["tensors"]}
    for group, ids in acts["shown"].items():
        assert ids and all(tensors[i]["group"] == group for i in ids)
    worst = max((t for t in tensors.values() if "w4a4" in t["quant"]),
                key=lambda t: t["quant"]["w4a4"]["clipped_fraction"])
    assert f"{100 * worst['quant']['w4a4']['clipped_fraction']:.3f}%" in figures["activations"].caption
    sqnr = read_plot_data(figures["sqnr"].path)
    assert sqnr["variants"] == ["w4a4", "w4a4-minmax", "w8a8"]
    assert sqnr["tensors"][0] == "patch_embed.proj input" and sqnr["tensors"][-1] == "head input"
    assert sqnr["weight_layers"] == analysis["sqnr"]["weights"]["layers"]
    sens = read_plot_data(figures["sensitivity"].path)
    assert sens["rows"] == analysis["sensitivity"]["rows"][:20]
    top = analysis["sensitivity"]["rows"][0]
    assert figures["sensitivity"].caption.startswith(f"Quantizing {top['layer']}'s {top['target']} alone to 4 bits")
    assert ", ".join(analysis["sensitivity"]["suggested_overrides"]) in figures["sensitivity"].caption


def test_missing_data_skips_the_figure_and_says_why(tmp_path):
    path, caption = plot_sensitivity(None, tmp_path)
    assert path is None and "--analysis full" in caption
    path, caption = plot_activation_histograms({"activations": {"tensors": []}}, tmp_path)
    assert path is None and "--analysis basic" in caption
    bare = make_summary()
    for variant in bare["variants"].values():
        variant["file"] = None
    path, caption = plot_size(bare, tmp_path)
    assert path is None and "no file sizes" in caption
    assert not (tmp_path / PLOTS_DIR).exists() or not list((tmp_path / PLOTS_DIR).iterdir())


def test_write_report_writes_csv_and_links_training_curves(report, tmp_path):
    out, summary, analysis, _ = report
    training = tmp_path / "training"
    training.mkdir()
    (training / "metrics.csv").write_text("epoch,train_loss,val_acc\n1,1.0,71.5\n2,0.8,80.25\n3,0.7,79.0\n")
    import shutil

    shutil.copy(out / PLOTS_DIR / "pareto.png", training / "training_curves.png")
    small = make_summary()  # two rows: fewer figures to draw
    small["rows"] = [r for r in small["rows"] if r["name"] in ("fp32", "w4a4")]
    sens_only = {"sensitivity": analysis["sensitivity"], "level": "full"}
    html_path = write_report(tmp_path / "out", small, sens_only, training)
    csv_lines = (tmp_path / "out" / "sensitivity.csv").read_text().splitlines()
    assert csv_lines[0] == "rank,layer,op,target,bits,kl_div,top1_drop,top1,agreement,sqnr_db,images"
    assert len(csv_lines) == 1 + len(analysis["sensitivity"]["rows"])
    first = analysis["sensitivity"]["rows"][0]
    assert csv_lines[1].startswith(f"1,{first['layer']},{first['op']},{first['target']},4,")
    page = html_path.read_text()
    assert "Training reached its best validation top-1 of 80.25% at epoch 2 of 3." in page
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "](../training/training_curves.png)" in markdown


def test_sqnr_caption_reads_the_bits_from_the_rows_not_the_names():
    """Variant names are labels: the bit depths come from the rows of summary.json."""
    from bvvit.report.analysis_plots import sqnr_caption

    sqnr = {"variants": ["fine", "coarse"], "tensors": [{"id": "a:linear_input"}, {"id": "b:linear_input"}],
            "sqnr_db": {"fine": [40.0, 44.0], "coarse": [20.0, 24.0]}}
    summary = {"recipe": "mse", "rows": [
        {"name": "fp32", "w_bits": 32, "a_bits": 32, "recipe": "float", "kernel": "float"},
        {"name": "coarse", "w_bits": 4, "a_bits": 4, "recipe": "mse", "kernel": "simulated"},
        {"name": "fine", "w_bits": 8, "a_bits": 8, "recipe": "mse", "kernel": "simulated"}]}
    caption = sqnr_caption(sqnr, summary)
    assert caption.startswith("At coarse the noisiest quantized activation is a input (20.0 dB)")
    assert "rises 5.0 dB per bit from 22.0 dB to 42.0 dB at fine" in caption


def test_latency_at_the_batch_sizes_the_run_timed(tmp_path):
    """--latency-batches 1 8 (the 224-px make target): the rows carry latency_ms_b8, and the
    figure, captions, headline table, CSV and console table show batch 8, not an empty b64."""
    from bvvit.ptq.summary import format_table, summary_columns, write_summary
    from bvvit.report.html import headline_columns, headline_rows

    summary = make_summary()
    summary["latency_batches"] = [1, 8]
    for row in summary["rows"]:
        row["latency_ms_b8"] = row.pop("latency_ms_b64") / 8
    path, caption = plot_latency(summary, tmp_path)
    data = read_plot_data(path)
    assert data["batches"] == [1, 8]
    assert {b["name"]: b["latency_ms_b8"] for b in data["bars"]} == {r["name"]: r["latency_ms_b8"] for r in summary["rows"]}
    assert caption.startswith("At batch 8 the fastest real kernel is W8A8-ort (onnxruntime-int8, 2.50 ms)")
    columns = headline_columns(summary)
    assert "Latency b8 (ms)" in columns and "Latency b64 (ms)" not in columns
    assert all(len(cells) == len(columns) for cells in headline_rows(summary))
    assert summary_columns([8, 1])[summary_columns().index("latency_ms_b1"):][:2] == ["latency_ms_b1", "latency_ms_b8"]
    write_summary(tmp_path, summary)
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert "latency_ms_b8" in header and "latency_ms_b64" not in header
    table = format_table(summary["rows"], (1, 8))
    assert "b8 ms" in table.splitlines()[0] and "b64 ms" not in table
    fp = next(r for r in summary["rows"] if r["name"] == "fp32")
    assert f"{fp['latency_ms_b8']:>8.2f}" in next(line for line in table.splitlines() if line.startswith("fp32"))
