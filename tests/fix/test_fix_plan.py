"""plan / apply_plan / residual: the per-layer plan as data, the theory behind each number, Fixup and zero."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop import SignalpropError, theory
from signalprop.fix import apply_plan, fixup_factor, mean_field_choice, plan


def test_relu_family_gets_he_with_leaky_slope() -> None:
    net = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 30), nn.LeakyReLU(0.2), nn.Linear(30, 3))
    p = plan(net)
    assert [s.scheme for s in p] == ["he", "he", "linear"]
    assert p["0"].std == pytest.approx(math.sqrt(2 / 50), rel=1e-9)
    assert p["2"].std == pytest.approx(math.sqrt(2 / (1 + 0.2**2)) / math.sqrt(40), rel=1e-6)
    assert p["4"].std == pytest.approx((30 * 3) ** -0.25, rel=1e-12)  # geometric mean of the fans
    assert all(s.bias_std == 0 for s in p)


def test_selu_lecun_and_gelu_gain() -> None:
    p = plan(nn.Sequential(nn.Linear(16, 16), nn.SELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 2)))
    assert [s.scheme for s in p] == ["lecun", "gain", "linear"]
    assert p["2"].std == pytest.approx(theory.gain("gelu") / 4, rel=1e-9)
    assert not p.needs_lsuv  # no inputs, no LSUV pass
    p2 = plan(nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 2)), example_inputs=torch.randn(4, 16))
    assert p2.needs_lsuv and p2["0"].lsuv and not p2["2"].lsuv


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "erf"])
def test_mean_field_choice_is_critical_and_a_fixed_point(act: str) -> None:
    c = mean_field_choice(act, 40)
    assert c.chi1 == pytest.approx(1.0, abs=1e-9)
    assert theory.chi1(act, weight_var=c.weight_var, bias_var=c.bias_var, q=c.q_star) == pytest.approx(1.0, abs=1e-9)
    assert float(theory.qmap(act, c.q_star, weight_var=c.weight_var, bias_var=c.bias_var)) == pytest.approx(
        c.q_star, rel=1e-9)
    assert c.bias_var == pytest.approx(0.05, rel=1e-6)  # the preferred candidate passes the 2x drift check
    assert c.forward_drift <= 2 and c.gradient_drift <= 2
    # the lead's bisection on the same line agrees
    assert theory.critical_weight_var(act, bias_var=c.bias_var) == pytest.approx(c.weight_var, rel=1e-5)


def test_tanh_chain_input_layer_starts_at_q_star() -> None:
    net = sp.models.mlp(6, 32, "tanh", in_features=10)
    x = torch.randn(256, 10) * 2.0
    p = plan(net, example_inputs=x)
    c = mean_field_choice("tanh", 6)
    assert [s.scheme for s in p] == ["mean_field_input"] + ["mean_field"] * 5 + ["mean_field_readout"]
    m2 = float((x.double() ** 2).mean())
    assert p["0"].std ** 2 * 10 * m2 + p["0"].bias_std ** 2 == pytest.approx(c.q_star, rel=1e-9)
    assert p["2"].std ** 2 * 32 == pytest.approx(c.weight_var, rel=1e-9)
    assert p["2"].bias_std ** 2 == pytest.approx(c.bias_var, rel=1e-9)


def test_mean_field_q_measured_matches_theory() -> None:
    # Pre-activation variance of every tanh layer ~ q*; sample size: 512 x 256 pre-activations per layer,
    # but units share weights, so the spread comes from width (relative sd ~ sqrt(2/256) per layer).
    torch.manual_seed(1)
    net = sp.models.mlp(10, 256, "tanh")
    x = torch.randn(512, 256)
    sp.fix.auto_init_(net, example_inputs=x)
    c = mean_field_choice("tanh", 10)
    for name, std in sp.fix.output_stds(net, x).items():
        assert std**2 == pytest.approx(c.q_star, rel=0.35), name


def test_plan_leaves_model_unchanged() -> None:
    net = sp.models.resnet((1, 1), 8, norm=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    p = plan(net, example_inputs=torch.randn(2, 3, 8, 8))
    assert len(p) > 0
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_fixup_factor_values() -> None:
    assert fixup_factor(16, 2) == pytest.approx(0.25)
    assert fixup_factor(16, 3) == pytest.approx(0.25)  # (16^(-1/4))^2
    assert fixup_factor(9, 1) == pytest.approx(1 / 3)
    with pytest.raises(SignalpropError):
        fixup_factor(0, 2)


def test_fixup_on_norm_free_resnet() -> None:
    net = sp.models.resnet((2, 2), 8, norm=False)
    p = plan(net, input_shape=(3, 8, 8))
    assert p.residuals == 4
    fixed = [s for s in p if s.scheme.endswith("+fixup")]
    assert sorted(s.layer for s in fixed) == [f"stages.{i}.conv2" for i in range(4)]
    for s in fixed:
        assert s.factor == pytest.approx(0.5)  # L = 4 branches of m = 2: 4^(-1/2)
        assert s.std == pytest.approx(0.5 * math.sqrt(2 / s.fan_in), rel=1e-9)


def test_fixup_goes_on_the_norm_after_the_last_layer() -> None:
    net = sp.models.resnet((2,), 8, norm=True)
    p = plan(net, input_shape=(3, 8, 8))
    gains = {s.layer: s.gain for s in p if s.scheme == "norm_gain"}
    assert gains == {"stages.0.bn2": pytest.approx(2**-0.5), "stages.1.bn2": pytest.approx(2**-0.5)}
    apply_plan(net, p)
    assert torch.allclose(net.stages[0].bn2.weight, torch.full((8,), 2**-0.5))


def test_zero_residual() -> None:
    net = sp.models.resnet((2,), 8, norm=True)
    sp.fix.auto_init_(net, input_shape=(3, 8, 8), residual="zero")
    assert not net.stages[0].bn2.weight.detach().any() and not net.stages[1].bn2.weight.detach().any()
    x = torch.randn(2, 8, 8, 8)
    net.eval()
    with torch.no_grad():  # each block is the identity on its (post-ReLU) input
        y = net.stages[0](torch.relu(x))
    assert torch.allclose(y, torch.relu(x))
    bare = sp.models.resnet((2,), 8, norm=False)
    p = plan(bare, input_shape=(3, 8, 8), residual="zero")
    assert {s.layer for s in p if s.scheme == "zero"} == {"stages.0.conv2", "stages.1.conv2"}


def test_residual_none_and_bad_mode() -> None:
    p = plan(sp.models.resnet((2,), 8, norm=False), input_shape=(3, 8, 8), residual=None)
    assert all(s.factor == 1.0 for s in p)
    with pytest.raises(SignalpropError, match="residual must be"):
        plan(sp.models.mlp(2, 4), residual="half")


class _NotSequential(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.act = nn.Tanh()
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.act(self.a(x)))


def test_module_order_warns_unless_sequential() -> None:
    with pytest.warns(UserWarning, match="module order"):
        p = plan(_NotSequential())
    assert p.method == "module-order" and p["a"].activation == "tanh"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan(sp.models.mlp(3, 4))  # nn.Sequential: module order is the call order


def test_embeddings_kept_and_table() -> None:
    net = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    before = net[0].weight.clone()
    p = plan(net, example_inputs=torch.randint(0, 10, (3, 5)))
    assert p["0"].scheme == "keep"
    apply_plan(net, p)
    assert torch.equal(net[0].weight, before)
    text = p.table()
    assert "keep" in text and "he" in text and "structure: export" in text
    assert p.to_dict()["steps"][1]["scheme"] == "he"


def test_apply_plan_draws_the_planned_std() -> None:
    # sample std of N entries has relative sd 1/sqrt(2N); allow 6 of them
    net = sp.models.mlp(2, 256, "tanh")
    p = plan(net)
    apply_plan(net, p)
    for s in p:
        w = dict(net.named_modules())[s.layer].weight.detach()
        n = w.numel()
        assert float(w.std()) == pytest.approx(s.std, rel=6 / math.sqrt(2 * n))
        b = dict(net.named_modules())[s.layer].bias.detach()
        assert float(b.std()) == pytest.approx(s.bias_std, rel=6 / math.sqrt(2 * b.numel()))


def test_apply_plan_rejects_a_foreign_plan() -> None:
    p = plan(sp.models.mlp(2, 4))
    with pytest.raises(SignalpropError, match="does not have"):
        apply_plan(nn.Sequential(nn.Linear(2, 2)), p)


def test_apply_plan_scales_each_block_by_its_own_fan_in() -> None:
    # attention with kdim, vdim: the step's std is for fan_in E; k and v blocks get std sqrt(E / their fan_in)
    m = nn.MultiheadAttention(64, 4, kdim=256, vdim=16)
    step = sp.fix.LayerPlan("", "MultiheadAttention", "none", "linear", 0.1, 0.0, "test", 64.0)
    apply_plan(m, sp.fix.Plan((step,), "module-order", None), generator=torch.Generator().manual_seed(0))
    for w, want in ((m.q_proj_weight, 0.1), (m.k_proj_weight, 0.05), (m.v_proj_weight, 0.2)):
        assert float(w.detach().std()) == pytest.approx(want, rel=6 / math.sqrt(2 * w.numel()))
