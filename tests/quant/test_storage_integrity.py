"""Packed files carry a content hash of their tensors: a modified file is refused in one
line, the hash does not depend on the file's header layout, and files written before the
hash existed (format 2) still load."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bvvit.errors import CheckpointError
from bvvit.quant.quantize import quantize_model
from bvvit.quant.recipes import make_quant_config
from bvvit.quant.storage import load_quantized_model, read_metadata, save_quantized_model, tensors_sha256
from tests.quant.tiny import loaded_model, noise_loader


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    cfg = make_quant_config("minmax", 8, 8)
    qmodel, report = quantize_model(model, cfg, noise_loader(16, batch_size=8))
    path = tmp_path_factory.mktemp("packed") / "vit_w8a8.safetensors"
    info = save_quantized_model(path, qmodel, cfg, loaded_model(model), report)
    return path, info, qmodel


def _raw_metadata(path):
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_hash_is_in_the_metadata_and_the_result_record(saved):
    path, info, _ = saved
    meta = read_metadata(path)
    assert meta["format_version"] == 3
    assert meta["tensors_sha256"] == info["tensors_sha256"] == tensors_sha256(load_file(str(path)))
    load_quantized_model(path)


def test_flipped_head_weights_are_refused_in_one_line(saved, tmp_path):
    """The issue's case: head weights changed, metadata kept (a rerun used to reuse it)."""
    path, _, _ = saved
    tensors = load_file(str(path))
    tensors["head.weight.packed"] = tensors["head.weight.packed"] ^ 0x5A
    tampered = tmp_path / "vit_w8a8.safetensors"
    save_file(tensors, str(tampered), metadata=_raw_metadata(path))
    with pytest.raises(CheckpointError) as refused:
        load_quantized_model(tampered)
    message = str(refused.value)
    assert "\n" not in message and str(tampered) in message and "modified or damaged" in message


def test_one_flipped_byte_in_the_data_is_refused(saved, tmp_path):
    path, _, _ = saved
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # the last byte of the last tensor's data
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="modified or damaged"):
        load_quantized_model(damaged)


def test_hash_ignores_header_layout_but_not_dtype_or_shape(saved, tmp_path):
    path, _, _ = saved
    tensors = load_file(str(path))
    reordered = dict(reversed(list(tensors.items())))
    assert tensors_sha256(reordered) == tensors_sha256(tensors)
    # the same tensors in a file with another header (extra metadata) hash the same
    other = tmp_path / "other.safetensors"
    save_file(reordered, str(other), metadata={**_raw_metadata(path), "note": "x" * 100})
    assert other.read_bytes() != path.read_bytes()
    assert tensors_sha256(load_file(str(other))) == tensors_sha256(tensors)
    load_quantized_model(other)
    packed = tensors["head.weight.packed"]
    assert tensors_sha256({**tensors, "head.weight.packed": packed.view(torch.int8)}) != tensors_sha256(tensors)
    assert tensors_sha256({**tensors, "head.weight.packed": packed.reshape(1, -1)}) != tensors_sha256(tensors)


def test_non_contiguous_and_empty_tensors_hash_by_value():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert tensors_sha256({"t": base.t()}) == tensors_sha256({"t": base.t().contiguous()})
    assert tensors_sha256({"e": torch.zeros(0)}) != tensors_sha256({"e": torch.zeros(0, 2)})
    assert tensors_sha256({"s": torch.tensor(1.0)}) != tensors_sha256({"s": torch.tensor([1.0])})


def test_format_2_file_without_hash_still_loads(saved, tmp_path):
    path, _, qmodel = saved
    meta = json.loads(_raw_metadata(path)["bvvit"])
    meta["format_version"] = 2
    del meta["tensors_sha256"]
    old = tmp_path / "format2.safetensors"
    save_file(load_file(str(path)), str(old), metadata={"bvvit": json.dumps(meta)})
    reloaded, _ = load_quantized_model(old)
    images = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(images), qmodel(images))


def test_format_3_file_without_hash_is_refused(saved, tmp_path):
    path, _, _ = saved
    meta = json.loads(_raw_metadata(path)["bvvit"])
    del meta["tensors_sha256"]
    stripped = tmp_path / "stripped.safetensors"
    save_file(load_file(str(path)), str(stripped), metadata={"bvvit": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="no content hash"):
        load_quantized_model(stripped)
