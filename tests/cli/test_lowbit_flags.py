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
