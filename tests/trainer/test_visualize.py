"""trainer.visualize: feature-map PNGs for every conv layer of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from cnnstack.contract import ModelMeta
from trainer.checkpoint import Checkpoint
from trainer.data import load_dataset
from trainer.models import get_model
from trainer.visualize import conv_outputs, main, mosaic


def _lenet_checkpoint(path: Path, dataset: str = "synthetic") -> tuple[Path, nn.Module]:
    info, _, _ = load_dataset("synthetic", synthetic_train=64, synthetic_test=16)
    model_args = {"in_channels": 1, "num_classes": 10, "image_size": 28, "activation": "relu", "pool": "max"}
    torch.manual_seed(0)
    model = get_model("lenet5", **model_args)
    meta = ModelMeta("lenet5", dataset, info.input_shape, info.mean, info.std, info.class_names)
    Checkpoint("lenet5", model_args, meta, model.state_dict()).save(path)
    return path, model


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def test_writes_one_png_per_conv_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt, model = _lenet_checkpoint(tmp_path / "run" / "best.pt")
    out = tmp_path / "maps"
    assert main([str(ckpt), "--index", "3", "--out", str(out)]) == 0
    printed = [Path(p) for p in capsys.readouterr().out.split()]
    convs = _conv_names(model)
    assert len(convs) == 2  # LeNet-5: conv 6@5x5, conv 16@5x5
    expected = [out / "input.png"] + [
        out / f"{i:02d}_{n.replace('.', '_')}.png" for i, n in enumerate(convs, 1)
    ]
    assert printed == expected
    for path in expected:
        with Image.open(path) as im:
            im.verify()  # a complete, decodable PNG
        with Image.open(path) as im:
            assert im.format == "PNG" and min(im.size) >= 100
            # a picture, not a blank canvas: the 16-channel grid has many colours
            assert len(im.convert("RGB").getcolors(1 << 20) or []) > 20 or path.name == "input.png"


def test_run_dir_default_out_and_missing_dataset_falls_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Trained on "mnist", which is not under --data-dir: a generated input is used, with a warning.
    run = tmp_path / "run"
    _lenet_checkpoint(run / "checkpoint.pt", dataset="mnist")
    with pytest.warns(UserWarning, match="generated"):
        rc = main([str(run), "--data-dir", str(tmp_path / "nowhere"), "--max-channels", "4"])
    assert rc == 0
    paths = [Path(p) for p in capsys.readouterr().out.split()]
    assert len(paths) == 3 and all(p.parent == run / "featuremaps" and p.is_file() for p in paths)


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    ckpt, _ = _lenet_checkpoint(tmp_path / "best.pt")
    assert main([str(ckpt), "--index", "100000", "--out", str(tmp_path / "o")]) == 2
    assert "out of range" in capsys.readouterr().err


def test_mosaic_tiles_and_scales_each_channel() -> None:
    fmaps = torch.arange(5 * 2 * 3, dtype=torch.float32).reshape(5, 2, 3).numpy()
    fmaps[4] = 7.0  # a constant map must not divide by zero
    grid, rows, cols = mosaic(fmaps, max_channels=64)
    assert (rows, cols) == (2, 3) and grid.shape == (2 * 3 - 1, 3 * 4 - 1)
    assert grid[0, 0] == 0.0 and grid[1, 2] == 1.0  # channel 0 scaled to [0, 1]
    assert (grid[3:5, 4:7] == 0.0).all()  # channel 4 (row 1, col 1) constant -> 0
    grid, rows, cols = mosaic(fmaps, max_channels=2)
    assert (rows, cols) == (1, 2)


def test_conv_outputs_are_the_convs_own_outputs() -> None:
    # LeNet with inplace ReLU after each conv: the captured maps must still be pre-activation.
    model = get_model("lenet5", in_channels=1, num_classes=10, image_size=28, activation="relu").eval()
    x = torch.randn(1, 1, 28, 28)
    maps, logits = conv_outputs(model, x)
    assert list(maps) == _conv_names(model)
    first = model.features[0](x)
    torch.testing.assert_close(maps["features.0"], first)
    assert (maps["features.0"] < 0).any()  # not overwritten by the ReLU
    torch.testing.assert_close(logits, model(x))
    assert all(not h for h in (m._forward_hooks for m in model.modules()))  # hooks removed
