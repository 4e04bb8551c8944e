"""predict, op by op: token ids, several inputs, gather/index/masking, upsampling, products of activations,
conv1d, parametrized linears, sums and attention, each on a small net whose exact answer is known, and
against measurement.

Tolerances come from the sample: the measured variance of a layer's output averages ``B E`` squared
deviations (batch B, E elements per sample) of relative variance kappa (2 for a Gaussian), and elements of
one sample in different channels are correlated through the inputs they share (1 / fan_in each), so its
relative standard deviation is ``sqrt(kappa / (B E) * (1 + (C - 1) / fan_in))`` (``_band``); the checks
allow 4 of those in log, plus what a rule leaves out on purpose where it says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import signalprop as sp
from signalprop.graph import capture
from signalprop.prediction import predict
from signalprop.prediction._attention import attention_w


class Op(nn.Module):
    """A leaf module applying ``f``: gives the op its own entry in the trace."""

    def __init__(self, f: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.f = f

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return self.f(*xs)


class Pair(nn.Module):
    """Two Linear layers on one input, combined by ``op``."""

    def __init__(self, d: int, f: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.a, self.b, self.op = nn.Linear(d, d), nn.Linear(d, d), Op(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(self.a(x), self.b(x))


def _sd(batch: int, elems: int, chans: int, fan: float, kappa: float = 2.0) -> float:
    """Relative standard deviation of one batch's measured variance (module docstring)."""
    return math.sqrt(kappa / (batch * elems) * (1 + (chans - 1) / fan))


def _agree(pred: float, meas: float, sd: float, extra: float = 0.0) -> None:
    assert abs(math.log(meas / pred)) < 4 * sd + extra, (pred, meas, sd)


def _both(model: nn.Module, x: object) -> tuple[sp.Trace, sp.Trace]:
    return predict(model, inputs=x), sp.measure(model, x)


# ---- inputs -----------------------------------------------------------------------------------------------
def test_token_ids_embedding_variance_is_the_weights() -> None:
    """Integer token ids: the embedding's output variance is its weight's (uniformly random tokens), exactly;
    the Linear after it is He's fan_in * mean(w^2) * E[x^2]. Measured on 64 x 16 tokens of a 1000-row table."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 32), nn.Linear(32, 32))
    ids = torch.randint(0, 1000, (64, 16))
    p, m = _both(model, ids)
    w = model[0].weight.detach().double()
    assert p["0"].fwd.var == pytest.approx(float(w.var(unbiased=False)), rel=1e-9)
    q = float(w.pow(2).mean())
    assert p["1"].fwd.var == pytest.approx(32 * float(model[1].weight.detach().double().pow(2).mean()) * q
                                           + float(model[1].bias.detach().double().var(unbiased=False)), rel=1e-6)
    _agree(p["0"].fwd.var, m["0"].fwd.var, _sd(64, 16 * 32, 32, 1e9))
    _agree(p["1"].fwd.var, m["1"].fwd.var, _sd(64, 16 * 32, 32, 32))


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 48, bias=False), nn.Linear(16, 48, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


def test_several_inputs_each_with_its_own_variance() -> None:
    """Two floating inputs of variances 1 and 4 (taken from the example inputs, or given one per input):
    each branch is fan_in * mean(w^2) * E[x^2] of its own input, and the sum adds them."""
    torch.manual_seed(0)
    model = TwoInputs()
    xs = (torch.randn(256, 32), 2.0 * torch.randn(256, 16))
    w2 = [float(m.weight.detach().double().pow(2).mean()) for m in (model.a, model.b)]
    for t in (predict(model, inputs=xs, input_var=[1.0, 4.0]), predict(model, inputs=xs)):
        q = [1.0, 4.0] if t.meta["input_var"] == [1.0, 4.0] else t.meta["input_var"]
        assert t["a"].fwd.var == pytest.approx(32 * w2[0] * q[0], rel=1e-9)
        assert t["b"].fwd.var == pytest.approx(16 * w2[1] * q[1], rel=1e-9)
    m = sp.measure(model, xs)
    _agree(t["a"].fwd.var, m["a"].fwd.var, _sd(256, 48, 48, 32))
    _agree(t["b"].fwd.var, m["b"].fwd.var, _sd(256, 48, 48, 16))


def test_integer_input_needs_its_values_and_input_var_checks() -> None:
    model = nn.Sequential(nn.Embedding(10, 4))
    with pytest.raises(sp.SignalpropError, match="either input_shape"):
        predict(model)
    with pytest.raises(sp.SignalpropError, match="2 values for 1 floating"):
        predict(TwoInputs().a, inputs=torch.randn(4, 32), input_var=[1.0, 2.0])
    with pytest.raises(sp.SignalpropError, match="batch"):
        predict(TwoInputs().a, (32,), batch=0)


# ---- index, gather, masking -------------------------------------------------------------------------------
def test_gather_index_and_masking() -> None:
    """Gathering or indexing with known indices moves elements: the variance is kept exactly (zero-mean
    elements of equal variance). ``masked_fill(mask, 0)`` with a known mask zeroes a fraction f of them:
    the variance is (1 - f) v over the tensor, exactly."""
    torch.manual_seed(0)
    idx = torch.randint(0, 16, (64, 10, 32))
    rows = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    mask = torch.rand(16, 32) < 0.3
    x = torch.randn(128, 16, 32)
    for f, factor in [(lambda a, b: torch.gather(a, 1, idx[: a.shape[0]]), 1.0),
                      (lambda a, b: a[:, rows], 1.0),
                      (lambda a, b: a.masked_fill(mask, 0.0), 1 - float(mask.double().mean())),
                      (lambda a, b: torch.where(mask, b, a), 1.0)]:
        model = Pair(32, f)
        with torch.no_grad():
            model.a.bias.zero_()
            model.b.bias.zero_()
            model.b.weight.copy_(model.a.weight)
        p, m = _both(model, x)
        assert p["op"].fwd.var == pytest.approx(p["a"].fwd.var * factor, rel=1e-9)
        _agree(p["op"].fwd.var, m["op"].fwd.var, _sd(128, 8 * 32, 32, 32))


# ---- upsampling -------------------------------------------------------------------------------------------
def _interp_factor(size: int, mode: str, align: bool | None) -> float:
    """mean over output positions of sum_k a_k^2, from the full Jacobian of F.interpolate (brute force)."""
    def f(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=2, mode=mode, align_corners=align)

    jac = torch.autograd.functional.jacobian(f, torch.zeros(1, 1, size, size, dtype=torch.float64))
    return float(jac.reshape(4 * size * size, size * size).pow(2).sum(1).mean())


@pytest.mark.parametrize(("mode", "align"), [("nearest", None), ("bilinear", False), ("bilinear", True),
                                             ("bicubic", False)])
def test_upsampling(mode: str, align: bool | None) -> None:
    """Nearest upsampling keeps the variance; bilinear and bicubic average neighbours with the
    interpolation weights a_k: Var = mean over positions of sum_k a_k^2 times the input's (zero mean,
    nothing shared), the factor checked against the brute-force Jacobian; and against measurement (a 1x1
    convolution first: no border effect)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False),
                          Op(lambda h: F.interpolate(h, scale_factor=2, mode=mode, align_corners=align)))
    x = torch.randn(64, 3, 8, 8)
    p, m = _both(model, x)
    factor = 1.0 if mode == "nearest" else _interp_factor(8, mode, align)
    assert p["1"].fwd.var == pytest.approx(p["0"].fwd.var * factor, rel=1e-9)
    _agree(p["1"].fwd.var, m["1"].fwd.var, _sd(64, 8 * 64, 8, 3))


# ---- products, sums, functional weight layers --------------------------------------------------------------
def test_matmul_of_two_activations_and_sum() -> None:
    """``a @ b^T`` of two independent zero-mean activations: the product of their second moments times the
    contracted size D, exactly; ``sum`` over D features: D times the variance. The measured sum of one
    network varies with ``|sum_j w_j|^2`` of its weights, a chi-square with fan_in degrees of freedom:
    relative std sqrt(2 / fan_in), 4 of them allowed."""
    torch.manual_seed(0)
    x = torch.randn(128, 16, 64)
    model = Pair(64, lambda a, b: a @ b.transpose(-1, -2))
    with torch.no_grad():
        model.a.bias.zero_()
        model.b.bias.zero_()
    p, m = _both(model, x)
    assert p["op"].fwd.var == pytest.approx(64 * p["a"].fwd.var * p["b"].fwd.var, rel=1e-9)
    _agree(p["op"].fwd.var, m["op"].fwd.var, _sd(128, 256, 16, 64, kappa=4.0), 4 * math.sqrt(2 / 64))
    model = Pair(64, lambda a, b: a.sum(-1))
    with torch.no_grad():
        model.a.bias.zero_()
    p, m = _both(model, x)
    assert p["op"].fwd.var == pytest.approx(64 * p["a"].fwd.var, rel=1e-9)
    _agree(p["op"].fwd.var, m["op"].fwd.var, 0.0, 4 * math.sqrt(2 / 64) + 4 * _sd(128, 16, 16, 1e9))


class CustomConv1d(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3) / math.sqrt(3 * cin))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight)


def test_conv1d_and_parametrized_linear() -> None:
    """``F.conv1d`` on a custom layer's own weight, ``nn.Conv1d``, and a ``weight_norm`` Linear: each
    fan_in * mean(w^2) * E[x^2] of its effective weight (the parametrization's output), exactly, and
    within the sample's tolerance of measurement (unpadded convolutions: no border effect). The layer
    after a ReLU also carries one network's finite-width factor, of relative variance 5 / n_in (Hanin &
    Nica 2019), and the spread of its channels' offsets is missing from what one network measures
    (``expected_var``)."""
    torch.manual_seed(0)
    x = torch.randn(64, 4, 40)
    for first in (CustomConv1d(4, 16), nn.Conv1d(4, 16, 3, bias=False)):
        model = nn.Sequential(first, nn.ReLU(), nn.Conv1d(16, 16, 3))
        p, m = _both(model, x)
        q_in = p.meta["input_var"][0]
        assert p["0"].fwd.var == pytest.approx(12 * float(first.weight.detach().double().pow(2).mean()) * q_in,
                                               rel=1e-6)
        _agree(p["0"].fwd.var, m["0"].fwd.var, _sd(64, 16 * 38, 16, 12))
        _agree(p["2"].meta["expected_var"], m["2"].fwd.var, math.hypot(_sd(64, 16 * 36, 16, 48), math.sqrt(5 / 16)))
    model = nn.Sequential(weight_norm(nn.Linear(32, 64)), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(256, 32)
    p, m = _both(model, x)
    w_eff = model[0].weight.detach().double()
    bias = model[0].bias.detach().double()
    q_in = p.meta["input_var"][0]
    assert p["0"].fwd.var == pytest.approx(32 * float(w_eff.pow(2).mean()) * q_in + float(bias.var(unbiased=False)),
                                           rel=1e-6)
    _agree(p["0"].fwd.var, m["0"].fwd.var, _sd(256, 64, 64, 32))
    _agree(p["2"].meta["expected_var"], m["2"].fwd.var, math.hypot(_sd(256, 64, 64, 64), math.sqrt(5 / 64)))


def test_weight_norm_in_a_recorded_forward() -> None:
    """The recorded forward (the capture a model gets when export and fx fail, wav2vec2 in training mode)
    keeps a ``weight_norm`` parametrization as a module call on the layer's parameters: all its inputs are
    known, so predict calls it and reads the effective weight, as export's inlined ops give."""
    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv1d(4, 16, 3)), nn.ReLU(), nn.Conv1d(16, 8, 3))
    x = torch.randn(8, 4, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = capture(model, x, methods=["hooks"])
    assert any(n.op == "call" and n.kind == "_WeightNorm" for n in g.nodes)
    got, ref = predict(model, inputs=x, graph=g), predict(model, inputs=x, graph=capture(model, x))
    for name in ("0", "1", "2"):
        assert got[name].fwd.var == pytest.approx(ref[name].fwd.var, rel=1e-9)


# ---- attention ---------------------------------------------------------------------------------------------
def test_attention_w_matches_monte_carlo() -> None:
    """``W = E[sum_j P_j^2]`` of softmax rows of n i.i.d. N(0, s2) scores, against 20000 sampled rows:
    within 4 standard errors of the sample mean (uniform attention, s2 = 0: exactly 1 / n)."""
    gen = torch.Generator().manual_seed(0)
    assert float(attention_w(torch.tensor(16.0), torch.tensor(0.0))) == pytest.approx(1 / 16)
    for n in (4, 16, 64):
        for s2 in (0.1, 1.0, 4.0):
            z = torch.randn(20000, n, generator=gen, dtype=torch.float64) * math.sqrt(s2)
            w = z.softmax(-1).pow(2).sum(-1)
            exact = float(attention_w(torch.tensor(float(n)), torch.tensor(s2)))
            assert abs(exact - float(w.mean())) < 4 * float(w.std()) / math.sqrt(20000), (n, s2, exact)


class Attention(nn.Module):
    """q, k, v projections of one input, 4 heads of 16; ``eager`` writes the product and softmax out."""

    def __init__(self, scale: float, causal: bool = False, eager: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 64, bias=False) for _ in range(3))
        self.scale = scale

        def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if eager:
                s = q @ k.transpose(-1, -2) / 4
                if causal:
                    s = s.masked_fill(~torch.ones(16, 16, dtype=torch.bool).tril(), float("-inf"))
                return s.softmax(-1) @ v
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        self.att = Op(sdpa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, 4, 16).transpose(1, 2) for f in (self.q, self.k, self.v))
        return self.att(q * self.scale, k * self.scale, v)


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_attention_value_path(eager: bool) -> None:
    """At uniform attention (q = k = 0) the output of 16 keys is the mean of 16 independent values:
    v / 16, exactly; causal: v * mean_i 1 / (i + 1). With larger scores, W from the Gaussian-score
    integral; measured within the sample's tolerance plus 15% in variance for the scores' departure from
    i.i.d. Gaussians (the stated assumption, which the band widens for)."""
    torch.manual_seed(0)
    x = torch.randn(64, 16, 64)
    for causal, expect in [(False, 1 / 16), (True, sum(1 / (i + 1) for i in range(16)) / 16)]:
        model = Attention(0.0, causal, eager)
        p, m = _both(model, x)
        assert p["att"].fwd.var == pytest.approx(p["v"].fwd.var * expect, rel=1e-6)
        _agree(p["att"].fwd.var, m["att"].fwd.var, _sd(64, 16 * 64, 16, 64) / math.sqrt(expect))
    for scale in (1.0, 2.0, 4.0):
        model = Attention(scale, False, eager)
        p, m = _both(model, x)
        lo, hi = p["att"].fwd.var_band
        assert p["v"].fwd.var / 16 < p["att"].fwd.var <= p["v"].fwd.var
        _agree(p["att"].fwd.var, m["att"].fwd.var, 2 * _sd(64, 16 * 64, 16, 64), math.log(1.15))
        assert hi / lo > 1.0


class ThreeInputAttention(nn.Module):
    """Queries, keys and values projected from three independent inputs."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(64, 64, bias=False) for _ in range(3))
        self.scale = scale
        self.att = Op(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))

    def forward(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(a).view(b, t, 4, 16).transpose(1, 2) for f, a in ((self.q, x), (self.k, y), (self.v, z)))
        return self.att(q * self.scale, k * self.scale, v)


@pytest.mark.parametrize("scale", [0.5, 2.0, 4.0])
def test_sdpa_gradient_reaches_queries_keys_and_values(scale: float) -> None:
    """Backward through attention, from nearly uniform (scale 0.5) to nearly one-hot (scale 4, where the
    softmax's Jacobian, and so the gradient of queries and keys, shrinks by the exact
    ``E[sum P^2] - 2 E[sum P^3] + E[(sum P^2)^2]``): the values get ``sum_i E[P_ij^2] E[g_i^2]``; all three
    within 15% of measurement (64 x 4 heads x 16 x 16 gradients: 4 sampling sigmas are 4%)."""
    torch.manual_seed(0)
    model = ThreeInputAttention(scale)
    xs = tuple(torch.randn(64, 16, 64) for _ in range(3))
    p, m = _both(model, xs)
    for name in ("q", "k", "v"):
        assert abs(math.log(p[name].bwd.var / m[name].bwd.var)) < math.log(1.15), (name, p[name].bwd.var,
                                                                                    m[name].bwd.var)


class _TransposeView(nn.Module):
    """``transpose(...).contiguous().view(...)``, as MobileViT folds patches: the model's view follows a
    copy; predict treats the copy as the identity, so its own tensor is the transposed one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(48, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return self.out(y.transpose(1, 2).contiguous().view(x.shape[0], -1))


def test_view_after_a_transpose_is_predicted() -> None:
    torch.manual_seed(0)
    net = _TransposeView()
    x = torch.randn(4, 6, 8)
    t = sp.predict(net, inputs=x)
    ms = float(x.double().pow(2).mean())  # input_var None: the example input's mean square
    q = float((net.fc.bias.detach().double() ** 2).mean()) + 8 * float(net.fc.weight.detach().double().pow(2).mean()) * ms
    b = net.out.bias.detach().double()
    want = 48 * float(net.out.weight.detach().double().pow(2).mean()) * q + float(b.var(unbiased=False))
    assert t["out"].fwd.var == pytest.approx(want, rel=1e-9)  # the biases' spread is part of a layer's variance
