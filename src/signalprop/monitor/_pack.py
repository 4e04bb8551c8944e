"""Packing a recorded step into one device vector, and unpacking its host copy into a Record.

A closed step (:class:`~signalprop.monitor._step.OpenStep`) leaves its numbers on the device: the sample
store's blocks of compact rows, the rows of tensors reduced on their own, histograms, the full sums that
check sampled tensors. :func:`pack` concatenates them with the parameter norms and the losses given to
``step()`` into one float64 tensor (one host transfer), and describes where every number sits in a
:class:`Layout`. The logical vector a layout describes is::

    [ layer numbers (device) | host numbers | parameter norms (4 blocks) | losses ]

The *host numbers* are the element counts that complete the rows (a compact row's moment and zero-sample
counts, a sampled tensor's element count). They are known on the host, so in one process they stay there,
in the layout, and join the transferred numbers on arrival (a device tensor made of host data would cost an
operation and, on a GPU, a synchronization of its own); across ranks they travel with the layer numbers, to
be summed with the other ranks'. A step laid out as the one before shares that step's layout, so a kept step
holds little besides its numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .._distributed import reduce_rows
from ..stats import CHECK, MAX_POSITIONS, NONFINITE, NUMEL, SUM, SUMSQ, stats_from_sums
from ..trace import Histogram, LayerStats, Stats, Trace
from ._record import ParamStats, Record
from ._step import OpenStep, Queued
from ._sums import COMPACT_MAX, expand_row, histogram_edges, with_full_check

OVERFLOW_MARGIN = 8.0
"""diagnose's default ``overflow_margin`` (signalprop.diagnosis._rulekit): absmax within 8x of the dtype's
largest value."""


@dataclass(frozen=True, slots=True)
class Place:
    """Where one tensor's numbers sit in a step's logical vector: its row ``[start, start + width)``; the
    two counts that complete a compact row (``counts``, None for a full row); the whole tensor's sum and
    element count where the sample is only part of it (``check``, ``numel``); its histogram."""

    start: int
    width: int
    counts: int | None = None
    check: int | None = None
    numel: int | None = None
    hist: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Call:
    """One module call of a step: what the Trace says of it besides the numbers, and where its output's are."""

    name: str
    kind: str
    weight_layer: bool
    shape: tuple[int, ...]
    dtype: str
    channel_dim: int | None
    fwd: Place


@dataclass(frozen=True)
class Layout:
    """Where every number of a packed step sits (see the module docstring)."""

    calls: tuple[Call, ...]
    bwd: tuple[tuple[int, Place], ...]
    """(position in ``calls``, place) of each output gradient, in the order the backward pass produced them."""
    params: tuple[tuple[str, int], ...]
    """Each parameter's name and column in the four norm blocks (value, gradient, update, previous value)."""
    n_device: int
    host: tuple[float, ...] | None
    """The host numbers, in one process; None when they travel in the payload (across ranks)."""
    n_host: int
    max_index: tuple[int, ...]
    """Positions of the rows' extremes: combined across ranks with MAX, and the overflow check's."""
    limit: float
    """The smallest dtype maximum of the step's outputs over :data:`OVERFLOW_MARGIN` (inf when none is known)."""

    @property
    def size(self) -> int:
        """Numbers before the losses."""
        return self.n_device + self.n_host + 4 * len(self.params)


def pack(
    step: OpenStep,
    blocks: list[torch.Tensor],
    norms: torch.Tensor | None,
    params: tuple[tuple[str, int], ...],
    losses: list[torch.Tensor],
    *,
    device: torch.device,
    world: int,
) -> tuple[torch.Tensor, Layout]:
    """One float64 device vector of everything a closed step recorded (see the module docstring), and its
    layout. ``blocks``: the sample store's compact rows of this step; ``norms``: the parameter norm blocks
    (:meth:`~signalprop.monitor._params.ParamNorms.vector`); ``losses``: 0-d loss tensors to check."""
    done = [f for f in step.forwards if f.out is not None]
    tensors = [f.out for f in done if f.out is not None] + [b.grad for b in step.backwards]
    parts, places, host = _place(tensors, blocks)
    max_index = tuple(
        p.start + k for q, p in zip(tensors, places) for k in (MAX_POSITIONS if q.counts is None else COMPACT_MAX)
    )
    layer = parts.vector(device)
    if world > 1:  # the host numbers travel too, to be summed with the other ranks'
        if host:
            layer = torch.cat([layer, torch.tensor(host, dtype=torch.float64, device=device)])
        layer = reduce_rows(layer, list(max_index), world).to(device)
    vec = [layer]
    if norms is not None:
        vec.append(norms)
    if losses:
        vec.append(torch.stack([x.to(device) for x in losses]).to(torch.float64))
    position = {id(f): i for i, f in enumerate(done)}
    layout = Layout(
        calls=tuple(
            Call(f.name, f.kind, f.weight_layer, f.shape, f.dtype, f.channel_dim, p) for f, p in zip(done, places)
        ),
        bwd=tuple((position[id(b.call)], p) for b, p in zip(step.backwards, places[len(done) :])),
        params=params,
        n_device=parts.length,
        host=None if world > 1 else tuple(host),
        n_host=len(host),
        max_index=max_index,
        limit=_overflow_limit(f.dtype for f in done),
    )
    return torch.cat(vec) if len(vec) > 1 else vec[0], layout


class _Parts:
    """The device tensors that make a step's layer numbers, in order, and their total length so far."""

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.length = 0

    def add(self, t: torch.Tensor) -> int:
        """Append ``t`` (flattened); return where it starts."""
        start = self.length
        self.tensors.append(t.reshape(-1))
        self.length += t.numel()
        return start

    def vector(self, device: torch.device) -> torch.Tensor:
        if not self.tensors:
            return torch.zeros(0, dtype=torch.float64, device=device)
        return torch.cat([t.to(device) for t in self.tensors])


def _place(tensors: list[Queued], blocks: list[torch.Tensor]) -> tuple[_Parts, list[Place], list[float]]:
    """Lay out the tensors' numbers: the sample store's blocks, then the rows of tensors reduced on their
    own, the histograms and one stack of the full sums on the device; then the host numbers (each compact
    row's two counts, each sampled tensor's element count). Returns the device parts, each tensor's place
    and the host numbers."""
    parts = _Parts()
    block_at = [parts.add(b) for b in blocks]
    rows = []
    for q in tensors:
        if q.ticket is not None:
            g, i = q.ticket
            width = blocks[g].shape[1]
            rows.append((block_at[g] + i * width, width))
        else:
            assert q.row is not None
            rows.append((parts.add(q.row), q.row.numel()))
    hists = [None if q.hist is None else (parts.add(q.hist), q.hist.numel()) for q in tensors]
    checks = [q.check for q in tensors if q.check is not None]
    check_at = parts.add(torch.stack([c.to(checks[0].device) for c in checks]).double()) if checks else 0
    host: list[float] = []
    places = []
    for q, (start, width), hist in zip(tensors, rows, hists):
        counts = check = numel = None
        if q.counts is not None:
            counts = parts.length + len(host)
            host.extend(float(x) for x in q.counts)
        if q.check is not None:
            check, numel = check_at, parts.length + len(host)
            check_at += 1
            host.append(float(q.numel))
        places.append(Place(start, width, counts, check, numel, hist))
    return parts, places, host


def _overflow_limit(dtypes: Any) -> float:
    limit = math.inf
    for name in dtypes:
        try:
            limit = min(limit, float(torch.finfo(getattr(torch, name)).max) / OVERFLOW_MARGIN)
        except (AttributeError, TypeError):
            continue
    return limit


def logical(layout: Layout, numbers: np.ndarray) -> np.ndarray:
    """The transferred numbers of a step with its host numbers put in place (see the module docstring)."""
    if not layout.host:
        return numbers
    n = layout.n_device
    return np.concatenate([numbers[:n], np.asarray(layout.host, dtype=np.float64), numbers[n:]])


def quiet(layout: Layout, numbers: np.ndarray) -> bool:
    """True when a step's transferred numbers hold nothing to warn about: every layer number, parameter
    norm, gradient norm and loss finite (no non-finite alert), and the largest sampled absmax below the
    overflow limit of the step's dtypes (no overflow_risk alert). ``numbers`` as transferred (numpy
    answers these in microseconds, torch in ~0.3 ms)."""
    n_dev = layout.n_device
    base = n_dev if layout.host is not None else n_dev + layout.n_host
    k = len(layout.params)
    if not (np.isfinite(numbers[:n_dev]).all() and np.isfinite(numbers[base : base + 2 * k]).all()):
        return False
    if not np.isfinite(numbers[base + 4 * k :]).all():
        return False
    return not layout.max_index or float(numbers[list(layout.max_index)].max()) < layout.limit


def unpack(layout: Layout, vals: list[float], step: int, meta: dict[str, Any], loss: float | None) -> Record:
    """The Record of one step from its logical numbers (:func:`logical`, as a list)."""
    bwd: dict[int, Stats] = {i: _stats(vals, place) for i, place in layout.bwd}
    layers = []
    for i, c in enumerate(layout.calls):
        meta_c: dict[str, Any] = {"call": int(c.name.rsplit("#", 1)[1]) if "#" in c.name else 0}
        if c.channel_dim is not None:
            meta_c["channel_dim"] = c.channel_dim
        layers.append(LayerStats(name=c.name, kind=c.kind, fwd=_stats(vals, c.fwd), bwd=bwd.get(i), shape=c.shape,
                                 dtype=c.dtype, weight_layer=c.weight_layer, meta=meta_c))
    trace = Trace(layers, source="measured", meta=meta)
    params: dict[str, ParamStats] = {}
    k = len(layout.params)
    base = layout.n_device + layout.n_host
    for name, col in layout.params:
        norm, grad, upd, prev = (vals[base + j * k + col] for j in range(4))
        ratio = upd / prev if prev > 0 else (0.0 if upd == 0 else math.inf if math.isfinite(upd) else upd)
        has_grad = grad != -1.0
        params[name] = ParamStats(norm, grad if has_grad else math.nan, ratio, has_grad)
    return Record(step, trace, params, loss)


def _stats(vals: list[float], place: Place) -> Stats:
    """The Stats of one tensor from the logical numbers."""
    row = vals[place.start : place.start + place.width]
    if place.counts is not None:
        row = expand_row(row, (int(vals[place.counts]), int(vals[place.counts + 1])))
    if place.check is not None and place.numel is not None:
        row = with_full_check(row, vals[place.check], vals[place.numel])
    bad_full = not math.isfinite(row[CHECK])
    bad_sample = not (math.isfinite(row[SUM]) and math.isfinite(row[SUMSQ]))
    hist = None
    if not bad_sample and place.hist is not None:
        n = max(row[1], 1.0)
        mean = row[SUM] / n
        std = math.sqrt(max(row[SUMSQ] / n - mean * mean, 0.0))
        counts = vals[place.hist[0] : place.hist[0] + place.hist[1]]
        hist = Histogram(histogram_edges(mean, std, len(counts)), tuple(int(round(x)) for x in counts))
    if not (bad_full or bad_sample):
        return stats_from_sums(row, hist=hist)
    # Non-finite somewhere: the moments stand if the sample was finite; the count is only known to be at
    # least one (a sum cannot count), so nonfinite_frac is that lower bound, 1 / numel.
    fixed = list(row)
    if not bad_sample:
        fixed[CHECK] = fixed[SUM]
    st = stats_from_sums(fixed, hist=hist)
    numel = max(row[NUMEL], 1.0)
    return replace(st, nonfinite_frac=max(row[NONFINITE] / numel, 1.0 / numel))
