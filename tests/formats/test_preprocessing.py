"""Preprocessing a checkpoint brings: crop_mode (squash = Hugging Face's resize of both
sides), --preprocessing KEY=VALUE changes, and files written before crop_mode existed."""

import dataclasses

import pytest
import torch

from bvvit.config import Preprocessing
from bvvit.data.transforms import build_transform
from bvvit.errors import ConfigError

RGB_224 = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), img_size=224, in_chans=3,
                        interpolation="bicubic", crop_pct=0.875)


def test_files_without_crop_mode_keep_the_centre_crop():
    stored = {k: v for k, v in RGB_224.to_dict().items() if k != "crop_mode"}
    assert Preprocessing.from_dict(stored).crop_mode == "center"


def test_squash_resizes_both_sides_then_crops():
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    squash = build_transform(dataclasses.replace(RGB_224, crop_mode="squash"), train=False)
    assert squash(image).shape == (3, 224, 224)
    # a 256x256 resize of the whole image keeps all of its width (the centre mode cuts the sides)
    centre = build_transform(RGB_224, train=False)(image)
    assert not torch.allclose(squash(image), centre)


def test_overrides_replace_the_named_fields():
    changed = RGB_224.overridden(["mean=0.5,0.5,0.5", "std=0.5,0.5,0.5", "crop_pct=0.9",
                                  "interpolation=bilinear", "crop-mode=squash"])
    assert (changed.mean, changed.std, changed.crop_pct, changed.interpolation, changed.crop_mode) == \
        ((0.5,) * 3, (0.5,) * 3, 0.9, "bilinear", "squash")
    assert changed.img_size == 224


@pytest.mark.parametrize("item, fragment", [
    ("img_size=32", "KEY one of"), ("crop_pct", "KEY=VALUE"), ("crop_pct=big", "not a number"),
    ("crop_pct=1.5", "crop_pct must be in"), ("mean=0.5,0.5", "mean must be"),
    ("crop_mode=stretch", "crop_mode 'stretch'"),
])
def test_bad_overrides_are_one_line(item, fragment):
    with pytest.raises(ConfigError, match=fragment) as error:
        RGB_224.overridden([item])
    assert "\n" not in str(error.value)
