"""`signalprop fix`: diagnose, fix, diagnose again, save the state dict; usage errors exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import signalprop as sp
from signalprop.cli import main


@pytest.mark.parametrize("method", ["auto", "lsuv"])
def test_fix_saves_a_loadable_state_dict(method: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fixed.pt"
    rc = main(["fix", "signalprop.models:mlp(depth=12, width=32, act='tanh')", "--input-shape", "32",
               "--method", method, "--out", str(out), "--batch", "32", "--quiet"])
    text = capsys.readouterr().out
    assert rc in (0, 1)
    assert "== before ==" in text and "== after ==" in text
    assert ("== plan" in text) == (method == "auto")
    net = sp.models.mlp(depth=12, width=32, act="tanh")
    net.load_state_dict(torch.load(out, weights_only=True))
    stds = sp.fix.output_stds(net, torch.randn(32, 32))
    if method == "lsuv":  # fitted on the CLI's batch, checked on another draw of the same distribution
        t = sp.fix.lsuv_target("tanh", 12, 32, 1.0).std  # the tanh chain's std (the readout keeps it)
        assert all(0.7 * t < s < 1.3 * t for s in stds.values())


def test_fix_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "x.pt")
    assert main(["fix", "signalprop.models:mlp(depth=2, width=8)", "--input-shape", "0", "--out", out]) == 2
    assert main(["fix", "signalprop.models:nothing", "--input-shape", "8", "--out", out]) == 2
    assert main(["fix", "signalprop.models:mlp(depth=2, width=8)", "--input-shape", "5", "--out", out]) == 2
    assert "error" in capsys.readouterr().err
    assert not Path(out).exists()
