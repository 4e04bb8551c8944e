"""The graph capture's intermediate form: one list of nodes, whatever captured it (export, fx, hooks).

A node is the model input, a constant (a parameter, buffer or literal tensor that an op reads), a *call* of
a module (every leaf module and every module that owns parameters directly, as ``sp.measure`` records
them), a *function* applied outside any leaf module (``F.relu``, ``x + y``, ``view``, ...), or an *alias*:
a call that ran no op of its own (``nn.Identity``; a module that owns parameters but whose output is the
result of its children's ops), whose value is its input's. Nodes are in topological (execution) order and
refer to their tensor inputs by position, so everything downstream (activation search, residual detection,
``predict``) is plain data plus, for functions, the callable to replay on moment tensors.

Input nodes keep the example tensor they stand for in ``value`` (``predict`` reads integer inputs, token
ids and masks, from it). A call captured by export or fx also keeps its *body*: the ops that ran inside the
module, as function nodes with negative indices (their own namespace, never in the main list) whose refs
point at body nodes or at main nodes; ``body_out`` is the body node the call returns. ``predict`` walks the
body of a module it has no rule for (a rotary embedding, a layer calling ``F.linear`` on its own
parameter). When a module returns several tensors that are used outside it (``cos, sin``), each one but
the first gets a main node ``fn`` named ``"output"`` whose args are ``(Ref(call), body index)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Ref:
    """A reference to the output of node ``index`` inside a function node's ``args``/``kwargs``."""

    index: int


@dataclass
class Node:
    """One step of the captured graph; see the module docstring for ``op``."""

    index: int
    op: str  # "input" | "const" | "call" | "alias" | "fn"
    name: str  # call name with "#k" for calls and aliases, canonical op name for fn, input/const label
    kind: str  # module class name for calls/aliases, canonical op name for fn
    inputs: tuple[int, ...] = ()
    module: str | None = None  # qualified module name (calls and aliases)
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    fn: Callable[..., Any] | None = field(default=None, repr=False, compare=False)
    args: tuple[Any, ...] = field(default=(), repr=False)
    kwargs: dict[str, Any] = field(default_factory=dict, repr=False)
    value: torch.Tensor | None = field(default=None, repr=False, compare=False)  # const and input nodes
    body: tuple[Node, ...] = field(default=(), repr=False, compare=False)  # ops inside a call (see above)
    body_out: int | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "op": self.op,
            "name": self.name,
            "kind": self.kind,
            "inputs": list(self.inputs),
            "module": self.module,
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
        }


_OP_ALIASES = {
    "iadd": "add", "radd": "add", "add_": "add", "sub_": "sub", "isub": "sub", "rsub": "rsub",
    "imul": "mul", "rmul": "mul", "mul_": "mul", "truediv": "div", "itruediv": "div", "div_": "div",
    "matmul": "matmul", "bmm": "matmul", "mm": "matmul", "getitem": "getitem", "neg": "neg",
    "_unsafe_view": "view", "contiguous": "contiguous", "flatten": "flatten", "_to_copy": "to",
    "native_dropout": "dropout", "feature_dropout": "dropout", "alpha_dropout": "dropout",
    "max_pool2d_with_indices": "max_pool2d", "max_pool1d_with_indices": "max_pool1d",
    "max_pool3d_with_indices": "max_pool3d", "_log_softmax": "log_softmax", "_softmax": "softmax",
}


MULTI_OUTPUT_OPS = frozenset({"split", "chunk", "unbind", "split_with_sizes", "tensor_split", "unsafe_split"})
"""Ops that return a tuple of views of one input: a captured graph reads each piece through a ``getitem``
node (as torch.export writes them), never the op node itself."""


def canonical_op(target: Any) -> str:
    """A plain name for a function target: ``aten.relu_.default`` -> relu, ``operator.iadd`` -> add."""
    if isinstance(target, str):
        name = target
    elif isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = target.__name__
    else:
        name = getattr(target, "__name__", None) or type(target).__name__
    name = name.strip("_") if name.startswith("__") else name
    if name in _OP_ALIASES:
        return _OP_ALIASES[name]
    if name.endswith("_") and not name.endswith("__") and len(name) > 1:
        name = name[:-1]  # in-place variant
    return _OP_ALIASES.get(name, name)


def is_leaf(m: nn.Module) -> bool:
    return next(iter(m.children()), None) is None


def owns_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=False))


def recorded_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that get a call entry (as in ``sp.measure``): leaves and modules owning parameters directly.

    The root counts only when it is itself a leaf or owns parameters directly.
    """
    out: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if is_leaf(m) or owns_params(m):
            out[name] = m
    return out


def call_name(module: str, count: dict[str, int]) -> str:
    """``module`` for its first call, ``module#k`` for the k-th reuse (k >= 1), counting in ``count``."""
    k = count.get(module, 0)
    count[module] = k + 1
    label = module or "<model>"
    return label if k == 0 else f"{label}#{k}"


def map_refs(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every leaf of nested tuples/lists/dicts (used to swap node refs for values)."""
    if isinstance(obj, tuple):
        return tuple(map_refs(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_refs(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_refs(v, fn) for k, v in obj.items()}
    return fn(obj)


def refs_in(obj: Any) -> list[int]:
    found: list[int] = []

    def visit(o: Any) -> Any:
        if isinstance(o, Ref):
            found.append(o.index)
        return o

    map_refs(obj, visit)
    return list(dict.fromkeys(found))
