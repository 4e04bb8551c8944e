"""Tests of the on-device reductions (signalprop.stats): exact against torch, additive across splits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from signalprop import SignalpropError
from signalprop.stats import (
    HEADER,
    MAX_POSITIONS,
    ZERO_PER_SAMPLE,
    histogram_from_counts,
    row_length,
    rows_finite,
    stats_from_sums,
    tensor_histogram,
    tensor_sums,
)


def _reference(t: torch.Tensor, channel_dim: int | None) -> dict[str, float]:
    x = t.double()
    out = {
        "mean": x.mean().item(),
        "var": x.var(unbiased=False).item(),
        "absmax": x.abs().max().item(),
        "zero_frac": (x == 0).double().mean().item(),
    }
    if channel_dim is not None:
        xc = x.movedim(channel_dim, 0).reshape(x.shape[channel_dim], -1)
        out["chan_sq_mean"] = (xc.mean(1) ** 2).mean().item()
        out["chan_var"] = xc.var(1, unbiased=False).mean().item()
    return out


shapes = st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple)


@given(shape=shapes, scale=st.sampled_from([1e-3, 1.0, 50.0]), shift=st.sampled_from([0.0, 0.5, 3.0]),
       relu=st.booleans())
def test_moments_match_float64_reference(shape: tuple[int, ...], scale: float, shift: float, relu: bool) -> None:
    t = torch.randn(shape) * scale + shift * scale
    if relu:
        t = t.relu()
    s = stats_from_sums(tensor_sums(t))
    ref = _reference(t, 1)
    # float32 sums of <= 1296 elements: relative error well below 1e-5 of the second moment
    tol = 1e-5 * (ref["mean"] ** 2 + ref["var"]) + 1e-30
    assert s.mean == pytest.approx(ref["mean"], abs=math.sqrt(tol) * 1e-2 + 1e-6 * scale)
    assert s.var == pytest.approx(ref["var"], abs=tol)
    assert s.std == pytest.approx(math.sqrt(ref["var"]), abs=math.sqrt(tol) + 1e-6 * scale)
    assert s.rms == pytest.approx(math.sqrt(ref["mean"] ** 2 + ref["var"]), rel=1e-5)
    assert s.absmax == pytest.approx(ref["absmax"], rel=1e-6)
    assert s.zero_frac == ref["zero_frac"]
    assert s.nonfinite_frac == 0.0
    assert s.numel == t.numel()
    assert s.chan_sq_mean == pytest.approx(ref["chan_sq_mean"], abs=tol)
    assert s.chan_var == pytest.approx(ref["chan_var"], abs=tol)


def test_channel_dims_last_and_none() -> None:
    t = torch.randn(4, 7, 5) + torch.arange(5.0)  # (B, T, C): channel means 0..4 along the last dim
    s = stats_from_sums(tensor_sums(t, channel_dim=-1))
    ref = _reference(t, -1)
    assert s.chan_sq_mean == pytest.approx(ref["chan_sq_mean"], rel=1e-5)
    assert s.chan_var == pytest.approx(ref["chan_var"], rel=1e-5)
    s0 = stats_from_sums(tensor_sums(t, channel_dim=None))
    assert s0.chan_sq_mean == pytest.approx(t.double().mean().item() ** 2, rel=1e-5)
    assert len(tensor_sums(t, channel_dim=-1)) == row_length(t.shape, -1) == HEADER + 5
    assert len(tensor_sums(torch.tensor(3.0))) == HEADER + 1


def test_split_rows_combine_exactly_like_the_whole_batch() -> None:
    # large enough that the zero count is strided; the stride divides the per-sample size
    t = torch.randn(8, 16, 32, 32).relu()
    assert t[0].numel() >= 2 * ZERO_PER_SAMPLE
    whole = tensor_sums(t)
    parts = [tensor_sums(p) for p in t.chunk(4)]
    combined = torch.stack(parts).sum(0)
    for p in MAX_POSITIONS:
        combined[p] = torch.stack(parts)[:, p].max()
    a, b = stats_from_sums(whole), stats_from_sums(combined)
    assert a.zero_frac == b.zero_frac
    assert a.absmax == b.absmax
    assert a.var == pytest.approx(b.var, rel=1e-5)
    assert a.chan_var == pytest.approx(b.chan_var, rel=1e-5)
    # the zero sample's fraction is within 5 standard errors of the exact one
    exact = (t == 0).double().mean().item()
    assert abs(a.zero_frac - exact) < 5 * math.sqrt(0.25 / (t.numel() / 16))


def test_nonfinite_fast_row_flags_and_careful_row_counts() -> None:
    t = torch.randn(10, 20)
    t[0, 0] = float("inf")
    t[3, 4] = float("nan")
    fast = tensor_sums(t)
    assert not bool(rows_finite(fast))
    s_fast = stats_from_sums(fast)
    assert math.isnan(s_fast.nonfinite_frac)
    careful = tensor_sums(t, careful=True)
    s = stats_from_sums(careful)
    assert s.nonfinite_frac == pytest.approx(2 / 200)
    finite = t[torch.isfinite(t)].double()
    assert s.mean == pytest.approx(finite.mean().item(), rel=1e-9)
    assert s.var == pytest.approx(finite.var(unbiased=False).item(), rel=1e-9)
    assert s.absmax == pytest.approx(finite.abs().max().item())
    assert all(math.isfinite(v) for v in (s.mean, s.var, s.std, s.rms, s.absmax, s.chan_var))


def test_float32_square_overflow_is_caught_and_careful_path_is_exact() -> None:
    t = torch.randn(64, 64) * 1e21  # squares overflow float32, every element is finite
    assert not bool(rows_finite(tensor_sums(t)))
    s = stats_from_sums(tensor_sums(t, careful=True))
    assert s.nonfinite_frac == 0.0
    assert s.std == pytest.approx(t.double().std(unbiased=False).item(), rel=1e-9)
    assert math.isfinite(s.chan_var)


def test_low_precision_tensors_are_reduced_in_float32() -> None:
    t = torch.randn(32, 8).bfloat16()
    s = stats_from_sums(tensor_sums(t))
    assert s.var == pytest.approx(t.float().double().var(unbiased=False).item(), rel=1e-5)
    big = torch.full((4, 4), 3.0e38, dtype=torch.float32).bfloat16()
    assert stats_from_sums(tensor_sums(big, careful=True)).absmax == pytest.approx(big.float().max().item())


def test_empty_tensor_gives_nan_moments() -> None:
    s = stats_from_sums(tensor_sums(torch.zeros(0, 3)))
    assert s.numel == 0 and math.isnan(s.mean) and math.isnan(s.absmax)


def test_bad_arguments_raise_signalprop_error() -> None:
    with pytest.raises(SignalpropError, match="floating-point"):
        tensor_sums(torch.arange(4))
    with pytest.raises(SignalpropError, match="torch.Tensor"):
        tensor_sums([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="channel_dim"):
        tensor_sums(torch.randn(2, 3), channel_dim=5)
    with pytest.raises(SignalpropError, match="entries"):
        stats_from_sums([1.0, 2.0])
    with pytest.raises(SignalpropError, match="bins"):
        tensor_histogram(torch.randn(3), bins=0, lo=0, hi=1)


def test_histogram_counts_every_finite_element() -> None:
    t = torch.randn(1000)
    t[0] = float("nan")
    lo, hi = t[1:].min().item(), t[1:].max().item()
    counts = tensor_histogram(t, bins=20, lo=lo, hi=hi)
    h = histogram_from_counts(counts, lo, hi)
    assert sum(h.counts) == 999
    assert len(h.edges) == 21 and h.edges[0] == lo and h.edges[-1] == pytest.approx(hi)


def test_row_batch_rows_equal_standalone_rows() -> None:
    from signalprop.measurement._rowbatch import RowBatch

    tensors = [torch.randn(4, 6, 5, 5).relu(), torch.randn(3, 7, 2) * 1e3, torch.randn(5, 9).double(),
               torch.randn(2, 300, 300).bfloat16(), torch.tensor(2.0), torch.zeros(0, 4)]
    batch = RowBatch()
    keys = [batch.add(t, channel_dim=-1 if t.dim() == 3 else "auto") for t in tensors]
    keys.append(batch.add(tensors[1], channel_dim=-1, careful=True))
    vec = batch.device_vector()
    assert vec.dtype == torch.float64
    rows = batch.rows(vec.cpu())
    for key, t in zip(keys, [*tensors, tensors[1]]):
        a = stats_from_sums(rows[key])
        b = stats_from_sums(tensor_sums(t, channel_dim=-1 if t.dim() == 3 else "auto"))
        for f in ("mean", "var", "absmax", "zero_frac", "chan_var", "nonfinite_frac"):
            x, y = getattr(a, f), getattr(b, f)
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-5, abs=1e-12), f
    maxed = set(batch.max_positions())
    assert len(maxed) == 2 * len(keys)
