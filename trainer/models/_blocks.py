"""Small building blocks shared by the model families (seed 004's ablation knobs)."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = ("sigmoid", "relu", "tanh")
POOLS = ("avg", "max")


def make_activation(name: str) -> nn.Module:
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"unknown activation '{name}'; choose one of: {', '.join(ACTIVATIONS)}")


def make_pool(name: str, kernel_size: int, stride: int | None = None) -> nn.Module:
    if name == "avg":
        return nn.AvgPool2d(kernel_size, stride)
    if name == "max":
        return nn.MaxPool2d(kernel_size, stride)
    raise ValueError(f"unknown pool '{name}'; choose one of: {', '.join(POOLS)}")
