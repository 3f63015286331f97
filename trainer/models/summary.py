"""The "shape walk": what each layer does to a batch of one, plus parameter counts.

``summarize`` runs one forward pass on zeros with forward hooks on every leaf module and prints a
table (name, type, output shape, parameters) and totals; ``describe_archs`` lists every registered
architecture with its parameter count for a given dataset shape (``python -m trainer --list-archs``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from trainer.models._api import count_parameters, get_model, list_models


def _shape(out: Any) -> str:
    if isinstance(out, Tensor):
        return str(tuple(out.shape))
    if isinstance(out, (tuple, list)):
        return "[" + ", ".join(_shape(o) for o in out) + "]"
    return type(out).__name__


def shape_walk(
    model: nn.Module, input_shape: tuple[int, ...]
) -> tuple[list[tuple[str, str, str, int]], Tensor]:
    """Rows (name, type, output shape, params) in call order for a (1, *input_shape) batch, and the output.

    A leaf called several times (a shared ReLU) gets a row per call; its parameters count once.
    """
    rows: list[tuple[str, str, str, int]] = []
    seen: set[str] = set()
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, _inputs: Any, output: Any) -> None:
            params = 0 if name in seen else sum(p.numel() for p in module.parameters(recurse=False))
            seen.add(name)
            rows.append((name, type(module).__name__, _shape(output), params))

        return hook

    for name, module in model.named_modules():
        if not any(True for _ in module.children()):  # leaf
            handles.append(module.register_forward_hook(hook_for(name or type(model).__name__)))

    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        x = torch.zeros((1, *input_shape), device=device)  # (1, C, H, W)
        # eval: BatchNorm cannot normalize a batch of one in train mode, and stats must not move.
        model.eval()
        with torch.no_grad():
            out = model(x)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return rows, out


def summarize(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """A text table of every leaf layer's output shape and parameter count, with totals."""
    rows, out = shape_walk(model, tuple(input_shape))
    header = ("layer", "type", "output shape", "params")
    table = [header, *((n, t, s, f"{p:,}") for n, t, s, p in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(4)]

    def fmt(r: tuple[str, str, str, str]) -> str:
        return f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}"

    rule = "-" * len(fmt(header))
    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines = [
        f"{type(model).__name__} on input {(1, *input_shape)}",
        rule,
        fmt(header),
        rule,
        *(fmt(r) for r in table[1:]),
        rule,
        f"output shape: {_shape(out)}",
        f"total params: {total:,}",
        f"trainable params: {trainable:,}",
    ]
    return "\n".join(lines)


def describe_archs(in_channels: int, image_size: int, num_classes: int) -> list[tuple[str, int]]:
    """(name, parameter count) of every registered architecture built with its default knobs."""
    return [
        (
            name,
            count_parameters(
                get_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
            ),
        )
        for name in list_models()
    ]
