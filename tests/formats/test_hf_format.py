"""Hugging Face transformers folders (save_pretrained) load with the logits of the library's
own model; architecture, class names and preprocessing come from the folder's JSON files."""

import json

import pytest
import torch

from bvvit.config import Preprocessing
from bvvit.data.transforms import build_transform
from bvvit.errors import CheckpointError
from bvvit.model_file import load_model_file
from tests.formats.sources import CLASSES, PARITY_ATOL, hf_folder, images, max_logit_diff

transformers = pytest.importorskip("transformers")
SQUARE_32 = {"size": {"height": 32, "width": 32}}


@pytest.mark.parametrize("hidden_act, activation", [
    ("gelu", "gelu"), ("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"), ("gelu_fast", "gelu_tanh")])
def test_vit_folder_gives_transformers_logits(tmp_path, hidden_act, activation):
    reference = hf_folder(tmp_path, processor=SQUARE_32, hidden_act=hidden_act)
    loaded = load_model_file(tmp_path)
    assert loaded.source_format == "hf"
    assert (loaded.config.norm_eps, loaded.config.activation) == (1e-12, activation)
    assert max_logit_diff(loaded.model, reference, images()) <= PARITY_ATOL


def test_eps_qkv_bias_and_class_names_from_config_json(tmp_path):
    names = {i: f"class {i}" for i in range(CLASSES)}
    reference = hf_folder(tmp_path, safe=False, qkv_bias=False, layer_norm_eps=1e-5, id2label=names)
    loaded = load_model_file(tmp_path / "pytorch_model.bin")  # the weights file: its folder is read
    assert (loaded.config.qkv_bias, loaded.config.norm_eps) == (False, 1e-5)
    assert loaded.class_names == list(names.values())
    assert any("preprocessor_config.json" in note for note in loaded.notes)
    assert max_logit_diff(loaded.model, reference, images()) <= PARITY_ATOL


def test_placeholder_labels_are_no_class_names(tmp_path):
    hf_folder(tmp_path)  # id2label LABEL_0 ... LABEL_6
    assert load_model_file(tmp_path).class_names == []


@pytest.mark.parametrize("model_class, head_dist", [
    ("DeiTForImageClassificationWithTeacher", True), ("DeiTForImageClassification", False)])
def test_deit_folders(tmp_path, model_class, head_dist):
    reference = hf_folder(tmp_path, model_class, processor={"size": {"height": 36, "width": 36},
                                                            "crop_size": {"height": 32, "width": 32}})
    loaded = load_model_file(tmp_path)
    assert (loaded.config.dist_token, loaded.config.head_dist) == (True, head_dist)
    assert (loaded.preprocessing.crop_mode, loaded.preprocessing.crop_pct) == ("squash", 32 / 36)
    assert max_logit_diff(loaded.model, reference, images()) <= PARITY_ATOL


def test_transformers_5_in_memory_names_load(tmp_path):
    """torch.save(model.state_dict()) of transformers 5 (q_proj, mlp.fc1, vit.layers.N)."""
    reference = hf_folder(tmp_path / "saved")
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    torch.save(reference.state_dict(), tmp_path / "raw" / "pytorch_model.bin")
    if not any(".q_proj." in k for k in reference.state_dict()):
        pytest.skip("transformers < 5 keeps the file names in memory (tested by the other tests)")
    assert max_logit_diff(load_model_file(tmp_path / "raw").model, reference, images()) <= PARITY_ATOL


@pytest.mark.parametrize("processor_class, kwargs, expected", [
    ("ViTImageProcessor", {}, dict(crop_mode="squash", crop_pct=1.0, interpolation="bilinear", mean=(0.5,) * 3)),
    ("DeiTImageProcessor", {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]},
     dict(crop_mode="squash", crop_pct=0.875, interpolation="bicubic", mean=(0.485, 0.456, 0.406))),
    ("ViTImageProcessor", {"size": {"shortest_edge": 256}, "do_center_crop": True,
                           "crop_size": {"height": 224, "width": 224}, "resample": 3},
     dict(crop_mode="center", crop_pct=0.875, interpolation="bicubic")),
])
def test_preprocessing_matches_the_image_processor(tmp_path, processor_class, kwargs, expected):
    """Our transform with the converted settings gives the processor's pixels (224 px).
    (An odd crop margin would differ by one pixel: HF floors the offset, torchvision rounds.)"""
    from bvvit.formats.hf import processor_preprocessing
    processor = getattr(transformers, processor_class)(**kwargs)
    pre = processor_preprocessing(json.loads(processor.to_json_string()), 224, 3, "test", [])
    for name, value in expected.items():
        assert getattr(pre, name) == value, name
    image = torch.randint(0, 256, (3, 320, 256), dtype=torch.uint8,  # even crop margins
                          generator=torch.Generator().manual_seed(0))
    theirs = processor(images=image, return_tensors="pt")["pixel_values"][0]
    ours = build_transform(pre, train=False)(image)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < 1e-5  # both resize the uint8 image with torchvision


def test_preprocessing_is_written_with_the_model(tmp_path):
    """The converted Preprocessing round-trips (packed files, ONNX metadata store to_dict())."""
    hf_folder(tmp_path, "DeiTForImageClassificationWithTeacher")
    pre = load_model_file(tmp_path).preprocessing
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre


@pytest.mark.parametrize("edit, fragment", [
    ({"architectures": ["ViTModel"]}, "ViTModel"),
    ({"hidden_act": "relu"}, "hidden_act 'relu'"),
    ({"image_size": [32, 48]}, "image_size"),
])
def test_unsupported_folders_are_one_line(tmp_path, edit, fragment):
    hf_folder(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError) as error:
        load_model_file(tmp_path)
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_post_training_takes_a_model_folder(tmp_path):
    """--model-path FOLDER end to end (its files are hashed for the manifest and the cache):
    class names from id2label, the processor's transform in summary.json."""
    from tests.formats.sources import hf_folder as make_folder
    from tests.helpers import make_image_folder, run_cli
    labels = {0: "ant", 1: "bee", 2: "cat"}
    make_folder(tmp_path / "deit", "DeiTForImageClassificationWithTeacher", num_labels=3, id2label=labels,
                label2id={v: k for k, v in labels.items()},
                processor={"size": {"height": 36, "width": 36}, "crop_size": {"height": 32, "width": 32}})
    data = make_image_folder(tmp_path / "data", size=40, mode="RGB", per_class=4)
    args = ["--model-path", str(tmp_path / "deit"), "--data-path", str(data), "--bits", "8", "--baseline",
            "none", "--calib-size", "8", "--analysis", "none", "--no-onnx", "--no-progress", "--latency-runs", "1",
            "--output-dir", str(tmp_path / "q")]
    result = run_cli("post_training.py", *args)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert summary["model_format"] == "hf" and summary["class_names"] == ["ant", "bee", "cat"]
    assert (summary["preprocessing"]["crop_mode"], summary["preprocessing"]["crop_pct"]) == ("squash", 32 / 36)
    again = run_cli("post_training.py", *args)  # the same folder: its results are reused
    assert again.returncode == 0 and "reusing" in again.stdout
