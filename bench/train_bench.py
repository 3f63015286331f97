"""Training throughput: our trainer vs a d2l-style loop, same model, batch size, optimizer and epochs.

    .venv/bin/python bench/train_bench.py [--epochs 3] [--arch lenet5|lenet5-wide|alexnet]
        [--max-train N] [--precision auto] [--baseline-data torchvision|tensor] [--repeat N]

The d2l-style loop is seed 000's ``train_ch6``: a ``torch.utils.data.DataLoader`` (shuffle, d2l's 4
workers) over a Dataset that builds one sample at a time in Python, then the model on each batch.
By default each sample takes torchvision's path, which d2l's ``load_data_fashion_mnist`` uses: the
uint8 image becomes a PIL image, then ``ToTensor()`` + ``Normalize(mean, std)``
(``TorchvisionStyleDataset``); ``--baseline-data tensor`` takes a lighter numpy-to-tensor path
instead, a lower bound on that loop's data cost. Ours (``trainer.train.main``) keeps the uint8
dataset as one tensor, slices batches from a permutation and normalizes whole batches at once (and,
with ``--precision auto``, runs bf16 autocast + channels_last where the CPU supports it and the
model's convolutions are wide enough to gain from it).

Both loops are measured in the same run, one right after the other, each in a fresh interpreter
(``--repeat N`` runs N such pairs). Printed: training images/s of each (training-loop wall time;
evaluation excluded for both), final test accuracy of each (must agree within 0.5 points) and the
speed ratio of each pair and their median (target >= 2.5x on CPU). Exit 1 if the accuracies differ
by more than 0.5 points.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from trainer.config import TrainConfig
from trainer.data import DatasetInfo, Split, load_dataset
from trainer.engine import resolve_precision
from trainer.hostmem import tune_malloc
from trainer.train import build_model
from trainer.train import main as train_main

# LeNet-5 in seed 004's best configuration (ReLU, max-pool, BatchNorm): a model both loops train
# stably, so their accuracies are comparable after a few epochs (the sigmoid original is erratic early).
# name -> (registry arch, its knobs)
KNOBS: dict[str, dict[str, Any]] = {
    "lenet5": {"arch": "lenet5", "activation": "relu", "pool": "max", "batchnorm": True},
    # The widened LeNet-BN of the lenet5-bn preset (30/80 channels, FC 240/168).
    "lenet5-wide": {
        "arch": "lenet5",
        "activation": "relu",
        "pool": "max",
        "batchnorm": True,
        "width": 5,
        "fc_width": 2,
    },
    "alexnet": {"arch": "alexnet", "batchnorm": True},
}


class PerSampleDataset(Dataset):
    """A light per-sample Dataset: one numpy image in, one normalized float tensor out, no PIL.

    Cheaper than what torchvision does per sample (``TorchvisionStyleDataset``): a lower bound on
    the d2l loop's data cost (``--baseline-data tensor``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo) -> None:
        self.images = x.numpy()  # (N, C, H, W) uint8
        self.labels = y.tolist()
        self.mean = torch.tensor(info.mean).view(-1, 1, 1)
        self.std = torch.tensor(info.std).view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(self.images[i]).float().div(255)  # ToTensor: (C, H, W) in [0, 1]
        return (img - self.mean) / self.std, self.labels[i]  # Normalize


class TorchvisionStyleDataset(PerSampleDataset):
    """What d2l's ``load_data_fashion_mnist`` runs per sample (default ``--baseline-data torchvision``).

    That is ``torchvision.datasets.FashionMNIST.__getitem__`` (the uint8 array becomes a PIL image,
    ``Image.fromarray(img, mode="L")``; CIFAR: an RGB image from HWC) followed by
    ``transforms.ToTensor()`` and ``transforms.Normalize(mean, std)``, the torchvision reference
    scripts' normalization (d2l itself skips it; both loops normalize here, so the models match).
    torchvision's own transforms are used when it imports; otherwise these are line-for-line
    copies of its ``to_tensor`` and ``normalize`` for PIL input.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo) -> None:
        super().__init__(x, y, info)
        hwc = self.images.transpose(0, 2, 3, 1)  # (N, H, W, C), how torchvision stores CIFAR
        self.pil_arrays = hwc[..., 0] if hwc.shape[-1] == 1 else np.ascontiguousarray(hwc)
        self.mode = "L" if hwc.shape[-1] == 1 else "RGB"
        self.mean_list, self.std_list = list(info.mean), list(info.std)
        self.transform = _torchvision_transform(self.mean_list, self.std_list) or self._copy_of_torchvision

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.fromarray(self.pil_arrays[i], mode=self.mode)
        return self.transform(img), self.labels[i]

    def _copy_of_torchvision(self, pic: Image.Image) -> torch.Tensor:
        # torchvision.transforms.functional.to_tensor, PIL branch
        img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
        img = img.view(pic.size[1], pic.size[0], len(pic.getbands())).permute((2, 0, 1)).contiguous()
        img = img.to(dtype=torch.get_default_dtype()).div(255)
        # torchvision.transforms.functional.normalize (inplace=False)
        img = img.clone()
        mean = torch.as_tensor(self.mean_list, dtype=img.dtype, device=img.device)
        std = torch.as_tensor(self.std_list, dtype=img.dtype, device=img.device)
        if (std == 0).any():
            raise ValueError(
                f"std evaluated to zero after conversion to {img.dtype}, leading to division by zero."
            )
        return img.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def _torchvision_transform(mean: list[float], std: list[float]):
    try:
        from torchvision import transforms
    except Exception:  # not installed, or (here) a CUDA build that fails to import beside the CPU torch
        return None
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def evaluate_accuracy(net: nn.Module, loader: DataLoader) -> float:
    net.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((net(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


DATASETS = {"torchvision": TorchvisionStyleDataset, "tensor": PerSampleDataset}


def d2l_style(
    cfg: TrainConfig, workers: int, dataset: tuple[DatasetInfo, Split, Split], data: str = "torchvision"
) -> dict[str, float]:
    """Seed 000's train_ch6 loop with the same model/init/optimizer/schedule as ``cfg``."""
    info, train, test = dataset
    if cfg.max_train is not None and cfg.max_train < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.max_train]
        train = dataclasses.replace(train, x=train.x[keep], y=train.y[keep])
    torch.manual_seed(cfg.seed)
    net, _ = build_model(cfg, info)
    train_iter = DataLoader(
        DATASETS[data](train.x, train.y, info), batch_size=cfg.batch_size, shuffle=True, num_workers=workers
    )
    test_iter = DataLoader(
        DATASETS[data](test.x, test.y, info), batch_size=cfg.batch_size, num_workers=workers
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loss = nn.CrossEntropyLoss()
    train_seconds, images = 0.0, 0
    for _ in range(cfg.epochs):
        net.train()
        start = time.perf_counter()
        for x, y in train_iter:
            optimizer.zero_grad()
            y_hat = net(x)
            l = loss(y_hat, y)  # noqa: E741 (d2l's name)
            l.backward()
            optimizer.step()
            with torch.no_grad():  # train_ch6's per-batch metric.add(loss sum, correct, count)
                metric = (
                    float(l * x.shape[0]),
                    float((y_hat.argmax(1).type(y.dtype) == y).sum()),
                    x.shape[0],
                )
            images += metric[2]
        train_seconds += time.perf_counter() - start
    return {"images_per_s": images / train_seconds, "test_acc": evaluate_accuracy(net, test_iter)}


def ours(cfg: TrainConfig) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        summary = train_main(dataclasses.replace(cfg, out=tmp))
        history = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    seconds = sum(r["seconds"] for r in history)
    images = sum(r["images_per_s"] * r["seconds"] for r in history)
    return {
        "images_per_s": images / seconds,
        "test_acc": summary["test_acc"],
        "precision": summary["precision"],
    }


def run_side(
    args: argparse.Namespace, cfg: TrainConfig, dataset: tuple[DatasetInfo, Split, Split]
) -> dict[str, Any]:
    """One measurement in this (fresh) process: the d2l loop (on ``dataset``) or our trainer."""
    if args.side == "baseline":
        if args.baseline_malloc == "tuned":
            tune_malloc()
        return d2l_style(dataclasses.replace(cfg, precision="fp32", tune_malloc=False), args.workers, dataset,
                         args.baseline_data)  # fmt: skip
    return ours(cfg)


def side_in_subprocess(argv: list[str], side: str) -> dict[str, Any]:
    """Run ``--side SIDE`` in a new interpreter: glibc's heap state (trainer/hostmem.py) and torch's
    thread pools of one measurement must not carry into the other."""
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, *argv, "--side", side, "--result-json", f.name]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600)
        return dict(json.loads(Path(f.name).read_text()))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--arch", default="lenet5", choices=tuple(KNOBS))
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument(
        "--precision", default="auto", choices=("auto", "bf16", "fp32"), help="our trainer's precision"
    )
    p.add_argument("--workers", type=int, default=4, help="d2l loop DataLoader workers (d2l uses 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--repeat", type=int, default=1, help="(baseline, ours) pairs to run; prints the median ratio"
    )
    p.add_argument("--baseline-data", choices=tuple(DATASETS), default="torchvision",
                   help="d2l loop's per-sample path: torchvision's (PIL + ToTensor + Normalize) or a lighter "
                        "tensor-only one")  # fmt: skip
    p.add_argument("--baseline-malloc", choices=("default", "tuned"), default="default",
                   help="d2l loop's allocator: glibc's defaults, as its users run it, or our trainer's "
                        "mallopt settings (trainer/hostmem.py) to see how much of the gap they are")  # fmt: skip
    p.add_argument("--side", choices=("baseline", "ours"), help=argparse.SUPPRESS)  # internal: one side
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be >= 1")

    cfg = TrainConfig(
        dataset=args.dataset,
        data_dir=args.data_dir,
        max_train=args.max_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        optimizer="sgd",
        schedule="constant",
        precision=args.precision,
        seed=args.seed,
        quiet=True,
        **KNOBS[args.arch],
    )
    if args.side is not None:  # a child process: the dataset and model are needed only here
        # channels-last goes with bf16 (oneDNN's layout for it); what `auto` resolves to depends on the model.
        dataset = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=0)
        resolved = resolve_precision(args.precision, torch.device("cpu"), build_model(cfg, dataset[0])[0])
        cfg = dataclasses.replace(cfg, channels_last=resolved == "bf16")
        Path(args.result_json).write_text(json.dumps(run_side(args, cfg, dataset)))
        return 0
    print(f"# {args.arch} {KNOBS[args.arch]} on {args.dataset}, batch {args.batch_size}, {args.epochs} epochs, "
          f"SGD lr {args.lr} momentum {args.momentum}, {torch.get_num_threads()} threads", flush=True)  # fmt: skip
    # This VM's speed jumps between two levels (about 1.3x apart, minutes at a time), so a ratio is
    # only fair between runs next to each other: each repeat is a (baseline, ours) pair.
    ratios, gaps = [], []
    for rep in range(1, args.repeat + 1):
        tag = f"[{rep}/{args.repeat}] " if args.repeat > 1 else ""
        t = time.perf_counter()
        baseline = side_in_subprocess(argv, "baseline")
        print(f"{tag}d2l-style loop (DataLoader, {args.workers} workers, {args.baseline_data} per-sample path, "
              f"fp32, {args.baseline_malloc} malloc): {baseline['images_per_s']:,.0f} train images/s, test acc "
              f"{baseline['test_acc']:.4f} ({time.perf_counter() - t:.1f}s)", flush=True)  # fmt: skip
        t = time.perf_counter()
        result = side_in_subprocess(argv, "ours")
        print(f"{tag}ours (on-device batches, {result['precision']}): {result['images_per_s']:,.0f} train "
              f"images/s, test acc {result['test_acc']:.4f} ({time.perf_counter() - t:.1f}s)", flush=True)  # fmt: skip
        ratios.append(result["images_per_s"] / baseline["images_per_s"])
        gaps.append(abs(result["test_acc"] - baseline["test_acc"]) * 100)
        print(f"{tag}speedup {ratios[-1]:.2f}x; accuracy gap {gaps[-1]:.2f} points", flush=True)
    ratio, gap = float(np.median(ratios)), max(gaps)
    spread = f" (pairs: {', '.join(f'{r:.2f}' for r in ratios)})" if len(ratios) > 1 else ""
    print(f"speedup {ratio:.2f}x{' median' if len(ratios) > 1 else ''}{spread} (target >= 2.5x); "
          f"accuracy gap {gap:.2f} points (must be <= 0.5)")  # fmt: skip
    return 0 if gap <= 0.5 else 1


if __name__ == "__main__":
    sys.exit(main())
