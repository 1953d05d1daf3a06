"""post_training.py calibrated on a folder of other images and on synthetic images: the run
says which images calibrated it and how far they are from the evaluation data."""

import json

import pytest

from tests.helpers import make_image_folder, run_cli

pytestmark = pytest.mark.slow


def _ptq(model_path, out, *extra):
    return run_cli("post_training.py", "--model-path", str(model_path), "--no-progress", "--bits", "8",
                   "--baseline", "none", "--no-onnx", "--analysis", "none", "--latency-runs", "1",
                   "--output-dir", str(out), *extra)


def test_folder_and_synthetic_calibration_are_recorded(trained, tmp_path):
    data, run = trained
    other = make_image_folder(tmp_path / "other", classes=("x", "y"), per_class=5, size=24, mode="RGB",
                              splits=("misc",), seed=7)
    result = _ptq(run / "vit_model.pth", tmp_path / "folder", "--calib-path", str(other), "--calib-size", "8")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "folder" / "summary.json").read_text())["calibration"]
    assert record["source"] == "folder" and record["size"] == 8 and record["available"] == 10
    assert record["frechet_to_eval"] > 0 and record["frechet_train_to_eval"] >= 0
    assert "calibrating on 8 images from folder" in result.stdout

    result = _ptq(run / "vit_model.pth", tmp_path / "synthetic", "--calib-data", "synthetic", "--calib-size", "6")
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "synthetic" / "summary.json").read_text())["calibration"]
    assert record["source"] == "synthetic" and record["size"] == 6 and "frechet_to_eval" in record


def test_a_folder_without_images_is_one_line(trained, tmp_path):
    from tests.helpers import assert_one_line_error
    _, run = trained
    (tmp_path / "empty").mkdir()
    result = _ptq(run / "vit_model.pth", tmp_path / "out", "--calib-path", str(tmp_path / "empty"))
    assert_one_line_error(result, "--calib-path", "holds no images")
