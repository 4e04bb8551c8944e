"""`signalprop reproduce`: files, summary, exit codes."""

from __future__ import annotations

import pytest

from signalprop.cli import main


@pytest.mark.slow
def test_reproduce_glorot_quick(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    code = main(["reproduce", "glorot2010", "--quick", "--out", str(tmp_path), "--seed", "1"])
    out = capsys.readouterr()
    assert code == 0, out.out
    assert (tmp_path / "glorot2010.png").is_file() and (tmp_path / "glorot2010.json").is_file()
    assert "glorot2010" in out.out and "[ok]" in out.out
    assert "[glorot2010" in out.err  # progress lines go to stderr


def test_reproduce_usage_errors(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    assert main(["reproduce", "glorot2010", "--quick", "--seed", "-1", "--out", str(tmp_path)]) == 2
    assert "--seed" in capsys.readouterr().err
    f = tmp_path / "f"
    f.write_text("")
    assert main(["reproduce", "glorot2010", "--quick", "--quiet", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["reproduce", "alexnet2012"]) == 2  # argparse's usage error, returned as the exit status
    assert "invalid choice: 'alexnet2012'" in capsys.readouterr().err
