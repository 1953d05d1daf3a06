"""Data: Fashion-MNIST (IDX files) and ImageNet-style folders, transforms, loaders and the
calibration subset. Knows nothing of models, training or quantization.

    source = resolve_data(args.data_path)            # cheap layout check
    pre = source.default_preprocessing(img_size=28)
    train_set = build_dataset(source, "train", build_transform(pre, train=True))
    loader = build_loader(train_set, batch_size=128, shuffle=True, seed=0)
    for epoch in range(epochs):
        set_epoch(loader, epoch)                     # order depends only on (seed, epoch)
        for images, labels in loader: ...            # (B, C, S, S) float32, (B,) int64
"""

from bvvit.data.loaders import (build_loader, calibration_indices, calibration_loader,
                                set_epoch)
from bvvit.data.source import DataSource, build_dataset, resolve_data
from bvvit.data.transforms import build_transform

__all__ = ["DataSource", "resolve_data", "build_dataset", "build_transform", "build_loader",
           "set_epoch", "calibration_indices", "calibration_loader"]
