"""The shared helpers of the reproductions: data, denormal flushing, progress, output files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from signalprop import SignalpropError
from signalprop.experiments import _common as C


def test_digits_are_standardized_and_fresh() -> None:
    x, y = C.digits(images=True)
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-4
    assert sorted(set(y.tolist())) == list(range(10))
    x.zero_()  # callers may change what they get ...
    x2, _ = C.digits(images=False)
    assert x2.shape == (1797, 64) and float(x2.abs().sum()) > 0  # ... without changing the next caller's data


@pytest.mark.parametrize("before", [False, True])
def test_flushed_denormals_restores_the_previous_setting(before: bool) -> None:
    torch.set_flush_denormal(before)
    try:
        assert C.flush_denormal_enabled() is before
        with C.flushed_denormals():
            assert C.flush_denormal_enabled()
            tiny = torch.tensor([1e-39], dtype=torch.float32)
            assert float(tiny * 1.0) == 0.0
        assert C.flush_denormal_enabled() is before
        with pytest.raises(RuntimeError), C.flushed_denormals():
            raise RuntimeError("boom")
        assert C.flush_denormal_enabled() is before
    finally:
        torch.set_flush_denormal(False)


def test_progress_sinks(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    C.Progress("x", lines.append)("hello")
    assert len(lines) == 1 and lines[0].startswith("[x ") and lines[0].endswith("hello")
    C.Progress("x", False)("silent")
    C.Progress("x", True)("loud")
    err = capsys.readouterr().err
    assert "loud" in err and "silent" not in err
    with pytest.raises(SignalpropError, match="progress must be"):
        C.Progress("x", 3)  # type: ignore[arg-type]


def test_jsonable_handles_nonfinite_and_tensors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data = {"a": math.nan, "b": math.inf, "c": -math.inf, "t": torch.tensor([1.0, 2.0]), 3: (1, True, None)}
    path = C.write_json(tmp_path / "x.json", data)
    back = json.loads(path.read_text())
    assert back == {"a": None, "b": "inf", "c": "-inf", "t": [1.0, 2.0], "3": [1, True, None]}


def test_out_dir_and_seed_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert C.out_dir(None) is None
    assert C.out_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SignalpropError, match="is a file"):
        C.out_dir(f)
    for bad in (-1, 1.5, True, "0"):
        with pytest.raises(SignalpropError, match="seed"):
            C.check_seed(bad)


def test_save_png_stays_under_the_limit(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    fig = C.new_figure(4, 3)
    ax = fig.subplots()
    rng = np.random.default_rng(0)
    for _ in range(20):
        ax.plot(rng.standard_normal(200))  # noisy lines compress badly
    first = C.save_png(fig, tmp_path / "big.png", dpi=100).stat().st_size
    monkeypatch.setattr(C, "PNG_LIMIT_BYTES", int(first * 0.6))
    path = C.save_png(fig, tmp_path / "small.png", dpi=100)
    assert path.stat().st_size <= first * 0.6
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
