"""Analysis: activation/weight statistics against the grids, per-tensor SQNR in model order,
and the one-layer-at-a-time sensitivity ranking (checked against a real single-layer
quantization and against a model with one deliberately fragile layer)."""

import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bvvit.config import ModelConfig
from bvvit.evaluate.analysis import (GROUPS, activation_statistics, float_twin, grid_range, per_layer_sqnr,
                                     quantizer_ids, run_analysis, weight_statistics)
from bvvit.evaluate.sensitivity import overrides_cli, sensitivity, suggest_overrides
from bvvit.metrics import kl_divergence
from bvvit.model import VisionTransformer
from bvvit.quant.config import LayerOverride
from bvvit.quant.modules import QuantLinear
from bvvit.quant.quantize import quantize_model
from bvvit.quant.recipes import make_quant_config

CFG = ModelConfig(img_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=16, depth=2,
                  num_heads=2)


def _loader(seed: int, n: int = 64, batch_size: int = 32) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 4, (n,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def _minmax(bits, overrides):
    return make_quant_config("minmax", bits, bits, calib_size=32, overrides=overrides)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    model = VisionTransformer(CFG).eval()
    with torch.no_grad():  # spread the logits so KL and top-1 react to changes
        model.head.weight.mul_(20)
    return model


@pytest.fixture(scope="module")
def calib():
    return _loader(1, 32)


@pytest.fixture(scope="module")
def evaluation():
    return _loader(2, 64)


@pytest.fixture(scope="module")
def qmodels(model, calib):
    out = {}
    for bits in (4, 8, 16):
        out[f"w{bits}a{bits}"], _ = quantize_model(model, make_quant_config("mse", bits, bits, calib_size=32),
                                                   calib)
    cfg = make_quant_config("mse", 8, 8, calib_size=32, residual=True)
    out["w8a8-residual"], _ = quantize_model(model, cfg, calib)
    out["w16a16-vit"], _ = quantize_model(model, _vit(16, []), calib)
    # with the log2 softmax switch, so that the log grid's statistics are covered too
    out["w4a4-vit"], _ = quantize_model(model, make_quant_config(
        "vit", 4, 4, calib_size=32, softmax_method="log2"), calib)
    return out


def test_activation_statistics_cover_every_quantizer_with_its_grid(model, qmodels, evaluation):
    stats = activation_statistics(model, qmodels, evaluation, max_batches=2, bins=50)
    assert stats["images"] == 64 and stats["bins"] == 50
    by_id = {t["id"]: t for t in stats["tensors"]}
    # The float model is tapped everywhere, the residual stream too, so every group shows.
    assert {t["group"] for t in stats["tensors"]} == set(GROUPS)
    for name in ("w4a4", "w8a8-residual"):
        for tid, quantizer in quantizer_ids(qmodels[name]):
            entry = by_id[tid]
            grid = entry["quant"][name]
            expected = grid_range(quantizer.qparams)
            assert grid["lo"] == pytest.approx(expected["lo"]) and grid["hi"] == pytest.approx(expected["hi"])
            assert 0.0 <= grid["clipped_fraction"] <= 1.0
    vit = by_id["blocks.0.attn.softmax:softmax"]["quant"]["w4a4-vit"]
    assert vit["method"].startswith("log2") and vit["lo"] == 0.0 and len(vit["levels"]) == 16
    assert by_id["blocks.0.attn.qkv:linear_input"]["quant"]["w4a4-vit"]["reparameterized"] is True
    assert "reparameterized" not in by_id["blocks.0.attn.proj:linear_input"]["quant"]["w4a4-vit"]
    for entry in stats["tensors"]:
        assert sum(entry["histogram"]["counts"]) == entry["count"]
        assert len(entry["histogram"]["edges"]) == 51
        assert entry["min"] <= entry["percentiles"]["50"] <= entry["max"]
    # Residual tensors exist for every variant's float model, but only one variant quantizes them.
    residual = by_id["blocks.0.residual1:residual"]
    assert list(residual["quant"]) == ["w8a8-residual"]
    # A softmax output is a probability; an asymmetric grid starts at (about) zero.
    softmax = by_id["blocks.0.attn.softmax:softmax"]
    assert 0.0 <= softmax["min"] and softmax["max"] <= 1.0


def test_float_taps_see_what_the_quantizers_see(model, qmodels, calib):
    """At 16 bits, on the calibration images (so no range is exceeded), every quantized
    tensor is nearly its float counterpart: the quantizer-to-float-tensor mapping is right
    (a wrong pairing would give ~0 dB)."""
    sqnr = per_layer_sqnr(model, qmodels, calib, max_batches=1)
    assert sqnr["images"] == 32
    ids = [t["id"] for t in sqnr["tensors"]]
    quantized = [tid for tid, _ in quantizer_ids(qmodels["w16a16"])]
    assert set(quantized) <= set(ids)
    w16 = dict(zip(ids, sqnr["sqnr_db"]["w16a16"]))
    assert all(w16[tid] is not None and float(w16[tid]) > 40 for tid in quantized)
    assert all(w16[tid] is None for tid in ids if tid not in quantized)  # e.g. the residuals
    # The reparameterized variant is compared in its own coordinates (its float twin): its
    # qkv input matches (against the plain FP tensor it would be ~0 dB). Above 6 bits its
    # softmax grid is uniform (log2 is used only at low widths), so it matches too.
    vit = dict(zip(ids, sqnr["sqnr_db"]["w16a16-vit"]))
    for tid in ("patch_embed.proj:image", "blocks.0.attn.qkv:linear_input", "blocks.0.attn.matmul_qk:q",
                "blocks.0.attn.matmul_qk:k", "blocks.0.attn.matmul_av:v"):
        assert float(vit[tid]) > 60, (tid, vit[tid])
    assert float(vit["blocks.0.attn.softmax:softmax"]) > 60
    # Execution order: patch input first, then block 0 in data order, the head last.
    assert ids[0] == "patch_embed.proj:image" and ids[-1] == "head:linear_input"
    block0 = [tid for tid in ids if tid.startswith("blocks.0.")]
    assert block0[:6] == ["blocks.0.attn.qkv:linear_input", "blocks.0.attn.matmul_qk:q",
                          "blocks.0.attn.matmul_qk:k", "blocks.0.attn.softmax:softmax",
                          "blocks.0.attn.matmul_av:v", "blocks.0.attn.proj:linear_input"]
    # Fewer bits, more noise.
    median = {name: sorted(float(v) for v in row if v is not None)[len(quantized) // 2]
              for name, row in sqnr["sqnr_db"].items() if name in ("w4a4", "w8a8")}
    assert median["w4a4"] + 12 < median["w8a8"]
    weights = sqnr["weights"]
    assert weights["layers"][0] == "patch_embed.proj" and weights["layers"][-1] == "head"
    assert all(float(v) > 10 for v in weights["sqnr_db"]["w4a4"])


def test_weight_statistics_carry_each_variants_grid(model, qmodels):
    stats = weight_statistics(model, qmodels)
    layers = [w["layer"] for w in stats["layers"]]
    assert layers[0] == "patch_embed.proj" and layers[-1] == "head"
    head = stats["layers"][-1]
    assert head["shape"] == [4, 16] and sum(head["histogram"]["counts"]) == 64
    grid = head["quant"]["w4a4"]
    module = qmodels["w4a4"].head
    assert isinstance(module, QuantLinear) and grid["granularity"] == "channel"
    assert grid["hi"] == pytest.approx(grid_range(module.weight_qparams)["hi"])
    assert float(head["quant"]["w4a4"]["sqnr_db"]) < float(head["quant"]["w8a8"]["sqnr_db"])


def _fragile_model() -> VisionTransformer:
    """blocks.1.mlp.fc2 reads one huge activation channel (fc1 bias 50, whose fc2 weights are
    zero, so the float output ignores it) next to small ones; the MLP branch dominates the
    output. Quantizing fc2's INPUT per tensor then rounds every ordinary value to zero."""
    torch.manual_seed(3)
    model = VisionTransformer(CFG).eval()
    with torch.no_grad():
        mlp = model.blocks[1].mlp
        mlp.fc1.bias[0] = 50.0
        mlp.fc2.weight.mul_(20.0)
        mlp.fc2.weight[:, 0] = 0.0
        model.head.weight.mul_(10.0)
    return model


def test_sensitivity_puts_the_fragile_layer_first(calib, evaluation):
    model = _fragile_model()
    rows = sensitivity(model, _minmax, calib, evaluation, bits=(4, 6), max_images=48)
    assert rows[0]["layer"] == "blocks.1.mlp.fc2" and rows[0]["target"] == "activations"
    assert rows[0]["bits"] == 4 and rows[0]["images"] == 48
    others = [float(r["kl_div"]) for r in rows if r["layer"] != "blocks.1.mlp.fc2"]
    assert float(rows[0]["kl_div"]) > 10 * max(others)
    assert [float(r["kl_div"]) for r in rows] == sorted((float(r["kl_div"]) for r in rows), reverse=True)
    # Every unit, both targets, both bit depths: 2 blocks x (4 linears x 2 + 3 attention steps)
    # + patch embedding x 2 + head x 2, per bit depth.
    assert len(rows) == 2 * (2 * (4 * 2 + 3) + 2 + 2)
    assert {r["target"] for r in rows if r["op"] in ("MatMul", "Softmax")} == {"activations"}
    suggested = suggest_overrides(rows, budget=1)
    assert suggested == ["blocks.1.mlp.fc2=8"]
    assert overrides_cli(suggested + ["head=8"]) == "--override blocks.1.mlp.fc2=8 --override head=8"
    # The suggestion parses as a real override.
    assert LayerOverride.parse(suggested[0]) == LayerOverride("blocks.1.mlp.fc2", bits=8)


def _vit(bits, overrides):
    # sensitivity measures each layer's quantization before reconstruction (which needs the
    # whole block quantized), so the single-layer reference must not reconstruct either
    return make_quant_config("vit", bits, bits, calib_size=32, overrides=overrides, reconstruct={"enabled": False})


@pytest.mark.parametrize("make_config", [_minmax, _vit], ids=["minmax", "vit"])
def test_sensitivity_equals_quantizing_that_layer_alone(model, calib, evaluation, make_config):
    """The fast path (calibrate once, switch one layer on) gives what a separate single-layer
    quantization gives: the layer's weights alone, and its activations alone; with the
    'vit' recipe too (LayerNorm reparameterization, GPTQ codes)."""
    layer = "blocks.0.mlp.fc1"
    rows = sensitivity(model, make_config, calib, evaluation, bits=(4,), max_images=64)
    found = {r["target"]: r for r in rows if r["layer"] == layer}
    alone_cfg = make_config(4, [LayerOverride("*", keep_float=True), LayerOverride(layer, bits=4)])
    alone, _ = quantize_model(model, alone_cfg, calib)  # calibrated with everything else float
    reference_model = copy.deepcopy(model).set_fused_attn(False)
    twin, reparameterized = float_twin(model, alone)
    assert reparameterized == ({"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv",
                                "blocks.1.mlp.fc1", "head"} if make_config is _vit else set())
    images = torch.cat([x for x, _ in evaluation])
    with torch.no_grad():
        reference = reference_model(images)
        assert torch.allclose(twin(images), reference, atol=1e-4)  # the twin is the FP32 function
        both = alone(images)  # this layer's weights and activations
        module = alone.get_submodule(layer)
        quantized_weight = module.weight
        module.weight = torch.nn.Parameter(twin.get_submodule(layer).weight.clone(), requires_grad=False)
        activations_only = alone(images)
        module.weight = quantized_weight
        module.input_quantizer.state = "off"
        weights_only = alone(images)
    assert float(found["activations"]["kl_div"]) == pytest.approx(kl_divergence(reference, activations_only),
                                                                   rel=1e-3, abs=1e-9)
    assert float(found["weights"]["kl_div"]) == pytest.approx(kl_divergence(reference, weights_only),
                                                               rel=1e-3, abs=1e-9)
    assert kl_divergence(reference, both) > 0


def test_run_analysis_levels(model, qmodels, calib, evaluation):
    assert run_analysis("none", model, qmodels, calib, evaluation) == {
        "level": "none", "timing_s": {}, "settings": {}}
    with pytest.raises(ValueError, match="basic"):
        run_analysis("everything", model, qmodels, calib, evaluation)
    small = {k: qmodels[k] for k in ("w4a4", "w8a8")}
    basic = run_analysis("basic", model, small, calib, evaluation, analysis_images=40)
    assert {"activations", "weights", "sqnr"} <= set(basic) and "sensitivity" not in basic
    assert basic["settings"]["max_batches"] == 2 and basic["sqnr"]["images"] == 64  # whole batches of 32
    with pytest.raises(ValueError, match="make_config"):
        run_analysis("full", model, small, calib, evaluation, max_batches=1)
    full = run_analysis("full", model, small, calib, evaluation, None, _minmax, max_batches=1,
                        sensitivity_bits=(4,), sensitivity_images=32)
    sens = full["sensitivity"]
    assert sens["images"] == 32 and sens["bits"] == [4] and len(sens["suggested_overrides"]) == 2
    assert sens["cli"] == overrides_cli(sens["suggested_overrides"])
    assert set(full["timing_s"]) == {"activations", "sqnr", "sensitivity"}


def test_per_layer_sqnr_holds_one_chunk_of_taps_and_loads_one_variant_at_a_time(model, qmodels, evaluation):
    """At 224 px the float tensors of every tap for a whole batch do not fit (ViT-B: ~110 MB
    per image): a budget of one image's taps gives the same SQNR as the whole batch, and a
    lazily loading mapping of variants is asked for each variant once, in turn."""
    from collections.abc import Mapping

    class Lazy(Mapping):
        def __init__(self, models):
            self.models, self.asked = models, []

        def __getitem__(self, name):
            self.asked.append(name)
            return self.models[name]

        def __iter__(self):
            return iter(self.models)

        def __len__(self):
            return len(self.models)

    whole = per_layer_sqnr(model, qmodels, evaluation, max_batches=1)
    lazy = Lazy(qmodels)
    chunked = per_layer_sqnr(model, lazy, evaluation, max_batches=1, tap_budget_bytes=1)
    assert chunked["tensors"] == whole["tensors"] and chunked["weights"] == whole["weights"]
    for name in qmodels:
        for a, b in zip(whole["sqnr_db"][name], chunked["sqnr_db"][name]):
            assert (a is None and b is None) or a == b or abs(a - b) < 1e-6, (name, a, b)
    # float_twins reads each variant once, then the SQNR pass once more: never interleaved
    passes = [lazy.asked[:len(qmodels)], lazy.asked[len(qmodels):]]
    assert passes == [list(qmodels), list(qmodels)]
