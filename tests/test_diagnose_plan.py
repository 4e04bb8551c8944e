"""One plan, two uses: the std diagnose's fix quotes is the std sp.fix.auto_init_ sets, computed once per
diagnose call from the capture it already made; one definition of the activation that follows a layer."""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop import theory
from signalprop.diagnosis import diagnose, diagnose_trace
from signalprop.diagnosis._rulekit import following_activation

DRIFT = {"exploding", "vanishing", "grad_exploding", "grad_vanishing"}
auto = importlib.import_module("signalprop.fix.auto")


def _normal_(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.normal_(m.weight)
    return model


def _applied(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The steps auto_init_(model, example_inputs=x) writes, caught where it hands them to apply_plan."""
    steps: dict[str, Any] = {}
    real = auto.apply_plan

    def spy(m: nn.Module, p: Any, **kw: Any) -> nn.Module:
        steps.update({s.layer: s for s in p})
        return real(m, p, **kw)

    monkeypatch.setattr(auto, "apply_plan", spy)
    sp.fix.auto_init_(copy.deepcopy(model), example_inputs=x)
    return steps


CASES = {
    "relu-mlp": (lambda: sp.models.mlp(6, 128, "relu"), (64, 128)),
    "tanh-mlp": (lambda: sp.models.mlp(6, 128, "tanh"), (64, 128)),
    "gelu-mlp": (lambda: sp.models.mlp(6, 128, "gelu"), (64, 128)),
    "plain-cnn": (lambda: sp.models.plain_cnn(depth=6, width=16), (8, 3, 16, 16)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fix_std_is_what_auto_init_sets(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    build, shape = CASES[case]
    model = _normal_(build())
    x = torch.randn(*shape)
    report = diagnose(model, x, predicted=False)
    quoted = [f for f in report.findings if "fix_std" in f.data]
    assert report.kinds & DRIFT and all("fix_std" in f.data for f in report.findings if f.kind in DRIFT)
    steps = _applied(model, x, monkeypatch)
    for f in quoted:
        step = steps[f.data["fix_layer"]]
        assert f.data["fix_scheme"] == step.scheme, f
        assert f.data["fix_std"] == pytest.approx(step.std, rel=1e-6), f
        assert f"std = sqrt({step.std ** 2 * step.fan_in:.4g}/{int(step.fan_in)}) = {step.std:.4g}" in f.fix
    if case == "gelu-mlp":  # auto_init_ follows these layers' draw with an LSUV pass, and the fix says so
        assert all(f.data.get("fix_lsuv") for f in quoted if f.data["fix_scheme"] == "gain")


def test_the_tanh_fix_quotes_the_critical_std_not_the_second_moment_gain(monkeypatch: pytest.MonkeyPatch) -> None:
    # a tanh MLP with N(0, 1) weights saturates; the fix names the mean-field critical std auto_init_ draws
    # (sigma_w^2 / fan_in on the order-to-chaos line), which its sampled weights then show
    model = _normal_(sp.models.mlp(6, 128, "tanh"))
    x = torch.randn(64, 128)
    f = diagnose(model, x, predicted=False).by_kind("saturation")[0]
    w = f.data["fix_layer"]
    assert f.data["fix_scheme"].startswith("mean_field") and "2.536" not in f.fix
    fixed = sp.fix.auto_init_(copy.deepcopy(model), example_inputs=x, generator=torch.Generator().manual_seed(0))
    # 16384 draws: the sample std is within 1% of the true one (sd 0.55%) nearly always; 3% is 5 sd
    drawn = dict(fixed.named_modules())[w].weight.std().item()
    assert drawn == pytest.approx(f.data["fix_std"], rel=0.03)


def test_one_capture_one_plan_and_the_forwards_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    graph_mod = importlib.import_module("signalprop.graph._graph")
    plan_mod = importlib.import_module("signalprop.fix.plan")
    counts = {"capture": 0, "plan": 0, "forward": 0}

    def counting(module: Any, name: str, key: str) -> None:
        real = getattr(module, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            counts[key] += 1
            return real(*a, **k)

        monkeypatch.setattr(module, name, wrapper)

    counting(graph_mod, "capture", "capture")
    monkeypatch.setattr(sp.graph, "capture", graph_mod.capture)
    counting(plan_mod, "plan", "plan")
    for act, extra in (("relu", 0), ("tanh", 1)):
        model = sp.models.mlp(4, 32, act)
        h = model.register_forward_pre_hook(
            lambda m, a: counts.__setitem__("forward", counts["forward"] + (type(a[0]) is torch.Tensor)))
        counts.update(capture=0, plan=0, forward=0)
        diagnose(model, torch.randn(16, 32))
        h.remove()
        # measure's pass and the probe's; tanh adds the plan's read of its first layer's input E[x^2];
        # the capture (torch.export) traces with fake tensors
        assert counts == {"capture": 1, "plan": 1, "forward": 2 + extra}, (act, counts)


def test_diagnose_trace_with_the_model_quotes_the_plan_without_inputs() -> None:
    model = _normal_(sp.models.mlp(4, 64, "relu"))
    trace = sp.measure(model, torch.randn(32, 64))
    f = diagnose_trace(trace, model=model).by_kind("exploding")[0]
    step = sp.fix.plan(model)[f.layer]
    assert f.data["fix_std"] == pytest.approx(step.std, rel=1e-6)
    assert "sp.fix.auto_init_(model) sets" in f.fix


def test_one_definition_of_the_activation_that_follows() -> None:
    # graph capture, the plan's module order and a saved trace agree on every weight layer
    net = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.0), nn.LeakyReLU(0.2), nn.Linear(8, 8), nn.LayerNorm(8),
                        nn.Tanh(), nn.Linear(8, 8), nn.Softmax(-1), nn.GELU(), nn.Linear(8, 4))
    x = torch.randn(4, 8)
    graph = sp.graph.capture(net, x)
    plan = sp.fix.plan(net)  # no inputs: module order
    trace = sp.measure(net, x)
    saved = sp.Trace.from_json(trace.to_json())
    for i, layer in enumerate(saved):
        if not layer.weight_layer:
            continue
        by_graph = graph.activation_after(layer.name) or "linear"
        by_plan = plan[layer.name].activation
        by_trace = following_activation(saved, i)
        assert by_graph.split("(")[0] == by_trace, layer.name
        assert by_plan in (by_graph, "none" if by_graph == "linear" else by_graph), layer.name
    assert [following_activation(saved, i) for i, x in enumerate(saved) if x.weight_layer] == [
        "leaky_relu", "tanh", "linear", "linear"]
    assert theory.activation_name(graph.activations["0"]) == "leaky_relu(0.2)"
