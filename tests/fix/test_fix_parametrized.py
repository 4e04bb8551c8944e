"""Issue 18, item 9: auto_init_ on weight_norm, tied weights and meta-device models.

* weight_norm: the effective weight g v / ||v|| is recomputed from its originals at every access; the plan's
  std is written through the parametrization (right_inverse sets g and v), and the ReLU after a parametrized
  layer is seen (the layer is an alias of its linear op in the captured graph).
* a tied embedding and head: one tensor, one plan, made at its first user (the embedding, kept).
* a meta-device model has nothing to write into: refused, naming sp.init.materialize_.

Sample stds of N weights have relative sd 1/sqrt(2N); the tolerances allow 6 of them.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

import signalprop as sp
from signalprop import SignalpropError


def _tol(w: torch.Tensor) -> float:
    return 6 / math.sqrt(2 * w.numel())


def _wn_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(64, 64)), nn.ReLU(), weight_norm(nn.Linear(64, 64)), nn.ReLU(),
                        nn.Linear(64, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


@pytest.mark.parametrize("with_inputs", [True, False])
def test_weight_norm_is_initialized_through_the_parametrization(with_inputs: bool) -> None:
    net = _wn_net()
    x = torch.randn(32, 64)
    p = sp.fix.plan(net, example_inputs=x if with_inputs else None)
    assert p["0"].scheme == "he" and p["0"].activation == "relu" and p["2"].activation == "relu"
    assert [s.layer for s in p] == ["0", "2", "4"]  # no step for the parametrization's own modules
    g0 = net[0].parametrizations.weight.original0.detach().clone()
    sp.fix.auto_init_(net, example_inputs=x if with_inputs else None)
    w = net[0].weight.detach()
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 64), rel=_tol(w))
    assert not torch.equal(net[0].parametrizations.weight.original0, g0)  # g was set
    g = net[0].parametrizations.weight.original0.detach()
    assert torch.allclose(g.flatten(), w.norm(dim=1), rtol=1e-5)  # right_inverse: g = ||W|| per unit


def test_weight_norm_with_init_and_lsuv() -> None:
    lin = weight_norm(nn.Linear(128, 64))
    sp.init.glorot_(lin, distribution="normal", generator=torch.Generator().manual_seed(0))
    w = lin.weight.detach()
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 192), rel=_tol(w))
    net = _wn_net()
    x = torch.randn(32, 64)
    r = sp.fix.lsuv_run(net, x)
    assert r.converged and r.layers == ("0", "2", "4")
    assert all(abs(s - 1) <= 0.01 for s in sp.fix.output_stds(net, x).values())


def test_spectral_norm_is_kept_and_said() -> None:
    net = nn.Sequential(spectral_norm(nn.Linear(16, 16)), nn.ReLU(), nn.Linear(16, 2))
    p = sp.fix.plan(net)
    assert p["0"].scheme == "keep" and "largest singular value" in p["0"].reason
    with pytest.raises(SignalpropError, match="spectral_norm|SpectralNorm"):
        sp.init.he_(net)
    r = sp.fix.lsuv_run(net, torch.randn(8, 16))
    assert "0" in r.skipped and "SpectralNorm" in r.skipped["0"]


class TiedLM(nn.Module):
    """A language model whose output head shares the embedding matrix (GPT-2, T5 and most LMs do)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 64)
        self.body = nn.Sequential(nn.Linear(64, 64), nn.GELU())
        self.head = nn.Linear(64, 100, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


@pytest.mark.parametrize("with_inputs", [True, False])
def test_tied_embedding_and_head_planned_once(with_inputs: bool) -> None:
    torch.manual_seed(0)
    lm = TiedLM()
    before = lm.emb.weight.detach().clone()
    ids = torch.randint(0, 100, (4, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # module order of a custom class: the plan warns
        p = sp.fix.plan(lm, example_inputs=ids if with_inputs else None)
        sp.fix.auto_init_(lm, example_inputs=ids if with_inputs else None)
    assert p["emb"].scheme == "keep" and p["head"].scheme == "keep"
    assert "emb" in p["head"].reason and "tied" in p["head"].reason
    assert sum("tied" in n for n in p.notes) == 0  # said once: in the tied layer's step
    assert torch.equal(lm.emb.weight, before) and lm.head.weight is lm.emb.weight  # still 1.0, still tied


def test_meta_models_are_refused_with_the_fix() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    for call in (lambda: sp.fix.auto_init_(net), lambda: sp.fix.lsuv_(net, torch.randn(4, 8)),
                 lambda: sp.fix.apply_plan(net, sp.fix.plan(net))):
        with pytest.raises(SignalpropError, match=r"meta device.*materialize_"):
            call()
    sp.init.materialize_(net, "he")
    sp.fix.auto_init_(net)
    assert net[0].weight.device.type == "cpu" and torch.isfinite(net[0].weight).all()
    assert sp.diagnose(net, torch.randn(16, 8)).findings is not None  # no raw device error any more


def test_apply_plan_restores_on_a_parametrization_it_cannot_set() -> None:
    class Doubling(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

        def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
            return w  # not the inverse: the layer then computes twice what was assigned

    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    torch.nn.utils.parametrize.register_parametrization(net[2], "weight", Doubling())
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(SignalpropError, match="does not give back the weight"):
        sp.fix.auto_init_(net)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
