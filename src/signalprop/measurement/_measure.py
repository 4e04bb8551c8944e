"""Measure per-layer forward and gradient statistics of any PyTorch model: ``sp.measure(model, inputs)``.

One forward and one backward pass with hooks give one :class:`~signalprop.trace.LayerStats` per module
call. Every statistic is reduced on the model's device into a short row of sums (:mod:`signalprop.stats`),
all rows are concatenated into one tensor and brought to the host with a single transfer; when a
``torch.distributed`` process group is initialized, that tensor is all-reduced first (SUM, plus a MAX for
the extremes), so every rank sees the statistics of the whole, sharded batch. The model is left exactly as
found (:mod:`signalprop._state`), also when its forward raises.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from .._distributed import reduce_rows, world_size
from .._errors import SignalpropError
from .._hooks import internal_run
from .._state import restore_state, save_state
from ..layers import is_weight_layer
from ..stats import CHECK, MAXV, NEGMIN, NONFINITE, SUM, SUMSQ, histogram_from_counts, stats_from_sums
from ..trace import LayerStats, Stats, Trace
from ._recorder import PassOptions, Recorder, first_float_tensor

ModuleFilter = Collection[str | type] | str | type | Callable[[str, nn.Module], bool] | None
Inputs = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]

__all__ = ["measure", "select_modules"]


def measure(
    model: nn.Module,
    inputs: Inputs,
    *,
    backward: bool = True,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    modules: ModuleFilter = None,
    histograms: bool = False,
    hist_bins: int = 60,
    seed: int = 0,
    distributed: bool | None = None,
) -> Trace:
    """Forward (and backward) statistics of every module call of ``model`` on ``inputs``, as a Trace.

    Parameters
    ----------
    model:
        Any ``nn.Module``, in train or eval mode, on any device, frozen or not, under ``torch.autocast`` or
        not (each layer's output dtype is recorded in ``LayerStats.dtype``).
    inputs:
        A tensor (``model(x)``), a tuple or list (``model(*inputs)``) or a dict (``model(**inputs)``,
        e.g. a transformers tokenizer output).
    backward:
        Also record ``bwd``: statistics of the gradient with respect to each module's output.
    loss_fn:
        ``loss_fn(output) -> scalar tensor`` to differentiate. Without it the backward pass starts from a
        standard-normal cotangent on the model's output (its first floating-point tensor), drawn from a
        generator seeded with ``seed``, so that each layer's gradient is a random projection of its
        Jacobian, as in the analyses of He et al. (2015, Sec. 2.2) and Schoenholz et al. (2017).
    modules:
        Which calls to record. Default: every leaf module and every module that owns parameters
        directly. A collection of qualified names (a name also selects everything under it) and/or module
        types, one name or type, or a predicate ``f(name, module) -> bool``, narrows that set.
    histograms:
        Also record a histogram of each output and output gradient (``hist_bins`` equal bins between its
        smallest and largest value), as in Glorot & Bengio (2010, Fig. 6). Costs one more pass.
    seed:
        Seed of the cotangent's generator (torch's global RNG is restored afterwards either way).
    distributed:
        ``None`` (default): reduce across ranks when a ``torch.distributed`` process group is initialized.
        ``False``: this process's batch only. Every rank must run the same model on batches of the same
        shape (as DistributedDataParallel does); the cotangent of rank r is rows ``r*B:(r+1)*B`` of the one
        a single process would draw for the concatenated batch, so the result equals a single-process
        measurement of that batch (for a ``loss_fn``, gradients scale as each rank's loss does).

    Returns
    -------
    Trace with one LayerStats per module call, in the order the calls start (a module that owns parameters
    and has children comes before its children). Names are those of ``named_modules()``; the k-th reuse of
    a module is ``name#k`` (k >= 1), with ``meta["call"] = k``. ``fwd`` describes the output (its first
    floating-point tensor, for tuple, dict and ``ModelOutput`` outputs); calls whose output holds none are
    left out. ``bwd`` is None when ``backward=False`` or when the output does not influence the loss.

    Statistics (:class:`~signalprop.trace.Stats`) cover every element: mean, population variance, std,
    rms, absmax, zero_frac, nonfinite_frac, and the per-channel averages ``chan_sq_mean``, ``chan_var``
    of Brock et al. (2021)'s Signal Propagation Plots, with channels on dim 1 for (N, C, ...) and (N, F)
    outputs and on the last dim for 3-D (B, T, C) sequence outputs (dim 1 for outputs of 1-D conv,
    norm and pool layers, and for outputs of the same shape as theirs). ``zero_frac`` of a tensor of
    8192 or more elements per sample is taken over the first 64 of every 64 k elements (k <= 64, at least
    4096 elements per sample; standard error <= 0.008 / sqrt(batch) for independent elements).
    Moments come from a sum and a sum of squares (float32 for float32 outputs, combined in float64), the
    extremes from one ``aminmax``; when some tensor holds inf/nan (or float32 squares overflow, past
    ~1e19), the whole measurement is repeated once with float64 accumulation over the finite elements
    only, so ``nonfinite_frac`` counts the bad elements exactly and the other statistics describe the
    finite ones.

    Raises
    ------
    SignalpropError for bad arguments; whatever the model's forward raises, unchanged (the model is
    restored first).

    Example
    -------
    >>> import signalprop as sp, torch
    >>> trace = sp.measure(sp.models.mlp(depth=3, width=64), torch.randn(32, 64))
    >>> [round(layer.fwd.std, 2) for layer in trace.weight_layers()]  # doctest: +SKIP
    [0.58, 0.24, 0.10, 0.04]
    """
    if not isinstance(model, nn.Module):
        raise SignalpropError(
            f"measure needs an nn.Module, got {type(model).__name__}; wrap plain functions in a module"
        )
    _check_inputs(inputs)
    if loss_fn is not None and not callable(loss_fn):
        raise SignalpropError(f"loss_fn must be callable (output -> scalar tensor), got {loss_fn!r}")
    if not isinstance(hist_bins, int) or hist_bins < 1:
        raise SignalpropError(f"hist_bins must be a positive integer, got {hist_bins!r}")
    if backward and torch.is_inference_mode_enabled():
        raise SignalpropError(
            "measure(backward=True) cannot differentiate inside torch.inference_mode(); call it outside, "
            "or pass backward=False for forward statistics only"
        )
    selected = select_modules(model, modules)
    group_size = world_size(distributed)

    state = save_state(model)
    passes = 1
    try:
        rec = _run_pass(model, inputs, selected, PassOptions(), backward, loss_fn, seed, group_size)
        rows = _gather_rows(rec, group_size)
        if not all(_row_finite(r) for r in rows):
            restore_state(state)
            passes += 1
            rec = _run_pass(model, inputs, selected, PassOptions(careful=True), backward, loss_fn, seed, group_size)
            rows = _gather_rows(rec, group_size)
        hists: dict[tuple[int, str], Any] = {}
        if histograms:
            restore_state(state)
            passes += 1
            hists = _histogram_pass(model, inputs, selected, rec, rows, backward, loss_fn, seed, hist_bins, group_size)
    finally:
        restore_state(state)

    layers = []
    for call in rec.calls:
        if call.fwd is None:
            continue
        fwd = stats_from_sums(rows[call.fwd], hist=hists.get((call.index, "fwd")))
        bwd: Stats | None = None
        if call.bwd is not None:
            bwd = stats_from_sums(rows[call.bwd], hist=hists.get((call.index, "bwd")))
        meta: dict[str, Any] = {"call": call.call, **call.meta}
        if call.channel_dim is not None:
            meta["channel_dim"] = call.channel_dim
        layers.append(
            LayerStats(
                name=call.name,
                kind=type(call.module).__name__,
                fwd=fwd,
                bwd=bwd,
                shape=call.shape,
                dtype=call.dtype,
                weight_layer=is_weight_layer(call.module),
                meta=meta,
            )
        )
    return Trace(layers, source="measured", meta=_trace_meta(model, inputs, backward, loss_fn, seed, passes, group_size, rec))


# ---- module selection ---------------------------------------------------------------------------------
def select_modules(model: nn.Module, modules: ModuleFilter = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs :func:`measure` records: leaves and modules owning parameters directly,
    narrowed by ``modules`` (see :func:`measure`). The root module, when selected, is named ``(root)``."""
    base = [
        (name or "(root)", m)
        for name, m in model.named_modules()
        if next(iter(m.children()), None) is None or any(p is not None for p in m._parameters.values())
    ]
    if modules is None:
        return base
    if callable(modules) and not isinstance(modules, type):
        return [(n, m) for n, m in base if modules(n, m)]
    items: list[Any] = [modules] if isinstance(modules, str | type) else list(modules)
    names = [x for x in items if isinstance(x, str)]
    types = tuple(x for x in items if isinstance(x, type))
    bad = [x for x in items if not isinstance(x, str | type)]
    if bad:
        raise SignalpropError(
            f"modules= accepts qualified names (str), module types, or a predicate f(name, module); got {bad!r}"
        )
    known = {name for name, _ in model.named_modules()} | {"(root)"}
    unknown = [n for n in names if n not in known]
    if unknown:
        sample = ", ".join(sorted(known - {""})[:15])
        raise SignalpropError(
            f"modules= names {unknown} are not in this model; names come from model.named_modules(), "
            f"e.g. {sample}"
        )

    def keep(n: str, m: nn.Module) -> bool:
        return isinstance(m, types) or any(n == x or n.startswith(x + ".") for x in names)

    return [(n, m) for n, m in base if keep(n, m)]


# ---- one pass ----------------------------------------------------------------------------------------
def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, torch.Tensor | tuple | list | Mapping):
        raise SignalpropError(
            f"inputs must be a tensor, a tuple/list of positional arguments or a dict of keyword arguments, "
            f"got {type(inputs).__name__}"
        )


def _prepare(inputs: Inputs, backward: bool) -> tuple[tuple[Any, ...], dict[str, Any], list[torch.Tensor]]:
    """Positional and keyword arguments; floating tensors become fresh graph leaves when differentiating
    (the model gets a non-leaf copy, so in-place ops on its input stay legal; the user's tensors are
    untouched)."""
    leaves: list[torch.Tensor] = []

    def conv(v: Any) -> Any:
        if backward and isinstance(v, torch.Tensor) and v.is_floating_point():
            leaf = v.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf.clone()
        return v

    if isinstance(inputs, torch.Tensor):
        return (conv(inputs),), {}, leaves
    if isinstance(inputs, Mapping):
        return (), {str(k): conv(v) for k, v in inputs.items()}, leaves
    return tuple(conv(v) for v in inputs), {}, leaves


def _run_pass(
    model: nn.Module,
    inputs: Inputs,
    selected: list[tuple[str, nn.Module]],
    opts: PassOptions,
    backward: bool,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    seed: int,
    group_size: int,
) -> Recorder:
    with Recorder(selected, opts, backward) as rec, internal_run():
        args, kwargs, leaves = _prepare(inputs, backward)
        with torch.enable_grad() if backward else torch.no_grad():
            output = model(*args, **kwargs)
            if backward:
                _backward(output, rec, leaves, loss_fn, seed, group_size)
    return rec


def _backward(
    output: Any,
    rec: Recorder,
    leaves: list[torch.Tensor],
    loss_fn: Callable[[Any], torch.Tensor] | None,
    seed: int,
    group_size: int,
) -> None:
    if loss_fn is not None:
        loss = loss_fn(output)
        if not (isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() == 1):
            raise SignalpropError(
                f"loss_fn must return a scalar floating-point tensor, got "
                f"{type(loss).__name__}{tuple(loss.shape) if isinstance(loss, torch.Tensor) else ''}"
            )
        root, cot = loss.reshape(()), None
    else:
        out = first_float_tensor(output)
        if out is None:
            raise SignalpropError(
                f"the model's output ({type(output).__name__}) holds no floating-point tensor to start the "
                "backward pass from; pass loss_fn=lambda out: <scalar tensor>, or backward=False"
            )
        root, cot = out, _cotangent(out, seed, group_size)
    if not root.requires_grad:
        rec.note = "no gradients: the output does not depend on anything that requires grad"
        return
    targets = rec.grad_inputs(root, leaves)
    if targets:
        torch.autograd.grad(root, targets, grad_outputs=cot, allow_unused=True)


def _cotangent(out: torch.Tensor, seed: int, group_size: int) -> torch.Tensor:
    """Standard normal of ``out``'s shape, seeded; on rank r of w, rows r*B:(r+1)*B of the (w*B, ...) draw."""
    gen = torch.Generator(device=out.device).manual_seed(seed)
    shape = tuple(out.shape)
    if group_size > 1 and out.dim() > 0:
        import torch.distributed as dist

        rank = dist.get_rank()
        full = torch.randn((shape[0] * group_size, *shape[1:]), generator=gen, device=out.device)
        z = full[rank * shape[0] : (rank + 1) * shape[0]]
    else:
        z = torch.randn(shape, generator=gen, device=out.device)
    return z.to(out.dtype)


# ---- collecting, reducing ------------------------------------------------------------------------------
def _gather_rows(rec: Recorder, group_size: int) -> list[list[float]]:
    """Every row of the pass: one device vector, reduced over ranks, one host transfer."""
    vec = rec.batch.device_vector()
    host = reduce_rows(vec, rec.batch.max_positions() if vec.numel() else [], group_size).cpu()
    return rec.batch.rows(host) if vec.numel() else []


def _row_finite(row: list[float]) -> bool:
    return all(math.isfinite(row[i]) for i in (SUM, SUMSQ, CHECK)) and row[NONFINITE] == 0


def _collect_hist(rec: Recorder) -> tuple[torch.Tensor, dict[tuple[int, str], slice]]:
    """Concatenate every histogram of the pass into one tensor; remember where each one sits."""
    parts: list[torch.Tensor] = []
    slots: dict[tuple[int, str], slice] = {}
    pos = 0
    for call in rec.calls:
        for kind in ("fwd", "bwd"):
            t = getattr(call, f"{kind}_hist")
            if t is None:
                continue
            slots[(call.index, kind)] = slice(pos, pos + t.numel())
            pos += t.numel()
            parts.append(t)
    if not parts:
        return torch.zeros(0, dtype=torch.float64), slots
    dev = parts[0].device
    return torch.cat([p.to(dev) for p in parts]), slots


def _histogram_pass(
    model: nn.Module,
    inputs: Inputs,
    selected: list[tuple[str, nn.Module]],
    prev: Recorder,
    rows: list[list[float]],
    backward: bool,
    loss_fn: Callable[[Any], torch.Tensor] | None,
    seed: int,
    bins: int,
    group_size: int,
) -> dict[tuple[int, str], Any]:
    """A second run that bins every output (and gradient) between the extremes the first run found."""

    def ranges(kind: str) -> list[tuple[float, float]]:
        out = []
        for call in prev.calls:
            key = call.fwd if kind == "fwd" else call.bwd
            if key is None:
                out.append((0.0, 1.0))
                continue
            lo, hi = -rows[key][NEGMIN], rows[key][MAXV]
            out.append((lo, hi) if math.isfinite(lo) and math.isfinite(hi) else (0.0, 1.0))
        return out

    opts = PassOptions(hist_bins=bins, fwd_ranges=ranges("fwd"), bwd_ranges=ranges("bwd"))
    rec = _run_pass(model, inputs, selected, opts, backward, loss_fn, seed, group_size)
    vec, hslots = _collect_hist(rec)
    counts = reduce_rows(vec, [], group_size).cpu()
    out: dict[tuple[int, str], Any] = {}
    for key, s in hslots.items():
        lo, hi = (opts.fwd_ranges if key[1] == "fwd" else opts.bwd_ranges)[key[0]]  # type: ignore[index]
        out[key] = histogram_from_counts(counts[s], lo, hi)
    return out


def _shape_of(v: Any) -> Any:
    return list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _trace_meta(
    model: nn.Module,
    inputs: Inputs,
    backward: bool,
    loss_fn: Any,
    seed: int,
    passes: int,
    group_size: int,
    rec: Recorder,
) -> dict[str, Any]:
    if isinstance(inputs, torch.Tensor):
        tensors = [inputs]
        shapes: Any = list(inputs.shape)
    elif isinstance(inputs, Mapping):
        tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor)]
        shapes = {str(k): _shape_of(v) for k, v in inputs.items()}
    else:
        tensors = [v for v in inputs if isinstance(v, torch.Tensor)]
        shapes = [_shape_of(v) for v in inputs]
    first = tensors[0] if tensors else None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else (first.device if first is not None else torch.device("cpu"))
    autocast = None
    if torch.is_autocast_enabled(device.type):
        autocast = str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
    return {
        "input_shape": shapes,
        "input_dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
        "batch_size": int(first.shape[0]) * group_size if first is not None and first.dim() > 0 else None,
        "device": str(device),
        "backward": backward,
        "loss": "loss_fn" if loss_fn is not None else "standard normal cotangent",
        "seed": seed,
        "autocast": autocast,
        "passes": passes,
        "world_size": group_size,
        "calls": len(rec.calls),
        **({"note": rec.note} if rec.note else {}),
    }
