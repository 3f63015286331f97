"""Model zoo: every registered arch builds and runs on MNIST- and CIFAR-shaped inputs, the ablation
knobs of LeNet/AlexNet change the network as asked, errors name the allowed values, and the
shape-walk summary agrees with the model."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from trainer.models import count_parameters, get_model, list_models
from trainer.models.summary import describe_archs, shape_walk, summarize

pytestmark = pytest.mark.numerics  # CPU-kernel-dependent results: .ci/run reruns these under AVX2 dispatch

# (in_channels, image_size, num_classes): MNIST/Fashion-MNIST and CIFAR-100.
DATASET_SHAPES = [(1, 28, 10), (3, 32, 100)]
KNOB_ARCHS = ["lenet5", "alexnet"]
ACTIVATIONS = (nn.Sigmoid, nn.ReLU, nn.Tanh)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    # Batch-2 forwards are tiny; two intra-op threads on a machine shared with other processes
    # spin against them and run slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(
    name: str, in_channels: int = 1, image_size: int = 28, num_classes: int = 10, **knobs: object
) -> nn.Module:
    torch.manual_seed(0)
    return get_model(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size, **knobs)


def types_in(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("shape", DATASET_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[1]}-{s[2]}cls")
@pytest.mark.parametrize("name", list_models())
def test_forward_shapes_eval_and_train(name: str, shape: tuple[int, int, int]) -> None:
    c, size, classes = shape
    model = build(name, c, size, classes)
    x = torch.rand(2, c, size, size)  # (B, C, H, W) pixels

    model.eval()
    with torch.no_grad():
        y1, y2 = model(x), model(x)
    assert y1.shape == (2, classes)
    assert torch.isfinite(y1).all()
    assert torch.equal(y1, y2), "eval mode must be deterministic (dropout off, BN frozen)"

    model.train()
    out = model(x)
    assert out.shape == (2, classes)
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters not reached by the loss: {missing[:5]}"


def test_lenet5_is_seed_000_size() -> None:
    assert count_parameters(build("lenet5")) == 61_706


@pytest.mark.parametrize("name", KNOB_ARCHS)
def test_batchnorm_knob_adds_bn_layers(name: str) -> None:
    plain = build(name, batchnorm=False)
    bn = build(name, batchnorm=True)
    assert not types_in(plain) & {nn.BatchNorm1d, nn.BatchNorm2d}
    assert {nn.BatchNorm1d, nn.BatchNorm2d} <= types_in(bn)
    # BN replaces the biases of the layers it follows.
    assert all(m.bias is None for m in bn.modules() if isinstance(m, nn.Conv2d))
    assert bn.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", KNOB_ARCHS)
@pytest.mark.parametrize(
    ("pool", "used", "unused"), [("max", nn.MaxPool2d, nn.AvgPool2d), ("avg", nn.AvgPool2d, nn.MaxPool2d)]
)
def test_pool_knob_selects_pooling(name: str, pool: str, used: type, unused: type) -> None:
    model = build(name, pool=pool)
    assert used in types_in(model) and unused not in types_in(model)
    assert model.eval()(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("name", KNOB_ARCHS)
@pytest.mark.parametrize(
    ("activation", "cls"), [("sigmoid", nn.Sigmoid), ("relu", nn.ReLU), ("tanh", nn.Tanh)]
)
def test_activation_knob_selects_activation(name: str, activation: str, cls: type) -> None:
    model = build(name, activation=activation)
    acts = {t for t in types_in(model) if t in (nn.Sigmoid, nn.ReLU, nn.Tanh)}
    assert acts == {cls}


def _activation_first(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every (max-pool, activation) pair back in the textbook order."""
    ref = copy.deepcopy(model)
    for seq in (m for m in ref.modules() if isinstance(m, nn.Sequential)):
        layers = list(seq)
        for i in range(len(layers) - 1):
            if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], ACTIVATIONS):
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
        for i, layer in enumerate(layers):
            seq[i] = layer
    return ref


def _assert_same_function_as_activation_first(model: nn.Module) -> None:
    ref = _activation_first(model)
    assert [type(m) for m in ref.modules()] != [type(m) for m in model.modules()]  # the order differs
    assert list(ref.state_dict()) == list(model.state_dict())
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    grads = []
    for m in (model, ref):
        torch.manual_seed(1)  # the same dropout masks (AlexNet)
        out = m.train()(x)
        nn.functional.cross_entropy(out, y).backward()
        grads.append((out.detach(), [p.grad.clone() for p in m.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    for g, g_ref in zip(grads[0][1], grads[1][1], strict=True):
        # Overlapping pools (AlexNet's 3x3/2) sum a shared pixel's gradient before or after the
        # activation's slope: rounding-level differences, orders of magnitude below a misrouted one.
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", KNOB_ARCHS)
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_max_pool_before_activation_is_the_activation_first_function(name: str, activation: str) -> None:
    # The zoo runs max-pool before the activation (less work); a user training the ablation study's
    # "activation, then max-pool" must get the same outputs, loss gradients and parameter names.
    _assert_same_function_as_activation_first(build(name, activation=activation, pool="max", batchnorm=True))
    # Average pooling does not commute with a nonlinearity: it keeps the seeds' order.
    avg = list(build(name, activation=activation, pool="avg").features)
    assert all(isinstance(avg[i - 1], ACTIVATIONS) for i, m in enumerate(avg) if isinstance(m, nn.AvgPool2d))


@pytest.mark.parametrize("wide_stem", [False, True], ids=["stem-c", "wide-stem"])
def test_fmnist_net_first_pool_before_relu_is_conv_bn_relu_pool(wide_stem: bool) -> None:
    _assert_same_function_as_activation_first(build("fmnist_net", width=4, wide_stem=wide_stem))


@pytest.mark.parametrize("shape", DATASET_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}x{s[1]}-{s[2]}cls")
def test_fmnist_net_wide_stem_skips_stage_2s_opening_conv(shape: tuple[int, int, int]) -> None:
    c, size, classes = shape
    narrow, wide = (build("fmnist_net", c, size, classes, width=8, wide_stem=w) for w in (False, True))
    convs = [[m for m in net.modules() if isinstance(m, nn.Conv2d)] for net in (narrow, wide)]
    assert [(m.in_channels, m.out_channels) for m in convs[0][:2]] == [(c, 8), (8, 16)]
    assert [(m.in_channels, m.out_channels) for m in convs[1][:2]] == [(c, 16), (16, 16)]  # residual next
    assert len(convs[1]) == len(convs[0]) - 1
    x = torch.rand(2, c, size, size)
    assert wide.eval()(x).shape == narrow.eval()(x).shape == (2, classes)


@pytest.mark.parametrize("name", KNOB_ARCHS)
def test_dropout_knob(name: str) -> None:
    with_dropout = build(name, dropout=0.3)
    ps = [m.p for m in with_dropout.modules() if isinstance(m, nn.Dropout)]
    assert len(ps) == 2 and all(p == 0.3 for p in ps)  # after both hidden FC layers
    assert nn.Dropout not in types_in(build(name, dropout=0.0))


@pytest.mark.parametrize("name", KNOB_ARCHS)
def test_width_knob_scales_channels(name: str) -> None:
    def first_conv(m: nn.Module) -> nn.Conv2d:
        return next(x for x in m.modules() if isinstance(x, nn.Conv2d))

    assert first_conv(build(name, width=2)).out_channels == 2 * first_conv(build(name)).out_channels


def test_knob_defaults_follow_the_seeds() -> None:
    # d2l's LeNet: sigmoid + average pooling, no BN, no dropout.
    lenet = types_in(build("lenet5"))
    assert {nn.Sigmoid, nn.AvgPool2d} <= lenet
    assert not lenet & {nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d, nn.Dropout}
    # The ablation study's AlexNet: ReLU + max pooling + dropout 0.5, no BN.
    alex = build("alexnet")
    assert {nn.ReLU, nn.MaxPool2d} <= types_in(alex)
    assert not types_in(alex) & {nn.Sigmoid, nn.AvgPool2d, nn.BatchNorm2d}
    assert [m.p for m in alex.modules() if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert nn.BatchNorm2d in types_in(build("vgg11"))  # VGG: BN on by default


def test_unknown_arch_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown arch 'lenet6'") as err:
        build("lenet6")
    assert all(name in str(err.value) for name in list_models())


@pytest.mark.parametrize("name", KNOB_ARCHS)
def test_unknown_activation_and_pool_name_the_choices(name: str) -> None:
    with pytest.raises(ValueError, match="unknown activation 'gelu'; choose one of: sigmoid, relu, tanh"):
        build(name, activation="gelu")
    with pytest.raises(ValueError, match="unknown pool 'lp'; choose one of: avg, max"):
        build(name, pool="lp")


def test_summary_walks_lenet_shapes() -> None:
    model = build("lenet5").train()
    text = summarize(model, (1, 28, 28))
    assert model.training, "summarize must restore the caller's mode"
    rows, _ = shape_walk(model, (1, 28, 28))
    # d2l's shape walk: 28 -> conv(pad 2) 28 -> pool 14 -> conv 10 -> pool 5 -> 400 -> 120 -> 84 -> 10.
    shapes = [(t, s) for _, t, s, _ in rows]
    assert shapes[0] == ("Conv2d", "(1, 6, 28, 28)")
    assert ("AvgPool2d", "(1, 16, 5, 5)") in shapes
    assert ("Flatten", "(1, 400)") in shapes
    assert rows[-1] == ("classifier.5", "Linear", "(1, 10)", 850)
    assert "output shape: (1, 10)" in text
    assert "total params: 61,706" in text


@pytest.mark.parametrize("name", list_models())
def test_summary_totals_match_model(name: str) -> None:
    model = build(name, 3, 32, 100)
    rows, out = shape_walk(model, (3, 32, 32))
    text = summarize(model, (3, 32, 32))
    assert out.shape == (1, 100)
    assert rows[-1][2] == "(1, 100)", "the last leaf called produces the logits"
    assert sum(r[3] for r in rows) == count_parameters(model)
    assert f"total params: {count_parameters(model):,}" in text
    assert "output shape: (1, 100)" in text


def test_describe_archs_lists_every_model() -> None:
    described = dict(describe_archs(in_channels=1, image_size=28, num_classes=10))
    assert sorted(described) == list_models()
    assert described["lenet5"] == 61_706
    assert described["alexnet"] == count_parameters(build("alexnet"))
    assert all(n > 0 for n in described.values())
