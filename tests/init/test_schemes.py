"""Tensor-level initializers: the variance each one promises, within bounds set by the sample size."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from signalprop import SignalpropError
from signalprop.init import orthogonal as O
from signalprop.init import schemes as S

Z = 6.0  # bounds are Z standard errors wide: a false alarm is a 1e-9 event per check


def _kurtosis(distribution: str) -> float:
    """E[w^4] / E[w^2]^2 of each distribution (normal 3, uniform 9/5, normal truncated at +-2 by scipy)."""
    if distribution == "normal":
        return 3.0
    if distribution == "uniform":
        return 9.0 / 5.0
    from scipy.stats import truncnorm

    d = truncnorm(-2.0, 2.0)
    return float(d.moment(4) / d.moment(2) ** 2)


def assert_variance(w: torch.Tensor, target_var: float, distribution: str) -> None:
    """The mean square of n i.i.d. zero-mean draws has relative standard error sqrt((kurtosis - 1) / n)."""
    n = w.numel()
    got = float(w.detach().double().pow(2).mean())
    tol = Z * target_var * math.sqrt((_kurtosis(distribution) - 1.0) / n)
    assert abs(got - target_var) <= tol, f"mean square {got:.6g} vs {target_var:.6g} +- {tol:.3g} (n={n})"


def test_truncation_factor_matches_scipy() -> None:
    from scipy.stats import truncnorm

    assert S.TRUNC_STD_FACTOR == pytest.approx(float(truncnorm(-2.0, 2.0).std()), abs=1e-12)
    assert S.TRUNC_STD_FACTOR == pytest.approx(0.87962566103423978, abs=1e-12)


@given(std=st.floats(0.01, 10.0), seed=st.integers(0, 2**31 - 1))
def test_truncated_normal_variance_is_exactly_the_target(std: float, seed: int) -> None:
    w = S.sample_(torch.empty(200_000), std, "truncated_normal", generator=torch.Generator().manual_seed(seed))
    assert_variance(w, std**2, "truncated_normal")
    bound = 2.0 * std / S.TRUNC_STD_FACTOR
    assert float(w.abs().max()) <= bound * (1 + 1e-6)
    assert float(w.abs().max()) >= 0.99 * bound  # it really is cut there, not narrower


@pytest.mark.parametrize("distribution", S.DISTRIBUTIONS)
@given(std=st.floats(0.01, 10.0), seed=st.integers(0, 2**31 - 1))
def test_sample_variance(distribution: str, std: float, seed: int) -> None:
    w = S.sample_(torch.empty(50_000), std, distribution, generator=torch.Generator().manual_seed(seed))
    assert_variance(w, std**2, distribution)


@given(
    out=st.integers(1, 64),
    inp=st.integers(1, 64),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_named_schemes_use_pytorch_shape_fans_on_bare_tensors(out: int, inp: int, k: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    fan_in, fan_out = inp * k * k, out * k * k
    cases = [
        (S.he_normal_, {}, 2.0 / fan_in, "normal"),
        (S.he_uniform_, {"mode": "fan_out"}, 2.0 / fan_out, "uniform"),
        (S.he_normal_, {"nonlinearity": "linear"}, 1.0 / fan_in, "normal"),
        (S.glorot_normal_, {}, 2.0 / (fan_in + fan_out), "normal"),
        (S.glorot_uniform_, {"gain": 2.0}, 8.0 / (fan_in + fan_out), "uniform"),
        (S.lecun_normal_, {}, 1.0 / fan_in, "normal"),
        (S.lecun_uniform_, {}, 1.0 / fan_in, "uniform"),
        (S.variance_scaling_, {"scale": 3.0, "mode": "fan_avg"}, 6.0 / (fan_in + fan_out), "truncated_normal"),
    ]
    for fn, kw, var, dist in cases:
        w = fn(torch.empty(out, inp, k, k), generator=g, **kw)
        assert_variance(w, var, dist)


def test_explicit_fans_override_the_shape() -> None:
    w = S.he_normal_(torch.empty(400, 300), fans=(100, 7), generator=torch.Generator().manual_seed(1))
    assert_variance(w, 2.0 / 100, "normal")


@given(rows=st.integers(1, 40), cols=st.integers(1, 40), gain=st.floats(0.1, 3.0), seed=st.integers(0, 2**31 - 1))
def test_orthogonal_rows_or_columns(rows: int, cols: int, gain: float, seed: int) -> None:
    w = O.orthogonal_(torch.empty(rows, cols, dtype=torch.float64), gain=gain, generator=torch.Generator().manual_seed(seed))
    gram = w @ w.T if rows <= cols else w.T @ w
    assert torch.allclose(gram, gain**2 * torch.eye(min(rows, cols), dtype=torch.float64), atol=1e-10)
    assert float(w.pow(2).mean().sqrt()) == pytest.approx(S.orthogonal_std(rows, cols, gain=gain), rel=1e-10)


def test_orthogonal_groups_and_out_dim() -> None:
    g = torch.Generator().manual_seed(0)
    w = O.orthogonal_(torch.empty(8, 1, 3, 3, dtype=torch.float64), groups=8, generator=g)
    assert torch.allclose(w.flatten(1).norm(dim=1), torch.ones(8, dtype=torch.float64))
    w2 = O.orthogonal_(torch.empty(5, 3, dtype=torch.float64), out_dim=1, generator=g)  # [in, out]: rows = out
    assert torch.allclose(w2.T @ w2, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_delta_orthogonal_tensor_is_zero_off_centre() -> None:
    w = O.delta_orthogonal_(torch.empty(6, 4, 3, 5, dtype=torch.float64), gain=2.0, generator=torch.Generator().manual_seed(0))
    centre = w[:, :, 1, 2]
    assert torch.allclose(centre.T @ centre, 4.0 * torch.eye(4, dtype=torch.float64), atol=1e-12)
    w[:, :, 1, 2] = 0
    assert float(w.abs().max()) == 0.0


def test_tensor_contract_in_place_no_grad_and_return() -> None:
    p = torch.nn.Parameter(torch.empty(8, 8))
    out = S.he_normal_(p)
    assert out is p and p.requires_grad and p.grad_fn is None


def test_generator_reproduces_and_low_precision_is_the_rounded_draw() -> None:
    a = S.he_normal_(torch.empty(32, 16), generator=torch.Generator().manual_seed(3))
    b = S.he_normal_(torch.empty(32, 16), generator=torch.Generator().manual_seed(3))
    c = S.he_normal_(torch.empty(32, 16, dtype=torch.bfloat16), generator=torch.Generator().manual_seed(3))
    d = S.he_normal_(torch.empty(32, 16), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert torch.equal(c, a.to(torch.bfloat16))
    assert not torch.equal(a, d)


def test_meta_tensors_are_a_no_op() -> None:
    t = torch.empty(4, 4, device="meta")
    assert S.he_normal_(t, generator=torch.Generator().manual_seed(0)) is t
    assert O.orthogonal_(t) is t
    assert O.delta_orthogonal_(torch.empty(4, 4, 3, 3, device="meta")).is_meta


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: S.he_normal_(torch.zeros(3, 4, dtype=torch.int64)), "floating-point tensor.*int64"),
        (lambda: S.he_normal_([1.0, 2.0]), "torch.Tensor, got list"),  # type: ignore[arg-type]
        (lambda: S.he_normal_(torch.empty(5)), "at least 2 dimensions.*fans="),
        (lambda: S.he_normal_(torch.empty(3, 4), nonlinearity="swishy"), "unknown activation 'swishy'.*relu"),
        (lambda: S.he_normal_(torch.empty(3, 4), mode="fan_avg"), "variance_scaling_"),
        (lambda: S.he_normal_(torch.empty(3, 4), mode="in"), "unknown mode 'in'.*fan_in, fan_out, fan_avg"),
        (lambda: S.variance_scaling_(torch.empty(3, 4), distribution="cauchy"), "unknown distribution 'cauchy'"),
        (lambda: S.variance_scaling_(torch.empty(3, 4), scale=-1.0), "scale must be"),
        (lambda: S.glorot_normal_(torch.empty(3, 4), gain=0.0), "gain must be positive"),
        (lambda: S.he_normal_(torch.empty(3, 4), fans=(0, 3)), "positive"),
        (lambda: S.he_normal_(torch.empty(3, 4), fans=3), "pair"),  # type: ignore[arg-type]
        (lambda: O.orthogonal_(torch.empty(6, 3), groups=4), "groups=4"),
        (lambda: O.orthogonal_(torch.empty(6)), "at least 2 dimensions"),
        (lambda: S.sample_(torch.empty(3), -1.0), "std must be"),
    ],
)
def test_bad_input(call: object, match: str) -> None:
    with pytest.raises(SignalpropError, match=match):
        call()  # type: ignore[operator]


def test_gain_accepts_an_activation() -> None:
    from signalprop import theory

    w = S.glorot_normal_(torch.empty(300, 300), gain="tanh", generator=torch.Generator().manual_seed(0))
    assert_variance(w, theory.gain("tanh") ** 2 / 300, "normal")
