import pickle

import pytest
import torch
from torchvision.transforms import v2

from bvvit.config import Preprocessing
from bvvit.data import build_transform
from bvvit.errors import ConfigError

FMNIST = Preprocessing(mean=(0.2860,), std=(0.3530,), img_size=28, in_chans=1, crop_pct=1.0)
RGB = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), img_size=32,
                    in_chans=3, interpolation="bicubic", crop_pct=0.875)


def random_image(channels=1, height=28, width=28, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, height, width), dtype=torch.uint8,
                         generator=generator)


def reference_normalise(image, pre):
    return v2.Normalize(pre.mean, pre.std)(v2.ToDtype(torch.float32, scale=True)(image))


def test_eval_on_native_size_is_exactly_normalisation():
    image = random_image()
    out = build_transform(FMNIST, train=False)(image)
    assert out.shape == (1, 28, 28) and out.dtype == torch.float32
    torch.testing.assert_close(out, reference_normalise(image, FMNIST), rtol=0, atol=1e-5)
    assert torch.equal(image, random_image())  # input untouched


def test_eval_resizes_shorter_side_then_centre_crops():
    image = random_image(3, 40, 60)
    out = build_transform(RGB, train=False)(image)
    assert out.shape == (3, 32, 32)
    resized = v2.functional.resize(image, [36], interpolation=v2.InterpolationMode.BICUBIC,
                                   antialias=True)  # int(32 / 0.875) = 36
    expected = reference_normalise(v2.functional.center_crop(resized, [32, 32]), RGB)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_crop_pct_224_resizes_to_256():
    pre = Preprocessing(mean=(0.5,), std=(0.5,), img_size=224, in_chans=1, crop_pct=0.875)
    transform = build_transform(pre, train=False)
    assert transform.resize_to == 256
    assert transform(random_image(1, 300, 400)).shape == (1, 224, 224)


def test_upscales_fashion_mnist_to_larger_model_input():
    pre = Preprocessing(mean=(0.2860,), std=(0.3530,), img_size=56, in_chans=1)
    for train in (False, True):
        assert build_transform(pre, train=train)(random_image()).shape == (1, 56, 56)


@pytest.mark.parametrize("augment", ["none", "light", "strong"])
def test_train_output_shape_and_range(augment):
    for pre, image in ((FMNIST, random_image()), (RGB, random_image(3, 45, 37))):
        out = build_transform(pre, train=True, augment=augment)(image)
        assert out.shape == (pre.in_chans, pre.img_size, pre.img_size)
        assert out.dtype == torch.float32 and out.is_contiguous()
        low = min((0 - m) / s for m, s in zip(pre.mean, pre.std))
        high = max((1 - m) / s for m, s in zip(pre.mean, pre.std))
        assert low - 1e-5 <= out.min() and out.max() <= high + 1e-5


def test_augment_none_equals_eval():
    image = random_image(3, 45, 37)
    torch.testing.assert_close(build_transform(RGB, train=True, augment="none")(image),
                               build_transform(RGB, train=False)(image))


@pytest.mark.parametrize("augment", ["light", "strong"])
def test_train_randomness_is_reproducible_under_manual_seed(augment):
    transform = build_transform(FMNIST, train=True, augment=augment)
    image = random_image()

    def run(seed):
        torch.manual_seed(seed)
        return torch.stack([transform(image) for _ in range(16)])

    first = run(123)
    assert torch.equal(first, run(123))
    assert not torch.equal(first, run(124))
    assert len({tuple(out.flatten().tolist()) for out in first}) > 4  # varies per call


def test_light_is_a_shift_within_padding_or_a_flip():
    """Every light output is the eval output shifted by at most max(2, 28 // 14) = 2 px
    (zero fill) and maybe mirrored; all 5 x 5 x 2 outcomes occur."""
    image = random_image()
    light = build_transform(FMNIST, train=True, augment="light")
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    candidates = {}
    for top in range(5):
        for left in range(5):
            crop = padded[:, top:top + 28, left:left + 28]
            for flip in (False, True):
                view = crop.flip(-1) if flip else crop
                candidates[(top, left, flip)] = reference_normalise(view, FMNIST)
    seen = set()
    torch.manual_seed(0)
    for _ in range(400):
        out = light(image)
        match = [key for key, ref in candidates.items() if torch.allclose(out, ref, atol=1e-5)]
        assert match, "output is not a padded crop (+flip) of the input"
        seen.update(match)
    assert len(seen) == 50


def test_transform_draws_from_the_global_rng():
    transform = build_transform(FMNIST, train=True, augment="light")
    torch.manual_seed(5)
    transform(random_image())
    after_transform = torch.rand(1)
    torch.manual_seed(5)
    assert not torch.equal(torch.rand(1), after_transform)


def test_grayscale_input_is_repeated_for_rgb_preprocessing():
    gray = random_image(1, 40, 40)
    out = build_transform(RGB, train=False)(gray)
    rgb = build_transform(RGB, train=False)(gray.expand(3, -1, -1).contiguous())
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out, rgb, rtol=0, atol=1e-5)


def test_rgb_input_is_turned_gray_for_one_channel_preprocessing():
    out = build_transform(FMNIST, train=False)(random_image(3, 28, 28))
    assert out.shape == (1, 28, 28)


def test_invalid_settings_are_config_errors():
    with pytest.raises(ConfigError, match="--augment"):
        build_transform(FMNIST, train=True, augment="heavy")
    with pytest.raises(ConfigError, match="interpolation"):
        build_transform(Preprocessing(interpolation="lanczos"), train=False)
    with pytest.raises(ConfigError, match="mean"):
        build_transform(Preprocessing(mean=(0.1, 0.2), std=(0.3, 0.4)), train=False)


def test_float_input_is_rejected():
    with pytest.raises(TypeError, match="uint8"):
        build_transform(FMNIST, train=False)(torch.zeros(1, 28, 28))


def test_transform_pickles_for_worker_processes():
    transform = build_transform(RGB, train=True, augment="strong")
    clone = pickle.loads(pickle.dumps(transform))
    image = random_image(3, 50, 50)
    torch.manual_seed(1)
    expected = transform(image)
    torch.manual_seed(1)
    assert torch.equal(clone(image), expected)
