"""The per-epoch work: ``train_one_epoch`` and ``evaluate``, plus mixed precision and the weight EMA.

The whole dataset lives on the training device as uint8 tensors. An epoch is a seeded permutation of
the row indices, sliced into batches; each batch is gathered, normalized and augmented on the device
in one batched call. There is no DataLoader and no per-sample Python in the hot loop.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from trainer.cuda import c_compiler
from trainer.data import DatasetInfo, Split, augment, to_float
from trainer.distributed import DistInfo, all_reduce_sum
from trainer.progress import Progress

# fp16 only: this many GradScaler-skipped steps in a row mean the weights diverged, not the scale.
MAX_SKIPPED_IN_A_ROW = 100


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/Inf; raised before the diverged weights are saved anywhere."""

    def __init__(self, epoch: int, step: int, lr: float, detail: str = "") -> None:
        super().__init__(f"training loss became NaN/Inf at epoch {epoch}, step {step} (lr {lr:.4g}){detail}")
        self.epoch, self.step, self.lr = epoch, step, lr


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream): resume needs no generator state."""
    return (seed * 1_000_003 + epoch * 7919 + stream) % (2**63)


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers, updated every step.

    ``decay`` ramps up as min(decay, (1 + n) / (10 + n)) so that a short run is not dominated by the
    random initial weights.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if getattr(self, "_source", None) is not model:
            # state_dict() values alias the live parameters/buffers: collect the pairs once.
            pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(), strict=True))
            self._floats = (
                [e for e, _ in pairs if e.is_floating_point()],
                [c for e, c in pairs if e.is_floating_point()],
            )
            self._others = [(e, c) for e, c in pairs if not e.is_floating_point()]  # num_batches_tracked
            self._source = model
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self._floats[0], self._floats[1], 1.0 - d)
        for e, c in self._others:
            e.copy_(c)


@dataclass
class EpochStats:
    loss: float
    acc: float
    images: int
    seconds: float
    skipped: int = 0  # fp16: steps GradScaler skipped (loss or gradients not finite)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def shard_permutation(n: int, generator: torch.Generator, dist_info: DistInfo) -> Tensor:
    """This rank's share of a seeded permutation of range(n): equal sizes on every rank."""
    perm = torch.randperm(n, generator=generator)  # (N,) identical on every rank (same seed)
    per_rank = n // dist_info.world_size
    return perm[: per_rank * dist_info.world_size][dist_info.rank :: dist_info.world_size]


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train: Split,
    info: DatasetInfo,
    *,
    epoch: int,
    epochs: int,
    batch_size: int,
    seed: int,
    aug_info: DatasetInfo | None,
    precision: str,
    channels_last: bool,
    dist_info: DistInfo,
    ema: ModelEMA | None = None,
    scaler: torch.amp.GradScaler | None = None,
    progress: str = "off",
) -> EpochStats:
    """One pass over this rank's shard of the training set (``train`` already on the device).

    ``batch_size`` is per process; the last partial batch is dropped so every step has the same shape
    (BatchNorm, torch.compile and DDP all prefer it).

    A NaN/Inf loss stops training (NonFiniteLossError), except with a GradScaler (fp16): there an
    overflow is what the scaler is for, so the step is skipped (the scale halves) and counted, and
    only ``MAX_SKIPPED_IN_A_ROW`` skipped steps in a row stop training. Such a step's loss and
    accuracy are left out of the epoch's means.
    """
    device = train.x.device
    model.train()
    perm = shard_permutation(len(train), torch.Generator().manual_seed(epoch_seed(seed, epoch)), dist_info)
    perm = perm.to(device)
    aug_gen = torch.Generator(device=device).manual_seed(epoch_seed(seed, epoch, 1 + dist_info.rank))
    steps = len(perm) // batch_size
    black = -sum(m / s for m, s in zip(info.mean, info.std, strict=True)) / info.channels
    # A host sync per step is free on CPU; on an accelerator check for NaN every few steps only.
    check_every = 1 if device.type == "cpu" and not dist_info.enabled else 25
    raw_model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bad = torch.zeros((), dtype=torch.float32, device=device)  # without a scaler: non-finite losses
    streak = torch.zeros((), dtype=torch.int64, device=device)  # with one: skipped steps in a row
    skipped = torch.zeros((), dtype=torch.int64, device=device)
    start = time.perf_counter()
    bar = Progress(steps, f"epoch {epoch}/{epochs}", progress)  # progress.mode_for: bar, lines or off
    for step in range(steps):
        idx = perm[step * batch_size : (step + 1) * batch_size]  # (B,)
        x = to_float(train.x[idx], info)  # (B, C, H, W) float32, normalized
        if aug_info is not None:
            # Pad with black (0 in pixel space is -mean/std after normalization), like torchvision's RandomCrop.
            x = augment(x, aug_info, generator=aug_gen, fill=black)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = train.y[idx]  # (B,)
        with autocast(device, precision):
            logits = model(x)  # (B, K)
            loss = criterion(logits, y)
        optimizer.zero_grad(set_to_none=True)
        finite = torch.isfinite(loss.detach())
        if scaler is not None:
            # An Inf loss can still have finite gradients (label smoothing on a -Inf logit): NaN
            # gradients make sure GradScaler skips the step. No host sync: a device-side select.
            scaler.scale(loss * torch.where(finite, 1.0, math.nan)).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update(raw_model)
        with torch.no_grad():
            loss_d = loss.detach()
            loss_sum += torch.where(finite, loss_d.double() * len(idx), 0.0)
            correct += torch.where(finite, (logits.argmax(1) == y).sum(), 0)
            if scaler is not None:
                skipped += (~finite).long()
                streak = torch.where(finite, 0, streak + 1)
            else:
                bad += (~finite).float()
        checkpoint_step = (step + 1) % check_every == 0 or step + 1 == steps
        stop = (streak >= MAX_SKIPPED_IN_A_ROW).float() if scaler is not None else bad
        if checkpoint_step and all_reduce_sum(stop, dist_info).item() > 0:
            bar.close()
            detail = f"; {MAX_SKIPPED_IN_A_ROW}+ fp16 steps in a row skipped by GradScaler" if scaler else ""
            raise NonFiniteLossError(epoch, step + 1, optimizer.param_groups[0]["lr"], detail)
        due = bar.due()
        bar.advance(1, f"loss {loss_d.item():.4f} lr {optimizer.param_groups[0]['lr']:.3g}" if due else "")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    totals = all_reduce_sum(torch.stack([loss_sum, correct.double(), skipped.double()]), dist_info)
    images = steps * batch_size * dist_info.world_size
    counted = images - int(totals[2]) * batch_size  # images of the steps whose loss was finite
    return EpochStats(
        loss=float(totals[0]) / max(counted, 1),
        acc=float(totals[1]) / max(counted, 1),
        images=images,
        seconds=seconds,
        skipped=int(totals[2]),
    )


@dataclass
class EvalResult:
    loss: float
    acc: float
    confusion: Tensor  # (K, K) int64 counts, rows = true class, columns = predicted (on CPU)
    acc_tta: float | None = None  # accuracy of logits averaged over the image and its mirror

    def per_class_acc(self) -> list[float]:
        totals = self.confusion.sum(1).clamp(min=1)
        return (self.confusion.diagonal().double() / totals).tolist()


def _batches(n: int, batch_size: int, dist_info: DistInfo) -> Iterator[tuple[int, int]]:
    """Contiguous [start, stop) chunks of this rank's contiguous share of range(n)."""
    share = math.ceil(n / dist_info.world_size)
    lo, hi = dist_info.rank * share, min(n, (dist_info.rank + 1) * share)
    for s in range(lo, hi, batch_size):
        yield s, min(s + batch_size, hi)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    test: Split,
    info: DatasetInfo,
    *,
    batch_size: int,
    precision: str,
    channels_last: bool,
    dist_info: DistInfo,
    tta_flip: bool = False,
) -> EvalResult:
    """Cross-entropy, accuracy and confusion matrix on ``test`` (already on the device), all ranks merged."""
    device = test.x.device
    model.eval()
    k = info.num_classes
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device)
    correct_tta = torch.zeros((), dtype=torch.int64, device=device)
    for s, e in _batches(len(test), batch_size, dist_info):
        x = to_float(test.x[s:e], info)  # (b, C, H, W)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = test.y[s:e]  # (b,)
        with autocast(device, precision):
            logits = model(x).float()  # (b, K)
            if tta_flip:
                logits_tta = (logits + model(x.flip(-1)).float()) / 2
        loss_sum += nn.functional.cross_entropy(logits, y, reduction="sum").double()
        confusion += torch.bincount(y * k + logits.argmax(1), minlength=k * k)
        if tta_flip:
            correct_tta += (logits_tta.argmax(1) == y).sum()
    all_reduce_sum(confusion, dist_info)
    all_reduce_sum(loss_sum, dist_info)
    all_reduce_sum(correct_tta, dist_info)
    n = len(test)
    cm = confusion.view(k, k).cpu()
    return EvalResult(
        loss=float(loss_sum) / n,
        acc=float(cm.diagonal().sum()) / n,
        confusion=cm,
        acc_tta=float(correct_tta) / n if tta_flip else None,
    )


def compile_model(
    model: nn.Module, train: Split, info: DatasetInfo, batch_size: int, precision: str, channels_last: bool
) -> tuple[nn.Module, float]:
    """``torch.compile(model)``, compiled now on one training batch so the epochs time training only.

    The warm-up step leaves no trace: BatchNorm statistics are restored, gradients cleared and the
    random streams forked. Inductor's cache lives in the checkout's ``.cache/inductor``. On a CPU,
    Inductor builds C++: without a compiler that is a clear error here, not a traceback mid-epoch.
    """
    device = train.x.device
    if device.type == "cpu" and not (
        os.environ.get("CXX") or any(map(shutil.which, ("c++", "g++", "clang++")))
    ):
        raise ValueError(
            "--compile on a CPU needs a C++ compiler (Inductor builds C++): install g++ or drop --compile"
        )
    if device.type == "cuda" and c_compiler() is None:
        raise ValueError(
            "--compile on CUDA needs a C compiler (Triton builds its kernel launchers): install gcc or drop --compile"
        )
    os.environ.setdefault(
        "TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".cache/inductor")
    )
    compiled: nn.Module = torch.compile(model)  # type: ignore[assignment]  # an OptimizedModule
    x = to_float(train.x[:batch_size], info)  # (B, C, H, W), the shape every step has
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    buffers = {k: b.clone() for k, b in model.named_buffers()}  # BN running statistics
    t = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(compiled(x), train.y[:batch_size])
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, b in model.named_buffers():
            b.copy_(buffers[k])
    return compiled, seconds
