"""Issue 18, item 3 (init and fix side): RNN/LSTM/GRU get their standard init, gate by gate, from sp.init,
auto_init_ and lsuv_, and each says what it did.

Saturation is read off the gates themselves: from the layer's own outputs h_t, the pre-activation of every
gate at every step is x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh; a sigmoid gate counts as saturated beyond
|z| = 3.9 (output outside [0.02, 0.98], slope under 8% of its maximum). 32 sequences x 20 steps x 64 units:
the fractions before (over 40%) and after (under 1%) are far apart against any sampling error.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import signalprop as sp


class Seq(nn.Module):
    """A sequence classifier as people write one: an LSTM or GRU, the last step's output, a Linear head."""

    def __init__(self, cell: type[nn.RNNBase], layers: int = 1) -> None:
        super().__init__()
        self.rnn = cell(16, 64, num_layers=layers, batch_first=True)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y[:, -1])


def _normal(cell: type[nn.RNNBase], seed: int, layers: int = 1) -> Seq:
    torch.manual_seed(seed)
    net = Seq(cell, layers)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    return net


def _saturated(rnn: nn.RNNBase, x: torch.Tensor) -> float:
    """Fraction of saturated sigmoid-gate outputs (LSTM: input gate; GRU: update gate) of a one-layer RNN."""
    h = rnn.hidden_size
    with torch.no_grad():
        y, _ = rnn(x)
        prev = torch.cat([torch.zeros_like(y[:, :1]), y[:, :-1]], 1)
        z = x @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + prev @ rnn.weight_hh_l0.T + rnn.bias_hh_l0
    gate = z[..., :h] if isinstance(rnn, nn.LSTM) else z[..., h : 2 * h]
    return float((gate.abs() > 3.9).float().mean())


def _gate_blocks(w: torch.Tensor, gates: int) -> list[torch.Tensor]:
    return list(w.detach().chunk(gates, 0))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_init_unsaturates_the_gates(cell: type[nn.RNNBase], seed: int) -> None:
    net = _normal(cell, seed)
    x = torch.randn(32, 20, 16)
    before = _saturated(net.rnn, x)
    hh = net.rnn.weight_hh_l0.detach().clone()
    sp.fix.auto_init_(net, example_inputs=x)
    after = _saturated(net.rnn, x)
    assert before > 0.4 and after < 0.01, (before, after)
    assert not torch.equal(net.rnn.weight_hh_l0, hh)  # the recurrent weights are re-drawn, not left
    gates = 4 if cell is nn.LSTM else 3
    for w in _gate_blocks(net.rnn.weight_hh_l0, gates):  # orthogonal per gate (Saxe et al. 2014)
        assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    for w in _gate_blocks(net.rnn.weight_ih_l0, gates):  # LeCun per gate: 1024 entries, 6 sd of a sample std
        assert float(w.std()) == pytest.approx(1 / 4, rel=6 / math.sqrt(2 * w.numel()))
    b = net.rnn.bias_ih_l0.detach() + net.rnn.bias_hh_l0.detach()
    forget = torch.zeros(gates * 64)
    if cell is nn.LSTM:
        forget[64:128] = 1.0  # Jozefowicz et al. 2015: the forget slice [H:2H] sums to 1
    assert torch.equal(b, forget)


def test_plan_says_what_it_does_to_a_recurrent_layer() -> None:
    net = _normal(nn.LSTM, 0, layers=2)
    p = sp.fix.plan(net, example_inputs=torch.randn(4, 5, 16))
    step = p["rnn"]
    assert step.scheme == "recurrent" and step.std == pytest.approx(1 / 4)
    assert "orthogonal" in step.reason and "forget gate" in step.reason and "Saxe" in step.reason
    assert not p.notes  # nothing left unplanned


def test_lsuv_gives_recurrent_layers_their_init_and_says_so() -> None:
    net = _normal(nn.GRU, 0)
    x = torch.randn(32, 20, 16)
    r = sp.fix.lsuv_run(net, x)
    assert "recurrent_" in r.skipped["rnn"] and r.layers == ("head",) and r.converged
    assert _saturated(net.rnn, x) < 0.01
    for w in _gate_blocks(net.rnn.weight_hh_l0, 3):
        assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    # without the pre-init the weights stay, and lsuv_ says so
    net = _normal(nn.LSTM, 1)
    hh = net.rnn.weight_hh_l0.detach().clone()
    with pytest.warns(UserWarning, match=r"rnn: recurrent, left as it is.*recurrent_\(model\)"):
        sp.fix.lsuv_(net, x, orthogonal=False)
    assert torch.equal(net.rnn.weight_hh_l0, hh)


def test_init_functions_know_the_gate_blocks() -> None:
    lstm = nn.LSTM(16, 64, num_layers=2, bidirectional=True)
    assert sp.init.fans(lstm) == (16, 64)
    blocks = sp.init.weight_blocks(lstm)
    assert len(blocks) == 2 * 2 * 2 * 4  # layers x directions x (ih, hh) x gates
    assert {b.fan_in for b in blocks if b.param == "weight_ih_l1"} == {128}  # both directions feed layer 1
    sp.init.he_(lstm, generator=torch.Generator().manual_seed(0))
    w = lstm.weight_ih_l1.detach()
    assert float(w.std()) == pytest.approx(math.sqrt(2 / 128), rel=6 / math.sqrt(2 * w.numel()))
    assert not lstm.bias_ih_l0.detach().any() and not lstm.bias_hh_l1_reverse.detach().any()
    sp.init.orthogonal_(lstm)
    for w in _gate_blocks(lstm.weight_ih_l1, 4):  # 64 x 128 per gate: orthonormal rows
        assert torch.allclose(w @ w.T, torch.eye(64), atol=1e-5)
    sp.init.recurrent_(lstm, forget_bias=2.0)
    assert torch.equal(lstm.bias_ih_l1.detach()[64:128], torch.full((64,), 2.0))


def test_recurrent_on_meta_and_without_rnn() -> None:
    with torch.device("meta"):
        net = Seq(nn.LSTM)
    sp.init.materialize_(net, "orthogonal")
    assert net.rnn.bias_ih_l0.device.type == "cpu" and not net.rnn.bias_ih_l0.detach().any()
    with pytest.raises(sp.SignalpropError, match="holds no nn.RNN"):
        sp.init.recurrent_(nn.Linear(3, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp.init.recurrent_(net)  # no warning for a model with an RNN in it
