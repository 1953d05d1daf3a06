"""The one matplotlib setup of the package: the Agg backend (figures are files; no display
is needed), the house style, and the atomic PNG save every figure goes through (the
training curves of run.py and the report's figures).

matplotlib is imported on first use, so importing bvvit stays light.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from bvvit.io import atomic_path

DPI = 110
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.spines.top": False,
         "axes.spines.right": False, "figure.facecolor": "white"}


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def styled_pyplot() -> Iterator[Any]:
    """``matplotlib.pyplot`` with the house style (:data:`STYLE`) for the block."""
    plt = pyplot()
    with plt.rc_context(STYLE):
        yield plt


def save_png(fig: Any, path: str | os.PathLike, metadata: Optional[Mapping[str, str]] = None,
             tight: bool = False) -> Path:
    """Write ``fig`` to ``path`` as a PNG (written to a temporary name, then renamed) and
    close it. ``metadata``: PNG text chunks; ``tight``: crop to what is drawn (nothing cut
    off, no empty margins). Returns ``path``."""
    crop = {"bbox_inches": "tight", "pad_inches": 0.12} if tight else {}
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, metadata=dict(metadata) if metadata else None, **crop)
    pyplot().close(fig)
    return Path(path)


__all__ = ["pyplot", "styled_pyplot", "save_png", "DPI", "STYLE"]
