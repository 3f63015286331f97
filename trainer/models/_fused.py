"""A fused CPU kernel for training-mode BatchNorm2d -> MaxPool2d(2, 2) -> ReLU (LeNet-5's blocks).

The kernel (``csrc/bn_maxpool_relu.cpp``, AVX-512) computes the same function as the three modules
in one pass each way, without the copies into and out of oneDNN's layout that the max-pool needs:
on 2 cores LeNet-5's step at batch 256 went from ~14-19 ms to ~10-11 ms. It is built on first use
with ``torch.utils.cpp_extension`` (g++ and ninja, ~30 s once; cached in ``.cache/torch_extensions``)
and is used only after ``prepare()`` succeeded, so importing or building a model never compiles
anything. Where it does not apply (eval mode, autocast, channels-last, other shapes, tracing,
export, ``torch.compile``, no AVX-512, no compiler) the modules run as they are; state dicts,
ONNX graphs and ``--summary`` never see it.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer.models._blocks import _onednn_pool_applies

_SOURCE = Path(__file__).resolve().parent / "csrc" / "bn_maxpool_relu.cpp"
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")  # what the kernel's intrinsics need
_state: dict[str, Any] = {"ext": None, "enabled": False, "why": "prepare() not called"}


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _build() -> Any:
    from torch.utils import cpp_extension

    if shutil.which("ninja") is None:  # the `ninja` wheel's binary, when .venv/bin is not on PATH
        import ninja  # type: ignore[import-untyped]

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    build_dir = (
        Path(
            os.environ.get("TORCH_EXTENSIONS_DIR")
            or Path(__file__).resolve().parents[2] / ".cache/torch_extensions"
        )
        / f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
    )
    build_dir.mkdir(parents=True, exist_ok=True)
    # Explicit ISA flags, not -march=native: a cached build stays valid on any AVX-512 CPU.
    return cpp_extension.load(
        "cnnstack_bn_maxpool_relu",
        [str(_SOURCE)],
        extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"],
        build_directory=str(build_dir),
        verbose=False,
    )


def prepare(enable: bool = True) -> tuple[bool, str]:
    """Build (or load the cached build of) the kernel and use it from now on; ``(used, why not)``.

    ``prepare(False)`` turns it off. A failed build is not an error: the modules' own ops run.
    """
    if not enable:
        _state.update(enabled=False, why="turned off")
        return False, "turned off"
    if _state["ext"] is None:
        missing = [f for f in _CPU_FLAGS if f not in _cpu_flags()]
        if missing:
            _state["why"] = f"the CPU lacks {', '.join(missing)}"
            return False, _state["why"]
        try:
            _state["ext"] = _build()
        except Exception as e:  # no compiler, no ninja, a build error: say so once, train unfused
            _state["why"] = f"build failed ({type(e).__name__}: {str(e).strip().splitlines()[-1][:200]})"
            return False, _state["why"]
    _state.update(enabled=True, why="")
    return True, ""


def enabled() -> bool:
    return bool(_state["enabled"])


class _BNMaxPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        momentum: float,
        eps: float,
    ) -> Tensor:
        # (B, C, H, W) -> (B, C, H/2, W/2); argmax: which of each window's 4 pixels won (uint8)
        out, argmax, mean, invstd = _state["ext"].forward(
            x, weight, bias, running_mean, running_var, momentum, eps
        )
        ctx.save_for_backward(out, argmax, x, weight, mean, invstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out, argmax, x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = _state["ext"].backward(
            grad_out.contiguous(), out, argmax, x, weight, mean, invstd
        )
        return dx, dweight, dbias, None, None, None, None


def _fusable(bn: nn.Module, pool: nn.Module, act: nn.Module, x: Tensor) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and bn.training
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and isinstance(pool, nn.MaxPool2d)
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
        and type(act) is nn.ReLU
        and _onednn_pool_applies(x)  # contiguous 4-d on the CPU, eager, not tracing or exporting
        and x.dtype == torch.float32
        and bn.weight.dtype == torch.float32
        and x.shape[0] > 0
        and x.shape[2] >= 2
        and x.shape[3] >= 2
    )


def has_fusable_blocks(model: nn.Module) -> bool:
    """Whether ``model`` has a Sequential with a BatchNorm2d, MaxPool2d(2, 2), ReLU run (shape aside)."""
    probe = torch.empty(1, 1, 2, 2)
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            mods = list(seq)
            for bn, pool, act in zip(mods, mods[1:], mods[2:], strict=False):
                if isinstance(bn, nn.BatchNorm2d) and _fusable(
                    bn, pool, act, probe.expand(1, bn.num_features, 2, 2).contiguous()
                ):
                    return True
    return False


def run_sequential(seq: nn.Sequential, x: Tensor) -> Tensor:
    """``seq(x)``, with each BatchNorm2d, MaxPool2d(2, 2), ReLU run of modules fused where it applies."""
    modules = list(seq)
    i = 0
    while i < len(modules):
        if enabled() and i + 2 < len(modules) and _fusable(modules[i], modules[i + 1], modules[i + 2], x):
            bn = modules[i]
            assert isinstance(bn, nn.BatchNorm2d) and bn.num_batches_tracked is not None
            bn.num_batches_tracked.add_(1)  # what nn.BatchNorm2d.forward does in training
            x = _BNMaxPoolReLU.apply(
                x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps
            )
            i += 3
        else:
            x = modules[i](x)
            i += 1
    return x
