"""The on-device reductions a training-time :class:`~signalprop.monitor.Monitor` takes of one tensor.

The reductions are :mod:`signalprop.stats`' (``_fast_parts``, the fast path of ``tensor_sums``: one piece
of code for the statistics and their row layout); :func:`compact_sums` packs them into a short compact row
with one stack and one cat, and :func:`expand_row` rebuilds the ``tensor_sums`` row on the host (about half
the device operations of a standalone ``tensor_sums`` row, whose counts and constants each cost a small
operation). The Monitor's usual path batches the samples of many tensors instead
(:mod:`signalprop.monitor._batch`, the same row layout); this per-tensor path serves exact statistics
(``sample=None``), histograms and samples too large to batch. It also holds the non-finite check
(:func:`full_sum`). What this module adds is where the numbers come from:

- **a fixed-size sample**: the moments, extremes, zeros and channel sums come from the smallest number of
  leading samples (along dim 0) that hold at least ``sample`` elements, or, where one sample alone holds
  twice that or more, every k-th row of it (:func:`sample_of`). A prefix reads only its own cache lines; a
  sample strided over the whole batch would touch every one of them (DESIGN.md, "Monitor's cost": exact
  statistics over every element of 86 tensors a step cost 1.23-1.29x, a 16 K-element prefix 1.08x);
- **float64 accumulation of the sample**: the prefix is small, so casting it costs about as much as one
  extra kernel launch, and the squares of any finite float32, bfloat16 or float16 value then fit, so the
  statistics stay finite whenever every element is (exploding nets reach 1e21, whose float32 squares
  overflow);
- **one full sum** of the whole tensor (float32 accumulation, float32 for half types too), the non-finite
  check: a sum of finite values is finite unless it passes 3.4e38, so a non-finite ``CHECK`` means an
  inf/nan somewhere in the tensor (or values so large that overflow is imminent);
- optionally a **histogram of the sample in standardized units**, binned on the device without a host
  synchronization (the range must be known before the sums reach the host, so it is fixed in units of the
  sample's own std: ``[mean - 6 std, mean + 6 std]``; values beyond it are counted in the end bins).

The standard error of the sampled std is about ``std * sqrt((kurtosis - 1) / (4 n))`` for ``n`` independent
elements (0.55% at n = 16384 for Gaussian values); elements within one sample are correlated in real
networks, so the error there is larger (DESIGN.md measured within 10% of the exact std at 1/64 of a batch).
"""

from __future__ import annotations

import math

import torch

from ..stats import CHECK, NUMEL, _fast_parts, leading_rows, tensor_sums

HIST_HALF_WIDTH = 6.0
"""Histograms cover ``mean +- HIST_HALF_WIDTH * std`` of the sample."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


MIN_RUN = 16
"""Every other slice of one batch sample is taken only where each slice holds runs of at least this many
contiguous elements (64 bytes of float32, a cache line)."""


def sample_plan(shape: tuple[int, ...], sample: int, channel_dim: int | None) -> tuple[int, int, int]:
    """``(rows, dim, step)``: the Monitor's sample of a tensor of ``shape`` is ``t[:rows]``, with only every
    ``step``-th index along ``dim`` when ``dim > 0`` (see :func:`sample_of`). Shape arithmetic only."""
    rows = leading_rows(shape, sample, channel_dim)
    per = max(1, math.prod(shape[1:]))
    cd = None if channel_dim is None or not shape else channel_dim % len(shape)
    if rows != 1 or per < 2 * sample or cd == 0:  # (channel dimension 0: every sample holds channels)
        return rows, 0, 1
    dim = next((d for d in range(1, len(shape)) if d != cd and shape[d] > 1), 0)
    if dim == 0 or math.prod(shape[dim + 1 :]) < MIN_RUN:
        return rows, 0, 1
    return 1, dim, min(per // sample, int(shape[dim]))


def sample_shape(shape: tuple[int, ...], plan: tuple[int, int, int]) -> tuple[int, ...]:
    """The shape of the sample :func:`sample_plan` describes."""
    rows, dim, step = plan
    return tuple(rows if d == 0 else -(-s // step) if d == dim and dim > 0 else s for d, s in enumerate(shape))


def view_args(
    shape: tuple[int, ...], stride: tuple[int, ...], plan: tuple[int, int, int]
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(size, stride)`` of the ``as_strided`` view that is the sample ``plan`` (from :func:`sample_plan`)
    describes of a tensor of this shape and stride; None when the sample is the whole tensor."""
    rows, dim, step = plan
    if dim == 0 and rows == shape[0]:
        return None
    strides = list(stride)
    strides[dim] *= step
    return sample_shape(shape, plan), tuple(strides)


def sample_view(t: torch.Tensor, plan: tuple[int, int, int]) -> torch.Tensor:
    """The sample of ``t`` that ``plan`` (from :func:`sample_plan`) describes, as one view (one device-side
    operation: inside a training step each costs 5-20 us, two slices twice that)."""
    args = view_args(tuple(t.shape), t.stride(), plan)
    return t if args is None else t.as_strided(args[0], args[1], t.storage_offset())


def sample_of(t: torch.Tensor, sample: int, channel_dim: int | None) -> torch.Tensor:
    """The Monitor's sample of ``t`` (a view): the fewest leading samples (dim 0) that hold at least
    ``sample`` elements (every sample when ``channel_dim`` is 0). When one batch sample alone holds twice
    that or more (an image's activations: 32 channels of 32x32 hold 32768), every ``k``-th index of its first
    non-channel dimension with ``k = floor(elements per sample / sample)``, e.g. ``t[:1, :, ::2]`` (every
    other image row) for NCHW, so that the sample holds about ``sample`` elements, every channel and the
    whole height of the image (a top half alone was biased: deep layers of a 20-layer CNN differ between
    the top and the bottom of the image, 8-9% in std), and reads whole rows (:data:`MIN_RUN`)."""
    return sample_view(t, sample_plan(tuple(t.shape), sample, channel_dim))


def sample_sums(
    t: torch.Tensor, channel_dim: int | None, sample: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(row, moments_source, check)`` for one tensor, all on its device, with no host synchronization.

    ``row`` is a ``tensor_sums`` row (layout in :mod:`signalprop.stats`). With ``sample=None``, or when the
    leading samples already hold the whole tensor, it covers every element and ``check`` is None. Otherwise
    the row describes a float64 copy of the leading-sample prefix (its ``NUMEL`` and ``CHECK`` are the
    prefix's) and ``check`` is the sum over the whole tensor (0-d, float32 accumulation): the caller puts it
    and the full element count into ``row[CHECK]`` and ``row[NUMEL]`` once the numbers of every tensor are
    on the host, which saves two device writes per tensor. ``moments_source`` is the tensor the moments
    were taken over (for :func:`standardized_histogram`).
    """
    t = t.detach()
    if sample is None or t.dim() == 0 or t.numel() == 0:
        return tensor_sums(t, channel_dim=channel_dim), t, None
    head = sample_of(t, sample, channel_dim).to(torch.float64)
    row = tensor_sums(head, channel_dim=channel_dim)
    if head.numel() == t.numel():
        return row, head, None
    return row, head, full_sum(t)


def full_sum(t: torch.Tensor) -> torch.Tensor:
    """The non-finite check of a whole tensor: its sum (0-d, on its device), float32 accumulation for float32
    and half types. One read of every element; finite unless an element is inf/nan or the sum passes 3.4e38."""
    return t.sum(dtype=torch.float32 if t.dtype in _LOW_PRECISION else t.dtype)


COMPACT_MAX = (2, 3)
"""Positions of a :func:`compact_sums` row to combine across ranks with MAX (all others: SUM)."""


def compact_sums(
    t: torch.Tensor, channel_dim: int | None, sample: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
    """Like :func:`sample_sums`, with fewer device operations: ``(row, moments_source, check, counts)``.

    For a tensor of one or more dimensions the row is *compact*, ``[SUMSQ, ZEROS, MAXV, NEGMIN, channel
    sums...]`` (float64, on the device), made by :func:`signalprop.stats._fast_parts` (the reductions
    ``tensor_sums`` runs: a dot, one channel sum, one ``aminmax``, one zero count) and one stack and one cat;
    ``counts = (moment elements, zero-sample elements)`` are host numbers, and :func:`expand_row` turns
    the host copy into a ``tensor_sums`` row (SUM is the sum of the channel sums). About half the
    operations of a standalone ``tensor_sums`` row, and one long-lived allocation per tensor. A 0-d or empty
    tensor gets a full ``tensor_sums`` row and ``counts=None``.
    """
    t = t.detach()
    if t.dim() == 0 or t.numel() == 0:
        row, head, chk = sample_sums(t, channel_dim, sample)
        return row, head, chk, None
    full = None
    head = t
    if sample is not None:
        head = sample_of(t, sample, channel_dim).to(torch.float64)
        if head.numel() < t.numel():
            full = full_sum(t)
    cd = None if channel_dim is None else channel_dim % head.dim()
    sumsq, lo, hi, zeros, chan, zero_n = _fast_parts(head, cd)
    f64 = torch.float64
    row = torch.cat([torch.stack([sumsq.to(f64), zeros.to(f64), hi.to(f64), -lo.to(f64)]), chan.to(f64)])
    return row, head, full, (head.numel(), zero_n)


def expand_row(compact: list[float], counts: tuple[int, int]) -> list[float]:
    """The ``tensor_sums`` row (layout in :mod:`signalprop.stats`) of a host copy of a :func:`compact_sums` row."""
    sumsq, zeros, maxv, negmin = compact[:4]
    chan = compact[4:]
    s = math.fsum(chan) if all(math.isfinite(x) for x in chan) else sum(chan)
    n, zero_n = counts
    return [float(n), float(n), s, sumsq, zeros, float(zero_n), 0.0, s, maxv, negmin, *chan]


def with_full_check(row: list[float], check: float, numel: float) -> list[float]:
    """A host copy of a prefix row from :func:`sample_sums` with the whole tensor's CHECK and NUMEL put in."""
    out = list(row)
    out[CHECK] = check
    out[NUMEL] = numel
    return out


def standardized_histogram(x: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of ``x`` in ``bins`` equal bins of ``[mean - 6 std, mean + 6 std]`` (in std units), on device.

    ``mean`` and ``std`` are ``x``'s own (population std, float64, on the device: no synchronization); values
    outside the range go to the end bins (so do infinities), nan is left out. The edges in the data's units
    are ``mean + std * z`` for the bin edges ``z``, known on the host once the step's rows arrive
    (:func:`histogram_edges`).
    """
    x = x.reshape(-1).to(torch.float64)
    n = max(x.numel(), 1)
    mean = x.sum() / n
    std = (torch.dot(x, x) / n - mean * mean).clamp_min(0.0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    z = ((x - mean) / std).clamp(-HIST_HALF_WIDTH, HIST_HALF_WIDTH)
    z = torch.nan_to_num(z, nan=2 * HIST_HALF_WIDTH)  # out of range: histc leaves it out
    return torch.histc(z, bins=bins, min=-HIST_HALF_WIDTH, max=HIST_HALF_WIDTH).to(torch.float64)


def histogram_edges(mean: float, std: float, bins: int) -> tuple[float, ...]:
    """Bin edges in the data's units for a :func:`standardized_histogram` of a sample with this mean and std."""
    w = 2 * HIST_HALF_WIDTH / bins
    return tuple(mean + std * (-HIST_HALF_WIDTH + w * i) for i in range(bins + 1))
