"""onnxruntime's CUDA execution provider, proven by running a convolution rather than assumed.

Why a convolution: onnxruntime-gpu lists ``CUDAExecutionProvider`` wherever the wheel is installed;
a session whose CUDA provider fails to start runs on CPU with only a log line; and cuDNN 9 is
loaded lazily, on the first convolution. A session that merely opens on CUDA therefore proves
neither the GPU nor cuDNN. ``probe_gpu`` builds a 3x3 Conv + Relu, runs it on one GPU with every
fallback off, compares the result with numpy and checks that the Conv node was placed on CUDA.
When something is missing, ``missing_libraries`` names the libraries the dynamic loader cannot
load (the driver's libcuda, CUDA 13, cuDNN 9), so the error says what to install.

The NVIDIA pip wheels (``onnxruntime-gpu[cuda,cudnn]``) put those libraries under
site-packages/nvidia, where the loader does not look: ``preload_libraries`` loads them first
(``onnxruntime.preload_dlls``).

Neither happens where CUDA cannot be tried at all (``unusable_reason``): the CPU build of
onnxruntime, or a host without the NVIDIA driver. There ``--device auto`` says so in one line and
serves on CPU, with no NVIDIA library loaded and no failed CUDA session logged by onnxruntime.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import importlib.util
import io
import logging
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort

from server.runtime.devices import ALGO_SEARCHES
from server.runtime.placement import RECORD_KEY, misplaced_convs, recorded_placement

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# HEURISTIC: cuDNN's heuristics choose a convolution algorithm for each new input shape at almost no
# cost. EXHAUSTIVE times every algorithm the first time a shape is seen (in a server: each new
# batch size): a latency spike per shape, for an algorithm that may be somewhat faster.
DEFAULT_ALGO_SEARCH = "HEURISTIC"
DRIVER_LIBRARY = "libcuda.so.1"
CUDNN_LIBRARIES = (
    "libcudnn.so.9",
    "libcudnn_ops.so.9",
    "libcudnn_cnn.so.9",
    "libcudnn_engines_precompiled.so.9",
)
PROVIDER_LIBRARY = "libonnxruntime_providers_cuda.so"


class DeviceError(RuntimeError):
    """The requested device cannot be used; the message says why and what to do."""


def provider_options(device_id: int, algo_search: str = DEFAULT_ALGO_SEARCH) -> dict[str, str]:
    if algo_search not in ALGO_SEARCHES:
        raise ValueError(f"cudnn_conv_algo_search must be one of {ALGO_SEARCHES}, got {algo_search!r}")
    return {"device_id": str(device_id), "cudnn_conv_algo_search": algo_search}


def pip_library_dirs() -> list[Path]:
    """The lib/ folders of NVIDIA pip wheels (nvidia-cudnn-cu13, nvidia-cuda-runtime, ...) importable here."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return sorted({p for root in roots for p in Path(root).glob("*/lib") if p.is_dir()})


def preload_libraries(ort_module: ModuleType | None = None) -> list[str]:
    """``onnxruntime.preload_dlls()`` where NVIDIA pip wheels are installed; returns what it complained
    about (one line each), nothing when there was nothing to load."""
    o = ort_module or ort
    if not pip_library_dirs() or not hasattr(o, "preload_dlls"):
        return []
    out = io.StringIO()
    # preload_dlls print()s its complaints: keep them off stdout, which carries the server's events.
    with contextlib.redirect_stdout(out):
        try:
            o.preload_dlls()
        except Exception as e:  # a broken wheel must not stop a server that may run on CPU
            print(f"onnxruntime.preload_dlls() failed: {type(e).__name__}: {e}")
    return [line.strip() for line in out.getvalue().splitlines() if line.strip()]


def _load_error(candidates: list[str]) -> str | None:
    """None when the first loadable candidate loads; else the loader's message for the last one."""
    error = None
    for path in candidates:
        try:
            ctypes.CDLL(path)
            return None
        except OSError as e:
            error = str(e)
    return error


def missing_libraries(ort_module: ModuleType | None = None) -> list[str]:
    """What the dynamic loader cannot load of what the CUDA provider needs, one line each (Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    o = ort_module or ort
    problems = []
    if _load_error([DRIVER_LIBRARY]):
        problems.append(
            f"{DRIVER_LIBRARY} (the NVIDIA driver) cannot be loaded: no NVIDIA driver on this host, "
            "or a container started without GPU access"
        )
    provider = Path(str(o.__file__)).parent / "capi" / PROVIDER_LIBRARY
    if not provider.is_file():
        problems.append(f"this onnxruntime has no {PROVIDER_LIBRARY}: install onnxruntime-gpu")
    else:
        error = _load_error([str(provider)])  # names its first missing dependency, e.g. libcublasLt.so.13
        if error and not (DRIVER_LIBRARY in error and problems):
            problems.append(f"{PROVIDER_LIBRARY} cannot be loaded: {error}")
    dirs = pip_library_dirs()
    for name in CUDNN_LIBRARIES:
        error = _load_error([str(d / name) for d in dirs if (d / name).is_file()] + [name])
        if error:
            problems.append(f"cuDNN 9 cannot be loaded: {error}")
            break
    return problems


def _diagnosis(o: ModuleType) -> str:
    missing = missing_libraries(o)
    hint = (
        f"onnxruntime-gpu {getattr(o, '__version__', '?')} needs an NVIDIA driver, CUDA 13 and cuDNN 9 "
        "(pip install 'onnxruntime-gpu[cuda,cudnn]' brings CUDA and cuDNN)"
    )
    return "; ".join([*missing, hint])


def probe_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(input, Conv weight, Conv bias, expected output) of the probe, from a fixed seed."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), (2, 3)
    )
    expected = np.maximum(np.einsum("nchwij,ocij->nohw", windows, w) + b[None, :, None, None], 0)
    return x, w, b, expected.astype(np.float32)


# The probe model: a 3x3 Conv ("probe_conv", the weight and bias of probe_arrays, padding 1) then
# Relu, (1, 3, 8, 8) -> (1, 4, 8, 8), IR 10 / opset 17; serialized once with onnx.helper so that
# the server does not need the onnx package (it is not in [serve]). tests/server/test_share.py
# rebuilds it with onnx from probe_arrays and compares.
CONV_PROBE_MODEL = base64.b64decode(
    "CAo68QQKMQoBeAoBdwoBYhIBYxoKcHJvYmVfY29udiIEQ29udioRCgRwYWRzQAFAAUABQAGgAQcKGAoBYxIBeRoKcHJvYmVf"
    "cmVsdSIEUmVsdRIKY3VkYV9wcm9iZSrAAwgECAMIAwgDEAFCAXdKsANFHYs/NUZPvcX1kL4SVtI/2i2kv6vtFb8D9/G+MxoW"
    "P3HdKb/0CB2/iXXNv6S2Oj8mX04/p+fzvpZCJz5udaW/fpHxvrJgsD///Ao+/9wTQHeFSb+FjRQ/rjJIvnDZED9FTey7rqoP"
    "vyIcXr/yOURAFmeevfgQAcCwCia/A5QtP40AAL8aI64/lk6AP6n+G75KxvG+Up2AvwIxM7/0j7y/qCmaPxWcyz8iyaC/Y0GX"
    "v5le4r8nv3a/Oc5GwDI2kr9TAaY//fuwvgjGWj8nWvq+jF3hP83/Sz7OlcO+6lojQC0hpr4MUZy/f8FOPn0RH71TfYg/M/Br"
    "v+4BTj+5TVo/ju0qv3ApJz4prFS/uCEWQH5CNL9g+ee+YW2Iv882sb6vi8C71I1EP9pIHL+HOz6+hk+1v6LQU78nXzBAdUeF"
    "P2gLSL/VL6u/zL95vwixsby6Pg49a44+v3mupL+AELY/UUPnPmHHv74D9WG+T48HvyvoO8Ac4Ow9mQeJv/ZXgL896CO/IHg7"
    "P/TTlb+Jlre/WM0jP1IeQT+ufHW/S/kPP9lQlb74Qpo+JWehv5I4VT8qGQgEEAFCAWJKEGQEmj87FyM/Xu8OP/VsccBaGwoB"
    "eBIWChQIARIQCgIIAQoCCAMKAggICgIICGIbCgF5EhYKFAgBEhAKAggBCgIIBAoCCAgKAggIQgQKABAR"
)


def probe_case() -> tuple[bytes, np.ndarray, np.ndarray]:
    """(model, input, expected output): a 3x3 Conv with bias, padding 1, then Relu, on (1, 3, 8, 8)."""
    x, _, _, expected = probe_arrays()
    return CONV_PROBE_MODEL, x, expected


def probe_gpu(
    device_id: int, algo_search: str = DEFAULT_ALGO_SEARCH, ort_module: ModuleType | None = None
) -> str | None:
    """None when a convolution ran on CUDA device ``device_id`` with the right result; else why not."""
    o = ort_module or ort
    available = o.get_available_providers()
    if CUDA not in available:
        return (
            f"this onnxruntime ({getattr(o, '__version__', '?')}, providers {available}) has no "
            "CUDAExecutionProvider: install onnxruntime-gpu[cuda,cudnn] instead of onnxruntime"
        )
    model, x, expected = probe_case()
    so = o.SessionOptions()
    so.log_severity_level = 3  # its own failure is reported below, with the missing library named
    so.add_session_config_entry(RECORD_KEY, "1")
    try:
        # enable_fallback=0: a provider that fails to start raises instead of retrying on CPU.
        session = o.InferenceSession(
            model,
            sess_options=so,
            providers=[(CUDA, provider_options(device_id, algo_search))],
            enable_fallback=0,
        )
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
        return f"the CUDA execution provider did not load on GPU {device_id} ({failure}): {_diagnosis(o)}"
    if list(session.get_providers())[:1] != [CUDA]:
        got = list(session.get_providers())
        return f"the CUDA execution provider did not load (the session got {got}): {_diagnosis(o)}"
    session.disable_fallback()
    try:
        (y,) = session.run(None, {"x": x})
    except Exception as e:  # cuDNN loads here, on the first convolution
        failure = f"{type(e).__name__}: {e}"
        return f"the CUDA execution provider did not run a convolution on GPU {device_id} ({failure}): {_diagnosis(o)}"
    y = np.asarray(y)
    # The CUDA provider computes fp32 convolutions in TF32 on Ampere and later: about 1e-3 relative.
    if y.shape != expected.shape or not np.allclose(y, expected, rtol=1e-2, atol=2e-2):
        worst = float(np.max(np.abs(y - expected))) if y.shape == expected.shape else float("nan")
        return (
            f"a convolution on GPU {device_id} gave a wrong result (shape {list(y.shape)}, "
            f"max abs error {worst:.3g})"
        )
    placed = recorded_placement(session)
    if placed is not None and misplaced_convs(placed):
        return f"the probe's Conv ran on {misplaced_convs(placed)[0].provider}, not on CUDA GPU {device_id}"
    return None


def unusable_reason(ort_module: ModuleType | None = None) -> str | None:
    """Why CUDA cannot be tried at all, found without loading anything NVIDIA: an onnxruntime
    without the CUDA provider (the CPU install), or no NVIDIA driver on this host. None when the
    probe is worth running. Checked before the pip CUDA libraries are preloaded and before a CUDA
    session is attempted, whose failure onnxruntime itself logs as a red error on stderr."""
    o = ort_module or ort
    version = getattr(o, "__version__", "?")
    if CUDA not in o.get_available_providers():
        return (
            f"this onnxruntime ({version}) is the CPU build, without the CUDA execution provider "
            "(the GPU install has onnxruntime-gpu[cuda,cudnn] instead)"
        )
    error = driver_error()
    if error:
        return f"no NVIDIA driver: {error} (a host without a GPU, or a container started without GPU access)"
    return None


def driver_error() -> str | None:
    """The loader's message when the NVIDIA driver's libcuda cannot be loaded (Linux); else None."""
    return _load_error([DRIVER_LIBRARY]) if sys.platform.startswith("linux") else None


def resolve_device(
    device: str,
    gpus: tuple[int, ...] = (0,),
    algo_search: str = DEFAULT_ALGO_SEARCH,
    ort_module: ModuleType | None = None,
) -> str:
    """The execution provider for ``device`` ("auto" | "cpu" | "cuda"): CUDA only once a convolution
    ran correctly on every GPU in ``gpus``. ``cuda`` raises DeviceError with the reason; ``auto``
    logs it in one line and returns CPU. Where CUDA cannot be tried (``unusable_reason``), nothing
    NVIDIA is preloaded or probed."""
    if device == "cpu":
        return CPU
    unusable = unusable_reason(ort_module)
    if unusable:
        if device == "cuda":
            raise DeviceError(f"--device cuda: {unusable}; use --device auto to fall back to CPU")
        log.info("device auto: serving on CPU, because %s", unusable)
        return CPU
    for line in preload_libraries(ort_module):
        log.warning("preloading the NVIDIA pip libraries: %s", line)
    reason = None
    for gpu in gpus:
        reason = probe_gpu(gpu, algo_search, ort_module)
        if reason:
            break
    if reason is None:
        log.info(
            "CUDA: a convolution ran correctly on GPU(s) %s (cudnn_conv_algo_search %s)",
            list(gpus),
            algo_search,
        )
        return CUDA
    if device == "cuda":
        raise DeviceError(f"--device cuda: {reason}; use --device auto to fall back to CPU")
    # An NVIDIA driver and the GPU build are here, yet no convolution ran: something is broken.
    log.warning("device auto: serving on CPU, because %s", reason)
    return CPU
