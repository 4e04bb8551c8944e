"""A Monitor over a long run: bounded history (recent records in full, a thinned view of the whole run),
flat memory, and an alert for a non-finite loss that names its step."""

from __future__ import annotations

import gc
import math
import tracemalloc

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.monitor import Monitor, NonFiniteWarning
from signalprop.monitor._history import History


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


def _steps(model: nn.Module, mon: Monitor, n: int) -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(n):
        model(x).pow(2).mean().backward()
        mon.step()


@pytest.mark.parametrize(("keep", "n"), [(4, 200), (16, 1000), (3, 5)])
def test_the_history_keeps_recent_steps_a_uniform_view_and_log_spaced_early_steps(keep: int, n: int) -> None:
    """Of ``n`` recorded steps: the last ``keep`` in full; every s-th step of the older ones for one power of
    two s (at most ``keep`` of them, and s the smallest stride that fits); the 1st, 2nd, 4th, 8th, ...;
    so the first and last are always there, and the count stays below 2 keep + log2(n) + 1."""
    model = _tiny()
    with Monitor(model, keep=keep, params=False) as mon:
        _steps(model, mon, n)
        steps = [r.step for r in mon.history]
    assert mon.recorded == n
    recent = list(range(max(0, n - keep), n))
    assert steps[-len(recent):] == recent and steps[0] == 0
    older = [s for s in steps if s < recent[0]]
    powers = [2**j for j in range(n.bit_length()) if 2**j < recent[0]]
    assert set(powers) <= set(older)
    uniform = [s for s in older if s & (s - 1) or s == 0]  # (0 and every non-power of two)
    stride = 1
    while len(range(0, recent[0], stride)) > keep:
        stride *= 2
    assert set(range(0, recent[0], stride)) <= set(older)
    assert all(s % stride == 0 for s in uniform)
    assert steps == sorted(set(steps))
    assert len(steps) <= 2 * keep + math.log2(n) + 1


def test_the_default_history_is_bounded_and_keep_none_keeps_everything() -> None:
    model = _tiny()
    with Monitor(model, params=False) as bounded, Monitor(model, params=False, keep=None) as every:
        x = torch.randn(8, 4)
        for _ in range(400):
            model(x).pow(2).mean().backward()
            bounded.step()
            every.step()
    assert len(every.history) == 400
    n = len(bounded.history)
    assert 100 < n <= 2 * 100 + math.log2(400) + 1
    assert bounded.history[-1].step == 399 and bounded.history[0].step == 0


def test_history_thinning_is_the_same_for_any_entries() -> None:
    h: History[str] = History(keep=2)
    for i in range(10):
        h.add(f"s{i}")
    # the long view: stride 4 (0, 4) and the powers of two (1, 2, 4); the recent ones: 8, 9
    assert list(h) == ["s0", "s1", "s2", "s4", "s8", "s9"]
    assert len(h) == 6 and h.added == 10


@pytest.mark.slow
def test_memory_stays_flat_over_a_long_run() -> None:
    """With ``keep=8`` the records held stay at most 2 * 8 + log2(steps) + 1, so between step 50 and step
    200 (the history read, every Record built, every 50 steps) memory grows by two records: less than a
    twentieth of what the same run keeping every record grows by (150 Records)."""
    model = sp.models.mlp(depth=2, width=8)
    x = torch.randn(4, 8)

    def run(keep: int | None) -> tuple[int, list[int]]:
        sizes, held = [], []
        with Monitor(model, keep=keep) as mon:
            for _ in range(4):
                for _ in range(50):
                    model(x).sum().backward()
                    mon.step()
                held.append(len(mon.history))  # (reading builds the Records)
                gc.collect()
                sizes.append(tracemalloc.get_traced_memory()[0])
        return sizes[-1] - sizes[0], held

    tracemalloc.start()
    try:
        bounded, held = run(8)
        unbounded, every = run(None)
    finally:
        tracemalloc.stop()
    assert held == [17, 18, 18, 19] and every == [50, 100, 150, 200]
    assert bounded < unbounded / 20, (bounded, unbounded)


def _nan_loss_run(every: int, nan_step: int, *, as_float: bool = False, **kw: object) -> Monitor:
    """Steps 0..5 of a small model; the loss is nan at ``nan_step`` through a term without gradient, so every
    gradient (and every layer) stays finite."""
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(8, 4)
    mon = Monitor(model, every=every, **kw)  # type: ignore[arg-type]
    with mon:
        for step in range(6):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            loss.backward()
            opt.step()
            if step == nan_step:
                loss = loss.detach() + math.nan
            mon.step(loss=float(loss.detach()) if as_float else loss)
    return mon


@pytest.mark.parametrize(("every", "nan_step", "as_float"), [(1, 2, False), (4, 2, False), (4, 5, False),
                                                              (1, 3, True), (4, 1, True)])
def test_a_nonfinite_loss_is_named_with_its_step(every: int, nan_step: int, as_float: bool) -> None:
    """A nan loss with finite gradients (nothing in the layers to find): a NonFiniteWarning and an Event name
    its step, also a step that is not recorded (checked with the next recorded step's numbers, or when the
    Monitor closes); once, however many steps follow; the recorded steps keep their loss."""
    with pytest.warns(NonFiniteWarning, match=rf"the loss is not finite at step {nan_step} \(nan\)") as warned:
        mon = _nan_loss_run(every, nan_step, as_float=as_float)
    (w,) = [w for w in warned if w.category is NonFiniteWarning]
    assert w.filename == __file__  # (pointing at the step() call or the with block, not into signalprop)
    assert [(e.step, e.kind, e.layer, e.where) for e in mon.events] == [(nan_step, "nonfinite", "", "loss")]
    for r in mon.history:
        assert all(layer.fwd.finite and layer.bwd is not None and layer.bwd.finite for layer in r.trace)
        assert r.loss is not None and (math.isnan(r.loss) if r.step == nan_step else r.loss > 0)


def test_a_nonfinite_loss_can_stop_the_run_and_costs_no_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(sp.SignalpropError, match="the loss is not finite at step 2"):
        _nan_loss_run(1, 2, on_nonfinite="raise")
    model = _tiny()
    calls = {"cpu": 0, "item": 0}
    real_cpu, real_item = torch.Tensor.cpu, torch.Tensor.item

    def cpu(self: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        calls["cpu"] += 1
        return real_cpu(self, *a, **k)

    def item(self: torch.Tensor) -> object:
        calls["item"] += 1
        return real_item(self)

    x = torch.randn(8, 4)
    with Monitor(model, every=2) as mon:
        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        monkeypatch.setattr(torch.Tensor, "item", item)
        for _ in range(6):
            loss = model(x).pow(2).mean()
            loss.backward()
            mon.step(loss=loss)
        monkeypatch.undo()
    assert calls == {"cpu": 3, "item": 0}  # one transfer per recorded step, the losses in it
    with torch.no_grad():
        assert [r.loss for r in mon.history] == [pytest.approx(float(model(x).pow(2).mean()))] * 3


@pytest.mark.parametrize("bad", ["0.5", torch.tensor([1, 2]), None])
def test_a_loss_that_is_not_a_number_or_float_tensor_is_refused(bad: object) -> None:
    model = _tiny()
    with Monitor(model) as mon:
        if bad is None:
            mon.step(loss=None)  # no loss: nothing to check
            return
        with pytest.raises(sp.SignalpropError, match="floating tensor or a number"):
            mon.step(loss=bad)  # type: ignore[arg-type]
