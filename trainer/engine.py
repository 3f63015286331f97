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

from cnnstack.cli import ConfigError
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


@dataclass(frozen=True)
class EpochPlan:
    """What every epoch of a run reads besides the model: built once (``train.setup``)."""

    info: DatasetInfo  # the images' normalization
    epochs: int
    batch_size: int  # per process; an epoch's last partial batch is dropped
    seed: int
    aug_info: DatasetInfo | None = None  # what data.augment reads; None: no augmentation
    precision: str = "fp32"
    channels_last: bool = False
    dist_info: DistInfo = DistInfo()
    progress: str = "off"  # progress.mode_for: bar, lines or off


@dataclass
class TrainState:
    """What a training step uses and changes."""

    model: nn.Module  # the model, or its DDP / compiled wrapper
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ModelEMA | None = None
    scaler: torch.amp.GradScaler | None = None  # fp16 only

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


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


class EpochBatches:
    """This rank's batches of one epoch, on the training device: a seeded shuffle of its shard,
    gathered, normalized and augmented in one batched call per batch.

    Every batch has ``plan.batch_size`` images (BatchNorm, torch.compile and DDP all prefer one shape).
    """

    def __init__(self, train: Split, plan: EpochPlan, epoch: int) -> None:
        device = train.x.device
        self.train, self.plan = train, plan
        order = torch.Generator().manual_seed(epoch_seed(plan.seed, epoch))
        self.order = shard_permutation(len(train), order, plan.dist_info).to(device)
        self.aug_gen = torch.Generator(device=device).manual_seed(
            epoch_seed(plan.seed, epoch, 1 + plan.dist_info.rank)
        )
        # Pad with black (0 in pixel space is -mean/std after normalization), like torchvision's RandomCrop.
        info = plan.info
        self.black = -sum(m / s for m, s in zip(info.mean, info.std, strict=True)) / info.channels

    def __len__(self) -> int:
        return len(self.order) // self.plan.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        b, plan = self.plan.batch_size, self.plan
        for step in range(len(self)):
            idx = self.order[step * b : (step + 1) * b]  # (B,)
            x = to_float(self.train.x[idx], plan.info)  # (B, C, H, W) float32, normalized
            if plan.aug_info is not None:
                x = augment(x, plan.aug_info, generator=self.aug_gen, fill=self.black)
            if plan.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.train.y[idx]  # (B,)


class EpochTally:
    """The epoch's sums, kept on the device (no host sync per step); non-finite steps left out."""

    def __init__(self, device: torch.device, skipping: bool) -> None:
        self.skipping = skipping  # with a GradScaler: non-finite steps are skipped, not fatal
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.counted = torch.zeros((), dtype=torch.int64, device=device)  # images of finite steps
        self.images = 0
        self.bad = torch.zeros((), dtype=torch.float32, device=device)  # without a scaler: non-finite losses
        self.streak = torch.zeros((), dtype=torch.int64, device=device)  # with one: skipped steps in a row
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    @torch.no_grad()
    def add(self, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        finite = torch.isfinite(loss)
        self.loss_sum += torch.where(finite, loss.double() * len(y), 0.0)
        self.correct += torch.where(finite, (logits.argmax(1) == y).sum(), 0)
        self.counted += torch.where(finite, len(y), 0)
        self.images += len(y)
        if self.skipping:
            self.skipped += (~finite).long()
            self.streak = torch.where(finite, 0, self.streak + 1)
        else:
            self.bad += (~finite).float()

    def diverged(self, dist_info: DistInfo) -> bool:
        """Whether any rank saw a NaN/Inf loss (with a scaler: MAX_SKIPPED_IN_A_ROW skipped steps in a
        row); a host sync."""
        stop = (self.streak >= MAX_SKIPPED_IN_A_ROW).float() if self.skipping else self.bad
        return all_reduce_sum(stop, dist_info).item() > 0

    def error(self, epoch: int, step: int, lr: float) -> NonFiniteLossError:
        detail = (
            f"; {MAX_SKIPPED_IN_A_ROW}+ fp16 steps in a row skipped by GradScaler" if self.skipping else ""
        )
        return NonFiniteLossError(epoch, step, lr, detail)

    def stats(self, seconds: float, dist_info: DistInfo) -> EpochStats:
        """Means over every rank's finite steps."""
        sums = torch.stack(
            [self.loss_sum, self.correct.double(), self.counted.double(), self.skipped.double()]
        )
        loss_sum, correct, counted, skipped = all_reduce_sum(sums, dist_info).tolist()
        images = self.images * dist_info.world_size
        return EpochStats(
            loss_sum / max(counted, 1), correct / max(counted, 1), images, seconds, int(skipped)
        )


def train_step(state: TrainState, x: Tensor, y: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    """Forward, backward, optimizer and schedule step, EMA update; the (detached) loss and the logits."""
    with autocast(x.device, precision):
        logits = state.model(x)  # (B, K)
        loss = state.criterion(logits, y)
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        # An Inf loss can still have finite gradients (label smoothing on a -Inf logit): NaN
        # gradients make sure GradScaler skips the step. No host sync: a device-side select.
        finite = torch.isfinite(loss.detach())
        state.scaler.scale(loss * torch.where(finite, 1.0, math.nan)).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        state.optimizer.step()
    state.scheduler.step()
    if state.ema is not None:
        model = state.model
        state.ema.update(model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
    return loss.detach(), logits


def train_one_epoch(state: TrainState, train: Split, plan: EpochPlan, *, epoch: int) -> EpochStats:
    """One pass over this rank's shard of the training set (``train`` already on the device).

    A NaN/Inf loss stops training (NonFiniteLossError), except with a GradScaler (fp16): there an
    overflow is what the scaler is for, so the step is skipped (the scale halves) and counted, and
    only ``MAX_SKIPPED_IN_A_ROW`` skipped steps in a row stop training. Such a step's loss and
    accuracy are left out of the epoch's means.
    """
    device = train.x.device
    state.model.train()
    batches = EpochBatches(train, plan, epoch)
    tally = EpochTally(device, skipping=state.scaler is not None)
    # A host sync per step is free on CPU; on an accelerator check for NaN every few steps only.
    check_every = 1 if device.type == "cpu" and not plan.dist_info.enabled else 25
    bar = Progress(len(batches), f"epoch {epoch}/{plan.epochs}", plan.progress)
    start = time.perf_counter()
    for step, (x, y) in enumerate(batches, 1):
        loss, logits = train_step(state, x, y, plan.precision)
        tally.add(loss, logits, y)
        if (step % check_every == 0 or step == len(batches)) and tally.diverged(plan.dist_info):
            bar.close()
            raise tally.error(epoch, step, state.lr)
        bar.advance(1, f"loss {loss.item():.4f} lr {state.lr:.3g}" if bar.due() else "")
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tally.stats(time.perf_counter() - start, plan.dist_info)


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
    model: nn.Module, test: Split, plan: EpochPlan, *, batch_size: int, tta_flip: bool = False
) -> EvalResult:
    """Cross-entropy, accuracy and confusion matrix on ``test`` (already on the device), all ranks merged.

    ``plan`` gives the normalization, precision, memory format and ranks; ``batch_size`` is per process.
    """
    device, info, dist_info = test.x.device, plan.info, plan.dist_info
    model.eval()
    k = info.num_classes
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(k * k, dtype=torch.int64, device=device)
    correct_tta = torch.zeros((), dtype=torch.int64, device=device)
    for s, e in _batches(len(test), batch_size, dist_info):
        x = to_float(test.x[s:e], info)  # (b, C, H, W)
        if plan.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = test.y[s:e]  # (b,)
        with autocast(device, plan.precision):
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
        raise ConfigError(
            "--compile on a CPU needs a C++ compiler (Inductor builds C++): install g++ or drop --compile"
        )
    if device.type == "cuda" and c_compiler() is None:
        raise ConfigError(
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
