"""Small building blocks shared by the model families (seed 004's ablation knobs)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

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


def make_pool(name: str, kernel_size: int, stride: int | None = None, padding: int = 0) -> nn.Module:
    if name == "avg":
        return nn.AvgPool2d(kernel_size, stride, padding)
    if name == "max":
        return MaxPool2d(kernel_size, stride, padding)
    raise ValueError(f"unknown pool '{name}'; choose one of: {', '.join(POOLS)}")


def activation_and_pool(
    activation: str, pool: str, kernel_size: int, stride: int | None = None, padding: int = 0
) -> list[nn.Module]:
    """Seed 004's "activation, then pool", run as pool then activation when the pool is max.

    Why: each activation here is non-decreasing, so max-pooling commutes with it exactly,
    max(act(a), act(b)) = act(max(a, b)) (max-pool pads with -inf, so padding never wins), and the
    gradient reaches the same input: ties differ only where the activation's slope is zero (ReLU's
    zeros, saturated sigmoid/tanh). Pooling first runs the activation and its backward on a quarter
    of the elements (2x2 pools): 0.4 ms of a ~20 ms LeNet-5 ReLU+BN step at batch 256 on 2 cores.
    Average pooling does not commute with a nonlinearity, so it keeps the seed's order.
    """
    act, pooling = make_activation(activation), make_pool(pool, kernel_size, stride, padding)
    return [pooling, act] if pool == "max" else [act, pooling]


def _pair(v: int | tuple[int, ...]) -> list[int]:
    return [v, v] if isinstance(v, int) else list(v)


def eager_cpu_nchw(x: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> bool:
    """A (B, C, H, W) CPU tensor contiguous in ``memory_format`` (NCHW unless told), in eager mode:
    where our own CPU paths may replace an op (export, tracing, scripting and compile see the plain op)."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.is_contiguous(memory_format=memory_format)
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.compiler.is_compiling()
        and not torch.onnx.is_in_onnx_export()
    )


def _onednn_pool_applies(x: Tensor) -> bool:
    """Contiguous NCHW float on CPU, in eager mode, with oneDNN on."""
    return (
        eager_cpu_nchw(x)
        and x.dtype in (torch.float32, torch.bfloat16)
        and bool(torch.backends.mkldnn.enabled)
        and torch.backends.mkldnn.is_available()
    )


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that runs oneDNN's kernel on contiguous NCHW float tensors on the CPU.

    Why: ATen's NCHW max-pool kernel is scalar. On LeNet-5's (256, 6, 28, 28) activations it took a
    fifth of a training step on 2 cores (4.1 ms forward + backward; 2.0 ms through oneDNN, forward
    alone 3.4 ms vs 0.5 ms). Outputs are identical, and so are gradients of non-overlapping pools;
    where windows overlap (3x3/2) a shared pixel's gradients are summed in another order.
    Channels-last tensors keep ATen's kernel, which is vectorized over channels and faster there;
    ONNX export, tracing and ``torch.compile`` see the plain op. State and repr are nn.MaxPool2d's.
    oneDNN skips NaN (a window of NaNs gives -3.4e38, which a ReLU turns into 0), which would hide
    a diverged run from the trainer's NaN-loss stop: a tensor whose sum is NaN takes ATen's kernel,
    which propagates it (the sum: ~0.05 ms on (256, 6, 28, 28), against ~1.5 ms for the pool).
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.return_indices or not _onednn_pool_applies(x) or bool(torch.isnan(x.detach().sum())):
            return super().forward(x)
        stride = self.stride if self.stride is not None else self.kernel_size
        y = torch.mkldnn_max_pool2d(  # (B, C, H', W'), autograd through to_mkldnn/to_dense
            x.to_mkldnn(),
            _pair(self.kernel_size),
            _pair(stride),
            _pair(self.padding),
            _pair(self.dilation),
            self.ceil_mode,
        )
        return y.to_dense()


def pooled_size(size: int, kernel_size: int, stride: int, padding: int = 0) -> int:
    """Spatial size after a conv/pool (floor mode): the seed's shape formula."""
    return (size + 2 * padding - kernel_size) // stride + 1


def conv_bn_relu(
    cin: int, cout: int, kernel_size: int, stride: int = 1, batchnorm: bool = True
) -> nn.Sequential:
    """Conv ("same" padding for odd kernels) [+ BatchNorm] + ReLU; the conv drops its bias under BN."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel_size, stride, kernel_size // 2, bias=not batchnorm)
    ]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def init_weights(model: nn.Module, linear_std: float | None = None) -> None:
    """torchvision's init for ReLU nets: He-normal convs, BN at identity, zero biases.

    ``linear_std`` draws Linear weights from N(0, std) (torchvision's VGG uses 0.01); ``None`` keeps
    PyTorch's default Linear init.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)
