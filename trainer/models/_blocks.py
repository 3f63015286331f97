"""Small building blocks shared by the model families (the ablation knobs: activation, pool)."""

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


def make_pool(name: str, kernel_size: int, stride: int | None = None, padding: int = 0) -> nn.Module:
    if name == "avg":
        return nn.AvgPool2d(kernel_size, stride, padding)
    if name == "max":
        return nn.MaxPool2d(kernel_size, stride, padding)
    raise ValueError(f"unknown pool '{name}'; choose one of: {', '.join(POOLS)}")


def activation_and_pool(
    activation: str, pool: str, kernel_size: int, stride: int | None = None, padding: int = 0
) -> list[nn.Module]:
    """The classic "activation, then pool", run as pool then activation when the pool is max.

    Why: each activation here is non-decreasing, so max-pooling commutes with it exactly,
    max(act(a), act(b)) = act(max(a, b)) (max-pool pads with -inf, so padding never wins), and the
    gradient reaches the same input: ties differ only where the activation's slope is zero (ReLU's
    zeros, saturated sigmoid/tanh). Pooling first runs the activation and its backward on a quarter
    of the elements (2x2 pools).
    Average pooling does not commute with a nonlinearity, so it keeps the textbook order.
    """
    act, pooling = make_activation(activation), make_pool(pool, kernel_size, stride, padding)
    return [pooling, act] if pool == "max" else [act, pooling]


def pooled_size(size: int, kernel_size: int, stride: int, padding: int = 0) -> int:
    """Spatial size after a conv/pool (floor mode): the textbook shape formula."""
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
