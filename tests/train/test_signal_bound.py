"""A signal ends training within seconds even when a data read blocks for good: the first
SIGTERM starts a watchdog (bvvit.train.signals.GRACE_S, 2 s here) that exits with one line
and 143, the last checkpoint untouched; a second signal aborts at once."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, TINY_MODEL_ARGS, make_image_folder

pytestmark = pytest.mark.slow

# Loaded by every Python process of the run (workers too): reading any training image of
# epoch 2 blocks forever, after writing a marker file.
SITECUSTOMIZE = '''
import os, time
if os.environ.get("BVVIT_TEST_MARKER"):
    import bvvit.train.signals
    from bvvit.data.loaders import SeededAugmentation
    bvvit.train.signals.GRACE_S = 2.0
    read = SeededAugmentation.__getitem__
    def blocking_read(self, key):
        if key[0] >= 1:
            open(os.environ["BVVIT_TEST_MARKER"], "w").close()
            time.sleep(3600)
        return read(self, key)
    SeededAugmentation.__getitem__ = blocking_read
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data"))


def _start(folder, tmp_path, workers):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    marker = tmp_path / "blocked"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}",
           "BVVIT_TEST_MARKER": str(marker)}
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "--data-path", str(folder), "--output-dir", str(out),
         "--epochs", "3", "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress",
         "--workers", str(workers)],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists():  # epoch 1 trained and saved, epoch 2's first read blocked
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return process, out


@pytest.mark.parametrize("workers", [0, 2])
def test_blocked_read_then_sigterm_exits_within_seconds(folder, tmp_path, workers):
    process, out = _start(folder, tmp_path, workers)
    last = out / "checkpoints" / "last.pth"
    before = last.read_bytes()
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=60)  # GRACE_S is 2 s
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "SIGTERM" in lines[0] and "without saving" in lines[0]
    assert last.read_bytes() == before  # the last good checkpoint stays
    assert torch.load(last, weights_only=True)["epoch"] == 1


def test_second_signal_aborts_at_once(folder, tmp_path):
    process, out = _start(folder, tmp_path, 0)
    process.send_signal(signal.SIGTERM)
    while "SIGTERM received" not in process.stdout.readline():  # the first one was handled
        assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    try:
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert torch.load(out / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1


def test_signal_during_validation_saves_the_trained_epoch_and_resumes_exactly(folder, tmp_path,
                                                                               monkeypatch):
    """SIGINT between validation batches: the epoch's training is kept (a checkpoint at its
    last step); the resume only validates it and ends with the uninterrupted weights."""
    from bvvit.config import TrainConfig
    from bvvit.data import resolve_data
    from bvvit.train import runner

    source = resolve_data(str(folder))
    model_cfg = runner.model_config_for_data(source, 16, None, patch_size=4, embed_dim=16, depth=1,
                                             num_heads=2)

    def fit(out, **extra):
        return runner.fit(model_cfg, TrainConfig(data_path=str(folder), output_dir=str(out), epochs=2,
                                                 batch_size=8, progress=False, seed=4, **extra), source)

    reference = fit(tmp_path / "ref")
    validate = runner.validation_sums

    def signal_then_validate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # arrives before the first validation batch
        return validate(*args, **kwargs)

    monkeypatch.setattr(runner, "validation_sums", signal_then_validate)
    with pytest.raises(runner.TrainingInterrupted):
        fit(tmp_path / "stopped")
    checkpoint = torch.load(tmp_path / "stopped" / "checkpoints" / "last.pth", weights_only=True)
    assert checkpoint["epoch"] == 0 and checkpoint["epoch_progress"]["steps"] == 3  # all 3 steps
    monkeypatch.setattr(runner, "validation_sums", validate)
    resumed = fit(tmp_path / "stopped", resume="auto")
    assert [row["val_acc"] for row in resumed.history] == [row["val_acc"] for row in reference.history]
    expected = torch.load(reference.model_path, weights_only=True)["state_dict"]
    actual = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(expected[key], actual[key]) for key in expected)
