"""Metric sinks for training: ``metrics.csv`` (one row per epoch), optional TensorBoard,
and ``training_curves.png`` (loss, accuracy, learning rate; drawn in the house style of
:mod:`bvvit.plotting`, like the report's figures).

The full history travels inside each checkpoint, so after a resume the CSV and the plot
are rewritten from it and never hold duplicated or missing epochs.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Optional

from bvvit.io import atomic_write_text
from bvvit.plotting import save_png, styled_pyplot

METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "lr",
                  "epoch_time_s", "train_images_per_s"]


def epoch_row(epoch: int, train: dict[str, float], val: dict[str, float], lr: float,
              epoch_time_s: float) -> dict[str, Any]:
    """Merge the train and val dicts into one row with ``train_``/``val_`` prefixes."""
    return {
        "epoch": epoch,
        "train_loss": round(train["loss"], 6),
        "train_acc": round(train["acc"], 4),
        "val_loss": round(val["loss"], 6),
        "val_acc": round(val["acc"], 4),
        "val_top5": round(val["top5"], 4),
        "lr": lr,
        "epoch_time_s": round(epoch_time_s, 3),
        "train_images_per_s": round(train["images_per_s"], 1),
    }


def write_metrics_csv(path: str | os.PathLike, history: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(path, buffer.getvalue())


def plot_training_curves(path: str | os.PathLike, history: list[dict[str, Any]],
                         title: str = "") -> Optional[Path]:
    """Three panels: loss, accuracy and learning rate per epoch. Returns the path."""
    if not history:
        return None
    with styled_pyplot() as plt:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
        _draw_training_curves(fig, axes, history, title)
        return save_png(fig, path)


def _draw_training_curves(fig: Any, axes: Any, history: list[dict[str, Any]], title: str) -> None:
    epochs = [row["epoch"] for row in history]
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    ax.plot(epochs, [r["val_loss"] for r in history], "s-", label="validation")
    ax.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax.legend()
    ax = axes[1]
    ax.plot(epochs, [r["train_acc"] for r in history], "o-", label="train (augmented)")
    ax.plot(epochs, [r["val_acc"] for r in history], "s-", label="validation top-1")
    ax.plot(epochs, [r["val_top5"] for r in history], "^--", label="validation top-5", alpha=0.6)
    best = max(history, key=lambda r: r["val_acc"])
    ax.annotate(f"best {best['val_acc']:.2f}%", (best["epoch"], best["val_acc"]),
                textcoords="offset points", xytext=(0, -18), ha="center")
    ax.set(title="Accuracy", xlabel="epoch", ylabel="%")
    ax.legend(loc="lower right")
    ax = axes[2]
    ax.plot(epochs, [r["lr"] for r in history], "o-", color="tab:green")
    ax.set(title="Learning rate (end of epoch)", xlabel="epoch", ylabel="lr")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in axes:
        ax.grid(alpha=0.3)
        if len(epochs) < 15:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)


class TensorBoardSink:
    """Optional TensorBoard scalars; needs the ``tensorboard`` package (not installed by default)."""

    def __init__(self, log_dir: str | os.PathLike):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # tensorboard is optional
            from bvvit.errors import ConfigError

            raise ConfigError("--tensorboard needs the tensorboard package: "
                              "pip install tensorboard") from exc
        self.writer = SummaryWriter(str(log_dir))

    def log(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
