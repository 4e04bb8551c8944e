"""Width-independent training: the Maximal Update Parametrization (muP; Yang et al. 2022, Tensor Programs V).

Under the standard parametrization a learning rate tuned at one width is wrong at another: with Adam, a
hidden layer's update moves each output coordinate by about ``lr * fan_in``, so wider nets blow up. muP sets
each weight's init variance and learning rate from its role, so every layer's coordinates move by Theta(1)
per step at any width, and the best learning rate found at ``base_width`` holds at every width.

Roles come from the captured graph, never from names: an *input* layer reads the model's inputs (its fan-in
is a data size, not a width), the *readout* is the last weight layer before an output, every other weight
layer is *hidden*. With ``m = width / base_width`` (Tensor Programs V, Table 3, normalized so that the base
width keeps the given learning rate):

============  ===============  ===============  ================
role          init variance    Adam lr          SGD lr
============  ===============  ===============  ================
input         1 / fan_in       lr               lr * m
hidden        1 / fan_in       lr / m           lr
readout       1 / fan_in^2     lr / m           lr / m
biases        0                lr               lr * m (readout: lr)
vectors       kept             lr               lr * m
============  ===============  ===============  ================

*Vectors* are the other one-dimensional parameters whose length is a width (a LayerNorm's gain and bias):
like a bias, SGD moves them by ``lr / m`` per coordinate unless their rate grows with the width.

Attention logits are scaled by ``1/d`` instead of ``1/sqrt(d)`` (keys and queries become correlated as they
train, so their dot product grows like ``d``) in every attention module that exposes its scale as a
``scaling`` or ``scale`` attribute (transformers' attention classes); others are named in the notes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from ..graph import capture
from ..graph._types import Graph
from ..layers import is_weight_layer
from ._common import Inputs

__all__ = ["MupPlan", "mup_", "mup_plan"]

ROLES = ("input", "hidden", "readout")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class MupLayer:
    """One weight layer's muP treatment: its role, width multiplier ``m``, init std and lr multipliers.

    Attributes:
        name: The layer's qualified name.
        role: ``input``, ``hidden`` or ``readout``.
        fan_in: Its fan-in (1 for an embedding).
        fan_out: Its fan-out.
        width_mult: ``m = width / base_width``.
        std: The init std (Tensor Programs V, Table 3: ``1/sqrt(fan_in)``, the readout ``1/fan_in``).
        weight_lr_mult: The weight's learning-rate multiplier.
        bias_lr_mult: The bias's learning-rate multiplier.

    Examples:
        >>> import signalprop as sp
        >>> readout = mup_plan(sp.models.mlp(2, 128, in_features=16, out_features=10), input_shape=(16,))["4"]
        >>> readout.role, readout.std, readout.width_mult  # 1 / 128; 128 / 64
        ('readout', 0.0078125, 2.0)
    """

    name: str
    role: str
    fan_in: float
    fan_out: float
    width_mult: float
    std: float
    weight_lr_mult: float
    bias_lr_mult: float


@dataclass(frozen=True)
class MupPlan:
    """The per-layer muP plan (:func:`mup_plan`) and what :func:`mup_` could not apply (``notes``).

    ``plan["name"]`` gives one layer's :class:`MupLayer` (role, width multiplier, std, lr multipliers).

    Attributes:
        layers: One :class:`MupLayer` per weight layer, in module order.
        optimizer: ``adam`` or ``sgd``.
        base_width: The width at which the learning rate is the one given.
        notes: Layers left as they are, and why.

    Examples:
        >>> import signalprop as sp
        >>> p = mup_plan(sp.models.mlp(3, 256, in_features=16, out_features=10), input_shape=(16,))
        >>> p["6"].role, p["6"].width_mult, p["6"].weight_lr_mult
        ('readout', 4.0, 0.25)
    """

    layers: tuple[MupLayer, ...]
    optimizer: str
    base_width: int
    notes: tuple[str, ...] = field(default=())

    def __getitem__(self, name: str) -> MupLayer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no weight layer {name!r}; layers: {', '.join(x.name for x in self.layers)}")


def _walk_back(graph: Graph, start: Iterable[int], weight_nodes: set[int]) -> set[int]:
    """Nodes reached walking backwards from ``start`` through inputs; a weight-layer call is reached, not passed."""
    seen: set[int] = set()
    todo = list(start)
    while todo:
        i = todo.pop()
        if i in seen:
            continue
        seen.add(i)
        if i not in weight_nodes:
            todo.extend(graph.nodes[i].inputs)
    return seen


def roles(graph: Graph) -> dict[str, str]:
    """Module name -> ``"input"``, ``"hidden"`` or ``"readout"`` for every weight layer of a captured graph.

    A layer is *input* when a path from the model's inputs reaches it without passing another weight layer,
    *readout* when a path from it reaches an output without passing another one (readout wins when both:
    a one-layer model), *hidden* otherwise. A module called several times keeps its first call's role.
    """
    weight_nodes = {c.node: c for c in graph.calls if c.weight_layer}
    inputs = {n.index for n in graph.nodes if n.op == "input"}
    near_output = _walk_back(graph, graph.outputs, set(weight_nodes)) & set(weight_nodes)
    found: dict[str, str] = {}
    for node, call in weight_nodes.items():
        if call.module in found:
            continue
        upstream = _walk_back(graph, graph.nodes[node].inputs, set(weight_nodes))
        if node in near_output:
            found[call.module] = "readout"
        elif upstream & inputs:
            found[call.module] = "input"
        else:
            found[call.module] = "hidden"
    return found


def mup_plan(model: nn.Module, example_inputs: Inputs | None = None, *, input_shape: Any = None,
             base_width: int = 64, optimizer: str = "adam") -> MupPlan:
    """The muP plan for ``model`` (see the module docstring for the table), as data; changes nothing.

    Args:
        model: any model whose graph :func:`signalprop.graph.capture` can read.
        example_inputs: inputs for the capture (tensor, tuple or dict), or ``input_shape`` without the batch.
        base_width: the width at which the given learning rate is the standard one (``m = 1`` there).
        optimizer: ``"adam"`` (Adam, AdamW and other entrywise-normalized optimizers) or ``"sgd"``.

    Returns:
        A :class:`MupPlan` with one :class:`MupLayer` per weight layer, in module order.

    Raises:
        SignalpropError: An unknown optimizer, a bad base width, no inputs to capture the graph from, or
            no weight layers.

    Examples:
        Width 256 against base width 64: ``m = 4``. Tensor Programs V, Table 3: hidden layers get std
        ``1/sqrt(fan_in)`` and Adam lr ``lr / m``, the readout std ``1/fan_in``:

        >>> import signalprop as sp
        >>> p = mup_plan(sp.models.mlp(3, 256, in_features=16, out_features=10), input_shape=(16,))
        >>> [(x.name, x.role, x.std, x.weight_lr_mult) for x in p.layers]  # doctest: +NORMALIZE_WHITESPACE
        [('0', 'input', 0.25, 1.0), ('2', 'hidden', 0.0625, 0.25), ('4', 'hidden', 0.0625, 0.25),
         ('6', 'readout', 0.00390625, 0.25)]
    """
    from ..init.fans import fans, has_fan_rule

    if optimizer not in OPTIMIZERS:
        raise SignalpropError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if not (isinstance(base_width, int) and base_width > 0):
        raise SignalpropError(f"base_width must be a positive int (the width you tuned at), got {base_width!r}")
    if example_inputs is None and input_shape is None:
        raise SignalpropError("mup_ needs example_inputs=... or input_shape=... to find the input and readout "
                              "layers from the model's graph")
    graph = capture(model, example_inputs, input_shape=input_shape)
    found = roles(graph)
    notes: list[str] = []
    layers: list[MupLayer] = []
    for name, m in model.named_modules():
        if not is_weight_layer(m) or name not in found:
            continue
        if not has_fan_rule(m):
            notes.append(f"{name} ({type(m).__name__}) left as it is: no fan rule; register one with "
                         "sp.init.register_fans to include it")
            continue
        fan_in, fan_out = (float(f) for f in fans(m))
        role = found[name]
        if isinstance(m, nn.Embedding | nn.EmbeddingBag):
            fan_in = 1.0  # one-hot input: a lookup's output variance is its weight's (input role: var 1)
        width = fan_out if role == "input" else fan_in
        mult = width / base_width
        if role == "readout":
            std, w_lr, b_lr = 1.0 / fan_in, 1.0 / mult, 1.0
        elif role == "hidden":
            std = 1.0 / math.sqrt(fan_in)
            w_lr, b_lr = (1.0 / mult, 1.0) if optimizer == "adam" else (1.0, fan_out / base_width)
        else:
            std = 1.0 / math.sqrt(fan_in)
            w_lr = b_lr = 1.0 if optimizer == "adam" else mult
        if role == "readout" and optimizer == "sgd":
            w_lr = 1.0 / mult
        layers.append(MupLayer(name, role, fan_in, fan_out, mult, std, w_lr, b_lr))
    if not layers:
        raise SignalpropError(f"{type(model).__name__} has no weight layers for muP to parametrize")
    return MupPlan(tuple(layers), optimizer, base_width, tuple(notes))


def _attention_scales_(model: nn.Module, notes: list[str]) -> int:
    """Set ``scaling``/``scale`` = 1/d on attention modules that expose it as ``1/sqrt(d)``; count them."""
    changed = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            notes.append(f"{name} (MultiheadAttention) keeps 1/sqrt(d) logits: its scale is not an attribute; "
                         "use an attention module with a `scaling` attribute for muP's 1/d")
            continue
        for attr in ("scaling", "scale"):
            s = getattr(m, attr, None)
            if isinstance(s, float) and 0 < s < 1:
                d = round(1.0 / (s * s))
                if abs(1.0 / math.sqrt(d) - s) < 1e-6 * s:
                    setattr(m, attr, 1.0 / d)
                    changed += 1
                break
    return changed


def mup_(model: nn.Module, example_inputs: Inputs | None = None, *, lr: float, input_shape: Any = None,
         base_width: int = 64, optimizer: str = "adam", generator: torch.Generator | None = None
         ) -> list[dict[str, Any]]:
    """Re-initialize ``model`` in place for muP and return its optimizer's parameter groups.

    Weights are drawn from N(0, std^2) with the plan's std, biases set to zero, attention logits scaled
    by 1/d where the module allows it. Pass the result to the optimizer: ``torch.optim.Adam(groups)``; each
    group carries its ``lr`` and, for reading, ``mup_role`` and ``width_mult``. Parameters outside the weight
    layers keep their values; those of one dimension along a width (norm gains and biases: role ``vector``)
    get the biases' rate, the others (tokens, scalars) the base ``lr``.

    Args:
        model: The model to re-initialize in place.
        example_inputs: Inputs to capture the graph with (tensor, tuple or dict).
        lr: The learning rate tuned at ``base_width``.
        input_shape: One sample's shape, no batch dimension, when no inputs are given.
        base_width: The width the learning rate was tuned at.
        optimizer: ``"adam"`` (and other entrywise-normalized optimizers) or ``"sgd"``.
        generator: The random generator to draw from.

    Returns:
        The optimizer's parameter groups: dicts with ``params``, ``lr``, ``mup_role`` and ``width_mult``.

    Raises:
        SignalpropError: A non-positive ``lr``, or as :func:`mup_plan`.

    Examples:
        >>> import torch, signalprop as sp
        >>> net = sp.models.mlp(3, 256, in_features=16, out_features=10)
        >>> groups = sp.fix.mup_(net, torch.randn(4, 16), lr=1e-3, base_width=64)
        >>> sorted((g["mup_role"], g["width_mult"], g["lr"]) for g in groups)  # doctest: +NORMALIZE_WHITESPACE
        [('hidden', 4.0, 0.00025), ('hidden bias', 4.0, 0.001), ('input', 4.0, 0.001),
         ('input bias', 4.0, 0.001), ('readout', 4.0, 0.00025), ('readout bias', 4.0, 0.001)]
    """
    if not (isinstance(lr, float | int) and lr > 0):
        raise SignalpropError(f"lr must be a positive number (the learning rate tuned at base_width), got {lr!r}")
    plan = mup_plan(model, example_inputs, input_shape=input_shape, base_width=base_width, optimizer=optimizer)
    modules = dict(model.named_modules())
    groups: dict[tuple[str, float, float], dict[str, Any]] = {}
    seen: set[int] = set()

    def put(p: torch.Tensor, role: str, mult: float, lr_mult: float) -> None:
        if id(p) in seen or not p.requires_grad:
            return
        seen.add(id(p))
        key = (role, mult, lr_mult)
        groups.setdefault(key, {"params": [], "lr": lr * lr_mult, "mup_role": role, "width_mult": mult})
        groups[key]["params"].append(p)

    with torch.no_grad():
        for layer in plan.layers:
            m = modules[layer.name]
            for p in m.parameters(recurse=False):
                if p.dim() >= 2:
                    p.normal_(0.0, layer.std, generator=generator)
                    put(p, layer.role, layer.width_mult, layer.weight_lr_mult)
                else:
                    p.zero_()
                    put(p, f"{layer.role} bias", layer.width_mult, layer.bias_lr_mult)
    widths = {x.fan_out for x in plan.layers if x.role != "readout"} | {x.fan_in for x in plan.layers
                                                                          if x.role != "input"}
    for p in model.parameters():
        if p.dim() == 1 and float(p.numel()) in widths:  # a norm's gain or bias along a width: vector-like
            m = p.numel() / base_width
            put(p, "vector", m, m if optimizer == "sgd" else 1.0)
        put(p, "other", 1.0, 1.0)
    notes = list(plan.notes)
    _attention_scales_(model, notes)
    if notes:
        import warnings

        warnings.warn("mup_: " + "; ".join(notes), UserWarning, stacklevel=2)
    return list(groups.values())
