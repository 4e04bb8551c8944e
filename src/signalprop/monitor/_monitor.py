"""Watch per-layer signal statistics while a model trains: ``with sp.Monitor(model) as mon: ... mon.step()``.

Every ``every``-th training step the Monitor records, for every module call, statistics of the output and
of the gradient with respect to it (the same :class:`~signalprop.trace.Trace` schema as
:func:`signalprop.measure`), and for every parameter its norm, its gradient's norm and the update-to-weight
ratio ``||w_t - w_{t-1}|| / ||w_{t-1}||`` (the quantity Karpathy's "update / data ratio" heuristic watches,
about 1e-3 for a healthy SGD run). It is built to stay on in real training runs:

- **Where the cost goes** (DESIGN.md, "Monitor's cost"): exact statistics over every element of the 86
  tensors of a 20-layer CNN step cost 1.23-1.29x, each full-size temporary about 0.7 ms. So the Monitor
  takes the moments from a **fixed-size sample**, the leading samples of the batch holding at least
  ``sample`` elements (16384 by default; every k-th row of one sample where one alone holds twice that,
  :func:`~signalprop.monitor._sums.sample_of`), accumulated in float64, and reads the whole tensor once, for a
  single sum that proves every element finite (:mod:`signalprop.monitor._sums`). ``sample=None`` gives exact
  statistics over every element at the higher cost. Inside a training step each small device operation
  costs 10-25 us (dispatch and cold caches after a large convolution), so a hook does two things per tensor:
  it copies the sample into a slot of a persistent float64 buffer shared by all tensors of that layout, and
  takes the full sum. The buffers are reduced in six batched operations per layout when they fill and when
  the step closes (:mod:`signalprop.monitor._batch`), with the same numbers as reducing each sample alone.
- **One read of each activation, or none**: the output of a module that cannot turn finite values into
  inf/nan (ReLU, GELU, tanh, sigmoid, max pooling, flatten, ...; the exact classes in
  ``signalprop.monitor._sums._FINITE_PRESERVING``) whose input is the very tensor an earlier call of the
  step checked, unchanged since (same object, same version counter), takes no full sum of its own: it is
  finite exactly when that input was (unless another hook, the module's own or a global one, could change
  its input or output: it is then checked on its own). If the input was not finite the output is reported as not finite too
  (everything downstream inherits it), although a ReLU may have mapped a lone -inf to 0. A ReLU or ReLU6
  output read that way takes no sample copy either: its sample is its input's sample clamped, at the same
  positions (exactly: the bounds 0 and 6 are exact in every float type), filled in the float64 buffer when
  it is reduced, one clamp for all such pairs of a buffer (:meth:`~signalprop.monitor._batch.PrefixBatch.derive`).
- **Output gradients checked by their bias**: the gradient reaching the bias of a Linear, ConvNd,
  ConvTransposeNd, BatchNorm, LayerNorm or GroupNorm from one call is the output gradient summed over every
  dimension but the channel (``dL/db_c = sum_{n,h,w} dL/dy_{n,c,h,w}``), and a sum holds inf/nan whenever an
  addend does. So a hook on the bias (registered on entry, removed on exit) takes that small gradient as the
  output gradient's non-finite check, in place of a read of the whole tensor (half of a CNN's backward
  reads). It steps aside, and the output gradient takes its own full sum, when the bias gradient may not be
  that one gradient's sum: the module called twice in the step, a bias shared with another module or with a
  gradient hook of its own, another forward hook on the module, a float16 gradient (its sums overflow at
  65504), or no bias gradient arriving (``torch.autograd.grad``). A bias also used outside its module can
  only add non-finite values: the layer is then reported not finite for a gradient its bias received.
- **No per-layer host synchronization**: the hooks leave rows of sums on the device; ``step()`` concatenates
  them with the parameter norms (float64; those of every parameter of up to 64 K elements come from padded
  buffers, four norms of a whole size group in one ``vector_norm``: :mod:`signalprop.monitor._params`) into one tensor and moves it to the host in one transfer (``sync_every``
  recorded steps may share one transfer, at the price of warnings arriving that many steps later), and none
  the other way: element counts, known on the host, stay there and join the transferred numbers on arrival. A step
  with nothing to warn about (every number finite, every sampled absmax far below its dtype's limit) and no
  ``on_record`` or ``tensorboard`` waiting keeps its numbers as one host tensor; its :class:`Record` is built
  when ``history`` is read, which keeps the Python work of building it out of the training step.
- **At once**: the first step and layer whose values are not finite are named in a
  :class:`NonFiniteWarning` from the ``step()`` call that transferred them (``on_nonfinite="raise"`` raises
  instead, to stop the run), and a layer whose absmax comes within 8x of its dtype's largest value gets an
  :class:`OverflowRiskWarning` (diagnose's ``overflow_risk`` rule, run on each recorded trace).
- **torch.distributed**: when a process group is initialized, the layer rows of every rank are combined
  with one ``all_gather`` per recorded step (sums add, extremes take the maximum), so every rank records
  whole-batch statistics. Parameter norms are not reduced: under DistributedDataParallel every rank holds
  the same parameters and (after backward) the same gradients.
- **Mixed precision**: under ``torch.autocast`` each call's output dtype is recorded in
  ``LayerStats.dtype``; bfloat16 and float16 values are reduced in float64.

The model is left as found: the Monitor adds hooks on enter and removes them on exit (also when the block
raises); it writes no parameter, buffer or gradient. Calls made while gradients are disabled (a validation
loop under ``torch.no_grad()``) are not recorded.

Example
-------
>>> import torch, signalprop as sp
>>> model = sp.models.mlp(depth=4, width=64)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
>>> with sp.Monitor(model, every=2) as mon:
...     for _ in range(4):
...         opt.zero_grad()
...         model(torch.randn(32, 64)).pow(2).mean().backward()
...         opt.step()
...         mon.step()
>>> [r.step for r in mon.history]
[0, 2]
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks
from torch.utils.hooks import RemovableHandle

from .._distributed import reduce_rows, world_size
from .._errors import SignalpropError
from ..layers import is_weight_layer
from ..measurement._measure import ModuleFilter, select_modules
from ..measurement._recorder import PassOptions, Recorder, first_float_tensor
from ..stats import CHECK, MAX_POSITIONS, NONFINITE, NUMEL, SUM, SUMSQ, stats_from_sums
from ..trace import Histogram, LayerStats, Stats, Trace
from ._batch import PrefixBatch
from ._params import ParamNorms
from ._record import Event, NonFiniteWarning, OverflowRiskWarning, ParamStats, Record
from ._sums import (
    BIAS_CHECK_DTYPES,
    COMPACT_MAX,
    checking_bias,
    clamp_bounds,
    compact_sums,
    expand_row,
    finite_preserving,
    full_sum,
    histogram_edges,
    standardized_histogram,
    with_full_check,
)

if TYPE_CHECKING:
    from ..diagnosis._diagnose import Finding

__all__ = ["Event", "Monitor", "NonFiniteWarning", "OverflowRiskWarning", "ParamStats", "Record"]

_OVERFLOW_MARGIN = 8.0
"""diagnose's default ``overflow_margin`` (signalprop.diagnosis._rulekit): absmax within 8x of the dtype's largest value."""

DEFAULT_SAMPLE = 16384
"""Elements per tensor the statistics are taken from by default (DESIGN.md: 1.08x per step, std within 10%)."""


class _Call:
    """One module call of a recorded step: its place, and its rows of sums on the device."""

    __slots__ = ("bwd", "bwd_bias", "bwd_check", "bwd_counts", "bwd_hist", "bwd_ticket", "bwd_wait", "channel_dim",
                 "dtype", "fwd", "fwd_check", "fwd_counts", "fwd_derive", "fwd_from", "fwd_hist", "fwd_ticket",
                 "index", "kind", "name", "shape", "weight_layer")

    def __init__(self, name: str, kind: str, weight_layer: bool, index: int) -> None:
        self.name = name
        self.kind = kind
        self.weight_layer = weight_layer
        self.index = index
        self.fwd: torch.Tensor | None = None
        self.bwd: torch.Tensor | None = None
        self.fwd_hist: torch.Tensor | None = None
        self.bwd_hist: torch.Tensor | None = None
        self.fwd_check: torch.Tensor | None = None
        self.fwd_counts: tuple[int, int] | None = None
        self.bwd_counts: tuple[int, int] | None = None
        self.bwd_check: torch.Tensor | None = None
        self.bwd_bias: torch.Tensor | None = None
        """The gradient that reached the module's bias from this call: its sum is the output gradient's check."""
        self.bwd_wait: torch.Tensor | None = None
        """The output gradient, held until the bias gradient arrives (full-summed if it never does)."""
        self.fwd_ticket: tuple[int, int] | None = None
        self.bwd_ticket: tuple[int, int] | None = None
        self.fwd_from: int | None = None
        """Index of the earlier call whose full check vouches for this output (see _FINITE_PRESERVING)."""
        self.fwd_derive: tuple[tuple[int, int], float, float | None] | None = None
        """(input's batch ticket, lo, hi): this output is the input clamped, its sample the input's clamped."""
        self.shape: tuple[int, ...] = ()
        self.dtype = ""
        self.channel_dim: int | None = None


@dataclass
class _Pending:
    """A closed, recorded step whose numbers are still on the device."""

    step: int
    calls: list[_Call]
    bwd_order: list[str]
    slots: dict[tuple[int, str], slice]
    n_layer: int
    payload: torch.Tensor | None
    """The step's numbers on the device, until the transfer."""
    meta: dict[str, Any]
    max_index: list[int]
    param_cols: list[tuple[str, int]]
    """Each parameter's name and column in the payload's parameter blocks (see ParamNorms.position)."""
    tail: torch.Tensor | None = None
    """Host numbers that follow the payload once it is on the host (element counts; see _close_step)."""


class Monitor:
    """Record per-layer forward/gradient statistics and per-parameter norms every ``every`` training steps.

    Use it as a context manager and call :meth:`step` once per training step, after ``optimizer.step()``
    and before gradients are zeroed (so that gradient norms and the update are seen). ``history`` holds one
    :class:`Record` per recorded step; :meth:`plot` draws them; ``events`` lists what was warned about.

    Parameters
    ----------
    model:
        The ``nn.Module`` being trained.
    every:
        Record steps ``0, every, 2 * every, ...``; hooks return at once on the other steps.
    sample:
        Elements per tensor to take the statistics from (the leading samples of the batch that hold at least
        this many, or every k-th row of one that holds twice as many or more; see the module docstring);
        ``None`` for exact statistics over every element.
    modules:
        Which module calls to record, as in :func:`signalprop.measure` (default: leaves and modules owning
        parameters directly).
    params:
        Record each parameter's norm, gradient norm and update ratio. The update ratio keeps one copy of
        the trainable parameters (``update_ratio=False`` saves that memory).
    histograms:
        Also bin each recorded tensor's sample (``bins`` bins over mean +- 6 std) into ``Stats.hist``;
        default: when ``tensorboard`` is given.
    tensorboard:
        A ``torch.utils.tensorboard.SummaryWriter``: every record is written there as it reaches the host
        (:func:`signalprop.integrations.tensorboard.log_record`).
    on_record:
        Called with each :class:`Record` as it reaches the host (after the Monitor's own checks), e.g. to log
        it elsewhere.
    sync_every:
        Recorded steps whose numbers travel to the host together (1: each recorded step, warnings at once).
    on_nonfinite:
        ``"warn"`` (a :class:`NonFiniteWarning` naming the first step and layer), ``"raise"`` (a
        SignalpropError from ``step()``, to stop the run) or ``"ignore"``.
    distributed:
        ``None``: combine ranks when a process group is initialized; ``False``: this process only.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every: int = 1,
        sample: int | None = DEFAULT_SAMPLE,
        modules: ModuleFilter = None,
        params: bool = True,
        update_ratio: bool = True,
        histograms: bool | None = None,
        bins: int = 64,
        tensorboard: Any = None,
        on_record: Callable[[Record], None] | None = None,
        sync_every: int = 1,
        on_nonfinite: Literal["warn", "raise", "ignore"] = "warn",
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise SignalpropError(
                f"Monitor needs the nn.Module being trained, got {type(model).__name__}"
            )
        _positive_int("every", every, "record every k-th step; 1 records every step")
        _positive_int("sync_every", sync_every, "how many recorded steps share one host transfer; 1 is the default")
        _positive_int("bins", bins, "histogram bins; 64 is the default")
        if sample is not None:
            _positive_int("sample", sample, f"elements per tensor, e.g. {DEFAULT_SAMPLE}, or None for exact statistics")
        if on_record is not None and not callable(on_record):
            raise SignalpropError(f"on_record must be a function taking a Record, got {on_record!r}")
        if on_nonfinite not in ("warn", "raise", "ignore"):
            raise SignalpropError(f"on_nonfinite must be 'warn', 'raise' or 'ignore', got {on_nonfinite!r}")
        if tensorboard is not None and not callable(getattr(tensorboard, "add_scalar", None)):
            raise SignalpropError(
                f"tensorboard= must be a SummaryWriter (torch.utils.tensorboard), got {type(tensorboard).__name__}"
            )
        self.model = model
        self.every = every
        self.sample = sample
        self.params = params
        self.update_ratio = update_ratio and params
        self.histograms = bool(tensorboard is not None if histograms is None else histograms)
        self.bins = bins
        self.tensorboard = tensorboard
        self.on_record = on_record
        self.sync_every = sync_every
        self.on_nonfinite = on_nonfinite
        self.distributed = distributed
        self.events: list[Event] = []
        self._selected = select_modules(model, modules)
        self._history: list[Record] = []
        self._pending: list[_Pending] = []
        self._unbuilt: list[tuple[_Pending, torch.Tensor]] = []
        self._handles: list[RemovableHandle] = []
        self._step = 0
        self._active = False
        self._recording = False
        self._calls: list[_Call] = []
        self._bwd_order: list[int] = []
        self._counts: dict[int, int] = {}
        self._open: dict[int, list[_Call]] = {}
        self._checked: dict[int, tuple[weakref.ref[torch.Tensor], int, int, tuple[int, int] | None]] = {}
        """id(output) -> (weak reference, version, call index whose full check covers it, the batch ticket of
        its own copied sample or None), this step."""
        self._biases: set[int] = set()
        """id(module) of the modules whose bias gradient checks their output gradient (hooked in start())."""
        self._waiting: dict[int, _Call] = {}
        """id(module) -> the call of this step whose output gradient waits for that module's bias gradient."""
        self._batch = self._new_batch()
        self._shapes = Recorder([], PassOptions(), False)  # measure's channel-dimension rule, shared
        self._param_list: list[tuple[str, nn.Parameter]] = []
        self._param_norms: ParamNorms | None = None
        self._param_cols: list[tuple[str, int]] = []
        self._layout: tuple[dict[tuple[int, str], slice], list[int], list[str]] | None = None
        """The last closed step's slots, max_index and backward order, shared by later steps equal to them."""
        self._nonfinite_seen = False
        self._overflow_seen: set[str] = set()
        self._world = 1

    # ---- context -------------------------------------------------------------------------------------
    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.close(flush=exc_type is None)

    def start(self) -> Monitor:
        """Attach the hooks (what ``with`` does on entry); the step counter continues from earlier runs."""
        if self._active:
            raise SignalpropError("this Monitor is already running; enter it once (with sp.Monitor(model) as mon:)")
        self._world = world_size(self.distributed)
        self._param_list = _unique_params(self.model) if self.params else []
        self._param_norms = ParamNorms([p for _, p in self._param_list], self.update_ratio)
        self._param_cols = [(name, col) for (name, _), col in zip(self._param_list, self._param_norms.position)]
        owners: dict[int, int] = {}
        for m in self.model.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners[id(p)] = owners.get(id(p), 0) + 1
        try:
            for name, m in self._selected:
                self._handles.append(m.register_forward_pre_hook(self._pre_hook(name, m)))
                self._handles.append(m.register_forward_hook(self._post_hook()))
                bias = checking_bias(m, owners)
                if bias is not None:
                    self._handles.append(bias.register_hook(self._bias_hook(id(m))))
                    self._biases.add(id(m))
        except BaseException:
            self._remove_hooks()
            raise
        self._active = True
        self._begin_step()
        return self

    def close(self, *, flush: bool = True) -> None:
        """Remove the hooks (what ``with`` does on exit). A step with recorded calls that ``step()`` did not
        close yet is closed as if it had been; ``flush`` moves pending numbers to the host now (on an
        exception they wait until ``history`` is read, so that the original error is what propagates)."""
        try:
            if self._active and flush and self._calls:
                self._close_step()
        finally:
            self._remove_hooks()
            self._active = self._recording = False
            self._calls, self._bwd_order, self._open, self._counts = [], [], {}, {}
            self._checked, self._waiting = {}, {}
            self._batch = self._new_batch()  # frees the sample buffers; a restarted Monitor allocates new ones
            self._param_norms = None  # frees the parameter buffers
        if flush:
            self._flush()

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._biases.clear()

    # ---- public --------------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The number of the step in progress (0 before the first ``step()`` call)."""
        return self._step

    @property
    def history(self) -> list[Record]:
        """One :class:`Record` per recorded step, oldest first (moves pending numbers to the host first)."""
        self._flush()
        self._build()
        return list(self._history)

    def step(self) -> None:
        """Close the current training step: on a recorded step, reduce the parameter norms, concatenate
        every row and move them to the host (one transfer), check for non-finite values, warn."""
        if not self._active:
            raise SignalpropError(
                "Monitor.step() was called outside the Monitor; use `with sp.Monitor(model) as mon:` (or "
                "mon.start() ... mon.close()) around the training loop"
            )
        closed = self._recording
        if closed:
            self._close_step()
        self._step += 1
        self._begin_step()
        if closed and len(self._pending) >= self.sync_every:
            self._flush()

    def plot(self, path: str | Path, **kwargs: Any) -> Path:
        """Heat maps (layer x step) of log10 std forward and backward and of update ratios, as a PNG.

        See :func:`signalprop.report.training.plot_history` for the options.
        """
        from ..report.training import plot_history

        return plot_history(self.history, path, **kwargs)

    def traces(self) -> Iterator[tuple[int, Trace]]:
        """(step, trace) for each record."""
        for r in self.history:
            yield r.step, r.trace

    # ---- hooks ---------------------------------------------------------------------------------------
    def _begin_step(self) -> None:
        self._recording = self._active and self._step % self.every == 0
        self._calls, self._bwd_order, self._open, self._counts = [], [], {}, {}
        self._checked, self._waiting = {}, {}
        if self._batch is not None:
            self._batch.clear()
        if self._param_norms is not None:
            self._param_norms.begin(self._recording)

    def _pre_hook(self, name: str, module: nn.Module) -> Callable[..., None]:
        kind = type(module).__name__
        weight = is_weight_layer(module)
        preserving = finite_preserving(module)
        bounds = clamp_bounds(module) if preserving else None

        def hook(mod: nn.Module, args: Any) -> None:
            if not self._recording or not torch.is_grad_enabled():
                return
            k = self._counts.get(id(mod), 0)
            self._counts[id(mod)] = k + 1
            call = _Call(name if k == 0 else f"{name}#{k}", kind, weight, len(self._calls))
            # the input's check (and sample) stand for the output only if no other hook may change either
            if preserving and args and isinstance(args[0], torch.Tensor) and not _other_hooks(mod, inputs=True):
                seen = self._checked.get(id(args[0]))
                if seen is not None and seen[0]() is args[0] and seen[1] == args[0]._version:
                    call.fwd_from = seen[2]
                    if bounds is not None and seen[3] is not None:
                        call.fwd_derive = (seen[3], bounds[0], bounds[1])
            self._calls.append(call)
            self._open.setdefault(id(mod), []).append(call)

        return hook

    def _post_hook(self) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, output: Any) -> None:
            stack = self._open.get(id(mod))
            if not stack:
                return
            call = stack.pop()
            out = first_float_tensor(output)
            if out is None:
                call.fwd_from = None
                return
            call.shape = tuple(out.shape)
            call.dtype = str(out.dtype).replace("torch.", "")
            call.channel_dim = self._shapes._channel_dim(mod, out)
            head = self._sums(out, call, "fwd", check=call.fwd_from is None)
            if self.histograms:
                call.fwd_hist = standardized_histogram(head, self.bins)
            whole = call.fwd_counts is None or call.fwd_counts[0] == out.numel()
            if whole:
                call.fwd_from = None  # the sample is the whole tensor: its own row is the check
            # later finite-preserving calls that read this very tensor can reuse its check
            if whole or call.fwd_check is not None or call.fwd_from is not None:
                root = call.fwd_from if call.fwd_from is not None else call.index
                own = call.fwd_ticket if call.fwd_derive is None else None  # (never derive from a derived sample)
                self._checked[id(out)] = (weakref.ref(out), out._version, root, own)
            if out.requires_grad:
                # the bias gradient checks this output's gradient only if nothing but the module made `out`
                biased = id(mod) in self._biases and out is output and not _other_hooks(mod, inputs=False)
                node = out.grad_fn
                if node is not None:  # a hook on the node that made `out` (2 us less than a tensor hook)
                    node.register_prehook(self._grad_hook(call, id(mod) if biased else None, out.output_nr))
                else:  # a leaf output
                    out.register_hook(self._leaf_hook(self._grad_hook(call, None, 0)))

        return hook

    def _grad_hook(
        self, call: _Call, module: int | None, nr: int
    ) -> Callable[[tuple[torch.Tensor | None, ...]], None]:
        """The pre-hook on the autograd node that made one call's output (its output ``nr``): queue that
        output's gradient's sums. ``module`` (the module's id) when the module's bias gradient may stand in
        for the full sum (see :meth:`_bias_hook`). A node's pre-hook sees the gradient with respect to the
        output as it was when the hook was registered, as a tensor hook would (an in-place ReLU after a
        convolution: the convolution's output gradient)."""

        def hook(grads: tuple[torch.Tensor | None, ...]) -> None:
            grad = grads[nr]
            if grad is None:  # the output did not reach the loss
                return
            if call.bwd is not None or call.bwd_ticket is not None or not self._recording:
                if module is not None and call.bwd_wait is not None:  # a second gradient for this output:
                    self._settle(module)  # the bias would sum that one
                return
            # one call of the module so far this step: the bias gradient will be this gradient's sum alone
            biased = module if module is not None and self._counts.get(module) == 1 and (
                grad.dtype in BIAS_CHECK_DTYPES
            ) else None
            head = self._sums(grad, call, "bwd", check=biased is None)
            if biased is not None and call.bwd_counts is not None and call.bwd_counts[0] < grad.numel():
                call.bwd_wait = grad
                self._waiting[biased] = call
            if self.histograms:
                call.bwd_hist = standardized_histogram(head, self.bins)
            self._bwd_order.append(call.index)

        return hook

    @staticmethod
    def _leaf_hook(hook: Callable[[tuple[torch.Tensor | None, ...]], None]) -> Callable[[torch.Tensor], None]:
        """A tensor hook for an output that no node made (a leaf, e.g. an input returned as it is)."""

        def leaf(grad: torch.Tensor) -> None:
            hook((grad,))

        return leaf

    def _bias_hook(self, module: int) -> Callable[[torch.Tensor], None]:
        """The hook on a checking bias (:func:`~signalprop.monitor._sums.checking_bias`): the gradient reaching
        it is the waiting output gradient summed over all but the channel dimension, so it is finite exactly
        when that gradient is, and its few numbers replace one read of the whole output gradient."""

        def hook(grad: torch.Tensor) -> None:
            call = self._waiting.pop(module, None)
            if call is not None:
                call.bwd_bias = grad.detach()
                call.bwd_wait = None

        return hook

    def _settle(self, module: int) -> None:
        """Give the call waiting for ``module``'s bias gradient the full sum of its output gradient instead
        (a call holds ``bwd_wait`` exactly while it is in ``_waiting``)."""
        call = self._waiting.pop(module)
        assert call.bwd_wait is not None
        call.bwd_check = full_sum(call.bwd_wait)
        call.bwd_wait = None

    def _sums(self, t: torch.Tensor, call: _Call, key: str, *, check: bool) -> torch.Tensor:
        """Queue ``t``'s sampled reductions for ``call`` (``key`` "fwd" or "bwd"); return the sample.

        The sample is copied into the step's :class:`~signalprop.monitor._batch.PrefixBatch` (reduced in
        batches at close); histograms, exact statistics (``sample=None``) and samples too large to batch
        take the per-tensor path, :func:`~signalprop.monitor._sums.compact_sums`. ``check=False`` skips the
        full-tensor sum (an earlier call's check vouches for this tensor)."""
        t = t.detach()
        cd = call.channel_dim
        if self._batch is not None:
            ticket = None
            if key == "fwd" and call.fwd_derive is not None:
                ticket = self._batch.derive(t, cd, *call.fwd_derive)
                if ticket is None:
                    call.fwd_derive = None
            if ticket is None:
                ticket = self._batch.add(t, cd)
            if ticket is not None:
                g, i, numel, zero_n, partial = ticket
                setattr(call, key + "_ticket", (g, i))
                setattr(call, key + "_counts", (numel, zero_n))
                setattr(call, key + "_check", full_sum(t) if check and partial else None)
                return t  # (histograms, which need the sample itself, take the per-tensor path)
        row, head, chk, counts = compact_sums(t, cd, self.sample, check=check)
        setattr(call, key, row)
        setattr(call, key + "_counts", counts)
        setattr(call, key + "_check", chk)
        return head

    # ---- closing a step ------------------------------------------------------------------------------
    def _new_batch(self) -> PrefixBatch | None:
        """The store for batched samples; None where every tensor takes the per-tensor path (exact
        statistics, or histograms, which bin each sample itself)."""
        return None if self.sample is None or self.histograms else PrefixBatch(self.sample)

    def _close_step(self) -> None:
        # the batched samples' compact rows: one (n, 4 + C) block per layout
        blocks = self._batch.finish() if self._batch is not None else []
        calls = [c for c in self._calls if c.fwd is not None or c.fwd_ticket is not None]
        parts: list[torch.Tensor] = []
        slots: dict[tuple[int, str], slice] = {}
        pos = 0
        starts = []
        for blk in blocks:
            starts.append(pos)
            parts.append(blk.reshape(-1))
            pos += blk.numel()
        for c in calls:
            for key in ("fwd", "bwd"):
                ticket = getattr(c, key + "_ticket")
                if ticket is not None:
                    width = blocks[ticket[0]].shape[1]
                    start = starts[ticket[0]] + ticket[1] * width
                    slots[(c.index, key)] = slice(start, start + width)
                    continue
                row = getattr(c, key)
                if row is None:
                    continue
                slots[(c.index, key)] = slice(pos, pos + row.numel())
                parts.append(row)
                pos += row.numel()
        max_index = [
            slots[(c.index, key)].start + p
            for c in calls
            for key in ("fwd", "bwd")
            if (c.index, key) in slots
            for p in (MAX_POSITIONS if getattr(c, key + "_counts") is None else COMPACT_MAX)
        ]
        for c in calls:
            for key in ("fwd_hist", "bwd_hist"):
                h = getattr(c, key)
                if h is not None:
                    slots[(c.index, key)] = slice(pos, pos + h.numel())
                    parts.append(h)
                    pos += h.numel()
        # numbers the host knows already: the element counts of compact rows, of sampled tensors and of the
        # outputs whose check an earlier call's vouches for (placed once the device part's length is known)
        host_keys: list[tuple[tuple[int, str], int]] = []
        host_nums: list[float] = []
        for c in calls:
            for key in ("fwd", "bwd"):
                cnt = getattr(c, key + "_counts")
                if cnt is not None and (c.index, key) in slots:
                    host_keys.append(((c.index, key + "_counts"), 2))
                    host_nums.extend(float(x) for x in cnt)
        # full-tensor sums of sampled tensors and the bias gradients that stand in for output gradients' sums:
        # two short blocks, two ops for all calls
        for module in list(self._waiting):  # bias gradients that never arrived (e.g. torch.autograd.grad)
            self._settle(module)
        checks: list[torch.Tensor] = []
        biases: list[tuple[int, torch.Tensor]] = []
        for c in calls:
            for key in ("fwd", "bwd"):
                chk = getattr(c, key + "_check")
                if chk is not None:
                    slots[(c.index, key + "_check")] = slice(pos + len(checks), pos + len(checks) + 1)
                    checks.append(chk)
                elif key == "bwd" and c.bwd_bias is not None:
                    biases.append((c.index, c.bwd_bias.reshape(-1)))
                elif not (key == "fwd" and c.fwd_from is not None):
                    continue
                host_keys.append(((c.index, key + "_numel"), 1))
                host_nums.append(float(math.prod(c.shape)))
        if checks:
            dev0 = checks[0].device
            parts.append(torch.stack([x.to(dev0) for x in checks]).to(torch.float64))
            pos += len(checks)
        if biases:
            dev0 = biases[0][1].device
            for index, b in biases:
                slots[(index, "bwd_bias")] = slice(pos, pos + b.numel())
                pos += b.numel()
            parts.append(torch.cat([b.to(dev0) for _, b in biases]).to(torch.float64))
        dev = _device_of(parts, self._param_list)
        # Alone, the host numbers wait on the host and join the transferred numbers there (after the
        # parameter block): making a device tensor of host data would cost an operation and, on a GPU, a
        # synchronization of its own. Across ranks they travel with the layer rows, to be summed.
        tail: torch.Tensor | None = None
        if self._world > 1 and host_nums:
            parts.append(torch.tensor(host_nums, dtype=torch.float64, device=dev))
            start = pos
            pos += len(host_nums)
        else:
            start = pos + 4 * len(self._param_list)
            tail = torch.tensor(host_nums, dtype=torch.float64) if host_nums else None
        for k, width in host_keys:
            slots[k] = slice(start, start + width)
            start += width
        layer_vec = torch.cat([p.to(dev) for p in parts]) if parts else torch.zeros(0, dtype=torch.float64, device=dev)
        if self._world > 1:
            layer_vec = reduce_rows(layer_vec, max_index, self._world)
        norms = self._param_norms.vector(dev) if self._param_norms is not None else layer_vec[:0]
        payload = torch.cat([layer_vec.to(dev), norms])
        for c in calls:  # the numbers live on in payload; drop the references
            c.fwd = c.bwd = c.fwd_hist = c.bwd_hist = c.fwd_check = c.bwd_check = c.bwd_bias = None
            c.fwd_ticket = c.bwd_ticket = None
        meta = {
            "step": self._step,
            "sample": self.sample,
            "world_size": self._world,
            "autocast": _autocast_dtype(dev),
            "source": "signalprop.Monitor",
        }
        names = {c.index: c.name for c in calls}
        order = [names[i] for i in self._bwd_order if i in names]
        # a step laid out as the one before shares its tables (kept steps then hold little besides numbers)
        last = self._layout
        if last is not None and last[0] == slots and last[1] == max_index and last[2] == order:
            slots, max_index, order = last
        self._layout = (slots, max_index, order)
        self._pending.append(_Pending(self._step, calls, order, slots, pos, payload, meta, max_index, self._param_cols, tail))
        self._calls, self._bwd_order, self._open, self._checked, self._waiting = [], [], {}, {}, {}

    # ---- on the host ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        payloads: list[torch.Tensor] = []
        for p in pending:
            assert p.payload is not None  # (a step's payload is dropped only once it has been transferred)
            payloads.append(p.payload)
        host = torch.cat(payloads).cpu()  # the one host transfer
        pos = 0
        error: str | None = None
        for p, payload in zip(pending, payloads):
            n = payload.numel()
            part = host[pos : pos + n]
            pos += n
            if p.tail is not None:
                part = torch.cat([part, p.tail])
            p.payload = p.tail = None  # (kept steps hold their host numbers only)
            if self._quiet(p, part):
                self._unbuilt.append((p, part))  # nothing to warn about: build the Record when it is read
                continue
            self._build()
            error = self._ingest(p, part.tolist()) or error
        if error is not None:
            raise SignalpropError(error)

    def _quiet(self, p: _Pending, part: torch.Tensor) -> bool:
        """True when a step's host numbers can hold nothing to warn about and nobody waits for its Record.

        Every layer number and every parameter and gradient norm finite means no non-finite event; the
        largest sampled absmax below the smallest overflow limit (diagnose's ``overflow_margin``, 8x) of the
        step's dtypes means no overflow_risk event. Building the Record (Python objects for every call) then
        waits until ``history`` is read, which keeps it out of the training step."""
        if self.on_record is not None or self.tensorboard is not None:
            return False
        host = part.numpy()  # a few thousand host numbers: numpy answers in microseconds, torch in ~0.3 ms here
        checked = host[: p.n_layer + 2 * len(p.param_cols)]  # layer rows, parameter norms, grad norms
        if not bool(np.isfinite(checked).all()):
            return False
        if not p.max_index:
            return True
        try:
            limit = min(float(torch.finfo(getattr(torch, c.dtype)).max) for c in p.calls) / _OVERFLOW_MARGIN
        except (AttributeError, TypeError, ValueError):
            return False
        return float(host[p.max_index].max()) < limit

    def _build(self) -> None:
        """Build the Records of quiet steps (oldest first), so that history keeps step order."""
        unbuilt, self._unbuilt = self._unbuilt, []
        for p, part in unbuilt:
            self._ingest(p, part.tolist())

    def _ingest(self, p: _Pending, vals: list[float]) -> str | None:
        """Build the Record of one pending step, keep it, warn; return the error text for on_nonfinite='raise'."""
        layers: list[LayerStats] = []
        finite: dict[int, bool] = {}  # call index -> its output is finite (for calls whose check it vouches)
        for c in p.calls:
            vouch = None if c.fwd_from is None else (0.0 if finite.get(c.fwd_from, False) else math.nan)
            fwd = self._stats(vals, p.slots, c.index, "fwd", vouch)
            assert fwd is not None
            finite[c.index] = fwd.finite
            meta: dict[str, Any] = {"call": int(c.name.rsplit("#", 1)[1]) if "#" in c.name else 0}
            if c.channel_dim is not None:
                meta["channel_dim"] = c.channel_dim
            layers.append(LayerStats(
                name=c.name, kind=c.kind, fwd=fwd, bwd=self._stats(vals, p.slots, c.index, "bwd"),
                shape=c.shape, dtype=c.dtype, weight_layer=c.weight_layer, meta=meta,
            ))
        trace = Trace(layers, source="measured", meta=p.meta)
        params: dict[str, ParamStats] = {}
        k = len(p.param_cols)
        base = p.n_layer
        for name, col in p.param_cols:
            norm, grad, upd, prev = (vals[base + j * k + col] for j in range(4))
            ratio = upd / prev if prev > 0 else (0.0 if upd == 0 else math.inf if math.isfinite(upd) else upd)
            has_grad = grad != -1.0
            params[name] = ParamStats(norm, grad if has_grad else math.nan, ratio, has_grad)
        record = Record(p.step, trace, params)
        self._history.append(record)
        if self.tensorboard is not None:
            from ..integrations.tensorboard import log_record

            log_record(self.tensorboard, record)
        error = self._check(record, p.bwd_order)
        if self.on_record is not None:
            self.on_record(record)
        return error

    def _stats(
        self, vals: list[float], slots: dict[tuple[int, str], slice], index: int, key: str,
        vouch: float | None = None,
    ) -> Stats | None:
        """The Stats of one call's output (``key`` "fwd") or output gradient ("bwd") from the host numbers.

        ``vouch`` is the full-tensor check (0.0 finite, nan not) of the earlier call whose output this
        call's finite-preserving module read; it stands in for a full sum this call did not take."""
        s = slots.get((index, key))
        if s is None:
            return None
        row = vals[s]
        nz = slots.get((index, key + "_counts"))  # a compact row: its (moment, zero-sample) counts, rank-summed
        if nz is not None:
            row = expand_row(row, (int(vals[nz.start]), int(vals[nz.start + 1])))
        chk, cnt = slots.get((index, key + "_check")), slots.get((index, key + "_numel"))
        bias = slots.get((index, key + "_bias"))  # the bias gradient: finite exactly when the output gradient is
        if chk is not None and cnt is not None:
            row = with_full_check(row, vals[chk.start], vals[cnt.start])
        elif bias is not None and cnt is not None:
            row = with_full_check(row, math.fsum(vals[bias]) if all(map(math.isfinite, vals[bias])) else math.nan,
                                  vals[cnt.start])
        elif cnt is not None and vouch is not None:
            row = with_full_check(row, vouch, vals[cnt.start])
        bad_full = not math.isfinite(row[CHECK])
        bad_sample = not (math.isfinite(row[SUM]) and math.isfinite(row[SUMSQ]))
        hist = None
        h = slots.get((index, key + "_hist"))
        if not bad_sample and h is not None:
            n = max(row[1], 1.0)
            mean = row[SUM] / n
            std = math.sqrt(max(row[SUMSQ] / n - mean * mean, 0.0))
            counts = vals[h]
            hist = Histogram(histogram_edges(mean, std, len(counts)), tuple(int(round(x)) for x in counts))
        if not (bad_full or bad_sample):
            return stats_from_sums(row, hist=hist)
        # Non-finite somewhere: the moments stand if the sample was finite; the count is only known to be
        # at least one (a sum cannot count), so nonfinite_frac is that lower bound, 1 / numel.
        fixed = list(row)
        if not bad_sample:
            fixed[CHECK] = fixed[SUM]
        st = stats_from_sums(fixed, hist=hist)
        numel = max(row[NUMEL], 1.0)
        frac = max(row[NONFINITE] / numel, 1.0 / numel)
        return replace(st, nonfinite_frac=frac)

    def _check(self, record: Record, bwd_order: list[str]) -> str | None:
        error = None
        if not self._nonfinite_seen:
            hit = _first_nonfinite(record, bwd_order)
            if hit is not None:
                self._nonfinite_seen = True
                layer, where = hit
                what = {
                    "forward": "its output",
                    "backward": "the gradient with respect to its output",
                    "parameter": "the parameter itself",
                    "gradient": "the parameter's gradient",
                }[where]
                msg = (
                    f"signalprop.Monitor: first non-finite value at step {record.step}, in {layer} "
                    f"({where}: {what} holds inf/nan). Everything downstream inherits it; look at this layer's "
                    "inputs and weights, lower the learning rate or clip gradients, and check the data."
                )
                self.events.append(Event(record.step, "nonfinite", layer, where, msg))
                if self.on_nonfinite == "raise":
                    error = msg
                elif self.on_nonfinite == "warn":
                    warnings.warn(msg, NonFiniteWarning, stacklevel=5)
        for f in _overflow_findings(record.trace):
            if f.layer is None or f.layer in self._overflow_seen:
                continue
            self._overflow_seen.add(f.layer)
            where = "backward" if f.data.get("backward") else "forward"
            msg = f"signalprop.Monitor: step {record.step}: {f.message} Fix: {f.fix}"
            self.events.append(Event(record.step, "overflow_risk", f.layer, where, msg))
            warnings.warn(msg, OverflowRiskWarning, stacklevel=5)
        return error


# ---- helpers ---------------------------------------------------------------------------------------------
def _positive_int(name: str, v: Any, hint: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SignalpropError(f"{name} must be a positive integer, got {v!r} ({hint})")


def _other_hooks(mod: nn.Module, *, inputs: bool) -> bool:
    """True when a hook besides the Monitor's own could change what ``mod`` returns (a forward hook of its
    own or a global one) or, with ``inputs``, what it reads (a pre-hook of its own or a global one)."""
    if len(mod._forward_hooks) != 1 or _global_forward_hooks:
        return True
    return inputs and (len(mod._forward_pre_hooks) != 1 or bool(_global_forward_pre_hooks))


def _unique_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _device_of(parts: list[torch.Tensor], params: list[tuple[str, nn.Parameter]]) -> torch.device:
    if parts:
        return parts[0].device
    if params:
        return params[0][1].device
    return torch.device("cpu")


def _autocast_dtype(dev: torch.device) -> str | None:
    if torch.is_autocast_enabled(dev.type):
        return str(torch.get_autocast_dtype(dev.type)).replace("torch.", "")
    return None


def _first_nonfinite(record: Record, bwd_order: list[str]) -> tuple[str, str] | None:
    """(layer, where) of the first non-finite value: outputs in call order, then output gradients in the
    order the backward pass produced them, then parameters, then parameter gradients."""
    for layer in record.trace:
        if not layer.fwd.finite:
            return layer.name, "forward"
    by_name = {layer.name: layer for layer in record.trace}
    for name in bwd_order:
        bwd = by_name[name].bwd if name in by_name else None
        if bwd is not None and not bwd.finite:
            return name, "backward"
    for name, ps in record.params.items():
        if not math.isfinite(ps.norm):
            return name, "parameter"
    for name, ps in record.params.items():
        if ps.has_grad and not math.isfinite(ps.grad_norm):
            return name, "gradient"
    return None


def _overflow_findings(trace: Trace) -> list[Finding]:
    from ..diagnosis._rules import RULES, RuleContext

    return RULES["overflow_risk"](trace, RuleContext())
