"""The demo's story as data (toy arithmetic, He's formula against measurement) and the command end to end."""

from __future__ import annotations

import math

import pytest
import torch

import signalprop as sp
from signalprop.cli import _story as _demo
from signalprop.cli import main


def test_toy_arithmetic_is_the_questions() -> None:
    t = _demo.toy()
    assert t.activated == (4.0, 5.0, 0.0, 0.0)
    assert t.products == (-4.0, -10.0, 0.0, 0.0)
    assert t.output == -14.0 and t.active == 2


def test_he_formula_matches_a_measured_relu_mlp() -> None:
    # He's product formula (Eq. 10) is an expectation; with width n and batch B one layer's variance scatters by
    # about sqrt(5/n) per layer (Hanin & Nica 2019): over 10 layers of width 512, sqrt(50/512) = 0.31 in log.
    depth, width = 10, 512
    model = _demo.initialized(lambda: sp.models.mlp(depth, width, "relu"), "naive", seed=3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.mul_(1.7 / math.sqrt(width))  # a gain of 1.7^2/2 = 1.445 per layer
    trace = sp.measure(model, torch.randn(256, width))
    formula = _demo.he_formula(model, trace)
    rows = [layer for layer in trace if layer.weight_layer]
    tol = 4 * math.sqrt(5 * depth / width)
    for layer in rows[: depth]:
        predicted, _ = formula[layer.name]
        assert abs(math.log(layer.fwd.std**2 / predicted**2)) < tol, layer.name
    growth = formula[rows[depth - 1].name][0] / formula[rows[0].name][0]
    assert abs(math.log(growth**2) - (depth - 1) * math.log(1.7**2 / 2)) < 0.1


def test_verdicts_name_the_problem() -> None:
    x = torch.randn(4, 3, 32, 32)
    run = _demo.run_inits("cnn", lambda: sp.models.plain_cnn(12, 16, "relu"), x)
    assert run.reports["he"].ok
    assert not run.reports["naive"].ok
    assert "grows" in _demo.verdict(run.reports["naive"])
    assert "signal stays in range" in _demo.verdict(run.reports["he"])


@pytest.mark.slow
def test_demo_command_writes_pictures_and_report(tmp_path, capsys) -> None:
    rc = main(["demo", "--out", str(tmp_path), "--batch", "2", "--depth", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ["alexnet_std.png", "plain_cnn_std.png", "mean_subtraction.png", "predicted_band.png",
                 "alexnet_naive_report.html"]:
        assert (tmp_path / name).stat().st_size > 10_000, name
    assert "y = " in out and "-14" in out
    assert "after lsuv_" in out
    flat = " ".join(out.replace("\u2502", " ").split())  # the panel may wrap a sentence inside its border
    assert "it removes the mean, not the scale" in flat
