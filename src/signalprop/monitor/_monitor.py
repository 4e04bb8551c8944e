"""Watch per-layer signal statistics while a model trains: ``with sp.Monitor(model) as mon: ... mon.step()``.

Every ``every``-th training step the Monitor records, for every module call, statistics of the output and
of the gradient with respect to it (the same :class:`~signalprop.trace.Trace` schema as
:func:`signalprop.measure`), and for every parameter its norm, its gradient's norm and the update-to-weight
ratio ``||w_t - w_{t-1}|| / ||w_{t-1}||`` (the quantity Karpathy's "update / data ratio" heuristic watches,
about 1e-3 for a healthy SGD run). It is built to stay on in real training runs:

- **A fixed-size sample**: exact statistics over every element of the 86 tensors of a 20-layer CNN step cost
  1.23-1.29x, each full-size temporary about 0.7 ms. So the Monitor takes the moments from the leading
  samples of the batch holding at least ``sample`` elements (16384 by default; every k-th row of one
  sample where one alone holds twice that, :func:`~signalprop.monitor._sums.sample_of`), accumulated in
  float64, and reads the whole tensor once, for a single sum that proves every element finite
  (:mod:`signalprop.monitor._sums`). ``sample=None`` gives exact statistics over every element.
- **Few device operations**: inside a training step each small device operation costs 10-25 us (dispatch
  and cold caches after a large convolution), so a hook does two things per tensor: it copies the sample
  into a slot of a persistent float64 buffer shared by all tensors of that layout, and takes the full sum.
  The buffers are reduced in a few batched operations per layout when they fill and when the step closes
  (:mod:`signalprop.monitor._batch`), with the same numbers as reducing each sample alone; the parameter
  norms come from padded buffers, four norms of a whole size group in one operation
  (:mod:`signalprop.monitor._params`).
- **One host transfer per recorded step**: the hooks leave rows of sums on the device; ``step()``
  concatenates them with the parameter norms into one tensor and moves it to the host
  (:mod:`signalprop.monitor._pack`; ``sync_every`` recorded steps may share one transfer, at the price of
  warnings arriving that many steps later), and nothing the other way: element counts, known on the host,
  stay there. A step with nothing to warn about keeps its numbers as one host array, and its
  :class:`Record` is built when ``history`` is read, out of the training step.
- **At once**: the first step and layer whose values are not finite are named in a
  :class:`NonFiniteWarning` from the ``step()`` call that transferred them (``on_nonfinite="raise"`` raises
  instead, to stop the run), so is a non-finite loss given to ``step(loss=...)``, and a layer whose absmax
  comes within 8x of its dtype's largest value gets an :class:`OverflowRiskWarning` (diagnose's
  ``overflow_risk`` rule, run on each recorded trace).
- **Bounded memory**: ``history`` keeps the last ``keep`` records in full and a thinned view of the whole
  run (every 2^k-th recorded step, and the 1st, 2nd, 4th, 8th, ...: :mod:`signalprop.monitor._history`).
  ``on_record`` and ``tensorboard`` see every record.
- **Only the user's own passes**: the forwards signalprop runs itself (``sp.measure``, ``sp.diagnose``,
  ``sp.predict``, graph capture, the fix planner, LSUV) and torch.export's fake tensors pass the Monitor by
  (:mod:`signalprop._hooks`); so do calls made while gradients are disabled (a validation loop under
  ``torch.no_grad()``).
- **torch.distributed**: when a process group is initialized, the layer rows of every rank are combined
  with one ``all_gather`` per recorded step (sums add, extremes take the maximum), so every rank records
  whole-batch statistics. Parameter norms are not reduced: under DistributedDataParallel every rank holds
  the same parameters and (after backward) the same gradients.
- **Mixed precision**: under ``torch.autocast`` each call's output dtype is recorded in
  ``LayerStats.dtype``; bfloat16 and float16 values are reduced in float64.

The model is left as found: the Monitor adds hooks on enter and removes them on exit (also when the block
raises); it writes no parameter, buffer or gradient.

Examples:
    >>> import torch, signalprop as sp
    >>> model = sp.models.mlp(depth=4, width=64)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.01)
    >>> with sp.Monitor(model, every=2) as mon:
    ...     for _ in range(4):
    ...         opt.zero_grad()
    ...         loss = model(torch.randn(32, 64)).pow(2).mean()
    ...         loss.backward()
    ...         opt.step()
    ...         mon.step(loss=loss)
    >>> [r.step for r in mon.history]
    [0, 2]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .._distributed import world_size
from .._errors import SignalpropError
from .._hooks import HookSet, is_internal, is_real
from .._inputs import first_float_tensor
from ..layers import ChannelDims, is_weight_layer
from ..measurement import ModuleFilter, select_modules
from ..trace import Trace
from ._alerts import Alerts
from ._batch import PrefixBatch
from ._history import History
from ._pack import Layout, logical, pack, quiet, unpack
from ._params import ParamNorms
from ._record import Event, NonFiniteWarning, OverflowRiskWarning, ParamStats, Record
from ._step import Backward, Forward, OpenStep, queue

__all__ = ["Event", "Monitor", "NonFiniteWarning", "OverflowRiskWarning", "ParamStats", "Record"]

DEFAULT_SAMPLE = 16384
"""Elements per tensor the statistics are taken from by default (1.08x per step, std within 10%)."""

DEFAULT_KEEP = 100
"""Recent records kept in full by default, and records of the thinned long view at most."""

Loss = torch.Tensor | float | int


@dataclass(slots=True)
class _Kept:
    """One recorded step: its numbers on the device until the transfer, then on the host until its Record
    is built."""

    step: int
    layout: Layout
    autocast: str | None
    payload: torch.Tensor | None
    losses: tuple[tuple[int, float | None], ...]
    """(step, value) of the losses given since the previous recorded step; None: in the payload, in order."""
    numbers: np.ndarray | None = None
    record: Record | None = None


class Monitor:
    """Record per-layer forward/gradient statistics and per-parameter norms every ``every`` training steps.

    Use it as a context manager and call :meth:`step` once per training step, after ``optimizer.step()``
    and before gradients are zeroed (so that gradient norms and the update are seen). ``history`` holds the
    kept :class:`Record` objects; :meth:`plot` draws them; ``events`` lists what was warned about.

    Args:
        model: The ``nn.Module`` being trained.
        every: Record steps ``0, every, 2 * every, ...``; hooks return at once on the other steps.
        sample: Elements per tensor to take the statistics from (the leading samples of the batch that hold at
            least this many, or every k-th row of one that holds twice as many or more; see the module
            docstring); ``None`` for exact statistics over every element.
        modules: Which module calls to record, as in :func:`signalprop.measure` (default: leaves and modules
            owning parameters directly).
        params: Record each parameter's norm, gradient norm and update ratio. The update ratio keeps one copy
            of the trainable parameters (``update_ratio=False`` saves that memory).
        update_ratio: Track the update ratio (with ``params``).
        histograms: Also bin each recorded tensor's sample (``bins`` bins over mean +- 6 std) into
            ``Stats.hist``; default: when ``tensorboard`` is given.
        bins: Histogram bins.
        tensorboard: A ``torch.utils.tensorboard.SummaryWriter``: every record is written there as it reaches
            the host (:func:`signalprop.integrations.tensorboard.log_record`).
        on_record: Called with each :class:`Record` as it reaches the host (after the Monitor's own checks),
            e.g. to log it elsewhere.
        sync_every: Recorded steps whose numbers travel to the host together (1: each recorded step, warnings
            at once).
        on_nonfinite: ``"warn"`` (a :class:`NonFiniteWarning` naming the first step and layer), ``"raise"`` (a
            SignalpropError from ``step()``, to stop the run) or ``"ignore"``.
        distributed: ``None``: combine ranks when a process group is initialized; ``False``: this process
            only.
        keep: Records ``history`` holds in full (the most recent); older ones are thinned to every 2^k-th
            recorded step (at most ``keep`` of them) plus the 1st, 2nd, 4th, 8th, ... so that memory stays
            bounded over any run length and a plot still spans the whole run. ``None`` keeps every record.

    Raises:
        SignalpropError: ``model`` is not a module, or a count or option is out of range.

    Examples:
        An identity layer, a ReLU and ``loss = output.sum()``; steps 0 and 2 are recorded:

        >>> import torch, signalprop as sp
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = model[0].weight.copy_(torch.eye(2))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
        >>> x = torch.tensor([[1.0, -1.0], [3.0, -3.0]])
        >>> with sp.Monitor(model, every=2) as mon:
        ...     for _ in range(3):
        ...         opt.zero_grad()
        ...         loss = model(x).sum()
        ...         loss.backward()
        ...         opt.step()
        ...         mon.step(loss=loss)
        >>> [(r.step, r.loss) for r in mon.history], mon.events
        ([(0, 4.0), (2, 0.0)], [])
        >>> first = mon.history[0]
        >>> first.trace.names, first.trace["1"].fwd.mean, first.trace["1"].fwd.zero_frac
        (['0', '1'], 1.0, 0.5)
        >>> w = first.params["0.weight"]  # gradient [[4, -4], [0, 0]], step 0.5 of it on the identity
        >>> round(w.grad_norm ** 2, 6), round(w.update_ratio, 6)
        (32.0, 2.0)
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
        keep: int | None = DEFAULT_KEEP,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise SignalpropError(f"Monitor needs the nn.Module being trained, got {type(model).__name__}")
        _positive_int("every", every, "record every k-th step; 1 records every step")
        _positive_int("sync_every", sync_every, "how many recorded steps share one host transfer; 1 is the default")
        _positive_int("bins", bins, "histogram bins; 64 is the default")
        if sample is not None:
            _positive_int("sample", sample, f"elements per tensor, e.g. {DEFAULT_SAMPLE}, or None for exact statistics")
        if keep is not None:
            _positive_int("keep", keep, f"records kept in full, e.g. {DEFAULT_KEEP}, or None to keep every record")
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
        self.keep = keep
        self._alerts = Alerts(on_nonfinite)
        self.events: list[Event] = self._alerts.events
        self._selected = select_modules(model, modules)
        self._history: History[_Kept] = History(keep)
        self._pending: list[_Kept] = []
        self._hooks = HookSet()
        self._step = 0
        self._active = False
        self._open: OpenStep | None = None
        """The recorded step in progress; None on steps that are not recorded and outside the Monitor."""
        self._losses: list[tuple[int, Loss]] = []
        """Losses given since the last recorded step closed (tensors wait for its transfer)."""
        self._batch = self._new_batch()
        self._channel_dim = ChannelDims()  # the one channel-dimension rule, as in measure
        self._param_list: list[tuple[str, nn.Parameter]] = []
        self._param_norms: ParamNorms | None = None
        self._param_cols: tuple[tuple[str, int], ...] = ()
        self._layout: Layout | None = None
        """The last step's layout, shared by later steps laid out alike."""
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
        self._param_list = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad] if self.params else []
        self._param_norms = ParamNorms([p for _, p in self._param_list], self.update_ratio)
        self._param_cols = tuple((name, col) for (name, _), col in zip(self._param_list, self._param_norms.position))
        try:
            for name, m in self._selected:
                self._hooks.add(m.register_forward_pre_hook(self._pre_hook(name, m)))
                self._hooks.add(m.register_forward_hook(self._post_hook))
        except BaseException:
            self._hooks.remove()
            raise
        self._active = True
        self._begin_step()
        return self

    def close(self, *, flush: bool = True) -> None:
        """Remove the hooks (what ``with`` does on exit). A step with recorded calls that ``step()`` did not
        close yet is closed as if it had been; ``flush`` moves pending numbers to the host now (on an
        exception they wait until ``history`` is read, so that the original error is what propagates) and
        checks the losses given since the last recorded step."""
        try:
            if self._active and flush and self._open is not None and self._open.forwards:
                self._close_step()
        finally:
            self._hooks.remove()
            self._active = False
            self._open = None
            self._batch = self._new_batch()  # frees the sample buffers; a restarted Monitor allocates new ones
            self._param_norms = None  # frees the parameter buffers
        if flush:
            self._flush()
            self._check_losses()

    # ---- public --------------------------------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The number of the step in progress (0 before the first ``step()`` call)."""
        return self._step

    @property
    def recorded(self) -> int:
        """Steps recorded since the start, also those ``history`` no longer holds (see ``keep``)."""
        return self._history.added + len(self._pending)

    @property
    def history(self) -> list[Record]:
        """The kept :class:`Record` objects, oldest first (moves pending numbers to the host first): the last
        ``keep`` recorded steps and a thinned view of the earlier ones (see ``keep``)."""
        self._flush()
        out = []
        for kept in self._history:
            if kept.record is None:
                self._build(kept, alert=False)
            assert kept.record is not None
            out.append(kept.record)
        return out

    def step(self, loss: Loss | None = None) -> None:
        """Close the current training step: on a recorded step, reduce the parameter norms, concatenate
        every row and move them to the host (one transfer), check for non-finite values, warn.

        ``loss``, the step's loss (a tensor or a number), is checked too: a non-finite one is named with its
        step in a :class:`NonFiniteWarning` (a number at once; a tensor with the next recorded step's
        transfer, so that it costs no synchronization of its own), and kept in :attr:`Record.loss`."""
        if not self._active:
            raise SignalpropError(
                "Monitor.step() was called outside the Monitor; use `with sp.Monitor(model) as mon:` (or "
                "mon.start() ... mon.close()) around the training loop"
            )
        if loss is not None:
            self._take_loss(loss)
        closed = self._open is not None
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
        """(step, trace) for each kept record."""
        for r in self.history:
            yield r.step, r.trace

    # ---- hooks ---------------------------------------------------------------------------------------
    def _begin_step(self) -> None:
        recording = self._active and self._step % self.every == 0
        self._open = OpenStep() if recording else None
        if self._batch is not None:
            self._batch.clear()
        if self._param_norms is not None:
            self._param_norms.begin(recording)

    def _pre_hook(self, name: str, module: nn.Module) -> Callable[[nn.Module, Any], None]:
        kind = type(module).__name__
        weight = is_weight_layer(module)

        def hook(mod: nn.Module, args: Any) -> None:
            step = self._open
            if step is not None and torch.is_grad_enabled() and not is_internal() and _real(args):
                step.begin(mod, name, kind, weight)

        return hook

    def _post_hook(self, mod: nn.Module, args: Any, output: Any) -> None:
        step = self._open
        call = None if step is None else step.end(mod)
        if step is None or call is None:
            return
        out = first_float_tensor(output)
        if out is None or not is_real(out):
            return
        call.shape = tuple(out.shape)
        call.dtype = str(out.dtype).replace("torch.", "")
        call.channel_dim = self._channel_dim(mod, out)
        call.out = queue(out, call.channel_dim, self._batch, self.sample, self._bins())
        if step.device is None:
            step.device = out.device
        if out.requires_grad:
            node = out.grad_fn
            if node is not None:  # a hook on the node that made `out` (2 us less than a tensor hook)
                node.register_prehook(self._grad_hook(step, call, out.output_nr))
            else:  # a leaf output
                out.register_hook(_leaf_hook(self._grad_hook(step, call, 0)))

    def _grad_hook(self, step: OpenStep, call: Forward, nr: int) -> Callable[[tuple[torch.Tensor | None, ...]], None]:
        """The pre-hook on the autograd node that made one call's output (its output ``nr``): queue the first
        gradient with respect to that output that arrives while its step is open. A node's pre-hook sees the
        gradient as it was when the hook was registered, as a tensor hook would (an in-place ReLU after a
        convolution: the convolution's output gradient)."""
        seen = False

        def hook(grads: tuple[torch.Tensor | None, ...]) -> None:
            nonlocal seen
            grad = grads[nr]
            if seen or grad is None or step.closed:  # (None: the output did not reach the loss)
                return
            seen = True
            step.backwards.append(Backward(call, queue(grad, call.channel_dim, self._batch, self.sample, self._bins())))

        return hook

    def _bins(self) -> int | None:
        return self.bins if self.histograms else None

    def _new_batch(self) -> PrefixBatch | None:
        """The store for batched samples; None where every tensor takes the per-tensor path (exact
        statistics, or histograms, which bin each sample itself)."""
        return None if self.sample is None or self.histograms else PrefixBatch(self.sample)

    # ---- closing a step ------------------------------------------------------------------------------
    def _take_loss(self, loss: Loss) -> None:
        if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() > 0:
            value = loss.detach()
            self._losses.append((self._step, value.reshape(()) if value.numel() == 1 else value.sum()))
        elif isinstance(loss, int | float | np.floating | np.integer) and not isinstance(loss, bool):
            self._losses.append((self._step, float(loss)))
            error = None if math.isfinite(loss) else self._alerts.loss(self._step, float(loss), depth=2)
            if error is not None:
                raise SignalpropError(error)
        else:
            raise SignalpropError(
                f"step(loss=...) takes the step's loss as a floating tensor or a number, got {type(loss).__name__}"
            )

    def _close_step(self) -> None:
        step, self._open = self._open, None
        assert step is not None
        step.closed = True
        blocks = self._batch.finish() if self._batch is not None else []
        losses, self._losses = self._losses, []
        tensors = [v for _, v in losses if isinstance(v, torch.Tensor)]
        dev = step.device or (self._param_list[0][1].device if self._param_list else torch.device("cpu"))
        norms = self._param_norms.vector(dev) if self._param_norms is not None else None
        payload, layout = pack(step, blocks, norms, self._param_cols, tensors, device=dev, world=self._world)
        if layout == self._layout:  # laid out as the step before: share its layout
            layout = self._layout
        self._layout = layout
        kept_losses = tuple((s, None if isinstance(v, torch.Tensor) else v) for s, v in losses)
        self._pending.append(_Kept(self._step, layout, _autocast_dtype(dev), payload, kept_losses))

    # ---- on the host ---------------------------------------------------------------------------------
    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        payloads = [k.payload for k in pending]
        assert all(p is not None for p in payloads)  # (dropped only once transferred)
        # the one host transfer; numpy's own copy, so that what a kept step holds is plain numpy memory
        host = torch.cat(payloads).cpu().numpy().copy()  # type: ignore[arg-type]
        pos = 0
        error: str | None = None
        for k in pending:
            assert k.payload is not None
            n = k.payload.numel()
            k.numbers = host if len(pending) == 1 else host[pos : pos + n].copy()
            k.payload = None
            pos += n
            self._history.add(k)
            if not self._quiet(k):
                error = self._build(k, alert=True) or error
        if error is not None:
            raise SignalpropError(error)

    def _quiet(self, k: _Kept) -> bool:
        """True when a step can hold nothing to warn about and nobody waits for its Record: its Record is
        then built when ``history`` is read, which keeps the Python work of building it out of the step."""
        if self.on_record is not None or self.tensorboard is not None:
            return False
        assert k.numbers is not None
        return quiet(k.layout, k.numbers) and all(v is None or math.isfinite(v) for _, v in k.losses)

    def _build(self, k: _Kept, *, alert: bool) -> str | None:
        """Build the Record of one transferred step, hand it on, warn (``alert``); return the error text for
        on_nonfinite='raise'."""
        assert k.numbers is not None
        vals = logical(k.layout, k.numbers).tolist()
        size = k.layout.size
        tail = iter(vals[size:])
        losses = [(s, next(tail) if v is None else v) for s, v in k.losses]
        meta = {"step": k.step, "sample": self.sample, "world_size": self._world, "autocast": k.autocast,
                "source": "signalprop.Monitor"}
        loss = next((v for s, v in losses if s == k.step), None)
        record = k.record = unpack(k.layout, vals[:size], k.step, meta, loss)
        k.numbers = None
        if self.tensorboard is not None:
            from ..integrations.tensorboard import log_record

            log_record(self.tensorboard, record)
        names = (k.layout.calls[i].name for i, _ in k.layout.bwd)
        error = self._alerts.record(record, names, losses, depth=3) if alert else None
        if self.on_record is not None:
            self.on_record(record)
        return error

    def _check_losses(self) -> None:
        """Check the loss tensors given after the last recorded step (one transfer, on closing)."""
        losses, self._losses = self._losses, []
        tensors = [v for _, v in losses if isinstance(v, torch.Tensor)]
        if not tensors:
            return
        values = iter(torch.stack([t.to(tensors[0].device) for t in tensors]).double().cpu().tolist())
        for s, v in losses:
            value = next(values) if isinstance(v, torch.Tensor) else float(v)
            error = None if math.isfinite(value) else self._alerts.loss(s, value, depth=3)
            if error is not None:
                raise SignalpropError(error)


# ---- helpers ---------------------------------------------------------------------------------------------
def _positive_int(name: str, v: Any, hint: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SignalpropError(f"{name} must be a positive integer, got {v!r} ({hint})")


def _real(args: tuple[Any, ...]) -> bool:
    """True unless a tensor argument is fake or meta (torch.export's tracing, a shape pass)."""
    return all(is_real(a) for a in args if isinstance(a, torch.Tensor))


def _leaf_hook(hook: Callable[[tuple[torch.Tensor | None, ...]], None]) -> Callable[[torch.Tensor], None]:
    """A tensor hook for an output that no node made (a leaf, e.g. an input returned as it is)."""

    def leaf(grad: torch.Tensor) -> None:
        hook((grad,))

    return leaf


def _autocast_dtype(dev: torch.device) -> str | None:
    if torch.is_autocast_enabled(dev.type):
        return str(torch.get_autocast_dtype(dev.type)).replace("torch.", "")
    return None
