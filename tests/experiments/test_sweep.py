"""The depth x width sweep: the grid's numbers are the measured ones, and the schemes differ as theory says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import signalprop as sp
from signalprop.cli import main
from signalprop.experiments.sweep import build, sweep


@pytest.mark.parametrize("family", ["mlp", "cnn", "resnet", "prenorm", "postnorm"])
def test_build_has_the_asked_weight_layers(family: str) -> None:
    model, shape = build(family, 6, 8)
    n = sum(1 for m in model.modules() if sp.layers.is_weight_layer(m))
    assert n == 6
    assert model(__import__("torch").randn(2, *shape)).shape[0] == 2


def test_mlp_sweep_separates_he_from_glorot(tmp_path: Path) -> None:
    r = sweep("mlp", depths=(4, 40), widths=(64,), schemes=("glorot", "he"), out=tmp_path)
    # Glorot on ReLU halves the second moment per layer: 40 layers leave about 2^(-39/2) = 1.4e-6 of the
    # first layer's std; He keeps it at one up to the finite-width drift (log-std scatter about
    # sqrt(40 * 5/(4*64)) = 0.9 nepers at most here, well inside the factor of 30 below).
    assert r.forward["glorot"][1][0] < 1e-4
    assert 1 / 30 < r.forward["he"][1][0] < 30
    assert 1 / 30 < r.gradient["he"][1][0] < 30
    trace = sp.measure(*_he_net(40, 64))
    assert r.forward["he"][1][0] == pytest.approx(trace.weight_layers()[-1].fwd.std, rel=1e-6)
    data = json.loads((tmp_path / "sweep_mlp.json").read_text())
    assert data["depths"] == [4, 40] and data["schemes"] == ["glorot", "he"]
    assert (tmp_path / "sweep_mlp.png").stat().st_size > 10_000


def _he_net(depth: int, width: int):  # type: ignore[no-untyped-def]
    import torch

    from signalprop.experiments.sweep import _init

    torch.manual_seed(0)
    model, shape = build("mlp", depth, width)
    x = torch.randn(16, *shape, generator=torch.Generator().manual_seed(0))
    _init(model, "he", x)
    return model, x


def test_sweep_command_and_bad_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sweep", "--family", "postnorm", "--depths", "4", "--widths", "8", "--schemes", "he", "--quiet",
               "--out", str(tmp_path)])
    assert rc == 0 and "he: worst |log10 std|" in capsys.readouterr().out
    assert main(["sweep", "--family", "vgg", "--out", str(tmp_path)]) == 2
    assert main(["sweep", "--schemes", "kaiming", "--out", str(tmp_path)]) == 2


def test_auto_predicts_deep_plain_chains_and_says_so(tmp_path: Path) -> None:
    r = sweep("mlp", depths=(3, 6), widths=(16,), schemes=("he",), measure_depth=4, out=tmp_path)
    assert r.source["he"] == [["measured"], ["predicted"]]
    data = json.loads((tmp_path / "sweep_mlp.json").read_text())
    assert data["source"] == {"he": [["measured"], ["predicted"]]} and data["method"] == "auto"
    # the predicted cell is predict's own number on the very network the sweep builds
    import torch

    from signalprop.experiments.sweep import _init

    torch.manual_seed(0)
    model, shape = build("mlp", 6, 16)
    _init(model, "he", torch.randn(16, *shape, generator=torch.Generator().manual_seed(0)))
    t = sp.predict(model, tuple(shape), batch=16).weight_layers()
    assert r.forward["he"][1][0] == pytest.approx(t[-1].fwd.std, rel=1e-12)
    assert r.gradient["he"][1][0] == pytest.approx(t[0].bwd.std, rel=1e-12)
    res = sweep("resnet", depths=(6,), widths=(8,), schemes=("he",), measure_depth=4)
    assert res.source["he"] == [["measured"]]  # residual families are measured whatever the depth
    with pytest.raises(sp.SignalpropError, match="method"):
        sweep("mlp", depths=(3,), widths=(8,), method="guess")


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_predicted_cells_agree_with_measured_within_the_band(family: str) -> None:
    """Where both run, predicted and measured last-layer variance agree within predict's band: the
    log-variance std ``sd`` predict documents (finite width compounded over the layers, the channel offsets,
    the batch of 16). 4 sd is a two-sided 6e-5 tail per cell for a Gaussian log-variance, so the 8 cells
    here fail together about once in 2,000 runs."""
    import math

    import torch

    from signalprop.experiments.sweep import _init

    depths, widths = (4, 16), ((64, 256) if family == "mlp" else (16, 32))
    schemes = ("he", "orthogonal")
    pred = sweep(family, depths=depths, widths=widths, schemes=schemes, method="predict")
    meas = sweep(family, depths=depths, widths=widths, schemes=schemes, method="measure")
    for s in schemes:
        for i, depth in enumerate(depths):
            for j, width in enumerate(widths):
                torch.manual_seed(0)
                model, shape = build(family, depth, width)
                _init(model, s, torch.randn(16, *shape, generator=torch.Generator().manual_seed(0)))
                last = sp.predict(model, tuple(shape), batch=16).weight_layers()[-1]
                assert pred.forward[s][i][j] == pytest.approx(last.fwd.std, rel=1e-12)
                sd = last.meta["log_var_std"]
                gap = math.log(meas.forward[s][i][j] ** 2 / last.meta["expected_var"])
                assert abs(gap) < 4 * sd, (s, depth, width, gap, sd)
