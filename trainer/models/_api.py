"""The model registry, in the style of torchvision's ``models/_api.py``.

Every builder takes the same keyword arguments describing the dataset::

    builder(in_channels: int, num_classes: int, image_size: int, **arch_specific) -> nn.Module

so that ``get_model(ckpt["arch"], **ckpt["model_args"])`` rebuilds any checkpoint's model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

BUILTIN_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(name: str | None = None) -> Callable[[F], F]:
    def wrapper(fn: F) -> F:
        key = name if name is not None else fn.__name__
        if key in BUILTIN_MODELS:
            raise ValueError(f"an entry is already registered under the name '{key}'")
        BUILTIN_MODELS[key] = fn
        return fn

    return wrapper


def _ensure_loaded() -> None:
    # Importing the package registers every family (one module per family).
    from trainer import models  # noqa: F401


def list_models() -> list[str]:
    _ensure_loaded()
    return sorted(BUILTIN_MODELS)


def get_model_builder(name: str) -> Callable[..., nn.Module]:
    _ensure_loaded()
    try:
        return BUILTIN_MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown arch '{name}'; choose one of: {', '.join(sorted(BUILTIN_MODELS))}"
        ) from None


def get_model(name: str, **kwargs: Any) -> nn.Module:
    """Build ``name`` with ``in_channels``, ``num_classes``, ``image_size`` and arch knobs."""
    return get_model_builder(name)(**kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
