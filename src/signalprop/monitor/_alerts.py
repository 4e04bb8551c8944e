"""What a Monitor warns about in a recorded step: the first non-finite value (in the order the values were
computed), a non-finite loss, and a layer whose absmax comes within 8x of its dtype's largest value."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

from ._record import Event, NonFiniteWarning, OverflowRiskWarning, Record

_WHAT = {
    "forward": "its output",
    "backward": "the gradient with respect to its output",
    "parameter": "the parameter itself",
    "gradient": "the parameter's gradient",
}


def first_nonfinite(record: Record, bwd_order: Iterable[str]) -> Event | None:
    """The first non-finite value of a step: outputs in call order, then output gradients in the order the
    backward pass produced them (``bwd_order``), then parameters, then parameter gradients."""
    hit = _first(record, bwd_order)
    if hit is None:
        return None
    layer, where = hit
    msg = (
        f"signalprop.Monitor: first non-finite value at step {record.step}, in {layer} "
        f"({where}: {_WHAT[where]} holds inf/nan). Everything downstream inherits it; look at this layer's "
        "inputs and weights, lower the learning rate or clip gradients, and check the data."
    )
    return Event(record.step, "nonfinite", layer, where, msg)


def _first(record: Record, bwd_order: Iterable[str]) -> tuple[str, str] | None:
    for layer in record.trace:
        if not layer.fwd.finite:
            return layer.name, "forward"
    by_name = {layer.name: layer for layer in record.trace}
    for name in bwd_order:
        bwd = by_name[name].bwd if name in by_name else None
        if bwd is not None and not bwd.finite:
            return name, "backward"
    for name, ps in record.params.items():
        if not math.isfinite(ps.norm):
            return name, "parameter"
    for name, ps in record.params.items():
        if ps.has_grad and not math.isfinite(ps.grad_norm):
            return name, "gradient"
    return None


def nonfinite_loss(step: int, value: float) -> Event:
    """The alert for a loss that is inf or nan at ``step``."""
    msg = (
        f"signalprop.Monitor: the loss is not finite at step {step} ({value}). Check the data and the loss "
        "function (a log of 0, a division by 0), lower the learning rate or clip gradients."
    )
    return Event(step, "nonfinite", "", "loss", msg)


def overflow_risks(record: Record, seen: set[str]) -> list[Event]:
    """An event for each layer not in ``seen`` whose absmax is within diagnose's ``overflow_margin`` (8x)
    of its dtype's largest value (diagnose's ``overflow_risk`` rule on the step's trace); adds it to ``seen``."""
    from ..diagnosis._rules import RULES, RuleContext

    events = []
    for f in RULES["overflow_risk"](record.trace, RuleContext()):
        if f.layer is None or f.layer in seen:
            continue
        seen.add(f.layer)
        where = "backward" if f.data.get("backward") else "forward"
        msg = f"signalprop.Monitor: step {record.step}: {f.message} Fix: {f.fix}"
        events.append(Event(record.step, "overflow_risk", f.layer, where, msg))
    return events


class Alerts:
    """A Monitor's alerts: the events so far, and the warning (or error) each raises.

    The first non-finite value and the first non-finite loss are reported once each (everything after
    inherits them), an overflow risk once per layer. ``on_nonfinite``: "warn" (a :class:`NonFiniteWarning`),
    "raise" (the methods return the message, for the caller to raise) or "ignore"; each event is kept in
    ``events`` either way. ``depth`` is the number of frames from the caller up to the user's code (the
    caller included), so that each warning points at the user's ``step()`` call."""

    def __init__(self, on_nonfinite: str) -> None:
        self.on_nonfinite = on_nonfinite
        self.events: list[Event] = []
        self._nonfinite_seen = False
        self._loss_seen = False
        self._overflow_seen: set[str] = set()

    def record(
        self, record: Record, bwd_order: Iterable[str], losses: list[tuple[int, float]], depth: int
    ) -> str | None:
        """Check one recorded step and the losses that came with it; the error text for "raise" or None."""
        error = None
        if not self._nonfinite_seen:
            event = first_nonfinite(record, bwd_order)
            if event is not None:
                self._nonfinite_seen = True
                error = self._nonfinite(event, depth + 3)
        for event in overflow_risks(record, self._overflow_seen):
            self.events.append(event)
            warnings.warn(event.message, OverflowRiskWarning, stacklevel=depth + 2)
        for step, value in losses:
            if not math.isfinite(value):
                error = self.loss(step, value, depth + 1) or error
        return error

    def loss(self, step: int, value: float, depth: int) -> str | None:
        """Report a non-finite loss (the first only); the error text for "raise" or None."""
        if self._loss_seen:
            return None
        self._loss_seen = True
        return self._nonfinite(nonfinite_loss(step, value), depth + 3)

    def _nonfinite(self, event: Event, stacklevel: int) -> str | None:
        self.events.append(event)
        if self.on_nonfinite == "raise":
            return event.message
        if self.on_nonfinite == "warn":
            warnings.warn(event.message, NonFiniteWarning, stacklevel=stacklevel)
        return None
