"""quantize_model: the float model is untouched, calibration is explicit and deterministic,
coverage is reported, and packed files reload bit for bit."""

import json

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from bvvit.errors import CheckpointError, ConfigError
from bvvit.metrics import sqnr_db
from bvvit.quant.config import LayerOverride, QuantConfig
from bvvit.quant.modules import QuantLinear, QuantMatMul, QuantSoftmax, act_quantizers
from bvvit.quant.quantize import quantize_model
from bvvit.quant.recipes import RECIPES, make_quant_config
from bvvit.quant.storage import load_quantized_model, read_metadata, round_float_parts, save_quantized_model
from tests.quant.tiny import loaded_model, noise_loader

@pytest.fixture(scope="module")
def calib():
    return noise_loader(32, batch_size=16)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(2)
    return torch.randn(8, 1, 16, 16)


def test_float_model_untouched(model, calib):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel, _ = quantize_model(model, make_quant_config("mse", 4, 4), calib)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.config.fused_attn is True and qmodel is not model
    assert all(not isinstance(m, QuantLinear) for m in model.modules())


def test_everything_asked_for_is_quantized(model, calib):
    qmodel, report = quantize_model(model, make_quant_config("minmax", 8, 8), calib)
    linears = [n for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)]
    assert len(linears) == 2 * 4 + 1  # qkv, proj, fc1, fc2 per block + head
    assert sum(isinstance(m, QuantMatMul) for m in qmodel.modules()) == 4
    assert sum(isinstance(m, QuantSoftmax) for m in qmodel.modules()) == 2
    kinds = sorted({q.kind for _, q in act_quantizers(qmodel)})
    assert kinds == ["image", "k", "linear_input", "q", "softmax", "v"]
    assert not report.warnings
    total = {(r["op"], r["tensor"]): r["count"] for r in report.coverage}
    assert total[("Linear", "weight")] == 9 and total[("Conv2d", "weight")] == 1
    assert total[("MatMul", "q")] == 2 and total[("Softmax", "softmax")] == 2


def test_overrides_and_unmatched_pattern_warning(model, calib):
    cfg = make_quant_config("minmax", 4, 4, overrides=[
        LayerOverride("blocks.0.*", bits=8), LayerOverride("head", keep_float=True),
        LayerOverride("no.such.layer", bits=6)])
    qmodel, report = quantize_model(model, cfg, calib)
    assert qmodel.blocks[0].attn.qkv.weight_qparams.bits == 8
    assert qmodel.blocks[1].attn.qkv.weight_qparams.bits == 4
    assert isinstance(qmodel.head, torch.nn.Linear) and not isinstance(qmodel.head, QuantLinear)
    assert any("no.such.layer" in w for w in report.warnings)


def test_static_quantization_without_calibration_is_an_error(model):
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(model, make_quant_config("mse", 8, 8), None)


def test_calibration_is_deterministic(model, calib):
    a, _ = quantize_model(model, make_quant_config("mse", 6, 6), calib)
    b, _ = quantize_model(model, make_quant_config("mse", 6, 6), calib)
    for (name, qa), (_, qb) in zip(act_quantizers(a), act_quantizers(b)):
        assert torch.equal(qa.qparams.scale, qb.qparams.scale), name


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_error_falls_as_bits_rise(model, images, recipe):
    # Calibrated on the images it is tested on, so that rounding, not clipping, is measured.
    calib = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=4)
    with torch.no_grad():
        ref = model(images)
        errors = {bits: sqnr_db(ref, quantize_model(model, make_quant_config(recipe, bits, bits), calib)[0](images))
                  for bits in (4, 8, 16)}
    assert errors[4] < errors[8] < errors[16]
    # percentile clips the top 0.01% on purpose, which bounds its 16-bit SQNR
    assert errors[8] > 25 and errors[16] > (35 if recipe == "percentile" else 60)


@pytest.mark.parametrize("bits", list(range(2, 17)))
def test_packed_file_reloads_bit_for_bit(model, calib, images, tmp_path, bits):
    recipe = "mse" if bits in (4, 8) else "minmax"
    cfg = make_quant_config(recipe, bits, bits)
    qmodel, report = quantize_model(model, cfg, calib)
    info = save_quantized_model(tmp_path / "q.safetensors", qmodel, cfg, loaded_model(model), report)
    reloaded, meta = load_quantized_model(tmp_path / "q.safetensors")
    with torch.no_grad():
        assert torch.equal(qmodel(images), reloaded(images))
    stored = QuantConfig.from_dict(meta["quant_config"])
    assert (stored.w_bits, stored.a_bits) == (bits, bits) and stored == cfg
    assert info["size_bytes"] == (tmp_path / "q.safetensors").stat().st_size
    packed = info["breakdown"]["packed_weights"]
    weights = sum(m.weight_codes.numel() for n, m in qmodel.named_modules() if isinstance(m, QuantLinear)) \
        + qmodel.patch_embed.proj.weight_codes.numel()
    assert packed <= weights * bits / 8 + 11  # at most one padding byte per tensor


def test_fp16_float_parts_reload_bit_for_bit_and_shrink(model, calib, images, tmp_path):
    cfg = make_quant_config("minmax", 4, 4)
    q32, report = quantize_model(model, cfg, calib)
    q16, _ = quantize_model(model, cfg, calib)
    a = save_quantized_model(tmp_path / "a.safetensors", q32, cfg, loaded_model(model), report)
    round_float_parts(q16, "fp16")
    b = save_quantized_model(tmp_path / "b.safetensors", q16, cfg, loaded_model(model), report, float_dtype="fp16")
    assert b["breakdown"]["float_parameters"] * 2 == a["breakdown"]["float_parameters"]
    reloaded, _ = load_quantized_model(tmp_path / "b.safetensors")
    with torch.no_grad():
        assert torch.equal(q16(images), reloaded(images))


def test_saving_leaves_the_model_bit_identical(model, calib, images, tmp_path):
    """Saving is side-effect free: rounding to the file's float16 is the explicit
    round_float_parts step, never a consequence of writing the file."""
    cfg = make_quant_config("minmax", 4, 4)
    qmodel, report = quantize_model(model, cfg, calib)
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    save_quantized_model(tmp_path / "q.safetensors", qmodel, cfg, loaded_model(model), report, float_dtype="fp16")
    after = qmodel.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    round_float_parts(qmodel, "fp16")
    reloaded, _ = load_quantized_model(tmp_path / "q.safetensors")
    with torch.no_grad():  # rounded, it computes exactly what the file holds
        assert torch.equal(qmodel(images), reloaded(images))


def test_file_has_no_pickle_and_metadata(model, calib, tmp_path):
    cfg = make_quant_config("minmax", 8, 8)
    qmodel, report = quantize_model(model, cfg, calib)
    save_quantized_model(tmp_path / "q.safetensors", qmodel, cfg, loaded_model(model), report)
    raw = (tmp_path / "q.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and header_len < len(raw)
    assert b"\x80\x04" not in raw[:2] and b"torch" not in raw[:8]
    meta = read_metadata(tmp_path / "q.safetensors")
    assert meta["class_names"][0] == "c0" and "blocks.0.attn.qkv.input_quantizer" in meta["activations"]


def test_compact_metadata_and_format_1_files_still_load(model, calib, images, tmp_path):
    from safetensors.torch import load_file, save_file
    cfg = make_quant_config("mse", 8, 8)
    qmodel, report = quantize_model(model, cfg, calib)
    path = tmp_path / "q.safetensors"
    save_quantized_model(path, qmodel, cfg, loaded_model(model), report)
    tensors = load_file(str(path))
    # weight scales are bfloat16 values, stored in 2 bytes
    assert all(t.dtype == torch.bfloat16 for k, t in tensors.items() if k.endswith(".weight.scale"))
    meta = read_metadata(path)  # expanded to one dict per layer
    assert meta["weights"]["head"]["bits"] == 8 and meta["activations"]["head.input_quantizer"]["bits"] == 8
    # the same model as a format-1 file (full per-layer dicts, float32 scales) loads the same
    old = {**meta, "format_version": 1}
    for name, info in old["weights"].items():
        info["zero_point_shape"] = list(tensors[f"{name}.weight.scale"].shape)
    tensors = {k: t.float() if k.endswith(".weight.scale") else t for k, t in tensors.items()}
    save_file(tensors, str(tmp_path / "v1.safetensors"), metadata={"bvvit": json.dumps(old)})
    reloaded, _ = load_quantized_model(tmp_path / "v1.safetensors")
    with torch.no_grad():
        assert torch.equal(qmodel(images), reloaded(images))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_a_clear_error(model, calib, tmp_path, damage):
    cfg = make_quant_config("minmax", 8, 8)
    qmodel, report = quantize_model(model, cfg, calib)
    path = tmp_path / "q.safetensors"
    save_quantized_model(path, qmodel, cfg, loaded_model(model), report)
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"\x00" * 64, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="q.safetensors"):
        load_quantized_model(path)
