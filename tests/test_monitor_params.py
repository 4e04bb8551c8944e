"""The Monitor's parameter norms in padded float64 buffers: the numbers of one float64 norm per tensor."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from signalprop.monitor import Monitor
from signalprop.monitor._params import ParamNorms, padded_length

CPU = torch.device("cpu")


def _unpack(pn: ParamNorms, vec: torch.Tensor) -> list[tuple[float, float, float, float]]:
    """(norm, grad norm, update norm, previous norm) of each parameter, in parameter order."""
    k = len(pn.params)
    v = vec.tolist()
    return [tuple(v[j * k + pn.position[i]] for j in range(4)) for i in range(k)]  # type: ignore[misc]


def _norm64(t: torch.Tensor) -> float:
    return float(t.detach().to_dense().double().norm())


def _params(gen: torch.Generator, sizes: list[tuple[int, ...]], scale: float = 1.0) -> list[nn.Parameter]:
    ps = []
    for s in sizes:
        p = nn.Parameter(torch.randn(s, generator=gen) * scale)
        p.grad = torch.randn(s, generator=gen) * scale
        ps.append(p)
    return ps


SIZES = [(32, 3, 3, 3), (32,), (64, 32, 3, 3), (10, 64), (10,), (300,), (7, 5), (1,), (3, 4, 5)]


@given(
    seed=st.integers(0, 2**31 - 1),
    small=st.sampled_from([0, 50, 1 << 16]),
    budget=st.sampled_from([0, 4096, 64 << 20]),
    scale=st.sampled_from([1e-30, 1.0, 1e20]),
)
def test_norms_equal_one_float64_norm_per_tensor(seed: int, small: int, budget: int, scale: float) -> None:
    """Every grouping (all padded, some, none: ``small``/``budget``) gives each parameter's value, gradient,
    update and previous norm as a float64 norm of that tensor would, for values whose float32 squares
    underflow (1e-30) or overflow (1e20, norms past 1.8e19)."""
    gen = torch.Generator().manual_seed(seed)
    ps = _params(gen, SIZES, scale)
    pn = ParamNorms(ps, update=True, small=small, budget=budget)
    pn.begin(True)
    before = [p.detach().clone() for p in ps]
    with torch.no_grad():
        for p in ps:
            p.add_(torch.randn(p.shape, generator=gen) * scale * 1e-3)
    got = _unpack(pn, pn.vector(CPU))
    for p, b, (n, g, u, prev) in zip(ps, before, got):
        assert p.grad is not None
        assert n == pytest.approx(_norm64(p), rel=1e-12)
        assert g == pytest.approx(_norm64(p.grad), rel=1e-12)
        # (the per-tensor path subtracts in float32: each difference rounded, relative error <= 2^-24)
        assert u == pytest.approx(float((p.detach().double() - b.double()).norm()), rel=1e-7)
        assert prev == pytest.approx(_norm64(b), rel=1e-12)
        assert all(math.isfinite(x) and x > 0 for x in (n, g, u, prev))


def test_second_step_reuses_the_buffers_and_the_large_norms() -> None:
    """Steps after the first: the rows are overwritten (no stale values), and a large parameter's previous
    norm, taken from the vector just before the snapshot, is the snapshot's norm."""
    gen = torch.Generator().manual_seed(1)
    ps = _params(gen, SIZES)
    pn = ParamNorms(ps, update=True, small=100)
    assert pn.groups and pn.large
    for _ in range(3):
        pn.begin(True)
        before = [p.detach().clone() for p in ps]
        with torch.no_grad():
            for p in ps:
                p.mul_(1.5)
                p.grad = torch.randn(p.shape, generator=gen)
        for p, b, (n, g, u, prev) in zip(ps, before, _unpack(pn, pn.vector(CPU))):
            assert n == pytest.approx(_norm64(p), rel=1e-12)
            assert g == pytest.approx(_norm64(p.grad), rel=1e-12)  # type: ignore[arg-type]
            assert u == pytest.approx(0.5 * _norm64(b), rel=1e-6)
            assert prev == pytest.approx(_norm64(b), rel=1e-12)


@given(seed=st.integers(0, 2**31 - 1), recorded=st.lists(st.booleans(), min_size=1, max_size=8))
def test_snapshot_is_the_value_at_the_start_of_each_recorded_step(seed: int, recorded: list[bool]) -> None:
    """Any pattern of recorded and unrecorded steps (``every`` > 1, or recording switched on and off): the
    update and previous norms of a recorded step are those of the change since that step began, whether
    the snapshot was copied (the step before was not recorded) or is the value rows the step before has
    just filled, which then swap roles with the snapshot rows."""
    gen = torch.Generator().manual_seed(seed)
    ps = _params(gen, SIZES)
    pn = ParamNorms(ps, update=True, small=100)
    assert pn.groups and pn.large
    for rec in recorded:
        pn.begin(rec)
        before = [p.detach().clone() for p in ps]
        with torch.no_grad():
            for p in ps:
                p.add_(torch.randn(p.shape, generator=gen))
        if not rec:
            continue
        for p, b, (n, _, u, prev) in zip(ps, before, _unpack(pn, pn.vector(CPU))):
            assert n == pytest.approx(_norm64(p), rel=1e-12)
            assert u == pytest.approx(float((p.detach().double() - b.double()).norm()), rel=1e-6)
            assert prev == pytest.approx(_norm64(b), rel=1e-12)


def test_missing_and_sparse_gradients() -> None:
    """A parameter without .grad reads -1 (what the Monitor turns into "no gradient"); a sparse gradient
    (an Embedding with sparse=True), small or large, gets its own norm."""
    gen = torch.Generator().manual_seed(2)
    emb_small, emb_large = nn.Embedding(10, 4, sparse=True), nn.Embedding(300, 4, sparse=True)
    lin = nn.Linear(4, 3)
    ids = torch.tensor([1, 3, 3])
    (emb_small(ids).sum() + emb_large(ids).sum()).backward()
    lin.bias.grad = None
    lin.weight.grad = torch.randn(3, 4, generator=gen)
    ps = [emb_small.weight, emb_large.weight, lin.weight, lin.bias]
    pn = ParamNorms(ps, update=True, small=100)
    pn.begin(True)
    got = _unpack(pn, pn.vector(CPU))
    assert emb_small.weight.grad is not None and emb_small.weight.grad.is_sparse
    assert got[0][1] == pytest.approx(_norm64(emb_small.weight.grad), rel=1e-12)
    assert got[1][1] == pytest.approx(_norm64(emb_large.weight.grad), rel=1e-12)  # type: ignore[arg-type]
    assert got[2][1] == pytest.approx(_norm64(lin.weight.grad), rel=1e-12)
    assert got[3][1] == -1.0 and got[3][0] == pytest.approx(_norm64(lin.bias), rel=1e-12)


@pytest.mark.parametrize("update", [True, False])
def test_no_snapshot_gives_nan_updates(update: bool) -> None:
    """Without updates (update=False), or on a step that took no snapshot, the update and previous norms
    are NaN, the norms still exact."""
    gen = torch.Generator().manual_seed(3)
    ps = _params(gen, SIZES)
    pn = ParamNorms(ps, update=update, small=100)
    pn.begin(False)
    for p, (n, g, u, prev) in zip(ps, _unpack(pn, pn.vector(CPU))):
        assert n == pytest.approx(_norm64(p), rel=1e-12) and g == pytest.approx(_norm64(p.grad), rel=1e-12)  # type: ignore[arg-type]
        assert math.isnan(u) and math.isnan(prev)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    ps = [nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SIZES]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(dtype)
    pn = ParamNorms(ps, update=True, small=100)
    pn.begin(True)
    with torch.no_grad():
        for p in ps:
            p.mul_(2)
    for p, (n, g, u, prev) in zip(ps, _unpack(pn, pn.vector(CPU))):
        assert n == pytest.approx(_norm64(p), rel=1e-12) and g == pytest.approx(_norm64(p.grad), rel=1e-12)  # type: ignore[arg-type]
        assert prev == pytest.approx(n / 2, rel=1e-12) and u == pytest.approx(n / 2, rel=1e-3)


def test_a_cnn_takes_a_few_groups_and_no_per_tensor_norm(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 20-layer CNN's 42 parameters: a handful of padded groups, and not one per-tensor norm a step."""
    import signalprop as sp

    model = sp.models.plain_cnn(20, 32)
    ps = list(model.parameters())
    for p in ps:
        p.grad = torch.ones_like(p)
    pn = ParamNorms(ps, update=True)
    assert not pn.large and len(pn.groups) == 2  # the 19 3x3 32->32 kernels; every other parameter
    assert pn.nbytes <= 4 * 8 * (1.25 * 19 * 9216 + 23 * 1024)
    calls: list[int] = []
    real = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: calls.append(len(ts)) or real(ts, *a, **k))
    pn.begin(True)
    pn.vector(CPU)
    assert calls == []


@given(n=st.integers(1, 10**7))
def test_padded_length_wastes_at_most_a_quarter(n: int) -> None:
    length = padded_length(n)
    assert n <= length <= max(4, 1.25 * n)


def test_monitor_trains_a_sparse_embedding() -> None:
    """A model with a sparse-gradient Embedding (SGD on sparse gradients): the Monitor records its gradient
    norm, the coalesced gradient's, instead of failing in step() (no float64 norm kernel for sparse)."""
    torch.manual_seed(0)
    emb = nn.EmbeddingBag(50, 8, mode="sum", sparse=True)
    model = nn.Sequential(emb, nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.tensor([[1, 2, 2], [4, 1, 7]])
    with Monitor(model) as mon:
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        grad = emb.weight.grad
        assert grad is not None and grad.is_sparse
        expected = float(grad.to_dense().double().norm())
        opt.step()
        mon.step()
    assert mon.history[0].params["0.weight"].grad_norm == pytest.approx(expected, rel=1e-12)
