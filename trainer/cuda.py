"""CUDA settings of a training process: cuDNN autotuning and TF32, and what CUDA this torch has.

- ``cudnn.benchmark``: every training step has the same shapes (the last partial batch is dropped)
  and evaluation two (full batches and the last one), so timing cuDNN's algorithms once per shape
  pays back on every later step.
- TF32 for fp32 matmuls and convolutions (Ampere and later: fp32 range, 10-bit mantissa products,
  fp32 accumulation). Under bf16/fp16 autocast it speeds up what stays in fp32; in fp32 training
  it is most of the GPU's speed. Set through ``torch.set_float32_matmul_precision("high")`` and
  ``cudnn.allow_tf32``: torch >= 2.9's per-backend ``fp32_precision`` settings would make
  ``torch.get_float32_matmul_precision()``, which Inductor reads, raise.
"""

from __future__ import annotations

import os
import shutil

import torch


def configure_cuda(device: torch.device) -> str:
    """Turn on cuDNN autotuning and TF32 when ``device`` is CUDA; returns the line to print ('' elsewhere)."""
    if device.type != "cuda":
        return ""
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    return (
        f"CUDA: {torch.cuda.get_device_name(device)}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}); cudnn.benchmark on, TF32 matmul and conv on"
    )


def why_no_cuda() -> str | None:
    """None when torch can use a CUDA GPU here; else what is missing, in one line."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (no CUDA): install a CUDA build of torch"
    if torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()  # raises with the driver's reason (no driver, no device, too old)
    except Exception as e:
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use a GPU: {e}"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def c_compiler() -> str | None:
    """The C compiler Triton would use for its launchers (``CC``, else cc/gcc/clang on PATH)."""
    return os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
