"""Feature maps of every conv layer for one test image, to see what each layer responds to: one
PNG per conv layer, a grid with one tile per channel.

    python -m trainer.visualize runs/fmnist/best.pt --index 7 --out runs/fmnist/featuremaps

The checkpoint's metadata says which dataset the model was trained on; image ``--index`` of its
test split is fed through the model. If that dataset is not on this machine, a generated image of
the right shape is used instead (with a warning), so the tool still shows what each layer does.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnstack.cli import ConfigError, parse_config, require
from cnnstack.contract import ModelMeta
from trainer.checkpoint import CheckpointError, build_model, checkpoint_meta, load_checkpoint
from trainer.data import DatasetError, DatasetInfo, load_dataset, to_float
from trainer.datasets.synthetic import make_synthetic


@dataclass(frozen=True)
class VisualizeConfig:
    checkpoint: str
    index: int = 0
    out: str | None = None  # default: <run dir>/featuremaps
    data_dir: str | None = None
    max_channels: int = 64  # wide layers (ResNet/DenseNet) show their first channels only

    def __post_init__(self) -> None:
        require([] if self.max_channels >= 1 else ["--max-channels must be >= 1"])


def load_input(meta: ModelMeta, index: int, data_dir: str | None) -> tuple[torch.Tensor, str]:
    """Test image ``index`` of the model's dataset as (C, H, W) uint8, and a caption."""
    try:
        _, _, test = load_dataset(meta.dataset, data_dir=data_dir)
    except (DatasetError, ValueError) as e:
        warnings.warn(f"{e}\nusing a generated {meta.input_shape} input instead", stacklevel=2)
        c, h, _ = meta.input_shape
        x = make_synthetic(1, meta.num_classes, c, h, seed=index).x[0]
        return x, f"generated input (dataset {meta.dataset} not found)"
    if not 0 <= index < len(test):
        raise ConfigError(
            f"--index {index} is out of range: the {meta.dataset} test split has {len(test)} images"
        )
    label = meta.class_names[int(test.y[index])]
    if tuple(test.x.shape[1:]) != meta.input_shape:
        raise DatasetError(
            f"{meta.dataset} test images are {tuple(test.x.shape[1:])}, the model expects {meta.input_shape}"
        )
    return test.x[index], f"{meta.dataset} test[{index}], label {label}"


def conv_outputs(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run ``x`` (1, C, H, W) and return every Conv2d's output by module name, plus the logits."""
    maps: dict[str, torch.Tensor] = {}
    hooks = [
        # clone: an inplace ReLU right after the conv would otherwise rewrite the stored map
        module.register_forward_hook(
            lambda _m, _i, out, name=name: maps.__setitem__(name, out.detach().clone())
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return maps, logits


def mosaic(fmaps: np.ndarray, max_channels: int) -> tuple[np.ndarray, int, int]:
    """(C, H, W) maps -> one (rows*(H+1)-1, cols*(W+1)-1) image, each map min-max scaled to [0, 1].

    One imshow of a mosaic renders in milliseconds; a subplot per channel takes seconds for 64.
    Gaps between tiles are NaN, which matplotlib draws as the background colour.
    """
    fmaps = fmaps[:max_channels]
    n, h, w = fmaps.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    lo = fmaps.min(axis=(1, 2), keepdims=True)
    span = fmaps.max(axis=(1, 2), keepdims=True) - lo
    scaled = (fmaps - lo) / np.where(span > 0, span, 1.0)  # a constant map shows as 0
    grid = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1), np.nan, dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = scaled[i]
    return grid, rows, cols


def save_grid(path: Path, image: np.ndarray, title: str, cmap: str, vmax: float | None = None) -> None:
    # Figure without pyplot: no global state, Agg canvas, safe in servers and tests.
    from matplotlib.figure import Figure

    h, w = image.shape[:2]
    scale = min(8.0 / max(h, w), 0.25)  # inches per pixel: small maps get enlarged, big ones capped
    fig = Figure(figsize=(max(3.0, w * scale), max(3.0, h * scale) + 0.6))
    ax = fig.add_subplot()
    ax.imshow(image, cmap=cmap, interpolation="nearest", vmin=0, vmax=vmax)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def visualize(cfg: VisualizeConfig) -> list[Path]:
    """Write input.png and one PNG per conv layer; return their paths (input first)."""
    ckpt = load_checkpoint(cfg.checkpoint)
    meta = checkpoint_meta(ckpt)
    model = build_model(ckpt)  # eval mode, CPU: one image does not need a GPU
    ckpt_path = Path(cfg.checkpoint)
    out = (
        Path(cfg.out) if cfg.out else (ckpt_path if ckpt_path.is_dir() else ckpt_path.parent) / "featuremaps"
    )
    out.mkdir(parents=True, exist_ok=True)

    image, caption = load_input(meta, cfg.index, cfg.data_dir)  # (C, H, W) uint8
    info = DatasetInfo(
        meta.dataset, meta.class_names, meta.mean, meta.std, meta.channels, meta.image_size, False, 0
    )
    maps, logits = conv_outputs(model, to_float(image[None], info))  # (1, C, H, W) in
    if not maps:
        raise ConfigError(f"{meta.arch} has no Conv2d layers to visualize")
    predicted = meta.class_names[int(logits.argmax(1))]
    caption = f"{meta.arch}: {caption}, predicted {predicted}"

    paths = [out / "input.png"]
    pixels = image.permute(1, 2, 0).numpy()  # (H, W, C)
    save_grid(paths[0], pixels[..., 0] if meta.channels == 1 else pixels, caption, cmap="gray", vmax=255)
    for i, (name, fmap) in enumerate(maps.items(), start=1):
        grid, _, _ = mosaic(fmap[0].float().numpy(), cfg.max_channels)  # (Co, H', W') in
        shown = min(fmap.shape[1], cfg.max_channels)
        title = f"{name}: {tuple(fmap.shape[1:])}, {shown}/{fmap.shape[1]} channels\n{caption}"
        path = out / f"{i:02d}_{name.replace('.', '_')}.png"
        save_grid(path, grid, title, cmap="viridis", vmax=1)
        paths.append(path)
    return paths


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer.visualize", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint file or run directory (best.pt / checkpoint.pt)")
    p.add_argument("--index", type=int, default=0, help="test image index (default 0)")
    p.add_argument("--out", default=None, help="output directory (default <run dir>/featuremaps)")
    p.add_argument("--data-dir", default=None, help="dataset folder, if not in the default place")
    p.add_argument("--max-channels", type=int, default=64, help="channels shown per layer (default 64)")
    return p


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(VisualizeConfig, build_parser(), argv)
    try:
        paths = visualize(cfg)
    except (CheckpointError, ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
