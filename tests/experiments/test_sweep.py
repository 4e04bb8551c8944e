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
