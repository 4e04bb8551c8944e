"""Issue 18, item 7: lsuv_ must never make diagnose worse, forward or backward, on any activation family.

Pinning every pre-activation at variance q makes a chain multiply its gradient by sqrt(r(q)) per layer,
r = q E[phi'^2]/E[phi^2] (tanh: 1.085 at q = 1, 60x over 50 layers; sigmoid 0.39, softplus 0.56 per
layer). lsuv_ now pins each chain at the std where the predicted drift stays within 2x. The nets are MLPs of
width 64 from PyTorch's default init (what a user has before calling lsuv_), judged by sp.diagnose
(factor 10) on the batch LSUV saw, over several seeds (not chosen).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import signalprop as sp

SIGNAL = {"exploding", "vanishing", "grad_exploding", "grad_vanishing", "nonfinite"}
FAMILIES = ["relu", "leaky_relu", "tanh", "sigmoid", "gelu", "silu", "selu", "elu", "softplus", "mish"]


def _act(name: str) -> str | nn.Module:
    return nn.LeakyReLU(0.2) if name == "leaky_relu" else name


def _findings(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Signal findings of diagnose: kind -> its ratio."""
    report = sp.diagnose(net, x, predicted=False)
    return {f.kind: f.data.get("ratio", math.nan) for f in report.findings if f.kind in SIGNAL}


def _grad_ratio(net: nn.Module, x: torch.Tensor) -> float:
    """max over body weight layers of the gradient std against the last one's, either way (>= 1)."""
    trace = sp.measure(net, x)
    g = [layer.bwd.std for layer in trace if layer.weight_layer and layer.bwd is not None][:-1]
    return max(max(v / g[-1] for v in g), g[-1] / min(g))


def test_tanh_50_layers_gradient_stays_in_range() -> None:
    # the model: 50 layers of width 64; classic LSUV (every layer at std 1) gives ~60x
    torch.manual_seed(0)
    net = sp.models.mlp(50, 64, "tanh")
    x = torch.randn(32, 64)
    classic = sp.models.mlp(50, 64, "tanh")
    classic.load_state_dict(net.state_dict())
    sp.fix.lsuv_(classic, x, keep_gradient=False)
    assert _grad_ratio(classic, x) > 20
    r = sp.fix.lsuv_run(net, x)
    assert r.converged and _grad_ratio(net, x) < 3
    t = sp.fix.lsuv_target("tanh", 50, 64, 1.0)
    assert r.targets[0] == t.std and 0.3 < t.std < 0.5 and t.gradient_drift <= 2
    assert any("tanh" in n and "1.085" in n for n in r.notes)  # it says why it moved the target
    assert not _findings(net, x)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_worse_on_every_family(family: str, seed: int) -> None:
    torch.manual_seed(seed)
    net = sp.models.mlp(50, 64, _act(family))
    x = torch.randn(32, 64)
    before = _findings(net, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a sigmoid chain this deep: LSUV says it cannot keep it in range
        sp.fix.lsuv_(net, x)
    after = _findings(net, x)
    assert set(after) <= set(before), (before, after)
    for kind, ratio in after.items():  # what remains is no larger than it was
        assert abs(math.log(ratio)) <= abs(math.log(before[kind])), (kind, before, after)
    if family != "sigmoid":  # sigmoid: the finite-width spread of a 50 x 64 chain alone is ~6x (predicted)
        assert not after, after


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_tanh_200_layers(seed: int) -> None:
    # the 200-layer case: classic LSUV gave 3.7e5 .. 7.6e6x gradient growth over 5 seeds
    torch.manual_seed(seed)
    net = sp.models.mlp(200, 64, "tanh")
    x = torch.randn(16, 64)
    sp.fix.lsuv_(net, x)
    assert not _findings(net, x)


def test_targets_and_notes() -> None:
    # ReLU chains keep std 1 at any depth (r = 1); tanh and GELU move; a readout keeps its chain's scale
    assert sp.fix.lsuv_target("relu", 200, 64, 1.0).std == 1.0
    assert sp.fix.lsuv_target(nn.LeakyReLU(0.2), 200, 64, 1.0).std == 1.0
    assert sp.fix.lsuv_target("tanh", 3, 64, 1.0).std == 1.0  # shallow: 1.085^2, in range
    t200 = sp.fix.lsuv_target("tanh", 200, 64, 1.0)
    assert t200.std < sp.fix.lsuv_target("tanh", 50, 64, 1.0).std and t200.gradient_drift <= 2
    # softplus at std 1 loses 0.56x per layer; no std keeps 200 of them: lsuv_ says LSUV does not suit it
    soft = sp.fix.lsuv_target("softplus", 200, 64, 1.0)
    assert "LSUV does not suit it" in soft.note
    net = sp.models.mlp(20, 16, "softplus")
    x = torch.randn(8, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = sp.fix.lsuv_run(net, x)  # lsuv_run reports, it does not warn
    assert r.targets[-1] == r.targets[0] > 1  # softplus chains need large pre-activations (its ReLU limit)
