"""The Monitor's batched sample store (same numbers as the per-tensor path, few ops) and its non-finite
checks: an inf or nan outside the sample is found, in the layer and pass where it arises."""

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
from signalprop.measurement._rowbatch import RowBatch
from signalprop.monitor import Monitor, NonFiniteWarning
from signalprop.monitor import _batch as batch_mod
from signalprop.monitor._batch import PrefixBatch
from signalprop.monitor._sums import compact_sums, sample_of
from signalprop.stats import expand_compact, tensor_sums


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


@pytest.mark.parametrize(("shape", "cd"), [((6, 5, 4, 4), 1), ((40, 30), 1), ((3, 7, 12), None), ((64, 4096), 1)])
def test_measure_and_the_monitor_share_one_row(shape: tuple[int, ...], cd: int | None) -> None:
    """One tensor's full row is the same whichever path makes it: tensor_sums; measure's RowBatch, the Monitor's
    own compact row and its batched sample store (exact statistics: the sample is the whole tensor), each
    expanded on the host by the one signalprop.stats.expand_compact (float32 against float64 accumulation:
    1e-6 relative)."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(0)).relu()
    want = tensor_sums(t, channel_dim=cd).tolist()
    rb = RowBatch()
    key = rb.add(t, channel_dim=cd)
    measured = rb.rows(rb.device_vector().cpu())[key]
    row, _, check, counts = compact_sums(t, cd, None)
    assert check is None and counts is not None
    own = expand_compact(row.tolist(), counts[0], counts[0], counts[1])
    batch = PrefixBatch(t.numel())
    tk = batch.add(t, cd)
    assert tk is not None and not tk[4]
    (block,) = batch.finish()
    batched = expand_compact(block[tk[1]].tolist(), tk[2], tk[2], tk[3])
    for got in (measured, own, batched):
        assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


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
    """What the hooks add to a recorded forward, per sampled tensor: the copy of its sample into its slot
    and one sum over the whole tensor (the non-finite check); a tensor whose sample is all of it, the copy
    only. (The first step allocates the layout's buffer, once.)"""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(1, -1))
    x = torch.randn(64, 3, 16, 16)
    with count_ops() as mode:
        model(x)
    plain = [op for op, _ in mode.ops]
    with Monitor(model, sample=4096, params=False) as mon:
        model(x)
        mon.step()
        with count_ops() as mode:
            model(x)
        mon.step()
    added = [op for op, _ in mode.ops]
    for op in plain:
        added.remove(op)
    assert sorted(added) == ["aten.copy_", "aten.copy_", "aten.sum", "aten.sum"], mode.ops
    assert [op for op, n in mode.ops if n == 64 * 8 * 16 * 16 and op != "aten.convolution"] == ["aten.sum"] * 2
    with Monitor(model, sample=1 << 20, params=False) as mon:  # the sample holds every element
        model(x)
        mon.step()
        with count_ops() as mode:
            model(x)
        mon.step()
    added = [op for op, _ in mode.ops]
    for op in plain:
        added.remove(op)
    assert added == ["aten.copy_", "aten.copy_"], mode.ops


@pytest.mark.parametrize("group_bytes", [None, 1 << 12])
def test_batched_and_per_tensor_monitors_record_the_same_numbers(
    group_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched store (buffers reduced once a step, or, with 4 KB buffers, several times as they fill)
    gives the numbers of the per-tensor path (which ``histograms=True`` takes: each sample reduced and
    binned on its own)."""
    if group_bytes is not None:
        monkeypatch.setattr(batch_mod, "GROUP_BYTES", group_bytes)

    def run(histograms: bool) -> list[sp.Trace]:
        torch.manual_seed(3)
        model = sp.models.plain_cnn(5, 8)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        gen = torch.Generator().manual_seed(1)
        with Monitor(model, sample=256, histograms=histograms) as mon:
            for _ in range(3):
                x = torch.randn(16, 3, 12, 12, generator=gen)
                opt.zero_grad()
                model(x).logsumexp(1).mean().backward()
                opt.step()
                mon.step()
        return [r.trace for r in mon.history]

    batched, single = run(False), run(True)
    for a, b in zip(batched, single, strict=True):
        assert a.names == b.names
        for la, lb in zip(a, b):
            for sa, sb in ((la.fwd, lb.fwd), (la.bwd, lb.bwd)):
                assert sa is not None and sb is not None and sa.hist is None and sb.hist is not None
                for f in ("mean", "std", "rms", "absmax", "zero_frac", "chan_sq_mean", "chan_var"):
                    assert getattr(sa, f) == pytest.approx(getattr(sb, f), rel=1e-9, abs=1e-12), (la.name, f)
                assert sa.numel == sb.numel and sa.nonfinite_frac == sb.nonfinite_frac


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


def _one_step(mon: Monitor, model: nn.Module, x: torch.Tensor) -> None:
    model(x).sum().backward()
    mon.step()


class _Meddle(nn.Module):
    """Changes the conv's output in place between its hook and the activation's."""

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


def test_a_tensor_changed_in_place_after_its_check_is_reported_where_it_changed() -> None:
    """An inf written into the conv's output after the conv's hook read it (outside the 32-element sample)
    is found in the activation that reads it, and the conv's own output stays finite."""
    model = _Meddle()
    with Monitor(model, sample=32) as mon:
        _one_step(mon, model, torch.randn(8, 3, 6, 6))
        model.poison = True
        with pytest.warns(NonFiniteWarning, match=r"step 1, in act \(forward"):
            _one_step(mon, model, torch.randn(8, 3, 6, 6))
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
def test_an_inf_another_hook_plants_is_reported_in_its_layer(where: str) -> None:
    """A hook that changes an activation's input or output (a pre-hook run after the Monitor's, a forward
    hook run before it, a global forward hook) can put an inf there that the convolution's output never
    held: planted outside the sample, it is reported in that layer and those after it."""
    def plant(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        t[-1, 0, -1, -1] = math.inf  # the last element: outside the 32-element sample
        return t

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    with _monitor_beside_hook(model, model[1], where, plant, sample=32) as mon:
        with pytest.warns(NonFiniteWarning, match=r"step 0, in 1 \(forward"):
            _one_step(mon, model, torch.randn(8, 3, 6, 6))
    trace = mon.history[0].trace
    assert [layer.fwd.finite for layer in trace] == [True, False, False]


def test_a_nonfinite_input_is_reported_in_the_first_layer_and_every_one_after() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten())
    x = torch.randn(8, 3, 6, 6)
    x[-1, 0, 2, 2] = math.nan  # outside the 32-element sample
    with Monitor(model, sample=32) as mon:
        with pytest.warns(NonFiniteWarning, match=r"step 0, in 0 \(forward"):
            _one_step(mon, model, x)
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


# ---- an inf or nan outside the sample of an output gradient --------------------------------------------------
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


def _not_the_gate(gate: nn.Module) -> Callable[[str, nn.Module], bool]:
    return lambda name, m: m is not gate and not isinstance(m, nn.Sequential)


@pytest.mark.parametrize("kind", ["linear", "linear3d", "conv1d", "conv2d", "convT2d", "bn2d", "layernorm",
                                  "groupnorm"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, None])
def test_an_output_gradient_poisoned_outside_the_sample_is_named_at_once(kind: str, value: float | None) -> None:
    """One inf or nan outside the sample of a layer's output gradient (Linear, ConvNd, ConvTranspose, norms)
    is named, in backward order, at once; the layer's gradient counts every element."""
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


def _poisoned_first_layer(case: str) -> str:
    """Run one recorded step of ``case`` with an inf outside the sample of the first layer's output gradient;
    return the warned-of layer."""
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
        with pytest.warns(NonFiniteWarning) as warned:
            mon.history  # noqa: B018
    (w,) = warned
    return str(w.message).split(" in ", 1)[1].split(" (", 1)[0]


@pytest.mark.parametrize("case", [
    "plain", "histograms", "called twice", "shared bias", "clamping hook on the bias", "another forward hook",
    "float16", "autograd.grad", "autograd.grad, then backward",
])
def test_a_poisoned_output_gradient_is_found_however_the_layer_is_used(case: str) -> None:
    """A module called twice, a bias shared with another module, a hook that clamps the bias gradient,
    another forward hook, float16 (whose sums overflow early), a gradient from ``torch.autograd.grad`` (no
    parameter gradient at all) or from the first of two backward passes: the inf outside the sample of the
    first layer's output gradient is found, in that layer."""
    assert _poisoned_first_layer(case) == "a"
