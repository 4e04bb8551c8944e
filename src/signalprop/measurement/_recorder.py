"""The hook machinery behind :func:`signalprop.measure`: one forward + backward pass, rows on the device.

A :class:`Recorder` registers a forward pre-hook (to reserve the call's place in execution order) and a
forward hook (to reduce the output at once, before an in-place activation such as
``nn.ReLU(inplace=True)`` overwrites it) on each selected module, and a tensor hook on each output. Tensor
hooks registered before an in-place modification receive the gradient with respect to the value *before*
that modification (PyTorch autograd semantics), so a conv followed by an in-place ReLU gets the gradient
at the conv's output, and the ReLU the gradient at its own. The backward pass is one
``torch.autograd.grad`` towards the inputs only (no weight gradients, no ``.grad`` written).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..stats import RowBatch, tensor_histogram

_CHANNEL_FIRST_3D = (
    nn.Conv1d,
    nn.ConvTranspose1d,
    nn.BatchNorm1d,
    nn.InstanceNorm1d,
    nn.MaxPool1d,
    nn.AvgPool1d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveMaxPool1d,
)
def first_float_tensor(obj: Any) -> torch.Tensor | None:
    """The first floating-point tensor in ``obj``: itself, or depth-first in a tuple, list or dict
    (which covers transformers' ``ModelOutput``, an ordered dict)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    if isinstance(obj, Mapping):
        items: Iterable[Any] = obj.values()
    elif isinstance(obj, tuple | list):
        items = obj
    else:
        return None
    for v in items:
        t = first_float_tensor(v)
        if t is not None:
            return t
    return None


@dataclass
class Call:
    """One recorded module call: where its rows sit, and what the output looked like."""

    name: str
    module: nn.Module
    call: int
    index: int
    fwd: int | None = None
    bwd: int | None = None
    fwd_hist: torch.Tensor | None = None
    bwd_hist: torch.Tensor | None = None
    shape: tuple[int, ...] = ()
    dtype: str = ""
    channel_dim: int | None = None
    node: Any = None
    edge: Any = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassOptions:
    """What one pass computes: fast or careful rows, or histograms over given (lo, hi) ranges per call."""

    careful: bool = False
    hist_bins: int = 0
    fwd_ranges: list[tuple[float, float]] | None = None
    bwd_ranges: list[tuple[float, float]] | None = None


class Recorder:
    """Hooks on the selected modules for one pass; use as a context manager (hooks go on exit)."""

    def __init__(self, selected: list[tuple[str, nn.Module]], opts: PassOptions, backward: bool) -> None:
        self.selected = selected
        self.opts = opts
        self.backward = backward
        self.calls: list[Call] = []
        self.leaves: list[torch.Tensor] = []
        self.batch = RowBatch()
        self.note = ""
        self._pending: dict[int, list[Call]] = {}
        self._counts: dict[int, int] = {}
        self._channel_first_shapes: set[tuple[int, ...]] = set()
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> Recorder:
        try:
            for name, m in self.selected:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(m.register_forward_hook(self._post_hook()))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ---- hooks ----------------------------------------------------------------------------------
    def _pre_hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            k = self._counts.get(id(module), 0)
            self._counts[id(module)] = k + 1
            call = Call(name=name if k == 0 else f"{name}#{k}", module=module, call=k, index=len(self.calls))
            self.calls.append(call)
            self._pending.setdefault(id(module), []).append(call)

        return hook

    def _post_hook(self) -> Callable[..., Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            stack = self._pending.get(id(module))
            if not stack:  # the module was entered before the hooks were registered
                return None
            call = stack.pop()
            out = first_float_tensor(output)
            if out is None:
                call.meta["output"] = "no floating-point tensor"
                return None
            replacement = None
            if (
                self.backward
                and torch.is_grad_enabled()
                and not out.requires_grad
                and isinstance(output, torch.Tensor)
            ):
                # Nothing upstream requires grad (frozen layers fed by integer ids): start the graph here,
                # with a non-leaf copy so that a following in-place op stays legal.
                leaf = out.detach().requires_grad_(True)
                self.leaves.append(leaf)
                out = replacement = leaf.clone()
            self._record_forward(call, module, out)
            return replacement

        return hook

    def _channel_dim(self, module: nn.Module, t: torch.Tensor) -> int | None:
        if t.dim() <= 1:
            return None
        if t.dim() != 3:
            return 1
        shape = tuple(t.shape)
        if isinstance(module, _CHANNEL_FIRST_3D):
            self._channel_first_shapes.add(shape)
            return 1
        return 1 if shape in self._channel_first_shapes else -1

    def _record_forward(self, call: Call, module: nn.Module, out: torch.Tensor) -> None:
        call.shape = tuple(out.shape)
        call.dtype = str(out.dtype).replace("torch.", "")
        call.channel_dim = self._channel_dim(module, out)
        opts = self.opts
        if opts.fwd_ranges is not None:
            lo, hi = opts.fwd_ranges[call.index]
            call.fwd_hist = tensor_histogram(out, bins=opts.hist_bins, lo=lo, hi=hi)
        else:
            call.fwd = self.batch.add(out, channel_dim=call.channel_dim, careful=opts.careful)
        if self.backward and out.requires_grad:
            # Keep the graph edge, never the tensor: holding every output alive would defeat the allocator's
            # reuse of activation buffers (measured: +60% run time on a 50-layer CNN).
            call.node = out.grad_fn
            call.edge = torch.autograd.graph.get_gradient_edge(out)
            out.register_hook(self._grad_hook(call))

    def _grad_hook(self, call: Call) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            opts = self.opts
            if opts.bwd_ranges is not None:
                if call.bwd_hist is None:
                    lo, hi = opts.bwd_ranges[call.index]
                    call.bwd_hist = tensor_histogram(grad, bins=opts.hist_bins, lo=lo, hi=hi)
            elif call.bwd is None:
                call.bwd = self.batch.add(grad, channel_dim=call.channel_dim, careful=opts.careful)

        return hook

    # ---- backward ---------------------------------------------------------------------------------
    def grad_inputs(self, root: torch.Tensor, user_leaves: list[torch.Tensor]) -> list[Any]:
        """The tensors to differentiate with respect to so that every recorded output's hook fires.

        The engine runs a node only when it lies on a path from the root to a requested input. The leaves
        (the inputs, and graph starts made in the forward hook) cover every call downstream of them; a
        call whose output does not lead back to a leaf (a branch computed from parameters alone) is added
        as an input itself. Found with one walk over the autograd graph.
        """
        leaves: list[Any] = [t for t in (*user_leaves, *self.leaves) if t.requires_grad]
        targets = {id(t) for t in leaves}
        if root.grad_fn is None:
            return leaves
        reaches: dict[Any, bool] = {}

        def leads_to_leaf(node: Any) -> bool:
            # iterative post-order DFS: a node reaches a leaf if any child does
            stack: list[tuple[Any, bool]] = [(node, False)]
            while stack:
                n, done = stack.pop()
                if n in reaches and not done:
                    continue
                children = [c for c, _ in n.next_functions if c is not None]
                if done:
                    hit = False
                    var = getattr(n, "variable", None)
                    if var is not None and id(var) in targets:
                        hit = True
                    reaches[n] = hit or any(reaches.get(c, False) for c in children)
                    continue
                reaches[n] = False  # provisional, breaks cycles (there are none in autograd graphs)
                stack.append((n, True))
                stack.extend((c, False) for c in children if c not in reaches)
            return reaches[node]

        leads_to_leaf(root.grad_fn)
        extra: list[Any] = []
        for c in self.calls:
            if c.edge is None:
                continue
            if c.node is None:  # the output is a leaf itself (a parameter passed through an identity)
                extra.append(c.edge)
            elif c.node in reaches and not reaches[c.node]:
                extra.append(c.edge)
        return leaves + extra
