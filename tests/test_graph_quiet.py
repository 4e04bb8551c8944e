"""A capture that falls back says so in one line: what torch.export prints while failing (its partial FX
graph, its loggers' warnings) goes to the ``signalprop.graph`` logger at DEBUG level, only for the
capturing thread, and the user's stderr and logging configuration are as they were afterwards."""

from __future__ import annotations

import logging
import sys
import threading

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.graph import CaptureWarning
from signalprop.graph._quiet import quiet_torch


class Branchy(nn.Module):
    """A data-dependent branch, as users write them: torch.export fails, fx fails, hooks capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            return self.b(h)
        return h


def _filters() -> dict[int, list[object]]:
    """Every handler's filters (torch creates loggers while exporting: compare the handlers seen before)."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return {id(h): list(h.filters) for lg in loggers for h in lg.handlers}


def test_fallback_prints_nothing_but_the_warning(capfd: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = Branchy()
    stderr, filters = sys.stderr, _filters()
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="signalprop.graph"), \
            pytest.warns(CaptureWarning, match="with hooks because export failed") as warned:
        graph = sp.graph.capture(model, input_shape=(8,))
    out = capfd.readouterr()
    assert graph.method == "hooks"
    assert len(warned) == 1 and "\n" not in str(warned[0].message)
    assert out.err == "" and out.out == ""  # without the fix: the FX graph twice and a torch warning, 33 lines
    # the text is kept for whoever asks at DEBUG level
    debug = "\n".join(r.getMessage() for r in caplog.records if r.name == "signalprop.graph")
    assert "def forward" in debug and "torch.ops.aten.relu.default" in debug
    after = _filters()
    assert sys.stderr is stderr and all(after[h] == f for h, f in filters.items() if h in after)
    assert not any(type(f).__name__ == "_FoldTorchRecords" for fs in after.values() for f in fs)


def test_other_threads_still_print_while_one_captures(capsys: pytest.CaptureFixture[str]) -> None:
    inside, written = threading.Event(), threading.Event()
    torch_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")

    def capturing() -> None:
        with quiet_torch("a test"):
            print("held back", file=sys.stderr)
            inside.set()
            written.wait(10)

    t = threading.Thread(target=capturing)
    t.start()
    assert inside.wait(10)
    print("from the other thread", file=sys.stderr)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    torch_log.addHandler(keep)
    try:
        torch_log.warning("a torch warning on the other thread")
    finally:
        torch_log.removeHandler(keep)
    written.set()
    t.join(10)
    err = capsys.readouterr().err
    assert "from the other thread" in err and "held back" not in err
    assert [r.getMessage() for r in records] == ["a torch warning on the other thread"]


def test_nested_and_failing_blocks_restore_stderr() -> None:
    stderr = sys.stderr
    with pytest.raises(RuntimeError, match="inner"), quiet_torch("outer"):
        with quiet_torch("inner"):
            assert sys.stderr is not stderr
            raise RuntimeError("inner")
    assert sys.stderr is stderr
