"""Training randomness is a function of (seed, epoch, sample index): any number of loader
workers gives the same weights, and a run interrupted mid-epoch with workers resumes exactly."""

import pytest
import torch

from tests.helpers import HOOKED_RUN, TINY_MODEL_ARGS, make_image_folder, run_cli

pytestmark = pytest.mark.slow

# light augmentation and drop-path: both data and model randomness are exercised
ARGS = ["--epochs", "2", "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress", "--seed", "11",
        "--augment", "light", "--drop-path-rate", "0.1"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def _train(folder, out, *extra, env=None, script="run.py"):
    return run_cli(script, "--data-path", str(folder), "--output-dir", str(out), *ARGS, *extra, env=env)


def _assert_same_weights(expected_dir, actual_dir):
    expected = torch.load(expected_dir / "vit_model.pth", weights_only=True)["state_dict"]
    actual = torch.load(actual_dir / "vit_model.pth", weights_only=True)["state_dict"]
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_two_workers_interrupted_mid_epoch_resume_exactly(folder, tmp_path):
    for name, workers in (("w0", "0"), ("w2", "2")):
        result = _train(folder, tmp_path / name, "--workers", workers)
        assert result.returncode == 0, result.stderr
    _assert_same_weights(tmp_path / "w0", tmp_path / "w2")  # worker count changes nothing

    out = tmp_path / "stopped"
    stopped = _train(folder, out, "--workers", "2", env={"BVVIT_SIGNAL_AFTER_STEPS": "4"}, script=HOOKED_RUN)
    assert stopped.returncode == 130, stopped.stderr  # 3 steps per epoch: stop in epoch 2
    checkpoint = torch.load(out / "checkpoints" / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 1 and checkpoint["epoch_progress"]["steps"] == 1
    resumed = _train(folder, out, "--workers", "2", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "1 steps into epoch 2" in resumed.stdout
    _assert_same_weights(tmp_path / "w2", out)
    _assert_same_weights(tmp_path / "w0", out)
