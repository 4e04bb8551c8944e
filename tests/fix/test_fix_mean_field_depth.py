"""Issue 18, item 8: auto_init_ uses the layers' real biases and chooses sigma_w^2 for the chain's depth.

A tanh chain without biases has sigma_b^2 = 0: its only critical point is q* = 0 (sigma_w^2 = 1, q decays
like 1/l), and the old choice, sigma_w^2 = 1.747 (critical for a bias of variance 0.05 the layers do not
have), is chaotic there: chi1(q*) = 1.04 per layer, 36x over 100 layers. The chain now gets sigma_w^2 a
little above 1, with chi1(q*) - 1 = O(q*^2) small enough for its depth, and orthogonal weights, whose
finite-width spread of the gradient is far below a Gaussian draw's (the deep chains need it: a Gaussian
200 x 64 tanh chain at sigma_b^2 0.05 spreads the gradient by up to 90x over 30 seeds, an orthogonal one
by 6.5x). MLPs of width 64, batch 16, from N(0, 1) weights (as broken as it gets), judged by sp.diagnose
over seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop import theory
from signalprop.fix import mean_field_choice

SIGNAL = {"exploding", "vanishing", "grad_exploding", "grad_vanishing", "nonfinite"}


def _broken(depth: int, bias: bool, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = sp.models.mlp(depth, 64, "tanh", bias=bias)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


def _kinds(net: nn.Module, x: torch.Tensor) -> set[str]:
    report = sp.diagnose(net, x, predicted=False)
    return {f.kind for f in report.findings if f.kind in SIGNAL}


@pytest.mark.parametrize("depth", [10, 40, 100])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clean_at_every_depth(depth: int, bias: bool, seed: int) -> None:
    net = _broken(depth, bias, seed)
    x = torch.randn(16, 64)
    sp.fix.auto_init_(net)  # nn.Sequential: module order is the call order, no capture needed
    assert not _kinds(net, x)


@pytest.mark.slow
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("seed", range(5))
def test_clean_at_depth_200(bias: bool, seed: int) -> None:
    net = _broken(200, bias, seed)
    x = torch.randn(16, 64)
    sp.fix.auto_init_(net, example_inputs=x)
    assert not _kinds(net, x)


def test_no_bias_plan_is_not_the_biased_critical_point() -> None:
    p = sp.fix.plan(sp.models.mlp(100, 64, "tanh", bias=False))
    body = [s for s in p if s.scheme == "mean_field"]
    wv = body[0].std ** 2 * 64
    c = mean_field_choice("tanh", 100, bias=False, width=64)
    assert all(s.bias_std == 0 and s.distribution == "orthogonal" for s in body)
    assert wv == pytest.approx(c.weight_var, rel=1e-9) and 1.0 < wv < 1.3  # not 1.747
    # the point is a fixed point of the sigma_b^2 = 0 q-map, slightly chaotic, and in budget over 100 layers
    assert float(theory.qmap("tanh", c.q_star, weight_var=wv)) == pytest.approx(c.q_star, rel=1e-6)
    chi = theory.chi1("tanh", weight_var=wv, q=c.q_star)
    assert 1.0 < chi < 1.0 + 2 * c.q_star**2  # tanh: 1 + 4/3 q*^2 to leading order
    assert chi ** (99 / 2) < 2  # the mean-field gradient growth over the chain, as a std
    # the old choice at sigma_b^2 = 0: chi1 = 1.04, a 7x std growth over the same chain
    assert theory.chi1("tanh", weight_var=1.747) ** (99 / 2) > 5


def test_chain_choice_follows_depth_and_width() -> None:
    shallow = mean_field_choice("tanh", 10, width=64)
    deep = mean_field_choice("tanh", 200, width=64)
    assert shallow.bias_var == 0.05 and deep.bias_var < 0.05 and deep.q_star < shallow.q_star
    for c in (shallow, deep):
        assert c.chi1 == pytest.approx(1.0, abs=1e-9)
        assert max(c.forward_drift, c.gradient_drift * c.spread) <= 2 + 1e-9
    assert mean_field_choice("tanh", 200).bias_var == 0.05  # without a width: mean field alone
    # a biased chain's plan uses its depth and width
    p = sp.fix.plan(sp.models.mlp(200, 64, "tanh"))
    assert p["2"].bias_std ** 2 == pytest.approx(deep.bias_var, rel=1e-9)
    assert p["2"].std ** 2 * 64 == pytest.approx(deep.weight_var, rel=1e-9)
    assert math.isclose(p["2"].std, p["4"].std)
