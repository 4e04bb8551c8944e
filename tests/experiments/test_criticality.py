"""Poole/Schoenholz reproduction: phase diagram, c-map against real networks within a width-derived band."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from signalprop import SignalpropError, theory
from signalprop.experiments import criticality as C


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> C.Result:
    torch.manual_seed(0)
    return C.run(out=tmp_path_factory.mktemp("crit"), quick=True, seed=0)


@pytest.mark.slow
def test_quick_run_holds(quick: C.Result) -> None:
    assert quick.ok, quick.summary()
    phases = [p.phase for p in quick.points]
    assert phases == ["ordered", "critical", "chaotic"]
    ordered, critical, chaotic = quick.points
    # ordered: every pair ends near c = 1; chaotic: the c-map's fixed point c* < 1 is where they go
    c_star = theory.c_fixed_point("tanh", weight_var=chaotic.weight_var, bias_var=chaotic.bias_var)
    assert c_star < 0.5
    assert min(ms[-1] for ms in ordered.measured) > 0.85
    assert max(ms[-1] for ms in chaotic.measured) < 0.75
    assert math.isinf(critical.xi_c) or critical.xi_c > 100


@pytest.mark.slow
def test_heat_map_and_critical_line(quick: C.Result) -> None:
    assert len(quick.xi_c) == len(quick.bias_vars) and all(len(r) == len(quick.weight_vars) for r in quick.xi_c)
    assert quick.critical_line[0] == pytest.approx(1.0, abs=1e-6)  # tanh, sigma_b = 0: sigma_w^2 = 1
    assert all(a < b for a, b in zip(quick.critical_line, quick.critical_line[1:]))  # the line bends right
    data = json.loads(quick.json.read_text()) if quick.json else {}
    assert data["experiment"] == "criticality" and len(data["points"]) == 3
    assert quick.png is not None and quick.png.stat().st_size < 300_000


def test_input_pairs_are_exact() -> None:
    pairs = C.input_pairs((0.1, 0.7, -0.3), 257, seed=3)
    for k, c in enumerate((0.1, 0.7, -0.3)):
        a, b = pairs[2 * k], pairs[2 * k + 1]
        assert float((a * a).mean()) == pytest.approx(1.0, abs=1e-12)
        assert float((b * b).mean()) == pytest.approx(1.0, abs=1e-12)
        assert float(a @ b / (a.norm() * b.norm())) == pytest.approx(c, abs=1e-12)


def test_prediction_reaches_the_fixed_points() -> None:
    cs, qs = C.predicted_correlations(1.3, 0.05, 0.2, 80)
    assert cs[-1] == pytest.approx(1.0, abs=1e-3)  # ordered: 1 - c shrinks like chi1^l = 0.88^l
    assert qs[-1] == pytest.approx(theory.fixed_point("tanh", weight_var=1.3, bias_var=0.05), rel=1e-6)
    cs, _ = C.predicted_correlations(3.0, 0.05, 0.9, 80)
    assert cs[-1] == pytest.approx(theory.c_fixed_point("tanh", weight_var=3.0, bias_var=0.05), abs=1e-3)


@settings(max_examples=6)
@given(seed=st.integers(0, 10_000), point=st.sampled_from([(1.3, 0.05), (-1.0, 0.05), (3.0, 0.1), (2.0, 0.0)]))
def test_measured_correlation_stays_in_the_width_band(seed: int, point: tuple[float, float]) -> None:
    """One real tanh net of width n per example: every layer's correlation within the 4-sigma band of
    :func:`criticality.tolerance` (per-layer variance 2 (1 - c^2)^2 / n, carried by the c-map's slope).
    Over 40 seeds x 3 points x 3 pairs x 20 layers at width 500 the measured deviations had a std of
    0.64-0.86 of that sigma and no mean (largest |z| 3.4 of 7200), so the 4-sigma band holds."""
    wv, bv = point
    if wv < 0:
        wv = theory.critical_weight_var("tanh", bias_var=bv)
    cfg = C.Config(width=300, depth=15, start_corr=(0.2, 0.9))
    p = C._measure_point(cfg, wv, bv, seed)
    assert p.worst <= 1.0, (wv, bv, p.worst)


def test_a_wrong_map_is_caught() -> None:
    """The band is tight enough to reject a c-map that is off: pretend the weight variance were twice as
    large (2.6, the chaotic side of the critical line 1.76, whose pairs stop short of c = 1)."""
    cfg = C.Config(width=1000, depth=20, start_corr=(0.2,))
    model = C.build(1.3, 0.05, width=cfg.width, depth=cfg.depth, seed=0)
    measured = C.measure_correlations(model, C.input_pairs(cfg.start_corr, cfg.width, 1))[0]
    wrong, qs = C.predicted_correlations(1.3 * 2.0, 0.05, 0.2, cfg.depth)
    band = C.tolerance(1.3 * 2.0, 0.05, wrong, qs, cfg.width, cfg.sigmas)
    assert any(abs(m - p) > b for m, p, b in zip(measured, wrong, band))


def test_bad_config() -> None:
    with pytest.raises(SignalpropError, match="lo, hi, count"):
        C.Config(weight_var=(2.0, 1.0, 5))
    with pytest.raises(SignalpropError, match="start above 0"):
        C.Config(weight_var=(0.0, 1.0, 5))
    with pytest.raises(SignalpropError, match="strictly between"):
        C.Config(start_corr=(1.0,))
    with pytest.raises(SignalpropError, match="integer >= 2"):
        C.Config(width=1)
