"""Every read-only stage leaves the model exactly as found: every parameter and buffer the same object, at the
same address (so views keep aliasing it), with the same bits (NaN included), after success and after each way
a forward or backward can fail; spectral norm's power-iteration vectors included. One snapshot per diagnose."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, spectral_norm, weight_norm

import signalprop as sp
from signalprop import _state
from signalprop._state import eval_mode, preserved, same_bits


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _fingerprint(model: nn.Module) -> dict[str, tuple[int, int, torch.Tensor]]:
    """name -> (object id, data address, a copy of the bits) of every parameter and buffer."""
    return {k: (id(t), t.data_ptr(), t.detach().clone()) for k, t in _tensors(model).items()}


def _assert_untouched(model: nn.Module, before: dict[str, tuple[int, int, torch.Tensor]]) -> None:
    now = _tensors(model)
    assert now.keys() == before.keys()
    for k, t in now.items():
        oid, ptr, bits = before[k]
        assert id(t) == oid, f"{k}: another tensor object"
        assert t.data_ptr() == ptr, f"{k}: new storage"
        assert same_bits(t.detach(), bits), f"{k}: values changed"


class Flaky(nn.Module):
    """Conv, BatchNorm (train mode: its forward writes running stats), dropout; raises on forward call number
    ``fail_at`` (counting every forward, including those of capture and probe), or in the backward."""

    def __init__(self, fail_at: int = 0, fail_backward: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(8, 4)
        self.fail_at, self.fail_backward, self.calls = fail_at, fail_backward, 0
        with torch.no_grad():
            self.bn.running_var[0] = float("nan")  # a NaN in a buffer: equal to itself, bitwise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.drop(torch.relu(self.bn(self.conv(x))))
        if self.calls == self.fail_at:
            raise RuntimeError(f"forward call {self.calls} fails")
        if self.fail_backward:
            h = _FailingBackward.apply(h)
        return self.head(h.mean((2, 3)))


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("backward fails")


X = torch.randn(4, 3, 8, 8)

STAGES: dict[str, Callable[[nn.Module], Any]] = {
    "measure": lambda m: sp.measure(m, X, histograms=True),
    "diagnose": lambda m: sp.diagnose(m, X),
    "predict": lambda m: sp.predict(m, (3, 8, 8)),
    "capture": lambda m: sp.graph.capture(m, X),
    "plan": lambda m: sp.fix.plan(m, example_inputs=X),
}


def _run_quietly(fn: Callable[[], Any]) -> BaseException | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the test checks the model, whatever the stage did
            return exc
    return None


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_stage_leaves_every_tensor_in_place_after_success_and_failures(stage: str, fail_at: int) -> None:
    model = Flaky(fail_at=fail_at).train()
    running_var_view = model.bn.running_var[1:]  # a view the user holds must keep aliasing the buffer
    before = _fingerprint(model)
    exc = _run_quietly(lambda: STAGES[stage](model))
    _assert_untouched(model, before)
    assert running_var_view.data_ptr() == model.bn.running_var[1:].data_ptr()
    if stage == "measure" and fail_at:  # passes 1 (plain), 2 (careful: the NaN-free model needs none), 3 (hist)
        assert (exc is not None) == (fail_at in (1, 2)), exc


@pytest.mark.parametrize("stage", ["measure", "diagnose"])
def test_stage_leaves_every_tensor_in_place_when_the_backward_raises(stage: str) -> None:
    model = Flaky(fail_backward=True).train()
    before = _fingerprint(model)
    exc = _run_quietly(lambda: STAGES[stage](model))
    assert exc is not None and "backward fails" in str(exc)
    _assert_untouched(model, before)


def _normed(kind: str) -> nn.Module:
    torch.manual_seed(1)
    wrap = {
        "spectral_norm": spectral_norm,
        "parametrizations.spectral_norm": parametrizations.spectral_norm,
        "weight_norm": weight_norm,
        "parametrizations.weight_norm": parametrizations.weight_norm,
    }[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.nn.utils.weight_norm is deprecated, still used
        return nn.Sequential(
            wrap(nn.Conv2d(3, 8, 3, padding=1)), nn.ReLU(), nn.Flatten(), wrap(nn.Linear(8 * 8 * 8, 16)), nn.Tanh(),
            nn.Linear(16, 4),
        ).train()


@pytest.mark.parametrize(
    "kind", ["spectral_norm", "parametrizations.spectral_norm", "weight_norm", "parametrizations.weight_norm"]
)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_parametrized_weights_untouched(kind: str, stage: str) -> None:
    """Spectral norm's forward (and any read of its weight in train mode) runs a power-iteration step that
    writes ``_u``/``_v`` (``weight_u``/``weight_v``) in place; no read-only stage may leave them moved."""
    model = _normed(kind)
    before = _fingerprint(model)
    exc = _run_quietly(lambda: STAGES[stage](model))
    # predict may lack a rule for a parametrized layer: a SignalpropError saying so is its answer
    assert exc is None or (stage == "predict" and isinstance(exc, sp.SignalpropError)), exc
    _assert_untouched(model, before)


def test_same_bits() -> None:
    nan = torch.tensor([float("nan"), 1.0])
    assert same_bits(nan, nan.clone()) and not torch.equal(nan, nan.clone())
    assert not same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))
    assert same_bits(torch.tensor([1 + 2j]), torch.tensor([1 + 2j]))
    assert not same_bits(torch.zeros(2), torch.zeros(3))
    assert same_bits(torch.arange(3), torch.arange(3))


def test_restore_puts_back_only_what_this_thread_wrote_in_place() -> None:
    bn = nn.BatchNorm1d(4).train()
    mean, ptr = bn.running_mean, bn.running_mean.data_ptr()
    with preserved(bn) as state:
        bn(torch.randn(8, 4) + 3.0)  # writes running_mean/var and num_batches_tracked
        assert float(bn.running_mean.abs().min()) > 0.1
        assert state.copies == 3
    assert bn.running_mean is mean and bn.running_mean.data_ptr() == ptr
    assert torch.equal(bn.running_mean, torch.zeros(4)) and int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_var, torch.ones(4))


def test_restore_undoes_a_replaced_storage_and_entry() -> None:
    lin = nn.Linear(3, 3)
    weight, ptr, bias = lin.weight, lin.weight.data_ptr(), lin.bias
    values = weight.detach().clone()
    with preserved(lin):
        lin.weight.data = torch.zeros(5, 5)
        lin.bias = nn.Parameter(torch.ones(3))
    assert lin.weight is weight and weight.data_ptr() == ptr and torch.equal(weight, values)
    assert lin.bias is bias


def test_one_snapshot_per_diagnose(monkeypatch: pytest.MonkeyPatch) -> None:
    """measure, probe, annotate and predict's capture join one snapshot of the model."""
    made: list[_state.ModelState] = []
    init = _state.ModelState.__init__

    def counting(self: _state.ModelState, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(_state.ModelState, "__init__", counting)
    model = sp.models.plain_cnn(4, 8).train()
    report = sp.diagnose(model, torch.randn(8, 3, 16, 16))
    assert report.predicted is not None
    assert len(made) == 1
    # restores (each puts back only what was written since): after measure's pass, the probe, the capture
    # (export), predict, the fix plan quoted in the findings, and diagnose itself
    assert made[0].restores == 6


def test_eval_mode_gives_back_only_the_flags_it_changed() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()).train()
    model[1].eval()  # a frozen BatchNorm inside a model in training
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]


def test_dropout_masks_come_from_a_stream_of_their_own() -> None:
    """measure neither draws from nor rewinds torch's global generator; its dropout masks depend on ``seed``,
    not on the global state, so a measurement repeats whatever else drew random numbers meanwhile."""
    model = nn.Sequential(nn.Linear(32, 64), nn.Dropout(0.5), nn.Linear(64, 8)).train()
    x = torch.randn(16, 32)
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = sp.measure(model, x)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(2)
    b = sp.measure(model, x)
    c = sp.measure(model, x, seed=1)
    assert a == b
    assert a["1"].fwd.zero_frac != c["1"].fwd.zero_frac
    # half of the 16 x 64 outputs dropped: within 4 standard errors of 1/2
    assert abs(a["1"].fwd.zero_frac - 0.5) < 4 * (0.25 / (16 * 64)) ** 0.5


def test_a_pass_whose_weights_move_runs_again_on_private_copies() -> None:
    """Another thread's optimizer step between measure's forward and backward is simulated by a hook that
    writes the last layer's weight once, after the forward used it: autograd refuses that backward, so measure
    runs the pass again with private copies of the weights (the write then hits the model's tensor, not the
    copy the graph saved) and gets the single-pass result; a model that writes its own saved weight on every
    call gets autograd's error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x = torch.randn(8, 8)
    want = sp.measure(model, x)
    writes = [1]  # how many more calls write the weight; -1: every call

    def step(module: nn.Module, args: Any, out: Any) -> None:
        if writes[0] != 0:
            writes[0] = writes[0] - 1 if writes[0] > 0 else -1
            with torch.no_grad():
                module.weight.add_(0.0)  # bumps the version counter the backward checks

    handle = model[2].register_forward_hook(step)
    try:
        assert sp.measure(model, x) == want
        writes[0] = -1  # every call
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            sp.measure(model, x)
    finally:
        handle.remove()


def test_fused_dropout_kernel_draws_from_the_runs_stream() -> None:
    """``aten.native_dropout`` (the fused kernel CUDA's dropout calls; it takes no generator) gets the same
    (output, mask) from the run's own generator: the mask keeps each element with probability 1 - p, the
    kept ones are scaled by 1 / (1 - p), the same seed gives the same mask, the backward works."""
    x = torch.randn(64, 64, requires_grad=True)
    lin = nn.Linear(2, 2)
    state0 = torch.get_rng_state()
    with preserved(lin) as state:
        with state.run(seed=3):
            out, mask = torch.native_dropout(x, 0.25, True)
        with state.run(seed=3):
            _, again = torch.native_dropout(x, 0.25, True)
    assert torch.equal(torch.get_rng_state(), state0)
    assert mask.dtype == torch.bool and torch.equal(mask, again)
    kept = float(mask.double().mean())
    assert abs(kept - 0.75) < 4 * (0.75 * 0.25 / mask.numel()) ** 0.5
    assert torch.allclose(out, x * mask / 0.75)
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.allclose(g, mask / 0.75)
