"""Tests of signalprop.theory: known values from the papers, closed forms, Monte Carlo with tolerances
from the sample size, and the properties the maps must have (fixed points, criticality, vectorization)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from signalprop import SignalpropError, theory

ACTS = ["relu", "tanh", "sigmoid", "gelu", "silu", "elu", "selu", "softplus", "erf", "leaky_relu"]


# ---- known values from the papers -------------------------------------------------------------------
def test_relu_critical_weight_var_is_two_at_zero_bias() -> None:
    # He et al. 2015: Var[w] = 2 / fan_in; on the chi1 = 1 line (Poole et al. 2016) for every q.
    assert theory.critical_weight_var("relu", bias_var=0.0) == pytest.approx(2.0, rel=1e-6)


def test_tanh_critical_weight_var_at_bias_var_005() -> None:
    # Poole et al. 2016 / Schoenholz et al. 2017 (Fig. 1): sigma_w^2 ~ 1.76 at sigma_b^2 = 0.05.
    wv = theory.critical_weight_var("tanh", bias_var=0.05)
    assert wv == pytest.approx(1.76, abs=0.01)
    assert theory.chi1("tanh", weight_var=wv, bias_var=0.05) == pytest.approx(1.0, abs=1e-6)


def test_gains() -> None:
    assert theory.gain("relu") == pytest.approx(math.sqrt(2.0), rel=1e-12)
    assert theory.gain("linear") == pytest.approx(1.0, rel=1e-12)
    # E[tanh(z)^2] = 0.3942944903978 (scipy.integrate.quad to 1e-14)
    assert theory.gain("tanh") == pytest.approx(1 / math.sqrt(0.39429449039784115), rel=1e-12)
    assert theory.gain(nn.LeakyReLU(0.2)) == pytest.approx(math.sqrt(2 / (1 + 0.2**2)), rel=1e-12)
    assert theory.torch_gain("relu") == pytest.approx(theory.gain("relu"), rel=1e-12)
    assert theory.torch_gain("tanh") == pytest.approx(5 / 3)
    assert theory.torch_gain("gelu") is None


def test_kurtosis_factor_relu_and_gaussian() -> None:
    # Hanin & Nica 2019: beta = E[phi^4] / E[phi^2]^2 - 1 is 5 for ReLU and 2 for a Gaussian.
    assert theory.kurtosis_factor("relu") == pytest.approx(5.0, rel=1e-10)
    assert theory.kurtosis_factor("linear") == pytest.approx(2.0, rel=1e-10)


# ---- closed forms -------------------------------------------------------------------------------------
def test_second_moment_closed_forms() -> None:
    q = np.array([1e-3, 0.1, 1.0, 5.0, 40.0])
    np.testing.assert_allclose(theory.second_moment("relu", q), q / 2, rtol=1e-12)
    np.testing.assert_allclose(theory.second_moment("linear", q), q, rtol=1e-12)
    # E[erf(sqrt(q) z)^2] = (2/pi) arcsin(2q / (1 + 2q))  (Williams 1997)
    np.testing.assert_allclose(theory.second_moment("erf", q), 2 / np.pi * np.arcsin(2 * q / (1 + 2 * q)), rtol=1e-10)
    np.testing.assert_allclose(theory.mean_act("relu", q), np.sqrt(q / (2 * np.pi)), rtol=1e-12)
    np.testing.assert_allclose(theory.deriv_second_moment("relu", q), 0.5, rtol=1e-12)


def test_relu_qmap_is_linear_and_identity_at_he() -> None:
    q = np.logspace(-6, 6, 13)
    np.testing.assert_allclose(theory.qmap("relu", q, weight_var=2.0), q, rtol=1e-12)
    np.testing.assert_allclose(theory.qmap("relu", q, weight_var=1.0, bias_var=0.3), q / 2 + 0.3, rtol=1e-12)


def test_relu_cmap_matches_arc_cosine_kernel() -> None:
    # Cho & Saul 2009: E[relu(u1) relu(u2)] = q / (2 pi) (sqrt(1 - c^2) + (pi - arccos c) c).
    c = np.array([-0.9, -0.5, 0.0, 0.3, 0.7, 0.95, 0.999])
    expected = (np.sqrt(1 - c**2) + (np.pi - np.arccos(c)) * c) / np.pi
    np.testing.assert_allclose(theory.cmap("relu", c, weight_var=2.0), expected, atol=2e-4)
    assert theory.cmap("relu", 1.0, weight_var=2.0) == pytest.approx(1.0, abs=1e-12)


def test_tanh_cmap_is_increasing_and_fixes_one() -> None:
    c = np.linspace(-0.95, 0.95, 20)
    vals = np.asarray(theory.cmap("tanh", c, weight_var=1.5, bias_var=0.05))
    assert np.all(np.diff(vals) > 0)
    assert theory.cmap("tanh", 1.0, weight_var=1.5, bias_var=0.05) == pytest.approx(1.0, abs=1e-12)


# ---- Monte Carlo: tolerances from the sample size ---------------------------------------------------
@settings(max_examples=12)
@given(act=st.sampled_from(ACTS), q=st.floats(0.05, 20.0), seed=st.integers(0, 2**31 - 1))
def test_second_moment_matches_monte_carlo(act: str, q: float, seed: int) -> None:
    n = 200_000
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=gen, dtype=torch.float64)
    v = theory.resolve(act)(math.sqrt(q) * z) ** 2
    se = float(v.std()) / math.sqrt(n)
    # 5 standard errors: a false failure has probability 6e-7 per example
    assert float(theory.second_moment(act, q)) == pytest.approx(float(v.mean()), abs=5 * se + 1e-12)


@settings(max_examples=10)
@given(act=st.sampled_from(ACTS), wv=st.floats(0.3, 4.0), seed=st.integers(0, 2**31 - 1))
def test_chi1_matches_monte_carlo_at_given_q(act: str, wv: float, seed: int) -> None:
    n = 200_000
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_(True)
    (d,) = torch.autograd.grad(theory.resolve(act)(x).sum(), x)
    v = wv * d.detach() ** 2
    se = float(v.std()) / math.sqrt(n)
    assert theory.chi1(act, weight_var=wv, q=1.0) == pytest.approx(float(v.mean()), abs=5 * se + 1e-12)


# ---- properties ---------------------------------------------------------------------------------------
@settings(max_examples=8)
@given(act=st.sampled_from(ACTS), qs=st.lists(st.floats(1e-3, 50.0), min_size=1, max_size=6))
def test_second_moment_is_vectorized(act: str, qs: list[float]) -> None:
    vec = np.asarray(theory.second_moment(act, np.array(qs)))
    single = np.array([theory.second_moment(act, q) for q in qs])
    np.testing.assert_allclose(vec, single, rtol=1e-12)


@settings(max_examples=6)
@given(wv=st.floats(0.1, 10.0))
def test_relu_chi1_is_half_the_weight_variance(wv: float) -> None:
    assert theory.chi1("relu", weight_var=wv) == pytest.approx(wv / 2, rel=1e-10)


def test_fixed_point_properties() -> None:
    q = theory.fixed_point("tanh", weight_var=1.76, bias_var=0.05)
    assert 0 < q < 10
    assert theory.qmap("tanh", q, weight_var=1.76, bias_var=0.05) == pytest.approx(q, rel=1e-8)
    assert theory.fixed_point("tanh", weight_var=0.8) == 0.0  # ordered, no bias: the signal dies
    assert theory.fixed_point("relu", weight_var=2.5) == math.inf  # ReLU above He grows without bound
    assert theory.fixed_point("relu", weight_var=2.0, q0=3.0) == 3.0  # He: every q is a fixed point


def test_depth_scales() -> None:
    # ReLU: phi'' = 0 almost everywhere and c* = 1 below criticality, so xi_q = xi_c = -1 / log(chi1).
    xq, xc = theory.depth_scales("relu", weight_var=1.8)
    assert xq == pytest.approx(-1 / math.log(0.9), rel=1e-8)
    assert xc == pytest.approx(-1 / math.log(0.9), rel=1e-8)
    assert theory.depth_scales("relu", weight_var=2.0)[1] == math.inf  # critical: xi_c diverges
    # tanh in the ordered phase: c* = 1, so chi_c = chi1 and xi_c = -1 / log(chi1) (Schoenholz et al. 2017)
    wv, bv = 1.2, 0.05
    chi = theory.chi1("tanh", weight_var=wv, bias_var=bv)
    xq, xc = theory.depth_scales("tanh", weight_var=wv, bias_var=bv)
    assert chi < 1
    assert xc == pytest.approx(-1 / math.log(chi), rel=1e-6)
    assert 0 < xq < xc  # the length settles faster than the correlation


def test_resolve_errors_and_modules() -> None:
    with pytest.raises(SignalpropError, match="known names are"):
        theory.resolve("relu2")
    with pytest.raises(SignalpropError, match="cannot use int"):
        theory.resolve(3)  # type: ignore[arg-type]
    assert theory.second_moment(nn.LeakyReLU(0.2)) == pytest.approx((1 + 0.04) / 2, rel=1e-12)
    assert theory.activation_name(nn.LeakyReLU(0.2)) == "leaky_relu(0.2)"
    assert theory.activation_key(nn.GELU()) == "gelu"
    assert theory.activation_key(nn.Linear(2, 2)) is None
    with pytest.raises(SignalpropError, match="smaller bias variance"):
        theory.critical_weight_var("relu", bias_var=0.5, hi=1.5)
