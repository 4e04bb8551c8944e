"""On-device reductions of one tensor into a short row of sums, and the Stats those sums give.

This is the pure numerical core that :func:`signalprop.measure` and :class:`signalprop.Monitor` share.
A tensor ``t`` becomes a 1-D float64 *row* on ``t``'s device (no host synchronization), laid out as::

    row[0] NUMEL     elements in the tensor
    row[1] N         elements the moments were taken over (all of them, the finite ones with
                     ``careful=True``, or a Monitor's sample)
    row[2] SUM       sum of those elements
    row[3] SUMSQ     sum of their squares
    row[4] ZEROS     exact zeros among the elements of the zero sample
    row[5] ZERO_N    size of the zero sample
    row[6] NONFINITE count of inf/nan elements (exact with ``careful=True``; 0 otherwise, see below)
    row[7] CHECK     sum over *every* element: finite if and only if no element is inf/nan (up to overflow)
    row[8] MAXV      largest element of the moment sample (finite elements; non-finite ones count as 0)
    row[9] NEGMIN    minus the smallest element, so that absmax = max(MAXV, NEGMIN)
    row[10:]         one sum per channel (over the moment sample), C entries

The fast path computes on the device only what the host cannot know, a *compact row*::

    compact[0] C_SUMSQ   compact[1] C_ZEROS   compact[2] C_MAXV   compact[3] C_NEGMIN   compact[4:] channel sums

(:func:`compact_row`); the element counts are known on the host, SUM is the total of the channel sums and
NONFINITE is 0, so :func:`expand_compact` rebuilds the full row from it on the host. measure's RowBatch
(``signalprop.measurement._rowbatch``), the Monitor's per-tensor rows and its batched sample store
(``signalprop.monitor._batch``) all produce this layout.

Every entry except MAXV and NEGMIN is a sum over elements, so rows of the same tensor split across
processes (the batch sharded over torch.distributed ranks) combine by adding them, and those two by
taking the maximum: :data:`MAX_POSITIONS` names the positions to reduce with MAX. :func:`stats_from_sums` then turns a
(combined) row into :class:`~signalprop.trace.Stats`; rows of many tensors can be concatenated into one
tensor and moved to the host with a single ``.cpu()``.

Why these reductions (docs/design.md, "Which reduction you call decides the overhead"): on a 1 M-element float32
tensor on 2 CPU cores ``sum`` and ``torch.dot(t, t)`` cost about 0.05 ms each and ``aminmax`` about
0.1 ms, while ``var_mean`` costs 3 ms, ``std`` 0.75 ms, ``count_nonzero`` 2-3 ms and ``(t == 0).sum()``
0.6-0.9 ms. So the mean, variance and rms come from a sum and a dot, the extremes from one ``aminmax``, and
the zero fraction from an exact count when each sample (entry of dim 0) holds fewer than
2 * :data:`ZERO_PER_SAMPLE` elements, and otherwise from the first 64 of every 64 k elements (k <= 64, a power of two such that 64 k
divides the per-sample size, so that the same positions of every sample are used and a batch split across
ranks gives the same sample as the whole batch; runs of 64 read only the cache lines they use, where a
plain stride-16 slice costs a full read; at least 4096 elements per sample, so the standard error
of the fraction is at most 0.5 / sqrt(4096 B) = 0.008 / sqrt(B) for a batch of B).

Non-finite values: a finite sum of squares proves every element finite, so the fast path does not look for
inf/nan at all. When a row's sums are not finite (:func:`rows_finite` tells), recompute it with
``careful=True``: that path masks the non-finite elements (``torch.isfinite``, about 1.4 ms per 1 M
elements), counts them exactly, and takes every other statistic over the finite elements only. The
fast path's sums are float32 for float32 tensors (float64 for float64 ones); float32 squares overflow past
about 1e19 per element, which the check also catches, and the careful path accumulates in float64, where
squares of every finite float32 value fit.

Channels (Brock et al. 2021, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets", Signal Propagation Plots): ``chan_sq_mean`` is the average over channels of each
channel's squared mean and ``chan_var`` the average of each channel's variance,
``chan_var = SUMSQ / N - chan_sq_mean`` (every channel holds N / C elements). The channel dimension is
``channel_dim`` (default: 1 for tensors of 3 or more dimensions, laid out (N, C, ...), and the last one for
2-D (N, features)); pass ``channel_dim=-1`` for (B, T, C) sequence activations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from ._errors import SignalpropError
from .trace import NAN, Histogram, Stats

NUMEL, N, SUM, SUMSQ, ZEROS, ZERO_N, NONFINITE, CHECK, MAXV, NEGMIN = range(10)
HEADER = 10
"""Length of a row before the per-channel sums; ``row[HEADER:]`` holds them."""
MAX_POSITIONS = (MAXV, NEGMIN)
"""Row positions combined across ranks with MAX; every other position is combined with SUM."""

C_SUMSQ, C_ZEROS, C_MAXV, C_NEGMIN = range(4)
COMPACT_HEADER = 4
"""Length of a compact row before the per-channel sums."""
COMPACT_MAX_POSITIONS = (C_MAXV, C_NEGMIN)
"""Compact-row positions combined across ranks with MAX."""

ZERO_PER_SAMPLE = 4096
"""Samples (dim 0 entries) of up to 2x this many elements get an exact zero count; larger ones every k-th
element (k a power of two <= 64), keeping at least this many per sample."""

_MAX_ZERO_STRIDE = 64
_ZERO_RUN = 64
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def default_channel_dim(ndim: int) -> int | None:
    """The channel dimension used when none is given: 1 for (N, C, ...) and (N, F), none for 0-D and 1-D.

    Args:
        ndim: The tensor's number of dimensions.

    Returns:
        1, or None (the whole tensor is one channel).

    Examples:
        >>> default_channel_dim(4), default_channel_dim(2), default_channel_dim(1)
        (1, 1, None)
    """
    return 1 if ndim >= 2 else None


def row_length(t_shape: Sequence[int], channel_dim: int | None) -> int:
    """Length of the row :func:`tensor_sums` returns for a tensor of this shape and channel dimension.

    Args:
        t_shape: The tensor's shape.
        channel_dim: Its channel dimension (negative counts from the end), or None for no channels.

    Returns:
        :data:`HEADER` plus the number of channels (1 without channels).

    Examples:
        >>> row_length((8, 16, 4, 4), 1), row_length((8,), None)
        (26, 11)
    """
    if channel_dim is None or len(t_shape) == 0:
        return HEADER + 1
    return HEADER + int(t_shape[channel_dim % len(t_shape)])


def _check_tensor(t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise SignalpropError(
            f"tensor_sums needs a torch.Tensor, got {type(t).__name__}; pass the activation tensor itself"
        )
    if not t.is_floating_point():
        raise SignalpropError(
            f"tensor_sums needs a floating-point tensor, got dtype {t.dtype}; statistics of integer or "
            "boolean tensors (token ids, masks) are not signal statistics, so leave them out"
        )
    return t


def _zero_stride(per_sample: int) -> int:
    """Largest power of two k <= 64 such that blocks of 64 k elements tile a sample and 1/k of it leaves
    >= ZERO_PER_SAMPLE elements.

    It depends on the per-sample size only, so a batch split across ranks is sampled exactly as the whole.
    """
    k = 1
    while (
        k * 2 <= _MAX_ZERO_STRIDE
        and per_sample // (k * 2) >= ZERO_PER_SAMPLE
        and per_sample % (_ZERO_RUN * k * 2) == 0
    ):
        k *= 2
    return k


def _zero_sample(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The first 64 elements of every block of 64 k: 1/k of the tensor, read as whole cache lines.

    A plain stride-k slice would touch every cache line for k <= 16 and cost as much as a full read;
    runs of 64 consecutive float32 elements (256 bytes) touch only the lines they use.
    """
    if k == 1:
        return flat
    return flat.view(-1, _ZERO_RUN * k)[:, :_ZERO_RUN]


def tensor_sums(
    t: torch.Tensor,
    *,
    channel_dim: int | Literal["auto"] | None = "auto",
    careful: bool = False,
) -> torch.Tensor:
    """Reduce ``t`` to a 1-D float64 row of sums on ``t``'s device, without a host synchronization.

    Args:
        t: Any floating-point tensor; dimension 0 is taken as the batch dimension.
        channel_dim: Dimension holding channels for ``chan_sq_mean`` / ``chan_var``; ``None`` for no
            channels (the whole tensor counts as one channel). Default: :func:`default_channel_dim` (1 for
            2-D and higher).
        careful: Mask inf/nan elements, count them, and take all statistics over the finite elements,
            accumulating in float64. Costs about 5x the fast path; :func:`signalprop.measure` uses it only
            for tensors whose fast sums were not finite.

    Returns:
        A float64 tensor of length :func:`row_length` (layout in the module docstring).

    Raises:
        SignalpropError: ``t`` is not a floating-point tensor, or ``channel_dim`` is out of range.

    Examples:
        >>> row = tensor_sums(torch.ones(4, 3))
        >>> stats_from_sums(row).mean, stats_from_sums(row).var
        (1.0, 0.0)
    """
    t = _check_tensor(t)
    t = t.detach()
    if channel_dim == "auto":
        channel_dim = default_channel_dim(t.dim())
    if t.dim() == 0:
        t = t.reshape(1)
        channel_dim = None
    if channel_dim is not None:
        if not -t.dim() <= channel_dim < t.dim():
            raise SignalpropError(
                f"channel_dim={channel_dim} is out of range for a tensor of shape {tuple(t.shape)}; "
                f"pass a dimension in [-{t.dim()}, {t.dim() - 1}] or None for no channels"
            )
        channel_dim %= t.dim()
    numel = t.numel()
    if numel == 0:
        out = torch.zeros(row_length(t.shape, channel_dim), dtype=torch.float64, device=t.device)
        return out
    if t.dtype in _LOW_PRECISION:
        t = t.float()
    if not t.is_contiguous():
        t = t.contiguous()
    acc = torch.float64 if careful else t.dtype
    dev = t.device

    if careful:
        mask = torch.isfinite(t)
        n_fin = mask.sum()
        x = torch.where(mask, t, torch.zeros((), dtype=t.dtype, device=dev)).to(acc)
        nonfinite = (numel - n_fin).to(torch.float64)
        n_moments = n_fin.to(torch.float64)
    else:
        x = t
        nonfinite = torch.zeros((), dtype=torch.float64, device=dev)
        n_moments = torch.tensor(float(t.numel()), dtype=torch.float64, device=dev)

    flat = x.reshape(-1)
    sumsq = torch.dot(flat, flat)
    chan = _channel_sums(x, flat, channel_dim)
    total = chan.sum()
    lo, hi = torch.aminmax(flat)

    n_x = flat.numel()
    per_sample = max(1, n_x // max(1, x.shape[0]))
    zsrc = _zero_sample(t.reshape(-1), _zero_stride(per_sample))
    zeros = (zsrc == 0).sum()
    zero_n = zsrc.numel()

    check = total  # the moments cover every element (with careful=True, NONFINITE holds the count)

    head = torch.stack(
        [
            torch.tensor(float(numel), dtype=torch.float64, device=dev),
            n_moments,
            total.to(torch.float64),
            sumsq.to(torch.float64),
            zeros.to(torch.float64),
            torch.tensor(float(zero_n), dtype=torch.float64, device=dev),
            nonfinite,
            check.to(torch.float64),
            hi.to(torch.float64),
            -lo.to(torch.float64),
        ]
    )
    return torch.cat([head, chan.to(torch.float64)])


def full_sum(t: torch.Tensor) -> torch.Tensor:
    """The non-finite check of a whole tensor: its sum (0-d, on its device), without a host synchronization.

    float32 accumulation for float32 and half types. One read of every element; finite unless an element
    is inf/nan or the sum passes 3.4e38. It is the CHECK entry of a row.

    Args:
        t: Any floating-point tensor.

    Returns:
        A 0-d tensor on ``t``'s device.

    Examples:
        >>> full_sum(torch.ones(3, dtype=torch.float16)).item(), full_sum(torch.tensor([1.0, float("inf")])).item()
        (3.0, inf)
    """
    return t.sum(dtype=torch.float32 if t.dtype in _LOW_PRECISION else t.dtype)


def compact_row(
    sumsq: torch.Tensor, zeros: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, chan: torch.Tensor
) -> torch.Tensor:
    """The compact row(s) ``[sumsq, zeros, max, -min, channel sums...]``, float64, on the device.

    From the 0-d reductions of one tensor (``chan`` of shape (C,)) or the (k,) reductions of k samples at
    once (``chan`` (k, C); one row each). One stack and one cat.

    Args:
        sumsq: The sum of squares.
        zeros: The count of exact zeros in the zero sample.
        hi: The largest element.
        lo: The smallest element (stored negated, so that ranks combine both extremes with MAX).
        chan: The per-channel sums.

    Returns:
        A float64 tensor of length :data:`COMPACT_HEADER` + C, or of shape (k, COMPACT_HEADER + C).

    Examples:
        >>> t = torch.tensor([[1.0, -1.0], [3.0, 0.0]])
        >>> compact_row((t * t).sum(), (t == 0).sum(), t.max(), t.min(), t.sum(0)).tolist()
        [11.0, 1.0, 3.0, 1.0, 4.0, -1.0]
    """
    f64 = torch.float64
    head = torch.stack([sumsq.to(f64), zeros.to(f64), hi.to(f64), -lo.to(f64)], -1)
    return torch.cat([head, chan.to(f64)], -1)


def expand_compact(compact: Sequence[float], numel: float, n: float, zero_n: float) -> list[float]:
    """The full row (layout in the module docstring) of a host copy of a compact row.

    SUM is the total of the channel sums (``math.fsum`` when finite) and is also the CHECK; NONFINITE is 0.

    Args:
        compact: The compact row, as :func:`compact_row` lays it out.
        numel: Elements in the tensor.
        n: Elements the moments cover (a sample: fewer; its CHECK is then the sample's own sum, see
            :func:`with_check`).
        zero_n: Size of the zero sample.

    Returns:
        The full row as a list of floats, :func:`tensor_sums`' layout.

    Examples:
        >>> expand_compact([11.0, 1.0, 3.0, 1.0, 4.0, -1.0], 4, 4, 4)
        [4.0, 4.0, 3.0, 11.0, 1.0, 4.0, 0.0, 3.0, 3.0, 1.0, 4.0, -1.0]
    """
    sumsq, zeros, maxv, negmin = compact[:COMPACT_HEADER]
    chan = list(compact[COMPACT_HEADER:])
    s = math.fsum(chan) if all(math.isfinite(x) for x in chan) else sum(chan)
    return [float(numel), float(n), s, sumsq, zeros, float(zero_n), 0.0, s, maxv, negmin, *chan]


def with_check(row: Sequence[float], check: float, numel: float) -> list[float]:
    """A host row of a sample with the whole tensor's CHECK (its :func:`full_sum`) and NUMEL put in.

    Args:
        row: The sample's full row.
        check: The whole tensor's :func:`full_sum`, as a float.
        numel: Elements in the whole tensor.

    Returns:
        A copy of ``row`` with ``CHECK`` and ``NUMEL`` replaced.

    Examples:
        >>> row = with_check(expand_compact([11.0, 1.0, 3.0, 1.0, 4.0, -1.0], 4, 4, 4), 5.0, 100)
        >>> row[NUMEL], row[N], row[CHECK]
        (100, 4.0, 5.0)
    """
    out = list(row)
    out[CHECK] = check
    out[NUMEL] = numel
    return out


def rows_finite(rows: torch.Tensor) -> torch.Tensor:
    """For a (..., L) tensor of rows on the host or device: True where the fast sums prove every element finite.

    A row whose SUM, SUMSQ and CHECK are finite came from a tensor without inf/nan (an overflowing float32
    sum of squares also reads as not finite: recompute such rows with ``careful=True``).

    Args:
        rows: Rows of :func:`tensor_sums`' layout, stacked along the leading dimensions.

    Returns:
        A bool tensor of shape ``rows.shape[:-1]``.

    Examples:
        >>> rows = torch.stack([tensor_sums(torch.ones(2, 2)), tensor_sums(torch.tensor([[1.0, float("nan")]]))])
        >>> rows_finite(rows).tolist()
        [True, False]
    """
    head = rows[..., [SUM, SUMSQ, CHECK]]
    return torch.isfinite(head).all(-1) & (rows[..., NONFINITE] == 0)


def stats_from_sums(row: torch.Tensor | Sequence[float], *, hist: Histogram | None = None) -> Stats:
    """Turn a row from :func:`tensor_sums` (possibly summed over ranks) into :class:`Stats`.

    ``mean = SUM / N``, ``var = max(SUMSQ / N - mean^2, 0)`` (population variance; the subtraction is done in
    float64 on the host), ``std = sqrt(var)``, ``rms = sqrt(SUMSQ / N)``, ``zero_frac = ZEROS / ZERO_N``,
    ``nonfinite_frac = NONFINITE / NUMEL``, ``absmax = max(MAXV, NEGMIN)``, and the channel averages of the module docstring. A row from the
    fast path whose sums are not finite has ``nonfinite_frac = nan`` and nan moments: the fast path cannot
    tell how many elements are bad; use ``careful=True`` for that row. All counts are float64, exact up to
    2^53 elements.

    Args:
        row: A row of :func:`tensor_sums` (or the sum of such rows over ranks), on any device or the host.
        hist: A histogram to attach (:func:`histogram_from_counts`).

    Returns:
        The :class:`~signalprop.trace.Stats`.

    Raises:
        SignalpropError: The row is shorter than a header and one channel sum.

    Examples:
        >>> s = stats_from_sums(tensor_sums(torch.tensor([[1.0, -1.0], [3.0, 1.0]])))
        >>> s.mean, s.var, s.absmax, s.chan_sq_mean, s.chan_var  # column means 2 and 0
        (1.0, 2.0, 3.0, 2.0, 1.0)
    """
    if isinstance(row, torch.Tensor):
        vals = row.detach().to("cpu", torch.float64).tolist()
    else:
        vals = [float(v) for v in row]
    if len(vals) < HEADER + 1:
        raise SignalpropError(
            f"a sums row has at least {HEADER + 1} entries (header + channel sums), got {len(vals)}; "
            "pass a row returned by tensor_sums (or a sum of such rows)"
        )
    numel, n, s, ss, zeros, zero_n, nonfinite, check, maxv, negmin = vals[:HEADER]
    absmax = max(maxv, negmin) if numel else NAN
    chan = vals[HEADER:]
    fast_bad = not (math.isfinite(s) and math.isfinite(ss) and math.isfinite(check))
    if fast_bad and nonfinite == 0:
        return Stats(
            absmax=absmax,
            zero_frac=zeros / zero_n if zero_n else NAN,
            nonfinite_frac=NAN,
            numel=int(numel),
        )
    if n > 0:
        mean = s / n
        ms = ss / n
        var = max(ms - mean * mean, 0.0)
        c = len(chan)
        per_chan = n / c
        chan_sq_mean = sum((cs / per_chan) ** 2 for cs in chan) / c
        chan_var = max(ms - chan_sq_mean, 0.0)
        rms = math.sqrt(ms)
        std = math.sqrt(var)
    else:
        mean = var = std = rms = chan_sq_mean = chan_var = NAN
        absmax = NAN
    return Stats(
        mean=mean,
        var=var,
        std=std,
        rms=rms,
        absmax=absmax,
        zero_frac=zeros / zero_n if zero_n else NAN,
        nonfinite_frac=nonfinite / numel if numel else 0.0,
        numel=int(numel),
        chan_sq_mean=chan_sq_mean,
        chan_var=chan_var,
        hist=hist,
    )


def tensor_histogram(t: torch.Tensor, *, bins: int, lo: float, hi: float) -> torch.Tensor:
    """Counts of ``t``'s finite elements in ``bins`` equal bins over [lo, hi], as a float64 device tensor.

    Values outside [lo, hi] are not counted (pick the range from a first pass's absmax, as measure does).
    Counts of the same tensor split across ranks add up. Low-precision tensors are counted in float32.

    Args:
        t: Any floating-point tensor.
        bins: The number of bins, a positive integer.
        lo: The left edge of the first bin.
        hi: The right edge of the last bin (``hi == lo`` widens the range to [lo - 0.5, hi + 0.5]).

    Returns:
        A float64 tensor of ``bins`` counts on ``t``'s device.

    Raises:
        SignalpropError: ``bins`` is not a positive integer, or the range is not finite with lo <= hi.

    Examples:
        >>> tensor_histogram(torch.tensor([0.0, 0.5, 1.0, 2.0, float("nan")]), bins=2, lo=0.0, hi=1.0).tolist()
        [1.0, 2.0]
    """
    t = _check_tensor(t).detach()
    if not isinstance(bins, int) or bins < 1:
        raise SignalpropError(f"bins must be a positive integer, got {bins!r}")
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo:
        raise SignalpropError(f"histogram range must be finite with lo <= hi, got [{lo}, {hi}]")
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    x = t.reshape(-1)
    if x.dtype in _LOW_PRECISION:
        x = x.float()
    x = x[torch.isfinite(x)]
    return torch.histc(x, bins=bins, min=lo, max=hi).to(torch.float64)


def histogram_from_counts(counts: torch.Tensor | Sequence[float], lo: float, hi: float) -> Histogram:
    """A :class:`~signalprop.trace.Histogram` from counts over ``len(counts)`` equal bins of [lo, hi].

    Args:
        counts: The counts, e.g. :func:`tensor_histogram`'s (summed over ranks).
        lo: The left edge of the first bin.
        hi: The right edge of the last bin.

    Returns:
        The Histogram, counts rounded to integers.

    Examples:
        >>> histogram_from_counts(torch.tensor([1.0, 2.0]), 0.0, 1.0)
        Histogram(edges=(0.0, 0.5, 1.0), counts=(1, 2))
    """
    vals = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    b = len(vals)
    edges = tuple(lo + (hi - lo) * i / b for i in range(b + 1))
    return Histogram(edges=edges, counts=tuple(int(round(c)) for c in vals))


def _channel_sums(x: torch.Tensor, flat: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
    """The sum of each channel of ``x`` (one sum, as a 1-element tensor, when ``channel_dim`` is None)."""
    if channel_dim is None:
        return flat.sum().reshape(1)
    if channel_dim == x.dim() - 1:
        return x.reshape(-1, x.shape[-1]).sum(0)
    lead = 1
    for s in x.shape[:channel_dim]:
        lead *= s
    return x.reshape(lead, x.shape[channel_dim], -1).sum((0, 2))


def _fast_parts(
    t: torch.Tensor, channel_dim: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The fast path's device reductions of a non-empty tensor, nothing else: (sumsq, min, max, zeros,
    channel sums, zero-sample size). Five kernels; the rest of the row is known on the host."""
    if t.dtype in _LOW_PRECISION:
        t = t.float()
    if not t.is_contiguous():
        t = t.contiguous()
    flat = t.view(-1)
    sumsq = torch.dot(flat, flat)
    chan = _channel_sums(t, flat, channel_dim)
    lo, hi = torch.aminmax(flat)
    zsrc = _zero_sample(flat, _zero_stride(max(1, flat.numel() // max(1, t.shape[0]))))
    zeros = (zsrc == 0).sum()
    return sumsq, lo, hi, zeros, chan, zsrc.numel()
