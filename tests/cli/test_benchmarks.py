"""The benchmark scripts run end to end on a tiny model and report every competitor."""

import importlib.util
import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_peers_benchmark_compares_every_method_on_the_same_images(trained, tmp_path):
    data, out = trained
    report_path = tmp_path / "peers.json"
    result = run_cli("benchmarks/ptq_peers.py", "--model-path", str(out / "vit_model.pth"),
                     "--calib-size", "16", "--eval-subset", "20", "--pairs", "8/8,4/8,4/4",
                     "--json", str(report_path), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["num_images"] == 20 and report["calib_size"] == 16
    rows = {(r["w_bits"], r["a_bits"], r["method"], r["kind"]) for r in report["rows"]}
    for pair in ((8, 8), (4, 8), (4, 4)):
        assert (*pair, "OURS --recipe vit", "simulated") in rows
        assert (*pair, "OURS --recipe minmax", "simulated") in rows
    assert (8, 8, "OURS --recipe vit, exported", "ORT int8 kernels") in rows
    if importlib.util.find_spec("openvino"):
        assert (8, 8, "OURS --recipe vit, OpenVINO IR", "OpenVINO int8 kernels") in rows
        assert (8, 8, "OURS --recipe vit, attention float", "simulated (the IR's twin)") in rows
        assert any(r[:2] == (32, 32) and r[3].startswith("OpenVINO") for r in rows)
        if importlib.util.find_spec("nncf"):
            assert (8, 8, "NNCF int8 (ModelType.TRANSFORMER)", "OpenVINO int8 kernels") in rows, report["skipped"]
    for pair in ((8, 8), (4, 8)):  # ORT's static quantizer: int8 / int4 weights, uint8 activations
        for method in ("MinMax", "Percentile", "Entropy"):
            assert (*pair, f"ORT quantize_static {method}", "ORT QDQ") in rows, report["skipped"]
    assert not any(r[:2] == (4, 4) and not r[2].startswith("OURS") for r in rows)  # no A4 peers
    # every peer either ran or says why not; the numbers are real evaluations
    named = {r[2] for r in rows} | set(report["skipped"])
    assert any("PT2E" in name for name in named) and any("torchao" in name for name in named)
    for row in report["rows"]:
        assert 0.0 <= row["top1"] <= 100.0 and 0.0 <= row["agreement"] <= 100.0
    assert "W8A8: ours" in result.stdout and "McNemar exact p" in result.stdout
    for row in report["rows"]:  # lost / gained against FP32 agree with the top-1 difference
        net = (row["top1"] - report["fp32_top1"]) * report["num_images"] / 100
        assert row["gained_vs_fp32"] - row["lost_vs_fp32"] == round(net) and 0 < row["drop_p_value"] <= 1
    assert {(c["w_bits"], c["a_bits"]) for c in report["comparisons"]} == {(8, 8), (4, 8)}
    for c in report["comparisons"]:
        assert 0 < c["mcnemar_p"] <= 1 and c["diff_points"] == pytest.approx((c["only_ours"] - c["only_peer"]) * 5)


def test_speed_benchmark_times_every_runtime_interleaved(trained, tmp_path):
    data, out = trained
    report_path = tmp_path / "speed.json"
    result = run_cli("benchmarks/ptq_speed.py", "--model-path", str(out / "vit_model.pth"),
                     "--calib-size", "16", "--eval-subset", "20", "--runs", "10", "--warmup", "1",
                     "--threads", "1", "--skip-compile", "--json", str(report_path), timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    variants = [r["variant"] for r in report["rows"]]
    assert variants[:2] == ["PyTorch FP32 eager", "ORT FP32"]
    ours = [v for v in variants if v.startswith("OURS")]
    assert any("fused attention" in v for v in ours)
    if importlib.util.find_spec("openvino"):  # OpenVINO's own peers and our IR beside ORT
        assert len(ours) == 4 and any(v.endswith("OpenVINO IR") for v in ours)
        assert any(v.startswith("OpenVINO FP32") for v in variants)
        assert "OpenVINO running our vit_w8a8.onnx" in variants
        assert report["openvino_exec_graphs"][next(v for v in ours if "OpenVINO" in v)]["integer_matmuls"] > 0
        assert report["sim_w8a8_float_attention_top1"] is not None
        if importlib.util.find_spec("nncf"):
            assert {"NNCF int8 (ModelType.TRANSFORMER) OpenVINO", "NNCF int8 (default) OpenVINO"} <= set(variants)
    else:
        assert len(ours) == 3
    assert "ORT quantize_dynamic" in variants and "torch.ao quantize_dynamic" in variants
    assert sum(v.startswith("ORT quantize_static") for v in variants) == 4
    for row in report["rows"]:
        assert row["b1_p90_ms"] >= row["b1_median_ms"] > 0 and row["b64_median_ms"] > 0
    assert set(report["verdict"]) == set(ours)
    assert set(report["best_of_ours"]) == {"b1", "b64"} and report["best_of_ours"]["b1"]["ours"] in ours
    assert report["skipped"].get("PT2E X86InductorQuantizer") == "--skip-compile"
    # accuracy at each timed batch size; dynamic peers re-evaluated at b1 and over batch orders
    rows = {r["variant"]: r for r in report["rows"]}
    dynamic = rows["ORT quantize_dynamic"]
    assert dynamic["batch_dependent"] and dynamic["top1_b1_measured"] and dynamic["batch_orders"] == 10
    assert dynamic["batch_effect"] > 0
    assert dynamic["top1_b64_min"] <= dynamic["top1_b64_mean"] <= dynamic["top1_b64_max"]
    for name in ours:  # static: same logits whatever the batch, and b1 measured, not assumed
        assert not rows[name]["batch_dependent"] and rows[name]["batch_effect"] < 1e-3
        assert rows[name]["top1_b1_measured"] and rows[name]["top1_b1"] == rows[name]["top1"]
        assert rows[name]["vs_fp32_lost"] + rows[name]["vs_fp32_gained"] <= 20
        for b in ("b1", "b64"):
            assert isinstance(report["verdict"][name][b]["accuracy"]["met"], bool)
        assert 0.0 <= report["verdict"][name]["image_order_b64"]["mcnemar_p"] <= 1.0
    assert "McNemar exact p" in result.stdout


def test_speed_benchmark_on_a_timm_shape(tmp_path):
    """--timm-model: timm's constructor (random weights), speed only, at the --batch given."""
    pytest.importorskip("timm")
    report_path = tmp_path / "speed.json"
    result = run_cli("benchmarks/ptq_speed.py", "--timm-model", "vit_tiny_patch16_224", "--img-size", "32",
                     "--calib-size", "4", "--batch", "4", "--runs", "10", "--warmup", "1", "--threads", "1",
                     "--skip-compile", "--skip", "ort-static,torch-dynamic,nncf", "--json", str(report_path),
                     timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["batch"] == 4 and "vit_tiny_patch16_224" in report["model"]
    for row in report["rows"]:
        assert row["top1"] is None and row["b1_median_ms"] > 0 and row["b4_median_ms"] > 0
    assert not any(r["variant"].startswith("ORT quantize_static") for r in report["rows"])
    assert all(set(entry) >= {"b1", "b4"} for entry in report["verdict"].values())


def _load_benchmark(name: str, monkeypatch):
    """A benchmark script as a module (they live outside the package and import their
    neighbours, e.g. benchmarks/peers.py, as a script run from that folder would)."""
    from pathlib import Path
    folder = Path(__file__).resolve().parents[2] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_best_of_ours_picks_our_fastest_runtime_per_batch_size(monkeypatch):
    """'On the best runtime for it': ORT may win at batch 1 and OpenVINO at batch 64; the
    verdict compares our fastest row at EACH batch size with the fastest peer there, and the
    float baselines are not peers."""
    speed = _load_benchmark("ptq_speed", monkeypatch)

    def row(variant, b1, b64):
        return {"variant": variant, "b1_median_ms": b1, "b64_median_ms": b64}
    rows = [row("PyTorch FP32 eager", 0.1, 0.1), row("ORT FP32", 0.1, 0.1),
            row("OURS W8A8 ORT, fused attention", 1.2, 16.0), row("OURS W8A8 OpenVINO IR", 1.7, 9.5),
            row("ORT quantize_dynamic", 1.4, 19.0), row("NNCF int8 (default) OpenVINO", 1.9, 11.0)]
    best = speed.best_of_ours(rows, 64)
    assert best["b1"]["ours"] == "OURS W8A8 ORT, fused attention" and best["b1"]["fastest_peer"] == "ORT quantize_dynamic"
    assert best["b64"]["ours"] == "OURS W8A8 OpenVINO IR" and best["b64"]["fastest_peer"] == "NNCF int8 (default) OpenVINO"
    assert best["b1"]["met"] and best["b64"]["met"]
    assert abs(best["b64"]["ours_speedup_vs_fastest_peer"] - 11.0 / 9.5) < 1e-12
    rows[3]["b64_median_ms"] = 12.0  # now NNCF is ahead at batch 64: said, with the ratio
    best = speed.best_of_ours(rows, 64)
    assert not best["b64"]["met"] and best["b64"]["ours_speedup_vs_fastest_peer"] < 1
    assert speed.best_of_ours(rows[:2], 64) == {}
