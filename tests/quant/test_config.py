"""bvvit.quant.config: the bits live in the specs, the techniques are nested options handed as
they are to their modules, one default per setting, one bit-range check, and the flat layout
of earlier versions (packed files, result records) is still read."""

import argparse
import json
from pathlib import Path

import pytest
import torch

from bvvit.errors import ConfigError
from bvvit.quant import quantize as quantize_module
from bvvit.quant.config import (DEFAULT_BITS, DEFAULT_CALIB_SIZE, LayerOverride, QuantConfig, ReconstructOptions,
                                TensorQuantSpec)
from bvvit.quant.primitives import qrange
from bvvit.quant.recipes import DEFAULT_RECIPE, make_quant_config
from bvvit.quant.storage import load_quantized_model
from tests.quant.tiny import noise_loader

DATA = Path(__file__).parent / "data"


def test_the_bits_live_in_the_specs():
    cfg = make_quant_config("mse", 4, 8)
    assert (cfg.weight.bits, cfg.activation.bits, cfg.softmax.bits) == (4, 8, 8)
    assert (cfg.w_bits, cfg.a_bits, cfg.name) == (4, 8, "w4a8")
    assert "w_bits" not in cfg.to_dict()  # nothing that could disagree with the specs
    with pytest.raises(TypeError):
        QuantConfig(w_bits=4)


def test_technique_options_reach_their_module_as_they_are(monkeypatch, model):
    seen = {}

    def reconstruct(float_model, qmodel, loader, options, device, seed, progress=False):
        seen["options"], seen["seed"] = options, seed
        return {}

    monkeypatch.setattr(quantize_module, "reconstruct_model", reconstruct)
    cfg = make_quant_config("vit", 4, 4, reconstruct={"iters": 7, "drop_prob": 0.5}, seed=5)
    quantize_module.quantize_model(model, cfg, noise_loader(16, 8))
    assert seen["options"] is cfg.reconstruct and seen["seed"] == 5
    assert seen["options"] == ReconstructOptions(enabled=True, iters=7, drop_prob=0.5)


def test_one_default_per_setting():
    from bvvit.cli.post_training import build_parser
    from bvvit.ptq.job import PTQJob

    args = build_parser().parse_args(["--model-path", "m.pth"])
    job = PTQJob("m.pth", "out")
    assert args.recipe == job.recipe == DEFAULT_RECIPE == "vit"
    assert args.calib_size == job.calib_size == QuantConfig().calib_size == DEFAULT_CALIB_SIZE == 1024
    assert tuple(args.bits) == DEFAULT_BITS and job.bit_pairs == [(b, b) for b in DEFAULT_BITS]


@pytest.mark.parametrize("make", [
    lambda: TensorQuantSpec(bits=17),
    lambda: make_quant_config("mse", 17, 8),
    lambda: make_quant_config("mse", 8, 1),
    lambda: LayerOverride("head", bits=1),
    lambda: LayerOverride.parse("blocks.0.*=20"),
])
def test_one_bit_range_everywhere(make):
    with pytest.raises(ConfigError, match="must be between 2 and 16, got"):
        make()


def test_the_primitives_use_the_same_bit_range():
    with pytest.raises(ValueError, match="bits must be between 2 and 16, got 17"):  # a programming error
        qrange(17, signed=True)


def test_the_command_line_uses_the_same_bit_range():
    from bvvit.cli.post_training import bits_value

    assert bits_value("16") == 16
    with pytest.raises(argparse.ArgumentTypeError, match="bits must be between 2 and 16, got 17"):
        bits_value("17")


def test_options_round_trip_through_json():
    cfg = make_quant_config("vit-recon", 3, 3, gptq={"damp": 0.05}, reparam={"alpha": 0.5})
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.reconstruct.beta == (20.0, 2.0)


def test_the_flat_layout_of_earlier_versions_is_read():
    """A packed file written before the options were nested (the code of commit 42ffccf,
    tests/quant/data/) reloads with its config and computes the logits it computed then."""
    record = json.loads((DATA / "w4a8_flat_config.json").read_text())
    expected = make_quant_config("vit", 4, 8, softmax_method="uniform", image_bits=None, softmax_renorm=False,
                                 gptq={"damp": 0.02},
                                 reconstruct={"enabled": True, "iters": 5, "drop_prob": 0.25}, calib_size=16, seed=3)
    assert "gptq_damp" in record["quant_config"] and QuantConfig.from_dict(record["quant_config"]) == expected
    qmodel, meta = load_quantized_model(DATA / "w4a8_flat_config.safetensors")
    assert QuantConfig.from_dict(meta["quant_config"]) == expected
    images = torch.randn(record["images_shape"], generator=torch.Generator().manual_seed(record["images_seed"]))
    with torch.no_grad():
        torch.testing.assert_close(qmodel(images), torch.tensor(record["logits"]), rtol=0, atol=1e-6)


def test_softmax_renorm_must_be_a_bool_and_defaults_off_in_older_files():
    with pytest.raises(ConfigError, match="softmax_renorm must be true or false"):
        make_quant_config("vit", 3, 3, softmax_renorm=1)
    stored = make_quant_config("vit", 3, 3).to_dict()
    del stored["softmax_renorm"]  # written before the option: its softmax was not renormalized
    assert not QuantConfig.from_dict(stored).softmax_renorm


def test_flat_bits_overrode_the_specs_and_still_do():
    """In the flat layout w_bits/a_bits won over the specs' own bits; reading keeps that."""
    flat = {"recipe": "mse", "w_bits": 4, "a_bits": 6, "weight": {"bits": 8, "symmetric": True},
            "activation": {"bits": 8}, "softmax": {"bits": 8}, "gptq": False, "reconstruct": False}
    cfg = QuantConfig.from_dict(flat)
    assert (cfg.weight.bits, cfg.activation.bits, cfg.softmax.bits) == (4, 6, 6)
    assert not cfg.gptq.enabled and not cfg.reconstruct.enabled
