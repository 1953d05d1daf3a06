"""ONNX export and ONNX Runtime: the float graph matches PyTorch, the W8A8 QDQ graph carries
our integer codes and scales, runs on integer kernels and matches our fake-quant model,
W4 weight-only uses MatMulNBits, and bad files fail with one line."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from torch.utils.data import DataLoader, TensorDataset

from bvvit.config import Preprocessing
from bvvit.errors import CheckpointError, ConfigError
from bvvit.quant.config import LayerOverride, TensorQuantSpec
from bvvit.quant.export import (export_float_onnx, export_qdq_onnx, export_twin,
                                export_w4_weight_only_onnx, matmul_nbits_tensors)
from bvvit.quant.modules import OFF, ActQuantizer, QuantLinear, weight_modules
from bvvit.metrics import sqnr_db
from bvvit.ptq.onnx import export_and_measure
from bvvit.quant.quantize import quantize_model
from bvvit.quant.recipes import make_quant_config
from bvvit.runtime.onnxruntime import (INTEGER_OPS, evaluate_onnx, integer_op_report, load_onnx, make_session,
                                       read_onnx_metadata, run_session)
from tests.quant.tiny import noise_loader

PRE = Preprocessing(mean=(0.5,), std=(0.25,), img_size=16, in_chans=1)
CLASSES = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture(scope="module")
def calib():
    return noise_loader(64, batch_size=32)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(64, 1, 16, 16)


@pytest.fixture(scope="module")
def qmodel(model, calib):
    return quantize_model(model, make_quant_config("mse", 8, 8), calib)[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory, model, qmodel):
    folder = tmp_path_factory.mktemp("onnx")
    return {"fp32": export_float_onnx(model, folder / "fp32.onnx", PRE, CLASSES),
            "w8a8": export_qdq_onnx(qmodel, folder / "w8a8.onnx", PRE, CLASSES)}


def test_float_onnx_matches_pytorch_at_any_batch(model, files, images):
    session = make_session(files["fp32"], threads=1)
    for batch in (images[:1], images[:7]):
        with torch.no_grad():
            expected = model(batch).numpy()
        np.testing.assert_allclose(run_session(session, batch), expected, atol=1e-4, rtol=1e-4)


def test_metadata_carries_normalisation_and_classes(files):
    for variant, path in files.items():
        meta = read_onnx_metadata(path)
        assert meta["mean"] == [0.5] and meta["std"] == [0.25] and meta["img_size"] == 16
        assert meta["class_names"] == CLASSES and meta["bvvit.variant"] == variant
        assert meta["preprocessing"]["in_chans"] == 1


def test_qdq_file_holds_our_int8_codes(qmodel, files):
    graph = load_onnx(files["w8a8"]).graph
    int8 = [numpy_helper.to_array(i) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert not any(i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and i.dims[0] >= 32
                   for i in graph.initializer), "a float weight matrix was left in the file"
    for name, layer in weight_modules(qmodel):
        codes_t = layer.weight_codes.reshape(layer.weight_codes.shape[0], -1).t().numpy()  # (in, out)
        assert any(c.shape == codes_t.shape and np.array_equal(c, codes_t) for c in int8), name
    # each quantized Linear is one MatMulIntegerToFloat(x_q, W_q, s_x, s_w, zp_x[, zp_w], bias)
    # with one weight scale per output channel and its bias fused in
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # the exporter shares equal initializers through Identity nodes
        if node.op_type == "Identity" and node.input[0] in initializers:
            initializers[node.output[0]] = initializers[node.input[0]]
    fused = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fused) == len(weight_modules(qmodel))
    for node in fused:
        weight, bias = initializers[node.input[1]], initializers[node.input[-1]]
        assert weight.dtype == np.int8 and bias.shape == (weight.shape[1],)
        assert initializers[node.input[3]].shape == (weight.shape[1],)
    assert not any(n.op_type == "Add" and any(i.endswith(".bias") for i in n.input) for n in graph.node)


def test_qdq_graph_runs_on_integer_kernels(files, tmp_path):
    optimized = tmp_path / "optimized.onnx"
    make_session(files["w8a8"], threads=1, optimized_model_path=optimized)
    report = integer_op_report(optimized)
    assert report["ok"] and report["has_integer_ops"]
    assert report["float_matmuls"] == [] and report["unfused_qdq_matmuls"] == []
    # 2 blocks x (qkv, proj, fc1, fc2, q@k, attn@v) + patch embedding + head
    assert report["num_integer_ops"] == 2 * 6 + 2
    assert set(report["integer_ops"]) <= INTEGER_OPS
    assert "MatMul" not in report["op_counts"] and "Gemm" not in report["op_counts"]


def test_int8_onnx_agrees_with_fake_quant(qmodel, files, images):
    with torch.no_grad():
        simulated = qmodel(images)
        twin = export_twin(qmodel)(images)
    torch.testing.assert_close(twin, simulated, atol=1e-5, rtol=1e-5)
    logits = torch.from_numpy(run_session(make_session(files["w8a8"], threads=1), images))
    assert sqnr_db(simulated, logits) > 20
    assert (logits.argmax(1) == simulated.argmax(1)).float().mean() >= 0.9


@pytest.mark.parametrize("recipe", ["mse", "minmax"])  # per-channel and per-tensor weight scales
def test_fusing_the_linears_changes_no_logit(model, calib, images, tmp_path, recipe):
    qmodel = quantize_model(model, make_quant_config(recipe, 8, 8), calib)[0]
    fused = export_qdq_onnx(qmodel, tmp_path / "fused.onnx", PRE, CLASSES)
    unfused = export_qdq_onnx(qmodel, tmp_path / "unfused.onnx", PRE, CLASSES, fuse=False)
    assert not any(n.op_type == "MatMulIntegerToFloat" for n in load_onnx(unfused).graph.node)
    assert read_onnx_metadata(fused)["bvvit.fused_linears"] == len(weight_modules(qmodel))
    np.testing.assert_allclose(run_session(make_session(fused, threads=1), images),
                               run_session(make_session(unfused, threads=1), images), atol=1e-5, rtol=1e-5)


def _export_attention_mode(qmodel, tmp_path, attention):
    """Export ``qmodel`` with ``attention``; (path, session, integer_op_report of ORT's graph)."""
    path = export_qdq_onnx(qmodel, tmp_path / f"{attention}.onnx", PRE, CLASSES, attention=attention)
    assert read_onnx_metadata(path)["bvvit.attention"] == attention
    optimized = tmp_path / "optimized.onnx"
    session = make_session(path, threads=1, optimized_model_path=optimized)
    return path, session, integer_op_report(optimized)


def test_float_attention_keeps_every_linear_on_integers(qmodel, images, tmp_path):
    path, session, report = _export_attention_mode(qmodel, tmp_path, "float")
    # 2 blocks x (qkv, proj, fc1, fc2) + patch embedding + head on integers; only the
    # attention products (q @ k^T, attn @ v) in float, and none of them fed by a DQ
    assert report["ok"] and report["num_integer_ops"] == 2 * 4 + 2
    assert len(report["float_matmuls"]) == 2 * 2 and report["unfused_qdq_matmuls"] == []
    with torch.no_grad():
        simulated = qmodel(images)
    logits = torch.from_numpy(run_session(session, images))
    assert sqnr_db(simulated, logits) > 20
    with pytest.raises(ConfigError, match="attention"):
        export_twin(qmodel, attention="int4")


def test_fused_attention_is_one_qattention_node_per_block(qmodel, images, tmp_path):
    path, session, report = _export_attention_mode(qmodel, tmp_path, "fused")
    # each block: qkv + attention in one QAttention; proj, fc1, fc2, patch embedding and
    # head stay MatMulIntegerToFloat; no float matmul left anywhere
    assert report["integer_ops"] == {"QAttention": 2, "MatMulIntegerToFloat": 2 * 3 + 2}
    assert report["ok"] and report["float_matmuls"] == []
    graph = load_onnx(path).graph
    qattention = next(n for n in graph.node if n.op_type == "QAttention")
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    layer = qmodel.blocks[0].attn.qkv
    assert np.array_equal(initializers[qattention.input[1]], layer.weight_codes.t().numpy())  # our codes
    with torch.no_grad():
        twin = export_twin(qmodel, attention="fused")(images)
        float_attention = export_twin(qmodel, attention="float")(images)
    torch.testing.assert_close(twin, float_attention)  # the PyTorch stand-in is the same model
    logits = torch.from_numpy(run_session(session, images))
    assert sqnr_db(float_attention, logits) > 30  # ORT's kernel computes that model
    assert (logits.argmax(1) == float_attention.argmax(1)).float().mean() >= 0.95


def test_the_exporter_drops_what_is_benign_and_says_everything_else(model, qmodel, tmp_path, capfd, monkeypatch):
    """torch's C++ exporter warns that it has no shape inference for QAttention (one line per
    block, on the process's stderr); that is known benign and dropped. Any other line the
    exporter writes still reaches stderr."""
    export_qdq_onnx(qmodel, tmp_path / "fused.onnx", PRE, CLASSES, attention="fused")
    assert "QAttention type is missing" not in capfd.readouterr().err
    real_export = torch.onnx.export

    def noisy_export(*args, **kwargs):
        os.write(2, b"Warning: something a user should see\n")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", noisy_export)
    export_float_onnx(model, tmp_path / "fp32.onnx", PRE, CLASSES)
    assert "Warning: something a user should see" in capfd.readouterr().err


def test_fused_attention_refuses_blocks_it_cannot_run(model, calib, tmp_path):
    cfg = make_quant_config("mse", 8, 8, overrides=[LayerOverride("blocks.1.attn.qkv", keep_float=True)])
    partly_float, _ = quantize_model(model, cfg, calib)
    with pytest.raises(ConfigError, match="blocks.1.attn: its qkv Linear is not quantized"):
        export_qdq_onnx(partly_float, tmp_path / "fused.onnx", PRE, CLASSES, attention="fused")
    assert not (tmp_path / "fused.onnx").exists()


def test_evaluate_onnx_follows_the_loader(files, images, model):
    loader = DataLoader(TensorDataset(images, torch.zeros(64, dtype=torch.long)), batch_size=24)
    logits = evaluate_onnx(make_session(files["fp32"], threads=1), loader)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(images), atol=1e-4, rtol=1e-4)


def test_other_widths_are_refused(model, calib, tmp_path):
    w4a8, _ = quantize_model(model, make_quant_config("minmax", 4, 8), calib)
    with pytest.raises(ConfigError, match="only 8-bit"):
        export_qdq_onnx(w4a8, tmp_path / "w4a8.onnx", PRE, CLASSES)
    assert not (tmp_path / "w4a8.onnx").exists()


def test_a_log_softmax_at_8_bits_exports_where_attention_is_not_integer(model, calib, images, tmp_path):
    """A log2 softmax grid forced at W8A8 cannot run on int8 attention: that file is refused
    with a hint, while the fused and float-attention files (which drop the attention
    quantizers) export, and export_and_measure measures what it could make. A model whose
    Linears are not 8-bit is still refused as a whole."""
    log_model, _ = quantize_model(model, make_quant_config("mse", 8, 8, softmax_method="log2"), calib)
    with pytest.raises(ConfigError, match="int8 attention needs.*softmax.*attention='fused' or 'float'"):
        export_twin(log_model)
    with torch.no_grad():
        fused, float_attention = export_twin(log_model, "fused")(images), export_twin(log_model, "float")(images)
    torch.testing.assert_close(fused, float_attention)
    loader = DataLoader(TensorDataset(images[:16], torch.arange(16) % 5), batch_size=8)
    with torch.no_grad():
        fp_logits, sim_logits = model(images[:16]), log_model(images[:16])
    result = export_and_measure(model, log_model, loader, tmp_path, PRE, CLASSES, fp_logits, sim_logits,
                                measure_latency=False, threads=1, runtimes=("onnxruntime",))
    assert not result["w8a8"]["exported"] and "softmax" in result["w8a8"]["error"]
    assert not (tmp_path / "onnx" / "vit_w8a8.onnx").exists()
    assert result["w8a8_fused"]["exported"] and set(result["files"]) == {"fp32", "w8a8_fused"}
    assert "ort_w8a8" not in result["accuracy"] and result["integer_ops"] == {}
    assert "w8a8_integer_ops" not in result["checks"] and result["checks"]["fp32_within_0.01"]
    assert result["accuracy"]["ort_w8a8_fused"]["agreement"] >= 90
    w4a8, _ = quantize_model(model, make_quant_config("minmax", 4, 8), calib)
    with pytest.raises(ConfigError, match="only 8-bit.*safetensors"):
        export_and_measure(model, w4a8, loader, tmp_path / "w4", PRE, CLASSES, fp_logits, sim_logits,
                           measure_latency=False, threads=1, runtimes=("onnxruntime",))


@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("group:16", False)])
def test_w4_weight_only_uses_matmul_nbits(model, calib, images, tmp_path, granularity, symmetric):
    weight = TensorQuantSpec(4, symmetric=symmetric, granularity=granularity, observer="minmax")
    qm, _ = quantize_model(model, make_quant_config("minmax", 4, 8, weight=weight,
                                                    patch_embed=granularity == "channel"), calib)
    path = export_w4_weight_only_onnx(qm, tmp_path / "w4.onnx", PRE, CLASSES, accuracy_level=0)
    optimized = tmp_path / "w4_opt.onnx"
    session = make_session(path, threads=1, optimized_model_path=optimized)
    assert integer_op_report(optimized)["integer_ops"] == {"MatMulNBits": 2 * 4 + 1}
    for _, quantizer in qm.named_modules():
        if isinstance(quantizer, ActQuantizer):
            quantizer.state = OFF  # weight-only reference
    with torch.no_grad():
        expected = qm(images)
    assert sqnr_db(expected, torch.from_numpy(run_session(session, images))) > 60


def test_a_full_disk_during_an_optional_export_fails_the_run(model, qmodel, images, tmp_path, monkeypatch):
    """A refused form is recorded and the run goes on; a failed write is not a refusal: it is
    raised (the caller reports a full disk as a failure of the run)."""
    import errno

    import bvvit.ptq.onnx as deployment
    from bvvit.errors import WriteError

    def full_disk(*args, **kwargs):
        raise WriteError("cannot write vit_w8a8.onnx: No space left on device", errno.ENOSPC)

    monkeypatch.setattr(deployment, "export_qdq_onnx", full_disk)
    loader = DataLoader(TensorDataset(images[:8], torch.arange(8) % 5), batch_size=8)
    with torch.no_grad(), pytest.raises(WriteError, match="No space left"):
        export_and_measure(model, qmodel, loader, tmp_path, PRE, CLASSES, model(images[:8]), qmodel(images[:8]),
                           measure_latency=False, threads=1, runtimes=("onnxruntime",))


def test_w4_weight_only_file_of_a_renormalizing_w4a4_model(model, calib, images, tmp_path):
    """The W4A4 vit model renormalizes its 4-bit attention rows; its weight-only file drops
    every activation quantizer, and with it the renormalization (there is no rounding to undo)."""
    qm, _ = quantize_model(model, make_quant_config("vit", 4, 4, reconstruct={"enabled": False}), calib)
    assert all(block.attn.softmax.renormalize for block in qm.blocks)
    session = make_session(export_w4_weight_only_onnx(qm, tmp_path / "w4.onnx", PRE, CLASSES, accuracy_level=0),
                           threads=1)
    for _, quantizer in qm.named_modules():
        if isinstance(quantizer, ActQuantizer):
            quantizer.state = OFF
    with torch.no_grad():
        expected = qm(images)
    assert sqnr_db(expected, torch.from_numpy(run_session(session, images))) > 60


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 5), k_blocks=st.integers(1, 3), bits=st.integers(2, 4),
       symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_matmul_nbits_packing_round_trips(n, k_blocks, bits, symmetric, seed):
    """Unpacking the MatMulNBits tensors as ONNX Runtime does gives our weights back."""
    torch.manual_seed(seed)
    k = 16 * k_blocks
    spec = TensorQuantSpec(bits, symmetric=symmetric, granularity="channel", observer="minmax")
    layer = QuantLinear(torch.nn.Linear(k, n), spec, None)
    packed, scales, zero_points = matmul_nbits_tensors(layer, 16)
    stored = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, k_blocks, 16)
    if zero_points is None:
        zp = np.full((n, k_blocks, 1), 8)
    else:
        zp_pairs = zero_points.reshape(n, -1)
        zp = np.stack([zp_pairs & 0x0F, zp_pairs >> 4], axis=-1).reshape(n, -1)[:, :k_blocks, None]
    weight = (stored.astype(np.float32) - zp) * scales.reshape(n, k_blocks, 1)
    np.testing.assert_allclose(weight.reshape(n, k), layer.weight.numpy(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\x01\x02", "truncated"])
def test_bad_files_raise_checkpoint_error(files, tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        content = files["w8a8"].read_bytes()[:1000]
    path.write_bytes(content)
    for load in (load_onnx, make_session):
        with pytest.raises(CheckpointError) as info:
            load(path)
        assert "\n" not in str(info.value) and "bad.onnx" in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        make_session(tmp_path / "missing.onnx")


def test_export_and_measure_reports_everything(model, qmodel, images, tmp_path):
    loader = DataLoader(TensorDataset(images[:16], torch.arange(16) % 5), batch_size=8)
    with torch.no_grad():
        fp_logits, sim_logits = model(images[:16]), qmodel(images[:16])
    result = export_and_measure(model, qmodel, loader, tmp_path, PRE, CLASSES, fp_logits,
                                sim_logits, latency_runs=10, batch_sizes=(1, 4), warmup=1,
                                threads=1)
    json.dumps(result, allow_nan=False)
    assert (tmp_path / "onnx" / "vit_fp32.onnx").is_file()
    assert (tmp_path / "onnx" / "vit_w8a8.onnx").is_file()
    assert (tmp_path / "onnx" / "vit_w8a8_fused_attention.onnx").is_file()
    assert set(result) >= {"files", "size_bytes", "size_ratio_to_fp32", "accuracy", "checks",
                           "integer_ops", "w4", "w8a8_fused", "latency", "threads", "system", "num_images"}
    assert result["w8a8_fused"]["exported"] and result["w8a8_fused"]["integer_ops"]["QAttention"] == 2
    assert result["size_ratio_to_fp32"]["w8a8"] < 0.75  # 0.27 at 6x192; graph overhead here
    assert result["checks"]["w8a8_integer_ops"] and result["checks"]["fp32_within_0.01"]
    assert result["accuracy"]["ort_fp32"]["agreement"] == 100.0
    assert result["w4"] == {"exported": False, "error": None}
    rows = {(r["name"], r["batch_size"]) for r in result["latency"]}
    assert rows == {(n, b) for n in ("pytorch_fp32", "ort_fp32", "ort_w8a8", "ort_w8a8_fused") for b in (1, 4)}
    assert all(r["runs"] >= 10 and r["p90_ms"] >= r["median_ms"] > 0 for r in result["latency"])


def test_export_and_measure_times_large_files_in_groups(model, qmodel, images, tmp_path, monkeypatch):
    """Files over the session budget: timed in groups, ORT FP32 in each, rows unique, every
    ratio from its own group's run, and the same accuracy as when all fit (one group)."""
    import bvvit.ptq.onnx as deployment
    loader = DataLoader(TensorDataset(images[:16], torch.arange(16) % 5), batch_size=8)
    with torch.no_grad():
        fp_logits, sim_logits = model(images[:16]), qmodel(images[:16])
    kwargs = dict(latency_runs=10, batch_sizes=(1, 4), warmup=1, threads=1, runtimes=("onnxruntime",))
    together = export_and_measure(model, qmodel, loader, tmp_path / "a", PRE, CLASSES, fp_logits, sim_logits, **kwargs)
    assert {r["timing_group"] for r in together["latency"]} == {0}
    monkeypatch.setattr(deployment, "SESSION_BYTES", 1)  # every file over budget: one group per file
    opened = []
    real_open = deployment.make_session
    monkeypatch.setattr(deployment, "make_session", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    split = export_and_measure(model, qmodel, loader, tmp_path / "b", PRE, CLASSES, fp_logits, sim_logits, **kwargs)
    groups = {r["timing_group"] for r in split["latency"]}
    assert groups == {0, 1}  # (ort_fp32, ort_w8a8), (ort_fp32, ort_w8a8_fused)
    rows = [(r["name"], r["batch_size"]) for r in split["latency"]]
    assert len(rows) == len(set(rows)) == 4 * 2
    assert all(r["speedup_vs_ort_fp32"] > 0 for r in split["latency"])
    for name in ("ort_fp32", "ort_w8a8", "ort_w8a8_fused"):
        assert split["accuracy"][name] == together["accuracy"][name]
    # the integer-op reports (w8a8, fused) + evaluation (each once) + timing (2 groups x (reference + 1))
    assert len(opened) == 2 + 3 + 4
