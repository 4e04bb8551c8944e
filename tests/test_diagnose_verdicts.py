"""Verdicts on models built the way users build them: no false "ok" (named stages, custom F.linear layers,
normalization layers that shrink the signal), the right direction and cause, NaN made in the backward told
from an overflow, degenerate batches said out loud."""

from __future__ import annotations

import importlib
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop import SignalpropError
from signalprop.diagnosis import Finding, Report, diagnose, diagnose_trace

DRIFT = {"exploding", "vanishing", "grad_exploding", "grad_vanishing"}


def _one(report: Report, kind: str) -> Finding:
    found = report.by_kind(kind)
    assert len(found) == 1, report.summary()
    return found[0]


# ---- the whole body is judged, whatever the names ----------------------------------------------------
def _stage(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU())


def _stages(width: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        s1=_stage(3, width), s2=_stage(width, width), s3=_stage(width, width), s4=_stage(width, width),
        pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(width, 10),
    ))


def test_identical_named_stages_are_judged_over_the_whole_body() -> None:
    net = _stages(16)
    for p in net.parameters():
        p.data.normal_()
    x = torch.randn(4, 3, 16, 16)
    report = diagnose(net, x, predicted=False)
    # Each conv multiplies the std by about sqrt(16 * 9 / 2) = 8.5 (He et al. 2015, Eq. 10), so over the
    # seven steps from s1.0 to s4.2 it grows by ~3e6; 1e4 leaves two orders of magnitude for the draw.
    f = _one(report, "exploding")
    assert f.layer == "s4.2" and f.severity == "error" and f.data["ratio"] > 1e4
    assert "x the first weight layer's (s1.0," in f.message and f.data["basis"] == "reference"
    g = _one(report, "grad_exploding")
    assert g.layer == "s1.0" and g.severity == "error" and g.data["ratio"] > 1e4
    # the same layers in one flat nn.Sequential get the same verdict
    flat = nn.Sequential(*[m for m in net.modules() if not isinstance(m, nn.Sequential)])
    same = diagnose(flat, x, predicted=False)
    assert {f.kind for f in same.findings} & DRIFT == {"exploding", "grad_exploding"}
    assert same.by_kind("exploding")[0].data["ratio"] == pytest.approx(f.data["ratio"], rel=1e-5)


def test_named_stages_at_he_init_stay_clean() -> None:
    # Width 32: one network's log-variance over 8 layers has sd about sqrt(8 * 5 / 32) = 1.1 (Hanin & Nica
    # 2019), so a 10x drift in std (log 100 = 4.6 in variance) is four standard deviations away.
    net = _stages(32)
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    report = diagnose(net, torch.randn(8, 3, 16, 16), predicted=False)
    assert not report.kinds & DRIFT, report.summary()


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


class _Blocks(nn.Module):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def test_repeated_blocks_refine_the_message() -> None:
    # A ModuleList loop: each block's layers are compared with the same layer of the first block. N(0, 1)
    # weights multiply the std by sqrt(64 / 2) = 5.7 per layer, 32 per block: ~3e4 over three blocks.
    net = _Blocks(64, 4)
    for p in net.parameters():
        p.data.normal_()
    report = diagnose(net, torch.randn(64, 64), predicted=False)
    f = _one(report, "exploding")
    assert f.layer == "blocks.3.fc2" and f.data["basis"] == "role" and f.data["ratio"] > 1e3
    assert "x the first blocks.#.fc2 layer's (blocks.0.fc2," in f.message


# ---- custom weight layers ------------------------------------------------------------------------------
class MyLin(nn.Module):
    """A layer as people write one: its own parameters, used through F.linear."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(o, i))
        self.b = nn.Parameter(torch.zeros(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b)


def _custom() -> nn.Sequential:
    return nn.Sequential(MyLin(32, 64), nn.ReLU(), MyLin(64, 64), nn.ReLU(), MyLin(64, 64), nn.ReLU(), MyLin(64, 10))


def test_custom_weight_layers_are_judged_and_the_fix_says_what_to_register() -> None:
    net = _custom()  # N(0, 1) weights: 5.7x per layer, output std ~800
    x = torch.randn(64, 32)
    report = diagnose(net, x, predicted=False)
    assert not report.ok
    f = _one(report, "exploding")
    assert f.layer == "6" and f.data["ratio"] > 30  # 5.7^3 = 185 expected
    call = 'sp.init.register_fans(MyLin, lambda m: (m.w.shape[1], m.w.shape[0]), param="w")'
    assert call in f.fix and f.data["fix_scheme"] == "lsuv"  # the plan's LSUV pass rescales it meanwhile
    rules = importlib.import_module("signalprop.init.fans")._TYPE_RULES
    try:
        sp.init.register_fans(MyLin, lambda m: (m.w.shape[1], m.w.shape[0]), param="w")  # the call, as quoted
        report = diagnose(net, x, predicted=False)
        f = _one(report, "exploding")
        step = sp.fix.plan(net, example_inputs=x)["6"]
        assert f.data["fix_scheme"] == step.scheme == "linear"
        assert f.data["fix_std"] == pytest.approx(step.std, rel=1e-6)
        sp.fix.auto_init_(net, example_inputs=x)
        assert net[2].w.std().item() == pytest.approx((2 / 64) ** 0.5, rel=0.05)  # 4096 draws: sd 1.1%
        after = diagnose(net, x, predicted=False)
        assert not after.kinds & DRIFT, after.summary()
    finally:
        rules.pop(MyLin, None)


# ---- normalization layers that shrink the signal (MobileViT's BatchNorm gains, drawn around 0.02) ------
def _shrinking_norm_net() -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            convs = [nn.Conv2d(3, 16, 3, padding=1)] + [nn.Conv2d(16, 16, 1) for _ in range(6)]
            layers: list[nn.Module] = []
            for conv in convs:
                nn.init.normal_(conv.weight, std=0.02)  # transformers' initializer_range
                nn.init.zeros_(conv.bias)
                bn = nn.BatchNorm2d(16)
                nn.init.normal_(bn.weight, std=0.02)
                layers += [conv, bn, nn.SiLU()]
            self.body = nn.Sequential(*layers)
            self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
            nn.init.zeros_(self.fc1.bias)
            nn.init.zeros_(self.fc2.bias)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.body(x).flatten(2).transpose(1, 2)
            return self.fc2(torch.relu(self.fc1(h)))

    return Net()


def test_signal_lost_in_normalized_layers_is_vanishing_with_its_cause() -> None:
    net = _shrinking_norm_net()
    x = torch.randn(8, 3, 16, 16)
    report = diagnose(net, x, predicted=False)
    f = _one(report, "vanishing")
    # every conv feeds a BatchNorm whose gain is ~0.02: each block ends at ~0.02 of what a unit-gain norm
    # gives, and below sqrt(eps) the norm stops renormalizing, so fc1 sees ~1e-6 of the input's std
    assert f.layer == "fc1" and f.severity == "error" and f.data["basis"] == "unit" and f.data["ratio"] < 1e-3
    assert f.data["cause"] == "normalization_gain" and len(f.data["norms"]) == 7
    assert "gains of rms 0.0" in f.message and "torch.nn.init.ones_(m.weight) for every BatchNorm2d m" in f.fix
    assert not report.by_kind("exploding")
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    assert not diagnose(net, x, predicted=False).kinds & DRIFT  # the fix makes it right


# ---- NaN made in the backward -----------------------------------------------------------------------------
class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x * 1.0

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = g.clone()
        out[0, 0] = float("nan")
        return out


class _Bad(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NaNGrad.apply(x)


class _Root(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def test_nan_made_by_a_custom_backward_is_not_an_overflow() -> None:
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), _Bad(), nn.Linear(16, 4))
    report = diagnose(net, torch.randn(32, 16), predicted=False)
    f = _one(report, "nonfinite")
    assert f.layer == "2" and f.data["cause"] == "operation" and f.data["receives"] == "1"
    assert "(1 of its 512 elements)" in f.message and f.data["nonfinite"] == 1
    assert "not an overflow" in f.message and "overflowed" not in f.message
    assert "torch.autograd.detect_anomaly()" in f.fix


def test_sqrt_at_zero_is_named_with_a_count() -> None:
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), _Root(), nn.Linear(16, 4))
    x = torch.randn(32, 16)
    report = diagnose(net, x, predicted=False)
    f = _one(report, "nonfinite")
    zeros = int((net[1](net[0](x)) == 0).sum())  # d sqrt(u)/du = inf at each ReLU zero
    assert f.layer == "2" and f.data["cause"] == "operation" and f.data["nonfinite"] == zeros
    assert f"({zeros} of its 512 elements)" in f.message


def test_a_real_backward_overflow_is_called_one() -> None:
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    with torch.no_grad():
        net[2].weight.fill_(1.0)  # 16 terms of 3e38 each: past float32's 3.4e38
    report = diagnose(net, torch.randn(32, 16), predicted=False, loss_fn=lambda o: o.sum() * 3e38)
    f = _one(report, "nonfinite")
    assert f.layer == "2" and f.data["cause"] == "overflow" and "overflowed float32" in f.message
    assert "(512 of its 512 elements)" in f.message


# ---- degenerate batches ---------------------------------------------------------------------------------
def test_an_empty_batch_is_a_clear_error() -> None:
    model = sp.models.mlp(3, 32)
    with pytest.raises(SignalpropError, match=r"empty batch \(input shape \(0, 32\)\)"):
        diagnose(model, torch.randn(0, 32))
    with pytest.raises(SignalpropError, match="empty batch"):
        diagnose_trace(sp.measure(model, torch.randn(0, 32)))


def test_a_batch_of_one_judges_the_stds_and_says_what_it_cannot() -> None:
    model = sp.models.mlp(3, 32)
    for p in model.parameters():
        p.data.normal_()
    report = diagnose(model, torch.randn(1, 32), predicted=False)
    # per-feature means across a batch of one have no spread: no mean_drift verdict, an explicit note
    mean = _one(report, "mean_drift")
    assert mean.severity == "info" and mean.message.startswith("cannot judge with a batch of 1")
    dead = _one(report, "dead_units")
    assert dead.severity == "info" and dead.message.startswith("cannot judge with a batch of 1")
    # the std over all elements still is a statistic: N(0, 1) weights at width 32 grow it ~4x per ReLU layer
    assert _one(report, "exploding").data["ratio"] > 10


class _MeanPoolNet(nn.Module):
    """Convolutions, then a global average pool written as a tensor op (no module), then an MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.l1, self.l2, self.l3 = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        x = x.mean(dim=(2, 3))
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


def test_a_functional_global_pool_ends_the_body() -> None:
    # x.mean((2, 3)) over 16x16 positions divides each position's gradient by 256 by design, as
    # nn.AdaptiveAvgPool2d does: the MLP after it is the head, judged on its own
    net = _MeanPoolNet()
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    report = diagnose(net, torch.randn(8, 3, 16, 16), predicted=False)
    assert not report.kinds & DRIFT, report.summary()
    assert report.trace["c3"].meta.get("pooled") is True


def _conv_then_mlp() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 64), nn.ReLU(),
                         nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_body_and_head_drifting_the_same_way_compound() -> None:
    """The body and the head (after global pooling) are judged apart, but a drift in both the same way
    multiplies: with N(0, 1) weights the convs grow the signal ~70x and the Linears ~30x, each under
    factor^2 = 100, 2,000x end to end: an error in both, with the product in the message and the data.
    He's init leaves neither part drifting."""
    torch.manual_seed(0)
    net = _conv_then_mlp()
    x = torch.randn(32, 3, 12, 12)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_() if p.dim() > 1 else p.zero_()
    found = {f.layer: f for f in diagnose(net, x).findings if f.kind == "exploding"}
    body, head = found["4"], found["12"]
    assert body.data["ratio"] < 100 and head.data["ratio"] < 100
    for f in (body, head):
        assert f.severity == "error" and "end to end" in f.message
        assert f.data["end_to_end"] == pytest.approx(body.data["ratio"] * head.data["ratio"])
    sp.init.he_(net)
    assert not [f for f in diagnose(net, x).findings if f.kind in ("exploding", "grad_exploding")]


class _NormedBlock(nn.Module):
    """Pre-norm residual block whose four Linears each play their own role (as Mamba's in_proj, x_proj,
    dt_proj, out_proj): each block starts from a normalized input, so every role stays alike from block to
    block whatever happens inside one."""

    def __init__(self, d: int = 128) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.in_proj, self.mid, self.gate, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.gate(F.relu(self.mid(F.relu(self.in_proj(self.norm(x)))))))
        return x + self.out_proj(h)


def test_an_explosion_inside_each_normalized_block_is_an_error() -> None:
    """N(0, 1) weights grow the signal ~8x a layer inside every block (over 1e4 from the first Linear to
    the last), while each block restarts from its norm: no role drifts from block to block, so only the
    peak rule sees it (an error: beyond factor^4 = 1e4 of an earlier layer's std). He's init: nothing."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 128), *[_NormedBlock() for _ in range(3)], nn.LayerNorm(128),
                        nn.Linear(128, 10))
    x = torch.randn(64, 32)
    with torch.no_grad():
        for block in net[1:4]:
            for m in (block.in_proj, block.mid, block.gate, block.out_proj):
                m.weight.normal_()
                m.bias.zero_()
    found = [f for f in diagnose(net, x).findings if f.kind == "exploding"]
    peak = [f for f in found if f.data.get("basis") == "peak"]
    assert len(peak) == 1 and peak[0].severity == "error", [f.message for f in found]
    assert peak[0].data["ratio"] > 1e4 and peak[0].layer.endswith("out_proj")
    sp.init.he_(net)
    assert not [f for f in diagnose(net, x).findings if f.kind == "exploding"]
