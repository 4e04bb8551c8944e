"""Activation names: every name signalprop gives an activation reads back through theory.resolve and
sp.gain as the same function, parameters included; the critical point of tanh at sigma_b^2 = 0 is exact."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import signalprop as sp
from signalprop import SignalpropError, theory

X = torch.linspace(-30.0, 30.0, 6001, dtype=torch.float64)  # covers softplus' threshold and hardtanh's bounds

MODULES = [
    nn.ReLU(), nn.ReLU6(), nn.Tanh(), nn.Sigmoid(), nn.SiLU(), nn.Mish(), nn.SELU(), nn.Softsign(),
    nn.Hardswish(), nn.Identity(), nn.GELU(), nn.GELU(approximate="tanh"), nn.ELU(), nn.CELU(), nn.Softplus(),
    nn.Hardtanh(), nn.LeakyReLU(), nn.LeakyReLU(0.2), nn.LeakyReLU(0.0), nn.LeakyReLU(1e-3),
    nn.LeakyReLU(0.123456789), nn.LeakyReLU(-0.5), nn.PReLU(init=0.3), nn.PReLU(4, init=0.1), nn.ELU(0.5),
    nn.ELU(alpha=2.5), nn.CELU(2.0), nn.CELU(0.3), nn.Softplus(beta=2.0), nn.Softplus(beta=0.5, threshold=5.0),
    nn.Hardtanh(-2.0, 3.0), nn.Hardtanh(0.0, 1.0),
]


def same_function(a: theory.ActLike, b: theory.ActLike, rtol: float = 1e-12) -> None:
    fa, fb = theory.resolve(a), theory.resolve(b)
    with torch.no_grad():
        torch.testing.assert_close(fa(X), fb(X), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("name", theory.known_activations())
def test_every_registry_name_round_trips(name: str) -> None:
    assert theory.activation_name(name) == name
    assert theory.resolve(name) is theory.resolve(theory.activation_name(name))
    same_function(theory.activation_name(theory.resolve(name)), name)  # the function's name: swish -> silu


@pytest.mark.parametrize("module", MODULES, ids=lambda m: repr(m))
def test_every_module_name_round_trips(module: nn.Module) -> None:
    name = theory.activation_name(module)
    assert "(" not in name or theory.parse_name(name)[1] is not None
    rtol = 1e-7 if isinstance(module, nn.PReLU) else 1e-12  # a PReLU's slope is named at float32 precision
    same_function(name, module, rtol)
    assert sp.gain(name) == pytest.approx(sp.gain(module), rel=rtol)


def test_the_names_of_parameterized_modules() -> None:
    assert theory.activation_name(nn.LeakyReLU(0.2)) == "leaky_relu(0.2)"
    assert theory.activation_name(nn.LeakyReLU()) == "leaky_relu(0.01)"
    assert theory.activation_name(nn.PReLU(init=0.3)) == "leaky_relu(0.3)"  # float32 slope, float32 text
    assert theory.activation_name(nn.ELU(0.5)) == "elu(0.5)" and theory.activation_name(nn.ELU()) == "elu"
    assert theory.activation_name(nn.CELU(2.0)) == "celu(2)"
    assert theory.activation_name(nn.Softplus(beta=2.0)) == "softplus(2)"
    assert theory.activation_name(nn.Softplus(beta=0.5, threshold=5.0)) == "softplus(0.5, 5)"
    assert theory.activation_name(nn.Hardtanh(-2.0, 3.0)) == "hardtanh(-2, 3)"
    assert theory.activation_name(nn.ReLU6()) == "relu6"
    assert theory.activation_name(nn.LeakyReLU(1e-5)) == "leaky_relu(1e-05)"
    assert theory.activation_name(nn.LeakyReLU(0.123456789)) == "leaky_relu(0.123456789)"  # not :g's 0.123457


@settings(max_examples=60, deadline=None)
@given(
    slope=st.floats(-2.0, 2.0, allow_nan=False),
    alpha=st.floats(0.01, 5.0),
    beta=st.floats(0.1, 10.0),
    threshold=st.floats(1.0, 30.0),
    lo=st.floats(-5.0, 0.0),
    width=st.floats(0.01, 5.0),
)
def test_parameters_read_back_exactly(slope: float, alpha: float, beta: float, threshold: float, lo: float,
                                      width: float) -> None:
    cases = [
        (nn.LeakyReLU(slope), (slope,)),
        (nn.ELU(alpha), (alpha,)),
        (nn.CELU(alpha), (alpha,)),
        (nn.Softplus(beta=beta, threshold=threshold), (beta, threshold)),
        (nn.Hardtanh(lo, lo + width), (lo, lo + width)),
    ]
    for module, params in cases:
        key, read = theory.parse_name(theory.activation_name(module))
        defaults = [d for _, d in theory._PARAMETERS[key]]
        full = (*(read or ()), *defaults[len(read or ()):])
        assert full == params, (module, theory.activation_name(module))
        same_function(theory.activation_name(module), module)


def test_gain_accepts_parameterized_names() -> None:
    # E[leaky_relu(z)^2] = (1 + a^2) / 2 exactly (He et al. 2015, Sec. 2.2)
    assert sp.gain("leaky_relu(0.2)") == pytest.approx(math.sqrt(2 / (1 + 0.2**2)), rel=1e-12)
    assert sp.gain("Leaky-ReLU(negative_slope=0.2)") == sp.gain("leaky_relu(0.2)")
    assert sp.gain("leaky_relu()") == sp.gain("leaky_relu")
    assert sp.gain("hardtanh(min_val=-2)") == sp.gain(nn.Hardtanh(-2.0, 1.0))
    assert theory.torch_gain("leaky_relu(0.2)") == pytest.approx(torch.nn.init.calculate_gain("leaky_relu", 0.2))
    assert theory.torch_gain("leaky_relu") == pytest.approx(torch.nn.init.calculate_gain("leaky_relu"))
    assert theory.torch_gain("elu(0.5)") is None
    assert theory.activation_name("Leaky-ReLU( 0.20 )") == "leaky_relu(0.2)"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("leaky_relu(a)", "write numbers"),
        ("leaky_relu(0.2", "write numbers"),
        ("tanh(2)", "takes no parameters"),
        ("leaky_relu(1, 2)", "takes negative_slope"),
        ("elu(beta=2)", "takes alpha"),
        ("elu(1, alpha=2)", "takes alpha"),
        ("leaky_relu(True)", "finite numbers"),
        ("leaky_relu(1e999)", "finite numbers"),
        ("hardtanh(2, 1)", "min_val"),
        ("celu(0)", "alpha cannot be 0"),
        ("relu2(1)", "unknown activation"),
    ],
)
def test_bad_names_say_what_is_wrong(text: str, reason: str) -> None:
    with pytest.raises(SignalpropError, match=reason):
        theory.resolve(text)
    assert theory.activation_name(text) == text.lower()  # naming never raises


# ---- the critical point at sigma_b^2 = 0 ------------------------------------------------------------------
@pytest.mark.parametrize(("act", "weight_var"), [("tanh", 1.0), ("sin", 1.0), ("erf", math.pi / 4),
                                                 ("elu", 1.0), ("softsign", 1.0)])
def test_critical_point_without_bias_is_exact_and_its_fixed_point_zero(act: str, weight_var: float) -> None:
    # phi(0) = 0: q* = 0 on the ordered side, chi1 = sigma_w^2 E[phi'(0)^2] there, 1 at 1 / E[phi'(0)^2]
    # (Poole et al. 2016, Sec. 3): tanh and sin have phi'(0) = 1, erf 2 / sqrt(pi), ELU 1 on both sides.
    wv = theory.critical_weight_var(act, bias_var=0.0)
    assert wv == pytest.approx(weight_var, rel=1e-15)
    assert theory.fixed_point(act, weight_var=wv) == 0.0
    assert theory.chi1(act, weight_var=wv) == pytest.approx(1.0, abs=1e-5)


def test_critical_points_elsewhere_keep_the_root_search() -> None:
    assert theory.critical_weight_var("relu", bias_var=0.0) == pytest.approx(2.0, rel=1e-12)
    assert theory.critical_weight_var("tanh", bias_var=0.05) == pytest.approx(1.76, abs=0.01)
    assert theory.critical_weight_var("linear", bias_var=0.0) == pytest.approx(1.0, rel=1e-12)
