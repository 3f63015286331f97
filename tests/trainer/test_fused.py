"""The trainer's NCHW CPU kernels (first convolution; BN -> max-pool -> ReLU) compute what the modules do.

The channels-last ones (fmnist_net's first stage as one op; BN -> ReLU) are tested in
test_fused_channels_last.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer.models import _fused, get_model
from trainer.models._blocks import MaxPool2d

NEEDS = _fused._CPU_FLAGS


def block(channels: int, seed: int = 0) -> nn.Sequential:
    """BN with random (also negative) scales and shifts, so the max of a window may be its smallest input."""
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return nn.Sequential(bn, MaxPool2d(2, 2), nn.ReLU(inplace=True))


def run_both(seq: nn.Sequential, x: torch.Tensor, grad_seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Forward + backward of ``seq`` through the modules, then through the kernel, from the same state."""
    results = []
    for fused in (False, True):
        s = copy.deepcopy(seq)
        xi = x.clone().requires_grad_()
        y = _fused.run_sequential(s, xi) if fused else s(xi)
        assert (type(y.grad_fn).__name__ == "_BNMaxPoolReLUBackward") == fused
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed))
        y.backward(g)
        bn = s[0]
        results.append(
            {
                "y": y.detach(),
                "dx": xi.grad,
                "dweight": bn.weight.grad,
                "dbias": bn.bias.grad,
                "running_mean": bn.running_mean,
                "running_var": bn.running_var,
                "num_batches_tracked": bn.num_batches_tracked,
            }
        )
    return results


@pytest.mark.parametrize(
    "shape",
    [(256, 6, 28, 28), (8, 16, 10, 10), (5, 3, 9, 11), (2, 4, 6, 70), (3, 2, 2, 2)],
    ids=["lenet-conv1", "lenet-conv2", "odd-sizes", "wider-than-a-vector", "one-window"],
)
def test_same_outputs_gradients_and_running_stats_as_the_modules(
    kernel: None, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(2)
    x = torch.randn(shape) * 3 + 1
    ref, got = run_both(block(shape[1]), x)
    for key in ref:
        scale = ref[key].abs().max().item() + 1e-6
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=2e-5 * scale, msg=key)
    assert got["num_batches_tracked"].item() == 1


def test_ties_send_the_gradient_to_the_first_maximum_as_aten_does(kernel: None) -> None:
    """Equal pixels (a blank background, repeated values) tie; the gradient must reach the same one."""
    torch.manual_seed(3)
    x = torch.randint(0, 3, (16, 4, 12, 12)).float()
    x[:, :, :6] = 0.0  # a blank half
    ref, got = run_both(block(4, seed=4), x)
    torch.testing.assert_close(got["dx"], ref["dx"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["y"], ref["y"], rtol=1e-5, atol=1e-5)


def test_nan_input_stays_nan(kernel: None) -> None:
    """The trainer stops on a NaN loss, so a NaN must reach the output, as through ATen's max-pool.

    (oneDNN's max-pool skips NaN; ``_blocks.MaxPool2d`` sends a tensor with NaN to ATen's.)
    """
    x = torch.randn(4, 3, 8, 8)
    x[1, 2, 3, 4] = float("nan")
    aten = block(3)
    aten[1] = nn.MaxPool2d(2, 2)
    ref, got = run_both(aten, x)
    assert torch.equal(torch.isnan(got["y"]), torch.isnan(ref["y"]))
    assert torch.isnan(got["y"][:, 2]).all() and not torch.isnan(got["y"][:, :2]).any()


def test_runs_twice_bit_identically(kernel: None) -> None:
    """Deterministic on the CPU, which resume-equivalence relies on."""
    x = torch.randn(64, 6, 28, 28)
    a, b = run_both(block(6), x)[1], run_both(block(6), x)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ["eval", "channels_last", "bf16_input", "turned_off", "avg_pool"])
def test_modules_run_unchanged_where_the_kernel_does_not_apply(kernel: None, case: str) -> None:
    seq = block(6)
    x = torch.randn(8, 6, 12, 12)
    if case == "eval":
        seq.eval()
    elif case == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case == "bf16_input":  # what a convolution hands on under bf16 autocast
        x = x.bfloat16()
    elif case == "turned_off":
        _fused.prepare(False)
    elif case == "avg_pool":
        seq[1] = nn.AvgPool2d(2)
    expected = copy.deepcopy(seq)(x.clone())
    got = _fused.run_sequential(seq, x.clone().requires_grad_())
    assert type(got.grad_fn).__name__ != "_BNMaxPoolReLUBackward"
    assert torch.equal(got.detach(), expected.detach())


def conv_both(conv: nn.Conv2d, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """(y, dweight, dbias) of ``conv`` through the module, then through the kernel."""
    results = []
    for fused in (False, True):
        c = copy.deepcopy(conv)
        y = _fused.run_sequential(nn.Sequential(c), x) if fused else c(x)
        assert (type(y.grad_fn).__name__ == "_ConvSmallCinBackward") == fused
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
        results.append((y.detach(), c.weight.grad, c.bias.grad if c.bias is not None else torch.zeros(1)))
    return results


@pytest.mark.parametrize(
    ("cin", "cout", "size", "k", "pad", "bias"),
    [
        (1, 6, 28, 5, 2, False),
        (3, 6, 32, 5, 2, True),
        (1, 7, 40, 3, 1, True),
        (3, 30, 70, 5, 0, False),
        (2, 1, 5, 5, 0, True),
    ],  # fmt: skip
    ids=["lenet-fmnist", "lenet-cifar", "odd-channels", "wide-rows", "one-pixel-out"],
)
def test_first_convolution_matches_conv2d(
    kernel: None, cin: int, cout: int, size: int, k: int, pad: int, bias: bool
) -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(cin, cout, k, padding=pad, bias=bias)
    x = torch.randn(9, cin, size, size)
    ref, got = conv_both(conv, x)
    for name, a, b in zip(("y", "dweight", "dbias"), got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (b.abs().max().item() + 1e-6), msg=name)


@pytest.mark.parametrize("case", ["input_needs_grad", "stride_2", "eval", "five_channels", "turned_off"])
def test_convolutions_it_does_not_cover_run_as_modules(kernel: None, case: str) -> None:
    conv = nn.Conv2d(5 if case == "five_channels" else 1, 6, 5, stride=2 if case == "stride_2" else 1)
    x = torch.randn(4, conv.in_channels, 12, 12, requires_grad=case == "input_needs_grad")
    if case == "eval":
        conv.eval()
    if case == "turned_off":
        _fused.prepare(False)
    y = _fused.run_sequential(nn.Sequential(conv), x)
    assert type(y.grad_fn).__name__ != "_ConvSmallCinBackward"
    assert torch.equal(y, conv(x))


@pytest.mark.parametrize(
    "knobs",
    [{"activation": "relu", "pool": "max", "batchnorm": True}, {}],
    ids=["relu-max-bn", "seed-000-sigmoid-avg"],
)
def test_lenet_trains_the_same_and_keeps_its_state_dict(kernel: None, knobs: dict[str, object]) -> None:
    """Five SGD steps of LeNet-5 with and without the kernels end at the same weights."""
    x = torch.randn(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1))
    states, losses = [], []
    for fused in (False, True):
        _fused.prepare(fused)
        torch.manual_seed(0)
        model = get_model("lenet5", **knobs)
        assert _fused.has_fused_ops(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        losses.append(loss.item())
        states.append(model.state_dict())
    assert list(states[0]) == list(states[1])
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for key in states[0]:
        torch.testing.assert_close(states[1][key], states[0][key], rtol=1e-4, atol=1e-5, msg=key)


def test_lenet_and_fmnist_net_run_the_kernels() -> None:
    assert _fused.has_fused_ops(get_model("lenet5", activation="relu", pool="max", batchnorm=True))
    assert _fused.has_fused_ops(get_model("lenet5"))  # seed 000's: its first convolution
    assert _fused.has_fused_ops(get_model("lenet5", in_channels=3, image_size=32))
    assert _fused.has_fused_ops(get_model("fmnist_net"))  # its first stage
    for arch in ("resnet18", "alexnet", "vgg11"):
        assert not _fused.has_fused_ops(get_model(arch))


def test_without_avx512_or_a_compiler_the_modules_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never an error: prepare() says why, once, and training runs PyTorch's ops."""
    for key in ("ext", "failed", "enabled"):
        monkeypatch.setitem(_fused._state, key, None if key != "enabled" else False)
    monkeypatch.setattr(_fused, "_cpu_flags", lambda: {"sse2", "avx2"})
    assert _fused.prepare() == (False, "the CPU lacks avx512f, avx512bw, avx512vl")

    monkeypatch.setitem(_fused._state, "failed", None)
    monkeypatch.setattr(_fused, "_cpu_flags", lambda: set(NEEDS))
    calls = []

    def no_compiler() -> None:
        calls.append(1)
        raise RuntimeError("Error building extension 'cnnstack_cpu_kernels'\nc++: command not found")

    monkeypatch.setattr(_fused, "_build", no_compiler)
    for _ in range(2):
        used, why = _fused.prepare()
        assert not used and why == "build failed (RuntimeError: c++: command not found)"
    assert calls == [1]  # not retried
    seq, x = block(6), torch.randn(4, 6, 8, 8)
    y = _fused.run_sequential(seq, x)
    assert type(y.grad_fn).__name__ != "_BNMaxPoolReLUBackward"
