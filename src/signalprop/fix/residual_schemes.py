"""Residual scalings by structure, for any model: :func:`residual_` with depth-muP, ReZero, SkipInit, Fixup, DeepNorm.

A residual block adds a branch to the stream, x_{l+1} = x_l + F_l(x_l). With L branches each at a
variance-preserving init, Var[x_L] ~ prod_l (1 + Var[F_l] / Var[x_l]), which is 2^L when every branch
matches its input. Every scheme here scales the branches so the depth L drops out.

Branches come from the captured graph (:func:`signalprop.graph.capture`): each ``add`` of two same-shape
tensors that share an ancestor, the branch being the side with more weight layers
(:class:`signalprop.graph.Residual`); module names are never read. A branch's output is scaled at its *end
module*: the normalization after its last weight layer when there is one (a norm would divide a weight
scale out again: ResNet's last BatchNorm), else its last weight layer. What runs between that module and the
add (dropout, reshapes) is linear, so the scale reaches the add unchanged.

======== ===================================================== ================================================
scheme   branch output                                          state_dict
======== ===================================================== ================================================
depth_mup F(x) / sqrt(L), a constant (Yang et al. 2023, Tensor  unchanged (a non-persistent buffer)
         Programs VI; Bordelon et al. 2023)
rezero   a * F(x), a learnable, a = 0 (Bachlechner et al. 2020) + ``<end>.residual_gate`` (old checkpoints load)
skipinit a * F(x), a learnable, a = 0 (De & Smith 2020)          + ``<end>.residual_gate`` (old checkpoints load)
fixup    last layer (or the norm gain after it) x L^(-1/2)      unchanged (weights rescaled in place)
         (Zhang et al. 2019; :func:`signalprop.fix.fixup_factor`)
deepnorm LN(alpha x + G(x)), alpha = (2N)^(1/4); branch weights unchanged (a non-persistent buffer;
         x beta = (8N)^(-1/4) (Wang et al. 2022, DeepNet)       weights rescaled in place)
======== ===================================================== ================================================

DeepNorm is for post-norm blocks (the add feeds a normalization). N is the number of layers of an encoder of
attention + FFN layers, 2N its residual branches, so alpha = (2N)^(1/4) = L^(1/4), beta = (4L)^(-1/4). The
skip has no module to scale; since the add feeds a normalization, LN(alpha x + G) = LN(x + G / alpha) (the
norm's eps then acts as eps / alpha^2), so the branch is multiplied by 1/alpha: the same function of the
weights, hence the same gradients and training. beta goes on the branch's weight layers except those whose
output reaches the attention logits (a softmax, or the query/key inputs of ``scaled_dot_product_attention``):
the FFN and the value/output projections, as in the paper; a fused query-key-value layer is left at 1
(only its value rows would be scaled), and ``nn.MultiheadAttention`` gets beta on its value rows and output
projection.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from ..layers import is_norm, weight_names
from ._common import Inputs, refuse_meta
from ._gate import gate_
from ._steps import LayerPlan
from .residual import _module_of, _norm_after, residual_steps

__all__ = ["SCHEMES", "check", "deepnorm_factors", "residual_"]

SCHEMES: dict[str, str] = {
    "depth_mup": "each branch x 1/sqrt(L), a constant (Yang et al. 2023; Bordelon et al. 2023)",
    "rezero": "x + a F(x), a learnable scalar starting at 0 (Bachlechner et al. 2020)",
    "skipinit": "a learnable scalar at each branch's end, starting at 0 (De & Smith 2020)",
    "fixup": "each branch's last layer (or the norm gain after it) x L^(-1/2) (Zhang et al. 2019)",
    "deepnorm": "post-norm: skip x (2N)^(1/4), branch weights x (8N)^(-1/4) (Wang et al. 2022, DeepNet)",
}
"""The schemes :func:`residual_` knows, with their formula and paper."""

_THROUGH = frozenset({"dropout", "to", "type", "float", "half", "bfloat16", "contiguous", "clone", "alias",
                      "identity"})  # ops between an add and the norm that makes the block post-norm
_LOGITS = frozenset({"softmax", "_softmax", "log_softmax", "_safe_softmax"})


def deepnorm_factors(num_branches: int) -> tuple[float, float]:
    """DeepNorm's (alpha, beta) for an encoder of N = L/2 layers (Wang et al. 2022, Sec. 4.3, encoder-only).

    Args:
        num_branches: L = 2N, the residual branches (attention and feed-forward) of N layers.

    Returns:
        ``(alpha, beta)``: alpha = (2N)^(1/4) multiplies the skip, beta = (8N)^(-1/4) the branch weights.

    Examples:
        >>> [round(f, 4) for f in deepnorm_factors(12)]  # N = 6: 12^(1/4), 48^(-1/4)
        [1.8612, 0.3799]
    """
    if num_branches < 1:
        raise SignalpropError(f"deepnorm_factors needs L >= 1 residual branches, got {num_branches}")
    return num_branches**0.25, (4 * num_branches) ** -0.25


def residual_(
    model: nn.Module,
    scheme: str,
    *,
    example_inputs: Inputs | None = None,
    input_shape: Sequence[int] | None = None,
    graph: Any = None,
) -> nn.Module:
    """Scale every residual branch of ``model`` in place by ``scheme``, so depth drops out of its signal.

    Branches are the captured graph's additions (see the module docstring); each is scaled at its end
    module. ``depth_mup``: x 1/sqrt(L); ``rezero`` / ``skipinit``: x a, a learnable from 0 (every block
    starts as the identity); ``fixup``: the end module's weight (or norm gain) x L^(-1/2); ``deepnorm``
    (post-norm only): branch x 1/alpha = (2N)^(-1/4) and branch weights x beta = (8N)^(-1/4). Gates keep
    every existing state_dict key (:mod:`signalprop.fix._gate`); ReZero and SkipInit add
    ``<end>.residual_gate``, and a checkpoint saved without it loads with ``strict=True`` (gate 1, the model
    the checkpoint was). Build the optimizer after this call, so it holds the new gates.

    Args:
        model: the network (not on the meta device).
        scheme: one of ``depth_mup``, ``rezero``, ``skipinit``, ``fixup``, ``deepnorm``.
        example_inputs: one batch (tensor | tuple | dict) to capture the graph from.
        input_shape: one sample's shape (no batch dimension), instead of ``example_inputs``.
        graph: a :func:`signalprop.graph.capture` of this model, instead of capturing again.

    Returns:
        The model.

    Raises:
        SignalpropError: an unknown scheme, no way to capture the graph, no residual branch found, a
            branch's end module also called outside it, or ``deepnorm`` on a model whose additions are not
            followed by a normalization (pre-norm).

    Examples:
        >>> import torch, signalprop as sp
        >>> net = sp.models.resnet((2, 2), 8, norm=False)
        >>> _ = sp.fix.residual_(net, "rezero", input_shape=(3, 8, 8))
        >>> x = torch.relu(torch.randn(2, 8, 8, 8))
        >>> bool((net.stages[0](x) == x).all())  # each block starts as the identity
        True
        >>> sorted(k for k in net.state_dict() if k.endswith("residual_gate"))[:1]
        ['stages.0.conv2.residual_gate']
    """
    if scheme not in SCHEMES:
        names = "; ".join(f"{k!r}: {v}" for k, v in SCHEMES.items())
        raise SignalpropError(f"unknown residual scheme {scheme!r}; choose one of {names}")
    if not isinstance(model, nn.Module):
        raise SignalpropError(f"residual_ needs an nn.Module, got {type(model).__name__}")
    refuse_meta(model, "residual_")
    g = _graph(model, example_inputs, input_shape, graph)
    branches, ends, consumers = check(model, scheme, g)
    modules = dict(model.named_modules())
    L = len(branches)
    if scheme == "fixup":
        _fixup(model, branches, {c.name: c.node for c in g.calls}, modules)
        return model
    if scheme == "deepnorm":
        alpha, beta = deepnorm_factors(L)
        with torch.no_grad():
            for r in branches:
                for call in r.branch:
                    if not _feeds_logits(g, consumers, g.call(call).node, r.add):
                        _scale_weights(modules[_module_of(call)], beta)
        for end in ends:
            gate_(modules[end], 1.0 / alpha, learnable=False)
    elif scheme == "depth_mup":
        for end in ends:
            gate_(modules[end], L**-0.5, learnable=False)
    else:
        for end in ends:
            gate_(modules[end], 0.0, learnable=True)
    return model


def check(model: nn.Module, scheme: str, graph: Any) -> tuple[list[Any], list[str], list[list[int]]]:
    """Everything :func:`residual_` refuses, checked before it changes anything: (branches, end modules,
    node consumers). :func:`signalprop.fix.auto_init_` calls it before its own writes."""
    branches = [r for r in graph.residuals if r.branch]
    if not branches:
        raise SignalpropError(
            f"residual_ found no residual branch in {type(model).__name__} (captured by {graph.method}): a "
            "branch is an addition of two same-shape tensors that share an earlier tensor, with a weight layer "
            "on one side (x + F(x)). Additions inside a module signalprop treats as one layer, or built from "
            "ops the capture does not see, are not found; check sp.graph.capture(model, inputs).residuals"
        )
    modules = dict(model.named_modules())
    node_of = {c.name: c.node for c in graph.calls}
    consumers = _consumers(graph)
    ends = [] if scheme == "fixup" else _ends(graph, branches, node_of, modules)
    if scheme == "deepnorm":
        _check_post_norm(graph, branches, modules, consumers)
    return branches, ends, consumers


def _graph(model: nn.Module, example_inputs: Inputs | None, input_shape: Sequence[int] | None, graph: Any) -> Any:
    if graph is not None:
        return graph
    if example_inputs is None and input_shape is None:
        raise SignalpropError(
            "residual_ finds branches from the captured graph: pass example_inputs=... (one batch) or "
            "input_shape=... (one sample's shape)"
        )
    from ..graph import capture
    from ..graph._types import CaptureWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureWarning)  # the method used does not change the branches found
        return capture(model, example_inputs, input_shape=input_shape)


def _ends(g: Any, branches: list[Any], node_of: dict[str, int], modules: dict[str, nn.Module]) -> list[str]:
    """The module ending each branch, innermost branch first, each once; a module called elsewhere is refused."""
    ends: list[str] = []
    end_calls: set[str] = set()
    for r in sorted(branches, key=lambda r: len(r.branch)):
        end = _norm_after(r, node_of, modules) or _module_of(r.last_weight)
        call = r.last_norm if end == _module_of(r.last_norm) else r.last_weight
        end_calls.add(call)
        if end not in ends:
            ends.append(end)
    for c in g.calls:
        if c.module in ends and c.name not in end_calls:
            raise SignalpropError(
                f"residual_: {c.module!r} ends a residual branch but is also called where it ends none "
                f"({c.name}); a gate on its output would scale that call too. Give the branch its own module"
            )
    return ends


def _fixup(model: nn.Module, branches: list[Any], node_of: dict[str, int], modules: dict[str, nn.Module]) -> None:
    """Fixup in place: the factors and their placement of :func:`signalprop.fix.residual.residual_steps`."""
    layers = dict.fromkeys(_module_of(c) for r in branches for c in r.branch)
    base = [LayerPlan(n, type(modules[n]).__name__, "", "current", math.nan, math.nan, "") for n in layers]
    steps, _ = residual_steps(model, base, branches, node_of, "fixup")
    with torch.no_grad():
        for s in steps:
            if s.factor == 1.0:
                continue
            m = modules[s.layer]
            if s.scheme == "norm_gain":
                m.weight.mul_(s.factor)  # type: ignore[operator]
            else:
                _scale_weights(m, s.factor)


def _scale_weights(m: nn.Module, factor: float) -> None:
    """Multiply the weight matrices of ``m`` by ``factor`` (MultiheadAttention: value rows and output only)."""
    if isinstance(m, nn.MultiheadAttention):
        e = m.embed_dim
        if m.in_proj_weight is not None:
            m.in_proj_weight[2 * e:].mul_(factor)
        else:
            m.v_proj_weight.mul_(factor)
        m.out_proj.weight.mul_(factor)
        return
    from ..init._parametrized import assign_, is_parametrized

    for name in weight_names(m):
        if is_parametrized(m, name):
            assign_(m, name, getattr(m, name) * factor, "residual_")
        else:
            getattr(m, name).mul_(factor)


def _consumers(g: Any) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in g.nodes]
    for n in g.nodes:
        for j in n.inputs:
            if j is not None and j >= 0:
                out[j].append(n.index)
    return out


def _post_norm(g: Any, add: int, modules: dict[str, nn.Module], consumers: list[list[int]]) -> bool:
    """True when every use of the addition's output goes through a normalization (dropout, casts and copies
    between). In a pre-norm model the sum also feeds the next addition directly (the stream), so it is not."""
    outputs = set(g.outputs)
    stack = [add]
    while stack:
        i = stack.pop()
        if i in outputs or not consumers[i]:
            return False  # the unnormalized sum leaves the model
        for j in consumers[i]:
            n = g.nodes[j]
            if n.op == "call" and is_norm(modules[n.module or ""]):
                continue
            if n.op == "fn" and n.name in ("layer_norm", "rms_norm", "group_norm", "batch_norm"):
                continue
            through = n.op == "fn" and n.name in _THROUGH or n.op in ("alias", "call") and \
                type(modules[n.module or ""]).__name__.startswith("Dropout")
            if not through:
                return False
            stack.append(j)
    return True


def _check_post_norm(g: Any, branches: list[Any], modules: dict[str, nn.Module],
                     consumers: list[list[int]]) -> None:
    pre = [r for r in branches if not _post_norm(g, r.add, modules, consumers)]
    if pre:
        where = ", ".join(r.last_weight or "?" for r in pre[:4]) + (" ..." if len(pre) > 4 else "")
        raise SignalpropError(
            f"deepnorm is for post-norm blocks x_(l+1) = LN(alpha x_l + G(x_l)), where each addition feeds a "
            f"normalization; {len(pre)} of {len(branches)} additions do not (branches ending at {where}). In a "
            "pre-norm model the norm is inside the branch and the stream is never normalized, so DeepNorm's "
            "alpha/beta derivation does not hold: use scheme='depth_mup' (or 'rezero'/'skipinit') there"
        )


def _feeds_logits(g: Any, consumers: list[list[int]], start: int, add: int) -> bool:
    """True when node ``start``'s output reaches attention logits (a softmax, or the query/key of sdpa)."""
    seen: set[int] = set()
    stack = [start]
    while stack:
        i = stack.pop()
        for j in consumers[i]:
            n = g.nodes[j]
            if j in seen or j >= add:
                continue
            seen.add(j)
            if n.op == "fn" and n.name in _LOGITS or n.op == "call" and n.kind == "Softmax":
                return True
            if n.op == "fn" and n.name == "scaled_dot_product_attention" and i in n.inputs[:2]:
                return True
            stack.append(j)
    return False
