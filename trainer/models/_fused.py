"""CPU kernels for training LeNet and fmnist_net: AVX-512 C++ (``csrc/``), each computing the same
function as the modules it stands in for.

NCHW float32 (LeNet-5; training mode only):
- ``bn_maxpool_relu.cpp``: BatchNorm2d -> MaxPool2d(2, 2) -> ReLU in one pass each way, without
  the copies into and out of oneDNN's layout that the max-pool needs;
- ``conv_small_cin.cpp``: a stride-1 Conv2d on an input with at most 4 channels that needs no
  gradient (the first layer), forward and weight gradient, where oneDNN is slow.
  LeNet-5's (ReLU, max-pool, BN) step at batch 256 on 2 cores: ~14-19 ms -> ~7.6 ms with both.
Channels-last, float32 or bfloat16 (fmnist_net under bf16 autocast; training, and inference in
eval mode without autograd):
- ``conv_bn_pool_relu.cpp``: a first stage, conv (<= 4 input channels, >= 16 outputs) -> BN ->
  2x2 max-pool -> ReLU, as one op that recomputes the conv output in registers instead of storing
  it (fp32 inside; under bf16 autocast it hands on bf16, the cast autocast would make);
- ``bn_relu_cl.cpp``: BatchNorm2d -> ReLU;
- ``add_maxpool_cl.cpp``: MaxPool2d(2, 2) of a residual sum; ``global_pool_cl.cpp``: the
  concatenated global max- and average-pool of a head.
  fmnist_net's (width 16) bf16 step at batch 256: ~10-15% faster than with the NCHW kernels alone.
They are built on first use with ``torch.utils.cpp_extension`` (g++ and ninja, ~40-110 s once;
where the build is cached: ``_build``) and used only after ``prepare()`` succeeded, so importing or
building a model never compiles anything. Where they do not apply (other dtypes, layouts or shapes,
eval mode with autograd on, tracing, export, ``torch.compile``, no AVX-512, no compiler) the
modules run as they are; state dicts, ONNX graphs and ``--summary`` never see them.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from trainer.models._blocks import eager_cpu_nchw
from trainer.models._fused_cl import _AddMaxPool, _BNReLUChannelsLast, _ConvBNMaxPoolReLU, _GlobalMaxAvgPool

_SOURCES = [
    Path(__file__).resolve().parent / "csrc" / f
    for f in (
        "ops.cpp",
        "bn_maxpool_relu.cpp",
        "conv_small_cin.cpp",
        "conv_bn_pool_relu.cpp",
        "bn_relu_cl.cpp",
        "add_maxpool_cl.cpp",
        "global_pool_cl.cpp",
    )
]
_MAX_CIN = 4  # the direct convolution's loops are per input channel: for a first layer's 1-3
# The one-op first stage vectorizes over output channels, 16 at a time: below 16 most lanes idle
# (LeNet-5's 6 channels: its step 1.2x slower than with the NCHW kernels, measured alternating).
_STEM_MIN_CHANNELS = 16
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl")  # what the kernels' intrinsics need
# ext: the loaded extension; failed: why it cannot be had in this process (checked or built once)
_state: dict[str, Any] = {"ext": None, "failed": None, "enabled": False}


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
    # In a checkout, beside its other caches (.cache/inductor); installed, torch's own default folder.
    root = Path(__file__).resolve().parents[2]
    build_dir: Path | None = None
    if os.environ.get("TORCH_EXTENSIONS_DIR") is None and (root / "pyproject.toml").exists():
        tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__.replace('+', '_')}"
        build_dir = root / ".cache/torch_extensions" / tag
        build_dir.mkdir(parents=True, exist_ok=True)
    # Explicit ISA flags, not -march=native: a cached build stays valid on any AVX-512 CPU.
    return cpp_extension.load(
        "cnnstack_cpu_kernels",
        [str(f) for f in _SOURCES],
        extra_cflags=["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma"],
        build_directory=str(build_dir) if build_dir is not None else None,
        verbose=False,
    )


def prepare(enable: bool = True) -> tuple[bool, str]:
    """Build (or load the cached build of) the kernels and use them from now on; ``(used, why not)``.

    ``prepare(False)`` turns them off. A failed build is not an error (and is not retried in this
    process): the modules' own ops run.
    """
    _state["enabled"] = False
    if not enable:
        return False, "turned off"
    if _state["ext"] is None and _state["failed"] is None:
        missing = [f for f in _CPU_FLAGS if f not in _cpu_flags()]
        if missing:
            _state["failed"] = f"the CPU lacks {', '.join(missing)}"
        else:
            try:
                _state["ext"] = _build()
            except Exception as e:  # no compiler, no ninja, a build error: train unfused
                last = (str(e).strip().splitlines() or [""])[-1][:200]
                _state["failed"] = f"build failed ({type(e).__name__}: {last})"
    if _state["ext"] is None:
        return False, str(_state["failed"])
    _state["enabled"] = True
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
        out, argmax, x_at_max, mean, invstd = _state["ext"].bn_maxpool_relu_forward(
            x, weight, bias, running_mean, running_var, momentum, eps
        )
        ctx.save_for_backward(out, argmax, x_at_max, x, weight, mean, invstd)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out, argmax, x_at_max, x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = _state["ext"].bn_maxpool_relu_backward(
            grad_out.contiguous(), out, argmax, x_at_max, x, weight, mean, invstd
        )
        return dx, dweight, dbias, None, None, None, None


class _ConvSmallCin(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, padding: int) -> Tensor:  # type: ignore[override]
        # (B, C, H, W) -> (B, O, H + 2p - K + 1, W + 2p - K + 1); x needs no gradient
        ctx.save_for_backward(x)
        ctx.kernel_size, ctx.padding, ctx.has_bias = weight.shape[2], padding, bias is not None
        return _state["ext"].conv_small_cin_forward(x, weight, bias, padding)

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        dweight, dbias = _state["ext"].conv_small_cin_weight_grad(
            grad_y.contiguous(), x, ctx.kernel_size, ctx.padding, ctx.has_bias
        )
        return None, dweight, dbias if ctx.has_bias else None, None


def _conv_applies(conv: nn.Module, x: Tensor) -> bool:
    return conv.training and _conv_ok(conv, x)


def _conv_ok(conv: nn.Module, x: Tensor) -> bool:
    """A convolution the direct kernels compute (training mode aside)."""
    return (
        type(conv) is nn.Conv2d
        and eager_cpu_nchw(x)  # our kernels need no oneDNN
        and x.dtype == torch.float32
        and not x.requires_grad  # the first layer: the kernel computes no input gradient
        and conv.weight.dtype == torch.float32
        and conv.weight.is_contiguous()
        and conv.in_channels <= _MAX_CIN
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.kernel_size[0] == conv.kernel_size[1]
        and isinstance(conv.padding, tuple)
        and conv.padding[0] == conv.padding[1]
        and x.shape[0] > 0
        and min(x.shape[2], x.shape[3]) + 2 * conv.padding[0] >= conv.kernel_size[0]
    )


def _fusable(bn: nn.Module, pool: nn.Module, act: nn.Module, x: Tensor) -> bool:
    return bn.training and _bn_pool_relu_ok(bn, pool, act, x)


def _bn_ok(bn: nn.Module) -> bool:
    """A BatchNorm2d our kernels compute: affine, running statistics with a momentum, fp32 parameters."""
    return (
        type(bn) is nn.BatchNorm2d
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and bn.weight.dtype == torch.float32
    )


def _max_pool_2x2(pool: nn.Module) -> bool:
    """MaxPool2d(2, 2): no padding, dilation, ceil mode or returned indices."""
    return (
        isinstance(pool, nn.MaxPool2d)
        and pool.kernel_size in (2, (2, 2))
        and pool.stride in (2, (2, 2))
        and pool.padding in (0, (0, 0))
        and pool.dilation in (1, (1, 1))
        and not pool.ceil_mode
        and not pool.return_indices
    )


def _bn_pool_relu_ok(bn: nn.Module, pool: nn.Module, act: nn.Module, x: Tensor) -> bool:
    """BN -> 2x2 max-pool -> ReLU that the kernels compute (training mode aside)."""
    return (
        _bn_ok(bn)
        and _max_pool_2x2(pool)
        and type(act) is nn.ReLU
        and eager_cpu_nchw(x)  # our kernels need no oneDNN
        and x.dtype == torch.float32
        and x.shape[0] > 0
        and x.shape[2] >= 2
        and x.shape[3] >= 2
    )


def _bn_relu_applies(bn: nn.Module, act: nn.Module, x: Tensor) -> bool:
    """BN -> ReLU that the channels-last kernel computes (training mode aside: see ``_mode``)."""
    return (
        _bn_ok(bn)
        and type(act) is nn.ReLU
        and eager_cpu_nchw(x, torch.channels_last)
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[1] == bn.num_features
        and x.numel() > x.shape[1]  # else BatchNorm's own error: one value per channel
    )


def add_then_pool(a: Tensor, b: Tensor, pool: nn.Module) -> Tensor:
    """``pool(a + b)`` (a residual block's output, then its stage's max-pool), as one op of ours in
    CPU training when ``pool`` is a 2x2 max-pool and a, b are channels-last float32/bfloat16."""
    if (
        enabled()
        and _max_pool_2x2(pool)
        and _mode([pool]) is not None
        and eager_cpu_nchw(a, torch.channels_last)
        and eager_cpu_nchw(b, torch.channels_last)
        and a.shape == b.shape
        and a.dtype == b.dtype
        and a.dtype in (torch.float32, torch.bfloat16)
        and a.shape[0] > 0
        and min(a.shape[2], a.shape[3]) >= 2
    ):
        if pool.training:
            return _AddMaxPool.apply(_state["ext"], a, b)
        return _state["ext"].add_maxpool_channels_last_forward(a, b)[0]
    return pool(a + b)


def _covers_plane(pool: nn.Module, x: Tensor) -> bool:
    """A max- or average-pool whose one window is the whole (H, W) plane of ``x``."""
    k = pool.kernel_size if isinstance(pool.kernel_size, tuple) else (pool.kernel_size,) * 2  # type: ignore[union-attr]
    s = pool.stride if isinstance(pool.stride, tuple) else (pool.stride,) * 2  # type: ignore[union-attr]
    return (
        tuple(k) == (x.shape[2], x.shape[3])
        and tuple(s) == tuple(k)
        and pool.padding in (0, (0, 0))
        and not pool.ceil_mode  # type: ignore[union-attr]
    )


def global_max_avg_pool(x: Tensor, max_pool: nn.Module, avg_pool: nn.Module) -> Tensor:
    """``cat([max_pool(x), avg_pool(x)], 1)`` for pools that each cover the whole plane (a head),
    as one op of ours in CPU training on channels-last float32/bfloat16 ``x``."""
    if (
        enabled()
        and isinstance(max_pool, nn.MaxPool2d)
        and type(avg_pool) is nn.AvgPool2d
        and _mode([max_pool, avg_pool]) is not None
        and _covers_plane(max_pool, x)
        and _covers_plane(avg_pool, x)
        and max_pool.dilation in (1, (1, 1))
        and not max_pool.return_indices
        and avg_pool.divisor_override is None
        and eager_cpu_nchw(x, torch.channels_last)
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.shape[0] > 0
    ):
        if max_pool.training:
            return _GlobalMaxAvgPool.apply(_state["ext"], x)
        return _state["ext"].global_pool_channels_last_forward(x)[0]
    return torch.cat([max_pool(x), avg_pool(x)], dim=1)


def has_fused_ops(model: nn.Module) -> bool:
    """Whether ``model`` runs modules these kernels stand in for (input shapes aside): a model's
    ``fused_runs()`` lists the runs of modules its forward passes to ``run_sequential``."""
    fused_runs = getattr(model, "fused_runs", None)
    runs: list[list[nn.Module]] = fused_runs() if callable(fused_runs) else []
    for mods in runs:
        if mods and isinstance(mods[0], nn.Conv2d):
            k = mods[0].kernel_size[0]
            if _conv_applies(mods[0], torch.zeros(1, mods[0].in_channels, k, k)):
                return True
        for bn, pool, act in zip(mods, mods[1:], mods[2:], strict=False):
            if isinstance(bn, nn.BatchNorm2d) and _fusable(
                bn, pool, act, torch.zeros(1, bn.num_features, 2, 2)
            ):
                return True
    return False


def _mode(mods: Sequence[nn.Module]) -> str | None:
    """'train' if all of ``mods`` train, 'infer' if all are in eval mode and no gradient is recorded
    (the inference kernels have no backward), else None."""
    if all(m.training for m in mods):
        return "train"
    if not any(m.training for m in mods) and not torch.is_grad_enabled():
        return "infer"
    return None


def _stem_mode(mods: Sequence[nn.Module], x: Tensor) -> str | None:
    """The mode in which the one-op first stage computes conv -> BN -> max-pool -> ReLU, or None."""
    if len(mods) < 4 or not isinstance(mods[0], nn.Conv2d) or not _conv_ok(mods[0], x):
        return None
    conv, bn = mods[0], mods[1]
    assert isinstance(conv.padding, tuple)
    side = min(x.shape[2], x.shape[3]) + 2 * conv.padding[0] - conv.kernel_size[0] + 1  # conv output
    applies = (
        conv.out_channels >= _STEM_MIN_CHANNELS
        and isinstance(bn, nn.BatchNorm2d)
        and bn.num_features == conv.out_channels
        and side >= 2
        and _bn_pool_relu_ok(bn, mods[2], mods[3], x)
    )
    return _mode(mods[:4]) if applies else None


def _hand_on(y: Tensor, consumer: nn.Module | None) -> Tensor:
    """The first stage's channels-last result as ``consumer`` would get it from the modules: in a
    convolution's memory format and, under CPU bf16 autocast, in bf16 (the kernel's bf16 output is
    the cast that autocast would make); anything else gets contiguous float32."""
    if isinstance(consumer, nn.Conv2d):
        if not consumer.weight.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous()
        return y
    return y.float().contiguous()


def run_sequential(modules: Sequence[nn.Module], x: Tensor, feeds: nn.Module | None = None) -> Tensor:
    """The modules in turn (an ``nn.Sequential``'s forward), through these kernels where they apply.

    ``feeds``: the module the result goes to next, if the caller knows it (a convolution lets a
    fused first stage hand on its output without a copy; see ``_hand_on``).
    """
    i = 0
    while i < len(modules):
        m = modules[i]
        mode = _stem_mode(modules[i : i + 4], x) if enabled() else None
        if mode is not None:
            conv, bn = modules[i], modules[i + 1]
            assert isinstance(conv, nn.Conv2d) and isinstance(conv.padding, tuple)
            assert isinstance(bn, nn.BatchNorm2d) and bn.num_batches_tracked is not None
            consumer = modules[i + 4] if i + 4 < len(modules) else feeds
            bf16_out = (
                isinstance(consumer, nn.Conv2d)
                and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16
            )
            args = (x, conv.weight, conv.bias, conv.padding[0], bn.weight, bn.bias, bn.running_mean,
                    bn.running_var, bn.momentum, bn.eps, bf16_out)  # fmt: skip
            if mode == "train":
                bn.num_batches_tracked.add_(1)
                y = _ConvBNMaxPoolReLU.apply(_state["ext"], *args)
            else:
                y = _state["ext"].conv_bn_pool_relu_forward(*args, False)[0]
            x = _hand_on(y, consumer)
            i += 4
            continue
        mode = _mode(modules[i : i + 2]) if enabled() and i + 1 < len(modules) else None
        if mode is not None and _bn_relu_applies(m, modules[i + 1], x):
            assert isinstance(m, nn.BatchNorm2d) and m.num_batches_tracked is not None
            bn_args = (x, m.weight, m.bias, m.running_mean, m.running_var, m.momentum, m.eps)
            if mode == "train":
                m.num_batches_tracked.add_(1)
                x = _BNReLUChannelsLast.apply(_state["ext"], *bn_args)
            else:
                x = _state["ext"].bn_relu_channels_last_forward(*bn_args, False)[0]
            i += 2
            continue
        if enabled() and i + 2 < len(modules) and _fusable(m, modules[i + 1], modules[i + 2], x):
            assert isinstance(m, nn.BatchNorm2d) and m.num_batches_tracked is not None
            m.num_batches_tracked.add_(1)  # what nn.BatchNorm2d.forward does in training
            x = _BNMaxPoolReLU.apply(x, m.weight, m.bias, m.running_mean, m.running_var, m.momentum, m.eps)
            i += 3
            continue
        if enabled() and _conv_applies(m, x):
            assert isinstance(m, nn.Conv2d) and isinstance(m.padding, tuple)
            x = _ConvSmallCin.apply(x, m.weight, m.bias, m.padding[0])
        else:
            x = m(x)
        i += 1
    return x
