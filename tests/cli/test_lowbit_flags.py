"""The low-bit flags of post_training.py reach the job's QuantConfig switches (the job itself
is not run: ``run`` is replaced by a recorder)."""

import pytest

import bvvit.ptq.job
from bvvit.cli.post_training import main
from bvvit.quant.recipes import make_quant_config


@pytest.fixture
def job_of(monkeypatch, tmp_path):
    jobs = []
    monkeypatch.setattr(bvvit.ptq.job, "run", jobs.append)

    def parse(*flags):
        assert main(["--model-path", str(tmp_path / "m.pth"), "--output-dir", str(tmp_path / "q"), *flags]) == 0
        return jobs[-1]
    return parse


def test_rotate_flag_turns_the_rotation_on(job_of):
    assert "rotation" not in job_of().switches
    switches = job_of("--rotate").switches
    cfg = make_quant_config("vit", 4, 4, **switches)
    assert cfg.rotation.enabled and cfg.reparam.enabled and cfg.gptq.enabled


@pytest.mark.parametrize("flags,method", [((), "auto"), (("--softmax-grid", "uniform"), "uniform"),
                                          (("--softmax-log2",), "log2"), (("--softmax-grid", "log2"), "log2")])
def test_softmax_grid_flag(job_of, flags, method):
    assert make_quant_config("vit", 4, 4, **job_of(*flags).switches).softmax.method == method


def test_reconstruction_budget_flags(job_of):
    cfg = make_quant_config("vit", 4, 4, **job_of("--reconstruct-iters", "40", "--time-budget", "12.5").switches)
    assert cfg.reconstruct.enabled and cfg.reconstruct.iters == 40 and cfg.reconstruct.time_budget == 12.5
    cfg8 = make_quant_config("vit", 8, 8, **job_of("--reconstruct-iters", "40").switches)
    assert not cfg8.reconstruct.enabled and cfg8.reconstruct.iters == 40  # the recipe still decides
    default = make_quant_config("vit", 4, 4, **job_of().switches)
    assert default.reconstruct.iters == 100 and default.reconstruct.time_budget is None


def test_learn_weight_scales_flag(job_of):
    cfg = make_quant_config("vit", 3, 3, **job_of("--learn-weight-scales").switches)
    assert cfg.reconstruct.learn_weight_scale and cfg.reconstruct.enabled and cfg.reconstruct.iters == 300
    assert not make_quant_config("vit", 3, 3, **job_of().switches).reconstruct.learn_weight_scale


def test_no_softmax_renorm_flag(job_of):
    assert make_quant_config("vit", 3, 3, **job_of().switches).softmax_renorm
    assert not make_quant_config("vit", 3, 3, **job_of("--no-softmax-renorm").switches).softmax_renorm


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--time-budget", "0"), ("--time-budget", "nan"), ("--time-budget", "x"),
                                   ("--reconstruct-iters", "0")])
def test_bad_budget_values_are_one_line_errors(tmp_path, flags):
    from tests.helpers import assert_one_line_error, run_cli
    result = run_cli("post_training.py", "--model-path", str(tmp_path / "m.pth"), *flags)
    assert_one_line_error(result, flags[0])


def test_calibration_source_flags(job_of, tmp_path):
    job = job_of()
    assert (job.calib_data, job.calib_path) == ("train", None)
    assert job_of("--calib-data", "synthetic").calib_data == "synthetic"
    assert job_of("--calib-path", str(tmp_path)).calib_path == str(tmp_path)


@pytest.mark.parametrize("flags,fragment", [(("--calib-path", "x", "--calib-data", "synthetic"), "exclude"),
                                            (("--calib-path", " "), "--calib-path is empty")])
def test_contradictory_calibration_flags(tmp_path, flags, fragment):
    from bvvit.errors import ConfigError
    with pytest.raises(ConfigError, match=fragment):
        main(["--model-path", str(tmp_path / "m.pth"), *flags])
