"""What the fixes read off a model before touching it: its weight layers in call order, the activation after
each, the residual branches, and the chains of layers that share an activation (whose depth sets the scale).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .. import theory
from ..theory import ActLike
from ._common import Inputs

__all__ = ["Structure", "chain_depths", "structure", "units"]


@dataclass
class Structure:
    """Weight layers in first-call order with the activation that follows each, and how they were found."""

    layers: list[tuple[str, nn.Module, ActLike]]
    method: str
    residuals: list[Any] = field(default_factory=list)
    node_of: dict[str, int] = field(default_factory=dict)  # call name -> node index (ordering norms vs layers)
    notes: list[str] = field(default_factory=list)

    def branch_of(self) -> dict[str, tuple[str, ...]]:
        """Module name -> the module names of the innermost residual branch it sits in (none: absent)."""
        out: dict[str, tuple[str, ...]] = {}
        for r in sorted((r for r in self.residuals if r.branch), key=lambda r: len(r.branch)):
            mods = tuple(dict.fromkeys(c.split("#")[0] for c in r.branch))
            for m in mods:
                out.setdefault(m, mods)
        return out


def structure(
    model: nn.Module,
    example_inputs: Inputs | None,
    input_shape: Sequence[int] | None,
    *,
    methods: Sequence[str] | None = None,
    what: str = "auto_init_",
    graph: Any = None,
) -> Structure:
    """The captured graph (``graph`` when given, else captured from ``example_inputs`` or ``input_shape``),
    else module order (a warning unless the model is nested ``nn.Sequential``, where module order is the
    call order)."""
    if example_inputs is None and input_shape is None and graph is None:
        return _module_order(model, what)
    from ..graph import _graph

    kw = {} if methods is None else {"methods": tuple(methods)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", _graph.CaptureWarning)
        g = graph if graph is not None else _graph.capture(model, example_inputs, input_shape=input_shape, **kw)
    notes = [str(w.message) for w in caught if issubclass(w.category, _graph.CaptureWarning)]
    for n in notes:
        warnings.warn(f"{what}: {n}", UserWarning, stacklevel=4)
    modules = dict(model.named_modules())
    layers: list[tuple[str, nn.Module, ActLike]] = []
    seen: set[str] = set()
    for c in g.weight_layers():
        if c.module in seen:
            continue  # a reused module: the first call's activation decides
        seen.add(c.module)
        layers.append((c.module, modules[c.module], g.activations.get(c.name)))
    return Structure(layers, g.method, list(g.residuals), {c.name: c.node for c in g.calls}, notes)


def _module_order(model: nn.Module, what: str) -> Structure:
    """Without inputs: weight layers and activations in ``named_modules`` order (exact for nn.Sequential).

    A weight layer's own submodules (a parametrized layer's ``parametrizations``) are part of it, not
    modules that follow it.
    """
    from ..graph._analysis import activation_in_order, module_step
    from ..layers import is_weight_layer

    leaves: list[tuple[str, nn.Module]] = []
    containers: list[nn.Module] = []
    inside: str | None = None
    for n, m in model.named_modules():
        if inside is not None and n.startswith(inside):
            continue
        if is_weight_layer(m):
            leaves.append((n, m))
            inside = f"{n}." if n else ""
            if not n:
                break
        elif not list(m.children()):
            leaves.append((n, m))
        else:
            containers.append(m)
    layers: list[tuple[str, nn.Module, ActLike]] = [
        (name, m, activation_in_order(module_step(nxt) for _, nxt in leaves[i + 1 :]))
        for i, (name, m) in enumerate(leaves)
        if is_weight_layer(m)
    ]
    notes = []
    sequential = all(isinstance(m, nn.Sequential) for m in containers)
    if not sequential:
        msg = (
            f"{what} got no example inputs, so it read {type(model).__name__}'s structure in module "
            "order (which is the call order only for nn.Sequential models) and could not see residual "
            "branches; pass example_inputs=... or input_shape=... for the captured graph"
        )
        notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=4)
    return Structure(layers, "module-order", [], {}, notes)


def label(act: ActLike) -> str:
    """The activation's name, "none" when no activation follows."""
    return "none" if act is None else theory.activation_name(act)


def chain_depths(names: Sequence[tuple[str, str]], branch_of: dict[str, tuple[str, ...]]) -> dict[str, int]:
    """How many layers of the same activation each layer's gradient passes through in a chain.

    ``names``: (layer, activation label) of the layers one scale is chosen for. A layer inside a residual
    branch counts the layers of its label in that branch (the skip carries the gradient around the rest);
    every other layer counts the layers of its label outside all branches.
    """
    out: dict[str, int] = {}
    for name, lab in names:
        branch = branch_of.get(name)
        if branch is not None:
            members = set(branch)
            out[name] = sum(1 for n, b in names if b == lab and n in members)
        else:
            out[name] = sum(1 for n, b in names if b == lab and n not in branch_of)
    return out


def units(m: nn.Module) -> int | None:
    """Output units of one weight layer (rows of one block: a Linear's out_features, a conv's channels per
    group), the width that sets its finite-width spread; None when unknown."""
    from ..init import weight_blocks
    from ..init.fans import has_fan_rule

    if not has_fan_rule(m):
        return None
    b = weight_blocks(m)[0]
    w = getattr(m, b.param)
    if b.rows is not None:
        return b.rows[1] - b.rows[0]
    return int(w.shape[b.out_dim]) if w.ndim > 1 else int(w.shape[0])
