"""The three capture back-ends behind :func:`signalprop.graph.capture`, each producing the same node list.

* ``export``: ``torch.export.export(model, args, kwargs, strict=False)``. Every op carries
  ``meta["nn_module_stack"]``; ops inside one leaf module's call become one call node. Forward hooks fire
  during non-strict export (on fake tensors), so they give the exact call order, the ``#k`` reuse count and
  the calls that ran no op at all (``nn.Identity``), which become alias nodes.
* ``fx``: ``torch.fx.symbolic_trace`` plus one forward through the traced module for shapes.
* ``hooks``: one real forward with forward hooks on every recorded module and a ``TorchFunctionMode`` that
  records every torch function and tensor method called outside them (``F.relu``, ``x + y``, ``view``);
  the data flow follows tensor identity. It sees only the path this input took, which is why it is last.

Export and fx run inside :func:`~signalprop.graph._quiet.quiet_torch`: what torch prints or logs while they
fail (a failed export prints its partial FX graph, about 90 lines) goes to the ``signalprop.graph`` logger
at DEBUG level; the user sees the one line of the ``CaptureWarning``.
"""

from __future__ import annotations

import inspect
import operator
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._inputs import first_tensor
from ._ir import (
    MULTI_OUTPUT_OPS,
    Node,
    Ref,
    call_name,
    canonical_op,
    is_leaf,
    map_refs,
    recorded_modules,
    refs_in,
)
from ._quiet import quiet_torch

Captured = tuple[list[Node], list[int], list[int]]  # nodes, call node indices in call order, output indices

def _shape(v: Any) -> tuple[tuple[int, ...] | None, str | None]:
    if isinstance(v, torch.Tensor):
        return tuple(int(s) for s in v.shape), str(v.dtype).replace("torch.", "")
    if isinstance(v, list | tuple) and v and isinstance(v[0], torch.Tensor):
        return _shape(v[0])
    return None, None


def _tensors(obj: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def visit(o: Any) -> Any:
        if isinstance(o, torch.Tensor):
            found.append(o)
        return o

    map_refs(obj, visit)
    return found


def _scopes(stack: Any, recorded: dict[str, nn.Module]) -> tuple[tuple[str, str] | None, list[tuple[str, str]]]:
    """(innermost recorded leaf (key, path) or None, [(key, path) of recorded non-leaf modules]) of an op."""
    if not stack:
        return None, []
    leaf: tuple[str, str] | None = None
    owners: list[tuple[str, str]] = []
    for key, val in stack.items():
        path = val[0] if isinstance(val, tuple) else str(val)
        path = _clean_path(path)
        m = recorded.get(path)
        if m is None:
            continue
        if is_leaf(m):
            leaf = (str(key), path)
            break
        owners.append((str(key), path))
    return leaf, owners


def _clean_path(path: str) -> str:
    for prefix in ("L['self'].", "L__self__.", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return "" if path in ("L['self']", "L__self__", "self") else path


class _Builder:
    """Accumulates IR nodes, leaf-call groups and the scopes of parameter-owning containers."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.recorded = recorded_modules(model)
        self.nodes: list[Node] = []
        self.ir_of: dict[Any, int] = {}  # backend node -> IR index
        self.leaf_queue: dict[str, deque[int]] = defaultdict(deque)  # module path -> call nodes in order
        self.owner_last: dict[str, dict[str, int]] = defaultdict(dict)  # path -> key -> last IR node
        self.body_count = 0  # body nodes are numbered -1, -2, ... (see ``_ir``)

    def body_index(self) -> int:
        self.body_count += 1
        return -self.body_count

    def add(self, node: Node) -> int:
        node.index = len(self.nodes)
        self.nodes.append(node)
        return node.index

    def note_owners(self, owners: list[tuple[str, str]], idx: int) -> None:
        for key, path in owners:
            self.owner_last[path][key] = idx

    def owner_output(self, path: str, occurrence: int) -> int | None:
        keys = list(self.owner_last.get(path, {}).items())
        if occurrence < len(keys):
            return keys[occurrence][1]
        return None


# ---- export ---------------------------------------------------------------------------------------------
def from_export(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Captured:
    b = _Builder(model)
    stream: list[tuple[str, list[torch.Tensor], torch.Tensor | None]] = []
    root_inputs: list[torch.Tensor] = []
    def root_pre(_m: nn.Module, a: Any, kw: Any) -> None:
        root_inputs.extend(_tensors((a, kw)))

    handles = [model.register_forward_pre_hook(root_pre, with_kwargs=True)]
    for path, m in b.recorded.items():
        def hook(_m: nn.Module, inp: Any, out: Any, path: str = path) -> None:
            stream.append((path, _tensors(inp), first_tensor(out)))
        handles.append(m.register_forward_hook(hook))
    try:
        with quiet_torch(f"exporting {type(model).__name__}"):
            ep = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    finally:
        for h in handles:
            h.remove()
    sig = ep.graph_signature
    params = dict(sig.inputs_to_parameters)
    buffers = dict(sig.inputs_to_buffers)
    consts = dict(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    user_inputs = list(sig.user_inputs)
    user_values = _flat_inputs(ep, args, kwargs, len(user_inputs))
    graph_nodes = list(ep.graph.nodes)

    # group consecutive ops of one leaf call
    group_of: dict[Any, str] = {}
    leaf_path: dict[str, str] = {}
    members: dict[str, list[Any]] = defaultdict(list)
    for n in graph_nodes:
        if n.op != "call_function":
            continue
        leaf, _ = _scopes(n.meta.get("nn_module_stack"), b.recorded)
        if leaf is not None:
            group_of[n] = leaf[0]
            leaf_path[leaf[0]] = leaf[1]
            members[leaf[0]].append(n)

    def ref(x: Any) -> Any:
        if isinstance(x, torch.fx.Node):
            return Ref(b.ir_of[x]) if x in b.ir_of else None
        return x

    done_groups: set[str] = set()
    for n in graph_nodes:
        if n.op == "placeholder":
            shape, dtype = _shape(n.meta.get("val"))
            if n.name in params or n.name in buffers:
                fqn = params.get(n.name) or buffers[n.name]
                value = model.get_parameter(fqn) if n.name in params else model.get_buffer(fqn)
                b.ir_of[n] = b.add(Node(0, "const", fqn, "const", shape=shape, dtype=dtype, value=value))
            elif n.name in consts:
                raw = ep.constants[consts[n.name]]
                cvalue: torch.Tensor | None = raw if isinstance(raw, torch.Tensor) else None
                b.ir_of[n] = b.add(Node(0, "const", n.name, "const", shape=shape, dtype=dtype, value=cvalue))
            else:
                v = user_values[user_inputs.index(n.name)] if n.name in user_inputs else None
                b.ir_of[n] = b.add(Node(0, "input", n.name, "input", shape=shape, dtype=dtype,
                                        value=v if isinstance(v, torch.Tensor) else None))
        elif n.op == "call_function":
            key = group_of.get(n)
            _, owners = _scopes(n.meta.get("nn_module_stack"), b.recorded)
            if key is None:
                a, kw = map_refs(tuple(n.args), ref), map_refs(dict(n.kwargs), ref)
                shape, dtype = _shape(n.meta.get("val"))
                name = canonical_op(n.target)
                idx = b.add(Node(0, "fn", name, name, inputs=tuple(refs_in((a, kw))), shape=shape,
                                 dtype=dtype, fn=n.target, args=a, kwargs=kw))
                b.ir_of[n] = idx
                b.note_owners(owners, idx)
            elif key not in done_groups:
                done_groups.add(key)
                idx = _export_group(b, members[key], leaf_path[key], ref, set(group_of))
                b.note_owners(owners, idx)
    outputs = []
    out_node = graph_nodes[-1]
    flat_out = list(out_node.args[0]) if isinstance(out_node.args[0], list | tuple) else [out_node.args[0]]
    user_out = set(sig.user_outputs)
    for o in flat_out:
        if isinstance(o, torch.fx.Node) and o.name in user_out and o in b.ir_of:
            outputs.append(b.ir_of[o])
    inputs_ir = [b.ir_of[n] for n in graph_nodes if n.op == "placeholder" and n.name in user_inputs]
    calls = _align_stream(b, stream, root_inputs, inputs_ir)
    return b.nodes, calls, outputs


def _flat_inputs(ep: Any, args: tuple[Any, ...], kwargs: dict[str, Any], n: int) -> list[Any]:
    """The example inputs in the order of the exported program's user inputs (its input tree spec)."""
    import torch.fx._pytree as fx_pytree

    try:
        flat = list(fx_pytree.tree_flatten_spec((tuple(args), dict(kwargs)), ep.call_spec.in_spec))
    except Exception:  # noqa: BLE001 - an input tree the spec does not take: no values kept
        flat = []
    return flat if len(flat) == n else [None] * n


def _body(b: _Builder, ops: list[Any], ref: Callable[[Any], Any]) -> tuple[tuple[Node, ...], dict[Any, int]]:
    """The ops of one call as body nodes (negative indices), refs to body nodes or to main nodes."""
    local: dict[Any, int] = {}

    def bref(x: Any) -> Any:
        if isinstance(x, torch.fx.Node) and x in local:
            return Ref(local[x])
        return ref(x)

    nodes = []
    for op in ops:
        a, kw = map_refs(tuple(op.args), bref), map_refs(dict(op.kwargs), bref)
        target = op.target if op.op == "call_function" else getattr(torch.Tensor, str(op.target), None)
        shape, dtype = _op_shape(op)
        name = canonical_op(op.target)
        idx = b.body_index()
        nodes.append(Node(idx, "fn", name, name, inputs=tuple(refs_in((a, kw))), shape=shape, dtype=dtype,
                          fn=target, args=a, kwargs=kw))
        local[op] = idx
    return tuple(nodes), local


def _op_shape(n: Any) -> tuple[tuple[int, ...] | None, str | None]:
    """Shape and dtype of an exported op (``meta["val"]``) or a traced one (``meta["tensor_meta"]``)."""
    val = n.meta.get("val")
    if val is not None:
        return _shape(val)
    tm = n.meta.get("tensor_meta")
    if tm is not None and hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape), str(tm.dtype).replace("torch.", "")
    return None, None


_PASSTHROUGH = frozenset({"to", "contiguous", "alias", "detach", "clone", "type_as", "lift_fresh_copy"})


def _passthrough(op: Any, inside: set[Any]) -> Any:
    """The outside input of an op that returns it unchanged (same shape and dtype: ``x.to(torch.float32)``
    on float32, ``contiguous``), else None: later uses of its result are uses of that input."""
    if canonical_op(op.target) not in _PASSTHROUGH or not op.args or not isinstance(op.args[0], torch.fx.Node):
        return None
    src = op.args[0]
    if src in inside:
        return None
    if _op_shape(op) != _op_shape(src):
        return None
    return src


def _export_group(b: _Builder, ops: list[Any], path: str, ref: Callable[[Any], Any], grouped: set[Any]) -> int:
    inside = set(ops)
    inputs: list[int] = []
    for op in ops:
        for a in op.all_input_nodes:
            if a in inside:
                continue
            r = ref(a)
            if isinstance(r, Ref) and b.nodes[r.index].op != "const" and r.index not in inputs:
                inputs.append(r.index)
    out = ops[-1]
    used_outside = [op for op in ops if any(u not in inside for u in op.users)]
    passed = {op: src for op in used_outside if (src := _passthrough(op, inside)) is not None}
    for op, src in passed.items():  # x.to(x.dtype) inside a module, used outside: the module's input itself
        if isinstance(ref(src), Ref):
            b.ir_of[op] = ref(src).index
    used_outside = [op for op in used_outside if op not in passed] or used_outside
    if used_outside:  # a module returning several tensors returns the first one made first (cos, sin)
        out = used_outside[0]
    shape, dtype = _op_shape(out)
    module = b.recorded[path]
    body, local = _body(b, ops, ref)
    idx = b.add(Node(0, "call", path, type(module).__name__, inputs=tuple(inputs), module=path,
                     shape=shape, dtype=dtype, body=body, body_out=local[out]))
    for op in ops:
        if op not in passed or not isinstance(ref(passed[op]), Ref):
            b.ir_of[op] = idx
    for op in used_outside:
        oshape, odtype = _op_shape(op)
        if op is not out and oshape is not None:
            b.ir_of[op] = b.add(Node(0, "fn", "output", "output", inputs=(idx,), shape=oshape, dtype=odtype,
                                     args=(Ref(idx), local[op])))
    b.leaf_queue[path].append(idx)
    return idx


def _align_stream(
    b: _Builder,
    stream: list[tuple[str, list[torch.Tensor], torch.Tensor | None]],
    root_inputs: list[torch.Tensor],
    inputs_ir: list[int],
) -> list[int]:
    """Calls in hook order; leaf calls matched to their op groups, op-less calls made aliases."""
    by_id: dict[int, int] = {id(t): i for t, i in zip(root_inputs, inputs_ir)}
    owner_seen: dict[str, int] = defaultdict(int)
    calls: list[int] = []
    for path, ins, out in stream:
        m = b.recorded[path]
        if is_leaf(m) and b.leaf_queue[path]:
            idx = b.leaf_queue[path].popleft()
            calls.append(idx)
            if out is not None:
                by_id[id(out)] = idx
            continue
        if is_leaf(m):
            src = next((by_id[id(t)] for t in ins if id(t) in by_id), None)
        else:
            src = b.owner_output(path, owner_seen[path])
            owner_seen[path] += 1
            if src is None:
                src = next((by_id[id(t)] for t in ins if id(t) in by_id), None)
        shape, dtype = _shape(out)
        idx = b.add(Node(0, "alias", path, type(m).__name__, inputs=(src,) if src is not None else (),
                         module=path, shape=shape, dtype=dtype))
        calls.append(idx)
        if out is not None and src is not None:
            by_id[id(out)] = src
    leftover = sorted(i for q in b.leaf_queue.values() for i in q)
    calls += leftover
    _name_calls(b.nodes, calls)
    return calls


def _name_calls(nodes: list[Node], calls: list[int]) -> None:
    count: dict[str, int] = {}
    for i in calls:
        nodes[i].name = call_name(nodes[i].module or "", count)


# ---- fx -------------------------------------------------------------------------------------------------
def _positional(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
    if not kwargs:
        return list(args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


def from_fx(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Captured:
    from torch.fx.passes.shape_prop import ShapeProp

    with quiet_torch(f"tracing {type(model).__name__} with fx"):
        gm = torch.fx.symbolic_trace(model)
        with torch.no_grad():
            ShapeProp(gm).propagate(*_positional(model, args, kwargs))
    b = _Builder(model)
    graph_nodes = list(gm.graph.nodes)
    order: list[tuple[float, int]] = []
    values = _positional(model, args, kwargs)

    def ref(x: Any) -> Any:
        if isinstance(x, torch.fx.Node):
            return Ref(b.ir_of[x]) if x in b.ir_of else None
        return x

    def meta_shape(n: Any) -> tuple[tuple[int, ...] | None, str | None]:
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            return tuple(int(s) for s in tm.shape), str(tm.dtype).replace("torch.", "")
        return None, None

    group_members: dict[str, list[Any]] = defaultdict(list)
    group_path: dict[str, str] = {}
    for n in graph_nodes:
        if n.op in ("call_function", "call_method"):
            leaf, _ = _scopes(n.meta.get("nn_module_stack"), b.recorded)
            if leaf is not None:
                group_members[leaf[0]].append(n)
                group_path[leaf[0]] = leaf[1]
    grouped = {n: k for k, ns in group_members.items() for n in ns}
    done: set[str] = set()
    for n in graph_nodes:
        shape, dtype = meta_shape(n)
        if n.op == "placeholder":
            k = sum(1 for m in b.nodes if m.op == "input")
            v = values[k] if k < len(values) else None
            b.ir_of[n] = b.add(Node(0, "input", n.name, "input", shape=shape, dtype=dtype,
                                    value=v if isinstance(v, torch.Tensor) else None))
        elif n.op == "get_attr":
            value = _get_attr(model, str(n.target))
            b.ir_of[n] = b.add(Node(0, "const", str(n.target), "const", shape=shape, dtype=dtype, value=value))
        elif n.op == "call_module":
            path = str(n.target)
            m = model.get_submodule(path)
            ins = [r.index for r in (ref(a) for a in n.all_input_nodes) if isinstance(r, Ref)]
            idx = b.add(Node(0, "call", path, type(m).__name__, inputs=tuple(ins), module=path,
                             shape=shape, dtype=dtype))
            b.ir_of[n] = idx
            if path in b.recorded:
                order.append((idx, idx))
            _, owners = _scopes(n.meta.get("nn_module_stack"), b.recorded)
            b.note_owners(owners, idx)
        elif n.op in ("call_function", "call_method"):
            key = grouped.get(n)
            _, owners = _scopes(n.meta.get("nn_module_stack"), b.recorded)
            if key is not None:
                if key in done:
                    continue
                done.add(key)
                idx = _export_group(b, group_members[key], group_path[key], ref, set(grouped))
                b.leaf_queue[group_path[key]].clear()
                order.append((idx, idx))
            else:
                target = n.target if n.op == "call_function" else getattr(torch.Tensor, str(n.target), None)
                name = canonical_op(n.target)
                a, kw = map_refs(tuple(n.args), ref), map_refs(dict(n.kwargs), ref)
                idx = b.add(Node(0, "fn", name, name, inputs=tuple(refs_in((a, kw))), shape=shape,
                                 dtype=dtype, fn=target, args=a, kwargs=kw))
                b.ir_of[n] = idx
            b.note_owners(owners, idx)
    for path, keys in b.owner_last.items():
        for last in keys.values():
            m = b.recorded[path]
            src = b.nodes[last]
            idx = b.add(Node(0, "alias", path, type(m).__name__, inputs=(last,), module=path,
                             shape=src.shape, dtype=src.dtype))
            order.append((last + 0.5, idx))
    calls = [i for _, i in sorted(order)]
    _name_calls(b.nodes, calls)
    out_node = graph_nodes[-1]
    outs = [ref(t) for t in _fx_leaves(out_node.args[0])]
    return b.nodes, calls, [r.index for r in outs if isinstance(r, Ref)]


def _fx_leaves(obj: Any) -> list[Any]:
    found: list[Any] = []

    def visit(o: Any) -> Any:
        if isinstance(o, torch.fx.Node):
            found.append(o)
        return o

    map_refs(obj, visit)
    return found


def _get_attr(model: nn.Module, target: str) -> torch.Tensor | None:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


# ---- hooks ----------------------------------------------------------------------------------------------
class _Recorder(TorchFunctionMode):
    """Records torch functions called outside recorded leaf modules, with tensor-identity data flow."""

    def __init__(self, b: _Builder) -> None:
        super().__init__()
        self.b = b
        self.depth = 0
        self.producer: dict[int, int] = {}
        self.keep: list[Any] = []  # keeps recorded tensors alive so that ids are not reused
        self.active = False

    def node_for(self, t: torch.Tensor) -> int:
        """The IR node of tensor ``t``; an unseen tensor becomes a constant node."""
        if id(t) not in self.producer:
            shape, dtype = _shape(t)
            self.producer[id(t)] = self.b.add(Node(0, "const", "tensor", "const", shape=shape, dtype=dtype,
                                                   value=t.detach()))
            self.keep.append(t)
        return self.producer[id(t)]

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.active or self.depth > 0:
            return out
        ins = _tensors((args, kwargs))
        first = first_tensor(out)
        if first is None or not any(id(t) in self.producer for t in ins):
            return out
        with torch._C.DisableTorchFunction():
            def to_ref(o: Any) -> Any:
                return Ref(self.node_for(o)) if isinstance(o, torch.Tensor) else o

            a, kw = map_refs(tuple(args), to_ref), map_refs(dict(kwargs), to_ref)
            shape, dtype = _shape(first)
            name = canonical_op(func)
            idx = self.b.add(Node(0, "fn", name, name, inputs=tuple(refs_in((a, kw))), shape=shape,
                                  dtype=dtype, fn=func, args=a, kwargs=kw))
            self.producer[id(first)] = idx
            self.keep.append(first)
            if name in MULTI_OUTPUT_OPS and isinstance(out, tuple | list):
                self._pieces(idx, out)
        return out

    def _pieces(self, idx: int, out: tuple[Any, ...] | list[Any]) -> None:
        """Each piece of a split (chunk, unbind) as ``getitem(op, k)``: without it the later pieces read
        as constants and the first as the whole input (GPT-2's fused q, k, v)."""
        for k, piece in enumerate(out):
            if isinstance(piece, torch.Tensor):
                shape, dtype = _shape(piece)
                self.producer[id(piece)] = self.b.add(Node(
                    0, "fn", "getitem", "getitem", inputs=(idx,), shape=shape, dtype=dtype,
                    fn=operator.getitem, args=(Ref(idx), k), kwargs={}))
                self.keep.append(piece)


def from_hooks(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Captured:
    b = _Builder(model)
    rec = _Recorder(b)
    for i, t in enumerate(_tensors((args, kwargs))):
        shape, dtype = _shape(t)
        rec.producer[id(t)] = b.add(Node(0, "input", f"input{i}", "input", shape=shape, dtype=dtype, value=t))
        rec.keep.append(t)
    calls: list[int] = []
    handles = []
    for path, m in b.recorded.items():
        leaf = is_leaf(m)

        def pre(_m: nn.Module, _inp: Any, leaf: bool = leaf) -> None:
            if leaf:
                rec.depth += 1

        def post(_m: nn.Module, inp: Any, out: Any, path: str = path, leaf: bool = leaf) -> None:
            if leaf:
                rec.depth -= 1
            if rec.depth > 0:
                return
            first = first_tensor(out)
            with torch._C.DisableTorchFunction():
                shape, dtype = _shape(first)
                if leaf:
                    ins = tuple(rec.node_for(t) for t in _tensors(inp))
                    idx = b.add(Node(0, "call", path, type(_m).__name__, inputs=ins, module=path,
                                     shape=shape, dtype=dtype))
                    if first is not None:
                        rec.producer[id(first)] = idx
                        rec.keep.append(first)
                else:
                    src = rec.producer.get(id(first)) if first is not None else None
                    idx = b.add(Node(0, "alias", path, type(_m).__name__,
                                     inputs=(src,) if src is not None else (), module=path,
                                     shape=shape, dtype=dtype))
            calls.append(idx)

        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad(), rec:
            rec.active = True
            out = model(*args, **kwargs)
            rec.active = False
    finally:
        for h in handles:
            h.remove()
    _name_calls(b.nodes, calls)
    first = first_tensor(out)
    outputs = [rec.producer[id(first)]] if first is not None and id(first) in rec.producer else []
    return b.nodes, calls, outputs
