"""Request images -> one float32 batch ``(n, C, H, W)`` for a model, with actionable errors.

Two kinds of image (classifier.v1 ``Image``):

* ``tensor``: float32 little-endian pixels in [0, 1], shape exactly the model's (C, H, W). Read
  with ``np.frombuffer`` (no copy for a single image); NaN/Inf are rejected by the batcher.
* ``encoded``: PNG or JPEG bytes, decoded with Pillow, converted to the model's channels (``L``
  luma for 1 channel, ``RGB`` for 3; alpha is dropped), resized to the model's H x W with bilinear
  filtering (the whole image, aspect ratio not kept, as the training pipelines do), scaled to [0, 1].
  The model folds its own mean/std normalization in, so nothing else is applied.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from server.errors import ServeError, invalid

MAX_IMAGE_PIXELS = 40_000_000  # width * height of one encoded image; bounds decode memory
FORMATS = ("PNG", "JPEG")
OFFLOAD_BYTES = 64 * 1024  # encoded payloads above this are decoded off the event loop


def check_count(n: int, max_images: int) -> None:
    if n == 0:
        raise invalid("no images in the request: send at least one")
    if n > max_images:
        raise invalid(
            f"{n} images in one request; this model takes at most {max_images} (max batch size): split it"
        )


def array_from_bytes(raw: bytes | memoryview, shape: tuple[int, ...], subject: str) -> np.ndarray:
    """Little-endian float32 bytes -> a read-only array of ``shape``, a view (no copy).

    ``subject`` names the tensor in the error (``"input 'input'"``, ``"image 2"``). NaN/Inf are
    checked in the batcher, over the whole batch.
    """
    want = 4 * math.prod(shape)
    if len(raw) != want:
        raise invalid(f"{subject}: {len(raw)} bytes, expected {want} (float32 x {list(shape)})")
    return np.frombuffer(raw, dtype="<f4").reshape(shape)


def array_from_values(values: Any, shape: tuple[int, ...], subject: str, what: str = "values") -> np.ndarray:
    """Numbers, flat or evenly nested (REST ``data``, a classify JSON tensor, gRPC ``fp32_contents``)
    -> a float32 array of ``shape``; ``what`` names them in the error."""
    count = math.prod(shape)
    try:
        x = np.asarray(values, dtype=np.float32).reshape(-1)
    except (ValueError, TypeError):
        raise invalid(f"{subject}: {what} must be numbers (a flat or evenly nested list)") from None
    if x.size != count:
        raise invalid(f"{subject}: {x.size} {what}, expected {count} for shape {list(shape)}")
    return x.reshape(shape)


def check_image_shape(shape: Sequence[int], expected: tuple[int, int, int], index: int) -> None:
    if tuple(shape) != expected:
        raise invalid(
            f"image {index}: tensor shape {list(shape)} does not match the model input (C, H, W) = {list(expected)}; "
            "send an encoded PNG/JPEG to have it resized"
        )


def tensor_to_array(
    shape: Sequence[int], data: bytes, expected: tuple[int, int, int], index: int
) -> np.ndarray:
    """One classifier.v1 Tensor -> read-only (C, H, W) float32 view of its bytes."""
    check_image_shape(shape, expected, index)
    return array_from_bytes(data, expected, f"image {index}")


def nonfinite_error(x: np.ndarray, what: str) -> ServeError:
    """The error for one request's inputs ``x`` (n, C, H, W) known to hold NaN/Inf.

    ``what="image"`` (classifier.v1) names the image and the (c, h, w) of its first bad pixel;
    anything else (``"input 'input'"``, KServe) is followed by the full (n, c, h, w) index.
    The check itself runs in the batcher, over the whole batch (see server.runtime.batcher).
    """
    bad = np.argwhere(~np.isfinite(x))[0].tolist()
    if what == "image":
        what, bad = f"image {bad[0]}", bad[1:]
    return invalid(f"{what} contains NaN or Inf (first at index {bad}); send finite pixels in [0, 1]")


def decode_image(data: bytes, expected: tuple[int, int, int], index: int) -> np.ndarray:
    """PNG/JPEG bytes -> (C, H, W) float32 in [0, 1] at the model's input size."""
    c, h, w = expected
    if not data:
        raise invalid(f"image {index}: empty encoded image (0 bytes)")
    if c not in (1, 3):
        raise invalid(
            f"image {index}: this model takes {c} channels; encoded images need 1 or 3, send a tensor"
        )
    mode = "L" if c == 1 else "RGB"
    try:
        src = Image.open(io.BytesIO(data), formats=FORMATS)
        if src.width * src.height > MAX_IMAGE_PIXELS:
            raise invalid(
                f"image {index}: {src.width}x{src.height} pixels is over the {MAX_IMAGE_PIXELS} limit; downscale it"
            )
        if src.format == "JPEG":
            src.draft(mode, (w, h))  # let the JPEG decoder downscale by 1/2..1/8 for free
        img = src.convert(mode)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img, dtype=np.float32)  # (H, W) or (H, W, 3)
    except ServeError:
        raise
    except Exception as e:  # untrusted bytes: Pillow fails on them in many ways, every one the client's
        raise invalid(f"image {index}: cannot decode as PNG or JPEG ({type(e).__name__}: {e})") from None
    arr = arr * np.float32(1 / 255)
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def build_batch(images: Sequence, expected: tuple[int, int, int], max_images: int) -> np.ndarray:
    """classifier.v1 ``Image`` messages -> (n, C, H, W) float32."""
    n = len(images)
    check_count(n, max_images)
    if n == 1:
        img = images[0]
        if img.WhichOneof("payload") == "tensor":
            x = tensor_to_array(img.tensor.shape, img.tensor.data, expected, 0)
            return x[None]  # (1, C, H, W), still a view of the request bytes
    out = np.empty((n, *expected), dtype=np.float32)
    for i, img in enumerate(images):
        kind = img.WhichOneof("payload")
        if kind == "tensor":
            out[i] = tensor_to_array(img.tensor.shape, img.tensor.data, expected, i)
        elif kind == "encoded":
            out[i] = decode_image(img.encoded, expected, i)
        else:
            raise invalid(f"image {i}: set either `encoded` (PNG/JPEG bytes) or `tensor`")
    return out


def encoded_bytes(images: Sequence) -> int:
    return sum(len(img.encoded) for img in images if img.WhichOneof("payload") == "encoded")
