"""Autograd wrappers of the channels-last CPU kernels (csrc/conv_bn_pool_relu.cpp, bn_relu_cl.cpp,
add_maxpool_cl.cpp, global_pool_cl.cpp). ``_fused`` decides where they apply and passes the built
extension (``ext``) in; each backward is the kernel's own.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _ConvBNMaxPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        ext: Any,
        x: Tensor,
        conv_weight: Tensor,
        conv_bias: Tensor | None,
        padding: int,
        bn_weight: Tensor,
        bn_bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        momentum: float,
        eps: float,
        bf16_out: bool,
    ) -> Tensor:
        # (B, C, H, W) -> (B, O, Ho, Wo) channels-last; code: (B, Ho, Wo, O) uint8
        out, code, mean, invstd = ext.conv_bn_pool_relu_forward(
            x, conv_weight, conv_bias, padding, bn_weight, bn_bias, running_mean, running_var, momentum, eps,
            bf16_out, True,
        )  # fmt: skip
        ctx.ext = ext
        ctx.save_for_backward(code, mean, invstd, x, conv_weight, conv_bias, bn_weight)
        ctx.padding = padding
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        code, mean, invstd, x, conv_weight, conv_bias, bn_weight = ctx.saved_tensors
        dcw, dcb, dbw, dbb = ctx.ext.conv_bn_pool_relu_backward(
            grad_out.contiguous(memory_format=torch.channels_last), code, mean, invstd, x, conv_weight,
            conv_bias, ctx.padding, bn_weight,
        )  # fmt: skip
        return None, None, dcw, dcb if conv_bias is not None else None, None, dbw, dbb, *([None] * 5)


class _BNReLUChannelsLast(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        ext: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        momentum: float,
        eps: float,
    ) -> Tensor:
        # (B, C, H, W) channels-last -> the same shape, layout and dtype (float32 or bfloat16)
        y, mean, invstd = ext.bn_relu_channels_last_forward(
            x, weight, bias, running_mean, running_var, momentum, eps, True
        )
        ctx.ext = ext
        ctx.save_for_backward(y, x, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        y, x, weight, mean, invstd = ctx.saved_tensors
        dx, dweight, dbias = ctx.ext.bn_relu_channels_last_backward(
            grad_y.to(x.dtype).contiguous(memory_format=torch.channels_last), y, x, weight, mean, invstd
        )
        return None, dx, dweight, dbias, None, None, None, None


class _AddMaxPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ext: Any, a: Tensor, b: Tensor) -> Tensor:  # type: ignore[override]
        # (B, C, H, W) twice, channels-last -> (B, C, H/2, W/2) channels-last
        out, code = ext.add_maxpool_channels_last_forward(a, b)
        ctx.ext = ext
        ctx.save_for_backward(code)
        ctx.size = list(a.shape)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, Tensor]:  # type: ignore[override]
        (code,) = ctx.saved_tensors
        g = grad_out.contiguous(memory_format=torch.channels_last)
        dx = ctx.ext.add_maxpool_channels_last_backward(g, code, ctx.size)
        return None, dx, dx  # the gradient of a sum reaches both addends unchanged (as AddBackward's)


class _GlobalMaxAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, ext: Any, x: Tensor) -> Tensor:  # type: ignore[override]
        # (B, C, H, W) channels-last -> (B, 2C, 1, 1): max over H, W, then the mean
        out, argmax = ext.global_pool_channels_last_forward(x)
        ctx.ext = ext
        ctx.save_for_backward(argmax)
        ctx.size = list(x.shape)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        (argmax,) = ctx.saved_tensors
        return None, ctx.ext.global_pool_channels_last_backward(grad_out, argmax, ctx.size)
