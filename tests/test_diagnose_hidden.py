"""Out-of-range signals that no output std shows: weights far above their fan's scale behind a BatchNorm or a
ConvNeXt layer scale, LSTM gates saturating, and a gradient drift confined to rows built from zero tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import signalprop as sp


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor, as ConvNeXt writes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Block(nn.Module):
    """ConvNeXt block (Liu et al. 2022): depthwise 7x7, LayerNorm, 4x MLP, layer scale gamma = 1e-6."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


def convnext(c: int = 16, depth: int = 3) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, c, 4, stride=4), LayerNorm2d(c), *[Block(c) for _ in range(depth)],
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(c), nn.Linear(c, 10))
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)  # ConvNeXt's own init
            nn.init.zeros_(m.bias)
    return net


def _normal_(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_()
    return model


def test_convnext_layer_scale_hides_normal_weights_and_the_gain_rule_sees_them() -> None:
    x = torch.randn(4, 3, 32, 32)
    assert not [f for f in sp.diagnose(convnext(), x, predicted=False).findings
                if f.data.get("basis") == "weight_gain"]
    net = _normal_(convnext())
    report = sp.diagnose(net, x, predicted=False)
    (f,) = [f for f in report.findings if f.data.get("basis") == "weight_gain"]
    assert not report.ok and f.kind == "exploding" and f.severity == "warning"
    # the worst gain is a pwconv2 (fan_in 4c = 64): sqrt(64 E[w^2]) with E[w^2] over 1024 N(0, 1) draws,
    # whose relative sd is sqrt(2 / 1024) = 4.4%: the gain is 8 within 3 sd (6.6% on the square root)
    assert f.layer.endswith("pwconv2") and f.data["weight_gain"] == pytest.approx(8.0, rel=0.07)
    # every one of the 3 x 4 weight layers inside the blocks and the stem (fan 48) is beyond 4; the pwconv1s
    # (fan 16: gain 4 on average) are only sometimes, so count the sure ones
    assert sum(1 for k in f.data["layers"] if k.endswith(("pwconv2", "dwconv"))) == 6
    assert "std = sqrt(" in f.fix
    for fix in ("auto_init_", "lsuv_"):
        fixed = _normal_(convnext())
        sp.fix.auto_init_(fixed, example_inputs=x) if fix == "auto_init_" else sp.fix.lsuv_(fixed, x)
        after = sp.diagnose(fixed, x, predicted=False)
        assert not [f for f in after.findings if f.data.get("basis") == "weight_gain"], (fix, after.summary())
        assert not after.by_kind("exploding"), (fix, after.summary())


def resnet_like(c: int = 16, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(3 if i == 0 else c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.train()


def test_batchnorm_hides_normal_conv_weights_and_the_gain_rule_sees_them() -> None:
    x = torch.randn(8, 3, 16, 16)
    assert sp.diagnose(resnet_like(), x, predicted=False).ok
    report = sp.diagnose(_normal_(resnet_like()), x, predicted=False)
    (f,) = [f for f in report.findings if f.data.get("basis") == "weight_gain"]
    # fan_in 9 * 16 = 144: gain sqrt(144) = 12 (E[w^2] over 2304 draws: relative sd 3%, 1.5% on the root)
    assert f.data["weight_gain"] == pytest.approx(12.0, rel=0.05) and f.data["normalized"] is True
    assert "BatchNorm2d after it divides that out" in f.message
    # every conv is beyond 4, the first too: fan_in 27, gain sqrt(27) = 5.2 (432 draws: 3.4% sd on the root)
    assert {"0", "3", "6", "9"} <= set(f.data["layers"])
    assert f.data["layers"]["0"] == pytest.approx(math.sqrt(27), rel=0.11)
    sp.fix.auto_init_(net := _normal_(resnet_like()), example_inputs=x)
    assert sp.diagnose(net, x, predicted=False).ok


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.body = nn.Sequential(nn.Linear(32, 32), nn.ReLU())
        self.head = nn.Linear(32, 100, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


def test_a_head_tied_to_an_embedding_keeps_the_table_s_scale() -> None:
    torch.manual_seed(0)
    report = sp.diagnose(TiedLM(), torch.randint(0, 100, (8, 12)), predicted=False)
    assert "weight_gain" not in report.trace["head"].meta  # N(0, 1) is the table's default, not a bad init
    assert not [f for f in report.findings if f.data.get("basis") == "weight_gain"]


class RNNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def test_lstm_gates_saturated_beyond_a_tenth_is_a_warning() -> None:
    torch.manual_seed(0)
    net = RNNNet()
    x = torch.randn(8, 10, 16)
    assert sp.diagnose(net, x, predicted=False).ok
    _normal_(net)
    report = sp.diagnose(net, x, predicted=False)
    (f,) = report.by_kind("saturation")
    # PyTorch's default gives under 1% saturated gates; N(0, 1) weights (pre-activations of std up to
    # sqrt(16 + 32) = 7) several tens of times more
    assert f.layer == "rnn" and f.data["sat_frac"] > 0.10 and f.severity == "warning" and not report.ok
    sp.fix.auto_init_(net, example_inputs=x)
    assert sp.diagnose(net, x, predicted=False).ok


def test_vit_mae_zero_class_token_gradient_is_a_located_warning() -> None:
    tf = pytest.importorskip("transformers", reason="transformers is a dev extra (real architectures)")
    torch.manual_seed(0)
    cfg = tf.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          image_size=32, patch_size=8)
    model = tf.ViTMAEModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    assert not model.embeddings.cls_token.any()  # transformers leaves the class token at zero
    report = sp.diagnose(model, x, predicted=False)
    (f,) = report.by_kind("grad_exploding")
    # the class-token row is all zero, so the LayerNorm after it divides its gradient by sqrt(eps = 1e-12):
    # real (that row's gradient is ~1e6 times the others'), but confined to the parameters behind that row
    assert f.layer == "embeddings" and f.severity == "warning" and f.data["cause"] == "zero_tensors"
    assert f.data["ratio"] > 100 and "confined" in f.message and "trunc_normal_" in f.fix
    assert not [x for x in report.findings if x.severity == "error"]
    assert math.isfinite(f.data["ratio"])


def test_stale_batchnorm_in_eval_mode_does_not_hide_the_convs_before_it() -> None:
    # in eval mode a BatchNorm whose running statistics were never updated (mean 0, var 1) passes its input
    # through: the N(0, 1) convs' growth is the network's real forward, and the convs are judged
    net = _normal_(resnet_like()).eval()
    x = torch.randn(8, 3, 16, 16)
    stds: list[float] = []
    hooks = [m.register_forward_hook(lambda m, a, o: stds.append(float(o.detach().double().std())))
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    report = sp.diagnose(net, x, predicted=False)
    (f,) = report.by_kind("exploding")
    # each conv multiplies by about sqrt(144) = 12 and nothing divides it out: far beyond factor**2
    assert f.severity == "error" and f.data["basis"] == "reference"
    assert f.data["ratio"] == pytest.approx(max(stds) / stds[0], rel=1e-3) and f.data["ratio"] > 100
    assert any("running statistics never updated" in n for n in report.meta["notes"])
