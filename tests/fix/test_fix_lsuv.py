"""lsuv_: every weight layer's output std on target after about one pass, the model's state left as found."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import signalprop as sp
from signalprop import SignalpropError
from signalprop.fix import lsuv_, lsuv_run, output_stds


def _within(model: nn.Module, x: torch.Tensor, target: float, tol: float) -> float:
    stds = output_stds(model, x)
    assert stds, "no weight layer was measured"
    worst = max(abs(s - target) for s in stds.values())
    assert worst <= tol, stds
    return worst


@given(
    depth=st.integers(1, 6),
    width=st.integers(4, 32),
    act=st.sampled_from(["relu", "tanh", "gelu", "sigmoid", "selu"]),
    orthogonal=st.booleans(),
    bias=st.booleans(),
    target=st.sampled_from([0.5, 1.0, 2.0]),
    batch=st.integers(2, 32),
)
def test_every_layer_on_target(depth: int, width: int, act: str, orthogonal: bool, bias: bool, target: float,
                               batch: int) -> None:
    # Exact by construction (each layer is linear in its weight): the tolerance is the requested one, relative
    # to each layer's target (target_std, or the std that keeps its chain's gradient; classic LSUV without).
    net = sp.models.mlp(depth, width, act, bias=bias)
    x = torch.randn(batch, width) * 3 + 1
    r = lsuv_run(net, x, target_std=target, tol=0.01 * target, orthogonal=orthogonal, keep_gradient=False)
    assert r.converged and r.passes == 2  # one fixing pass, one verifying pass
    assert len(r.layers) == depth + 1 and not r.skipped
    _within(net, x, target, 0.01 * target)
    r = lsuv_run(net, x, target_std=target, tol=0.01 * target, orthogonal=orthogonal)
    assert r.converged and len(r.targets) == depth + 1
    stds = output_stds(net, x)
    assert all(abs(stds[n] - t) <= 0.01 * t for n, t in zip(r.layers, r.targets))
    chain = sp.fix.lsuv_target(act, depth, width, target).std
    assert r.targets == (chain,) * depth + (chain,)  # the readout keeps the chain's scale


def test_conv_inplace_relu_and_default_init() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(64, 5))
    x = torch.randn(16, 3, 12, 12)
    lsuv_(net, x)
    _within(net, x, 1.0, 0.01)


def test_from_huge_weights_without_orthogonal() -> None:
    # N(0, 1) weights explode a plain 30-layer net by ~1e20; each layer is fixed before the next runs.
    net = sp.models.mlp(30, 64, "relu")
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight)
    x = torch.randn(32, 64)
    r = lsuv_run(net, x, orthogonal=False)
    assert r.converged
    _within(net, x, 1.0, 0.01)


def test_biases_kept_weights_scaled_by_one_factor() -> None:
    net = sp.models.mlp(3, 16, "tanh")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(64, 16)
    lsuv_(net, x, orthogonal=False)
    after = net.state_dict()
    for k, v in before.items():
        if k.endswith("bias"):
            assert torch.equal(after[k], v)
        else:
            ratio = after[k] / v
            assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-5)
    _within(net, x, 1.0, 0.01)


def test_bias_larger_than_target_scales_both() -> None:
    # A bias of variance 25 alone exceeds the target: no weight scale reaches std 1, so both are scaled.
    lin = nn.Linear(8, 8)
    nn.init.normal_(lin.bias, std=5.0)
    x = torch.randn(64, 8)
    lsuv_(lin, x, orthogonal=False)
    assert abs(output_stds(lin, x)[""] - 1.0) <= 0.01
    assert lin.bias.std() < 1.5


def test_state_restored() -> None:
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 4))
    net.train()
    net[1].eval()  # a mixed mode that must come back as it was
    handle = net[0].register_forward_hook(lambda m, a, o: None)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    x = torch.randn(32, 8)
    rng = torch.get_rng_state()
    lsuv_(net, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training and not net[1].training and net[2].training
    assert all(p.grad is None for p in net.parameters())
    assert len(net[0]._forward_hooks) == 1 and len(net[4]._forward_hooks) == 0
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    handle.remove()


class _FailsSecondTime(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 1:
            raise RuntimeError("boom")
        return self.b(self.a(x))


def test_weights_restored_on_failure() -> None:
    net = _FailsSecondTime()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        lsuv_(net, torch.randn(8, 4))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert not net.a._forward_hooks and not net.b._forward_hooks


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mid(torch.tanh(self.mid(torch.tanh(self.inp(x)))))


def test_shared_layer_first_call_decides() -> None:
    net = _Shared()
    x = torch.randn(64, 8)
    r = lsuv_run(net, x)
    assert r.converged and r.layers == ("inp", "mid")
    _within(net, x, 1.0, 0.01)  # output_stds also reports the first call


class _KwModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.b(torch.relu(self.a(x * scale)))


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_tuple_and_dict_inputs(kind: str) -> None:
    net = _KwModel()
    x = torch.randn(32, 4)
    inputs = (x, 3.0) if kind == "tuple" else {"x": x, "scale": 3.0}
    lsuv_(net, inputs)
    _within(net, inputs, 1.0, 0.01)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h, _ = self.mha(h, h, h)
        return self.b(h)


def test_multihead_attention_scaled_through_out_proj() -> None:
    net = _Attn()
    x = torch.randn(4, 10, 8)
    r = lsuv_run(net, x)
    assert r.converged and "mha" in r.layers and not r.skipped
    assert max(abs(s - 1) for s in r.stds) <= 0.01


def test_only_the_given_layers() -> None:
    net = sp.models.mlp(3, 16, "relu")
    before = net[0].weight.clone()
    x = torch.randn(32, 16)
    lsuv_(net, x, layers=["2", "4"], orthogonal=False)
    assert torch.equal(net[0].weight, before)
    stds = output_stds(net, x)
    assert abs(stds["2"] - 1) <= 0.01 and abs(stds["4"] - 1) <= 0.01


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) * torch.rand(()) * 10)  # random even in eval mode


def test_warns_when_a_forward_is_not_a_function_of_the_weights() -> None:
    with pytest.warns(UserWarning, match="still outside"):
        lsuv_(_Noisy(), torch.randn(16, 4), max_iters=2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_std": 0.0}, "target_std"),
        ({"target_std": math.nan}, "target_std"),
        ({"tol": 0.0}, "tol"),
        ({"tol": 2.0}, "tol"),
        ({"max_iters": 0}, "max_iters"),
        ({"layers": ["nope"]}, "not weight layers"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    net = sp.models.mlp(2, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(SignalpropError, match=match):
        lsuv_(net, torch.randn(4, 8), **kwargs)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_no_weight_layers_and_bad_inputs() -> None:
    with pytest.raises(SignalpropError, match="no weight layer"):
        lsuv_(nn.Sequential(nn.ReLU()), torch.randn(2, 3))
    with pytest.raises(SignalpropError, match="cannot feed inputs"):
        lsuv_(nn.Linear(3, 3), "not a tensor")


def test_nonfinite_input_is_reported_and_rolled_back() -> None:
    net = sp.models.mlp(2, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(4, 8)
    x[0, 0] = math.inf
    with pytest.raises(SignalpropError, match="inf or nan"):
        lsuv_(net, x)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
