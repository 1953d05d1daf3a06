"""The tiny random ViT the quantization tests share (one instance per test module)."""

import pytest
import torch

from bvvit.model import VisionTransformer
from tests.quant.tiny import QUANT_CFG


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VisionTransformer(QUANT_CFG).eval()
