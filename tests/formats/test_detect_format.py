"""--model-path FILE|FOLDER: the format is found from files and keys, --model-format forces
one, and what is not a checkpoint is one line saying what it looks like."""

import json

import pytest
import torch

from bvvit.errors import CheckpointError
from bvvit.formats import read_checkpoint
from bvvit.model_file import load_model_file, save_model_file
from tests.formats.sources import hf_folder, timm_vit, torchvision_vit


def test_each_format_is_detected(tmp_path, tiny_config):
    from bvvit.config import Preprocessing
    from bvvit.model import VisionTransformer
    save_model_file(tmp_path / "ours.pth", VisionTransformer(tiny_config), [str(i) for i in range(10)],
                    Preprocessing())
    torch.save(timm_vit().state_dict(), tmp_path / "timm.pth")
    torch.save(torchvision_vit().state_dict(), tmp_path / "tv.pth")
    hf_folder(tmp_path / "hf")
    found = {name: read_checkpoint(tmp_path / name).format for name in ("ours.pth", "timm.pth", "tv.pth", "hf")}
    assert found == {"ours.pth": "bvvit", "timm.pth": "timm", "tv.pth": "torchvision", "hf": "hf"}
    assert read_checkpoint(tmp_path / "hf" / "model.safetensors").format == "hf"


def test_unknown_dict_says_what_it_holds_and_which_formats_exist(tmp_path):
    torch.save({"encoder.weight": torch.zeros(2, 2), "decoder.bias": torch.zeros(2)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError) as error:
        load_model_file(tmp_path / "x.pth")
    message = str(error.value)
    assert "2 tensors, first keys encoder.weight, decoder.bias" in message
    assert "formats: bvvit, timm, hf, torchvision" in message and "--model-format" in message


def test_forced_format_reads_the_file_as_that_format(tmp_path):
    torch.save({"model": timm_vit().state_dict()}, tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="model_config"):  # read as a BV-ViT file
        load_model_file(tmp_path / "timm.pth", model_format="bvvit")
    assert load_model_file(tmp_path / "timm.pth", model_format="timm").source_format == "timm"
    with pytest.raises(CheckpointError, match="torchvision state dict has no"):
        load_model_file(tmp_path / "timm.pth", model_format="torchvision")


@pytest.mark.parametrize("setup, fragment", [
    (lambda p: p.mkdir(), "without config.json"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text(json.dumps({"x": 1}))), "neither transformers"),
    (lambda p: (p.mkdir(), (p / "config.json").write_text("{not json")), "not readable JSON"),
])
def test_folders_that_are_no_model_are_one_line(tmp_path, setup, fragment):
    setup(tmp_path / "folder")
    with pytest.raises(CheckpointError, match=fragment):
        load_model_file(tmp_path / "folder")


def test_hf_weights_without_their_config_json(tmp_path):
    hf_folder(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="without their config.json"):
        load_model_file(tmp_path / "hf" / "model.safetensors")


def test_corrupt_safetensors_is_one_line(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model_file(tmp_path / "bad.safetensors")
