"""The demo's mean-subtraction panel: measured growth per layer against He's arithmetic, six variants."""

from __future__ import annotations

import math

import pytest
import torch

from signalprop.cli._mean_subtraction import MeanSubtract, growth_per_layer, mean_subtraction, theory_growth


def test_theory_numbers_are_the_issue_s() -> None:
    assert theory_growth("nothing") == pytest.approx(12.0, abs=0.005)  # sqrt(288 / 2)
    assert theory_growth("mean") == pytest.approx(9.908, abs=0.001)  # sqrt(288 (1/2 - 1/(2 pi)))
    assert theory_growth("he") == theory_growth("batchnorm") == 1.0


def test_mean_subtract_removes_channel_means_and_keeps_the_scale() -> None:
    x = torch.randn(4, 3, 5, 5) * 7 + torch.tensor([1.0, -2.0, 3.0]).view(1, 3, 1, 1)
    y = MeanSubtract()(x)
    assert y.mean(dim=(0, 2, 3)).abs().max().item() < 1e-5
    assert y.std().item() == pytest.approx(7.0, rel=0.15)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_measured_growth_matches_theory(seed: int) -> None:
    # Each conv output's variance averages 32 channels of their own weights: its relative scatter is about
    # sqrt(2/32) = 0.25, so one layer's std ratio scatters by about 0.13 and the median of 9 ratios by about
    # 0.13 * 1.25 / 3 = 0.055. 20% is more than 3.5 of those; the normalized variants are far tighter.
    r = mean_subtraction(depth=11, width=32, batch=4, size=8, seed=seed)
    assert r.growth["nothing"] == pytest.approx(r.theory["nothing"], rel=0.2)
    assert r.growth["mean"] == pytest.approx(r.theory["mean"], rel=0.2)
    assert r.growth["mean"] > 7.0  # mean subtraction leaves the explosion in place
    for key in ("batchnorm", "layernorm", "lsuv"):
        assert r.growth[key] == pytest.approx(1.0, rel=0.1), key
    assert r.growth["he"] == pytest.approx(1.0, rel=0.2)
    last = {k: [x for x in t if x.kind == "Conv2d"][-1].fwd.std for k, t in r.traces.items()}
    assert last["mean"] > 1e6 and last["nothing"] > 1e6
    assert all(0.05 < last[k] < 20 for k in ("batchnorm", "layernorm", "he", "lsuv"))
    assert all(math.isfinite(x.bwd.std) for t in r.traces.values() for x in t if x.kind == "Conv2d")
    sentences = r.sentences()
    assert "removes the mean, not the scale" in sentences["mean"] and f"{r.theory['mean']:.1f}" in sentences["mean"]


def test_growth_of_a_short_trace_is_nan() -> None:
    r = mean_subtraction(depth=2, width=4, batch=2, size=4)
    assert math.isnan(growth_per_layer(r.traces["nothing"]))
