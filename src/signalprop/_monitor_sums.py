"""The on-device reductions a training-time :class:`~signalprop.monitor.Monitor` takes of one tensor.

A thin wrapper around :func:`signalprop._stats.tensor_sums` (one piece of code for the statistics and
their row layout). What the wrapper adds is where the numbers come from:

- **a fixed-size sample**: the moments, extremes, zeros and channel sums come from the smallest number of
  leading samples (along dim 0) that hold at least ``sample`` elements. A contiguous prefix reads only its
  own cache lines; a strided sample would touch every one of them (DESIGN.md, "Monitor's cost": exact
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

import torch

from ._stats import CHECK, NUMEL, SUM, SUMSQ, N, tensor_sums

HIST_HALF_WIDTH = 6.0
"""Histograms cover ``mean +- HIST_HALF_WIDTH * std`` of the sample."""

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def leading_rows(t: torch.Tensor, sample: int, channel_dim: int | None) -> int:
    """How many leading samples (dim 0) hold at least ``sample`` elements (all of them for channel_dim 0)."""
    if t.dim() == 0 or t.shape[0] == 0:
        return 0
    if channel_dim == 0:
        return int(t.shape[0])
    per = max(1, t.numel() // t.shape[0])
    return min(int(t.shape[0]), -(-sample // per))


def sample_sums(
    t: torch.Tensor, channel_dim: int | None, sample: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(row, moments_source, check)`` for one tensor, all on its device, with no host synchronization.

    ``row`` is a ``tensor_sums`` row (layout in :mod:`signalprop._stats`). With ``sample=None``, or when the
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
    rows = leading_rows(t, sample, channel_dim)
    head = t[:rows].to(torch.float64)
    row = tensor_sums(head, channel_dim=channel_dim)
    if rows == t.shape[0]:
        return row, head, None
    return row, head, t.sum(dtype=torch.float32 if t.dtype in _LOW_PRECISION else t.dtype)


def with_full_check(row: list[float], check: float, numel: float) -> list[float]:
    """A host copy of a prefix row from :func:`sample_sums` with the whole tensor's CHECK and NUMEL put in."""
    out = list(row)
    out[CHECK] = check
    out[NUMEL] = numel
    return out


def standardized_histogram(x: torch.Tensor, row: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of ``x`` in ``bins`` equal bins of ``[mean - 6 std, mean + 6 std]`` (in std units), on device.

    ``mean`` and ``std`` come from ``row`` (device tensors, no synchronization); values outside the range go
    to the end bins (so do infinities), nan is left out. The edges in the data's units are ``mean + std * z`` for the
    bin edges ``z``, known on the host once the row arrives (:func:`histogram_edges`).
    """
    x = x.reshape(-1).to(torch.float64)
    n = row[N].clamp_min(1.0)
    mean = row[SUM] / n
    std = (row[SUMSQ] / n - mean * mean).clamp_min(0.0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
    z = ((x - mean) / std).clamp(-HIST_HALF_WIDTH, HIST_HALF_WIDTH)
    z = torch.nan_to_num(z, nan=2 * HIST_HALF_WIDTH)  # out of range: histc leaves it out
    return torch.histc(z, bins=bins, min=-HIST_HALF_WIDTH, max=HIST_HALF_WIDTH).to(torch.float64)


def histogram_edges(mean: float, std: float, bins: int) -> tuple[float, ...]:
    """Bin edges in the data's units for a :func:`standardized_histogram` of a sample with this mean and std."""
    w = 2 * HIST_HALF_WIDTH / bins
    return tuple(mean + std * (-HIST_HALF_WIDTH + w * i) for i in range(bins + 1))
