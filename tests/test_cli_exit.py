"""The command line's contract with CI: exit status 0 clean, 1 findings, 2 usage or bad input, 3 internal
failure, each error in one line on stderr (the traceback only under --debug), on every sub-command; and a
start that imports no torch for --help and --version."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import signalprop as sp
from signalprop.cli import _main as cli

CLEAN_MLP = "signalprop.models:mlp(depth=3, width=16)"


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Any:
    """cli.main(argv) -> (exit status, stdout, stderr); main returns, it never raises SystemExit."""

    def call(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def boom(*_a: Any, **_k: Any) -> Any:
    raise RuntimeError("boom: an internal step failed\nsecond line of the message")


# ---- 0, 1, 2 through main() --------------------------------------------------------------------------------
def test_help_version_and_usage_errors_are_returned_not_raised(run: Any) -> None:
    code, out, _ = run("--version")
    assert (code, out.strip()) == (0, f"signalprop {sp.__version__}")
    code, out, _ = run("--help")
    assert code == 0 and "exit status:" in out
    for status in ("0  clean", "1  findings", "2  usage or bad input", "3  internal failure"):
        assert status in out
    code, _, err = run("diagnose")  # TARGET and --input-shape missing: argparse's usage error
    assert code == 2 and "the following arguments are required" in err
    code, _, err = run("gain", "tanh", "--no-such-option")
    assert code == 2 and "unrecognized arguments" in err
    code, out, _ = run()
    assert code == 2 and "usage: signalprop" in out


def test_clean_and_findings(run: Any) -> None:
    assert run("gain", "tanh")[0] == 0
    code, out, _ = run("critical", "tanh")
    assert code == 0 and "fixed point q*           0   " in out  # exactly 0 at sigma_b^2 = 0, not 8.2e-09
    # PyTorch's default init shrinks a ReLU MLP's signal: findings, exit 1
    code, out, _ = run("diagnose", "signalprop.models:mlp(depth=6, width=64)", "--input-shape", "64", "--quiet",
                       "--no-predict")
    assert code == 1 and "vanishing" in out


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (("demo", "--batch", "0"), "--batch and --depth must be positive"),
        (("diagnose", CLEAN_MLP, "--input-shape", "17", "--no-predict"), "forward failed"),
        (("fix", CLEAN_MLP, "--input-shape", "16", "--batch", "1", "--out", "{tmp}/f.pt"), "--batch must be"),
        (("reproduce", "he2015", "--seed", "-1"), "--seed must be"),
        (("gain", "leaky_relu(a)"), "write numbers"),
        (("critical", "tanh", "--fan-in", "0"), "--fan-in must be"),
    ],
)
def test_bad_input_exits_2_in_one_line(run: Any, tmp_path: Path, argv: tuple[str, ...], reason: str) -> None:
    code, _, err = run(*(a.format(tmp=tmp_path) for a in argv))
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"signalprop {argv[0]}: error: ") and reason in line


# ---- 3: internal failures, one line; the traceback under --debug --------------------------------------------
def _break(monkeypatch: pytest.MonkeyPatch, command: str) -> None:
    """Make one step inside ``command`` fail the way a bug would."""
    import signalprop.cli._story
    import signalprop.diagnosis
    import signalprop.experiments
    import signalprop.fix
    import signalprop.theory

    targets = {
        "demo": (signalprop.cli._story, "toy"),
        "diagnose": (signalprop.diagnosis, "diagnose"),
        "fix": (signalprop.fix, "auto_init_"),
        "gain": (signalprop.theory, "second_moment"),
        "critical": (signalprop.theory, "critical_weight_var"),
    }
    if command == "reproduce":
        class Broken:
            run = staticmethod(boom)
        monkeypatch.setitem(signalprop.experiments.EXPERIMENTS, "he2015", Broken())
    else:
        monkeypatch.setattr(*targets[command], boom)


ARGV = {
    "demo": ("demo", "--out", "{tmp}/demo"),
    "diagnose": ("diagnose", CLEAN_MLP, "--input-shape", "16", "--no-predict"),
    "fix": ("fix", CLEAN_MLP, "--input-shape", "16", "--out", "{tmp}/fixed.pt", "--quiet"),
    "reproduce": ("reproduce", "he2015", "--quick", "--out", "{tmp}/rep"),
    "gain": ("gain", "tanh"),
    "critical": ("critical", "tanh"),
}


@pytest.mark.parametrize("command", list(ARGV))
def test_internal_failure_exits_3_in_one_line(run: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             command: str) -> None:
    _break(monkeypatch, command)
    argv = [a.format(tmp=tmp_path) for a in ARGV[command]]
    code, _, err = run(*argv)
    assert code == 3
    line = one_line(err)
    assert line == (f"signalprop {command}: internal error: RuntimeError: boom: an internal step failed "
                    "(run again with --debug for the traceback)")
    code, _, err = run(*argv, "--debug")
    assert code == 3
    assert err.startswith("Traceback (most recent call last):") and "in boom" in err
    assert err.strip().splitlines()[-1] == f"signalprop {command}: internal error: RuntimeError: boom: an internal step failed"


def test_debug_before_the_command_counts_too(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _break(monkeypatch, "gain")
    code, _, err = run("--debug", "gain", "tanh")
    assert code == 3 and "Traceback" in err
    code, _, err = run("--debug", "gain", "relu2")  # a usage error keeps its code; --debug adds the traceback
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("signalprop gain: error:")


# ---- output paths ----------------------------------------------------------------------------------------
def test_json_into_a_missing_folder_creates_it(run: Any, tmp_path: Path) -> None:
    j = tmp_path / "new" / "deeper" / "report.json"
    code, out, err = run("diagnose", CLEAN_MLP, "--input-shape", "16", "--no-predict", "--quiet", "--json", str(j))
    assert code in (0, 1), err
    assert sp.Report.from_json(j).trace.source == "measured"
    assert f"wrote {j}" in out


def test_unwritable_outputs_exit_2_before_the_work(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _break(monkeypatch, "diagnose")  # the path is checked first: a diagnosis would fail with 3
    code, _, err = run("diagnose", CLEAN_MLP, "--input-shape", "16", "--json", str(tmp_path))
    assert code == 2 and "is a folder" in one_line(err)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    code, _, err = run("diagnose", CLEAN_MLP, "--input-shape", "16", "--html", str(blocker / "r.html"))
    assert code == 2 and "cannot create the folder of --html" in one_line(err)
    code, _, err = run("fix", CLEAN_MLP, "--input-shape", "16", "--out", str(blocker / "sub" / "f.pt"))
    assert code == 2 and "--out" in one_line(err)
    code, _, err = run("demo", "--out", str(blocker / "demo"))  # an OS error naming a path: bad input
    assert code == 2 and one_line(err).startswith(f"signalprop demo: error: cannot access {blocker}")


# ---- --weights that do not fit -----------------------------------------------------------------------------
def test_weights_mismatch_names_the_keys(run: Any, tmp_path: Path) -> None:
    source = sp.models.mlp(3, 16)
    sd = source.state_dict()
    sd["0.weight"] = torch.zeros(8, 16)  # shape mismatch
    for k in ("2.bias", "4.bias", "4.weight", "6.bias"):  # four missing
        sd.pop(k)
    sd["head.weight"] = torch.zeros(2)  # unexpected
    ckpt = tmp_path / "w.pt"
    torch.save(sd, ckpt)
    model = sp.models.mlp(3, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from signalprop.cli._target import load_weights

    with pytest.raises(sp.SignalpropError) as info:
        load_weights(model, str(ckpt))
    msg = str(info.value)
    assert "4 missing (2.bias, 4.weight, 4.bias, ... (1 more))" in msg
    assert "1 unexpected (head.weight)" in msg
    assert "1 shape mismatch (0.weight: checkpoint (8, 16), model (16, 16))" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded
    code, _, err = run("diagnose", CLEAN_MLP, "--input-shape", "16", "--weights", str(ckpt))
    assert code == 2 and "1 shape mismatch (0.weight" in one_line(err)


# ---- through a real process --------------------------------------------------------------------------------
def _python(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sp.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_exit_codes_of_the_process(tmp_path: Path) -> None:
    done = _python("-m", "signalprop", "gain", "relu2")
    assert done.returncode == 2 and one_line(done.stderr).startswith("signalprop gain: error: unknown activation")
    code = ("import sys, signalprop.theory as t\n"
            "def boom(*a, **k): raise RuntimeError('boom')\n"
            "t.second_moment = boom\n"
            "from signalprop.cli import main\n"
            "sys.exit(main(['gain', 'tanh']))")
    done = _python("-c", code)
    assert done.returncode == 3
    assert one_line(done.stderr).startswith("signalprop gain: internal error: RuntimeError: boom")


def test_help_and_version_import_no_torch() -> None:
    for flag in ("--help", "--version"):
        done = _python("-X", "importtime", "-m", "signalprop", flag)
        assert done.returncode == 0, done.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
        heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "numpy", "matplotlib", "rich"))
        assert heavy == [], (flag, heavy[:5])
    code = ("import sys, signalprop, signalprop.cli\n"
            "from signalprop.cli import _main\n"
            "_main.build_parser()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")
    done = _python("-c", code)
    assert done.stdout.strip() == "[]", done.stdout[-300:]
