"""Output folders: one writer at a time (flock, released even after kill -9), a folder
holding another run refused in one line, --overwrite moving it aside whole, and the atomic
writer's leftovers removed under the lock."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bvvit.errors import ConfigError
from bvvit.io import atomic_path, atomic_write_text, is_temporary_name, recording_writes
from bvvit.run_dir import (LOCK_NAME, FolderLock, claim_output_dir, claim_training_dir,
                           remove_temporary_leftovers)
from tests.helpers import ROOT, TINY_MODEL_ARGS, assert_one_line_error, make_image_folder, run_cli


def _never(folder, found):
    return f"{folder} holds {', '.join(found)}"


def test_second_writer_is_refused_with_the_holder_pid(tmp_path):
    with claim_output_dir(tmp_path, ["x"], _never, overwrite=False):
        assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(ConfigError, match=f"in use by another run \\(pid {os.getpid()}\\)"):
            FolderLock.acquire(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()  # released and tidied
    FolderLock.acquire(tmp_path).release()


def test_lock_of_a_killed_process_is_released_by_the_kernel(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from bvvit.run_dir import FolderLock; FolderLock.acquire(Path(sys.argv[1])); "
         "print('locked', flush=True); time.sleep(600)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"pid {child.pid}"):
            FolderLock.acquire(tmp_path)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (tmp_path / LOCK_NAME).exists()  # kill -9 left the file, but not the lock
    FolderLock.acquire(tmp_path).release()


def test_training_folder_of_another_run_is_refused_unless_resumed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")  # unrelated files are fine
    with claim_training_dir(out, None, overwrite=False):
        pass
    (out / "vit_model.pth").write_bytes(b"a finished run")
    (out / "metrics.csv").write_text("epoch\n1\n")
    with pytest.raises(ConfigError) as refused:
        with claim_training_dir(out, None, overwrite=False):
            pass
    message = str(refused.value)
    assert "\n" not in message and str(out) in message and "vit_model.pth" in message
    for way_out in ("--resume auto", "--output-dir", "--overwrite"):
        assert way_out in message
    with claim_training_dir(out, "auto", overwrite=False):
        pass
    with claim_training_dir(out, str(out / "checkpoints" / "last.pth"), overwrite=False):
        pass
    with pytest.raises(ConfigError, match="holds another training run"):
        with claim_training_dir(out, str(tmp_path / "elsewhere.pth"), overwrite=False):
            pass
    with pytest.raises(ConfigError, match="pass one of them"):
        with claim_training_dir(out, "auto", overwrite=True):
            pass
    assert (out / "vit_model.pth").read_bytes() == b"a finished run"


def test_overwrite_moves_the_whole_folder_aside(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "vit_model.pth").write_bytes(b"old model")
    (out / "checkpoints" / "best.pth").write_bytes(b"old best")
    with claim_training_dir(out, None, overwrite=True) as claimed:
        assert claimed == out and sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
        (out / "vit_model.pth").write_bytes(b"new model")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert len(aside) == 1
    assert (aside[0] / "vit_model.pth").read_bytes() == b"old model"
    assert (aside[0] / "checkpoints" / "best.pth").read_bytes() == b"old best"
    assert not (aside[0] / LOCK_NAME).exists()
    assert (out / "vit_model.pth").read_bytes() == b"new model"
    assert str(aside[0]) in capsys.readouterr().out
    # a second overwrite in the same second gets its own name
    with claim_training_dir(out, None, overwrite=True):
        pass
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]) == 2


def test_overwrite_through_a_symlinked_output_dir_keeps_the_link_working(tmp_path):
    """--output-dir is a link to the real folder: the real folder is moved aside whole and
    made anew, so the link leads to the new run (it used to be left dangling, no run)."""
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    (real / "vit_model.pth").write_bytes(b"old model")
    link.symlink_to(real, target_is_directory=True)
    with claim_training_dir(link, None, overwrite=True) as claimed:
        (claimed / "vit_model.pth").write_bytes(b"new model")
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("real.previous-")]
    assert len(aside) == 1 and (aside[0] / "vit_model.pth").read_bytes() == b"old model"
    assert link.is_symlink() and (link / "vit_model.pth").read_bytes() == b"new model"


def test_overwrite_never_moves_an_input_of_the_run(tmp_path):
    out = tmp_path / "run"
    (out / "data").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="which this run reads"):
        with claim_training_dir(out, None, overwrite=True, inputs=[out / "data"]):
            pass
    assert (out / "config.json").is_file()


def test_overwrite_waits_for_a_run_inside_the_folder(tmp_path):
    out = tmp_path / "run"
    (out / "quantization").mkdir(parents=True)
    (out / "vit_model.pth").write_bytes(b"old model")
    inner = FolderLock.acquire(out / "quantization")  # post_training writing into OUT/quantization
    try:
        with pytest.raises(ConfigError, match=f"quantization is in use by another run \\(pid {os.getpid()}\\)"):
            with claim_training_dir(out, None, overwrite=True):
                pass
    finally:
        inner.release()
    assert (out / "vit_model.pth").is_file() and not list(tmp_path.glob("run.previous-*"))


def test_temporary_leftovers_are_removed_at_start(tmp_path):
    (tmp_path / "models").mkdir()
    busy = tmp_path / "quantization"
    busy.mkdir()
    (busy / LOCK_NAME).write_text("123\n")  # another run's folder: not ours to clean
    leftovers = [tmp_path / ".summary.json.ab_12xyz.tmp", tmp_path / "models" / ".vit_w8a8.safetensors.k3j9z0q1.tmp"]
    keep = [tmp_path / "notes.tmp", tmp_path / "models" / "vit_w8a8.safetensors",
            busy / ".summary.json.abcdefgh.tmp"]
    for path in leftovers + keep:
        path.write_text("x")
    with claim_output_dir(tmp_path, ["summary.json"], _never, overwrite=False):
        assert [p for p in leftovers if p.exists()] == []
        assert all(p.exists() for p in keep)
    assert remove_temporary_leftovers(tmp_path) == []


def test_atomic_writer_names_are_recognised_and_writes_recorded(tmp_path):
    with recording_writes() as written:
        with atomic_path(tmp_path / "a.bin") as tmp:
            assert is_temporary_name(tmp.name)
            tmp.write_bytes(b"1")
        atomic_write_text(tmp_path / "sub" / "b.txt", "2")
        with pytest.raises(RuntimeError):
            with atomic_path(tmp_path / "c.bin"):
                raise RuntimeError("failed writes are not recorded")
    assert written == [tmp_path / "a.bin", tmp_path / "sub" / "b.txt"]
    assert not is_temporary_name("notes.tmp") and not is_temporary_name(".x.tmp")


def _train(data, out, *extra):
    return run_cli("run.py", "--data-path", str(data), "--output-dir", str(out), "--epochs", "1",
                   "--batch-size", "8", *TINY_MODEL_ARGS, "--no-progress", *extra)


@pytest.mark.slow
def test_run_py_never_trains_over_another_run(tmp_path):
    """A finished run is refused in one line and left byte for byte; a folder in use is
    refused naming the pid; --overwrite moves the old run aside whole."""
    data = make_image_folder(tmp_path / "d")
    out = tmp_path / "run"
    assert _train(data, out).returncode == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert_one_line_error(_train(data, out, "--seed", "9"), str(out), "--resume auto", "--overwrite")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    lock = FolderLock.acquire(out)
    try:
        assert_one_line_error(_train(data, out, "--resume", "auto"), f"pid {os.getpid()}")
    finally:
        lock.release()
    result = _train(data, out, "--overwrite", "--seed", "9")
    assert result.returncode == 0, result.stderr
    aside = next(tmp_path.glob("run.previous-*"))
    assert str(aside) in result.stdout
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == before
    assert (out / "vit_model.pth").read_bytes() != before[Path("vit_model.pth")]
