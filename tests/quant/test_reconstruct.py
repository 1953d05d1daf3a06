"""Block-wise reconstruction (bvvit/quant/reconstruct.py): it lowers the block error it
optimises, leaves an ordinary quantized model (integer codes in range, bit-exact packed
files), is deterministic, and runs through quantize_model as a recipe and a switch."""

import json

import pytest
import torch

from bvvit.errors import ConfigError
from bvvit.metrics import sqnr_db
from bvvit.model import VisionTransformer
from bvvit.quant.config import QuantConfig, ReconstructOptions
from bvvit.quant.log2 import LogQParams
from bvvit.quant.modules import act_quantizers, weight_modules
from bvvit.quant.quantize import calibrate, prepare, quantize_model
from bvvit.quant.reconstruct import (model_units, reconstruct_model,
                                     reconstruct_unit, unit_error)
from bvvit.quant.recipes import make_quant_config
from bvvit.quant.storage import load_quantized_model, save_quantized_model
from tests.quant.tiny import QUANT_CFG, loaded_model, noise_loader

ITERS = 60


@pytest.fixture(scope="module")
def calib():
    return noise_loader(64, batch_size=32)


def _calibrated(model, calib, recipe="vit", bits=3):
    work, qmodel, _, _ = prepare(model, make_quant_config(recipe, bits, bits), calib)
    calibrate(qmodel, calib)
    return work, qmodel


def _block0_data(model, calib, recipe, bits=3):
    """A calibrated model and its first block's quantized / float inputs and float target."""
    work, qmodel = _calibrated(model, calib, recipe, bits=bits)
    images = torch.cat([x for x, _ in calib])
    with torch.no_grad():
        f_in = dict(model_units(work))["embed"](images)
        q_in = dict(model_units(qmodel))["embed"](images)
        target = work.blocks[0](f_in)
    return work, qmodel, q_in, f_in, target


def _state(qmodel):
    codes = {name: m.weight_codes.clone() for name, m in weight_modules(qmodel)}
    scales = {name: q.qparams.scale.clone() for name, q in act_quantizers(qmodel)}
    return codes, scales


@pytest.mark.parametrize("drop_prob", [0.0, 0.5])
def test_reconstruction_lowers_the_block_error(model, calib, drop_prob):
    work, qmodel, q_in, f_in, target = _block0_data(model, calib, "mse")
    before = unit_error(qmodel.blocks[0], q_in, target)
    stats = reconstruct_unit(qmodel.blocks[0], work.blocks[0], q_in, f_in, target,
                             ReconstructOptions(iters=150, drop_prob=drop_prob),
                             torch.Generator().manual_seed(0))
    after = unit_error(qmodel.blocks[0], q_in, target)
    assert stats["error_before"] == pytest.approx(before) and stats["error_after"] == pytest.approx(after)
    assert after < 0.85 * before, (before, after)  # measured: 0.74 (p=0), 0.80 (p=0.5)
    assert stats["codes_changed"] > 0


def test_learned_weight_step_sizes_lower_the_error_and_stay_storable(model, calib):
    """With ``learn_weight_scale`` the weight scales are learned with the rounding: the
    block's error ends lower than with the scales fixed (same steps, same seed), and the new
    scales are bfloat16 values (what files store), the forward weight exactly their
    dequantized codes."""
    errors, scales = {}, {}
    for learn in (False, True):
        work, qmodel, q_in, f_in, target = _block0_data(model, calib, "vit")
        start = {name: m.weight_qparams.scale.clone() for name, m in weight_modules(qmodel.blocks[0])}
        stats = reconstruct_unit(qmodel.blocks[0], work.blocks[0], q_in, f_in, target,
                                 ReconstructOptions(iters=150, learn_weight_scale=learn),
                                 torch.Generator().manual_seed(0))
        assert not stats["reverted"]
        errors[learn] = unit_error(qmodel.blocks[0], q_in, target)
        scales[learn] = {name: (start[name], m.weight_qparams.scale) for name, m in weight_modules(qmodel.blocks[0])}
        for name, m in weight_modules(qmodel.blocks[0]):
            c = m.weight_codes.reshape(m.weight_codes.shape[0], -1).to(torch.int32)
            assert torch.equal(m.weight, m.weight_qparams.dequantize(c).reshape(m.weight.shape)), name
    assert all(torch.equal(a, b) for a, b in scales[False].values())  # fixed unless asked
    for name, (a, b) in scales[True].items():
        assert not torch.equal(a, b), name
        assert torch.equal(b, b.to(torch.bfloat16).float()), name
    assert errors[True] < 0.97 * errors[False], errors  # measured: 0.0082 against 0.0087


def test_codes_stay_integers_in_range_and_the_file_reloads_bit_for_bit(model, calib, tmp_path):
    cfg = make_quant_config("vit-recon", 3, 3, reconstruct={"iters": ITERS})
    qmodel, report = quantize_model(model, cfg, calib)
    _, start = _calibrated(model, calib, "vit", 3)
    codes, scales = _state(start)
    changed_codes = changed_scales = 0
    for name, module in weight_modules(qmodel):
        c = module.weight_codes
        assert not c.is_floating_point()
        qp = module.weight_qparams
        assert int(c.min()) >= qp.qmin and int(c.max()) <= qp.qmax, name
        assert torch.equal(module.weight, qp.dequantize(c.reshape(c.shape[0], -1).to(torch.int32))
                           .reshape(c.shape)), name  # forward uses exactly the stored codes
        changed_codes += int((c != codes[name]).sum())
    for name, quantizer in act_quantizers(qmodel):
        assert quantizer.qparams.scale.dtype == torch.float32 and quantizer.state == "quantize"
        changed_scales += int(not torch.equal(quantizer.qparams.scale, scales[name]))
    assert changed_codes > 0 and changed_scales > 0  # it did something
    loaded = loaded_model(model)
    save_quantized_model(tmp_path / "q.safetensors", qmodel, cfg, loaded, report)
    reloaded, meta = load_quantized_model(tmp_path / "q.safetensors")
    images = torch.randn(8, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(qmodel(images), reloaded(images))
    assert meta["quant_config"]["reconstruct"]["enabled"] is True
    for name, module in weight_modules(reloaded):
        assert torch.equal(module.weight_codes.to(torch.int32),
                           qmodel.get_submodule(name).weight_codes.to(torch.int32)), name


def test_deterministic_with_a_fixed_seed(model, calib):
    results = []
    for seed in (0, 0, 1):
        work, qmodel = _calibrated(model, calib)
        reconstruct_model(work, qmodel, calib, ReconstructOptions(iters=ITERS // 2), seed=seed)
        results.append(_state(qmodel))
    (codes_a, scales_a), (codes_b, scales_b), (codes_c, _) = results
    assert all(torch.equal(codes_a[k], codes_b[k]) for k in codes_a)
    assert all(torch.equal(scales_a[k], scales_b[k]) for k in scales_a)
    assert any(not torch.equal(codes_a[k], codes_c[k]) for k in codes_a)  # the seed matters


def test_recipe_runs_end_to_end_and_beats_vit_on_its_calibration_data(model, calib):
    images = torch.cat([x for x, _ in calib])
    vit, _ = quantize_model(model, make_quant_config("vit", 3, 3, reconstruct={"enabled": False}), calib)
    cfg = make_quant_config("vit-recon", 3, 3, reconstruct={"iters": ITERS})
    recon, report = quantize_model(model, cfg, calib)
    stats = report.extras["reconstruct"]
    assert list(stats["units"]) == ["embed", "blocks.0", "blocks.1", "head"]
    assert stats["time_s"] > 0 and stats["images"] == 64 and stats["iters"] == ITERS
    json.dumps(report.to_dict())  # the report stays JSON
    assert not report.warnings
    with torch.no_grad():
        ref = model(images)
        assert sqnr_db(ref, recon(images)) > sqnr_db(ref, vit(images))
    # the switch on any recipe is the same as the recipe
    assert make_quant_config("vit", 6, 6, reconstruct={"enabled": True}).to_dict() == \
        {**make_quant_config("vit-recon", 6, 6).to_dict(), "recipe": "vit"}
    # vit itself reconstructs when weights or activations have <= 4 bits, and only then
    assert make_quant_config("vit", 4, 8).reconstruct.enabled and make_quant_config("vit", 8, 3).reconstruct.enabled
    assert not make_quant_config("vit", 6, 6).reconstruct.enabled
    # with 100 steps per unit at 4 bits and 300 at <= 3 bits; an explicit count wins
    assert [make_quant_config(r, w, a).reconstruct.iters for r in ("vit", "vit-recon")
            for w, a in ((4, 4), (4, 8), (3, 3), (8, 3), (6, 6))] == [100, 100, 300, 300, 100] * 2
    assert make_quant_config("vit", 3, 3, reconstruct={"iters": 40}).reconstruct.iters == 40
    # weight step sizes are learned only when asked (--learn-weight-scales)
    assert not any(make_quant_config(r, w, a).reconstruct.learn_weight_scale for r in ("vit", "vit-recon")
                   for w, a in ((3, 3), (4, 4), (6, 6)))


def test_log2_softmax_and_no_grad_callers_are_fine(model, calib):
    cfg = make_quant_config("vit-recon", 4, 4, softmax_method="log2", reconstruct={"iters": 10})
    with torch.no_grad():  # evaluation code often quantizes under no_grad
        qmodel, report = quantize_model(model, cfg, calib)
    softmax = [q for name, q in act_quantizers(qmodel) if q.kind == "softmax"]
    assert softmax and all(isinstance(q.qparams, LogQParams) for q in softmax)  # kept, not learned
    assert "blocks.1" in report.extras["reconstruct"]["units"]


def test_config_validates_and_round_trips():
    cfg = make_quant_config("vit-recon", 4, 4, reconstruct={"iters": 50, "drop_prob": 0.25})
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.reconstruct.enabled and again.reconstruct.iters == 50
    assert not make_quant_config("vit", 8, 8).reconstruct.enabled
    for bad in ({"iters": 0}, {"iters": 2.5}, {"drop_prob": 1.0}, {"drop_prob": -0.1}, {"enabled": "yes"},
                {"learn_weight_scale": 1}, {"weight_scale_lr": 0.0}, {"weight_lr": float("nan")}, {"act_lr": -1e-3}):
        with pytest.raises(ConfigError):
            make_quant_config("vit-recon", 4, 4, reconstruct=bad)
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(VisionTransformer(QUANT_CFG), make_quant_config("vit-recon", 4, 4), None)


def test_cli_flag_maps_to_the_switch():
    from bvvit.cli.post_training import build_parser

    args = build_parser().parse_args(["--model-path", "m.pth", "--reconstruct", "--recipe", "vit-recon"])
    assert args.reconstruct and args.recipe == "vit-recon"
    assert not build_parser().parse_args(["--model-path", "m.pth"]).reconstruct


# ------------------------------------------------------------------ budget

def test_budget_plans_steps_first_then_images_and_counts_the_passes():
    from bvvit.quant.reconstruct import MIN_BUDGET_IMAGES, MIN_BUDGET_ITERS, UnitCosts, plan_unit
    options = ReconstructOptions(enabled=True, iters=100, time_budget=100.0)
    free = UnitCosts(step_s=0.05, pass_s_per_image=0.0)
    assert plan_unit(ReconstructOptions(enabled=True, iters=50), 99.0, 1, 512, free) == (50, 512, True)  # no budget
    assert plan_unit(options, 0.0, 5, 512, None) == (100, 512, True)  # nothing measured
    assert plan_unit(options, 0.0, 5, 512, free) == (100, 512, True)  # 20 s each: everything fits
    assert plan_unit(options, 96.0, 4, 512, free) == (20, 512, True)  # 1 s each: 20 steps
    # passes over the images count: 1024 images at 10 ms plus 0.1 s per step
    costs = UnitCosts(step_s=0.1, pass_s_per_image=0.01)
    assert plan_unit(options, 80.0, 1, 1024, costs) == (97, 1024, True)  # 9.7 + 10.24 <= 20
    # 4 s: 10 steps draw 320 images (1 + 3.2 > 4), so 10 steps on the 300 images that fit
    assert plan_unit(options, 96.0, 1, 1024, costs) == (MIN_BUDGET_ITERS, 300, True)  # 1 + 3.0 <= 4
    steps, images, fits = plan_unit(options, 98.0, 1, 1024, costs)  # 2 s: 10 steps on 100 images
    assert (steps, images, fits) == (MIN_BUDGET_ITERS, 100, True)
    assert plan_unit(options, 99.5, 1, 1024, costs) == (MIN_BUDGET_ITERS, MIN_BUDGET_IMAGES, False)
    assert plan_unit(options, 99.5, 1, 40, costs) == (MIN_BUDGET_ITERS, 40, False)  # never more than given


def test_a_planned_unit_never_costs_more_than_its_share():
    import random

    from bvvit.quant.reconstruct import UnitCosts, plan_unit
    rng = random.Random(0)
    for _ in range(2000):
        options = ReconstructOptions(enabled=True, iters=rng.randint(1, 400), time_budget=rng.uniform(1, 1e4),
                                     batch_size=rng.choice([8, 32]))
        costs = UnitCosts(rng.uniform(1e-3, 5.0), rng.uniform(1e-4, 1.0))
        spent, left, n = rng.uniform(0, options.time_budget), rng.randint(1, 14), rng.randint(1, 4096)
        steps, images, fits = plan_unit(options, spent, left, n, costs)
        share = (options.time_budget - spent) / left
        assert 1 <= images <= n and steps <= max(options.iters, 10)
        assert fits == (steps * costs.step_s + images * costs.pass_s_per_image <= share)
        if fits and steps < options.iters:  # one more step would not fit
            more = min(n, max(64, (steps + 1) * options.batch_size))
            assert (steps + 1) * costs.step_s + more * costs.pass_s_per_image > share


def test_time_budget_is_validated():
    for bad in (0, -1.0, float("nan"), float("inf"), True, "10"):
        with pytest.raises(ConfigError, match="time_budget"):
            ReconstructOptions(enabled=True, time_budget=bad)
    assert ReconstructOptions().iters == 100 and ReconstructOptions().time_budget is None
    for bad in (-1.0, float("nan"), float("inf"), True, "128"):
        with pytest.raises(ConfigError, match="cache_mb"):
            ReconstructOptions(enabled=True, cache_mb=bad)
    assert ReconstructOptions(cache_mb=0).cache_mb == 0 and ReconstructOptions().cache_mb == 128


def test_a_tiny_budget_cuts_steps_and_images_and_says_so(model):
    from bvvit.quant.reconstruct import MIN_BUDGET_IMAGES, MIN_BUDGET_ITERS
    calib = noise_loader(160, batch_size=32)
    cfg = make_quant_config("vit-recon", 4, 4, reconstruct={"iters": 60, "time_budget": 1e-3})
    _, report = quantize_model(model, cfg, calib)
    stats = report.extras["reconstruct"]
    assert stats["time_budget_s"] == 1e-3 and stats["images"] == 160
    assert set(stats["iters_run"].values()) == {MIN_BUDGET_ITERS}
    assert set(stats["images_run"].values()) == {MIN_BUDGET_IMAGES}
    assert "below what reconstruction needs" in stats["budget_note"]
    assert any("--time-budget" in w for w in report.warnings)
    free = make_quant_config("vit-recon", 4, 4, reconstruct={"iters": 12})
    stats = quantize_model(model, free, calib)[1].extras["reconstruct"]
    assert set(stats["iters_run"].values()) == {12} and set(stats["images_run"].values()) == {160}
    assert "budget_note" not in stats


def test_an_ample_budget_changes_nothing(model, calib):
    """A budget that fits the whole recipe gives the same model as no budget."""
    results = []
    for budget in (None, 1e6):
        reconstruct = {"iters": 12} if budget is None else {"iters": 12, "time_budget": budget}
        qmodel, report = quantize_model(model, make_quant_config("vit-recon", 4, 4, reconstruct=reconstruct), calib)
        results.append(_state(qmodel))
        assert "budget_note" not in report.extras["reconstruct"]
    for a, b in zip(results[0], results[1]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qdrop_runs_through_the_whole_model(model, calib):
    """With QDrop the float inputs stay held for every unit (without it they are freed early)."""
    cfg = make_quant_config("vit-recon", 4, 4, reconstruct={"iters": 8, "drop_prob": 0.5})
    qmodel, report = quantize_model(model, cfg, calib)
    units = report.extras["reconstruct"]["units"]
    assert len(units) == len(model.blocks) + 2 and all(u["iters"] == 8 for u in units.values())
    with torch.no_grad():
        assert torch.isfinite(qmodel(torch.cat([x for x, _ in calib]))).all()


def test_micro_batches_give_the_whole_batch_gradients(model, calib):
    """A step split into micro-batches (what bounds a ViT-B/16 step's memory) computes the
    gradients of the whole batch's loss, regulariser included."""
    from bvvit.quant.reconstruct import (QUANTIZE, ActQuantizer, _AdaRoundWeight,
                                         _LearnedActQParams, _step_gradients)
    work, qmodel = _calibrated(model, calib, "mse", bits=3)
    images = torch.cat([x for x, _ in calib])[:20]
    with torch.no_grad():
        x = dict(model_units(qmodel))["embed"](images)
        target = work.blocks[0](dict(model_units(work))["embed"](images))
    qunit, funit = qmodel.blocks[0], work.blocks[0]
    weights = {name: _AdaRoundWeight(m, funit.get_submodule(name).weight, "codes", learn_scale=True)
               for name, m in weight_modules(qunit)}
    for w in weights.values():  # learned step sizes away from their start, so they matter
        w.log_scale.data.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(3))
    learned = {name: _LearnedActQParams(q.qparams, True) for name, q in qunit.named_modules()
               if isinstance(q, ActQuantizer) and q.state == QUANTIZE}
    for name, q in learned.items():
        qunit.get_submodule(name).qparams = q
    act_params = [a.log_scale for a in learned.values() if a.uniform]
    leaves = [w.V for w in weights.values()] + [w.log_scale for w in weights.values()]
    assert weights and act_params
    for beta in (None, 12.0):
        whole = _step_gradients(qunit, weights, leaves, act_params, x, target, 20, beta, 10.0, 1000)
        parts = _step_gradients(qunit, weights, leaves, act_params, x, target, 7, beta, 10.0, 1000)  # 7 + 7 + 6
        assert len(whole) == len(parts) == 2 * len(weights) + len(act_params)
        assert all(float(g.abs().max()) > 0 for g in whole[len(weights):2 * len(weights)])  # scales get gradients
        for a, b in zip(whole, parts):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a.abs().max())), float((a - b).abs().max())


def test_activations_cached_on_file_give_the_same_reconstruction(model, calib):
    """cache_mb=0 puts every cached set in a temporary file: the same codes and scales as in
    memory (the rows read back bit for bit; only the error sums run in another order)."""
    results, stats = [], []
    for cache_mb in (128.0, 0.0):
        work, qmodel = _calibrated(model, calib)
        stats.append(reconstruct_model(work, qmodel, calib, ReconstructOptions(iters=ITERS // 2, cache_mb=cache_mb)))
        results.append(_state(qmodel))
    (codes_a, scales_a), (codes_b, scales_b) = results
    assert all(torch.equal(codes_a[k], codes_b[k]) for k in codes_a)
    assert all(torch.equal(scales_a[k], scales_b[k]) for k in scales_a)
    for unit, a in stats[0]["units"].items():
        b = stats[1]["units"][unit]
        assert b["error_after"] == pytest.approx(a["error_after"], rel=1e-5) and b["images"] == a["images"] == 64
        assert b["error_before"] == pytest.approx(a["error_before"], rel=1e-5)
