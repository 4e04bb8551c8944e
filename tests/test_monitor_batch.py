"""The Monitor's batched sample store and its reuse of checks: same numbers as the per-tensor path, fewer ops."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import signalprop as sp
from signalprop.monitor import Monitor, NonFiniteWarning
from signalprop.monitor import _monitor as monitor_mod
from signalprop.monitor._batch import PrefixBatch
from signalprop.monitor._sums import compact_sums, finite_preserving, sample_of


def _reference_row(t: torch.Tensor, cd: int | None, sample: int) -> list[float]:
    row, _, _, _ = compact_sums(t, cd, sample)
    return row.tolist()


@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(6, 5, 4, 4), (40, 30), (3, 7, 12), (4, 3, 64, 64), (9, 2, 5, 3, 2)]),
    sample=st.sampled_from([16, 200, 5000]),
    zeros=st.booleans(),
    group_bytes=st.sampled_from([1 << 12, 1 << 16, 8 << 20]),
)
def test_batched_rows_equal_the_per_tensor_rows(
    seed: int, shape: tuple[int, ...], sample: int, zeros: bool, group_bytes: int
) -> None:
    """Every statistic of a batched sample equals compact_sums' to float64 rounding, whether the layout's
    buffer is reduced once at the end or several times as it fills (small ``group_bytes``)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=gen) * (1 + i) for i in range(7)]
    if zeros:
        tensors = [t.relu() for t in tensors]
    cd = 1 if len(shape) > 1 else None
    batch = PrefixBatch(sample, group_bytes=group_bytes)
    tickets = [batch.add(t, cd) for t in tensors]
    if any(tk is None for tk in tickets):  # too large for this buffer size: the caller's per-tensor path
        assert all(tk is None for tk in tickets)
        assert 2 * 8 * sample_of(tensors[0], sample, cd).numel() > group_bytes
        return
    blocks = batch.finish()
    assert len(blocks) == 1
    for t, tk in zip(tensors, tickets):
        assert tk is not None
        got = blocks[tk[0]][tk[1]].tolist()
        want = _reference_row(t, cd, sample)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
        _, _, check, counts = compact_sums(t, cd, sample)
        assert counts is not None and (tk[2], tk[3]) == counts
        assert tk[4] == (check is not None)  # partial sample: the caller adds the full-tensor check


def test_layouts_get_their_own_groups_and_the_store_is_reused_across_steps() -> None:
    batch = PrefixBatch(100)
    a, b, a2 = torch.randn(4, 3, 8, 8), torch.randn(40, 10), torch.randn(4, 3, 8, 8)
    t1, t2, t3 = batch.add(a, 1), batch.add(b, 1), batch.add(a2, 1)
    assert t1 is not None and t2 is not None and t3 is not None
    assert t1[:3] == (0, 0, 192) and t2[:3] == (1, 0, 100) and t3[:3] == (0, 1, 192)  # 1 sample; 10 rows
    first = batch.finish()
    assert [tuple(x.shape) for x in first] == [(2, 4 + 3), (1, 4 + 10)]
    buffers = [g.buf.data_ptr() for g in batch._groups.values()]  # 4 slots each, neither filled
    again = batch.add(a2, 1)
    assert again is not None and again[:2] == (0, 0)  # a fresh step starts at slot 0 of the same buffer
    assert [g.buf.data_ptr() for g in batch._groups.values()] == buffers
    second = batch.finish()
    assert second[0][0].tolist() == pytest.approx(_reference_row(a2, 1, 100), rel=1e-12)
    assert first[1][0].tolist() == pytest.approx(_reference_row(b, 1, 100), rel=1e-12)
    assert batch.add(torch.zeros(0, 3), 1) is None and batch.add(torch.tensor(1.0), None) is None


def test_a_monitored_tensor_costs_one_copy_and_one_full_read_in_the_hook(
    count_ops: type[TorchDispatchMode],
) -> None:
    """What the hooks do per sampled tensor: copy the sample into its slot, sum the whole tensor; and for
    the output of a ReLU that reads a checked tensor, only the copy."""
    mon = Monitor(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    call = monitor_mod._Call("x", "Conv2d", True, 0)
    call.channel_dim = 1
    t = torch.randn(64, 8, 16, 16)
    mon._sums(t, call, "fwd", check=True)  # the first step allocates the layout's buffer, once
    assert mon._batch is not None
    mon._batch.finish()
    with count_ops() as mode:
        mon._sums(t, call, "fwd", check=True)
    assert [op for op, _ in mode.ops] == ["aten.copy_", "aten.sum"], mode.ops
    assert [op for op, n in mode.ops if n == t.numel()] == ["aten.sum"]
    with count_ops() as mode:
        mon._sums(t, call, "bwd", check=False)
    assert [op for op, _ in mode.ops] == ["aten.copy_"], mode.ops


def test_batched_and_per_tensor_monitors_record_the_same_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    def run(group_bytes: int) -> list[sp.Trace]:
        torch.manual_seed(3)
        model = sp.models.plain_cnn(5, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(1)
        with Monitor(model, sample=256) as mon:
            mon._batch = PrefixBatch(256, group_bytes=group_bytes)
            for _ in range(3):
                x = torch.randn(16, 3, 12, 12, generator=gen)
                opt.zero_grad()
                model(x).logsumexp(1).mean().backward()
                opt.step()
                mon.step()
        return [r.trace for r in mon.history]

    batched, single = run(8 << 20), run(0)  # group_bytes=0: nothing fits, every tensor on its own
    for a, b in zip(batched, single):
        assert a.names == b.names
        for la, lb in zip(a, b):
            for sa, sb in ((la.fwd, lb.fwd), (la.bwd, lb.bwd)):
                assert sa is not None and sb is not None
                for f in ("mean", "std", "rms", "absmax", "zero_frac", "chan_sq_mean", "chan_var"):
                    assert getattr(sa, f) == pytest.approx(getattr(sb, f), rel=1e-9, abs=1e-12), (la.name, f)
                assert sa.numel == sb.numel and sa.nonfinite_frac == sb.nonfinite_frac


@pytest.mark.parametrize(
    ("module", "expected"),
    [(nn.ReLU(), True), (nn.ReLU(inplace=True), True), (nn.GELU(), True), (nn.MaxPool2d(2), True),
     (nn.Flatten(), True), (nn.LeakyReLU(0.1), True), (nn.LeakyReLU(3.0), False), (nn.AvgPool2d(2), False),
     (nn.SELU(), False), (nn.Conv2d(1, 1, 1), False), (type("MyReLU", (nn.ReLU,), {})(), False)],
)
def test_which_modules_reuse_their_inputs_check(module: nn.Module, expected: bool) -> None:
    assert finite_preserving(module) is expected


def _checked_calls(mon: Monitor, model: nn.Module, x: torch.Tensor) -> list[str]:
    """Names of the calls of one recorded step whose output check an earlier call's full check vouched for."""
    seen: list[str] = []
    close = mon._close_step

    def spy() -> None:
        seen.extend(c.name for c in mon._calls if c.fwd_from is not None)
        close()

    mon._close_step = spy  # type: ignore[method-assign]
    model(x).sum().backward()
    mon.step()
    return seen


@pytest.mark.parametrize(("shape", "cd", "sample", "index"), [
    ((8, 32, 32, 32), 1, 16384, (slice(0, 1), slice(None), slice(None, None, 2))),  # NCHW: every other row
    ((8, 32, 32, 32), 1, 8192, (slice(0, 1), slice(None), slice(None, None, 4))),
    ((8, 32, 32, 32), 1, 32768, (slice(0, 1),)),  # one image is the sample
    ((8, 32, 32, 32), 1, 40000, (slice(0, 2),)),  # the fewest leading images
    ((8, 32, 32, 32), 3, 16384, (slice(0, 1), slice(None, None, 2))),  # channels last: every other row
    ((4, 64, 512), 2, 8192, (slice(0, 1), slice(None, None, 4))),  # (batch, tokens, features): every 4th token
    ((4, 64, 512), None, 8192, (slice(0, 1), slice(None, None, 4))),
    ((8, 4096, 2, 2), 1, 2048, (slice(0, 1),)),  # rows of 2 elements: too short to stride over
    ((8, 32, 32, 32), 0, 16, (slice(None),)),  # channel dimension 0: every sample
    ((40000,), -1, 16384, (slice(None),)),  # a 1-d tensor of channels, the dimension given from the end
    ((64, 300), 1, 512, (slice(0, 2),)),
])
def test_the_sample_is_the_leading_samples_or_every_kth_row_of_one(
    shape: tuple[int, ...], cd: int | None, sample: int, index: tuple[slice, ...]
) -> None:
    t = torch.randn(shape)
    got = sample_of(t, sample, cd)
    want = t[index]
    assert got.shape == want.shape and torch.equal(got, want)
    assert got.numel() >= min(sample, t.numel())
    if got.numel() < t[0].numel():  # strided within one sample: about `sample` elements, every channel
        assert got.numel() < 2 * sample and (cd is None or got.shape[cd] == t.shape[cd])
    assert got.data_ptr() == t.data_ptr()  # a view


def test_a_strided_sample_batches_to_the_per_tensor_row_and_stays_exact_for_offset_views() -> None:
    base = torch.randn(10, 32, 32, 32)
    for t in (base, base[2:], base.permute(0, 2, 3, 1)):  # an offset view and a channels-last layout
        cd = 3 if t.stride()[-1] != 1 else 1
        batch = PrefixBatch(8192)
        tk = batch.add(t, cd)
        assert tk is not None and tk[2] == sample_of(t, 8192, cd).numel() == 8192
        (block,) = batch.finish()
        assert block[tk[1]].tolist() == pytest.approx(_reference_row(t, cd, 8192), rel=1e-12)
        assert torch.equal(sample_of(t, 8192, cd), t[:1, :, ::4] if cd == 1 else t[:1, ::4])


def test_activation_outputs_reuse_the_check_of_the_tensor_they_read() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 5), nn.Tanh())
    with Monitor(model, sample=64) as mon:
        names = _checked_calls(mon, model, torch.randn(16, 3, 8, 8))
    assert names == ["1", "2", "3", "5"]
    layers = mon.history[0].trace
    assert all(layer.fwd.finite and layer.fwd.numel == layer.fwd.numel for layer in layers)
    assert layers["1"].fwd.numel == 16 * 8 * 8 * 8  # the whole tensor's count, not the sample's


class _Meddle(nn.Module):
    """Changes the conv's output in place between its hook and the activation's: the check must not carry over."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.poison = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.poison:
            y[-1, 0, 0, 0] = math.inf
        return self.act(y)


def test_a_tensor_changed_in_place_after_its_check_gets_its_own() -> None:
    model = _Meddle()
    with Monitor(model, sample=32) as mon:
        assert _checked_calls(mon, model, torch.randn(8, 3, 6, 6)) == ["act"]
        model.poison = True
        with pytest.warns(NonFiniteWarning, match=r"step 1, in act \(forward"):
            assert _checked_calls(mon, model, torch.randn(8, 3, 6, 6)) == []
    last = mon.history[-1].trace
    assert last["conv"].fwd.finite and not last["act"].fwd.finite


@contextmanager
def _monitor_beside_hook(
    model: nn.Module, module: nn.Module, where: str, change: Callable[[torch.Tensor], torch.Tensor], **kw: Any
) -> Iterator[Monitor]:
    """A running Monitor on ``model`` while another hook applies ``change`` to ``module``'s input (``where``
    "pre": a pre-hook registered after the Monitor's, so it runs after the Monitor's pre-hook) or output
    ("post": a forward hook registered before the Monitor's, so it runs first; "global": a global one)."""
    handles = []
    if where == "post":
        handles.append(module.register_forward_hook(lambda m, a, o: change(o)))
    elif where == "global":
        handles.append(nn.modules.module.register_module_forward_hook(
            lambda m, a, o: change(o) if m is module else None))
    try:
        with Monitor(model, **kw) as mon:
            if where == "pre":
                handles.append(module.register_forward_pre_hook(lambda m, a: (change(a[0]),)))
            yield mon
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("where", ["pre", "post", "global"])
def test_an_activation_with_another_hook_takes_its_own_check(where: str) -> None:
    """A hook that may change an activation's input or output (a pre-hook run after the Monitor's, a forward
    hook run before it, a global forward hook) can put an inf there that the input's check never saw: the
    output then takes its own full sum, and the inf, planted outside the sample, is reported in that layer
    (before, the input's check vouched for it: the inf went unreported)."""
    def plant(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[-1, 0, -1, -1] = math.inf  # the last element: outside the 32-element sample
        return t

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    with _monitor_beside_hook(model, model[1], where, plant, sample=32) as mon:
        with pytest.warns(NonFiniteWarning, match=r"step 0, in 1 \(forward"):
            # (the flatten still reuses the ReLU's check, except under a global hook, which it has too)
            assert _checked_calls(mon, model, torch.randn(8, 3, 6, 6)) == ([] if where == "global" else ["2"])
    trace = mon.history[0].trace
    assert [layer.fwd.finite for layer in trace] == [True, False, False]


def test_a_nonfinite_input_is_inherited_by_the_activations_that_reuse_its_check() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    x = torch.randn(8, 3, 6, 6)
    x[-1, 0, 2, 2] = math.nan  # outside the 32-element sample
    with Monitor(model, sample=32) as mon:
        with pytest.warns(NonFiniteWarning, match=r"step 0, in 0 \(forward"):
            assert _checked_calls(mon, model, x) == ["1", "2"]
    trace = mon.history[0].trace
    assert [layer.fwd.finite for layer in trace] == [False, False, False]


def test_buffers_of_shapes_that_come_and_go_are_freed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Variable shapes (sequence lengths) must not keep a buffer each forever."""
    import signalprop.monitor._batch as mb

    monkeypatch.setattr(mb, "TOTAL_BYTES", 1 << 20)
    batch = PrefixBatch(1000)
    for length in range(40, 80):  # one new (1, length, 64) sample layout per step
        t = torch.randn(2, length, 64)
        assert batch.add(t, -1) is not None
        (block,) = batch.finish()
        assert block.shape == (1, 4 + 64)
        assert block[0].tolist() == pytest.approx(_reference_row(t, 2, 1000), rel=1e-12)
        assert batch.nbytes <= (1 << 20) + 4 * 8 * 80 * 64  # past the limit only this step's buffer stays
    assert len(batch._groups) < 40


def test_a_buffer_grows_to_what_a_step_needs_and_then_stays() -> None:
    batch = PrefixBatch(64)
    ts = [torch.randn(3, 64) * (i + 1) for i in range(11)]
    sizes = []
    for _ in range(4):
        tickets = [batch.add(t, 1) for t in ts]
        (block,) = batch.finish()
        for t, tk in zip(ts, tickets):
            assert tk is not None
            assert block[tk[1]].tolist() == pytest.approx(_reference_row(t, 1, 64), rel=1e-12)
        sizes.append(len(next(iter(batch._groups.values())).slots))
    assert sizes == [8, 16, 16, 16]  # 4 -> 8 in the first step, 8 -> 16 in the second, then it fits


@given(
    seed=st.integers(0, 2**31 - 1),
    plan=st.lists(st.tuples(st.booleans(), st.integers(0, 100), st.sampled_from([(0.0, None), (0.0, 6.0)])),
                  min_size=1, max_size=20),
    group_bytes=st.sampled_from([1 << 13, 1 << 15, 8 << 20]),
)
def test_a_derived_sample_is_the_clamped_sample_of_its_source(
    seed: int, plan: list[tuple[bool, int, tuple[float, float | None]]], group_bytes: int
) -> None:
    """Any mix of copied samples and samples derived from one copied earlier (``derive``: the source clamped,
    e.g. a ReLU's output from its input's sample), with buffers small enough to fill and be reduced in
    between: every row equals compact_sums' of the clamped tensor itself; where the source has left the
    buffer (or the buffer is full) ``derive`` declines and the caller copies, as the Monitor does."""
    gen = torch.Generator().manual_seed(seed)
    batch = PrefixBatch(64, group_bytes=group_bytes)
    copied: list[tuple[torch.Tensor, tuple[int, int]]] = []
    want: list[tuple[tuple[int, int], torch.Tensor]] = []
    for derive, pick, (lo, hi) in plan:
        if derive and copied:
            x, source = copied[pick % len(copied)]
            t = x.clamp(lo, hi)
            tk = batch.derive(t, 1, source, lo, hi) or batch.add(t, 1)
        else:
            t = torch.randn(4, 8, 16, generator=gen) * 5
            tk = batch.add(t, 1)
            assert tk is not None
            copied.append((t, tk[:2]))
        assert tk is not None
        want.append((tk[:2], t))
    (block,) = batch.finish()
    for (_, index), t in want:
        assert block[index].tolist() == pytest.approx(_reference_row(t, 1, 64), rel=1e-12, abs=1e-12)


def test_a_relus_sample_is_derived_from_its_inputs_without_a_copy(count_ops: type[TorchDispatchMode]) -> None:
    """In a step of a CNN whose ReLU and ReLU6 (in place or not) read a convolution's output, the forward
    hooks copy the convolutions' samples only, and the activations' statistics equal those of the
    per-tensor path, which reduces their own copies."""
    def run(group_bytes: int, ops: list[tuple[str, int]] | None = None) -> sp.Trace:
        torch.manual_seed(4)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU6(),
                              nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 3))
        x = torch.randn(16, 3, 8, 8) * 4
        with Monitor(model, sample=256) as mon:
            mon._batch = PrefixBatch(256, group_bytes=group_bytes)
            for _ in range(2):
                if ops is None:
                    out = model(x)
                else:
                    with count_ops() as mode:
                        out = model(x)
                    ops[:] = mode.ops
                out.logsumexp(1).mean().backward()
                mon.step()
        return mon.history[-1].trace

    ops: list[tuple[str, int]] = []
    batched, single = run(8 << 20, ops), run(0)
    copies = [n for op, n in ops if op == "aten.copy_"]
    assert len(copies) == 5, ops  # three convolutions, the flatten, the linear: not the three activations
    for la, lb in zip(batched, single):
        assert la.name == lb.name
        for f in ("mean", "std", "rms", "absmax", "zero_frac", "chan_sq_mean", "chan_var"):
            assert getattr(la.fwd, f) == pytest.approx(getattr(lb.fwd, f), rel=1e-9, abs=1e-12), (la.name, f)
    assert batched["3"].fwd.absmax <= 6.0 and batched["1"].fwd.zero_frac > 0.3


@pytest.mark.parametrize("where", ["pre", "post", "global"])
def test_a_relu_with_another_hook_copies_its_own_sample(where: str) -> None:
    """A hook that may change a ReLU's input or output (a pre-hook run after the Monitor's, a forward hook
    run before it, a global forward hook) means the output need not be the Monitor's input clamped: the
    ReLU's sample is then copied, and its statistics equal the per-tensor path's, which reduces the output
    the Monitor's hook was given (here doubled)."""
    def run(group_bytes: int) -> sp.Stats:
        torch.manual_seed(5)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 3))
        x = torch.randn(16, 3, 8, 8)
        with _monitor_beside_hook(model, model[1], where, lambda t: t * 2, sample=256) as mon:
            mon._batch = PrefixBatch(256, group_bytes=group_bytes)
            model(x).logsumexp(1).mean().backward()
            mon.step()
        return mon.history[0].trace["1"].fwd

    batched, single = run(8 << 20), run(0)
    for f in ("mean", "std", "absmax", "zero_frac"):
        assert getattr(batched, f) == pytest.approx(getattr(single, f), rel=1e-9), f


def test_reducing_a_full_buffer_allocates_no_large_temporary() -> None:
    """Reducing 32 samples of 16 K elements (4 MB of float64) allocates only the small rows, no temporary
    of the block's size (a bool sum cast to float64 was 1 MB of them, freed again inside the backward pass,
    where a returned block can make the next activation page-fault); the counts stay exact."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(5)
    ts = [torch.randn(32, 32, 32, 32, generator=gen).relu() for _ in range(32)]
    batch = PrefixBatch(16384)
    for _ in range(2):  # (the buffer grows in the first step, the zero-count scratch to the second's block)
        tickets = [batch.add(t, 1) for t in ts]
        batch.finish()
    tickets = [batch.add(t, 1) for t in ts]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        (block,) = batch.finish()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest <= block.numel() * 8
    for t, tk in zip(ts, tickets):
        assert tk is not None
        assert block[tk[1]].tolist() == pytest.approx(_reference_row(t, 1, 16384), rel=1e-12)


# ---- a bias gradient checks the output gradient -------------------------------------------------------------
class _PoisonAt(torch.autograd.Function):
    """Identity forward; backward writes the gate's ``value`` (read then) into the gradient's last element,
    outside any prefix sample."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, gate: _Gate) -> torch.Tensor:  # type: ignore[override]
        ctx.gate = gate  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        value = ctx.gate.value  # type: ignore[attr-defined]
        if value is not None:
            g = g.clone()
            g.view(-1)[-1] = value
        return g, None


class _Gate(nn.Module):
    """Passes its input on; while armed (``value`` not None), poisons the gradient flowing back through it."""

    def __init__(self) -> None:
        super().__init__()
        self.value: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _PoisonAt.apply(x, self)


def _layer(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A biased layer and the input shape it takes (batch 16)."""
    return {
        "linear": (nn.Linear(12, 10), (16, 12)),
        "linear3d": (nn.Linear(12, 10), (16, 5, 12)),
        "conv1d": (nn.Conv1d(3, 6, 3, padding=1), (16, 3, 20)),
        "conv2d": (nn.Conv2d(3, 6, 3, padding=1), (16, 3, 8, 8)),
        "convT2d": (nn.ConvTranspose2d(3, 6, 3, padding=1), (16, 3, 8, 8)),
        "bn2d": (nn.BatchNorm2d(3), (16, 3, 8, 8)),
        "layernorm": (nn.LayerNorm(12), (16, 5, 12)),
        "groupnorm": (nn.GroupNorm(2, 4), (16, 4, 6, 6)),
    }[kind]


def _bwd_check_kinds(mon: Monitor) -> dict[str, str]:
    """How each output gradient of the pending step was checked: "bias" (its bias gradient), "full" (a sum
    over every element) or "whole" (the sample is the whole tensor)."""
    (p,) = mon._pending
    out = {}
    for c in p.calls:
        if (c.index, "bwd") not in p.slots:
            continue
        if (c.index, "bwd_bias") in p.slots:
            out[c.name] = "bias"
        elif (c.index, "bwd_check") in p.slots:
            out[c.name] = "full"
        else:
            out[c.name] = "whole"
    return out


def _not_the_gate(gate: nn.Module) -> Callable[[str, nn.Module], bool]:
    return lambda name, m: m is not gate and not isinstance(m, nn.Sequential)


@pytest.mark.parametrize("kind", ["linear", "linear3d", "conv1d", "conv2d", "convT2d", "bn2d", "layernorm",
                                  "groupnorm"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, None])
def test_a_biased_layer_checks_its_output_gradient_by_its_bias_gradient(kind: str, value: float | None) -> None:
    """dL/db = sum of dL/dy over all but the channel dimension, so the bias gradient is finite exactly when the
    output gradient is: one inf or nan outside the sample is still named, in backward order, at once."""
    torch.manual_seed(0)
    layer, shape = _layer(kind)
    gate = _Gate()
    model = nn.Sequential(layer, gate, nn.Tanh())
    x = torch.randn(shape)
    numel = layer(x).numel()
    with Monitor(model, sample=32, sync_every=10, modules=_not_the_gate(gate)) as mon:
        gate.value = value
        model(x).sum().backward()
        mon.step()
        assert _bwd_check_kinds(mon) == {"0": "bias", "2": "full"}
        if value is None:
            history = mon.history
        else:
            with pytest.warns(NonFiniteWarning, match=r"step 0, in 0 \(backward"):
                history = mon.history
    stats = history[0].trace["0"].bwd
    assert stats is not None and stats.finite == (value is None) and stats.numel == numel
    assert not layer.bias._backward_hooks  # the bias hook is gone with the Monitor


class _Gated(nn.Module):
    """A Linear ``a`` with the gate on its output, then ``second``: nothing, ``a`` called again ("called
    twice"), or a Linear ``b`` holding ``a``'s bias ("shared bias")."""

    def __init__(self, second: str = "") -> None:
        super().__init__()
        self.second = second
        self.a = nn.Linear(12, 12)
        self.gate = _Gate()
        if second == "shared bias":
            self.b = nn.Linear(12, 12)
            self.b.bias = self.a.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gate(self.a(x))
        if self.second == "called twice":
            y = self.a(y)
        elif self.second == "shared bias":
            y = self.b(y)
        return torch.tanh(y)


def _poisoned_first_layer(case: str) -> tuple[str, dict[str, str]]:
    """Run one recorded step of ``case`` with an inf outside the sample of the first layer's output gradient;
    return the warned-of layer and how each output gradient was checked."""
    torch.manual_seed(0)
    model = _Gated(case if case in ("shared bias", "called twice") else "")
    x = torch.randn(16, 12)
    if case == "float16":
        model, x = model.half(), x.half()
    if case == "clamping hook on the bias":  # turns the inf its gradient would carry into a finite value
        model.a.bias.register_hook(lambda g: g.clamp(-1, 1))
    if case == "another forward hook":
        model.a.register_forward_hook(lambda m, a, out: None)
    model.gate.value = math.inf
    kwargs = {"histograms": True} if case == "histograms" else {}
    with Monitor(model, sample=32, sync_every=10, modules=_not_the_gate(model.gate), **kwargs) as mon:
        loss = model(x).float().sum()
        if case == "autograd.grad":  # no parameter gradient: the bias hook never fires
            torch.autograd.grad(loss, [model.a.weight])
        elif case == "autograd.grad, then backward":  # two gradients reach the output; the first is recorded
            torch.autograd.grad(loss, [model.a.weight], retain_graph=True)
            model.gate.value = None
            loss.backward()
        else:
            loss.backward()
        mon.step()
        kinds = _bwd_check_kinds(mon)
        with pytest.warns(NonFiniteWarning) as warned:
            mon.history  # noqa: B018
    (w,) = warned
    return str(w.message).split(" in ", 1)[1].split(" (", 1)[0], kinds


@pytest.mark.parametrize(("case", "layer", "kinds"), [
    ("plain", "a", {"a": "bias"}),
    ("histograms", "a", {"a": "bias"}),
    ("called twice", "a", {"a": "full", "a#1": "full"}),
    ("shared bias", "a", {"a": "full", "b": "full"}),
    ("clamping hook on the bias", "a", {"a": "full"}),
    ("another forward hook", "a", {"a": "full"}),
    ("float16", "a", {"a": "full"}),
    ("autograd.grad", "a", {"a": "full"}),
    ("autograd.grad, then backward", "a", {"a": "full"}),
])
def test_the_bias_check_steps_aside_where_the_bias_gradient_is_not_this_gradients_sum(
    case: str, layer: str, kinds: dict[str, str]
) -> None:
    """A module called twice, a shared bias, a hook that may change the bias gradient, another forward hook,
    float16 (whose sums overflow early), a gradient whose bias gradient never comes or comes from another
    backward pass: the output gradient takes its own full sum, and the inf is still found."""
    got_layer, got = _poisoned_first_layer(case)
    assert {k: v for k, v in got.items() if k in kinds} == kinds
    assert got_layer == layer
