"""The fused BatchNorm2d -> MaxPool2d(2, 2) -> ReLU training kernel computes what the three modules do."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from trainer.models import _fused, get_model
from trainer.models._blocks import MaxPool2d

NEEDS = _fused._CPU_FLAGS


@pytest.fixture
def kernel() -> Iterator[None]:
    """The kernel on for the test (built once per clone, ~30 s), off again afterwards."""
    if not set(NEEDS) <= _fused._cpu_flags():
        pytest.skip(f"the fused kernel needs {', '.join(NEEDS)}")
    used, why = _fused.prepare()
    assert used, f"an AVX-512 CPU, but the kernel was not built: {why}"
    yield
    _fused.prepare(False)


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

    (oneDNN's max-pool, which ``_blocks.MaxPool2d`` runs in eager mode, drops NaN windows to 0.)
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


def test_lenet_bn_trains_the_same_and_keeps_its_state_dict(kernel: None) -> None:
    """Five SGD steps of LeNet-5 (ReLU, max-pool, BN) with and without the kernel end at the same weights."""
    x = torch.randn(128, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1))
    states, losses = [], []
    for fused in (False, True):
        _fused.prepare(fused)
        torch.manual_seed(0)
        model = get_model("lenet5", activation="relu", pool="max", batchnorm=True)
        assert _fused.has_fusable_blocks(model)
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


def test_only_lenet_with_bn_and_max_pool_has_fusable_blocks() -> None:
    assert _fused.has_fusable_blocks(get_model("lenet5", activation="relu", pool="max", batchnorm=True))
    assert not _fused.has_fusable_blocks(get_model("lenet5"))  # seed 000: sigmoid, avg-pool, no BN
    assert not _fused.has_fusable_blocks(get_model("lenet5", activation="tanh", pool="max", batchnorm=True))
    assert not _fused.has_fusable_blocks(get_model("resnet18"))
