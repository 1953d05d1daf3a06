"""OpenVINO: our calibrated W8A8 as an OpenVINO IR (int8 weights, our scales, float attention)
matches its simulated twin, runs its matmuls as int8 kernels, carries the metadata, and is
evaluated and timed beside ONNX Runtime in the PTQ job's deployment stage. Skipped without
the optional openvino package (CI installs it)."""

import dataclasses
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch

from bvvit.config import Preprocessing
from bvvit.errors import CheckpointError, ConfigError
from bvvit.ptq import onnx as ptq_onnx
from bvvit.ptq.onnx import export_and_measure, resolve_runtimes
from bvvit.ptq.summary import onnx_rows
from bvvit.quant.export import ATTENTION_KINDS
from bvvit.quant.export_openvino import export_openvino_ir, float_attention_model, openvino_twin
from bvvit.quant.modules import OFF, QUANTIZE, ActQuantizer, weight_modules
from bvvit.quant.quantize import quantize_model
from bvvit.quant.recipes import make_quant_config
from bvvit.runtime import openvino as ov_runtime
from bvvit.model import VisionTransformer
from tests.quant.tiny import QUANT_CFG, noise_loader

needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="the optional openvino package is not installed")

PRE = Preprocessing(mean=(0.5,), std=(0.25,), img_size=16, in_chans=1)
CLASSES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture(scope="module")
def qmodel(model):
    return quantize_model(model, make_quant_config("mse", 8, 8), noise_loader(64, batch_size=32))[0]


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(64, 1, 16, 16)


@pytest.fixture(scope="module")
def ir(tmp_path_factory, qmodel):
    return export_openvino_ir(qmodel, tmp_path_factory.mktemp("ov") / "w8a8.xml", PRE, CLASSES)


def test_twin_turns_off_exactly_the_attention_quantizers(qmodel):
    twin = float_attention_model(qmodel)
    states = {m.kind: m.state for m in twin.modules() if isinstance(m, ActQuantizer)}
    assert all(states[kind] == OFF for kind in ATTENTION_KINDS if kind in states)
    assert states["linear_input"] == QUANTIZE
    assert all(m.state == QUANTIZE for m in qmodel.modules() if isinstance(m, ActQuantizer))  # original kept


@pytest.mark.parametrize("head", ["token", "avg", "avg_fc_norm", "distilled", "avg_no_class_token"])
def test_export_graph_computes_the_float_attention_twin(qmodel, images, head):
    if head != "token":
        fields = {"avg": dict(global_pool="avg"), "avg_fc_norm": dict(global_pool="avg", fc_norm=True),
                  "distilled": dict(dist_token=True, head_dist=True),
                  "avg_no_class_token": dict(global_pool="avg", class_token=False)}[head]
        torch.manual_seed(0)
        model = VisionTransformer(dataclasses.replace(QUANT_CFG, **fields)).eval()
        qmodel = quantize_model(model, make_quant_config("mse", 8, 8), noise_loader(32, batch_size=32))[0]
    with torch.no_grad():
        expected = float_attention_model(qmodel)(images)
        got = openvino_twin(qmodel)(images)
    assert float((got - expected).abs().max()) < 1e-3 * float(expected.abs().max()) + 1e-4


@needs_openvino
def test_ir_holds_int8_weights_and_metadata(qmodel, ir):
    assert ir.is_file() and ir.with_suffix(".bin").is_file()
    assert not list(ir.parent.glob(".*"))  # the staging folder is gone
    import openvino as ov
    model = ov.Core().read_model(str(ir))
    int8 = [op for op in model.get_ops() if op.get_type_name() == "Constant"
            and op.get_output_element_type(0) in (ov.Type.i8, ov.Type.u8) and len(op.get_output_shape(0)) == 2]
    assert len(int8) == len(list(weight_modules(qmodel)))
    meta = ov_runtime.read_ir_metadata(ir)
    assert meta["class_names"] == CLASSES and meta["mean"] == [0.5] and meta["img_size"] == 16
    assert meta["bvvit.variant"] == "w8a8-openvino" and meta["bvvit.attention"] == "float"


@needs_openvino
@pytest.mark.parametrize("precision", [None, "f32"])
def test_ir_runs_int8_matmuls_and_matches_the_twin(qmodel, ir, images, precision):
    session = ov_runtime.make_session(ir, threads=1, precision=precision)
    report = ov_runtime.exec_graph_report(session)
    assert report["ok"] and report["integer_matmuls"] >= len(list(weight_modules(qmodel))) - 1, report
    with torch.no_grad():
        expected = float_attention_model(qmodel)(images).numpy()
    got = ov_runtime.run_session(session, images)
    assert got.shape == expected.shape
    tolerance = 0.05 if precision == "f32" else 0.25  # bf16 LayerNorm/softmax between int8 matmuls
    assert np.abs(got - expected).max() < tolerance * np.abs(expected).max()
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.9


@needs_openvino
def test_caller_arrays_are_never_written(ir):
    """Two requests of one compiled model must not write into the first caller's array
    (OpenVINO 2026.4 does with share_inputs=True)."""
    session = ov_runtime.make_session(ir, threads=1)
    images = np.random.default_rng(0).standard_normal((1000, 1, 16, 16)).astype(np.float32)
    kept = images.copy()
    ov_runtime.numpy_fn(session)(images[500:])  # a view, as a loader's batch may be
    session.create_infer_request().infer({0: np.zeros((64, 1, 16, 16), np.float32)})  # another request
    ov_runtime.session_fn(session)(torch.ones(2, 1, 16, 16))
    np.testing.assert_array_equal(images, kept)


@needs_openvino
def test_unreadable_files_are_one_line_errors(tmp_path, ir):
    with pytest.raises(CheckpointError, match="does not exist"):
        ov_runtime.make_session(tmp_path / "missing.xml")
    lonely = tmp_path / "lonely.xml"
    lonely.write_bytes(ir.read_bytes())
    with pytest.raises(CheckpointError, match="no weights file"):
        ov_runtime.make_session(lonely)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(CheckpointError) as err:
        ov_runtime.make_session(broken)
    assert "\n" not in str(err.value)


@needs_openvino
def test_runtime_choice(monkeypatch):
    assert resolve_runtimes("all") == ("onnxruntime", "openvino")
    assert resolve_runtimes(None) == ("onnxruntime", "openvino")
    monkeypatch.setattr(ptq_onnx, "openvino_error", lambda: "the openvino package is not installed")
    assert resolve_runtimes(None) == ("onnxruntime",)
    assert resolve_runtimes("onnxruntime") == ("onnxruntime",)
    with pytest.raises(ConfigError, match="--runtime openvino: the openvino package is not installed"):
        resolve_runtimes("openvino")


@needs_openvino
def test_deployment_stage_measures_openvino_beside_onnxruntime(tmp_path, model, qmodel):
    loader = noise_loader(48, batch_size=16, seed=3)
    with torch.no_grad():
        fp_logits = torch.cat([model(x) for x, _ in loader])
        sim_logits = torch.cat([qmodel(x) for x, _ in loader])
    result = export_and_measure(model, qmodel, loader, tmp_path, PRE, CLASSES, fp_logits, sim_logits,
                                latency_runs=2, batch_sizes=(1, 4), warmup=1, threads=1,
                                runtimes=("onnxruntime", "openvino"))
    acc = result["accuracy"]
    assert acc["ov_w8a8"]["compared_to"] == "pytorch_w8a8_sim_float_attention"
    assert acc["ort_w8a8"]["compared_to"] == "pytorch_w8a8_sim"
    assert result["checks"]["ov_w8a8_integer_ops"] and result["checks"]["w8a8_integer_ops"]
    assert acc["ov_fp32"]["max_abs_diff_vs_pytorch"] < 0.1
    ir = tmp_path / "onnx" / "vit_w8a8_openvino.xml"
    assert result["size_bytes"]["ov_w8a8"] == ir.stat().st_size + ir.with_suffix(".bin").stat().st_size
    timed = {(r["name"], r["batch_size"]) for r in result["latency"]}
    sessions = {"pytorch_fp32", "ort_fp32", "ort_w8a8", "ov_fp32", "ov_w8a8"}
    sessions |= {"ov_fp32_f32"} if result["openvino"]["precision"] != "f32" else set()
    assert {(name, b) for name in sessions for b in (1, 4)} <= timed
    rows = {r["name"]: r for r in onnx_rows(result, acc["pytorch_fp32"]["top1"], 10 ** 6)}
    assert rows["openvino-w8a8"]["kernel"] == "openvino-int8" and rows["openvino-w8a8"]["w_bits"] == 8
    assert result["openvino"]["precision"] in ("bf16", "f32", "f16")
    assert rows["openvino-fp32"]["kernel"] == f"openvino-{result['openvino']['precision']}"
    assert rows["openvino-w8a8"]["latency_ms_b1"] > 0 and rows["onnx-w8a8"]["recipe"] == "onnx"

    only_ov = export_and_measure(model, qmodel, loader, tmp_path / "ov_only", PRE, CLASSES, fp_logits,
                                 sim_logits, threads=1, measure_latency=False, runtimes=("openvino",))
    assert not any(name.startswith("ort_") for name in only_ov["accuracy"])
    assert set(only_ov["files"]) == {"fp32", "ov_w8a8"}


def test_the_core_runs_without_openvino():
    """openvino is optional: the PTQ job imports, and measures ONNX Runtime only."""
    code = ("import sys; sys.modules['openvino'] = None\n"
            "from bvvit.ptq.onnx import installed_runtimes, resolve_runtimes\n"
            "import bvvit.cli.post_training, bvvit.ptq.job\n"
            "assert installed_runtimes() == ('onnxruntime',), installed_runtimes()\n"
            "try:\n    resolve_runtimes('openvino')\nexcept Exception as exc:\n    print(type(exc).__name__, exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ConfigError --runtime openvino: the openvino package is not installed")


@needs_openvino
def test_a_log_softmax_at_8_bits_still_deploys_on_openvino(tmp_path, model):
    """OpenVINO's IR keeps attention in float, so a log2 softmax grid forced at W8A8 (which
    ONNX Runtime's int8-attention file refuses) does not stop it: the IR runs the same model
    as its float-attention twin."""
    loader = noise_loader(32, batch_size=16, seed=3)
    log_model = quantize_model(model, make_quant_config("mse", 8, 8, softmax_method="log2"), loader)[0]
    with torch.no_grad():
        fp_logits = torch.cat([model(x) for x, _ in loader])
        sim_logits = torch.cat([log_model(x) for x, _ in loader])
    result = export_and_measure(model, log_model, loader, tmp_path, PRE, CLASSES, fp_logits, sim_logits,
                                threads=1, measure_latency=False, runtimes=("onnxruntime", "openvino"))
    assert not result["w8a8"]["exported"] and result["openvino"]["exported"]
    assert set(result["files"]) == {"fp32", "w8a8_fused", "ov_w8a8"}
    assert result["checks"]["ov_w8a8_integer_ops"] and result["checks"]["ov_w8a8_within_0.1"]
    assert result["accuracy"]["ov_w8a8"]["agreement_with_sim"] >= 90
