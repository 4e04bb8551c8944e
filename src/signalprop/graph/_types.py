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
    """A better capture method failed and a weaker one was used (the message says which and why)."""


@dataclass(frozen=True)
class Call:
    """One module call: ``name`` as ``sp.measure`` names it, the module's qualified name, its class name."""

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
    """

    add: int
    fork: int
    branch: tuple[str, ...]
    skip: tuple[str, ...]
    norms: tuple[str, ...]

    @property
    def last_weight(self) -> str | None:
        return self.branch[-1] if self.branch else None

    @property
    def last_norm(self) -> str | None:
        return self.norms[-1] if self.norms else None


@dataclass
class Graph:
    """A captured model; see the module docstring."""

    nodes: list[Node]
    calls: list[Call]
    outputs: list[int]
    method: str
    failures: dict[str, str] = field(default_factory=dict)
    activations: dict[str, ActLike] = field(default_factory=dict)
    residuals: list[Residual] = field(default_factory=list)
    seconds: float = 0.0

    def call(self, name: str) -> Call:
        for c in self.calls:
            if c.name == name:
                return c
        raise SignalpropError(f"no module call named {name!r}; calls are: {', '.join(self.names[:20])}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.calls]

    def weight_layers(self) -> list[Call]:
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
