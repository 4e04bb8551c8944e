"""What a Monitor keeps and says: one :class:`Record` per recorded step, :class:`Event` per alert, and the
warning classes it raises. Plain data, so plotting and integrations can read it without the Monitor."""

from __future__ import annotations

from dataclasses import dataclass

from ..trace import Trace

__all__ = ["Event", "NonFiniteWarning", "OverflowRiskWarning", "ParamStats", "Record"]


class NonFiniteWarning(RuntimeWarning):
    """A recorded value (output, output gradient, parameter, parameter gradient or loss) was inf or nan."""


class OverflowRiskWarning(RuntimeWarning):
    """A layer's absmax came within diagnose's ``overflow_margin`` (8x) of its dtype's largest value."""


@dataclass(frozen=True)
class ParamStats:
    """One parameter at one recorded step: ``norm = ||w_t||``, ``grad_norm = ||g_t||`` (nan without a
    gradient) and ``update_ratio = ||w_t - w_{t-1}|| / ||w_{t-1}||`` (nan when not tracked), where
    ``w_{t-1}`` is the value at the previous ``step()`` call (or on entering the Monitor). ``has_grad`` is
    False when the parameter had no ``.grad`` at ``step()``."""

    norm: float
    grad_norm: float
    update_ratio: float
    has_grad: bool = True


@dataclass(frozen=True)
class Record:
    """One recorded step: its number, the per-call :class:`~signalprop.trace.Trace`, per-parameter stats
    keyed by ``named_parameters()`` name, and the loss given to ``step(loss=...)`` (None when not given)."""

    step: int
    trace: Trace
    params: dict[str, ParamStats]
    loss: float | None = None


@dataclass(frozen=True)
class Event:
    """Something the Monitor warned about: ``kind`` is ``"nonfinite"`` or ``"overflow_risk"``; ``where`` is
    ``"forward"`` (the output), ``"backward"`` (the gradient w.r.t. the output), ``"parameter"``,
    ``"gradient"`` (a parameter's ``.grad``) or ``"loss"`` (the loss given to ``step()``; ``layer`` is then
    empty)."""

    step: int
    kind: str
    layer: str
    where: str
    message: str
