"""The Gaussian expectations behind predict: closed forms, Mehler's series, the maximum of correlated Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from signalprop import theory
from signalprop.prediction._gauss import act_moments, max_moments

D = torch.float64


def _t(*xs: float) -> list[torch.Tensor]:
    return [torch.tensor([x], dtype=D) for x in xs]


@pytest.mark.parametrize("rho", [0.0, 0.1, 1 / math.pi, 0.6, 0.9, 0.99, 0.999, 1.0])
def test_relu_pair_is_the_arccosine_kernel(rho: float) -> None:
    """Zero mean: E[relu(u_a) relu(u_b)] = v / (2 pi) (sqrt(1 - rho^2) + (pi - arccos rho) rho) (Cho & Saul 2009)."""
    v = 2.5
    m, vv, s = _t(0.0, v, rho * v)
    mean, _, _, _, cov = act_moments("relu", m, vv, s)
    assert cov is not None
    exact = v / (2 * math.pi) * (math.sqrt(1 - rho * rho) + (math.pi - math.acos(rho)) * rho)
    assert float(cov + mean * mean) == pytest.approx(exact, rel=2e-4)


@pytest.mark.parametrize("rho", [0.2, 0.7, 0.95])
def test_tanh_pair_matches_theory_pair_rule(rho: float) -> None:
    """The generic (quadrature + Hermite) path against theory's independent two-dimensional product rule."""
    q = 1.3
    m, v, s = _t(0.0, q, rho * q)
    mean, _, _, _, cov = act_moments("tanh", m, v, s)
    assert cov is not None
    ref = float(theory._pair_expect("tanh", q, rho, deriv=False))
    assert float(cov + mean * mean) == pytest.approx(ref, abs=2e-5)


def _pair_2d(f, m: float, v: float, s: float) -> float:
    """E[f(u_a) f(u_b)] - E[f]^2 by nested Gauss-Hermite (numpy), u = m + sqrt(s) g0 + sqrt(v - s) g."""
    z, w = np.polynomial.hermite_e.hermegauss(150)
    w = w / w.sum()
    inner = (w[None, :] * f(m + math.sqrt(s) * z[:, None] + math.sqrt(v - s) * z[None, :])).sum(1)
    mean = (w * f(m + math.sqrt(v) * z)).sum()
    return float((w * inner * inner).sum() - mean * mean)


@pytest.mark.parametrize("act,f", [
    ("gelu", lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))),
    ("tanh", np.tanh),
    ("sigmoid", lambda x: 1 / (1 + np.exp(-x))),
])
@pytest.mark.parametrize("m,v,s", [(0.7, 1.0, 0.3), (-0.4, 2.0, 1.5), (1.5, 0.5, 0.05)])
def test_shared_part_with_a_mean(act: str, f, m: float, v: float, s: float) -> None:
    """Nonzero means (biases): Mehler's series on the quadrature coefficients against a direct 2-D integral."""
    mean, second, _, _, cov = act_moments(act, *_t(m, v, s))
    assert cov is not None
    assert float(cov) == pytest.approx(_pair_2d(f, m, v, s), rel=2e-3, abs=1e-6)
    assert 0 <= float(cov) <= float(second - mean * mean) + 1e-12


@pytest.mark.parametrize("act", ["relu", nn.LeakyReLU(0.2), "linear"])
@pytest.mark.parametrize("m,v", [(0.0, 1.0), (0.8, 0.3), (-1.2, 2.0), (3.0, 0.01)])
def test_piecewise_closed_forms_match_quadrature(act, m: float, v: float) -> None:
    """Truncated-moment closed forms against the generic quadrature of the same function (a lambda); a kink
    between quadrature nodes limits the quadrature to about 2e-4 (the closed forms are exact: scipy's
    adaptive quad agrees with them to 1e-15 at m = -1.2, v = 2)."""
    fn = theory.resolve(act)
    got = act_moments(act, *_t(m, v), torch.tensor([0.4 * v], dtype=D))
    ref = act_moments(lambda x: fn(x), *_t(m, v), torch.tensor([0.4 * v], dtype=D))  # noqa: PLW0108
    for a, b in zip(got[:3] + got[4:], ref[:3] + ref[4:]):
        assert a is not None and b is not None
        assert float(a) == pytest.approx(float(b), rel=5e-4, abs=1e-8)
    assert float(got[3]) == pytest.approx(float(ref[3]), abs=2e-3)  # E[phi'^2]: the kink costs the quadrature


def test_nothing_shared_leaves_moments_alone() -> None:
    """s = 0: the output shares nothing, and the per-element moments are those without s (He's formula)."""
    m, v = _t(0.3, 1.7)
    a = act_moments("relu", m, v, torch.zeros(1, dtype=D))
    b = act_moments("relu", m, v)
    assert a[4] is not None and float(a[4]) == 0.0 and b[4] is None
    assert all(float(x) == float(y) for x, y in zip(a[:4], b[:4]))
    sig, t = math.sqrt(1.7), 0.3 / math.sqrt(1.7)  # E[relu^2] = (m^2 + v) Phi(t) + m sigma phi(t)
    phi, big_phi = math.exp(-t * t / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(t / math.sqrt(2)))
    assert float(b[1]) == pytest.approx((0.09 + 1.7) * big_phi + 0.3 * sig * phi, rel=1e-12)


@pytest.mark.parametrize("m,v,s,k", [(0.0, 1.0, 0.0, 4), (0.2, 1.0, 0.3, 4), (0.0, 1.0, 0.9, 9), (-0.5, 2.0, 1.0, 2)])
def test_max_of_equicorrelated_relus_against_sampling(m: float, v: float, s: float, k: int) -> None:
    """Monte Carlo with 200k windows pairs; each estimate within 5 of its own standard errors."""
    n = 200_000
    g0 = torch.randn(n, 1, dtype=D)
    ya = (m + math.sqrt(s) * g0 + math.sqrt(v - s) * torch.randn(n, k, dtype=D)).relu().amax(1)
    yb = (m + math.sqrt(s) * g0 + math.sqrt(v - s) * torch.randn(n, k, dtype=D)).relu().amax(1)
    got = max_moments("relu", *_t(m, v, s), k)
    samples = [ya, ya**2, ya**4, (ya - ya.mean()) * (yb - yb.mean())]
    for g, x in zip(got, samples):
        se = float(x.std()) / math.sqrt(n)
        assert abs(float(g) - float(x.mean())) < 5 * se + 1e-9, (float(g), float(x.mean()), se)


def test_max_with_many_channels_uses_one_table() -> None:
    """Per-channel biases with one shared w: the tabulated path agrees with the direct integral per row."""
    m = torch.linspace(-1, 1, 300, dtype=D)
    v = torch.full_like(m, 1.0)
    s = torch.full_like(m, 0.4)
    table = max_moments("relu", m, v, s, 4)
    direct = [max_moments("relu", m[i:i + 1], v[:1], s[:1], 4) for i in (0, 150, 299)]
    for j, i in enumerate((0, 150, 299)):
        for a, b in zip(table, direct[j]):
            assert float(a[i]) == pytest.approx(float(b[0]), rel=2e-4, abs=1e-8)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), slope=st.sampled_from([0.0, 0.2, 1.0]), uniform=st.booleans())
def test_array_closed_forms_match_the_float_path(seed: int, slope: float, uniform: bool) -> None:
    """A layer's biases go through the numpy closed forms; each element must agree with the one-float path
    (``_piecewise_float``, ``_piecewise_cov`` on one element), also at zero variance and far in the tails:
    to 1e-9 relative, or 1e-12 of the input's own scale (E[u^2]^(p/2) for the p-th moment) where both
    forms are limited by cancellation (m / sigma below -10, values under 1e-30 of that scale)."""
    from signalprop.prediction._gauss import _piecewise_arrays, _piecewise_cov, _piecewise_float

    rng = np.random.default_rng(seed)
    n = 64
    m = rng.normal(0.0, rng.choice([0.01, 1.0, 10.0]), n)
    v = np.exp(rng.normal(0.0, 2.0, n))
    v[rng.random(n) < 0.1] = 0.0
    rho = np.full(n, rng.random()) if uniform else rng.random(n)
    got = _piecewise_arrays(slope, *(torch.from_numpy(a) for a in (m, v, rho * v)))
    for i in range(n):
        e1, e2, e4, d2 = _piecewise_float(slope, float(m[i]), float(v[i]))
        cov = float(_piecewise_cov(slope, m[i:i + 1], v[i:i + 1], rho[i:i + 1], np.array([e1]))[0])
        q = float(m[i] ** 2 + v[i])
        for t, ref, scale in zip(got, (e1, e2, e4, d2, cov), (q**0.5, q, q * q, 1.0, q)):
            assert t is not None
            assert float(t[i]) == pytest.approx(ref, rel=1e-9, abs=1e-12 * scale)


def test_normal_cdf_keeps_the_far_left_tail() -> None:
    """Phi(-23.5) = 4.1e-122: ``torch.special.ndtr`` gives 0 there in float64, ``_ndtr`` the value."""
    from signalprop.prediction._gauss import _ndtr

    x = np.array([-37.0, -23.5, -8.0, -1.0, 0.0, 2.0, 9.0])
    ref = [0.5 * math.erfc(-v / math.sqrt(2)) for v in x]
    assert _ndtr(x).tolist() == pytest.approx(ref, rel=1e-13)
    assert _ndtr(x)[0] > 0
