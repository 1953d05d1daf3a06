"""ViT-aware techniques: log2 softmax quantizer, LayerNorm reparameterization, GPTQ."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils.data import DataLoader, TensorDataset

from bvvit.config import ModelConfig
from bvvit.metrics import sqnr_db
from bvvit.model import VisionTransformer
from bvvit.quant.gptq import gptq_codes, input_hessians
from bvvit.quant.log2 import Log2Observer, LogQParams, qparams_from_dict
from bvvit.quant.observers import make_observer
from bvvit.quant.primitives import PerChannel, QParams
from bvvit.quant.quantize import quantize_model
from bvvit.quant.config import LayerOverride
from bvvit.quant.recipes import make_quant_config
from bvvit.quant.reparam import channel_ranges, norm_linear_pairs, reparameterize_layernorms

CFG = ModelConfig(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2)


def _loader(n=32, seed=1):
    torch.manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 1, 16, 16), torch.zeros(n, dtype=torch.long)), batch_size=16)


# ------------------------------------------------------------------ log2 quantizer

@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), k=st.sampled_from([1, 2]), seed=st.integers(0, 10_000))
def test_log2_codes_fit_bits_and_relative_error_is_bounded(bits, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(500, generator=g) ** 3  # probabilities skewed towards 0
    qp = LogQParams(torch.tensor(1.0), bits, k)
    codes = qp.quantize(x)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    out = qp.dequantize(codes)
    smallest = 2.0 ** (-(2 ** bits - 2) / k)
    inside = x >= smallest
    # in the log domain the error is at most half a step: ratio within 2^(+-1/(2k))
    ratio = out[inside] / x[inside]
    assert torch.all(ratio <= 2 ** (0.5 / k) + 1e-5) and torch.all(ratio >= 2 ** (-0.5 / k) - 1e-5)
    assert torch.all(out[x < smallest / 2] == 0)


def test_log2_beats_uniform_on_softmax_at_4_bits():
    torch.manual_seed(0)
    probs = torch.randn(64, 4, 50, 50).mul(2).softmax(dim=-1)
    log_obs = Log2Observer()
    log_obs.update(probs)
    uni = make_observer("minmax")
    uni.update(probs)
    log_err = sqnr_db(probs, log_obs.compute_qparams(4).fake_quantize(probs))
    uni_err = sqnr_db(probs, uni.compute_qparams(4).fake_quantize(probs))
    assert log_err > uni_err + 3


def test_log2_qparams_round_trip_and_straight_through_gradient():
    qp = LogQParams(torch.tensor(0.9), 4, 2)
    again = qparams_from_dict(qp.to_dict())
    x = torch.rand(100, requires_grad=True)
    assert torch.equal(qp.fake_quantize(x), again.fake_quantize(x))
    qp.fake_quantize(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(100))
    assert isinstance(qparams_from_dict(QParams(torch.tensor(1.0), torch.tensor(0), 8, True).to_dict()), QParams)


# ------------------------------------------------------------------ reparameterization

def test_layernorm_folding_is_exact_in_float():
    torch.manual_seed(0)
    model = VisionTransformer(CFG).eval()
    with torch.no_grad():  # give post-LN channels very different ranges, as trained ViTs have
        for block in model.blocks:
            block.norm1.weight.mul_(torch.logspace(-1, 1.5, 32)[torch.randperm(32)])
            block.norm2.bias.add_(torch.randn(32) * 3)
    x = torch.randn(8, 1, 16, 16)
    before = model(x)
    stats = reparameterize_layernorms(model, _loader(), alpha=1.0)
    torch.testing.assert_close(model(x), before, atol=1e-4, rtol=1e-4)
    assert stats["blocks.0.norm1"]["max_over_median_before"] > 5
    assert stats["blocks.0.norm1"]["max_over_median_after"] == pytest.approx(1.0, abs=1e-3)
    ranges = channel_ranges(model, _loader(), ["blocks.0.attn.qkv"])  # what norm1 feeds
    lo, hi = ranges["blocks.0.attn.qkv"]
    width = hi - lo
    assert float(width.max() / width.min()) < 1.01


def test_pairs_cover_every_layernorm():
    model = VisionTransformer(CFG)
    norms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert {norm for norm, _ in norm_linear_pairs(model)} == norms


# ------------------------------------------------------------------ GPTQ

def test_gptq_reduces_layer_output_error_vs_round_to_nearest():
    torch.manual_seed(0)
    out_features, in_features = 48, 64
    W = torch.randn(out_features, in_features)
    # correlated inputs with a known Hessian: X = Z A
    A = torch.randn(in_features, in_features) * 0.3 + torch.eye(in_features)
    X = torch.randn(2048, in_features) @ A
    H = 2 * X.T.double() @ X.double() / X.shape[0]
    obs = make_observer("minmax", granularity=PerChannel(0), symmetric=True)
    obs.update(W)
    qp = obs.compute_qparams(4)
    rtn = qp.dequantize(qp.quantize(W))
    gptq = qp.dequantize(gptq_codes(W, H, qp))
    err_rtn = ((X @ (W - rtn).T) ** 2).mean()
    err_gptq = ((X @ (W - gptq).T) ** 2).mean()
    assert err_gptq < 0.8 * err_rtn
    codes = gptq_codes(W, H, qp, act_order=False)
    assert codes.min() >= qp.qmin and codes.max() <= qp.qmax


def test_input_hessians_match_definition():
    torch.manual_seed(0)
    model = VisionTransformer(CFG).eval()
    loader = _loader(16)
    H = input_hessians(model, loader, ["head"])["head"]
    feats = torch.cat([model.forward_features(x)[:, 0] for x, _ in loader]).double()
    torch.testing.assert_close(H, 2 * feats.T @ feats / feats.shape[0])


# ------------------------------------------------------------------ recipes end to end

@pytest.mark.parametrize("recipe", ["minmax", "percentile", "mse", "vit"])
def test_each_recipe_runs_end_to_end(recipe):
    torch.manual_seed(0)
    model = VisionTransformer(CFG).eval()
    qmodel, report = quantize_model(model, make_quant_config(recipe, 4, 4), _loader())
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert math.isfinite(sqnr_db(model(x), qmodel(x)))
    assert report.calibration_time_s > 0


def test_vit_recipe_beats_mse_at_w4a4():
    torch.manual_seed(0)
    model = VisionTransformer(CFG).eval()
    x = torch.randn(64, 1, 16, 16)
    loader = DataLoader(TensorDataset(x, torch.zeros(64)), batch_size=32)
    with torch.no_grad():
        ref = model(x)
        errors = {r: sqnr_db(ref, quantize_model(model, make_quant_config(r, 4, 4), loader)[0](x))
                  for r in ("mse", "vit")}
    assert errors["vit"] > errors["mse"] + 2


def test_softmax_log2_switch():
    cfg = make_quant_config("vit", 4, 4, softmax_method="log2")
    assert cfg.softmax.method == "log2" and cfg.reparam.enabled and cfg.gptq.enabled
    assert make_quant_config("vit", 4, 4).softmax.method == "auto"
    qmodel, _ = quantize_model(VisionTransformer(CFG).eval(), cfg, _loader())
    assert isinstance(qmodel.blocks[0].attn.softmax.output_quantizer.qparams, LogQParams)


def test_vit_quantizes_the_image_at_8_bits_and_everything_else_at_a_bits():
    cfg = make_quant_config("vit", 3, 3)
    assert cfg.image_bits == 8 and make_quant_config("vit", 16, 16).image_bits == 16
    assert make_quant_config("mse", 3, 3).image_bits is None  # the plain recipes: a_bits everywhere
    model = VisionTransformer(CFG).eval()
    qmodel, report = quantize_model(model, make_quant_config("vit", 3, 3, reconstruct={"enabled": False}), _loader())
    conv = qmodel.patch_embed.proj
    assert conv.input_quantizer.bits == 8 and conv.weight_qparams.bits == 3
    assert qmodel.blocks[0].attn.qkv.input_quantizer.bits == 3
    bits = {(row["op"], row["tensor"]): row["bits"] for row in report.layers}
    assert bits[("Conv2d", "image")] == 8 and bits[("Linear", "linear_input")] == 3
    overridden, _ = quantize_model(model, make_quant_config("vit", 3, 3, reconstruct={"enabled": False},
                                                            overrides=[LayerOverride("patch_embed.proj", bits=4)]),
                                   _loader())
    assert overridden.patch_embed.proj.input_quantizer.bits == 4  # an override of the layer wins
