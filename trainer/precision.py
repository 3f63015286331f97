"""``--precision auto``: the precision that trains this model fastest on this machine, and why.

On CUDA, bf16 where the GPU has it (Ampere and later), else fp16 (with a GradScaler). On a CPU, bf16
pays off only where oneDNN has native bf16 kernels (AVX512-BF16 or AMX) *and* the model's
convolutions are wide enough to use them: a 6-channel LeNet trains slower in bf16 even on AMX,
and where bf16 is emulated (AVX2-only CPUs) it is several times slower. Rather than guess from
flags or channel counts, ``auto`` on a CPU with native bf16 times a few training steps of this model
in both precisions and keeps bf16 only when it is clearly faster. The probe runs on a copy of the
model, so the run's weights, BatchNorm statistics and random streams are untouched.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from cnnstack.cli import ConfigError
from trainer.config import PRECISIONS
from trainer.distributed import DistInfo, all_reduce_sum
from trainer.engine import autocast

# bf16 must beat fp32 by this factor in the probe: a near tie keeps fp32 (exact, and no risk of
# picking the slower one on timing noise).
BF16_MIN_SPEEDUP = 1.1


@dataclass(frozen=True)
class Choice:
    precision: str
    reason: str

    def describe(self, requested: str) -> str:
        return f"precision {self.precision} ({'auto: ' if requested == 'auto' else ''}{self.reason})"


def cpu_supports_bf16() -> bool:
    """oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX); otherwise bf16 is emulated."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _step_seconds(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, steps: int
) -> list[float]:
    """Wall time of each of ``steps`` forward + backward passes (no optimizer step)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with autocast(x.device, precision):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return times


def probe_cpu_speed(
    model: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    channels_last: bool,
    rounds: int = 3,
    steps: int = 3,
    min_seconds: float = 1.5,
    max_rounds: int = 20,
) -> dict[str, float]:
    """Median seconds per training step of ``model`` (a copy) in fp32 and bf16, interleaved round by
    round so that a CPU whose speed drifts slows both alike; the first step of each round is warm-up.
    At least ``rounds`` rounds, more (up to ``max_rounds``) until ``min_seconds`` have been timed: a
    small model's steps are short, and a few of them are at the mercy of one interruption."""
    probe = copy.deepcopy(model).cpu().train()
    if channels_last:
        probe = probe.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_shape, generator=gen)  # (B, C, H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen)
    seconds: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.random.fork_rng(devices=[]):  # dropout draws: the run's CPU random stream stays put
        for done in range(max_rounds):
            if done >= rounds and sum(map(sum, seconds.values())) >= min_seconds:
                break
            for precision in seconds:
                seconds[precision] += _step_seconds(probe, x, y, precision, steps + 1)[1:]
    return {p: statistics.median(s) for p, s in seconds.items()}


def resolve_precision(
    requested: str,
    device: torch.device,
    model: nn.Module | None = None,
    *,
    input_shape: tuple[int, ...] = (),
    num_classes: int = 10,
    batch_size: int = 64,
    channels_last: bool = False,
    dist_info: DistInfo | None = None,
) -> Choice:
    """What ``requested`` means here. ``auto`` on a CPU with native bf16 probes ``model`` (needs
    ``input_shape``); under DDP bf16 is kept only if every rank measured it faster."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision '{requested}' is not one of: {', '.join(PRECISIONS)}")
    if requested == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs CUDA (on CPU use bf16 or fp32)")
    if requested != "auto":
        return Choice(requested, "as asked")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice("bf16", "this GPU runs bf16 natively")
        return Choice("fp16", "this GPU has no bf16; fp16 with loss scaling")
    if device.type != "cpu":
        return Choice("fp32", f"no bf16 rule for {device.type}")
    if not cpu_supports_bf16():
        return Choice("fp32", "this CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 would be emulated")
    if model is None or not input_shape:
        return Choice("fp32", "no model to measure bf16 against fp32")
    t = probe_cpu_speed(model, input_shape, num_classes, batch_size, channels_last)
    speedup = t["fp32"] / t["bf16"]
    faster = torch.tensor(float(speedup >= BF16_MIN_SPEEDUP))
    votes = int(all_reduce_sum(faster, dist_info).item()) if dist_info is not None else int(faster.item())
    world = dist_info.world_size if dist_info is not None else 1
    measured = (
        f"measured {t['fp32'] * 1e3:.1f} ms/step fp32 against {t['bf16'] * 1e3:.1f} ms bf16 ({speedup:.2f}x)"
    )
    if votes == world:
        return Choice("bf16", measured)
    return Choice("fp32", f"{measured}; bf16 needs >= {BF16_MIN_SPEEDUP:.1f}x")
