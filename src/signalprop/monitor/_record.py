"""What a Monitor keeps and says: one :class:`Record` per recorded step, :class:`Event` per alert, and the
warning classes it raises. Plain data, so plotting and integrations can read it without the Monitor."""

from __future__ import annotations

from dataclasses import dataclass

from ..trace import Trace

__all__ = ["Event", "NonFiniteWarning", "OverflowRiskWarning", "ParamStats", "Record"]


class NonFiniteWarning(RuntimeWarning):
    """A recorded value (output, output gradient, parameter, parameter gradient or loss) was inf or nan.

    The message names the first step and layer; the same alert is an :class:`Event` in ``Monitor.events``.

    Examples:
        >>> import warnings, torch, signalprop as sp
        >>> from torch import nn
        >>> model = nn.Linear(2, 2)
        >>> with warnings.catch_warnings(record=True) as caught, sp.Monitor(model) as mon:
        ...     warnings.simplefilter("always")
        ...     model(torch.tensor([[float("inf"), 1.0]])).sum().backward()
        ...     mon.step()
        >>> caught[0].category.__name__, (mon.events[0].kind, mon.events[0].layer, mon.events[0].where)
        ('NonFiniteWarning', ('nonfinite', '(root)', 'forward'))
    """


class OverflowRiskWarning(RuntimeWarning):
    """A layer's absmax came within diagnose's ``overflow_margin`` (8x) of its dtype's largest value.

    An early warning for float16 and bfloat16 training: the values are still finite, but within a factor 8
    of becoming inf (float16's largest value is 65504).

    Examples:
        >>> import warnings, torch, signalprop as sp
        >>> from torch import nn
        >>> model = nn.Linear(2, 2).half()
        >>> with warnings.catch_warnings(record=True) as caught, sp.Monitor(model, params=False) as mon:
        ...     warnings.simplefilter("always")
        ...     with torch.no_grad():
        ...         _ = model.weight.fill_(1.0)
        ...     model(torch.full((1, 2), 10000.0, dtype=torch.half)).float().sum().backward()
        ...     mon.step()
        >>> caught[0].category.__name__, mon.events[0].kind
        ('OverflowRiskWarning', 'overflow_risk')
    """


@dataclass(frozen=True)
class ParamStats:
    """One parameter at one recorded step: ``norm = ||w_t||``, ``grad_norm = ||g_t||`` (nan without a
    gradient) and ``update_ratio = ||w_t - w_{t-1}|| / ||w_{t-1}||`` (nan when not tracked), where
    ``w_{t-1}`` is the value at the previous ``step()`` call (or on entering the Monitor). ``has_grad`` is
    False when the parameter had no ``.grad`` at ``step()``.

    Attributes:
        norm: ||w_t||, the Frobenius norm.
        grad_norm: ||g_t||, nan without a gradient.
        update_ratio: ||w_t - w_{t-1}|| / ||w_{t-1}||, about 1e-3 in a healthy SGD run; nan when not tracked.
        has_grad: Whether the parameter had a ``.grad``.

    Examples:
        >>> ParamStats(norm=2.0, grad_norm=0.5, update_ratio=1e-3).has_grad
        True
    """

    norm: float
    grad_norm: float
    update_ratio: float
    has_grad: bool = True


@dataclass(frozen=True)
class Record:
    """One recorded step: its number, the per-call :class:`~signalprop.trace.Trace`, per-parameter stats
    keyed by ``named_parameters()`` name, and the loss given to ``step(loss=...)`` (None when not given).

    Attributes:
        step: The step number (the count of ``step()`` calls before it).
        trace: The per-call statistics, the schema of :func:`signalprop.measure`.
        params: Parameter name -> :class:`ParamStats`.
        loss: The loss given to ``step(loss=...)``, or None.

    Examples:
        >>> import torch, signalprop as sp
        >>> from torch import nn
        >>> model = nn.Linear(2, 1)
        >>> with sp.Monitor(model) as mon:
        ...     model(torch.ones(3, 2)).sum().backward()
        ...     mon.step(loss=1.5)
        >>> record = mon.history[0]
        >>> record.step, record.loss, record.trace.names, sorted(record.params)
        (0, 1.5, ['(root)'], ['bias', 'weight'])
    """

    step: int
    trace: Trace
    params: dict[str, ParamStats]
    loss: float | None = None


@dataclass(frozen=True)
class Event:
    """Something the Monitor warned about: ``kind`` is ``"nonfinite"`` or ``"overflow_risk"``; ``where`` is
    ``"forward"`` (the output), ``"backward"`` (the gradient w.r.t. the output), ``"parameter"``,
    ``"gradient"`` (a parameter's ``.grad``) or ``"loss"`` (the loss given to ``step()``; ``layer`` is then
    empty).

    Attributes:
        step: The step the value was recorded at.
        kind: ``"nonfinite"`` or ``"overflow_risk"``.
        layer: The call name (a parameter name for ``"parameter"`` and ``"gradient"``; empty for the loss).
        where: Which value: see above.
        message: The warning's text.

    Examples:
        >>> import warnings, signalprop as sp
        >>> from torch import nn
        >>> with warnings.catch_warnings(record=True), sp.Monitor(nn.Linear(2, 1)) as mon:
        ...     warnings.simplefilter("always")
        ...     mon.step(loss=float("nan"))
        >>> event = mon.events[0]
        >>> event.step, event.kind, event.where, event.layer
        (0, 'nonfinite', 'loss', '')
    """

    step: int
    kind: str
    layer: str
    where: str
    message: str
