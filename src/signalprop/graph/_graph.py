"""Capture a model's structure once: module calls, the activation after each weight layer, residual joins.

One helper serves ``sp.predict``, ``sp.fix.auto_init_`` and residual detection. Three ways to capture, best
first (DESIGN.md, "Graph capture"):

1. ``torch.export.export(model, args, kwargs, strict=False)``: works on transformers' GPT-2, BERT, ViT and
   ResNet where fx fails; every op carries ``meta["nn_module_stack"]``.
2. ``torch.fx.symbolic_trace``: plain PyTorch models that export rejects.
3. one real forward, recorded with module hooks and a ``TorchFunctionMode``: any model that runs, but only
   along the path this input took (data-dependent branches are frozen), so a :class:`CaptureWarning` says
   it was used and why the others failed.

>>> import signalprop as sp
>>> g = sp.graph.capture(sp.models.mlp(2, 8), input_shape=(8,))
>>> g.method, g.activation_after("0")
('export', 'relu')

The :class:`Graph` is plain data: ``calls`` (qualified names, ``#k`` for the k-th reuse, kinds, weight-layer
flags), ``activations`` (weight-layer call -> the activation that follows it, something
:func:`signalprop.theory.resolve` accepts), ``residuals`` (each skip addition with its branch's weight
layers, last weight layer and last normalization layer), ``method`` and ``failures``. ``nodes`` holds the
op-level graph that ``predict`` walks. Capturing never changes the model: parameters, buffers, the
train/eval flags, ``requires_grad``, hooks and the RNG state are checked afterwards and restored.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from .._hooks import internal_run
from ._types import CaptureWarning, Graph

Inputs = torch.Tensor | tuple[Any, ...] | list[Any] | dict[str, Any]
METHODS = ("export", "fx", "hooks")


# ---- inputs and the model's state ---------------------------------------------------------------------------
def example_inputs(
    model: nn.Module, inputs: Inputs | None = None, input_shape: Sequence[int] | torch.Size | None = None,
    *, batch: int = 2,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) from a tensor, tuple, list or dict of inputs, or from an input shape without batch.

    A shape builds ``torch.randn(batch, *shape)`` (batch 2 by default) on the model's device and dtype.
    """
    if inputs is not None and input_shape is not None:
        raise SignalpropError("pass either example inputs or input_shape, not both")
    if inputs is None and input_shape is None:
        raise SignalpropError(
            "capture needs example inputs (a tensor, a tuple of positional inputs or a dict of keyword "
            "inputs) or input_shape (the shape of one sample, without the batch dimension, e.g. (3, 224, 224))"
        )
    if input_shape is not None:
        shape = _check_shape(input_shape)
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
        gen = torch.Generator(device="cpu").manual_seed(0)
        return (torch.randn((batch, *shape), generator=gen, dtype=dtype).to(device),), {}
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, list | tuple):
        return tuple(inputs), {}
    raise SignalpropError(
        f"inputs must be a tensor, a tuple/list (positional) or a dict (keyword), got {type(inputs).__name__}"
    )


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(int(s) for s in shape)
        ok = all(d >= 1 and d == s for d, s in zip(dims, shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SignalpropError(
            f"input_shape must be a tuple, list or torch.Size of positive ints without the batch dimension "
            f"(e.g. (3, 224, 224) for images, (784,) for vectors), got {shape!r}"
        )
    return dims


def _hook_dicts(m: nn.Module) -> list[dict[Any, Any]]:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
             "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
             "_load_state_dict_pre_hooks")
    return [getattr(m, n) for n in names if isinstance(getattr(m, n, None), dict)]


@contextlib.contextmanager
def preserved(model: nn.Module, *, clone_params: bool = True) -> Iterator[None]:
    """Restore everything capture could touch: tensors' values, modes, requires_grad, hooks, RNG state, and
    the attributes a module gained (a model that installs hooks on its first forward and marks itself
    done, as transformers' output capture does, would otherwise be left marked with its hooks removed).

    Buffers (BatchNorm statistics: small) are always copied. Parameters are copied only with
    ``clone_params=True``, for the methods that run the real forward (fx's shape propagation, hooks): a
    forward may write its own parameters in place. ``torch.export`` (non-strict) traces with fake tensors
    in place of parameters and buffers, so the real ones are never written; there, each parameter's
    version counter (bumped by every in-place write) and storage pointer are checked instead of a copy,
    which on AlexNet saves about 2 s (61 M parameters copied and compared).
    """
    params = list(model.parameters())
    buffers = list(model.buffers())
    stamps = [(p, p._version, p.data_ptr(), p.shape) for p in params]
    tensors = [(t, t.detach().clone()) for t in (params if clone_params else []) + buffers]
    grads = [(p, p.grad) for p in params]
    flags = [(m, m.training) for m in model.modules()]
    req = [(p, p.requires_grad) for p in params]
    hooks = [(d, dict(d)) for m in model.modules() for d in _hook_dicts(m)]
    attrs = [(m, set(vars(m))) for m in model.modules()]
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for t, saved in tensors:
                if t.shape != saved.shape or not torch.equal(t, saved):
                    t.data = saved
        for p, g in grads:
            p.grad = g
        for m, f in flags:
            m.training = f
        for p, r in req:
            p.requires_grad_(r)
        for d, saved_d in hooks:
            if d.keys() != saved_d.keys():
                d.clear()
                d.update(saved_d)
        for m, keys in attrs:  # flags a forward set beside the hooks it added (transformers' output capture)
            for k in set(vars(m)) - keys:
                delattr(m, k)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    if not clone_params:
        changed = [i for i, (p, v, ptr, shape) in enumerate(stamps)
                   if p._version != v or p.data_ptr() != ptr or p.shape != shape]
        if changed:
            raise SignalpropError(
                f"capture found {len(changed)} parameter(s) written in place while tracing without copies; "
                "capture again with methods=('fx', 'hooks'), which copy and restore parameters"
            )


# ---- capture ---------------------------------------------------------------------------------------------
def capture(
    model: nn.Module,
    inputs: Inputs | None = None,
    *,
    input_shape: Sequence[int] | torch.Size | None = None,
    methods: Sequence[str] = METHODS,
) -> Graph:
    """Capture ``model``'s graph from example ``inputs`` (tensor | tuple | dict) or ``input_shape``.

    ``input_shape`` excludes the batch dimension; a batch of 2 standard-normal samples is built from it.
    Methods are tried in the order given (default export, fx, hooks); a :class:`CaptureWarning` names the
    method used when it is not the first, with each failure's reason (also in ``graph.failures``).
    Raises :class:`SignalpropError` when every method fails (the model's forward itself raises).
    """
    from . import _analysis as _graph_analysis
    from . import _capture as _graph_capture

    if not isinstance(model, nn.Module):
        raise SignalpropError(f"capture needs an nn.Module, got {type(model).__name__}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SignalpropError(f"unknown capture method(s) {bad or methods!r}; choose from {', '.join(METHODS)}")
    args, kwargs = example_inputs(model, inputs, input_shape)
    backends = {"export": _graph_capture.from_export, "fx": _graph_capture.from_fx,
                "hooks": _graph_capture.from_hooks}
    failures: dict[str, str] = {}
    t0 = time.perf_counter()
    for method in methods:
        try:
            with preserved(model, clone_params=method != "export"), warnings.catch_warnings(), internal_run():
                warnings.simplefilter("ignore")
                nodes, call_idx, outputs = backends[method](model, args, kwargs)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the next method tried
            failures[method] = f"{type(e).__name__}: {_first_line(e)}"
            continue
        if failures:
            why = "; ".join(f"{k} failed ({v})" for k, v in failures.items())
            warnings.warn(
                f"captured {type(model).__name__} with {method} because {why}"
                + (". The hook order follows the path this input took through data-dependent branches."
                   if method == "hooks" else ""),
                CaptureWarning,
                stacklevel=2,
            )
        graph = _graph_analysis.build(model, nodes, call_idx, outputs, method, failures)
        graph.seconds = time.perf_counter() - t0
        return graph
    raise SignalpropError(
        f"could not capture {type(model).__name__}: "
        + "; ".join(f"{k}: {v}" for k, v in failures.items())
        + ". The hooks method runs the model once: check that the inputs fit its forward."
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]
