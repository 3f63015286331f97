"""PNG plots of a run: loss/accuracy curves and the confusion matrix (matplotlib, Agg backend).

matplotlib is imported inside the functions: importing ``trainer.plots`` costs nothing, and a
headless box never needs a display.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

from cnnstack.contract import atomic_write_bytes


def _save(fig: Any, path: str | os.PathLike[str]) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict[str, Any]], path: str | os.PathLike[str], title: str = "") -> None:
    """Train/test loss and accuracy against the epoch, one panel each (d2l's animator, as a file)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], "o-", label="train loss")
    ax_loss.plot(epochs, [r["test_loss"] for r in history], "s-", label="test loss")
    ax_acc.plot(epochs, [r["train_acc"] for r in history], "o-", label="train acc")
    ax_acc.plot(epochs, [r["test_acc"] for r in history], "s-", label="test acc")
    tta = [(r["epoch"], r["test_acc_tta"]) for r in history if r.get("test_acc_tta") is not None]
    if tta:
        ax_acc.plot(*zip(*tta, strict=True), "*", markersize=10, label="test acc (flip TTA)")
    for ax, ylabel in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    _save(fig, path)
    plt.close(fig)


def plot_confusion(
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | os.PathLike[str],
    title: str = "",
) -> None:
    """Row-normalized confusion matrix (rows: true class) with the raw counts written in each cell."""
    plt = _pyplot()
    k = len(class_names)
    rows = [[float(v) for v in row] for row in confusion]
    norm = [[v / max(sum(row), 1.0) for v in row] for row in rows]
    size = max(5.0, 0.55 * k)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    # Hundred-class matrices get unreadable labels and numbers: keep the picture, drop the text.
    if k <= 20:
        ax.set_xticklabels(class_names, rotation=45, ha="right")
        ax.set_yticklabels(class_names)
        for i in range(k):
            for j in range(k):
                colour = "white" if norm[i][j] > 0.5 else "black"
                ax.text(j, i, f"{int(rows[i][j])}", ha="center", va="center", color=colour, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    _save(fig, path)
    plt.close(fig)
