"""Tiny model config and random data for the quantization tests."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from bvvit.config import ModelConfig, Preprocessing
from bvvit.model_file import LoadedModel

QUANT_CFG = ModelConfig(img_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=32, depth=2,
                        num_heads=2)


def noise_loader(num_images: int, batch_size: int, seed: int = 1) -> DataLoader:
    """``num_images`` random 16x16 images (labels 0) from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(num_images, 1, 16, 16),
                                    torch.zeros(num_images, dtype=torch.long)), batch_size=batch_size)


def loaded_model(model) -> LoadedModel:
    """``model`` as if read from a vit_model.pth (for the packed-file writer)."""
    return LoadedModel(model, QUANT_CFG, [f"c{i}" for i in range(5)], Preprocessing(img_size=16))
