"""What keeps a 224-px run within time and memory: float statistics shared by every bit
depth, the bounded GPTQ Hessian sample, the timings and progress of each step."""

import pytest
import torch

from bvvit.quant import quantize as quantize_module
from bvvit.quant.gptq import input_hessians
from bvvit.quant.input_stats import InputMoments, linear_names
from bvvit.quant.quantize import SharedFloatStatistics, quantize_model
from bvvit.quant.recipes import make_quant_config
from tests.quant.tiny import noise_loader


def _state(qmodel):
    out = {k: v.clone() for k, v in qmodel.state_dict().items()}
    for name, module in qmodel.named_modules():
        qparams = getattr(module, "qparams", None)
        if qparams is not None and hasattr(qparams, "scale"):
            out[f"{name}.qparams.scale"] = qparams.scale.clone()
            out[f"{name}.qparams.zero_point"] = qparams.zero_point.clone()
    return out


def test_shared_float_statistics_give_the_same_models_with_one_float_pass(model, monkeypatch):
    """Every bit depth reuses the reparameterized model and the Hessians of the first: bit-
    identical to computing them per variant, and one float pass gives both."""
    loader = noise_loader(24, 8)
    configs = [make_quant_config("vit", bits, bits, calib_size=24, reconstruct={"enabled": False})
               for bits in (4, 6, 8)]
    alone = [_state(quantize_model(model, cfg, loader)[0]) for cfg in configs]

    passes = {"float statistics": 0, "hessians": 0}
    statistics, hessians = quantize_module.input_statistics, quantize_module.input_hessians

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            passes[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(quantize_module, "input_statistics", counted("float statistics", statistics))
    monkeypatch.setattr(quantize_module, "input_hessians", counted("hessians", hessians))
    shared = SharedFloatStatistics()
    reports = []
    for cfg, expected in zip(configs, alone):
        qmodel, report = quantize_model(model, cfg, loader, shared=shared)
        reports.append(report)
        got = _state(qmodel)
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got)
    # one float pass in all: the LayerNorm ranges and the Hessians' moments together
    assert passes == {"float statistics": 1, "hessians": 0}
    assert [r.timings["float_model_reused"] for r in reports] == [False, True, True]
    assert [r.timings["gptq_hessians_reused"] for r in reports] == [False, True, True]
    for key in ("float_model_s", "convert_s", "gptq_hessians_s", "gptq_s", "calibrate_s", "softmax_grid_s"):
        assert all(r.timings[key] >= 0.0 for r in reports)
    shared.clear()
    assert shared._work is None and not shared._hessians


def test_one_float_pass_gives_the_hessians_of_the_reparameterized_model(model):
    """The Hessians derived from the float pass's centred moments equal those measured on
    the reparameterized model in a second pass (the one the merged pass saves)."""
    loader = noise_loader(16, 8)
    cfg = make_quant_config("vit", 8, 8, calib_size=16)
    shared = SharedFloatStatistics()
    work, _, _ = shared.float_model(model, loader, cfg, "cpu", progress=False)
    names = linear_names(work)
    derived, reused = shared.hessians(work, loader, names, "cpu", cfg.seed, progress=False)
    assert not reused  # first use: computed by this variant's float pass
    measured = input_hessians(work, loader, names)
    assert set(derived) == set(measured) and "blocks.0.attn.qkv" in derived and "head" in derived
    for name in names:  # equal up to the float32 rounding of the reparameterized forward
        scale = float(measured[name].abs().max())
        torch.testing.assert_close(derived[name], measured[name], rtol=0, atol=1e-5 * scale)
    assert shared.hessians(work, loader, names, "cpu", cfg.seed, progress=False)[1]  # then reused


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_centred_moments_give_the_hessian_of_any_channel_affine(dtype):
    """sum x'x'^T of x' = (x - d) / r from the moments of x, even with channel means 1,000x
    the spread (float32 products of a sample stay accurate because they are centred)."""
    torch.manual_seed(0)
    x = torch.randn(3, 500, 24, dtype=torch.float64) + 1000 * torch.randn(24, dtype=torch.float64)
    d, r = 1000 * torch.randn(24), torch.rand(24) + 0.5
    moments = InputMoments.start(x[0].to(dtype))
    for batch in x:
        moments.add(batch.to(dtype))
    xs = ((x.reshape(-1, 24) - d.double()) / r.double())
    expected = 2 * xs.T @ xs / xs.shape[0]
    got = moments.hessian(shift=d, scale=r)
    rel = float((got - expected).norm() / expected.norm())
    assert rel < (1e-12 if dtype == torch.float64 else 1e-6), rel
    plain = InputMoments.start(x[0].to(dtype))
    for batch in x:
        plain.add(batch.to(dtype))
    xs = x.reshape(-1, 24)
    torch.testing.assert_close(plain.hessian(), 2 * xs.T @ xs / xs.shape[0], rtol=1e-6, atol=0)


def test_input_hessians_use_a_bounded_seeded_row_sample(model):
    """Above ``max_rows`` rows (images x tokens) each batch gives a proportional random
    subset; below it every row is used (the demo model's Hessians are unchanged)."""
    loader = noise_loader(16, 8)  # 16 images x 17 tokens = 272 rows per layer
    names = ["blocks.0.mlp.fc1"]
    full = input_hessians(model, loader, names)
    assert torch.equal(full[names[0]], input_hessians(model, loader, names, max_rows=272)[names[0]])
    sampled = input_hessians(model, loader, names, max_rows=64)[names[0]]
    again = input_hessians(model, loader, names, max_rows=64)[names[0]]
    assert torch.equal(sampled, again)
    assert not torch.equal(sampled, full[names[0]])
    # an estimate of the same second moment: close, not equal
    rel = float((sampled - full[names[0]]).norm() / full[names[0]].norm())
    assert rel < 0.5


def test_every_quantization_step_shows_a_progress_bar(model, capsys):
    """LayerNorm ranges, GPTQ Hessians and rounding, calibration and reconstruction each
    draw a bar (tqdm: count, rate and ETA) when asked, none when not."""
    loader = noise_loader(16, 8)
    cfg = make_quant_config("vit", 4, 4, calib_size=16, reconstruct={"enabled": True, "iters": 2})
    quantize_model(model, cfg, loader, progress=True)
    err = capsys.readouterr().err
    for label in ("LayerNorm ranges", "GPTQ Hessians", "GPTQ:", "calibrate", "reconstruct"):
        assert label in err, label
    assert "<" in err  # tqdm's elapsed<remaining
    quantize_model(model, cfg, loader, progress=False)
    assert capsys.readouterr().err == ""
