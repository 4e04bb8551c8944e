"""Module-level initializers on real layers: the weight variance, the layer's output, the errors.

Habit 3 of STYLE.md: real nn.Conv2d / nn.Linear / ... weights, and the layer's own forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import signalprop as sp
from signalprop import SignalpropError, theory
from signalprop.init import fans, plan, target_std, weight_blocks

from .test_schemes import assert_variance


class Conv1D(nn.Module):
    """transformers' Conv1D, re-implemented: weight [in, out], y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.ones(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


# layer kind -> builder(a, b) with a, b small sizes drawn by hypothesis
KINDS: dict[str, Callable[[int, int], nn.Module]] = {
    "linear": lambda a, b: nn.Linear(8 * a, 8 * b),
    "conv1d": lambda a, b: nn.Conv1d(4 * a, 4 * b, 3),
    "conv2d": lambda a, b: nn.Conv2d(4 * a, 4 * b, 3),
    "conv2d_strided": lambda a, b: nn.Conv2d(4 * a, 4 * b, 4, stride=2),
    "conv3d": lambda a, b: nn.Conv3d(2 * a, 2 * b, 2),
    "conv2d_grouped": lambda a, b: nn.Conv2d(4 * a, 8 * b, 3, groups=4),
    "conv2d_depthwise": lambda a, b: nn.Conv2d(8 * a, 8 * a, 3, groups=8 * a),
    "convT1d": lambda a, b: nn.ConvTranspose1d(4 * a, 4 * b, 4, stride=2),
    "convT2d": lambda a, b: nn.ConvTranspose2d(4 * a, 4 * b, 4, stride=2),
    "convT3d": lambda a, b: nn.ConvTranspose3d(2 * a, 2 * b, 2, stride=2),
    "convT2d_grouped": lambda a, b: nn.ConvTranspose2d(4 * a, 8 * b, 3, stride=1, groups=4),
    "mha": lambda a, b: nn.MultiheadAttention(8 * a, 2),
    "mha_kv": lambda a, b: nn.MultiheadAttention(8 * a, 2, kdim=4 * b, vdim=4 * b + 4),
    "embedding": lambda a, b: nn.Embedding(16 * a, 8 * b),
    "hf_conv1d": lambda a, b: Conv1D(8 * b, 8 * a),
}

VARIANCE_SCHEMES: list[tuple[str, dict[str, object], Callable[[float, float], float], str]] = [
    ("he", {}, lambda fi, fo: 2.0 / fi, "normal"),
    ("he", {"mode": "fan_out", "distribution": "uniform"}, lambda fi, fo: 2.0 / fo, "uniform"),
    ("he", {"nonlinearity": nn.LeakyReLU(0.2)}, lambda fi, fo: 2.0 / (1.04 * fi), "normal"),
    ("he", {"nonlinearity": "tanh", "distribution": "truncated_normal"},
     lambda fi, fo: theory.gain("tanh") ** 2 / fi, "truncated_normal"),
    ("glorot", {}, lambda fi, fo: 2.0 / (fi + fo), "uniform"),
    ("glorot", {"distribution": "normal", "gain": 3.0}, lambda fi, fo: 18.0 / (fi + fo), "normal"),
    ("lecun", {}, lambda fi, fo: 1.0 / fi, "normal"),
    ("variance_scaling", {}, lambda fi, fo: 1.0 / fi, "truncated_normal"),
    ("variance_scaling", {"scale": 2.0, "mode": "fan_avg", "distribution": "uniform"},
     lambda fi, fo: 4.0 / (fi + fo), "uniform"),
]


def _block_tensor(layer: nn.Module, b: object) -> torch.Tensor:
    p = getattr(layer, b.param)  # type: ignore[attr-defined]
    return p[b.rows[0] : b.rows[1]] if b.rows is not None else p  # type: ignore[attr-defined]


@given(
    kind=st.sampled_from(sorted(KINDS)),
    a=st.integers(1, 8),
    b=st.integers(1, 8),
    which=st.integers(0, len(VARIANCE_SCHEMES) - 1),
    seed=st.integers(0, 2**31 - 1),
)
@settings(max_examples=150)
def test_every_initializer_on_every_layer_type_hits_its_variance(kind: str, a: int, b: int, which: int, seed: int) -> None:
    layer = KINDS[kind](a, b)
    scheme, kw, target, dist = VARIANCE_SCHEMES[which]
    fn = sp.init.SCHEMES[scheme]
    assert fn(layer, generator=torch.Generator().manual_seed(seed), **kw) is layer
    for blk in weight_blocks(layer):
        assert_variance(_block_tensor(layer, blk), target(blk.fan_in, blk.fan_out), dist)
    for name in ("bias", "in_proj_bias"):
        bias = getattr(layer, name, None)
        if bias is not None:
            assert float(bias.detach().abs().max()) == 0.0


@given(kind=st.sampled_from(sorted(KINDS)), a=st.integers(1, 6), b=st.integers(1, 6),
       gain=st.floats(0.2, 3.0), seed=st.integers(0, 2**31 - 1))
def test_orthogonal_on_every_layer_type(kind: str, a: int, b: int, gain: float, seed: int) -> None:
    layer = KINDS[kind](a, b).double()
    sp.init.orthogonal_(layer, gain=gain, generator=torch.Generator().manual_seed(seed))
    for blk in weight_blocks(layer):
        w = _block_tensor(layer, blk).detach()
        step = w.shape[0] // blk.groups
        for j in range(blk.groups):
            sub = w[j * step : (j + 1) * step]
            m = sub.reshape(sub.shape[0], -1) if blk.out_dim == 0 else sub.transpose(0, 1).reshape(sub.shape[1], -1)
            gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
            assert torch.allclose(gram, gain**2 * torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-9)
    steps = plan(layer, "orthogonal", gain=gain)
    for s, blk in zip((s for s in steps if s.layer == ""), weight_blocks(layer)):
        rms = float(_block_tensor(layer, blk).detach().pow(2).mean().sqrt())
        assert rms == pytest.approx(s.std, rel=1e-9)


def test_orthogonal_linear_and_conv1d_orientation() -> None:
    g = torch.Generator().manual_seed(0)
    lin = sp.init.orthogonal_(nn.Linear(64, 16).double(), gain=2.0, generator=g)
    assert torch.allclose(lin.weight @ lin.weight.T, 4 * torch.eye(16, dtype=torch.float64), atol=1e-10)
    hf = sp.init.orthogonal_(Conv1D(nf=16, nx=64).double(), generator=g)  # rows are outputs: W^T W = I
    assert torch.allclose(hf.weight.T @ hf.weight, torch.eye(16, dtype=torch.float64), atol=1e-10)
    assert float(hf.bias.detach().abs().max()) == 0.0


# ---- one layer's output: He fan_in keeps E[y^2] = 1 on inputs relu(z) --------------------------------
# Wide outputs (512 units) so the weights' own randomness moves the mean square by about 0.02 (see below).
OUTPUT_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    # name: (layer, input shape, border to crop on every spatial side of the output)
    "linear": (lambda: nn.Linear(256, 512), (128, 256), 0),
    "conv1d": (lambda: nn.Conv1d(64, 512, 5, padding=2), (16, 64, 32), 2),
    "conv2d": (lambda: nn.Conv2d(64, 512, 3, padding=1), (4, 64, 12, 12), 1),
    "conv2d_strided": (lambda: nn.Conv2d(64, 512, 4, stride=2, padding=1), (4, 64, 16, 16), 1),
    "conv3d": (lambda: nn.Conv3d(16, 512, 3, padding=1), (8, 16, 8, 8, 8), 1),
    "conv2d_grouped": (lambda: nn.Conv2d(64, 512, 3, padding=1, groups=8), (4, 64, 12, 12), 1),
    "conv2d_depthwise": (lambda: nn.Conv2d(1024, 1024, 3, padding=1, groups=1024), (2, 1024, 12, 12), 1),
    "convT1d": (lambda: nn.ConvTranspose1d(64, 512, 4, stride=2, padding=1), (32, 64, 16), 1),
    "convT2d": (lambda: nn.ConvTranspose2d(64, 512, 4, stride=2, padding=1), (8, 64, 8, 8), 1),
    "convT3d": (lambda: nn.ConvTranspose3d(16, 512, 4, stride=2, padding=1), (16, 16, 6, 6, 6), 1),
    "convT2d_depthwise": (lambda: nn.ConvTranspose2d(1024, 1024, 4, stride=2, padding=1, groups=1024), (2, 1024, 6, 6), 1),
    "hf_conv1d": (lambda: Conv1D(nf=512, nx=256), (128, 256), 0),
}


def _crop(y: torch.Tensor, border: int) -> torch.Tensor:
    if border == 0:
        return y
    return y[(slice(None), slice(None), *[slice(border, -border)] * (y.ndim - 2))]


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
def test_output_tolerance_is_four_standard_errors(case: str) -> None:
    # Over the weights, one output unit's mean square is (sum w^2) Var[relu] + (sum w)^2 E[relu]^2 with
    # n Var[w] = 2 (n = fan_in): its variance is 2 (2 E[relu]^2)^2 + (2/n) (2 Var[relu])^2, independently
    # for each of the 512 units. Over the inputs, the mean square of N values relu(z) has relative variance
    # Var[relu^2] / E[relu^2]^2 / N = 5 / N, with N the inputs under the interior. The cases are sized so
    # that 1 +- 0.1 is a band of at least four standard errors.
    build, shape, border = OUTPUT_CASES[case]
    layer = build()
    n = fans(layer)[0]
    with torch.no_grad():
        y = layer(torch.zeros(shape))
    interior = _crop(y, border).numel() / y.numel()
    mu2 = 1 / (2 * math.pi)
    per_unit = 2 * (2 * mu2) ** 2 + (2 / n) * (2 * (0.5 - mu2)) ** 2
    units = y.shape[1] if y.ndim > 2 else y.shape[-1]
    assert 4 * math.sqrt(per_unit / units + 5 / (math.prod(shape) * interior)) < 0.1


@pytest.mark.parametrize("case", sorted(OUTPUT_CASES))
@given(seed=st.integers(0, 2**31 - 1), dist=st.sampled_from(["normal", "uniform", "truncated_normal"]))
@settings(max_examples=4)
def test_he_fan_in_keeps_one_layers_output_at_unit_second_moment(case: str, seed: int, dist: str) -> None:
    build, shape, border = OUTPUT_CASES[case]
    g = torch.Generator().manual_seed(seed)
    layer = sp.init.he_(build(), distribution=dist, generator=g)
    x = torch.relu(torch.randn(shape, generator=g))
    with torch.no_grad():
        y = _crop(layer(x), border)
    assert float(y.pow(2).mean()) == pytest.approx(1.0, abs=0.1)


def test_mha_projections_and_embedding_outputs() -> None:
    g = torch.Generator().manual_seed(0)
    mha = sp.init.he_(nn.MultiheadAttention(512, 8), generator=g)
    x = torch.relu(torch.randn(64, 512, generator=g))
    with torch.no_grad():
        for q in F.linear(x, mha.in_proj_weight).chunk(3, dim=-1):
            assert float(q.pow(2).mean()) == pytest.approx(1.0, abs=0.1)
        assert float(mha.out_proj(x).pow(2).mean()) == pytest.approx(1.0, abs=0.1)
    emb = sp.init.lecun_(nn.Embedding(1000, 512), generator=g)  # fan_in 1: N(0, 1), PyTorch's default
    with torch.no_grad():
        assert float(emb(torch.randint(0, 1000, (64,), generator=g)).pow(2).mean()) == pytest.approx(1.0, abs=0.1)


# ---- backward: He fan_out keeps the gradient's second moment --------------------------------------
BACKWARD_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "conv2d_strided": (lambda: nn.Conv2d(256, 64, 4, stride=2, padding=1), (2, 256, 16, 16), 2),
    "alexnet_conv1": (lambda: nn.Conv2d(128, 96, 11, stride=4, padding=2), (1, 128, 47, 47), 10),
    "convT2d": (lambda: nn.ConvTranspose2d(256, 64, 4, stride=2, padding=1), (2, 256, 8, 8), 1),
    "conv1d": (lambda: nn.Conv1d(256, 64, 3, padding=1), (8, 256, 32), 1),
}


@pytest.mark.parametrize("case", sorted(BACKWARD_CASES))
@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=3)
def test_he_fan_out_keeps_the_gradient(case: str, seed: int) -> None:
    # Var[dx] = fan_out * Var[w] * Var[dy] (He et al. 2015, Eq. 13): with the *effective* fan_out of a
    # strided conv (out * prod(k / stride)) the interior input gradient keeps unit variance; PyTorch's
    # out * prod(k) would shrink it by prod(stride).
    build, shape, border = BACKWARD_CASES[case]
    g = torch.Generator().manual_seed(seed)
    layer = sp.init.he_(build(), mode="fan_out", nonlinearity="linear", generator=g)
    x = torch.randn(shape, generator=g, requires_grad=True)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, torch.randn(y.shape, generator=g))
    assert float(_crop(dx, border).pow(2).mean()) == pytest.approx(1.0, abs=0.1)


# ---- delta-orthogonal: norm preserved away from the border -----------------------------------------
@pytest.mark.parametrize(
    "build",
    [
        lambda: nn.Conv1d(16, 32, 5, padding=2),
        lambda: nn.Conv2d(16, 16, 3, padding=1),
        lambda: nn.Conv2d(16, 64, 5, padding=2, groups=4),
        lambda: nn.Conv3d(8, 8, 3, padding=1),
    ],
)
@given(seed=st.integers(0, 2**31 - 1), gain=st.floats(0.5, 2.0))
@settings(max_examples=5)
def test_delta_orthogonal_preserves_the_norm(build: Callable[[], nn.Module], seed: int, gain: float) -> None:
    g = torch.Generator().manual_seed(seed)
    layer = sp.init.delta_orthogonal_(build().double(), gain=gain, generator=g)
    x = torch.randn(2, layer.in_channels, *[10] * (layer.weight.ndim - 2), generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    border = layer.kernel_size[0] // 2
    assert float(_crop(y, border).norm() / _crop(x, border).norm()) == pytest.approx(gain, rel=1e-10)


def test_delta_orthogonal_keeps_a_deep_linear_stack_exactly() -> None:
    net = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(50)]).double()
    sp.init.delta_orthogonal_(net, generator=torch.Generator().manual_seed(0))
    x = torch.randn(1, 8, 120, 120, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
    assert float(y[..., 50:-50, 50:-50].norm() / x[..., 50:-50, 50:-50].norm()) == pytest.approx(1.0, rel=1e-9)


# ---- the contract: models, biases, generators, plans ---------------------------------------------
def test_whole_model_every_weight_layer_and_biases() -> None:
    net = sp.models.plain_cnn(6, 32)
    assert sp.init.he_(net, generator=torch.Generator().manual_seed(0)) is net
    for _, layer in sp.init.weight_layers(net):
        fi, _ = fans(layer)
        assert_variance(layer.weight, 2.0 / fi, "normal")
        assert float(layer.bias.detach().abs().max()) == 0.0
    keep = nn.Linear(4, 4)
    with torch.no_grad():
        keep.bias.fill_(0.5)
    sp.init.glorot_(keep, zero_bias=False)
    assert float(keep.bias.detach().min()) == 0.5


def test_norm_layers_are_left_alone() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.LayerNorm(8))
    with torch.no_grad():
        net[1].weight.fill_(0.3)
    sp.init.he_(net)
    assert torch.equal(net[1].weight.detach(), torch.full((8,), 0.3))


def test_generator_makes_it_reproducible_and_seeds_differ() -> None:
    a = sp.init.he_(sp.models.mlp(3, 32), generator=torch.Generator().manual_seed(1))
    b = sp.init.he_(sp.models.mlp(3, 32), generator=torch.Generator().manual_seed(1))
    c = sp.init.he_(sp.models.mlp(3, 32), generator=torch.Generator().manual_seed(2))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb)
        if pa.ndim == 2:
            assert not torch.equal(pa, pc)


def test_target_std_and_plan_name_the_exact_std_and_touch_nothing() -> None:
    layer = nn.ConvTranspose2d(256, 128, 4, stride=2)
    before = layer.weight.detach().clone()
    assert target_std(layer, "he") == pytest.approx(math.sqrt(2 / 1024))
    assert target_std(nn.Linear(100, 50), "glorot") == pytest.approx(math.sqrt(2 / 150))
    assert target_std(nn.Linear(100, 50), "variance_scaling", scale=2.0, mode="fan_out") == pytest.approx(0.2)
    assert target_std(nn.Linear(100, 50), "kaiming", nonlinearity="tanh") == pytest.approx(theory.gain("tanh") / 10)
    assert target_std(nn.Linear(64, 16), "orthogonal") == pytest.approx(1 / 8)
    assert torch.equal(layer.weight, before)
    steps = plan(sp.models.plain_cnn(3, 8), "he")
    assert [s.layer for s in steps] == ["body.0", "body.2", "body.4", "head.2"]
    assert steps[0].fan_in == 27 and steps[0].std == pytest.approx(math.sqrt(2 / 27))
    with pytest.raises(SignalpropError, match="different stds.*plan"):
        target_std(nn.MultiheadAttention(32, 2, kdim=8, vdim=8), "he")
    with pytest.raises(SignalpropError, match="unknown scheme 'he_normal'"):
        target_std(nn.Linear(2, 2), "he_normal")
    with pytest.raises(SignalpropError, match="does not take"):
        plan(nn.Linear(2, 2), "lecun", gain=2.0)


def test_tied_weights_are_initialized_once() -> None:
    emb = nn.Embedding(50, 16)
    head = nn.Linear(16, 50)
    head.weight = emb.weight
    net = nn.Sequential(emb, head)
    steps = plan(net, "he")
    assert len(steps) == 1 and steps[0].layer == "0"
    sp.init.he_(net, nonlinearity="linear")
    assert net[1].weight is net[0].weight and float(net[1].bias.detach().abs().max()) == 0.0


def test_fans_keyword_for_unknown_layers_and_single_layers() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(300, 200))
            self.bias = nn.Parameter(torch.ones(300))

    odd = sp.init.he_(Odd(), fans=(50, 300), generator=torch.Generator().manual_seed(0))
    assert_variance(odd.weight, 2 / 50, "normal")
    assert float(odd.bias.detach().abs().max()) == 0.0
    lin = sp.init.lecun_(nn.Linear(200, 300), fans=(20, 1))
    assert_variance(lin.weight, 1 / 20, "normal")
    with pytest.raises(SignalpropError, match="applies to one layer"):
        sp.init.he_(sp.models.mlp(2, 8), fans=(8, 8))


def test_bad_input_raises_before_anything_changes() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(3, 4, 5))

    net = nn.Sequential(nn.Linear(4, 4), Odd())
    before = net[0].weight.detach().clone()
    with pytest.raises(SignalpropError, match=r"layer '1'.*Odd.*register_fans"):
        sp.init.he_(net)
    assert torch.equal(net[0].weight, before)
    with pytest.raises(SignalpropError, match="unknown activation 'relu7'"):
        sp.init.he_(net[0], nonlinearity="relu7")
    assert torch.equal(net[0].weight, before)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sp.init.he_(torch.empty(3, 4)), "tensor of shape.*signalprop.init.schemes"),
        (lambda: sp.init.he_("model"), "nn.Module layer"),
        (lambda: sp.init.he_(nn.ReLU()), "ReLU has no weight layers"),
        (lambda: sp.init.glorot_(nn.Sequential(nn.ReLU(), nn.LayerNorm(3))), "no weight layers"),
        (lambda: sp.init.he_(nn.Linear(3, 3), mode="fan_avg"), "variance_scaling_"),
        (lambda: sp.init.glorot_(nn.Linear(3, 3), distribution="gauss"), "unknown distribution 'gauss'"),
        (lambda: sp.init.orthogonal_(nn.Linear(3, 3), generator=0), "torch.Generator"),
    ],
)
def test_bad_input_messages(call: Callable[[], object], match: str) -> None:
    with pytest.raises(SignalpropError, match=match):
        call()


def test_integer_weight_is_refused() -> None:
    layer = nn.Linear(3, 3)
    layer.weight = nn.Parameter(torch.zeros(3, 3, dtype=torch.int64), requires_grad=False)
    with pytest.raises(SignalpropError, match="non-floating-point weight.*int64"):
        sp.init.he_(layer)


def test_low_precision_and_generator_on_another_device_give_the_same_draw() -> None:
    a = sp.init.he_(nn.Linear(32, 16), generator=torch.Generator().manual_seed(5))
    b = sp.init.he_(nn.Linear(32, 16).to(torch.bfloat16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(b.weight.detach(), a.weight.detach().to(torch.bfloat16))
