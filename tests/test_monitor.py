"""Monitor: records in a real training loop, leaves the model as found, samples honestly, warns at once."""

from __future__ import annotations

import copy
import gc
import math
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import signalprop as sp
from signalprop.measurement import measure
from signalprop.monitor import Monitor, NonFiniteWarning, OverflowRiskWarning, Record
from signalprop.monitor import _params as _monitor_params
from signalprop.monitor._sums import compact_sums, expand_row, sample_sums, with_full_check
from signalprop.stats import stats_from_sums


def _cnn() -> nn.Module:
    return sp.models.plain_cnn(4, 8)


def _train(model: nn.Module, steps: int, mon: Monitor | None = None, *, lr: float = 0.05, batch: int = 16) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(batch, 3, 8, 8, generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if mon is not None:
            mon.step()


def _hooks(model: nn.Module) -> list[int]:
    """Hooks on every module and on every parameter (the Monitor hooks biases too)."""
    return [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()] + [
        len(p._backward_hooks or {}) for p in model.parameters()
    ]


def test_records_every_kth_step_with_the_measure_schema() -> None:
    model = _cnn()
    with Monitor(model, every=3) as mon:
        _train(model, 7, mon)
    hist = mon.history
    assert [r.step for r in hist] == [0, 3, 6]
    assert all(isinstance(r, Record) for r in hist)
    ref = measure(model, torch.randn(4, 3, 8, 8))
    for r in hist:
        assert r.trace.names == ref.names
        assert [x.kind for x in r.trace] == [x.kind for x in ref]
        assert [x.weight_layer for x in r.trace] == [x.weight_layer for x in ref]
        assert all(x.bwd is not None and x.bwd.std > 0 for x in r.trace)
        assert r.trace.meta["step"] == r.step
        assert set(r.params) == {n for n, _ in model.named_parameters()}
        assert all(p.norm > 0 and p.grad_norm > 0 and p.update_ratio > 0 for p in r.params.values())


def test_training_is_unchanged_and_hooks_are_removed() -> None:
    torch.manual_seed(3)
    a = _cnn()
    b = copy.deepcopy(a)
    before = _hooks(a)
    _train(b, 4)
    with Monitor(a) as mon:
        _train(a, 4, mon)
    assert _hooks(a) == before
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), n
        assert pa.grad is not None and pb.grad is not None and torch.equal(pa.grad, pb.grad), n


def test_hooks_are_removed_when_the_loop_raises() -> None:
    model = _cnn()
    before = _hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with Monitor(model):
            model(torch.randn(2, 3, 8, 8)).sum().backward()
            raise RuntimeError("boom")
    assert _hooks(model) == before


@pytest.mark.parametrize("small", [None, 40])
def test_update_ratio_is_lr_times_grad_norm_over_weight_norm_for_plain_sgd(
    small: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default grouping (every parameter in padded buffers) and with ``SMALL=40`` (the 16x16
    weights take the per-tensor path, the biases the padded one): norms, gradient norms, update ratios."""
    if small is not None:
        monkeypatch.setattr(_monitor_params, "SMALL", small)
    model = sp.models.mlp(depth=2, width=16)
    lr = 0.1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    norms = _monitor_params.ParamNorms(list(model.parameters()), True)  # the grouping the Monitor makes
    assert bool(norms.large) == (small is not None) and norms.groups
    with Monitor(model) as mon:
        for _ in range(3):
            prev = {n: p.detach().norm().item() for n, p in model.named_parameters()}
            opt.zero_grad()
            model(torch.randn(8, 16)).pow(2).mean().backward()
            grads = {n: p.grad.norm().item() for n, p in model.named_parameters()}  # type: ignore[union-attr]
            opt.step()
            mon.step()
            rec = mon.history[-1]
            for n, ps in rec.params.items():
                assert ps.norm == pytest.approx(dict(model.named_parameters())[n].detach().norm().item(), rel=1e-5)
                assert ps.grad_norm == pytest.approx(grads[n], rel=1e-5)
                assert ps.update_ratio == pytest.approx(lr * grads[n] / prev[n], rel=1e-4)


def test_exact_forward_stats_match_measure() -> None:
    model = _cnn()
    x = torch.randn(8, 3, 8, 8)
    with Monitor(model, sample=None) as mon:
        model(x).sum().backward()
        mon.step()
    ref = measure(model, x, backward=False)
    for got, want in zip(mon.history[0].trace, ref):
        assert got.fwd.mean == pytest.approx(want.fwd.mean, rel=1e-4, abs=1e-6)
        assert got.fwd.std == pytest.approx(want.fwd.std, rel=1e-4)
        assert got.fwd.absmax == pytest.approx(want.fwd.absmax, rel=1e-6)
        assert got.fwd.zero_frac == pytest.approx(want.fwd.zero_frac)
        assert got.fwd.numel == want.fwd.numel


@given(
    seed=st.integers(0, 2**31 - 1),
    per=st.sampled_from([64, 500, 2048]),
    batch=st.integers(8, 64),
    sample=st.sampled_from([1024, 4096]),
    scale=st.floats(1e-3, 1e3),
)
def test_sampled_std_is_within_its_standard_error_of_the_exact_one(
    seed: int, per: int, batch: int, sample: int, scale: float
) -> None:
    """For n i.i.d. Gaussian elements Var[s^2] = 2 sigma^4 / n, so s / sigma has standard error 1 / sqrt(2n);
    the prefix of n out of N elements differs from the whole by at most that with the factor sqrt(1 - n/N).
    6 standard errors: a false alarm has probability about 2e-9 per example."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(batch, per, generator=gen) * scale + 0.5 * scale
    row, head, check = sample_sums(t, 1, sample)
    n = head.numel()
    assert n >= min(sample, t.numel()) and n - per < sample  # the fewest leading samples that hold `sample`
    vals = row.tolist()
    if check is not None:
        vals = with_full_check(vals, float(check), float(t.numel()))
    got = stats_from_sums(vals)
    exact = t.double().std(unbiased=False).item()
    se = math.sqrt((1 - n / t.numel()) / (2 * n))
    assert abs(got.std / exact - 1) <= 6 * se + 1e-9
    assert got.numel == t.numel()
    assert got.nonfinite_frac == 0


@given(
    seed=st.integers(0, 2**31 - 1),
    layout=st.sampled_from([((4, 8, 32, 32), 1), ((3, 16, 16, 64), 1), ((2, 64, 128), 2), ((2, 32, 32, 8), 3)]),
    sample=st.sampled_from([1024, 2048, 4096]),
    scale=st.floats(1e-3, 1e3),
)
def test_a_sample_of_every_kth_row_of_one_sample_is_within_its_standard_error(
    seed: int, layout: tuple[tuple[int, ...], int], sample: int, scale: float
) -> None:
    """One batch sample holding twice ``sample`` or more is sampled every k-th row: for i.i.d. elements the
    same bound as a prefix, 1 / sqrt(2n) with the finite-population factor, 6 standard errors."""
    gen = torch.Generator().manual_seed(seed)
    shape, cd = layout
    t = torch.randn(shape, generator=gen) * scale - 0.3 * scale
    row, head, check = sample_sums(t, cd, sample)
    n = head.numel()
    assert sample <= n < 2 * sample and head.shape[cd] == shape[cd]  # every channel, about `sample` elements
    assert check is not None
    got = stats_from_sums(with_full_check(row.tolist(), float(check), float(t.numel())))
    exact = t.double().std(unbiased=False).item()
    se = math.sqrt((1 - n / t.numel()) / (2 * n))
    assert abs(got.std / exact - 1) <= 6 * se + 1e-9
    assert got.numel == t.numel()


def test_sampled_std_of_a_real_network_is_within_the_error_its_samples_allow() -> None:
    """In a network, elements of one sample are correlated, so the error is judged per sample: the prefix
    holds b of the B samples, each with its own mean square m_i, and the prefix's mean square has standard
    error sd(m_i) / sqrt(b) * sqrt(1 - b/B) around the batch's (finite population correction); std is the
    square root, which halves the relative error. The mean (small here, ReLU and conv outputs near 0 mean)
    shifts it little; 6 standard errors plus 2% for it."""
    torch.manual_seed(0)
    model = sp.models.plain_cnn(6, 16)
    sp.init.he_(model)
    x = torch.randn(64, 3, 16, 16)
    full: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, name=name: full.__setitem__(name, out.detach().clone()))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with Monitor(model, sample=4096) as mon:
        model(x).sum().backward()
        mon.step()
    for h in handles:
        h.remove()
    trace = mon.history[0].trace
    for name, out in full.items():
        b_total = out.shape[0]
        per = out[0].numel()
        b = min(b_total, -(-4096 // per))
        ms_i = out.double().pow(2).flatten(1).mean(1)
        rel_se = (ms_i.std() / ms_i.mean()).item() / math.sqrt(b) * math.sqrt(1 - b / b_total) / 2
        exact = out.double().std(unbiased=False).item()
        assert abs(trace[name].fwd.std / exact - 1) <= 6 * rel_se + 0.02, name


def test_nan_outside_the_sample_is_reported_at_once_with_step_and_layer() -> None:
    model = _cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, sample=64) as mon:
        for step in range(4):
            x = torch.randn(16, 3, 8, 8)
            if step == 2:
                x[-1, 0, 0, 0] = math.nan  # the last sample: outside the 64-element prefix
            opt.zero_grad()
            model(x).logsumexp(1).mean().backward()
            opt.step()
            if step == 2:
                with pytest.warns(NonFiniteWarning, match=r"step 2, in body\.0 \(forward"):
                    mon.step()
                break
            mon.step()
    assert [(e.step, e.layer, e.where) for e in mon.events] == [(2, "body.0", "forward")]
    assert mon.history[-1].trace["body.0"].fwd.nonfinite_frac > 0
    assert mon.history[0].trace["body.0"].fwd.finite


class _Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.abs().sqrt()


def test_a_gradient_that_only_overflows_backward_is_named_in_backward_order() -> None:
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, _Sqrt(), nn.Linear(4, 1))
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()  # sqrt'(0) = inf: the gradient at the Linear's output is inf/nan, the forward finite
    with Monitor(model) as mon:
        model(torch.randn(8, 4)).sum().backward()
        with pytest.warns(NonFiniteWarning, match=r"step 0, in 0 \(backward"):
            mon.step()
    layer = mon.history[0].trace["0"]
    assert layer.fwd.finite and layer.bwd is not None and not layer.bwd.finite


def test_on_nonfinite_raise_stops_the_loop_and_cleans_up() -> None:
    model = _cnn()
    before = _hooks(model)
    with pytest.raises(sp.SignalpropError, match="first non-finite value at step 1"):
        with Monitor(model, on_nonfinite="raise") as mon:
            for step in range(3):
                x = torch.randn(4, 3, 8, 8) * (math.inf if step == 1 else 1.0)
                model(x).sum().backward()
                mon.step()
    assert _hooks(model) == before


def test_one_host_transfer_per_recorded_step(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _cnn()
    calls = {"cpu": 0, "item": 0}
    real_cpu, real_item = torch.Tensor.cpu, torch.Tensor.item

    def cpu(self: torch.Tensor, *a: object, **k: object) -> torch.Tensor:
        calls["cpu"] += 1
        return real_cpu(self, *a, **k)

    def item(self: torch.Tensor) -> object:
        calls["item"] += 1
        return real_item(self)

    with Monitor(model, every=2) as mon:
        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        monkeypatch.setattr(torch.Tensor, "item", item)
        for _ in range(6):
            model(torch.randn(4, 3, 8, 8)).sum().backward()
            mon.step()
        monkeypatch.undo()
    assert calls == {"cpu": 3, "item": 0}
    assert [r.step for r in mon.history] == [0, 2, 4]


def test_a_step_makes_no_device_tensor_of_host_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Element counts are known on the host: on a GPU, `torch.tensor(numbers, device=...)` would be a
    host-to-device copy and a stream synchronization each step, so (in one process) they wait on the host and
    join the transferred numbers there; the numbers that come out are the same (counts = whole tensors)."""
    model = _cnn()
    made: list[object] = []
    real = torch.tensor

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        made.append(kwargs.get("device"))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    with Monitor(model, sample=64, sync_every=2) as mon:
        for _ in range(3):
            model(torch.randn(16, 3, 8, 8)).sum().backward()
            monkeypatch.setattr(torch, "tensor", spy)
            mon.step()
            monkeypatch.setattr(torch, "tensor", real)
    assert all(d is None for d in made), made
    for r in mon.history:
        for layer in r.trace:
            assert layer.fwd.numel == math.prod(layer.shape) and layer.fwd.finite


def test_sync_every_batches_transfers_without_changing_numbers() -> None:
    torch.manual_seed(0)
    a = _cnn()
    b = copy.deepcopy(a)
    with Monitor(a) as ma:
        _train(a, 5, ma)
    with Monitor(b, sync_every=3) as mb:
        _train(b, 5, mb)
    assert [r.trace for r in ma.history] == [r.trace for r in mb.history]
    assert [r.params for r in ma.history] == [r.params for r in mb.history]


def test_sampling_changes_layer_statistics_only() -> None:
    torch.manual_seed(0)
    a = _cnn()
    b = copy.deepcopy(a)
    with Monitor(a, sample=None) as ma:
        _train(a, 2, ma)
    with Monitor(b, sample=64) as mb:  # 64 of 512 elements per sample: every tensor is sampled
        _train(b, 2, mb)
    for ra, rb in zip(ma.history, mb.history):
        assert ra.params == rb.params
        for la, lb in zip(ra.trace, rb.trace):
            assert la.fwd.numel == lb.fwd.numel and lb.fwd.finite and lb.bwd is not None and lb.bwd.finite
            assert la.fwd.absmax >= lb.fwd.absmax  # the sample's extreme cannot exceed the whole tensor's


def test_no_grad_calls_and_reused_modules() -> None:
    lin = nn.Linear(8, 8)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    with Monitor(model) as mon:
        with torch.no_grad():
            model(torch.randn(2, 8))  # a validation pass: not recorded
        model(torch.randn(4, 8)).sum().backward()
        mon.step()
    assert mon.history[0].trace.names == ["0", "1", "0#1"]


def test_autocast_records_dtype_and_warns_of_overflow_risk(autocast_case: tuple[str, torch.dtype]) -> None:
    """Under torch.autocast each call's dtype is recorded, the statistics stay finite, and a layer whose
    absmax reaches a quarter of the dtype's largest value (within diagnose's 8x margin) gets an
    OverflowRiskWarning naming the dtype: bfloat16 on the CPU, float16 on the CPU and on a GPU."""
    device, dtype = autocast_case
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).to(device)
    name = str(dtype).replace("torch.", "")
    with Monitor(model) as mon:
        with torch.autocast(device, dtype=dtype):
            out = model(torch.randn(16, 8, device=device))
        out.float().sum().backward()
        mon.step()
        tr = mon.history[0].trace
        assert tr["0"].dtype == name and tr.meta["autocast"] is None  # closed outside the autocast block
        assert all(x.fwd.finite and math.isfinite(x.fwd.std) and x.fwd.std > 0 for x in tr)
        assert all(x.bwd is not None and x.bwd.finite for x in tr)
        ones = torch.ones(16, 8, device=device)
        with torch.no_grad():
            scale = torch.finfo(dtype).max / 4 / float(model[0](ones).abs().max())
            model[0].weight.mul_(scale)  # outputs at a quarter of the dtype's largest value: within 8x of it
            model[0].bias.mul_(scale)
            model[2].weight.mul_(1e-3)  # and the next layer back in range, so that nothing overflows
        model.zero_grad()
        with torch.autocast(device, dtype=dtype):
            out = model(ones)
        # keep the weight gradients h^T g in range: sums of 16 rows of h near a quarter of the largest value
        # (unscaled, float16's dW of the second layer, 16 * 16376, is inf: the Monitor reports that instead)
        (out.float().sum() * (1e-10 if dtype is torch.bfloat16 else 1e-3)).backward()
        with pytest.warns(OverflowRiskWarning, match=name):
            mon.step()
        model.zero_grad()
        with torch.autocast(device, dtype=dtype):
            out = model(ones)
        out.float().sum().backward()  # unscaled: the second layer's weight gradient overflows the dtype
        with pytest.warns(NonFiniteWarning, match=r"step 2, in 2\.weight \(gradient"):
            mon.step()
    assert any(e.kind == "overflow_risk" and e.step == 1 and e.layer in ("0", "1") for e in mon.events)
    assert mon.history[1].trace["0"].fwd.absmax == pytest.approx(torch.finfo(dtype).max / 4, rel=0.01)


def test_plot_writes_a_png(tmp_path: pytest.TempPathFactory) -> None:
    model = _cnn()
    with Monitor(model) as mon:
        _train(model, 3, mon)
    path = mon.plot(tmp_path / "train")  # type: ignore[operator]
    assert path.suffix == ".png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_histograms_are_standardized_and_count_the_sample() -> None:
    model = sp.models.mlp(depth=2, width=32)
    with Monitor(model, histograms=True, bins=16) as mon:
        model(torch.randn(64, 32)).sum().backward()
        mon.step()
    for layer in mon.history[0].trace:
        for st_ in (layer.fwd, layer.bwd):
            assert st_ is not None and st_.hist is not None
            assert len(st_.hist.edges) == 17 and sum(st_.hist.counts) == 64 * 32
            assert st_.hist.edges[0] == pytest.approx(st_.mean - 6 * st_.std)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every must be a positive integer"),
        ({"sample": -1}, "sample must be a positive integer"),
        ({"sync_every": 1.5}, "sync_every"),
        ({"on_nonfinite": "stop"}, "on_nonfinite"),
        ({"modules": ["nope"]}, "not in this model"),
        ({"tensorboard": object()}, "SummaryWriter"),
    ],
)
def test_bad_arguments_say_what_is_accepted(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(sp.SignalpropError, match=match):
        Monitor(_cnn(), **kwargs)  # type: ignore[arg-type]


def test_step_outside_the_context_and_double_entry_are_errors() -> None:
    mon = Monitor(_cnn())
    with pytest.raises(sp.SignalpropError, match="outside the Monitor"):
        mon.step()
    with mon:
        with pytest.raises(sp.SignalpropError, match="already running"):
            mon.start()


def test_importing_the_monitor_stays_light() -> None:
    code = (
        "import sys, signalprop, signalprop.monitor, signalprop.integrations; "
        "bad = [m for m in ('matplotlib', 'lightning', 'tensorboard', 'rich', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("shape", [(32, 16, 8, 8), (64, 300), (8, 20, 48)])
def test_a_sampled_tensor_costs_few_device_ops_and_one_full_read(
    shape: tuple[int, ...], count_ops: type[TorchDispatchMode]
) -> None:
    """The per-tensor work of a recorded step, which the overhead goal rests on: float64 prefix copy, dot,
    channel sum, aminmax, zero compare and count, stack, cat (plus dtype casts that are no-ops on float64),
    and ONE op that reads every element: the sum for the non-finite check."""
    t = torch.randn(shape)
    with count_ops() as mode:
        compact_sums(t, 1, 512)
    assert len(mode.ops) <= 11, mode.ops
    assert [op for op, n in mode.ops if n == t.numel()] == ["aten.sum"], mode.ops


@given(
    seed=st.integers(0, 2**31 - 1),
    shape=st.sampled_from([(6, 5, 4, 4), (40, 30), (3, 7, 12), (5,)]),
    sample=st.sampled_from([None, 16, 200]),
    zeros=st.booleans(),
)
def test_compact_rows_expand_to_the_tensor_sums_row(
    seed: int, shape: tuple[int, ...], sample: int | None, zeros: bool
) -> None:
    """Same numbers as the reference path (sample_sums builds a tensor_sums row): up to float64 rounding for a
    sample (copied to float64), up to float32 rounding of the sum (1e-6 of sum |x|) for the exact path."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen)
    if zeros:
        t = t.relu()
    cd = 1 if t.dim() > 1 else None
    row, _, check, counts = compact_sums(t, cd, sample)
    ref, _, ref_check = sample_sums(t, cd, sample)
    assert (check is None) == (ref_check is None)
    assert counts is not None
    got = expand_row(row.tolist(), counts)
    want = ref.tolist()
    assert len(got) == len(want)
    tol = 1e-12 if sample is not None else 1e-6 * (float(t.abs().sum()) + float(t.pow(2).sum()) + 1.0)
    assert got == pytest.approx(want, rel=1e-12 if sample is not None else 1e-6, abs=tol)


def test_quiet_steps_build_their_records_when_read_and_in_order() -> None:
    model = _cnn()
    seen: list[int] = []
    with Monitor(model) as lazy, Monitor(model, on_record=lambda r: seen.append(r.step)) as eager:
        for _ in range(3):
            _train(model, 1)
            lazy.step()
            eager.step()
    assert seen == [0, 1, 2]  # on_record: built at once
    assert [r.step for r in lazy.history] == [0, 1, 2]
    for a, b in zip(lazy.history, eager.history, strict=True):
        assert a.trace.names == b.trace.names
        assert [x.fwd.std for x in a.trace] == [x.fwd.std for x in b.trace]


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(6, 4)
        self.spare = nn.Linear(6, 4)  # trainable but never called: no .grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


@pytest.mark.parametrize("spare", [True, False])
def test_gradient_norms_are_those_of_grad_and_a_parameter_without_grad_says_so(spare: bool) -> None:
    model = _WithUnused()
    if not spare:
        model.spare.requires_grad_(False)
    with Monitor(model) as mon:
        model(torch.randn(5, 6)).pow(2).sum().backward()
        mon.step()
    params = mon.history[0].params
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name not in params
            continue
        ps = params[name]
        assert ps.norm == pytest.approx(p.detach().double().norm().item(), rel=1e-12)
        if p.grad is None:
            assert not ps.has_grad and math.isnan(ps.grad_norm)
        else:
            assert ps.has_grad and ps.grad_norm == pytest.approx(p.grad.double().norm().item(), rel=1e-12)
    assert sum(not ps.has_grad for ps in params.values()) == (2 if spare else 0)


class _Chunks(nn.Module):
    """Returns one chunk of its input (an output of a two-output autograd node) or both."""

    def __init__(self, which: int | None) -> None:
        super().__init__()
        self.which = which

    def forward(self, x: torch.Tensor) -> Any:
        a, b = (x * 1.0).chunk(2, dim=1)
        return (a, b) if self.which is None else (a, b)[self.which]


def test_output_gradients_of_multi_output_nodes_and_leaves() -> None:
    """The gradient hook sits on the node that made an output: the second output of a chunk node gets the
    gradient of that chunk (not of the first); an output that never reaches the loss records no gradient;
    a module that returns a leaf (Identity on an input that requires grad) still gets its gradient."""
    x = torch.randn(4, 6, requires_grad=True)
    model = nn.Sequential(nn.Identity(), _Chunks(1))
    with Monitor(model, sample=None) as mon:
        y = model(x)
        (y * torch.arange(3.0)).sum().backward()
        mon.step()
    layers = {la.name: la for la in mon.history[0].trace}
    ident, chunk = layers["0"].bwd, layers["1"].bwd
    assert chunk is not None and ident is not None
    g = torch.arange(3.0).expand(4, 3)  # the gradient with respect to the second chunk
    assert chunk.mean == pytest.approx(float(g.mean())) and chunk.std == pytest.approx(float(g.std(correction=0)))
    full = torch.cat([torch.zeros(4, 3), g], 1)  # with respect to the Identity's output (= x)
    assert ident.mean == pytest.approx(float(full.mean())) and ident.absmax == pytest.approx(2.0)
    both = nn.Sequential(nn.Linear(6, 6), _Chunks(None))
    with Monitor(both, sample=None) as mon:
        _, b = both(x)
        b.sum().backward()  # the first chunk, the one the Monitor records, does not reach the loss
        mon.step()
    layers = {la.name: la for la in mon.history[0].trace}
    assert layers["1"].bwd is None and layers["0"].bwd is not None and layers["0"].bwd.absmax == pytest.approx(1.0)


def _numbers_per_step(record: Record) -> int:
    """An upper bound on the numbers one step transfers: per tensor a compact row (4 + channels), two counts,
    a full sum and an element count; four norms per parameter."""
    n = 0
    for layer in record.trace:
        channels = layer.shape[layer.meta.get("channel_dim", 1)] if len(layer.shape) > 1 else 1
        n += 2 * (4 + channels + 4)
    return n + 4 * len(record.params)


def test_kept_steps_hold_their_numbers_only() -> None:
    """A long run keeps one entry per recorded step that holds little besides its numbers (float64, 8 bytes
    each): steps laid out alike share one description of the layout, and none keeps its device numbers or
    Python objects per layer once its numbers are on the host."""
    model = _cnn()
    x = torch.randn(4, 3, 8, 8)
    with Monitor(model, keep=None) as mon:
        for _ in range(3):
            model(x).sum().backward()
            mon.step()
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(100):
                model(x).sum().backward()
                mon.step()
            gc.collect()
            per_step = (tracemalloc.get_traced_memory()[0] - before) / 100
        finally:
            tracemalloc.stop()
        records = mon.history
    assert [r.step for r in records] == list(range(103))
    assert all(r.trace[0].bwd is not None for r in records)
    numbers = _numbers_per_step(records[-1])
    assert per_step <= 8 * numbers + 1024, (per_step, numbers)  # (a layout of its own: some 4 KB more)
