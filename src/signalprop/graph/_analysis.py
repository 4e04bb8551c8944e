"""Read structure off a captured node list: calls, the activation after each weight layer, residual joins.

*Activation after a weight layer*: a depth-first walk along the data path from the layer's output, in node
order, through ops that do not change which nonlinearity comes next ("transparent": pooling, flatten and
views, dropout, normalization, additions, scalings, concatenation). The first activation reached (a module
such as ``nn.ReLU`` / ``nn.LeakyReLU(0.2)``, or a functional op such as ``F.relu``, ``torch.tanh``,
``F.gelu(approximate="tanh")``) is the answer; a path that meets another weight layer, an op the walk does
not know, or the output ends with nothing (None, a linear layer).

*Residuals*: an ``add`` whose two inputs have the same shape and share an ancestor. The fork is their latest
common ancestor; the side with more weight layers between the fork and the add is the branch, the other the
skip (identity or projection). Attention-mask additions broadcast (different shapes) and are not residuals.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from .. import theory
from ..layers import is_norm, is_norm_kind, is_weight_layer
from ..theory import ActLike
from ._ir import Node, Ref
from ._types import Call, Graph, Residual

TRANSPARENT_OPS = frozenset({
    "add", "sub", "mul", "div", "neg", "view", "reshape", "flatten", "unflatten", "permute", "transpose",
    "t", "contiguous", "clone", "unsqueeze", "squeeze", "expand", "dropout", "to", "type", "float", "half",
    "bfloat16", "double", "detach", "alias", "pad", "constant_pad_nd", "cat", "concat", "getitem", "narrow",
    "slice", "select", "split", "chunk", "mean", "batch_norm", "layer_norm", "group_norm", "instance_norm",
    "rms_norm", "native_batch_norm", "max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "identity",
})
"""Function names the activation search walks through."""

TRANSPARENT_MODULES = frozenset({
    "Identity", "Flatten", "Unflatten", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
    "FeatureAlphaDropout", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d",
    "AdaptiveMaxPool3d", "ZeroPad2d", "ConstantPad2d", "ReflectionPad2d", "ReplicationPad2d",
})

ACTIVATION_OPS = frozenset(n for n in theory.known_activations() if n not in ("linear", "identity")) | {
    "prelu", "gelu_tanh"}


def activation_module(m: nn.Module) -> bool:
    """True for a module that applies a nonlinearity theory knows (ReLU, Tanh, transformers' GELUActivation)."""
    key = theory.activation_key(m)
    return key is not None and key != "linear"


Step = tuple[str, ActLike]
"""How a module met after a weight layer bears on the activation that follows it: ``("activation", act)``,
``("pass", None)`` (transparent: the search goes on) or ``("stop", None)`` (another weight layer, or a
module the search does not know: nothing follows)."""


def module_step(m: nn.Module) -> Step:
    """:data:`Step` of a module: an activation; a transparent module (pooling, flatten, dropout, identity,
    padding, normalization); else a stop (a weight layer, anything else)."""
    if activation_module(m):
        return "activation", m
    if not is_weight_layer(m) and (type(m).__name__ in TRANSPARENT_MODULES or is_norm(m)):
        return "pass", None
    return "stop", None


def kind_step(kind: str, *, weight_layer: bool = False, act_key: str | None = None) -> Step:
    """:data:`Step` of a module known only by its class name (a Trace row): the same rule as
    :func:`module_step`; ``act_key`` (the activation registry name recorded for the row) wins over the
    class name, so a parametrized activation keeps its name."""
    key = act_key if act_key is not None else theory._MODULE_NAMES.get(kind)
    if key is not None and key not in ("linear", "identity"):
        return "activation", key
    if not weight_layer and (kind in TRANSPARENT_MODULES or is_norm_kind(kind)):
        return "pass", None
    return "stop", None


def activation_in_order(steps: Iterable[Step]) -> ActLike:
    """The activation that follows a weight layer, from the :data:`Step` of each module after it in call
    order: the first activation reached through transparent modules, or None (a linear layer) when a stop
    or the end comes first. Module order (``fix.plan`` without inputs) and trace order (diagnose on a saved
    trace) both use it; the captured graph walks the same rule along its data path."""
    for what, act in steps:
        if what == "activation":
            return act
        if what == "stop":
            return None
    return None


def fn_activation(node: Node, nodes: list[Node]) -> ActLike:
    """The activation a functional op applies, honouring its parameters (slope, approximate, alpha)."""
    name = node.name
    a, kw = node.args, node.kwargs

    def arg(i: int, key: str, default: Any) -> Any:
        v = a[i] if len(a) > i else kw.get(key, default)
        return default if isinstance(v, Ref) or v is None else v

    if name == "leaky_relu":
        return nn.LeakyReLU(float(arg(1, "negative_slope", 0.01)))
    if name == "gelu":
        return "gelu_tanh" if arg(1, "approximate", "none") == "tanh" else "gelu"
    if name == "elu":
        alpha = float(arg(1, "alpha", 1.0))
        return "elu" if alpha == 1.0 else nn.ELU(alpha)
    if name == "hardtanh":
        return nn.Hardtanh(float(arg(1, "min_val", -1.0)), float(arg(2, "max_val", 1.0)))
    if name == "softplus":
        return nn.Softplus(float(arg(1, "beta", 1.0)), float(arg(2, "threshold", 20.0)))
    if name == "prelu":
        w = a[1] if len(a) > 1 else kw.get("weight")
        if isinstance(w, Ref) and nodes[w.index].value is not None:
            return nn.LeakyReLU(float(nodes[w.index].value.detach().float().mean()))  # type: ignore[union-attr]
        return nn.LeakyReLU(0.25)
    return name


def build(model: nn.Module, nodes: list[Node], call_idx: list[int], outputs: list[int], method: str,
          failures: dict[str, str]) -> Graph:
    modules = dict(model.named_modules())
    calls: list[Call] = []
    for i in call_idx:
        n = nodes[i]
        m = modules[n.module or ""]
        calls.append(Call(n.name, n.module or "", n.kind, is_weight_layer(m), i, n.shape))
    consumers: list[list[int]] = [[] for _ in nodes]
    for n in nodes:
        if n.op == "alias":
            continue
        for j in n.inputs:
            if j is not None:
                consumers[j].append(n.index)
    graph = Graph(nodes=nodes, calls=calls, outputs=outputs, method=method, failures=dict(failures))
    for c in calls:
        if c.weight_layer:
            # A module with children (a parametrized layer: its weight comes from parametrizations.weight)
            # is an alias of the op that made its output: the activation follows that op.
            n = nodes[c.node]
            start = n.inputs[0] if n.op == "alias" and n.inputs and n.inputs[0] is not None else c.node
            graph.activations[c.name] = _activation_after(start, nodes, consumers, modules)
    graph.residuals = _residuals(nodes, calls, modules)
    return graph


def _activation_after(start: int, nodes: list[Node], consumers: list[list[int]],
                      modules: dict[str, nn.Module]) -> ActLike:
    seen: set[int] = set()
    stack = list(reversed(consumers[start]))
    while stack:
        i = stack.pop()
        if i in seen:
            continue
        seen.add(i)
        n = nodes[i]
        if n.op == "call":
            what, act = module_step(modules[n.module or ""])
            if what == "activation":
                return act
            if what == "stop":
                continue
        elif n.op == "fn":
            if n.name in ACTIVATION_OPS:
                return fn_activation(n, nodes)
            if n.name not in TRANSPARENT_OPS:
                continue
        else:
            continue
        stack.extend(reversed(consumers[i]))
    return None


def _residuals(nodes: list[Node], calls: list[Call], modules: dict[str, nn.Module]) -> list[Residual]:
    anc: list[int] = [0] * len(nodes)
    for n in nodes:
        bits = 0
        if n.op not in ("const", "alias"):
            bits = 1 << n.index
            for j in n.inputs:
                if j is not None:
                    bits |= anc[j]
        anc[n.index] = bits
    name_of = {c.node: c.name for c in calls if nodes[c.node].op == "call"}
    weight = {c.node for c in calls if c.weight_layer and nodes[c.node].op == "call"}
    norm = {c.node for c in calls if nodes[c.node].op == "call" and is_norm(modules[c.module])}
    found: list[Residual] = []
    for n in nodes:
        if n.op != "fn" or n.name != "add":
            continue
        ins = [j for j in n.inputs if j is not None and nodes[j].op != "const"]
        if len(ins) != 2 or nodes[ins[0]].shape is None or nodes[ins[0]].shape != nodes[ins[1]].shape:
            continue
        common = anc[ins[0]] & anc[ins[1]]
        if not common:
            continue
        fork = common.bit_length() - 1
        sides = []
        for x in ins:
            members = [k for k in _bits(anc[x]) if k > fork and anc[k] >> fork & 1]
            sides.append(members)
        w = [[k for k in s if k in weight] for s in sides]
        b_i = 0 if len(w[0]) >= len(w[1]) else 1
        if not w[b_i]:
            continue
        found.append(Residual(
            add=n.index, fork=fork,
            branch=tuple(name_of[k] for k in w[b_i]),
            skip=tuple(name_of[k] for k in w[1 - b_i]),
            norms=tuple(name_of[k] for k in sides[b_i] if k in norm),
        ))
    return found


def _bits(x: int) -> list[int]:
    out = []
    while x:
        low = x & -x
        out.append(low.bit_length() - 1)
        x ^= low
    return out
