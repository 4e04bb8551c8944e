"""The on-device reductions a training-time :class:`~signalprop.monitor.Monitor` takes of one tensor.

The reductions, the row layouts and the non-finite check are :mod:`signalprop.stats`' (one definition,
shared with :func:`signalprop.measure`): :func:`compact_sums` takes the fast path's reductions of a tensor's
sample into a compact row (``signalprop.stats.compact_row``), which the host expands into the full row.
The Monitor's usual path batches the samples of many tensors instead (:mod:`signalprop.monitor._batch`,
the same compact layout); this per-tensor path serves exact statistics (``sample=None``), histograms and
samples too large to batch. What this module adds is where the numbers come from:

- **a fixed-size sample**: the moments, extremes, zeros and channel sums come from the smallest number of
  leading samples (along dim 0) that hold at least ``sample`` elements, or, where one sample alone holds
  twice that or more, every k-th row of it (:func:`sample_of`). A prefix reads only its own cache lines; a
  sample strided over the whole batch would touch every one of them (docs/design.md, "The Monitor samples"; exact
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
networks, so the error there is larger (measured: within 10% of the exact std at 1/64 of a batch).
"""

from __future__ import annotations

import math

import torch

from ..stats import _fast_parts, compact_row, full_sum, tensor_sums

HIST_HALF_WIDTH = 6.0
"""Histograms cover ``mean +- HIST_HALF_WIDTH * std`` of the sample."""


MIN_RUN = 16
"""Every other slice of one batch sample is taken only where each slice holds runs of at least this many
contiguous elements (64 bytes of float32, a cache line)."""


def leading_rows(shape: tuple[int, ...], sample: int, channel_dim: int | None) -> int:
    """How many leading samples (dim 0) hold at least ``sample`` elements: all of them when the channel
    dimension is 0 (every channel must be in the sample). Shape arithmetic only."""
    if not shape or shape[0] == 0:
        return 0
    n = int(shape[0])
    if channel_dim is not None and channel_dim % len(shape) == 0:
        return n
    per = max(1, math.prod(shape[1:]))
    return min(n, -(-sample // per))


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


def compact_sums(
    t: torch.Tensor, channel_dim: int | None, sample: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, int] | None]:
    """``(row, moments_source, check, counts)`` for one tensor, all on its device, no host synchronization.

    For a tensor of one or more dimensions ``row`` is the compact row of its sample (of all of it with
    ``sample=None``) in float64, :func:`signalprop.stats.compact_row` of the reductions ``tensor_sums``
    runs (:func:`signalprop.stats._fast_parts`: a dot, one channel sum, one ``aminmax``, one zero count):
    about half the device operations of a standalone ``tensor_sums`` row. ``counts = (moment elements,
    zero-sample elements)`` are host numbers for :func:`signalprop.stats.expand_compact`; ``check`` is the
    whole tensor's :func:`~signalprop.stats.full_sum` where the sample is only part of it (else None), for
    :func:`signalprop.stats.with_check`. ``moments_source`` is the tensor the moments were taken over (for
    :func:`standardized_histogram`). A 0-d or empty tensor gets a full ``tensor_sums`` row and
    ``counts=None``.
    """
    t = t.detach()
    if t.dim() == 0 or t.numel() == 0:
        return tensor_sums(t, channel_dim=channel_dim), t, None, None
    full = None
    head = t
    if sample is not None:
        head = sample_of(t, sample, channel_dim).to(torch.float64)
        if head.numel() < t.numel():
            full = full_sum(t)
    cd = None if channel_dim is None else channel_dim % head.dim()
    sumsq, lo, hi, zeros, chan, zero_n = _fast_parts(head, cd)
    return compact_row(sumsq, zeros, hi, lo, chan), head, full, (head.numel(), zero_n)


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
