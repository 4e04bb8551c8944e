"""Tests of signalprop.diagnose: each rule on a model built to show it, the exact texts people read, the
model left untouched, never raising on inf/NaN/huge models, JSON round trips, the rule registry."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import signalprop as sp
from signalprop import SignalpropError
from signalprop.diagnosis import Finding, Report, diagnose, diagnose_trace
from signalprop.diagnosis._rules import RULES, split_body_head
from signalprop.trace import LayerStats, Stats, Trace


def _normal_(model: nn.Module, std: float, bias: float = 0.0) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias)
    return model


def _he_(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def _one(report: Report, kind: str) -> Finding:
    found = report.by_kind(kind)
    assert len(found) == 1, report.summary()
    return found[0]


# ---- exploding / vanishing -------------------------------------------------------------------------
def test_exploding_names_the_layer_the_numbers_and_the_exact_std() -> None:
    # N(0, 1) weights at width 64: each ReLU layer multiplies the std by sqrt(64 / 2) = 5.7.
    model = _normal_(sp.models.mlp(depth=6, width=64), 1.0)
    report = diagnose(model, torch.randn(64, 64), predicted=False)
    assert not report.ok
    f = _one(report, "exploding")
    assert f.severity == "error" and f.layer == "12"
    assert f.message.startswith("12 (Linear): forward std ")
    assert "x the first weight layer's (0, " in f.message and "the signal grows about" in f.message
    assert f.data["per_layer"] == pytest.approx(math.sqrt(32), rel=0.3)
    # the fix quotes auto_init_'s plan: the last Linear has no activation after it and equal fans, so
    # Var[w] = 1/sqrt(fan_in fan_out) = 1/64; the first feeds a ReLU: He, std = sqrt(2/64)
    call = "sp.fix.auto_init_(model, example_inputs=inputs)"
    assert f"{call} sets 12 to linear (geometric mean of the fans): std = sqrt(1/64) = 0.125" in f.fix
    assert f.data["fix_scheme"] == "linear" and f.data["fix_std"] == pytest.approx(0.125, rel=1e-9)
    g = _one(report, "grad_exploding")
    assert g.layer == "0" and f"{call} sets 0 to He for relu: std = sqrt(2/64) = 0.1768" in g.fix


def test_vanishing_at_small_gaussian_init() -> None:
    # N(0, 0.01) at width 64: 0.01 * sqrt(32) = 0.057 per layer, 1e-7 after 5 layers: an error
    report = diagnose(_normal_(sp.models.mlp(depth=6, width=64), 0.01), torch.randn(64, 64), predicted=False)
    f = _one(report, "vanishing")
    assert f.severity == "error" and f.data["ratio"] < 1e-4
    assert "the signal shrinks about" in f.message
    assert _one(report, "grad_vanishing").layer == "0"


def test_he_init_is_clean() -> None:
    # Width 256, depth 8: one net's log-variance has sd sqrt(8 * 5 / 256) = 0.4 (Hanin & Nica 2019), so a
    # 10x drift (log 100 in variance = 4.6) is 11 standard deviations away.
    report = diagnose(_he_(sp.models.mlp(depth=8, width=256)), torch.randn(128, 256), predicted=False)
    assert report.ok, report.summary()
    assert not report.kinds & {"exploding", "vanishing", "grad_exploding", "grad_vanishing", "nonfinite"}


def test_head_after_global_pooling_is_judged_on_its_own() -> None:
    model = _he_(sp.models.plain_cnn(depth=4, width=8))
    report = diagnose(model, torch.randn(4, 3, 16, 16), predicted=False)
    body, head = split_body_head(report.trace)
    assert [report.trace[i].name for i in body] == ["body.0", "body.2", "body.4", "body.6"]
    assert [report.trace[i].name for i in head] == ["head.2"]
    # the 16x16 average pool divides per-element gradients by 256; the body is not blamed for it
    assert not report.kinds & {"grad_vanishing", "grad_exploding"}, report.summary()


# ---- nonfinite, huge values: never raise ------------------------------------------------------------
def test_nan_in_input_is_named_as_the_input() -> None:
    x = torch.randn(16, 32)
    x[3, 5] = float("nan")
    report = diagnose(sp.models.mlp(depth=3, width=32), x, predicted=False)
    f = report.by_kind("nonfinite")
    assert [x.layer for x in f] == ["input"]
    assert f[0].severity == "error" and "already holds inf/NaN" in f[0].message
    assert not report.ok


def test_inf_weight_names_the_first_layer_forward_and_backward() -> None:
    model = sp.models.mlp(depth=4, width=32)
    with torch.no_grad():
        model[4].weight[0, 0] = float("inf")
    report = diagnose(model, torch.randn(16, 32), predicted=False)
    found = report.by_kind("nonfinite")
    assert found[0].layer == "4" and "first layer whose output holds inf/NaN" in found[0].message
    assert any(f.data.get("backward") for f in found)
    assert torch.isinf(model[4].weight[0, 0])  # left as found


def test_huge_values_give_a_report_not_an_exception() -> None:
    model = _normal_(sp.models.mlp(depth=10, width=64), 30.0)  # ~1e30 and then overflow to inf
    report = diagnose(model, torch.randn(8, 64), predicted=False)
    assert not report.ok
    assert report.kinds & {"exploding", "nonfinite"}
    assert "notes" not in report.meta, report.meta


@settings(max_examples=30)
@given(
    values=st.lists(
        st.sampled_from([0.0, 1e-40, 1e-3, 1.0, 7.0, 1e30, 3e38, math.inf, -math.inf, math.nan]),
        min_size=4,
        max_size=12,
    ),
    weight=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_rules_never_raise_on_odd_statistics(values: list[float], weight: list[bool]) -> None:
    layers = []
    for i, v in enumerate(values):
        s = Stats(mean=v, var=v * v, std=abs(v), rms=abs(v), absmax=abs(v), zero_frac=0.0,
                  nonfinite_frac=0.0 if math.isfinite(v) else 1.0, chan_sq_mean=v, chan_var=abs(v))
        kind = ["Linear", "ReLU", "Tanh", "Flatten"][i % 4]
        layers.append(LayerStats(str(i), kind, s, s, (2, 3), "float16" if i % 3 else "float32", weight[i]))
    report = diagnose_trace(Trace(layers), input_stats={"nonfinite_frac": 0.0})
    assert "notes" not in report.meta, report.meta["notes"]
    report.to_json()


# ---- dead units, saturation, overflow, subnormal, mean drift ----------------------------------------
def test_dead_units_from_a_negative_bias() -> None:
    model = _he_(sp.models.mlp(depth=4, width=64))
    with torch.no_grad():
        model[2].bias.fill_(-100.0)
    report = diagnose(model, torch.randn(64, 64), predicted=False)
    f = _one(report, "dead_units")
    assert f.layer == "3" and f.severity == "error"
    assert "100.0% of its 64 units output 0 for every one of 64 inputs" in f.message
    assert "negative shift" in f.message and "re-initialize 2 with zero bias" in f.fix


def test_saturation_of_tanh() -> None:
    # N(0, 1) weights at width 64: pre-activations of std ~5, so |tanh| > 0.99 for most of them
    model = _normal_(sp.models.mlp(depth=3, width=64, act="tanh"), 1.0)
    x = torch.randn(64, 64)
    report = diagnose(model, x, predicted=False)
    f = _one(report, "saturation")
    assert f.severity == "warning" and f.data["sat_frac"] > 0.5
    assert "within 1% of +-1" in f.message
    # the fix quotes the plan auto_init_ applies to the weight layer before it (mean-field critical)
    w = str(int(f.layer) - 1)
    step = sp.fix.plan(model, example_inputs=x)[w]
    assert step.scheme.startswith("mean_field") and f.data["fix_std"] == pytest.approx(step.std, rel=1e-6)
    assert f"sp.fix.auto_init_(model, example_inputs=inputs) sets {w} to mean-field critical" in f.fix


def test_overflow_risk_in_float16() -> None:
    # N(0, 1) at width 64: x5.7 per layer, so the last layers reach ~1e4, within 8x of 65504
    model = _normal_(sp.models.mlp(depth=4, width=64), 1.0).half()
    report = diagnose(model, torch.randn(32, 64).half(), predicted=False)
    f = report.by_kind("overflow_risk")
    assert f, report.summary()
    assert "float16's largest value 6.55e+04" in f[0].message


def test_subnormal_values_are_reported() -> None:
    # 1e-7 * sqrt(32 / 2) = 4e-7 per layer: below float32's smallest normal (1.2e-38) by layer 6
    model = _normal_(sp.models.mlp(depth=8, width=32, bias=False), 1e-7)
    report = diagnose(model, torch.randn(16, 32), predicted=False)
    f = _one(report, "subnormal")
    assert "subnormal" in f.message and "torch.set_flush_denormal(True)" in f.fix
    assert f.data["subnormal_frac"] > 0


def _stats(std: float, sq_mean: float = 0.0) -> Stats:
    return Stats(mean=0.0, var=std**2, std=std, rms=std, absmax=4 * std, zero_frac=0.0, nonfinite_frac=0.0,
                 chan_sq_mean=sq_mean, chan_var=std**2)


def test_mean_drift_from_channel_means() -> None:
    ratios = [0.01, 0.7, 1.0, 2.0, 4.0]
    layers = [LayerStats(f"l{i}", "Linear", _stats(1.0, r * r), _stats(1.0), weight_layer=True) for i, r in enumerate(ratios)]
    report = diagnose_trace(Trace(layers))
    f = _one(report, "mean_drift")
    assert f.layer == "l4" and f.severity == "warning"
    assert f.data["ratio"] == pytest.approx(4.0) and f.data["reference"] == "l1"


def test_dead_unit_test_and_roles() -> None:
    from signalprop.diagnosis._rulekit import role, role_groups
    from signalprop.diagnosis._rules import _more_than_half

    # 64 coin-flip units: 42 or more dead has chance < 1%, 41 does not
    assert _more_than_half(42, 64) < 0.01 < _more_than_half(41, 64)
    assert _more_than_half(4, 4) == 1 / 16  # 4 units can never be significant at 1%
    assert role("h.11.attn.c_attn") == "h.#.attn.c_attn" and role("layers.0.mlp.fc1#2") == "layers.#.mlp.fc1"
    trace = _chain([1.0] * 4)
    assert role_groups(trace, [0, 1, 2, 3]) == [[0, 1, 2, 3]]  # no role repeats: the whole body


# ---- the finite-width band -------------------------------------------------------------------------
def _chain(stds: list[float], bands: list[tuple[float, float]] | None = None) -> Trace:
    layers = []
    for i, s in enumerate(stds):
        fwd = Stats.from_moments(0.0, s * s, var_band=bands[i] if bands else None)
        layers.append(LayerStats(f"fc{i}", "Linear", fwd, None, weight_layer=True, meta={"fan_in": 100, "act": "relu"}))
    return Trace(layers, source="predicted" if bands else "measured")


def test_drift_inside_the_band_says_the_scale_is_right_on_average() -> None:
    measured = _chain([1.0, 0.5, 0.3, 0.05])
    predicted = _chain([1.0, 1.0, 1.0, 1.0], [(0.5, 2.0), (0.1, 4.0), (0.01, 9.0), (0.001, 20.0)])
    f = _one(diagnose_trace(measured, predicted=predicted), "vanishing")
    assert f.data["inside_band"] is True
    assert "inside the predicted 90% band" in f.message and "right on average" in f.message
    assert f.fix.startswith("not another scale") and "sp.fix.lsuv_(model, inputs)" in f.fix
    assert "He (fan_in, relu) for fc3: std = sqrt(2/100) = 0.141" in f.fix


def test_drift_the_prediction_shares_says_the_scale_is_wrong() -> None:
    measured = _chain([1.0, 0.1, 0.01, 0.001])
    predicted = _chain([1.0, 0.1, 0.01, 0.001], [(0.5, 2.0)] * 4)
    f = _one(diagnose_trace(measured, predicted=predicted), "vanishing")
    assert f.data["inside_band"] is False and "the init's scale is wrong" in f.message


def test_diagnose_uses_predict_when_it_can() -> None:
    report = diagnose(_he_(sp.models.mlp(depth=3, width=32)), torch.randn(64, 32))
    assert report.predicted is not None and report.predicted.source == "predicted"
    assert report.predicted["2"].fwd.var_band is not None


# ---- the model is left as found -----------------------------------------------------------------------
def test_model_left_exactly_as_found() -> None:
    model = sp.models.resnet((1, 1), width=8).train()
    model.stages[0].relu1.register_forward_hook(lambda *a: None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    x = torch.randn(4, 3, 8, 8)
    rng = torch.get_rng_state()
    diagnose(model, x)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())
    assert hooks == sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    assert torch.equal(rng, torch.get_rng_state())


# ---- report object: ok, JSON, rendering ---------------------------------------------------------------
def test_report_json_round_trip(tmp_path: Any) -> None:
    model = _normal_(sp.models.mlp(depth=4, width=32), 1.0)
    report = diagnose(model, torch.randn(16, 32))
    path = tmp_path / "r.json"
    report.to_json(path)
    back = Report.from_json(path)
    assert back.findings == report.findings
    assert back.trace == report.trace and back.ok == report.ok
    assert (back.predicted is None) == (report.predicted is None)
    if report.predicted is not None:
        assert back.predicted == report.predicted
    assert Report.from_json(report.to_json()).findings == report.findings
    with pytest.raises(SignalpropError, match="not a signalprop report"):
        Report.from_json(report.trace.to_json())


def test_ok_is_false_only_for_warnings_and_errors() -> None:
    trace = _chain([1.0, 1.0])
    info = Finding("mean_drift", "info", "fc1", "m")
    assert Report([info], trace).ok
    assert not Report([info, Finding("saturation", "warning", "fc1", "m")], trace).ok
    assert Report([], trace).ok


def test_rendering_delegates_to_report(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    import signalprop.report.html
    import signalprop.report.plots

    report = diagnose(_normal_(sp.models.mlp(depth=3, width=16), 1.0), torch.randn(8, 16), predicted=False)
    buf = io.StringIO()
    report.table(console=Console(file=buf, width=160))
    assert "exploding" in buf.getvalue()
    calls: list[tuple[str, Any, Any]] = []
    monkeypatch.setattr(signalprop.report.plots, "plot_report", lambda r, p: calls.append(("plot", r, p)))
    monkeypatch.setattr(signalprop.report.html, "write_html", lambda r, p: calls.append(("html", r, p)))
    assert report.plot(tmp_path / "p.png") == tmp_path / "p.png"
    assert report.to_html(tmp_path / "r.html") == tmp_path / "r.html"
    assert calls == [("plot", report, tmp_path / "p.png"), ("html", report, tmp_path / "r.html")]


# ---- contract: registry, validation -----------------------------------------------------------------
def test_adding_a_rule_is_one_line() -> None:
    def always(trace: Trace, ctx: Any) -> list[Finding]:
        return [Finding("mean_drift", "info", trace[0].name, "custom rule ran")]

    report = diagnose_trace(_chain([1.0, 1.0]), rules={**RULES, "always": always})
    assert [f.message for f in report.findings] == ["custom rule ran"]


def test_bad_input_raises_signalprop_error() -> None:
    with pytest.raises(SignalpropError, match="unknown finding kind 'boom'"):
        Finding("boom", "info", "x", "m")
    with pytest.raises(SignalpropError, match="unknown severity"):
        Finding("exploding", "fatal", "x", "m")
    with pytest.raises(SignalpropError, match="factor must be a finite number above 1"):
        diagnose_trace(_chain([1.0]), factor=0.5)
    with pytest.raises(SignalpropError, match="unknown threshold"):
        diagnose_trace(_chain([1.0]), thresholds={"nope": 1.0})
    with pytest.raises(SignalpropError, match="needs an nn.Module"):
        diagnose("model", torch.randn(2, 2))  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="needs a signalprop Trace"):
        diagnose_trace([1, 2])  # type: ignore[arg-type]
