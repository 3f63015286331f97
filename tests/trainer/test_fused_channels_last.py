"""fmnist_net's channels-last CPU kernels compute what the modules do: its first stage (conv -> BN ->
max-pool -> ReLU) as one op; BN -> ReLU; a residual sum's 2x2 max-pool; the global max + mean head.
All on channels-last float32 and bfloat16 tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from trainer.models import _fused, get_model
from trainer.models._blocks import MaxPool2d

STEM_OP, BN_RELU_OP = "_ConvBNMaxPoolReLUBackward", "_BNReLUChannelsLastBackward"
ADD_POOL_OP, HEAD_OP = "_AddMaxPoolBackward", "_GlobalMaxAvgPoolBackward"


def graph_ops(y: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind ``y``."""
    names, todo, seen = set(), [y.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def with_random_affine(bn: nn.BatchNorm2d, seed: int) -> nn.BatchNorm2d:
    """Random (also negative) scales and shifts: a window's max may be its smallest input."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(bn.num_features, generator=gen))
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
    return bn


def stem(cin: int, cout: int, k: int, pad: int, bias: bool, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    bn = with_random_affine(nn.BatchNorm2d(cout), seed)
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=pad, bias=bias), bn, MaxPool2d(2), nn.ReLU(inplace=True)
    )


def stem_both(
    seq: nn.Sequential, x: torch.Tensor, feeds: nn.Module | None = None, bf16: bool = False
) -> list[dict[str, torch.Tensor]]:
    """Forward + backward through the fp32 modules, then through the kernel (under bf16 autocast if
    ``bf16``), from the same state and with the same (bf16-representable) incoming gradient."""
    results = []
    for fused in (False, True):
        s = copy.deepcopy(seq)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fused and bf16):
            y = _fused.run_sequential(s, x, feeds=feeds) if fused else s(x)
        assert (STEM_OP in graph_ops(y)) == fused
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).bfloat16()
        y.backward(g.to(y.dtype))
        conv, bn = s[0], s[1]
        results.append(
            {
                "y": y.detach().float(),
                "dconv_weight": conv.weight.grad,
                "dconv_bias": conv.bias.grad if conv.bias is not None else torch.zeros(1),
                "dbn_weight": bn.weight.grad,
                "dbn_bias": bn.bias.grad,
                "running_mean": bn.running_mean,
                "running_var": bn.running_var,
                "num_batches_tracked": bn.num_batches_tracked,
                "channels_last": torch.tensor(y.is_contiguous(memory_format=torch.channels_last)),
                "nchw": torch.tensor(y.is_contiguous()),
                "dtype_bf16": torch.tensor(y.dtype == torch.bfloat16),
            }
        )
    return results


def assert_close_scaled(got: torch.Tensor, ref: torch.Tensor, rel: float, msg: str) -> None:
    scale = ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(got.float(), ref.float(), rtol=rel, atol=rel * scale, msg=msg)


STEM_CASES = [
    (1, 16, 28, 3, 1, False),  # fmnist_net
    (3, 32, 32, 3, 1, True),
    (1, 20, 11, 5, 2, True),  # a part-filled channel vector, odd sizes
    (2, 33, 9, 3, 0, False),  # three vectors, an odd conv output (7x7: its last row and column unpooled)
    (1, 16, 3, 3, 1, False),  # one window
]
STEM_IDS = ["fmnist_net", "3-channel-bias", "20-channels-odd", "33-channels-no-pad", "one-window"]


@pytest.mark.parametrize(("cin", "cout", "size", "k", "pad", "bias"), STEM_CASES, ids=STEM_IDS)
def test_first_stage_as_one_op_matches_the_modules(
    kernel: None, cin: int, cout: int, size: int, k: int, pad: int, bias: bool
) -> None:
    x = torch.randn(12, cin, size, size, generator=torch.Generator().manual_seed(1)) * 2 + 0.5
    ref, got = stem_both(stem(cin, cout, k, pad, bias), x)
    for key in ref:
        if key not in ("channels_last", "nchw", "dtype_bf16"):
            # the conv bias's true gradient is ~0 (BN removes the mean): compare it on the weight's scale
            base = ref["dconv_weight"] if key == "dconv_bias" else ref[key]
            scale = base.abs().max().item() + 1e-6
            torch.testing.assert_close(got[key], ref[key], rtol=1e-4, atol=2e-5 * scale, msg=key)
    assert got["num_batches_tracked"].item() == 1
    assert got["nchw"] and not got["dtype_bf16"]  # nothing said what comes next: NCHW fp32


@pytest.mark.parametrize("weights_channels_last", [True, False], ids=["cl-conv-next", "nchw-conv-next"])
def test_first_stage_hands_bf16_on_to_a_convolution_under_autocast(
    kernel: None, weights_channels_last: bool
) -> None:
    """Under bf16 autocast the stage computes in fp32 and hands on what autocast would cast it to."""
    seq = stem(1, 16, 3, 1, False)
    nxt = nn.Conv2d(16, 32, 3, padding=1)
    if weights_channels_last:
        nxt = nxt.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    ref, got = stem_both(seq, x, feeds=nxt, bf16=True)
    assert got["dtype_bf16"] and bool(got["channels_last"]) == weights_channels_last != bool(got["nchw"])
    torch.testing.assert_close(got["y"], ref["y"].bfloat16().float(), rtol=2**-7, atol=1e-6)
    for key in ("dconv_weight", "dbn_weight", "dbn_bias", "running_mean", "running_var"):
        assert_close_scaled(got[key], ref[key], 1e-4, key)


def test_first_stage_nan_reaches_the_output(kernel: None) -> None:
    x = torch.randn(4, 1, 10, 10)
    x[2, 0, 5, 5] = float("nan")
    ref, got = stem_both(stem(1, 16, 3, 1, False), x)
    assert torch.isnan(got["y"]).all() and torch.isnan(ref["y"]).all()  # BN's batch mean is NaN


def bn_relu(c: int, seed: int = 0) -> nn.Sequential:
    return nn.Sequential(with_random_affine(nn.BatchNorm2d(c), seed), nn.ReLU(inplace=True))


def bn_relu_both(seq: nn.Sequential, x: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """The modules, then the kernel, on the same channels-last input (the dtype a conv hands on)."""
    results = []
    for fused in (False, True):
        s = copy.deepcopy(seq)
        xi = x.clone().requires_grad_()
        y = _fused.run_sequential(s, xi) if fused else s(xi)
        assert (BN_RELU_OP in graph_ops(y)) == fused
        assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(x.dtype)
        y.backward(g.contiguous(memory_format=torch.channels_last))
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(64, 32, 14, 14), (32, 64, 7, 7), (5, 20, 3, 7), (3, 80, 4, 4), (2, 16, 1, 2)],
    ids=["fmnist-stage2", "fmnist-stage3", "part-vector", "two-blocks", "few-pixels"],
)
def test_bn_relu_channels_last_matches_the_modules(
    kernel: None, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(4)) * 3 + 1).to(dtype)
    ref, got = bn_relu_both(bn_relu(shape[1]), x.contiguous(memory_format=torch.channels_last))
    # bf16: ATen and the kernel both compute in fp32 and round once; a value on a rounding boundary
    # may land one bf16 ulp apart (2^-8 relative).
    rel = 1e-5 if dtype == torch.float32 else 2**-7
    for key in ref:
        assert_close_scaled(got[key], ref[key], 2e-5 if key in ("running_mean", "running_var") else rel, key)
    if dtype == torch.bfloat16:
        assert (got["y"] != ref["y"]).float().mean() < 0.01
    assert got["num_batches_tracked"].item() == 1


def test_bn_relu_channels_last_keeps_nan_and_reruns_bit_identically(kernel: None) -> None:
    x = torch.randn(8, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    x[3, 5, 2, 2] = float("nan")
    ref, got = bn_relu_both(bn_relu(32), x)
    assert torch.equal(torch.isnan(got["y"]), torch.isnan(ref["y"])) and torch.isnan(got["y"][:, 5]).all()
    x = torch.randn(16, 32, 14, 14).bfloat16().contiguous(memory_format=torch.channels_last)
    a, b = bn_relu_both(bn_relu(32), x)[1], bn_relu_both(bn_relu(32), x)[1]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", ["eval", "nchw", "bf16_weights", "leaky_relu", "turned_off"])
def test_bn_relu_runs_as_modules_where_the_kernel_does_not_apply(kernel: None, case: str) -> None:
    seq = bn_relu(32)
    x = torch.randn(8, 32, 6, 6).contiguous(memory_format=torch.channels_last)
    if case == "eval":
        seq.eval()
    elif case == "nchw":
        x = x.contiguous()
    elif case == "bf16_weights":
        seq, x = seq.bfloat16(), x.bfloat16()
    elif case == "leaky_relu":
        seq[1] = nn.LeakyReLU()
    elif case == "turned_off":
        _fused.prepare(False)
    expected = copy.deepcopy(seq)(x.clone())
    got = _fused.run_sequential(seq, x.clone().requires_grad_())
    assert BN_RELU_OP not in graph_ops(got)
    assert torch.equal(got.detach(), expected.detach())


def test_first_stage_below_16_channels_keeps_the_nchw_kernels(kernel: None) -> None:
    """LeNet-5's 6-channel first stage: the one-op stage would leave 10 of 16 lanes idle."""
    seq = stem(1, 6, 5, 2, True)
    y = _fused.run_sequential(seq, torch.randn(8, 1, 28, 28))
    ops = graph_ops(y)
    assert STEM_OP not in ops and "_ConvSmallCinBackward" in ops and "_BNMaxPoolReLUBackward" in ops


def cl(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=torch.channels_last).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape", [(64, 32, 14, 14), (5, 20, 7, 9), (3, 33, 2, 2)], ids=["fmnist", "odd", "one-window"]
)
def test_pool_of_a_sum_matches_the_modules_exactly(
    kernel: None, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    a, b = cl(shape, dtype, 1), cl(shape, dtype, 2)
    b.data[0, 0] = a.data[0, 0] * -1  # a plane of zero sums: every window ties
    pool = nn.MaxPool2d(2)
    results = []
    for fused in (False, True):
        y = _fused.add_then_pool(a, b, pool) if fused else pool(a + b)
        assert (ADD_POOL_OP in graph_ops(y)) == fused
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
        results.append((y.detach(), a.grad, b.grad))
        a.grad = b.grad = None
    for got, ref in zip(results[1], results[0], strict=True):
        assert torch.equal(got, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "shape", [(64, 64, 7, 7), (5, 20, 3, 4), (2, 17, 1, 1)], ids=["fmnist", "odd", "one-pixel"]
)
def test_global_max_and_mean_head_matches_the_modules(
    kernel: None, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x = cl(shape, dtype, 4)
    x.data[1, 3] = 0.5  # a constant plane: the max ties everywhere, the first pixel wins
    max_pool, avg_pool = nn.MaxPool2d(shape[2:]), nn.AvgPool2d(shape[2:])
    results = []
    for fused in (False, True):
        y = _fused.global_max_avg_pool(x, max_pool, avg_pool)
        if not fused:
            y = torch.cat([max_pool(x), avg_pool(x)], dim=1)
        assert (HEAD_OP in graph_ops(y)) == fused
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype))
        results.append((y.detach(), x.grad))
        x.grad = None
    (y_ref, dx_ref), (y_got, dx_got) = results
    assert torch.equal(y_got, y_ref)
    # bf16: the two branches' gradients are summed before one rounding (the modules round each)
    assert_close_scaled(dx_got, dx_ref, 1e-6 if dtype == torch.float32 else 2**-7, "dx")


@pytest.mark.parametrize("case", ["eval", "nchw", "not_whole_plane", "avg_pool_padding"])
def test_pools_run_as_modules_where_the_kernels_do_not_apply(kernel: None, case: str) -> None:
    a, b = cl((4, 32, 8, 8), torch.bfloat16, 1), cl((4, 32, 8, 8), torch.bfloat16, 2)
    pool, max_pool, avg_pool = nn.MaxPool2d(2), nn.MaxPool2d(8), nn.AvgPool2d(8)
    if case == "eval":
        for p in (pool, max_pool, avg_pool):
            p.eval()
    elif case == "nchw":
        a, b = a.contiguous(), b.contiguous()
    elif case == "not_whole_plane":
        pool, max_pool, avg_pool = nn.MaxPool2d(3), nn.MaxPool2d(4), nn.AvgPool2d(4)
    elif case == "avg_pool_padding":
        pool, avg_pool = nn.MaxPool2d(2, padding=1), nn.AvgPool2d(8, padding=1)
    y = _fused.add_then_pool(a, b, pool)
    head = _fused.global_max_avg_pool(a, max_pool, avg_pool)
    assert ADD_POOL_OP not in graph_ops(y) and HEAD_OP not in graph_ops(head)
    assert torch.equal(y, pool(a + b))
    assert torch.equal(head, torch.cat([max_pool(a), avg_pool(a)], dim=1))


def fmnist_steps(
    fused: bool,
    bf16: bool = False,
    dtype: torch.dtype = torch.float32,
    steps: int = 4,
    wide_stem: bool = False,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    _fused.prepare(fused)
    torch.manual_seed(0)
    model = get_model("fmnist_net", width=16, wide_stem=wide_stem)
    model = model.to(dtype).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(x), y)
            if fused:
                assert {STEM_OP, BN_RELU_OP, ADD_POOL_OP, HEAD_OP} <= graph_ops(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return {k: v.double() for k, v in model.state_dict().items()}, losses


@pytest.mark.parametrize("wide_stem", [False, True], ids=["stem-c", "wide-stem"])
def test_fmnist_net_trains_the_same_through_the_kernels(kernel: None, wide_stem: bool) -> None:
    """Four SGD steps: through the kernels the weights stay about as close to a float64 run as
    through the modules. (Neither fp32 path matches the other to 1e-4: the first conv's weight
    gradient sums ~50k terms that nearly cancel, and both are 0.2-0.4% off float64 after one step.)"""
    exact, exact_losses = fmnist_steps(False, dtype=torch.float64, wide_stem=wide_stem)
    ref, ref_losses = fmnist_steps(False, wide_stem=wide_stem)
    got, got_losses = fmnist_steps(True, wide_stem=wide_stem)
    assert list(got) == list(ref) == list(exact)
    assert got_losses == pytest.approx(exact_losses, rel=1e-4)

    def distance(state: dict[str, torch.Tensor]) -> float:
        return sum(float(((state[k] - exact[k]) ** 2).sum()) for k in exact) ** 0.5

    assert distance(got) <= 1.5 * distance(ref)  # measured: 0.0054 against 0.0052
    for key in exact:
        assert (got[key] - exact[key]).abs().max() <= 0.05 * (exact[key].abs().max() + 1e-3), key
    # Under bf16 autocast the first stage computes in fp32 with the kernels (bf16 without): the same
    # training, within bf16's rounding.
    (_, ref_losses) = fmnist_steps(False, True, wide_stem=wide_stem)
    (_, got_losses) = fmnist_steps(True, True, wide_stem=wide_stem)
    assert got_losses == pytest.approx(ref_losses, rel=3e-2)
    assert got_losses[-1] < got_losses[0]


def test_inference_through_the_kernels_matches_the_modules(
    kernel: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eval mode without autograd (the trainer's evaluate()): the running statistics, no backward."""
    ext = _fused._state["ext"]
    torch.manual_seed(0)
    model = get_model("fmnist_net", width=16).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(3):  # running statistics that are not the initial (0, 1)
            model(x * 2 + 1)
    model.eval()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[str] = []

    class Counting:  # the extension, recording which kernels run
        def __init__(self, ext: object) -> None:
            self.ext = ext

        def __getattr__(self, name: str) -> object:
            calls.append(name)
            return getattr(self.ext, name)

    for bf16 in (False, True):
        outs = []
        for fused in (False, True):
            _fused.prepare(fused)
            monkeypatch.setitem(_fused._state, "ext", Counting(ext))
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                outs.append(model(x).float())
            monkeypatch.setitem(_fused._state, "ext", ext)
        ref, got = outs
        # bf16: the first stage computes in fp32 through the kernel (bf16 through the modules)
        assert_close_scaled(got, ref, 1e-5 if not bf16 else 3e-2, f"logits bf16={bf16}")
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # nothing updated
    per_forward = ["conv_bn_pool_relu_forward", *["bn_relu_channels_last_forward"] * 6]
    per_forward += ["add_maxpool_channels_last_forward", "global_pool_channels_last_forward"]
    assert sorted(calls) == sorted(per_forward * 2)  # one fused forward each in fp32 and in bf16
    with torch.enable_grad():  # eval mode while recording a graph: the modules (no inference kernel backward)
        y = model(x.clone().requires_grad_())
        assert not {STEM_OP, BN_RELU_OP, ADD_POOL_OP, HEAD_OP} & graph_ops(y)
