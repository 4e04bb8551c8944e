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
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from .._distributed import gather_sizes, rank, reduce_rows, world_size
from .._errors import SignalpropError
from .._inputs import Inputs, call_args, check_inputs, first_float_tensor, first_tensor
from .._state import ModelState, preserved
from ..layers import is_weight_layer
from ..stats import CHECK, MAXV, NEGMIN, NONFINITE, SUM, SUMSQ, histogram_from_counts, stats_from_sums
from ..trace import LayerStats, Stats, Trace
from ._recorder import PassOptions, Recorder

ModuleFilter = Collection[str | type] | str | type | Callable[[str, nn.Module], bool] | None

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

    Statistics (:class:`~signalprop.trace.Stats`) cover every element: mean, population variance, std, rms,
    absmax, zero_frac, nonfinite_frac, and the per-channel averages ``chan_sq_mean``, ``chan_var`` of Brock et
    al. (2021)'s Signal Propagation Plots, with channels on dim 1 for (N, C, ...) and (N, F) outputs and on
    the last dim for 3-D (B, T, C) sequence outputs (dim 1 for outputs of 1-D conv, norm and pool layers, and
    for outputs of the same shape as theirs). ``zero_frac`` of a tensor of 8192 or more elements per sample is
    taken over the first 64 of every 64 k elements (k <= 64, at least 4096 elements per sample; standard error
    <= 0.008 / sqrt(batch) for independent elements). Moments come from a sum and a sum of squares (float32
    for float32 outputs, combined in float64), the extremes from one ``aminmax``; when some tensor holds
    inf/nan (or float32 squares overflow, past ~1e19), the whole measurement is repeated once with float64
    accumulation over the finite elements only, so ``nonfinite_frac`` counts the bad elements exactly and the
    other statistics describe the finite ones.

    Args:
        model: Any ``nn.Module``, in train or eval mode, on any device, frozen or not, under
            ``torch.autocast`` or not (each layer's output dtype is recorded in ``LayerStats.dtype``).
        inputs: A tensor (``model(x)``), a tuple or list (``model(*inputs)``) or a dict (``model(**inputs)``,
            e.g. a transformers tokenizer output). The model gets copies of the floating-point tensors that
            require no grad, as a training loop's inputs do (a model may mark its own input, as Wav2Vec2 does
            in train mode); the gradient starts at the first modules that read them.
        backward: Also record ``bwd``: statistics of the gradient with respect to each module's output.
        loss_fn: ``loss_fn(output) -> scalar tensor`` to differentiate. Without it the backward pass starts
            from a standard-normal cotangent on the model's output (its first floating-point tensor), drawn
            from a generator seeded with ``seed``, so that each layer's gradient is a random projection of its
            Jacobian, as in the analyses of He et al. (2015, Sec. 2.2) and Schoenholz et al. (2017).
        modules: Which calls to record. Default: every leaf module and every module that owns parameters
            directly. A collection of qualified names (a name also selects everything under it) and/or module
            types, one name or type, or a predicate ``f(name, module) -> bool``, narrows that set.
        histograms: Also record a histogram of each output and output gradient (``hist_bins`` equal bins
            between its smallest and largest value), as in Glorot & Bengio (2010, Fig. 6). Costs one more
            pass.
        hist_bins: The number of histogram bins.
        seed: Seed of the cotangent's generator and of the forward's own random stream (dropout masks,
            layerdrop): a measurement repeats exactly, and torch's global generators are neither used nor
            rewound (:mod:`signalprop._state`).
        distributed: ``None`` (default): reduce across ranks when a ``torch.distributed`` process group is
            initialized. ``False``: this process's batch only. Every rank must run the same model on inputs of
            the same per-sample shape (batch sizes may differ); each rank's cotangent is its own rows of the
            one a single process would draw for the concatenated batch, so the result equals a single-process
            measurement of that batch, and ``meta["batch_size"]`` is the total (for a ``loss_fn``, gradients
            scale as each rank's loss does).

    Returns:
        A Trace with one LayerStats per module call, in the order the calls start (a module that owns parameters
        and has children comes before its children). Names are those of ``named_modules()``; the k-th reuse of
        a module is ``name#k`` (k >= 1), with ``meta["call"] = k``. ``fwd`` describes the output (its first
        floating-point tensor, for tuple, dict and ``ModelOutput`` outputs); calls whose output holds none are
        left out. ``bwd`` is None when ``backward=False``, when the output does not influence the loss, or
        when the output is a view that code after the module overwrote in place (torch runs no hook registered
        on a view before such a write).

    Raises:
        SignalpropError: Bad arguments. Whatever the model's forward raises is raised unchanged, the model
            restored first (every parameter and buffer in place, :func:`signalprop._state.preserved`).

    Examples:
        A ReLU after an identity layer, and ``loss = output.sum()``, so every number is exact:

        >>> import signalprop as sp, torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.eye(4))
        >>> x = torch.tensor([[1.0, -1.0, 2.0, -2.0], [3.0, -3.0, 0.0, 0.0]])
        >>> trace = sp.measure(net, x, loss_fn=lambda out: out.sum())
        >>> trace.names, trace["0"].fwd.var, trace["0"].weight_layer
        (['0', '1'], 3.5, True)
        >>> relu = trace["1"].fwd
        >>> relu.mean, relu.zero_frac, relu.absmax
        (0.75, 0.625, 3.0)
        >>> trace["0"].bwd.mean, trace["1"].bwd.std  # ReLU passes the gradient where its input is > 0
        (0.375, 0.0)
    """
    if not isinstance(model, nn.Module):
        raise SignalpropError(
            f"measure needs an nn.Module, got {type(model).__name__}; wrap plain functions in a module"
        )
    check_inputs(inputs)
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

    run = _Run(model, inputs, selected, backward, loss_fn, seed, group_size)
    with preserved(model) as state:
        rec, rows = run.rows(state, PassOptions())
        passes = 1
        if not all(_row_finite(r) for r in rows):
            state.restore()
            passes += 1
            rec, rows = run.rows(state, PassOptions(careful=True))
        hists: dict[tuple[int, str], Any] = {}
        if histograms:
            state.restore()
            passes += 1
            hists = _histogram_pass(run, state, rec, rows, hist_bins)

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
    meta = _trace_meta(model, inputs, backward, loss_fn, seed, passes, group_size, rec, run.batch_total)
    return Trace(layers, source="measured", meta=meta)


# ---- module selection ---------------------------------------------------------------------------------
def select_modules(model: nn.Module, modules: ModuleFilter = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs :func:`measure` records: leaves and modules owning parameters directly.

    Args:
        model: The model.
        modules: Narrows that set: qualified names (a name also selects everything under it) and/or module
            types, one name or type, or a predicate ``f(name, module) -> bool``; None keeps all of it.

    Returns:
        The pairs in ``named_modules()`` order; the root module, when selected, is named ``(root)``.

    Raises:
        SignalpropError: A name that is not in the model, or an entry that is neither a name nor a type.

    Examples:
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 1)))
        >>> [name for name, _ in select_modules(net)]
        ['0', '1.0', '1.1']
        >>> [name for name, _ in select_modules(net, ["1"])], [name for name, _ in select_modules(net, nn.Linear)]
        (['1.0', '1.1'], ['0', '1.1'])
    """
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
class _Run:
    """What every pass of one measurement shares: the model, its inputs, what to record and how."""

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        selected: list[tuple[str, nn.Module]],
        backward: bool,
        loss_fn: Callable[[Any], torch.Tensor] | None,
        seed: int,
        group_size: int,
    ) -> None:
        self.model, self.inputs, self.selected = model, inputs, selected
        self.backward, self.loss_fn, self.seed, self.group_size = backward, loss_fn, seed, group_size
        # dropout masks: a stream of this rank's own, the same in every pass (and in diagnose's probe)
        self.forward_seed = seed if group_size <= 1 else seed + 1_000_003 * rank()
        self.batch_total: int | None = None
        self.private_weights = False

    def recorder(self, state: ModelState, opts: PassOptions) -> Recorder:
        """:meth:`_pass`; when another thread writes the weights between its forward and backward (an
        optimizer step), the pass is run again on private copies of them (taken at first use), and so are
        the passes that follow."""
        try:
            return self._pass(state, opts)
        except _WeightsMoved as moved:
            if self.private_weights:  # not another thread: the model's forward writes what it saved
                raise moved.error from None
            state.restore()
            self.private_weights = True
            try:
                return self._pass(state, opts)
            except _WeightsMoved as again:
                raise again.error from None

    def _pass(self, state: ModelState, opts: PassOptions) -> Recorder:
        """One forward (and backward) pass with hooks, on a private copy of the inputs: leaves that
        require no grad, so the model's own code may mark them (Wav2Vec2 sets ``requires_grad`` on a view
        of its input); the recorder starts the graph at the first modules that read them."""
        versions = [(p, p._version) for p in self.model.parameters()]
        with Recorder(self.selected, opts, self.backward) as rec:
            args, kwargs = call_args(self.inputs, copy=True)
            grad = torch.enable_grad() if self.backward else torch.no_grad()
            with state.run(seed=self.forward_seed, private_weights=self.private_weights), grad:
                output = self.model(*args, **kwargs)
                if self.backward:
                    try:
                        _backward(output, rec, self.loss_fn, self.seed, self.group_size)
                    except RuntimeError as exc:
                        written = [p for p, v in versions if p._version != v]
                        if written and "modified by an inplace operation" in str(exc):
                            raise _WeightsMoved(exc) from exc
                        raise
        return rec

    def rows(self, state: ModelState, opts: PassOptions) -> tuple[Recorder, list[list[float]]]:
        """A pass and its rows: one device vector, reduced over ranks, one host transfer."""
        rec = self.recorder(state, opts)
        vec = rec.batch.device_vector()
        max_positions = rec.batch.max_positions() if vec.numel() else []
        if self.group_size > 1:
            # the batch sizes ride along in the same reduction: ranks may hold uneven batches
            x = first_tensor(self.inputs)
            local = float(x.shape[0]) if x is not None and x.dim() > 0 else 0.0
            vec = torch.cat([vec.to(torch.float64), torch.tensor([local], dtype=torch.float64, device=vec.device)])
        host = reduce_rows(vec, max_positions, self.group_size).cpu()
        if self.group_size > 1:
            self.batch_total = int(host[-1]) if first_tensor(self.inputs) is not None else None
            host = host[:-1]
        return rec, (rec.batch.rows(host) if host.numel() else [])


class _WeightsMoved(Exception):
    """Parameters were written in place between a pass's forward and its backward (by another thread, or by
    the model itself); ``error`` is autograd's."""

    def __init__(self, error: RuntimeError) -> None:
        super().__init__(str(error))
        self.error = error


def _backward(
    output: Any,
    rec: Recorder,
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
    targets = rec.grad_inputs(root)
    if targets:
        torch.autograd.grad(root, targets, grad_outputs=cot, allow_unused=True)


def _cotangent(out: torch.Tensor, seed: int, group_size: int) -> torch.Tensor:
    """Standard normal of ``out``'s shape, seeded; on rank r, the rows of the draw for the concatenated
    batch that rank r holds (ranks may hold uneven batches: their sizes are gathered first)."""
    gen = torch.Generator(device=out.device).manual_seed(seed)
    shape = tuple(out.shape)
    if group_size > 1 and out.dim() > 0:
        sizes = gather_sizes(shape[0], out.device, group_size)
        start = sum(sizes[: rank()])
        full = torch.randn((sum(sizes), *shape[1:]), generator=gen, device=out.device)
        z = full[start : start + shape[0]]
    else:
        z = torch.randn(shape, generator=gen, device=out.device)
    return z.to(out.dtype)


# ---- collecting, reducing ------------------------------------------------------------------------------
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
    run: _Run, state: ModelState, prev: Recorder, rows: list[list[float]], bins: int
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
    rec = run.recorder(state, opts)
    vec, hslots = _collect_hist(rec)
    counts = reduce_rows(vec, [], run.group_size).cpu()
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
    batch_total: int | None,
) -> dict[str, Any]:
    args, kwargs = call_args(inputs)
    shapes: Any = (
        list(inputs.shape) if isinstance(inputs, torch.Tensor)
        else {k: _shape_of(v) for k, v in kwargs.items()} if kwargs or not args
        else [_shape_of(v) for v in args]
    )
    first = first_tensor(inputs)
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else (first.device if first is not None else torch.device("cpu"))
    autocast = None
    if torch.is_autocast_enabled(device.type):
        autocast = str(torch.get_autocast_dtype(device.type)).replace("torch.", "")
    return {
        "input_shape": shapes,
        "input_dtype": str(first.dtype).replace("torch.", "") if first is not None else None,
        "batch_size": batch_total if batch_total is not None
        else (int(first.shape[0]) if first is not None and first.dim() > 0 else None),
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
