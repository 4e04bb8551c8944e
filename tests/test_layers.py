"""One taxonomy: a weight layer is the same layer to measure, graph capture, init and the fix planner."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import signalprop as sp
from signalprop.graph import capture
from signalprop.init.fans import UnplannedLayerWarning
from signalprop.layers import is_norm, is_norm_kind, is_weight_layer, weight_names


class MyLinear(nn.Module):
    """A custom layer as people write them: its own parameter, used through F.linear."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Tokens(nn.Module):
    """A module whose only 2-D+ tensor is an additive token, not a weight matrix of known fans."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.zeros(1, 1, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.cls.flatten()


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        (nn.Linear(3, 4), True),
        (nn.Bilinear(2, 3, 4), True),
        (nn.Conv2d(3, 4, 3), True),
        (nn.LSTM(3, 4), True),
        (nn.Embedding(5, 4), True),
        (weight_norm(nn.Linear(3, 4)), True),
        (weight_norm(nn.Linear(3, 4)).parametrizations.weight, False),  # the originals of its parent's weight
        (MyLinear(3, 4), True),
        (nn.LayerNorm(4), False),
        (nn.BatchNorm2d(4), False),
        (nn.ReLU(), False),
        (nn.Sequential(nn.Linear(3, 4)), False),
    ],
)
def test_is_weight_layer(module: nn.Module, expected: bool) -> None:
    assert is_weight_layer(module) is expected


def test_weight_names_see_through_parametrizations() -> None:
    assert weight_names(weight_norm(nn.Linear(3, 4))) == ["weight"]
    assert weight_names(nn.GRU(3, 4, num_layers=2)) == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1",
                                                         "weight_hh_l1"]


def test_norms_by_type_and_by_name() -> None:
    class LlamaRMSNorm(nn.Module):
        pass

    assert is_norm(nn.GroupNorm(2, 4)) and is_norm(nn.LocalResponseNorm(2)) and is_norm(LlamaRMSNorm())
    assert is_norm_kind("BatchNorm2d") and is_norm_kind("T5LayerNorm")
    assert not is_norm_kind("Wav2Vec2GroupNormConvLayer") and not is_norm_kind("Linear")


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), MyLinear(8, 8), nn.ReLU(), nn.Linear(8, 2))


def test_measure_and_capture_agree_on_weight_layers() -> None:
    net = _net()
    x = torch.randn(16, 6)
    measured = [layer.name for layer in sp.measure(net, x) if layer.weight_layer]
    captured = [c.name for c in capture(net, x).weight_layers()]
    assert measured == captured == ["0", "2", "4"]


def test_init_says_what_to_register_for_a_custom_weight() -> None:
    with pytest.raises(sp.SignalpropError, match=r"MyLinear.*register_fans"):
        sp.init.he_(_net())
    sp.init.register_fans(MyLinear, lambda m: (m.weight.shape[1], m.weight.shape[0]))
    try:
        net = _net()
        with torch.no_grad():
            net[2].weight.fill_(5.0)
        sp.init.he_(net)
        assert net[2].weight.std().item() == pytest.approx((2 / 8) ** 0.5, rel=0.5)
    finally:
        importlib.import_module("signalprop.init.fans")._TYPE_RULES.pop(MyLinear, None)


def test_init_warns_for_tensors_it_leaves() -> None:
    net = nn.Sequential(nn.Linear(8, 8), Tokens())
    with pytest.warns(UnplannedLayerWarning, match=r"1 \(Tokens: cls \(1, 1, 8\)\) left as it is.*register_fans"):
        sp.init.he_(net)


def test_plan_keeps_an_unknown_weight_layer_and_says_why() -> None:
    # without inputs nothing can scale it: kept, with the register_fans call that would plan it
    p = sp.fix.plan(_net())
    step = p["2"]
    assert step.scheme == "keep" and "register_fans(MyLinear" in step.reason
    assert any("MyLinear" in n for n in p.notes)
    assert p["0"].scheme == "he"
    # with inputs the LSUV pass rescales it (its output is linear in its weight), still naming register_fans
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = sp.fix.plan(_net(), example_inputs=torch.randn(4, 6))
    assert p["2"].scheme == "lsuv" and p["2"].lsuv and p["2"].target_std == 1.0
    assert "register_fans(MyLinear" in p["2"].reason


# ---- the channel dimension: one rule for measure, the Monitor and the fixes ------------------------------------
class _ChannelsLast(nn.Module):
    """A ConvNeXt-style block: a depthwise conv, then Linear layers on (N, H, W, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw = nn.Linear(6, 10)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.pw(self.dw(x).permute(0, 2, 3, 1)))


def test_channels_last_linear_keeps_channels_at_the_end() -> None:
    import signalprop as sp
    from signalprop.layers import ChannelDims

    torch.manual_seed(0)
    model, x = _ChannelsLast(), torch.randn(4, 6, 5, 7)
    trace = sp.measure(model, x)
    assert trace["dw"].meta["channel_dim"] == 1
    assert trace["pw"].meta["channel_dim"] == -1  # (N, H, W, C): the 10 features, not H = 5
    # The ReLU after it is read by rank (4-D: dim 1), the same in measure and in a fresh rule.
    dims = ChannelDims()
    assert trace["act"].meta["channel_dim"] == dims(model.act, torch.zeros(4, 5, 7, 10)) == 1


def test_monitor_and_measure_give_one_channel_dim_per_layer() -> None:
    import signalprop as sp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6, 5))
    x = torch.randn(4, 3, 8)
    trace = sp.measure(model, x)
    with sp.Monitor(model, every=1) as mon:
        model(x).square().mean().backward()
        mon.step()
    rec = mon.history[-1]
    for name in ("0", "1", "3"):
        assert rec.trace[name].meta["channel_dim"] == trace[name].meta["channel_dim"], name
    assert trace["1"].meta["channel_dim"] == 1  # the ReLU keeps the Conv1d's (N, C, L) layout
