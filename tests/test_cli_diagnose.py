"""Tests of `signalprop diagnose | gain | critical` and of TARGET loading (signalprop.cli._target)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

import signalprop as sp
from signalprop import SignalpropError
from signalprop.cli import _main as cli
from signalprop.cli._target import load_target, parse_shape
from signalprop.diagnosis import Report

MINE = ("diagnose", "gain", "critical")

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn
    import signalprop as sp

    def he_mlp(depth=4, width=32):
        torch.manual_seed(0)
        m = sp.models.mlp(depth, width)
        for layer in m:
            if isinstance(layer, nn.Linear):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        return m

    def token_model(vocab=50, dim=16):
        return nn.Sequential(nn.Embedding(vocab, dim), nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, 4))

    def broken():
        raise RuntimeError("factory exploded")

    def not_a_model():
        return 3

    model_instance = nn.Linear(8, 8)
    """
)


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """cli.main restricted to this engineer's sub-commands; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(cli, "COMMANDS", {k: v for k, v in cli.COMMANDS.items() if k in MINE})

    def call(*argv: str) -> tuple[int, str, str]:
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse's own usage errors
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


@pytest.fixture
def factories(tmp_path: Path) -> Path:
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES)
    return path


# ---- diagnose -----------------------------------------------------------------------------------------
def test_exit_0_when_clean_and_1_when_a_warning(run: Any, factories: Path) -> None:
    code, out, err = run("diagnose", f"{factories}:he_mlp", "--input-shape", "32", "--batch", "64", "--no-predict")
    assert code == 0, out + err
    assert "no problems found" in out or "info only" in out
    # PyTorch's default init: Var[w] = 1/(3 fan_in), each ReLU layer keeps 1/6 of the variance
    code, out, _ = run(
        "diagnose", "signalprop.models:mlp(depth=6, width=64)", "--input-shape", "64", "--quiet", "--no-predict"
    )
    assert code == 1
    assert "vanishing" in out and "to He for relu: std = sqrt(2/64) = 0.1768" in out


def test_outputs_json_html_plot(run: Any, factories: Path, tmp_path: Path) -> None:
    j, h, p = tmp_path / "r.json", tmp_path / "r.html", tmp_path / "r.png"
    code, out, err = run(
        "diagnose", f"{factories}:he_mlp(depth=3, width=16)", "--input-shape", "16", "--batch", "32",
        "--json", str(j), "--html", str(h), "--plot", str(p),
    )
    assert code in (0, 1), err
    report = Report.from_json(j)
    assert report.trace.source == "measured" and len(report.trace.weight_layers()) == 4
    assert report.predicted is not None  # predict ran on the (16,) input shape
    assert h.read_text().lstrip().lower().startswith("<!doctype html")
    assert p.stat().st_size > 0
    assert f"wrote {j}" in out


def test_weights_are_loaded(run: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = sp.models.mlp(6, 64)
    for m in model:
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            torch.nn.init.zeros_(m.bias)
    ckpt = tmp_path / "w.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, ckpt)
    target = "signalprop.models:mlp(depth=6, width=64)"
    code, out, err = run("diagnose", target, "--input-shape", "64", "--batch", "64", "--weights", str(ckpt), "--no-predict")
    assert code == 0, out + err
    code, _, err = run("diagnose", "signalprop.models:mlp(depth=5, width=64)", "--input-shape", "64", "--weights", str(ckpt))
    assert code == 2 and "do not fit the model" in err and "unexpected" in err


def test_dtype_and_vocab(run: Any, factories: Path, tmp_path: Path) -> None:
    j = tmp_path / "r.json"
    code, _, err = run("diagnose", f"{factories}:he_mlp", "--input-shape", "32", "--dtype", "bfloat16", "--json", str(j))
    assert code in (0, 1), err
    assert {layer.dtype for layer in Report.from_json(j).trace} == {"bfloat16"}
    code, _, err = run("diagnose", f"{factories}:token_model", "--input-shape", "12", "--vocab", "50", "--json", str(j))
    assert code in (0, 1), err
    assert Report.from_json(j).trace["0"].kind == "Embedding"


@pytest.mark.parametrize(
    ("target", "shape", "reason"),
    [
        ("signalprop.models", "16", "bad target"),
        ("signalprop.models:nope", "16", "has no factory 'nope'"),
        ("no_such_pkg_xyz:f", "16", "no module named 'no_such_pkg_xyz'"),
        ("missing/file.py:f", "16", "no such file"),
        ("{f}:broken", "16", "factory exploded"),
        ("{f}:not_a_model", "16", "returned a int, not an nn.Module"),
        ("{f}:he_mlp(depth=x)", "16", "only literals"),
        ("{f}:he_mlp", "3,a", "is not an integer"),
        ("{f}:he_mlp", "0,4", "at least 1"),
        ("{f}:he_mlp", "17", "forward failed on an input of shape (16, 17)"),
    ],
)
def test_usage_errors_exit_2_with_one_line(run: Any, factories: Path, target: str, shape: str, reason: str) -> None:
    code, out, err = run("diagnose", target.format(f=factories), "--input-shape", shape, "--no-predict")
    assert code == 2
    assert reason in err
    assert len(err.strip().splitlines()) == 1, err


# ---- gain, critical -------------------------------------------------------------------------------------
def test_gain_tanh_side_by_side(run: Any) -> None:
    code, out, _ = run("gain", "tanh", "--fan-in", "256")
    assert code == 0
    assert "He's gain           1.59254" in out and "PyTorch's gain      1.66667" in out
    assert "5/3 is 4.7% larger" in out and "q* = 1.18" in out
    assert f"He {1.5925374197228312 / 16:.6g}" in out
    code, out, _ = run("gain", "relu")
    assert "They agree" in out and "1.41421" in out
    code, out, _ = run("gain", "gelu")
    assert code == 0 and "no entry" in out


def test_critical(run: Any) -> None:
    code, out, _ = run("critical", "relu", "--fan-in", "100")
    assert code == 0
    assert "critical sigma_w^2       2   " in out
    assert f"sqrt(2/100) = {math.sqrt(0.02):.6g}" in out
    assert "inf  <- critical" in out
    # tanh's 1.76 at bias variance 0.05 is tested in test_theory.py (the CLI prints what theory returns)


def test_gain_and_critical_usage_errors(run: Any) -> None:
    code, _, err = run("gain", "relu2")
    assert code == 2 and "unknown activation 'relu2'" in err
    code, _, err = run("critical", "tanh", "--bias-var", "-1")
    assert code == 2 and "--bias-var must be" in err


# ---- the loader the fix command shares ------------------------------------------------------------------
def test_parse_shape() -> None:
    assert parse_shape("3,224,224") == (3, 224, 224)
    assert parse_shape("3x32x32") == (3, 32, 32)
    assert parse_shape(" 784 ") == (784,)
    for bad in ("", "3,,4", "a", "-1"):
        with pytest.raises(SignalpropError, match="bad input shape"):
            parse_shape(bad)


def test_load_target_forms(factories: Path) -> None:
    m = load_target("signalprop.models:plain_cnn(depth=3, width=4, act='tanh')")
    assert len([x for x in m.modules() if isinstance(x, torch.nn.Tanh)]) == 3
    assert isinstance(load_target(f"{factories}:model_instance"), torch.nn.Linear)
    with pytest.raises(SignalpropError, match="is a model instance, not a factory"):
        load_target(f"{factories}:model_instance(3)")
    with pytest.raises(SignalpropError, match="no such weights file"):
        load_target(f"{factories}:he_mlp", "nope.pt")
