"""Run a model over a loader while forward hooks record what named modules see."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from tqdm import tqdm


@torch.no_grad()
def run_with_hooks(model: nn.Module, loader: Iterable, names: list[str],
                   record: Callable[[str, tuple, Any], None], device: torch.device | str = "cpu",
                   progress: bool = False, desc: str = "float pass", max_images: Optional[int] = None) -> None:
    """Call ``record(name, inputs, output)`` for every forward of each named module over
    the first ``max_images`` images of ``loader`` (None: all; a progress bar with ETA,
    labelled ``desc``, when ``progress``)."""
    handles = [model.get_submodule(name).register_forward_hook(
        lambda module, inputs, output, name=name: record(name, inputs, output)) for name in names]
    try:
        model.eval()
        seen = 0
        for images, _ in tqdm(loader, desc=desc, disable=not progress, leave=False):
            if max_images is not None:
                if seen >= max_images:
                    break
                images = images[:max_images - seen]
            model(images.to(device))
            seen += images.shape[0]
    finally:
        for handle in handles:
            handle.remove()
