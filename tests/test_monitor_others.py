"""A Monitor records the user's own forward and backward only: signalprop's own runs of the model (measure,
diagnose, predict, graph capture, the fix planner, LSUV) and torch.export's fake tensors pass it by."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.monitor import Monitor, Record


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.GELU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


_X = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
_Y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))

_OTHERS: dict[str, Callable[[nn.Module], object]] = {
    "measure": lambda m: sp.measure(m, _X),
    "diagnose": lambda m: sp.diagnose(m, _X),
    "predict": lambda m: sp.predict(m, (3, 8, 8)),
    "graph.capture": lambda m: sp.graph.capture(m, _X),
    "fix.plan": lambda m: sp.fix.plan(m, example_inputs=_X),
    "auto_init_": lambda m: sp.fix.auto_init_(m, example_inputs=_X),
    "lsuv_": lambda m: sp.fix.lsuv_(m, _X),
    "torch.export (the user's own)": lambda m: torch.export.export(m, (_X,), strict=False),
}


def _two_steps(model: nn.Module, between: Callable[[nn.Module], None]) -> list[Record]:
    """Two monitored SGD steps with ``between(model)`` run after the first."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Monitor(model, sample=64) as mon:
        for step in range(2):
            if step == 1:
                between(model)
            opt.zero_grad()
            nn.functional.cross_entropy(model(_X), _Y).backward()
            opt.step()
            mon.step()
    return mon.history


@pytest.mark.parametrize("other", list(_OTHERS))
def test_signalprops_own_runs_between_two_steps_leave_the_records_as_they_were(other: str) -> None:
    """Each of measure, diagnose, predict, graph.capture, fix.plan, auto_init_, lsuv_ (and a torch.export the
    user runs, whose fake tensors reach the hooks) between two monitored steps: no error (a fake tensor in the
    step's numbers made the next ``mon.step()`` raise), the same calls under the same names (measure's four
    calls were recorded into the training step as ``0#1``, ...) and the same numbers as the same two steps
    without it. auto_init_ and lsuv_ change the weights: the reference model gets the same weights, loaded
    without a forward."""
    model, ref = _net(), _net()
    changed: dict[str, torch.Tensor] = {}

    def run_other(m: nn.Module) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (capture and plan warnings are not what is tested here)
            _OTHERS[other](m)
        changed.update(copy.deepcopy(m.state_dict()))

    got = _two_steps(model, run_other)
    want = _two_steps(ref, lambda m: m.load_state_dict(changed))
    assert [r.step for r in got] == [r.step for r in want] == [0, 1]
    for a, b in zip(got, want, strict=True):
        assert a.trace.names == b.trace.names == ["0", "1", "2", "3", "4", "5", "6", "7"]
        assert a.trace == b.trace
        assert a.params == b.params
