"""post_training.py never mixes, loses or mislabels results: a folder holding another
model's results is refused (or moved aside whole with --overwrite), a rerun of the same
model continues and removes what it no longer makes, modified packed files are recomputed,
signals and a full disk end the run cleanly, and odd flags get honest rows."""

import csv
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bvvit.cli.common import run_cli as run_main
from bvvit.cli.post_training import main
from bvvit.io import is_temporary_name, sha256_file
from tests.helpers import ROOT, assert_one_line_error, run_cli

pytestmark = pytest.mark.slow

QUICK = ["--no-progress", "--calib-size", "16", "--latency-runs", "2", "--baseline", "none",
         "--eval-subset", "24", "--analysis", "none", "--no-onnx"]


def _ptq(model_path, out, *extra):
    return run_cli("post_training.py", "--model-path", str(model_path), "--output-dir", str(out),
                   *QUICK, *extra)


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _rows(out):
    return list(csv.DictReader(open(out / "summary.csv")))


def _temporary_files(folder):
    return [p for p in folder.rglob("*") if is_temporary_name(p.name)]


@pytest.fixture(scope="module")
def other_model(trained, tmp_path_factory):
    """A second model file: the trained one with another head bias."""
    payload = torch.load(trained[1] / "vit_model.pth", weights_only=True)
    payload["state_dict"]["head.bias"] += 1.0
    path = tmp_path_factory.mktemp("other") / "vit_model.pth"
    torch.save(payload, path)
    return path


def test_another_models_results_are_refused_then_moved_aside_whole(trained, other_model, tmp_path):
    """The issue's case: a second model into an existing folder used to leave the first
    model's files (packed files, report, ONNX) beside the new summary."""
    model = trained[1] / "vit_model.pth"
    out = tmp_path / "q"
    assert _ptq(model, out, "--bits", "6", "--analysis", "basic").returncode == 0
    before = _files(out)
    assert "report.html" in before and "models/vit_w6a6.safetensors" in before
    manifest = json.loads(before["manifest.json"])
    assert manifest["model"]["sha256"] == sha256_file(model) and manifest["complete"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(out / name) and entry["size_bytes"] == len(before[name])

    refused = _ptq(other_model, out, "--bits", "8")
    assert_one_line_error(refused, str(out), "another model", "--overwrite", "--output-dir")
    assert _files(out) == before

    moved = _ptq(other_model, out, "--bits", "8", "--overwrite")
    assert moved.returncode == 0, moved.stderr
    aside = next(tmp_path.glob("q.previous-*"))
    assert str(aside) in moved.stdout and _files(aside) == before
    assert sorted(_files(out)) == ["manifest.json", "models/vit_fp32.safetensors", "models/vit_w8a8.result.json",
                                   "models/vit_w8a8.safetensors", "summary.csv", "summary.json"]
    assert json.loads((out / "manifest.json").read_text())["model"]["sha256"] == sha256_file(other_model)


def test_results_without_a_manifest_are_refused(trained, tmp_path):
    out = tmp_path / "q"
    (out / "models").mkdir(parents=True)
    (out / "summary.json").write_text("{}")  # written by an older version, model unknown
    assert_one_line_error(_ptq(trained[1] / "vit_model.pth", out, "--bits", "8"),
                          str(out), "manifest.json", "--overwrite")
    assert (out / "summary.json").read_text() == "{}"


def test_a_run_refused_for_a_bad_model_file_leaves_the_folder_free(trained, tmp_path):
    """A model file that fails to load writes nothing: no manifest claims the folder for it,
    so the next (good) model runs there."""
    out = tmp_path / "q"
    broken = tmp_path / "broken.pth"
    payload = torch.load(trained[1] / "vit_model.pth", weights_only=True)
    payload["model_config"]["embed_dim"] += 8  # contradicts the weights
    torch.save(payload, broken)
    assert_one_line_error(_ptq(broken, out, "--bits", "8"), str(broken))
    assert not (out / "manifest.json").exists()
    assert _ptq(trained[1] / "vit_model.pth", out, "--bits", "8").returncode == 0


def test_rerun_continues_and_removes_what_it_no_longer_makes(trained, tmp_path):
    model = trained[1] / "vit_model.pth"
    out = tmp_path / "q"
    assert _ptq(model, out, "--bits", "6", "8").returncode == 0
    leftover = out / "models" / ".vit_w4a4.safetensors.k2j9z0q1.tmp"  # as a kill -9 leaves it
    leftover.write_bytes(b"partial")
    again = _ptq(model, out, "--bits", "6")
    assert again.returncode == 0, again.stderr
    assert "w6a6: reusing" in again.stdout
    assert "removed 1 temporary file" in again.stdout and not leftover.exists()
    assert "removed 2 file(s)" in again.stdout and "vit_w8a8" in again.stdout
    assert not (out / "models" / "vit_w8a8.safetensors").exists()
    assert not (out / "models" / "vit_w8a8.result.json").exists()
    assert [r["name"] for r in _rows(out)] == ["fp32", "w6a6"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["models/vit_fp32.safetensors", "models/vit_w6a6.result.json",
                                         "models/vit_w6a6.safetensors", "summary.csv", "summary.json"]


def test_modified_packed_file_is_recomputed_not_reused(trained, tmp_path):
    """The issue's case: head weights flipped in vit_w8a8.safetensors, metadata kept; a
    rerun printed "reusing" and reported the old accuracy."""
    model = trained[1] / "vit_model.pth"
    out = tmp_path / "q"
    assert _ptq(model, out, "--bits", "8").returncode == 0
    expected = _rows(out)[1]
    path = out / "models" / "vit_w8a8.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path))
    tensors["head.weight.packed"] = tensors["head.weight.packed"] ^ 0x5A
    save_file(tensors, str(path), metadata=metadata)
    again = _ptq(model, out, "--bits", "8")
    assert again.returncode == 0, again.stderr
    assert "w8a8: reusing" not in again.stdout
    notes = [line for line in again.stdout.splitlines() if "recomputing" in line]
    assert len(notes) == 1 and "w8a8" in notes[0] and "modified" in notes[0]
    measured = {"top1", "top5", "agreement", "sqnr_db", "kl_div", "size_bytes"}
    recomputed = _rows(out)[1]
    assert {k: recomputed[k] for k in measured} == {k: expected[k] for k in measured}  # the real model's
    assert "w8a8: reusing" in _ptq(model, out, "--bits", "8").stdout  # the rewritten file is sound


def test_sigterm_ends_the_run_in_one_line_leaving_no_temporary_files(trained, tmp_path):
    model = trained[1] / "vit_model.pth"
    out = tmp_path / "q"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, str(ROOT / "post_training.py"), "--model-path", str(model),
                                "--output-dir", str(out), *QUICK, "--bits", "4", "6", "8", "--analysis", "basic"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    for line in process.stdout:
        if line.startswith("fp32: top-1"):  # inside the run, writing its files
            break
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, (stdout[-800:], stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "interrupted" in lines[0] and "reused by a rerun" in lines[0]
    assert _temporary_files(out) == []
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    rerun = _ptq(model, out, "--bits", "4", "6", "8")
    assert rerun.returncode == 0, rerun.stderr
    assert [r["name"] for r in _rows(out)] == ["fp32", "w4a4", "w6a6", "w8a8"]


def test_signal_in_the_middle_of_a_write_removes_the_temporary_file(trained, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def save_then_signal(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)  # the temporary file is complete on disk...
        os.kill(os.getpid(), signal.SIGTERM)  # ...when the signal arrives, before the rename

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_signal)
    out = tmp_path / "q"
    code = run_main(main, ["--model-path", str(trained[1] / "vit_model.pth"), "--output-dir", str(out),
                           *QUICK, "--bits", "8"], prog="post_training.py")
    assert code == 143
    assert "interrupted (SIGTERM)" in capsys.readouterr().err
    assert _temporary_files(out) == [] and not (out / "models" / "vit_w8a8.safetensors").exists()


def test_full_disk_during_onnx_export_fails_the_run_after_the_other_results(trained, tmp_path,
                                                                            monkeypatch, capsys):
    import onnx

    def full_disk(model, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(onnx, "save", full_disk)
    out = tmp_path / "q"
    argv = ["--model-path", str(trained[1] / "vit_model.pth"), "--output-dir", str(out), *QUICK, "--bits", "8"]
    argv.remove("--no-onnx")
    code = run_main(main, argv, prog="post_training.py")
    captured = capsys.readouterr()
    assert code == 2
    assert "ONNX int8: skipped: no space left on device" in captured.out
    errors = [line for line in captured.err.splitlines() if line.strip()]
    assert len(errors) == 1 and "no space left on device" in errors[0] and str(out) in errors[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["onnx"]["failed"] and summary["failures"]
    assert [r["name"] for r in _rows(out)] == ["fp32", "w8a8"]  # the rest is written
    assert _temporary_files(out) == [] and not list(out.glob("onnx/*.onnx"))


def test_missing_stored_data_path_is_named(trained, tmp_path):
    """A model trained with a relative --data-path, quantized elsewhere: the message names
    the stored path, not a flag the user never passed."""
    payload = torch.load(trained[1] / "vit_model.pth", weights_only=True)
    payload["data"] = {"data_path": "data/moved-away", "kind": "folder", "root": "/nonexistent/moved-away"}
    model = tmp_path / "vit_model.pth"
    torch.save(payload, model)
    result = _ptq(model, tmp_path / "q", "--bits", "8")
    assert_one_line_error(result, "stored in", "data/moved-away", "/nonexistent/moved-away", "pass --data-path")


def test_override_that_keeps_everything_float_gets_no_quantized_row(trained, tmp_path):
    out = tmp_path / "q"
    result = _ptq(trained[1] / "vit_model.pth", out, "--bits", "8", "--override", "*=float")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "nothing would be quantized" in line]
    assert len(warnings) == 1 and "w8a8" in warnings[0]
    assert [r["name"] for r in _rows(out)] == ["fp32"]
    assert list(json.loads((out / "summary.json").read_text())["skipped_variants"]) == ["w8a8"]
    assert not (out / "models" / "vit_w8a8.safetensors").exists()


def test_repeated_bit_depths_run_once(trained, tmp_path):
    out = tmp_path / "q"
    result = _ptq(trained[1] / "vit_model.pth", out, "--bits", "8", "6", "8")
    assert result.returncode == 0, result.stderr
    assert [r["name"] for r in _rows(out)] == ["fp32", "w8a8", "w6a6"]
    assert "repeated bit depths run once" in result.stdout


def test_repeated_weight_activation_pairs_run_once(monkeypatch):
    import bvvit.ptq.job

    jobs = []
    monkeypatch.setattr(bvvit.ptq.job, "run", jobs.append)
    assert main(["--model-path", "m.pth", "--w-bits", "4", "8", "4", "--a-bits", "8", "8", "8"]) == 0
    assert jobs[0].bit_pairs == [(4, 8), (8, 8)]


def test_folder_in_use_is_refused(trained, tmp_path):
    from bvvit.run_dir import FolderLock

    out = tmp_path / "q"
    lock = FolderLock.acquire(out)  # another post_training writing there
    try:
        assert_one_line_error(_ptq(trained[1] / "vit_model.pth", out, "--bits", "8"),
                              str(out), f"pid {os.getpid()}")
    finally:
        lock.release()


def test_stored_relative_data_path_falls_back_to_the_stored_absolute_root(trained):
    """Models of earlier versions stored the --data-path as typed (maybe relative) beside
    the absolute folder run.py resolved: that folder is used from any directory."""
    from bvvit.model_file import load_model_file
    from bvvit.ptq.inputs import stored_data_path

    data = trained[0]
    loaded = load_model_file(trained[1] / "vit_model.pth")
    loaded.data = {"data_path": "relative/data", "kind": "folder", "root": str(data)}
    assert stored_data_path(loaded, "m.pth") == str(data)
    loaded.data = {"data_path": "fashion-mnist", "kind": "fashion-mnist", "root": "/elsewhere"}
    assert stored_data_path(loaded, "m.pth") == "fashion-mnist"  # searched for, as before


def test_empty_data_path_is_refused(trained, capsys):
    """`--data-path "$DATA"` with DATA unset: refused, not silently the stored data set."""
    assert run_main(main, ["--model-path", str(trained[1] / "vit_model.pth"), "--data-path", ""],
                    prog="post_training.py") == 2
    assert "--data-path is empty" in capsys.readouterr().err
