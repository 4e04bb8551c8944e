"""The captured graph as plain data: module calls, residual joins, and the :class:`Graph` that holds them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .. import theory
from .._errors import SignalpropError
from ..theory import ActLike
from ._ir import Node

__all__ = ["Call", "CaptureWarning", "Graph", "Residual"]


class CaptureWarning(UserWarning):
    """A better capture method failed and a weaker one was used (the message says which and why).

    The reasons are also in ``Graph.failures``. Turn it into an error with
    ``warnings.simplefilter("error", CaptureWarning)`` to insist on a whole-graph capture.

    Examples:
        >>> import warnings, torch
        >>> from torch import nn
        >>> from signalprop.graph import capture
        >>> class Gate(nn.Module):  # data-dependent control flow: fx cannot trace it
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(3, 3)
        ...     def forward(self, x):
        ...         return self.fc(x) if x.sum() > 0 else x
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     g = capture(Gate(), torch.ones(2, 3), methods=("fx", "hooks"))
        >>> g.method, caught[0].category.__name__, g.failures["fx"].split(":")[0]
        ('hooks', 'CaptureWarning', 'TraceError')
    """


@dataclass(frozen=True)
class Call:
    """One module call: ``name`` as ``sp.measure`` names it, the module's qualified name, its class name.

    Attributes:
        name: The call's name in a Trace: the qualified module name, ``#k`` for the k-th reuse (k >= 1).
        module: The module's qualified name in ``named_modules()``.
        kind: The module's class name.
        weight_layer: Whether the module is a weight layer (:func:`signalprop.layers.is_weight_layer`).
        node: The index in ``Graph.nodes`` of the call's output.
        shape: The output's shape, when known.

    Examples:
        >>> import signalprop as sp
        >>> g = sp.graph.capture(sp.models.mlp(2, 8), input_shape=(8,), methods=("fx",))
        >>> g.calls[0]
        Call(name='0', module='0', kind='Linear', weight_layer=True, node=1, shape=(2, 8))
    """

    name: str
    module: str
    kind: str
    weight_layer: bool
    node: int
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Residual:
    """A skip connection: an addition whose two inputs both depend on an earlier tensor (the fork).

    ``branch`` lists the weight-layer calls on the non-identity path in order (Fixup scales the last one by
    L^(-1/(2m-2)), m = len(branch); Zhang et al. 2019), ``skip`` those on the other path (a projection
    shortcut), ``norms`` the normalization calls on the branch (``residual="zero"`` zeroes the last one's
    gain; Goyal et al. 2017).

    Attributes:
        add: The node index of the addition.
        fork: The node index of the tensor both inputs depend on.
        branch: Weight-layer calls on the non-identity path, in order.
        skip: Weight-layer calls on the other path (empty for an identity shortcut).
        norms: Normalization calls on the branch, in order.

    Examples:
        >>> import signalprop as sp
        >>> g = sp.graph.capture(sp.models.resnet((1,), width=4), input_shape=(3, 8, 8), methods=("fx",))
        >>> r = g.residuals[0]
        >>> r.branch, r.skip, r.last_norm
        (('stages.0.conv1', 'stages.0.conv2'), (), 'stages.0.bn2')
    """

    add: int
    fork: int
    branch: tuple[str, ...]
    skip: tuple[str, ...]
    norms: tuple[str, ...]

    @property
    def last_weight(self) -> str | None:
        """The branch's last weight-layer call (the one Fixup scales), or None."""
        return self.branch[-1] if self.branch else None

    @property
    def last_norm(self) -> str | None:
        """The branch's last normalization call (the one ``residual="zero"`` zeroes), or None."""
        return self.norms[-1] if self.norms else None


@dataclass
class Graph:
    """A captured model: its module calls, the activation after each weight layer, its residual joins.

    Made by :func:`signalprop.graph.capture`; plain data (:meth:`to_dict`).

    Attributes:
        nodes: The op-level graph that ``predict`` walks.
        calls: The module calls, in execution order.
        outputs: Node indices of the model's outputs.
        method: The capture method used: ``"export"``, ``"fx"`` or ``"hooks"``.
        failures: Method -> why it failed, for the methods tried before ``method``.
        activations: Weight-layer call -> the activation that follows it (None: none).
        residuals: The skip additions.
        seconds: How long the capture took.

    Examples:
        >>> import signalprop as sp
        >>> g = sp.graph.capture(sp.models.mlp(2, 8, act="tanh"), input_shape=(8,), methods=("fx",))
        >>> g.method, g.names, [c.name for c in g.weight_layers()], g.activation_after("2")
        ('fx', ['0', '1', '2', '3', '4'], ['0', '2', '4'], 'tanh')
    """

    nodes: list[Node]
    calls: list[Call]
    outputs: list[int]
    method: str
    failures: dict[str, str] = field(default_factory=dict)
    activations: dict[str, ActLike] = field(default_factory=dict)
    residuals: list[Residual] = field(default_factory=list)
    seconds: float = 0.0

    def call(self, name: str) -> Call:
        """The call named ``name``; raises SignalpropError listing the names when there is none."""
        for c in self.calls:
            if c.name == name:
                return c
        raise SignalpropError(f"no module call named {name!r}; calls are: {', '.join(self.names[:20])}")

    @property
    def names(self) -> list[str]:
        """The call names, in execution order."""
        return [c.name for c in self.calls]

    def weight_layers(self) -> list[Call]:
        """The weight-layer calls, in execution order."""
        return [c for c in self.calls if c.weight_layer]

    def activation_after(self, name: str) -> str | None:
        """The activation following weight-layer call ``name`` as a name (``"relu"``, ``"leaky_relu(0.2)"``)."""
        if name not in self.activations:
            self.call(name)
            raise SignalpropError(f"{name!r} is not a weight layer; weight layers: "
                                  f"{', '.join(c.name for c in self.weight_layers()[:20])}")
        act = self.activations[name]
        return None if act is None else theory.activation_name(act)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able): method, failures, calls, activation names, residuals and nodes."""
        return {
            "method": self.method,
            "failures": dict(self.failures),
            "calls": [c.__dict__ | {"shape": list(c.shape) if c.shape else None} for c in self.calls],
            "activations": {k: (None if v is None else theory.activation_name(v))
                            for k, v in self.activations.items()},
            "residuals": [{"add": r.add, "fork": r.fork, "branch": list(r.branch), "skip": list(r.skip),
                           "norms": list(r.norms), "last_weight": r.last_weight, "last_norm": r.last_norm}
                          for r in self.residuals],
            "nodes": [n.to_dict() for n in self.nodes],
        }
