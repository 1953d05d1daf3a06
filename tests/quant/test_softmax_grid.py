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
        if bits < 8:
            assert set(record["errors"]) == {"uniform", "log2", "log-sqrt2", "log-2^(1/4)", "log-2^(1/8)",
                                             "log-2^(1/16)"}
        else:  # uniform grids only, of 15 ranges
            assert set(record["errors"]) == {"uniform"} | {f"uniform@{j}" for j in range(-2, 13) if j}
        assert record["candidate"] == min(record["errors"], key=record["errors"].get)
        assert record["choice"] == record["candidate"].split("@")[0]
    assert expected in {record["choice"] for record in chosen.values()}
    for quantizer, record in zip(_softmax_quantizers(qmodel), chosen.values()):
        uses_log = isinstance(quantizer.qparams, LogQParams)
        assert uses_log == (record["choice"] != "uniform")
        assert quantizer.spec.method == ("log2" if uses_log else "uniform")  # the spec names the grid used
    methods = {row["method"] for row in report.layers if row["tensor"] == "softmax"}
    assert "auto" not in methods


def _sharp_65_tokens():
    """The tiny model at patch 2 (64 patches + class token), attention sharpened 8x."""
    import dataclasses

    from bvvit.model import VisionTransformer
    from tests.quant.tiny import QUANT_CFG
    torch.manual_seed(0)
    return _sharpened(VisionTransformer(dataclasses.replace(QUANT_CFG, patch_size=2)).eval(), 8.0)


def test_finer_log_grids_win_where_many_probabilities_are_small():
    """65 tokens, sharp attention, 6 bits: a log grid with 8 levels per octave has a lower
    attn @ v error than uniform, log2 and log-sqrt2 in every block, and is the one used."""
    qmodel, report = quantize_model(_sharp_65_tokens(), make_quant_config("mse", 6, 6, softmax_method="auto"),
                                    noise_loader(32, 16))
    for quantizer, record in zip(_softmax_quantizers(qmodel), report.extras["softmax_grids"].values()):
        errors = record["errors"]
        assert record["choice"] == "log-2^(1/8)"
        assert errors["log-2^(1/8)"] < 0.7 * min(errors["uniform"], errors["log2"], errors["log-sqrt2"])
        assert isinstance(quantizer.qparams, LogQParams) and quantizer.qparams.steps_per_octave == 8


def test_from_8_bits_the_choice_is_a_uniform_range_so_w8a8_exports():
    """A log softmax grid at 8 bits cannot be exported to ONNX int8 (shown with log2 forced).
    From 8 bits the choice is among uniform grids only: it keeps the calibrated scale times
    the recorded factor (the zero point unchanged), of the lowest error of its 15 ranges,
    and the W8A8 model exports."""
    from bvvit.quant.export import unsupported_for_int8
    model, loader = _sharp_65_tokens(), noise_loader(32, 16)
    log_model, _ = quantize_model(model, make_quant_config("mse", 8, 8, softmax_method="log2"), loader)
    assert any("softmax" in problem for problem in unsupported_for_int8(log_model))
    calibrated, _ = quantize_model(model, make_quant_config("vit", 8, 8, softmax_method="uniform"), loader)
    qmodel, report = quantize_model(model, make_quant_config("vit", 8, 8), loader)
    records = report.extras["softmax_grids"]
    for q, plain, record in zip(_softmax_quantizers(qmodel), _softmax_quantizers(calibrated), records.values()):
        assert record["choice"] == "uniform" and q.spec.method == "uniform"
        assert not isinstance(q.qparams, LogQParams)
        assert record["errors"][record["candidate"]] <= record["errors"]["uniform"]
        assert torch.allclose(q.qparams.scale, plain.qparams.scale * record["scale_factor"])
        assert torch.equal(q.qparams.zero_point, plain.qparams.zero_point)
    assert unsupported_for_int8(qmodel) == []


def test_from_8_bits_a_too_wide_uniform_range_is_narrowed():
    """A softmax whose calibrated range is 4x too wide (at 8 bits) gets back a scale about a
    quarter of it (the range search spans 2^(-12/4) .. 2^(2/4)), with a lower error."""
    import dataclasses

    from bvvit.quant.softmax_grid import choose_softmax_grids
    loader = noise_loader(32, 16)
    qmodel, _ = quantize_model(_sharp_65_tokens(), make_quant_config("mse", 8, 8), loader)  # uniform, calibrated
    calibrated = [q.qparams.scale.clone() for q in _softmax_quantizers(qmodel)]
    for q in _softmax_quantizers(qmodel):
        q.set_qparams(dataclasses.replace(q.qparams, scale=q.qparams.scale * 4))
    records = choose_softmax_grids(qmodel, loader)
    for q, scale, record in zip(_softmax_quantizers(qmodel), calibrated, records.values()):
        assert record["choice"] == "uniform" and 2 ** -2.5 <= record["scale_factor"] <= 2 ** -1.5
        assert record["errors"][record["candidate"]] < 0.5 * record["errors"]["uniform"]
        assert torch.allclose(q.qparams.scale, scale * 4 * record["scale_factor"])


def _errors_by_definition(qmodel, loader, max_images):
    """Every softmax's relative attn @ v error per grid, from P and v of all images held at once."""
    from bvvit.quant.softmax_grid import SOFTMAX_GRIDS, grid_qparams
    samples, pending, handles = {}, {}, []
    for i, block in enumerate(qmodel.blocks):
        name = f"blocks.{i}.attn.softmax"
        handles.append(block.attn.softmax.register_forward_hook(
            lambda m, inp, out, name=name: pending.__setitem__(name, inp[0].softmax(dim=m.dim))))
        handles.append(block.attn.matmul_av.register_forward_hook(
            lambda m, inp, out, name=name: samples.setdefault(name, []).append(
                (pending.pop(name), m.quantizer_b(inp[1]) if getattr(m, "quantizer_b", None) else inp[1]))))
    seen = 0
    with torch.no_grad():
        for images, _ in loader:
            if seen >= max_images:
                break
            qmodel(images[:max_images - seen])
            seen += len(images[:max_images - seen])
    for handle in handles:
        handle.remove()
    out = {}
    for i, block in enumerate(qmodel.blocks):
        name, pairs = f"blocks.{i}.attn.softmax", samples[f"blocks.{i}.attn.softmax"]
        p_max = max(float(p.max()) for p, _ in pairs)
        reference = sum(float((p @ v).pow(2).sum()) for p, v in pairs)
        out[name] = {grid: sum(float((grid_qparams(block.attn.softmax.output_quantizer, grid, p_max)
                                      .fake_quantize(p) @ v - p @ v).pow(2).sum()) for p, v in pairs) / reference
                     for grid in SOFTMAX_GRIDS}
    return out


def test_streamed_errors_equal_the_definition_over_several_batches(model):
    """The choice holds one block's probabilities at a time; its errors equal those computed
    from every image's P and v held at once (40 of 48 images: three batches, the last cut)."""
    from bvvit.quant.softmax_grid import choose_softmax_grids
    cfg = make_quant_config("mse", 4, 4)  # uniform softmax grid: calibrated, not yet chosen
    loader = noise_loader(48, 16)
    qmodel, _ = quantize_model(_sharpened(model, 10.0), cfg, loader)
    expected = _errors_by_definition(qmodel, loader, 40)
    chosen = choose_softmax_grids(qmodel, loader, max_images=40)
    assert set(chosen) == set(expected)
    for name, record in chosen.items():
        assert record["errors"] == pytest.approx(expected[name], rel=1e-12)
        assert record["choice"] == min(expected[name], key=expected[name].get)


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


def _attention_rows(qmodel, loader):
    """Per block: the float probabilities P (softmax of the quantized scores), what the
    softmax module hands to attn @ v, and the quantized v it multiplies."""
    rows = {i: {"p": [], "out": [], "v": []} for i in range(len(qmodel.blocks))}
    hooks = []
    for i, block in enumerate(qmodel.blocks):
        def on_softmax(module, inputs, output, i=i):
            rows[i]["p"].append(inputs[0].softmax(dim=module.dim))
            rows[i]["out"].append(output)

        def on_av(module, inputs, output, i=i):
            rows[i]["v"].append(module.quantizer_b(inputs[1]))
        hooks += [block.attn.softmax.register_forward_hook(on_softmax),
                  block.attn.matmul_av.register_forward_hook(on_av)]
    with torch.no_grad():
        for images, _ in loader:
            qmodel(images)
    for hook in hooks:
        hook.remove()
    return {i: {key: torch.cat(values) for key, values in row.items()} for i, row in rows.items()}


def test_renormalized_rows_sum_to_one_and_the_grid_choice_measures_them(model):
    """With ``softmax_renorm`` every quantized row of attention probabilities is rescaled to
    sum to 1, and the error the grid choice records for the grid it keeps is the relative
    attn @ v error of what the module computes (the renormalized rows). Without it the
    rounded rows do not sum to 1."""
    loader = noise_loader(32, 16)
    sharp = _sharpened(model, 4.0)
    for renorm in (True, False):
        cfg = make_quant_config("mse", 3, 3, softmax_method="auto", softmax_renorm=renorm)
        qmodel, report = quantize_model(sharp, cfg, loader)
        rows = _attention_rows(qmodel, loader)
        for i, record in enumerate(report.extras["softmax_grids"].values()):
            assert qmodel.blocks[i].attn.softmax.renormalize is renorm
            p, out, v = rows[i]["p"], rows[i]["out"], rows[i]["v"]
            sums = out.sum(-1)
            if renorm:
                assert torch.all(((sums - 1).abs() < 1e-5) | (sums == 0))
            else:
                assert (sums - 1).abs().max() > 1e-2
            error = float((out @ v - p @ v).pow(2).sum() / (p @ v).pow(2).sum())
            assert error == pytest.approx(record["errors"][record["candidate"]], rel=1e-4)


def test_renormalization_is_the_vit_recipes_below_8_bits_and_survives_the_file(model, tmp_path):
    """The vit recipes renormalize the softmax below 8 bits only (8-bit attention stays the
    int8 runtimes' uniform uint8 probabilities), per block (an override to 8 bits turns it
    off there); the naive baseline does not; the packed file reloads it."""
    def flags(qmodel):
        return [block.attn.softmax.renormalize for block in qmodel.blocks]
    from bvvit.quant.config import LayerOverride
    from bvvit.quant.quantize import convert
    assert flags(convert(model, make_quant_config("vit", 3, 3))[0]) == [True, True]
    assert flags(convert(model, make_quant_config("vit-recon", 6, 6))[0]) == [True, True]
    assert flags(convert(model, make_quant_config("vit", 8, 8))[0]) == [False, False]
    assert flags(convert(model, make_quant_config("minmax", 3, 3))[0]) == [False, False]
    override = [LayerOverride("blocks.0.attn.softmax", 8)]
    assert flags(convert(model, make_quant_config("vit", 4, 4, overrides=override))[0]) == [False, True]
    cfg = make_quant_config("vit", 4, 4, reconstruct={"enabled": False})
    qmodel, report = quantize_model(model, cfg, noise_loader(32, 16))
    save_quantized_model(tmp_path / "q.safetensors", qmodel, cfg, loaded_model(model), report)
    reloaded, _ = load_quantized_model(tmp_path / "q.safetensors")
    assert flags(reloaded) == [True, True]
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
