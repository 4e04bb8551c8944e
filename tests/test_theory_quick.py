"""transformers' QuickGELU (CLIP) and ReLUSquared (Primer) are their own functions, not SiLU and ReLU."""

from __future__ import annotations

import math

import pytest
import torch

import signalprop as sp


def test_quick_gelu_and_relu_squared_moments_are_their_own() -> None:
    pytest.importorskip("transformers")
    from transformers.activations import QuickGELUActivation, ReLUSquaredActivation

    assert sp.theory.activation_key(QuickGELUActivation()) == "quick_gelu"
    assert sp.theory.activation_key(ReLUSquaredActivation()) == "relu_squared"
    # E[relu(z)^4] = 3/2 exactly; SiLU's and QuickGELU's second moments differ by far more than quadrature error.
    assert sp.theory.second_moment("relu_squared") == pytest.approx(1.5, rel=1e-12)
    assert abs(sp.theory.second_moment("quick_gelu") - sp.theory.second_moment("silu")) > 0.05
    # The registry's function is the module's own, point by point.
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    for mod, name in ((QuickGELUActivation(), "quick_gelu"), (ReLUSquaredActivation(), "relu_squared")):
        assert torch.allclose(sp.theory.resolve(name)(x), mod(x), rtol=1e-12, atol=1e-12)


def test_quick_gelu_second_moment_matches_monte_carlo() -> None:
    """Against 4e6 draws: the standard error of the mean of f(z)^2 bounds the tolerance (5 sigma)."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4_000_000, generator=g, dtype=torch.float64)
    y2 = (z * torch.sigmoid(1.702 * z)).square()
    tol = 5 * float(y2.std()) / math.sqrt(z.numel())
    assert abs(sp.theory.second_moment("quick_gelu") - float(y2.mean())) < tol
