"""Issue 18, items 2 and 9 (fix side): a custom weight layer without a fan rule (its own parameter, used through
F.linear) is rescaled by LSUV, in lsuv_ and in auto_init_'s LSUV pass: its output is W x + b in its weight,
which lsuv_ checks on the layer's own inputs (its forward at weights 0 and 2 W) before scaling it. A layer
whose output is not (an additive token) is left, with the reason.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp


class MyLinear(nn.Module):
    """A custom layer as people write them; the parameter is not even called ``weight``."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in))  # N(0, 1): the broken start
        self.bias = nn.Parameter(torch.randn(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.bias)


class AddToken(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.tok = nn.Parameter(torch.randn(1, n) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.tok


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(MyLinear(32, 64), nn.ReLU(), MyLinear(64, 64), nn.ReLU(), MyLinear(64, 64), nn.ReLU(),
                         MyLinear(64, 10))


def test_auto_init_rescales_custom_layers_with_inputs() -> None:
    net = _net()
    x = torch.randn(64, 32)
    before = sp.fix.output_stds(net, x)
    assert before["6"] > 100  # N(0, 1) weights: the signal grows ~8x per layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left with a warning
        p = sp.fix.plan(net, example_inputs=x)
        sp.fix.auto_init_(net, example_inputs=x)
    assert all(s.scheme == "lsuv" and "register_fans(MyLinear" in s.reason for s in p)
    stds = sp.fix.output_stds(net, x)
    assert all(abs(s - 1) <= 0.01 for s in stds.values()), stds
    assert not {f.kind for f in sp.diagnose(net, x).findings} & {"exploding", "vanishing"}


def test_lsuv_checks_the_layer_is_linear_in_its_weight() -> None:
    net = nn.Sequential(MyLinear(16, 16), nn.Tanh(), AddToken(16), MyLinear(16, 4))
    x = torch.randn(32, 16)
    tok = net[2].tok.detach().clone()
    r = sp.fix.lsuv_run(net, x)
    assert r.layers == ("0", "3") and r.converged
    assert "not W x + b in its tok" in r.skipped["2"] and torch.equal(net[2].tok, tok)
