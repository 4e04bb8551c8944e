"""Recurrent nets: gate saturation, which the module's bounded output hides, is seen and fixed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.diagnosis._recurrent import _layer_outputs, gate_saturation


class Net(nn.Module):
    def __init__(self, cls: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cls(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return self.head(y)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_replayed_layers_are_the_module_s_own(cls: type[nn.RNNBase]) -> None:
    m = cls(16, 32, num_layers=2, batch_first=True)
    x = torch.randn(4, 7, 16)
    with torch.no_grad():
        first = _layer_outputs(m, x, 0)
        assert torch.allclose(_layer_outputs(m, first, 1), m(x)[0], atol=1e-6)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_normal_weights_saturate_the_gates_and_the_fix_clears_it(cls: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    net = Net(cls)
    x = torch.randn(8, 12, 16)
    assert gate_saturation(net.rnn, (x,)) == pytest.approx(0.0, abs=0.01)  # PyTorch's own init: small gates
    assert not sp.diagnose(net, x).by_kind("saturation")
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    report = sp.diagnose(net, x)
    (f,) = report.by_kind("saturation")
    assert not report.ok and f.layer == "rnn" and f.severity == "warning" and f.data["sat_frac"] > 0.25
    assert "forget-gate bias" in f.fix
    sp.fix.auto_init_(net, example_inputs=x)
    # unit-variance pre-activations: P(|z| > 2.65) = 0.8%; the rule reports from 5% on
    assert gate_saturation(net.rnn, (x,)) < 0.05
    assert not sp.diagnose(net, x).by_kind("saturation")


def test_what_it_does_not_replay_is_none() -> None:
    x = torch.randn(2, 5, 4)
    assert gate_saturation(nn.LSTM(4, 8, bidirectional=True, batch_first=True), (x,)) is None
    assert gate_saturation(nn.LSTM(4, 8, batch_first=True), (x, None)) is None
    assert gate_saturation(nn.RNN(4, 8, nonlinearity="relu", batch_first=True), (x,)) is None
