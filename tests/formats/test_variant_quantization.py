"""Quantization, packed files and ONNX export of the imported architecture variants: two
prefix tokens and a second head (DeiT distilled), average pooling with fc_norm."""

import copy

import pytest
import torch

from bvvit.config import ModelConfig, Preprocessing
from bvvit.metrics import sqnr_db
from bvvit.model import VisionTransformer
from bvvit.model_file import LoadedModel
from bvvit.quant.export import export_float_onnx, export_qdq_onnx
from bvvit.quant.modules import QuantLinear
from bvvit.quant.quantize import quantize_model
from bvvit.quant.recipes import make_quant_config
from bvvit.quant.reparam import reparameterize_layernorms
from bvvit.quant.storage import load_quantized_model, save_quantized_model
from bvvit.runtime.onnxruntime import make_session, run_session
from tests.quant.tiny import noise_loader

BASE = dict(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2, num_heads=2)
VARIANTS = {"distilled": dict(dist_token=True, head_dist=True),
            "avg_fc_norm": dict(global_pool="avg", fc_norm=True),
            "avg_no_class_token": dict(global_pool="avg", class_token=False)}


def _model(fields):
    torch.manual_seed(0)
    model = VisionTransformer(ModelConfig(**BASE, **fields)).eval()
    with torch.no_grad():  # norms and tokens away from their init, so every path matters
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


def _logits(model, loader):
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in loader])


@pytest.fixture(scope="module")
def calib():
    return noise_loader(32, batch_size=16)


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=VARIANTS.keys())
def test_layernorm_reparameterization_stays_exact(fields, calib):
    """The final norm feeds head and head_dist (or fc_norm feeds the head): folding it must
    keep the float function."""
    model = _model(fields)
    folded = copy.deepcopy(model)
    reparameterize_layernorms(folded, calib)
    torch.testing.assert_close(_logits(folded, calib), _logits(model, calib), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=VARIANTS.keys())
def test_vit_recipe_with_reconstruction_quantizes_every_variant(fields, calib):
    model = _model(fields)
    cfg = make_quant_config("vit-recon", 8, 8, calib_size=32, reconstruct={"iters": 2})
    qmodel, _ = quantize_model(model, cfg, calib)
    assert sqnr_db(_logits(model, calib), _logits(qmodel, calib)) > 20


def test_head_dist_is_quantized_like_head(calib):
    model = _model(VARIANTS["distilled"])
    qmodel, _ = quantize_model(model, make_quant_config("mse", 8, 8), calib)
    assert isinstance(qmodel.head, QuantLinear) and isinstance(qmodel.head_dist, QuantLinear)
    float_head, _ = quantize_model(model, make_quant_config("mse", 8, 8, head=False), calib)
    assert not isinstance(float_head.head_dist, QuantLinear) and not isinstance(float_head.head, QuantLinear)


@pytest.mark.parametrize("name", ["distilled", "avg_fc_norm"])
def test_packed_file_and_onnx_keep_the_variant(tmp_path, name, calib):
    model = _model(VARIANTS[name])
    qmodel, _ = quantize_model(model, make_quant_config("mse", 8, 8), calib)
    pre = Preprocessing(img_size=16, crop_mode="squash")
    loaded = LoadedModel(model, model.config, [f"c{i}" for i in range(5)], pre)
    save_quantized_model(tmp_path / "q.safetensors", qmodel, make_quant_config("mse", 8, 8), loaded)
    back, meta = load_quantized_model(tmp_path / "q.safetensors")
    torch.testing.assert_close(_logits(back, calib), _logits(qmodel, calib))
    assert meta["preprocessing"]["crop_mode"] == "squash"
    x = next(iter(calib))[0]
    fp32 = make_session(export_float_onnx(model, tmp_path / "fp32.onnx", pre, loaded.class_names), threads=1)
    assert abs(run_session(fp32, x) - _logits(model, [(x, None)]).numpy()).max() < 1e-4
    for attention in ("int8", "fused"):
        path = export_qdq_onnx(qmodel, tmp_path / f"{attention}.onnx", pre, loaded.class_names,
                               attention=attention)
        ort = torch.from_numpy(run_session(make_session(path, threads=1), x))
        assert sqnr_db(_logits(qmodel, [(x, None)]), ort) > 25


@pytest.mark.parametrize("fields", VARIANTS.values(), ids=VARIANTS.keys())
def test_residual_rotation_keeps_every_variant_exact(fields, calib):
    """--rotate folds the final norm into every head it feeds and rotates every prefix token."""
    from bvvit.quant.rotation import rotate_model
    model = _model(fields)
    rotated = copy.deepcopy(model)
    rotate_model(rotated, seed=0)
    torch.testing.assert_close(_logits(rotated, calib), _logits(model, calib), atol=1e-4, rtol=1e-4)
