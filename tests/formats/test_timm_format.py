"""timm checkpoints: state dicts (.pth/.bin/.safetensors) and save_for_hf folders load with
the logits of timm's own model; what the model lacks is refused in one line."""

import pytest
import torch

from bvvit.errors import CheckpointError
from bvvit.model_file import load_model_file
from tests.formats.sources import (HEADS, PARITY_ATOL, TIMM_ARGS, images, max_logit_diff, timm_distilled,
                                   timm_vit)

pytest.importorskip("timm")


@pytest.mark.parametrize("variant, build, expect", [
    ("class token", lambda: timm_vit(), dict(global_pool="token", fc_norm=False, head_dist=False)),
    ("no qkv bias", lambda: timm_vit(qkv_bias=False), dict(qkv_bias=False)),
    ("distilled", lambda: timm_distilled(), dict(dist_token=True, head_dist=True)),
    ("avg + fc_norm", lambda: timm_vit(global_pool="avg"), dict(global_pool="avg", fc_norm=True)),
    ("avg, no class token", lambda: timm_vit(global_pool="avg", class_token=False, fc_norm=False),
     dict(global_pool="avg", fc_norm=False, class_token=False)),
])
def test_state_dict_gives_timms_logits(tmp_path, variant, build, expect):
    reference = build()
    torch.save(reference.state_dict(), tmp_path / "model.pth")
    loaded = load_model_file(tmp_path / "model.pth", num_heads=HEADS)
    assert loaded.source_format == "timm"
    for name, value in expect.items():
        assert getattr(loaded.config, name) == value, name
    assert max_logit_diff(loaded.model, reference, images()) <= PARITY_ATOL


def test_distilled_logits_are_the_mean_of_both_heads(tmp_path):
    reference = timm_distilled()
    torch.save(reference.state_dict(), tmp_path / "deit.pth")
    model = load_model_file(tmp_path / "deit.pth", num_heads=HEADS).model
    x = images()
    features = model.forward_features(x)
    both = (model.head(features[:, 0]) + model.head_dist(features[:, 1])) / 2
    torch.testing.assert_close(model(x), both)


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_safetensors_and_bin_files(tmp_path, suffix):
    from safetensors.torch import save_file
    reference = timm_vit()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(reference.state_dict(), path)
    else:
        torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)
    assert max_logit_diff(load_model_file(path, num_heads=HEADS).model, reference, images()) <= PARITY_ATOL


def test_save_for_hf_folder_gives_heads_preprocessing_and_labels(tmp_path):
    from timm.models._hub import save_for_hf
    import timm
    reference = timm_distilled()
    reference.pretrained_cfg = {**timm.create_model("deit_tiny_distilled_patch16_224").pretrained_cfg,
                                "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.9,
                                "crop_mode": "squash", "input_size": (3, 32, 32)}
    labels = [f"n0{i:07d}" for i in range(TIMM_ARGS["num_classes"])]
    save_for_hf(reference, tmp_path / "folder", model_config={"label_names": labels},
                model_args={"num_heads": HEADS}, safe_serialization=True)
    loaded = load_model_file(tmp_path / "folder")  # no --num-heads: config.json states it
    assert loaded.config.num_heads == HEADS and loaded.class_names == labels
    pre = loaded.preprocessing
    assert (pre.mean, pre.crop_pct, pre.crop_mode, pre.interpolation) == ((0.5,) * 3, 0.9, "squash", "bicubic")
    assert max_logit_diff(loaded.model, reference, images()) <= PARITY_ATOL


def test_bare_state_dict_says_what_it_assumed(tmp_path):
    torch.save(timm_vit().state_dict(), tmp_path / "model.pth")
    loaded = load_model_file(tmp_path / "model.pth")
    assert loaded.config.num_heads == 1  # 32 wide: 64 dimensions per head
    assert any("--num-heads" in note for note in loaded.notes)
    assert loaded.class_names == []


@pytest.mark.parametrize("build, fragment", [
    (lambda: timm_vit(reg_tokens=2), "register tokens"),
    (lambda: timm_vit(init_values=1e-5), "layer scale"),
    (lambda: timm_vit(no_embed_class=True), "no_embed_class"),
    (lambda: timm_vit(qk_norm=True), "qk-normalisation"),
    (lambda: timm_vit(global_pool="map"), "attention pooling"),
    (lambda: timm_vit(pre_norm=True), "norm_pre"),
    (lambda: timm_vit(num_classes=0), "classifier head"),
])
def test_unsupported_timm_features_are_one_line(tmp_path, build, fragment):
    torch.save(build().state_dict(), tmp_path / "model.pth")
    with pytest.raises(CheckpointError) as error:
        load_model_file(tmp_path / "model.pth", num_heads=HEADS)
    message = str(error.value)
    assert fragment in message and "\n" not in message and str(tmp_path / "model.pth") in message
