"""sp.measure leaves the model exactly as found: parameters, buffers, .grad, requires_grad, modes, hooks, RNG,
also when the forward raises half-way."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import signalprop as sp


class Net(nn.Module):
    """BatchNorm (train-mode running stats), dropout (RNG), a frozen layer, an in-place ReLU, an optional
    failure after the BatchNorm has already updated its buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(0.3)
        self.frozen = nn.Conv2d(8, 8, 1)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 4)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.relu(self.bn(self.conv(x))))
        if self.fail:
            raise RuntimeError("boom after batchnorm")
        h = self.frozen(h).mean((2, 3))
        return self.head(h)


def _snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "param_ids": {k: id(v) for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "buffer_ids": {k: id(v) for k, v in model.named_buffers()},
        "grads": {k: (None if v.grad is None else (id(v.grad), v.grad.clone())) for k, v in model.named_parameters()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "hooks": {
            k: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for k, m in model.named_modules()
        },
        "global_hooks": (
            len(nn.modules.module._global_forward_hooks),
            len(nn.modules.module._global_forward_pre_hooks),
        ),
        "rng": torch.get_rng_state(),
    }


def _assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["param_ids"] == b["param_ids"] and a["buffer_ids"] == b["buffer_ids"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    for k in a["buffers"]:
        assert torch.equal(a["buffers"][k], b["buffers"][k]), k
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None) == (gb is None), k
        if ga is not None:
            assert ga[0] == gb[0] and torch.equal(ga[1], gb[1]), k
    for key in ("requires_grad", "training", "hooks", "global_hooks"):
        assert a[key] == b[key], key
    assert torch.equal(a["rng"], b["rng"])


@pytest.mark.parametrize("train", [True, False])
def test_model_left_exactly_as_found(train: bool) -> None:
    model = Net().train(train)
    model.head.weight.grad = torch.ones_like(model.head.weight)  # an existing .grad stays, untouched
    user_hook = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        x = torch.randn(4, 3, 8, 8)
        before = _snapshot(model)
        trace = sp.measure(model, x, histograms=True)
        _assert_same(before, _snapshot(model))
    finally:
        user_hook.remove()
    assert trace.names == ["conv", "bn", "relu", "drop", "frozen", "head"]
    assert trace["conv"].bwd is not None and trace["frozen"].bwd is not None
    # dropout in train mode zeroes about 30% of the ReLU outputs on top of the ReLU's own zeros
    if train:
        assert trace["drop"].fwd.zero_frac > trace["relu"].fwd.zero_frac


@pytest.mark.parametrize("train", [True, False])
def test_model_restored_when_forward_raises(train: bool) -> None:
    model = Net().train(train)
    model.fail = True
    x = torch.randn(4, 3, 8, 8)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        sp.measure(model, x)
    _assert_same(before, _snapshot(model))
    model.fail = False
    assert sp.measure(model, torch.randn(4, 3, 8, 8)).names[-1] == "head"


def test_repeated_measurements_are_identical_in_train_mode() -> None:
    """Buffers and RNG restored: dropout masks and BatchNorm statistics repeat exactly."""
    model = Net().train()
    x = torch.randn(4, 3, 8, 8)
    assert sp.measure(model, x) == sp.measure(model, x)


def test_input_tensor_untouched_even_with_inplace_first_op() -> None:
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(5, 2))
    x = torch.randn(3, 5)
    x0 = x.clone()
    trace = sp.measure(model, x)
    assert torch.equal(x, x0) and not x.requires_grad and x.grad is None
    assert trace["0"].fwd.zero_frac == pytest.approx((x0 <= 0).double().mean().item())
