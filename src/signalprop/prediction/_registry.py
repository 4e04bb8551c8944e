"""What predict can be taught: a rule per module class (:func:`register_rule`), and the warning that names
what it had no rule for (:class:`PredictWarning`)."""

from __future__ import annotations

from collections.abc import Callable

import torch  # noqa: F401  (the examples use it)
from torch import nn

from .._errors import SignalpropError
from ..graph._ir import Node
from . import _rules as R

Rule = Callable[[nn.Module, "R.Moments", Node], "tuple[R.Moments, R.Back]"]

MODULE_RULES: dict[str, Rule] = {}
"""Module class name -> rule(module, input moments, node) -> (output moments, backward). One line to add."""


class PredictWarning(UserWarning):
    """Some module or op has no prediction rule and was passed through unchanged.

    The warning names the op, the module it sits in and how many calls; the prediction downstream of it
    assumes the op leaves its input's statistics as they are.

    Examples:
        >>> import warnings
        >>> class Clip(nn.Module):
        ...     def forward(self, x):
        ...         return torch.ops.aten.clamp(x, -50.0, 50.0)
        >>> from signalprop.prediction import predict
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = predict(nn.Sequential(nn.Linear(8, 8), Clip()), (8,))
        >>> [type(w.message).__name__ for w in caught]
        ['PredictWarning']
    """


def register_rule(kind: str, rule: Rule) -> None:
    """Add a prediction rule for modules of class name ``kind`` (see :data:`MODULE_RULES`).

    A rule maps a module call's input moments (per-element mean, variance and the rest of
    :class:`signalprop.prediction._rules.Moments`) to its output moments, and returns with them the backward
    map from the output gradient's second moment to the input's. It replaces the module's body: use it for
    a custom layer whose ops predict has no rule for (a :class:`PredictWarning` names them).

    Args:
        kind: The module's class name (``type(module).__name__``).
        rule: ``rule(module, moments, node) -> (moments, backward)``, ``backward(g2) -> [g2_input]``.

    Returns:
        None; every later :func:`predict` call uses the rule.

    Raises:
        SignalpropError: ``kind`` is not a string or ``rule`` is not callable.

    Examples:
        A clipping layer that never clips at the scales in play passes its input's statistics on:

        >>> class Clip(nn.Module):
        ...     def forward(self, x):
        ...         return torch.ops.aten.clamp(x, -50.0, 50.0)
        >>> register_rule("Clip", lambda module, x, node: (x, lambda g2: [g2]))
        >>> import signalprop as sp
        >>> net = sp.init.orthogonal_(nn.Sequential(nn.Linear(64, 64, bias=False), Clip(), nn.ReLU()))
        >>> round(float(sp.predict(net, (64,))["2"].fwd.var), 4)  # 1/2 - 1/(2 pi): ReLU of a unit variance
        0.3408
        >>> del MODULE_RULES["Clip"]
    """
    if not isinstance(kind, str) or not callable(rule):
        raise SignalpropError("register_rule needs a module class name (str) and a callable "
                              "rule(module, moments, node) -> (moments, backward)")
    MODULE_RULES[kind] = rule
