"""Capture a model's structure once: module calls, the activation after each weight layer, residual joins.

One helper serves ``sp.predict``, ``sp.fix.auto_init_`` and residual detection. Three ways to capture, best
first (docs/design.md, "Graph capture: export first"):

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
op-level graph that ``predict`` walks. Capturing never changes the model (:func:`signalprop._state.preserved`:
what a forward writes is put back, random draws come from a generator of its own).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import linecache
import time
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from .._errors import SignalpropError
from .._inputs import Inputs, call_args
from .._state import preserved
from ._types import CaptureWarning, Graph

METHODS = ("export", "fx", "hooks")
"""The capture methods, best first: ``torch.export``, ``torch.fx`` and one recorded forward."""


# ---- inputs and the model's state ---------------------------------------------------------------------------
def example_inputs(
    model: nn.Module, inputs: Inputs | None = None, input_shape: Sequence[int] | torch.Size | None = None,
    *, batch: int = 2,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """(args, kwargs) from a tensor, tuple, list or dict of inputs, or from an input shape without batch.

    A shape builds ``torch.randn(batch, *shape)`` (batch 2 by default) on the model's device and dtype,
    from a generator seeded with 0, so the same shape gives the same inputs.

    Args:
        model: The model the inputs are for (its first parameter gives the device and dtype).
        inputs: A tensor (one positional input), a tuple or list (positional inputs) or a dict (keyword
            inputs, e.g. a tokenizer's output).
        input_shape: The shape of one sample, without the batch dimension; instead of ``inputs``.
        batch: The batch size of inputs built from ``input_shape``.

    Returns:
        ``(args, kwargs)`` to call ``model(*args, **kwargs)`` with.

    Raises:
        SignalpropError: Both or neither of ``inputs`` and ``input_shape`` given, or a bad shape.

    Examples:
        >>> from torch import nn
        >>> args, kwargs = example_inputs(nn.Linear(3, 2), input_shape=(3,))
        >>> args[0].shape, kwargs
        (torch.Size([2, 3]), {})
        >>> example_inputs(nn.Linear(3, 2), {"x": torch.ones(1)})
        ((), {'x': tensor([1.])})
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
    return call_args(inputs)


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


# ---- capture ---------------------------------------------------------------------------------------------
def capture(
    model: nn.Module,
    inputs: Inputs | None = None,
    *,
    input_shape: Sequence[int] | torch.Size | None = None,
    methods: Sequence[str] = METHODS,
) -> Graph:
    """Capture ``model``'s graph from example ``inputs`` (tensor | tuple | dict) or ``input_shape``.

    Methods are tried in the order given (default export, fx, hooks); a :class:`CaptureWarning` names the
    method used when it is not the first, with each failure's reason (also in ``graph.failures``). The
    model is left as it was found: parameters, buffers, mode and torch's random state.

    Args:
        model: Any ``nn.Module``.
        inputs: Example inputs: a tensor, a tuple or list of positional inputs, or a dict of keyword inputs.
        input_shape: Instead of ``inputs``, one sample's shape without the batch dimension; a batch of 2
            standard-normal samples is built from it (:func:`example_inputs`).
        methods: Capture methods to try, in order, from :data:`METHODS`.

    Returns:
        The :class:`Graph`.

    Raises:
        SignalpropError: ``model`` is not a module, a method is unknown, the inputs are missing or bad, or
            every method fails (the model's forward itself raises on these inputs).

    Examples:
        >>> import signalprop as sp
        >>> g = capture(sp.models.mlp(2, 8, act="tanh"), input_shape=(8,), methods=("fx",))
        >>> g.method, g.activation_after("0"), len(g.weight_layers())
        ('fx', 'tanh', 3)
    """
    from . import _analysis as _graph_analysis
    from . import _capture as _graph_capture

    if not isinstance(model, nn.Module):
        raise SignalpropError(f"capture needs an nn.Module, got {type(model).__name__}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise SignalpropError(f"unknown capture method(s) {bad or methods!r}; choose from {', '.join(METHODS)}")
    args, kwargs = example_inputs(model, inputs, input_shape)
    kwargs = _without_cache(model, kwargs)
    backends = {"export": _graph_capture.from_export, "fx": _graph_capture.from_fx,
                "hooks": _graph_capture.from_hooks}
    failures: dict[str, str] = {}
    t0 = time.perf_counter()
    def attempt(method: str) -> Any:
        with preserved(model) as state, state.run(), _fx_sources_dropped(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return backends[method](model, args, kwargs)

    for method in methods:
        try:
            # in a copy of the context: torch's config patches (many per export) each set a ContextVar of
            # their own and never unset it, which would grow this thread's context with every capture
            nodes, call_idx, outputs = contextvars.copy_context().run(attempt, method)
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


def _without_cache(model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``use_cache=False`` for a forward that takes it and was not given it (transformers' decoders): the
    cache object they return beside the tensors makes torch.export refuse the model (Llama fell back to
    the recorded forward, where its rotary embedding is a module predict has no rule for), and one forward
    computes the same activations without it."""
    if "use_cache" in kwargs:
        return kwargs
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return kwargs
    return {**kwargs, "use_cache": False} if "use_cache" in params else kwargs


@contextlib.contextmanager
def _fx_sources_dropped() -> Iterator[None]:
    """Forget the source code of the modules torch.fx generates inside the block.

    torch.fx keeps the source of every module it generates (``torch.fx.graph_module._loader`` and
    ``linecache``) so that tracebacks can show it, for the life of the process; one export makes several
    and capture keeps none of them, so without this each capture would hold on to ~20 objects for good.
    """
    loader = getattr(torch.fx.graph_module, "_loader", None)
    cache = getattr(loader, "eval_cache", None)
    before = set(cache) if isinstance(cache, dict) else None
    try:
        yield
    finally:
        if isinstance(cache, dict) and before is not None:
            for key in [k for k in cache if k not in before]:
                cache.pop(key, None)
                linecache.cache.pop(key, None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else "")[:300]
