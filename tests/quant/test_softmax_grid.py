"""The softmax grid chosen per block by calibration error (``method="auto"``)."""

import copy

import pytest
import torch

from bvvit.quant.log2 import LogQParams
from bvvit.quant.quantize import quantize_model
from bvvit.quant.recipes import make_quant_config
from bvvit.quant.softmax_grid import grid_summary
from bvvit.quant.storage import load_quantized_model, save_quantized_model
from tests.quant.tiny import loaded_model, noise_loader


def _softmax_quantizers(qmodel):
    return [block.attn.softmax.output_quantizer for block in qmodel.blocks]


def _sharpened(model, factor):
    """``model`` with q and k scaled by ``factor``: sharp attention (a few large probabilities,
    many tiny ones: where log grids win at low bits)."""
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        for block in sharp.blocks:
            block.attn.qkv.weight[:2 * block.attn.qkv.in_features] *= factor
    return sharp


@pytest.mark.parametrize("bits,factor,expected", [(8, 1.0, "uniform"), (3, 50.0, "log2")])
def test_auto_picks_the_grid_with_the_lowest_attention_error(model, bits, factor, expected):
    model = _sharpened(model, factor)
    cfg = make_quant_config("mse", bits, bits, softmax_method="auto")
    qmodel, report = quantize_model(model, cfg, noise_loader(32, 16))
    chosen = report.extras["softmax_grids"]
    assert set(chosen) == {f"blocks.{i}.attn.softmax" for i in range(len(model.blocks))}
    for record in chosen.values():
        assert set(record["errors"]) == {"uniform", "log2", "log-sqrt2"}
        assert record["choice"] == min(record["errors"], key=record["errors"].get)
    assert expected in {record["choice"] for record in chosen.values()}
    for quantizer, record in zip(_softmax_quantizers(qmodel), chosen.values()):
        uses_log = isinstance(quantizer.qparams, LogQParams)
        assert uses_log == (record["choice"] != "uniform")
        assert quantizer.spec.method == ("log2" if uses_log else "uniform")  # the spec names the grid used
    methods = {row["method"] for row in report.layers if row["tensor"] == "softmax"}
    assert "auto" not in methods


def test_chosen_grids_survive_the_packed_file(model, tmp_path):
    cfg = make_quant_config("mse", 3, 3, softmax_method="auto")
    qmodel, report = quantize_model(model, cfg, noise_loader(32, 16))
    save_quantized_model(tmp_path / "q.safetensors", qmodel, cfg, loaded_model(model), report)
    reloaded, _ = load_quantized_model(tmp_path / "q.safetensors")
    for saved, loaded in zip(_softmax_quantizers(qmodel), _softmax_quantizers(reloaded)):
        assert type(saved.qparams) is type(loaded.qparams) and saved.spec.method == loaded.spec.method
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(qmodel(x), reloaded(x))


def test_summary_word():
    assert grid_summary({"a": {"choice": "log2"}, "b": {"choice": "log2"}}) == "log2"
    assert grid_summary({"a": {"choice": "log2"}, "b": {"choice": "uniform"},
                         "c": {"choice": "uniform"}}) == "mixed (log2 x1, uniform x2)"


def test_summary_row_names_the_grid(model):
    from bvvit.ptq.summary import SUMMARY_COLUMNS, softmax_grid_of
    from bvvit.ptq.variants import Variant
    cfg = make_quant_config("vit", 8, 8)
    _, report = quantize_model(model, cfg, noise_loader(32, 16))
    assert "softmax_grid" in SUMMARY_COLUMNS
    assert softmax_grid_of(Variant("w8a8", model, cfg, {}, report.to_dict())) == "uniform"
    plain = make_quant_config("mse", 8, 8)
    assert softmax_grid_of(Variant("w8a8-mse", model, plain, {}, {})) == "uniform"
    assert softmax_grid_of(Variant("fp32", model, None, {}, {})) is None
