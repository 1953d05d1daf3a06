"""post_training.py end to end on a tiny model, and its one-line errors."""

import csv
import importlib.util
import json

import pytest
import torch

from tests.helpers import assert_one_line_error, make_image_folder, run_cli, run_torchrun

pytestmark = pytest.mark.slow


def _ptq(model_path, *extra):
    return run_cli("post_training.py", "--model-path", str(model_path), "--no-progress",
                   "--calib-size", "16", "--latency-runs", "2", *extra)


def test_end_to_end(trained, tmp_path):
    data, out = trained
    result = _ptq(out / "vit_model.pth", "--bits", "4", "8", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["name"] for r in rows][:5] == ["fp32", "w4a4", "w4a4-minmax", "w8a8", "w8a8-minmax"]
    # real integer inference in ONNX Runtime beside the simulated rows
    onnx = {r["name"]: r for r in rows[5:]}
    assert onnx["onnx-w8a8"]["kernel"] == "onnxruntime-int8"
    assert onnx["onnx-w8a8-fused-attention"]["kernel"] == "onnxruntime-int8-qattention"
    assert (tmp_path / "onnx" / "vit_w8a8_fused_attention.onnx").is_file()
    assert onnx["onnx-fp32"]["kernel"] == "onnxruntime-float"
    assert (tmp_path / "onnx" / "vit_w8a8.onnx").is_file()
    assert abs(float(onnx["onnx-fp32"]["top1"]) - float(rows[0]["top1"])) <= 0.01
    if importlib.util.find_spec("openvino"):  # every installed runtime by default
        assert onnx["openvino-w8a8"]["kernel"] == "openvino-int8"
        assert (tmp_path / "onnx" / "vit_w8a8_openvino.xml").is_file()
        assert float(onnx["openvino-w8a8"]["latency_ms_b64"]) > 0
        ov_checks = json.loads((tmp_path / "summary.json").read_text())["onnx"]["checks"]
        assert ov_checks["ov_w8a8_integer_ops"]
    assert (tmp_path / "report.html").is_file()
    for column in ("name", "w_bits", "a_bits", "recipe", "top1", "top5", "top1_drop", "agreement",
                   "sqnr_db", "size_bytes", "size_ratio", "latency_ms_b1", "latency_ms_b64", "kernel"):
        assert column in rows[0]
    assert rows[0]["kernel"] == "float" and rows[1]["kernel"] == "simulated"
    # images lost / gained against FP32 and the McNemar p: consistent with the top-1 columns
    images = json.loads((tmp_path / "summary.json").read_text())["num_eval_images"]
    for row in rows[1:]:
        lost, gained, p = int(row["lost_vs_fp32"]), int(row["gained_vs_fp32"]), float(row["drop_p_value"])
        net = (float(row["top1"]) - float(rows[0]["top1"])) * images / 100
        assert gained - lost == round(net) and 0.0 < p <= 1.0, row
    assert (rows[0]["lost_vs_fp32"], rows[0]["gained_vs_fp32"], rows[0]["drop_p_value"]) == ("0", "0", "1.0")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["calibration"]["split"] == "train" and len(summary["calibration"]["indices"]) == 16
    assert summary["variants"]["w8a8"]["quant_config"]["recipe"] == "vit"  # the default
    assert summary["variants"]["w8a8"]["coverage"]
    recon = summary["variants"]["w4a4"]["reconstruction"]  # the vit recipe reconstructs at 4 bits
    assert recon["images"] == 16 and set(recon["iters_run"].values()) == {100}
    assert summary["variants"]["w8a8"]["reconstruction"] is None
    # sizes are the real files
    for row in rows[1:5]:
        path = tmp_path / "models" / f"vit_{row['name']}.safetensors"
        assert int(row["size_bytes"]) == path.stat().st_size
    assert int(rows[1]["size_bytes"]) < int(rows[3]["size_bytes"]) < int(rows[0]["size_bytes"])
    assert "w4a4" in result.stdout and "SQNR" in result.stdout


def test_decoupled_bits_and_default_output_dir(trained):
    data, out = trained
    result = _ptq(out / "vit_model.pth", "--w-bits", "4", "--a-bits", "8", "--baseline", "none")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(out / "quantization" / "summary.csv")))
    assert [r["name"] for r in rows] == ["fp32", "w4a8"]




def test_two_process_evaluation_matches_one_process(trained, tmp_path):
    """torchrun: each rank evaluates a shard (29 images: uneven shards, padding dropped),
    the gathered results equal a single process's; rank 0 alone writes and prints."""
    data, out = trained
    args = ["--model-path", str(out / "vit_model.pth"), "--no-progress", "--calib-size", "16",
            "--latency-runs", "2", "--bits", "8", "--baseline", "none", "--eval-subset", "29",
            "--analysis", "none", "--avg-bits", "6", "--mp-candidates", "4", "8"]
    one = run_cli("post_training.py", *args, "--output-dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    two = run_torchrun("post_training.py", 2, *args, "--output-dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("fp32: top-1") == 1  # printed by rank 0 only
    rows = {}
    for name in ("one", "two"):
        rows[name] = {r["name"]: r for r in csv.DictReader(open(tmp_path / name / "summary.csv"))}
    assert rows["one"].keys() == rows["two"].keys() and "mixed-avg6" in rows["two"]
    for name, row in rows["one"].items():
        for column in ("top1", "top1_drop", "agreement", "size_bytes"):
            assert row[column] == rows["two"][name][column], (name, column)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["variants"]["fp32"]["metrics"]["num_images"] == 29
    assert summary["mixed_precision"]["overrides"] == \
        json.loads((tmp_path / "one" / "summary.json").read_text())["mixed_precision"]["overrides"]
    assert sorted(p.name for p in (tmp_path / "two" / "models").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one" / "models").iterdir())


def test_error_bits_out_of_range(trained, tmp_path):
    assert_one_line_error(_ptq(trained[1] / "vit_model.pth", "--bits", "17"), "between 2 and 16")
    assert_one_line_error(_ptq(trained[1] / "vit_model.pth", "--bits", "1"), "between 2 and 16")


def test_error_not_a_checkpoint(tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert_one_line_error(_ptq(bad), "notes.txt")
    assert_one_line_error(_ptq(tmp_path / "missing.pth"), "does not exist")


def test_error_classes_differ(trained, tmp_path):
    other = make_image_folder(tmp_path / "other", classes=("dog", "eel", "fox"))
    assert_one_line_error(_ptq(trained[1] / "vit_model.pth", "--data-path", str(other)), "classes")


def test_error_calib_size_larger_than_train_split(trained):
    assert_one_line_error(_ptq(trained[1] / "vit_model.pth", "--calib-size", "100000"), "--calib-size")


def test_error_training_checkpoint_of_other_kind(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    assert_one_line_error(_ptq(path), "not a BV-ViT model file")


def test_rerun_reuses_finished_bit_depths(trained, tmp_path):
    data, out = trained
    args = ("--bits", "6", "--baseline", "none", "--output-dir", str(tmp_path))
    first = _ptq(out / "vit_model.pth", *args)
    assert first.returncode == 0, first.stderr
    second = _ptq(out / "vit_model.pth", *args)
    assert second.returncode == 0, second.stderr
    assert "w6a6: reusing" in second.stdout
    a = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert a[1]["name"] == "w6a6"
    # a different config (another calibration size) is recomputed, not reused
    third = _ptq(out / "vit_model.pth", *args, "--calib-size", "8")
    assert third.returncode == 0 and "reusing" not in third.stdout


def test_timm_state_dict_on_imagenet_style_folder(tmp_path):
    """A user's own timm/DeiT checkpoint and ImageNet-style data (RGB, ImageNet normalisation)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=3, num_classes=3, embed_dim=64, depth=2, num_heads=1)
    path = tmp_path / "deit_tiny_random.pth"
    torch.save(reference.state_dict(), path)
    data = make_image_folder(tmp_path / "imagenet", size=40, mode="RGB", per_class=6)
    result = _ptq(path, "--data-path", str(data), "--bits", "8", "--baseline", "none", "--model-format", "timm",
                  "--output-dir", str(tmp_path / "q"), "--calib-size", "8", "--analysis", "none",
                  "--preprocessing", "crop_pct=0.9", "interpolation=bilinear")
    assert result.returncode == 0, result.stderr
    assert "1 heads" in result.stdout and "ImageNet mean/std" in result.stdout
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    # the transform the checkpoint brings (changed by --preprocessing) is in every artifact
    expected = {"crop_pct": 0.9, "interpolation": "bilinear", "mean": [0.485, 0.456, 0.406]}
    assert summary["model_format"] == "timm"
    assert {k: summary["preprocessing"][k] for k in expected} == expected
    from bvvit.quant.storage import read_metadata
    from bvvit.runtime.onnxruntime import read_onnx_metadata
    packed = read_metadata(tmp_path / "q" / "models" / "vit_w8a8.safetensors")["preprocessing"]
    assert {k: packed[k] for k in expected} == expected
    onnx_files = sorted((tmp_path / "q").rglob("*.onnx"))
    assert onnx_files
    for onnx_file in onnx_files:
        stored = read_onnx_metadata(onnx_file)["preprocessing"]  # JSON values decoded
        assert {k: stored[k] for k in expected} == expected, onnx_file.name
    assert summary["class_names"] == ["ant", "bee", "cat"]
    assert summary["model_config"]["img_size"] == 32
    assert_one_line_error(_ptq(path, "--bits", "8"), "--data-path")
