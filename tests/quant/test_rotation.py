"""The residual-stream rotation: orthogonal, keeps the all-ones vector, and the rotated float
model computes the original logits (<= 1e-4) for widths that are powers of two and not."""

import copy

import pytest
import torch

from bvvit.config import ModelConfig
from bvvit.model import VisionTransformer
from bvvit.quant.rotation import hadamard_matrix, ones_preserving_rotation, rotate_model


@pytest.mark.parametrize("d", [1, 2, 8, 12, 20, 24, 96, 128, 192, 384, 768])
def test_hadamard_matrices_of_the_widths_vits_use(d):
    h = hadamard_matrix(d)
    assert h is not None and torch.equal(h.abs(), torch.ones(d, d, dtype=torch.float64))
    assert torch.allclose(h @ h.T, d * torch.eye(d, dtype=torch.float64))


@pytest.mark.parametrize("d", [8, 96, 100, 128, 384])
def test_rotation_is_orthogonal_and_keeps_the_ones_vector(d):
    q, kind = ones_preserving_rotation(d, seed=3)
    assert kind.startswith("hadamard") == (hadamard_matrix(d) is not None)
    assert torch.allclose(q @ q.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(q @ torch.ones(d, dtype=torch.float64), torch.ones(d, dtype=torch.float64), atol=1e-12)
    assert not torch.allclose(q, torch.eye(d, dtype=torch.float64))  # it does rotate


def _random_vit(embed_dim: int, num_heads: int) -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(ModelConfig(img_size=16, patch_size=4, num_classes=5, embed_dim=embed_dim,
                                          depth=2, num_heads=num_heads)).eval()
    with torch.no_grad():  # LayerNorm affines, tokens and outliers far from the identity init
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_(0.0, 0.3)
        model.cls_token.normal_()
        model.pos_embed.normal_()
        model.blocks[0].mlp.fc2.bias[3] = 20.0  # an outlier channel in the residual stream
    return model


@pytest.mark.parametrize("embed_dim,num_heads", [(32, 2), (96, 3), (100, 4), (192, 3)])
def test_rotated_model_computes_the_same_logits(embed_dim, num_heads):
    model = _random_vit(embed_dim, num_heads)
    rotated = copy.deepcopy(model)
    info = rotate_model(rotated, seed=0)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert (rotated(x) - model(x)).abs().max() <= 1e-4
    assert info["dim"] == embed_dim
    assert rotated.blocks[0].norm1.weight.eq(1).all() and rotated.blocks[0].norm1.bias.eq(0).all()
    assert not torch.allclose(rotated.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_rotation_spreads_an_outlier_channel():
    model = _random_vit(32, 2)
    rotated = copy.deepcopy(model)
    rotate_model(rotated)
    bias, rotated_bias = model.blocks[0].mlp.fc2.bias, rotated.blocks[0].mlp.fc2.bias
    assert bias.abs().max() / bias.abs().median() > 50
    assert rotated_bias.abs().max() / rotated_bias.abs().median() < 10


# ------------------------------------------------------------------ as a step of quantize_model

def test_rotation_runs_first_and_is_reported(model):
    from bvvit.quant.quantize import quantize_model
    from bvvit.quant.recipes import make_quant_config
    from tests.quant.tiny import noise_loader
    calib = noise_loader(32, 16)
    cfg = make_quant_config("vit", 8, 8, rotation={"enabled": True, "seed": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, report = quantize_model(model, cfg, calib)
    assert report.extras["rotation"] == {"dim": 32, "construction": "hadamard", "seed": 1}
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    assert not torch.allclose(qmodel.cls_token, model.cls_token)  # the stream is rotated
    plain, _ = quantize_model(model, make_quant_config("vit", 8, 8), calib)
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        reference = model(x)
        rotated_error = (qmodel(x) - reference).pow(2).mean()
        plain_error = (plain(x) - reference).pow(2).mean()
    assert rotated_error < 4 * plain_error  # W8A8 stays as close to float with the rotation


def test_rotated_packed_file_reloads_bit_for_bit(model, tmp_path):
    from bvvit.quant.quantize import quantize_model
    from bvvit.quant.recipes import make_quant_config
    from bvvit.quant.storage import load_quantized_model, save_quantized_model
    from tests.quant.tiny import loaded_model, noise_loader
    cfg = make_quant_config("mse", 4, 4, rotation={"enabled": True})
    qmodel, report = quantize_model(model, cfg, noise_loader(32, 16))
    save_quantized_model(tmp_path / "q.safetensors", qmodel, cfg, loaded_model(model), report)
    reloaded, meta = load_quantized_model(tmp_path / "q.safetensors")
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(qmodel(x), reloaded(x))
    assert meta["quant_config"]["rotation"]["enabled"] is True


def test_rotation_options_are_validated():
    from bvvit.errors import ConfigError
    from bvvit.quant.config import RotationOptions
    for bad in ({"enabled": "yes"}, {"seed": -1}, {"seed": 1.5}):
        with pytest.raises(ConfigError, match="rotation"):
            RotationOptions(**bad)
