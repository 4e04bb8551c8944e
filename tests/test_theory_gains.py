"""sp.gain for every named activation against an independent quadrature (scipy.integrate.quad on numpy code)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from torch import nn

import signalprop as sp
from signalprop import SignalpropError, theory

pytest.importorskip("scipy")
from scipy import integrate, special  # noqa: E402


def _softplus(x: float, beta: float = 1.0, threshold: float = 20.0) -> float:
    return x if beta * x > threshold else math.log1p(math.exp(beta * x)) / beta


SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946

# Written from the definitions, not from torch: name -> f(x) for one float.
NUMPY_ACTS: dict[str, Callable[[float], float]] = {
    "linear": lambda x: x,
    "identity": lambda x: x,
    "relu": lambda x: max(x, 0.0),
    "leaky_relu": lambda x: x if x > 0 else 0.01 * x,
    "relu6": lambda x: min(max(x, 0.0), 6.0),
    "tanh": math.tanh,
    "sigmoid": lambda x: float(special.expit(x)),
    "gelu": lambda x: x * 0.5 * (1.0 + math.erf(x / math.sqrt(2.0))),
    "gelu_tanh": lambda x: 0.5 * x * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
    "silu": lambda x: x * special.expit(x),
    "swish": lambda x: x * special.expit(x),
    "quick_gelu": lambda x: x * special.expit(1.702 * x),
    "relu_squared": lambda x: max(x, 0.0) ** 2,
    "mish": lambda x: x * math.tanh(_softplus(x)),
    "elu": lambda x: x if x > 0 else math.expm1(x),
    "celu": lambda x: x if x > 0 else math.expm1(x),
    "selu": lambda x: SELU_SCALE * (x if x > 0 else SELU_ALPHA * math.expm1(x)),
    "softplus": _softplus,
    "softsign": lambda x: x / (1.0 + abs(x)),
    "hardtanh": lambda x: min(max(x, -1.0), 1.0),
    "hardswish": lambda x: x * min(max(x + 3.0, 0.0), 6.0) / 6.0,
    "erf": math.erf,
    "sin": math.sin,
}

KINKS = [-3.0, -1.0, 0.0, 1.0, 3.0, 6.0, 20.0]


def quad_gain(f: Callable[[float], float]) -> float:
    """1 / sqrt(E[f(z)^2]), z ~ N(0, 1), by adaptive quadrature split at every kink of the activations above."""
    pdf = lambda x: f(x) ** 2 * math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    edges = [-math.inf, *KINKS, math.inf]
    total = sum(integrate.quad(pdf, a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0] for a, b in zip(edges, edges[1:]))
    return 1.0 / math.sqrt(total)


def test_every_named_activation_is_covered() -> None:
    assert sorted(NUMPY_ACTS) == theory.known_activations()


@pytest.mark.parametrize("name", sorted(NUMPY_ACTS))
def test_gain_matches_independent_quadrature(name: str) -> None:
    assert sp.gain(name) == pytest.approx(quad_gain(NUMPY_ACTS[name]), rel=1e-6)


def test_exact_values() -> None:
    assert abs(sp.gain("relu") - math.sqrt(2.0)) < 1e-6
    assert abs(sp.gain("linear") - 1.0) < 1e-6
    assert sp.gain("tanh") == pytest.approx(1.5925, abs=5e-5)
    assert sp.gain(nn.LeakyReLU(0.2)) == pytest.approx(math.sqrt(2.0 / 1.04), rel=1e-9)


@pytest.mark.parametrize(
    ("module", "f"),
    [
        (nn.LeakyReLU(0.2), lambda x: x if x > 0 else 0.2 * x),
        (nn.ELU(alpha=0.5), lambda x: x if x > 0 else 0.5 * math.expm1(x)),
        (nn.GELU(approximate="tanh"), NUMPY_ACTS["gelu_tanh"]),
        (nn.Softplus(beta=2.0), lambda x: _softplus(x, beta=2.0)),
        (nn.Hardtanh(-2.0, 2.0), lambda x: min(max(x, -2.0), 2.0)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_module_parameters_are_honoured(module: nn.Module, f: Callable[[float], float]) -> None:
    assert sp.gain(module) == pytest.approx(quad_gain(f), rel=1e-6)


def test_callables() -> None:
    import torch

    assert sp.gain(torch.tanh) == pytest.approx(quad_gain(math.tanh), rel=1e-6)
    assert sp.gain(lambda x: 2 * x) == pytest.approx(0.5, rel=1e-9)
    assert np.isfinite(sp.gain(torch.nn.functional.silu))


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(SignalpropError, match="unknown activation 'swishy'.*gelu.*relu"):
        sp.gain("swishy")
