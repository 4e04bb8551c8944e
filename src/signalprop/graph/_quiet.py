"""Keep torch's own output off the terminal while a capture back-end runs.

A failed ``torch.export`` prints the partial FX graph (about 90 lines for a small net) straight to
``sys.stderr`` (``torch/export/_trace.py``: ``print(e.partial_fx_graph, file=sys.stderr)``) and logs
warnings through torch's loggers (``symbolic_shapes``: "Unable to find user code ..."). The capture falls
back to the next method and says why in one line; this text would bury that line.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any, TextIO

log = logging.getLogger("signalprop.graph")



class _Quiet:
    """Which threads are capturing (thread id -> [nesting depth, text torch printed]) and what was swapped
    in while any is: a stand-in for ``sys.stderr`` and a filter on the handlers torch's records reach."""

    lock = threading.Lock()
    threads: dict[int, list[Any]] = {}
    stderr: _StderrTap | None = None
    handlers: list[logging.Handler] = []


class _StderrTap:
    """``sys.stderr`` while a capture runs: text a capturing thread writes is kept, other threads' passes on."""

    def __init__(self, target: TextIO) -> None:
        self.target = target

    def write(self, text: str) -> int:
        entry = _Quiet.threads.get(threading.get_ident())
        if entry is None:
            return self.target.write(text)
        entry[1].append(text)
        return len(text)

    def flush(self) -> None:
        self.target.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


class _FoldTorchRecords(logging.Filter):
    """Drops torch's log records made on a capturing thread, after re-logging each once at DEBUG level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread not in _Quiet.threads or not _is_torch_logger(record.name):
            return True
        if not getattr(record, "_signalprop_folded", False):
            record._signalprop_folded = True
            log.debug("while capturing, %s logged %s: %s", record.name, record.levelname, record.getMessage())
        return False


_FOLD = _FoldTorchRecords()


def _is_torch_logger(name: str) -> bool:
    """A logger of torch's messages; not its artifact loggers (``torch.__trace``: TORCH_TRACE's files)."""
    return name.split(".")[0] == "torch" and ".__" not in name


def _torch_handlers() -> list[logging.Handler]:
    """The handlers a torch record can reach: torch's loggers', the root logger's and logging's last resort."""
    found: list[logging.Handler] = []
    loggers = [logging.getLogger(), *(lg for name, lg in list(logging.Logger.manager.loggerDict.items())
                                      if isinstance(lg, logging.Logger) and _is_torch_logger(name))]
    for lg in loggers:
        found += [h for h in lg.handlers if h not in found]
    if logging.lastResort is not None and logging.lastResort not in found:
        found.append(logging.lastResort)
    return found


@contextlib.contextmanager
def quiet_torch(what: str) -> Iterator[None]:
    """Keep what torch prints to stderr or logs on this thread during ``what`` off the terminal.

    The text goes to the ``signalprop.graph`` logger at DEBUG level instead
    (``logging.getLogger("signalprop.graph").setLevel(logging.DEBUG)`` shows it). Only this thread's output
    is held back; ``sys.stderr`` and torch's handlers are restored when the last capturing thread is done,
    so the user's logging configuration is unchanged afterwards.
    """
    tid = threading.get_ident()
    with _Quiet.lock:
        if tid in _Quiet.threads:
            _Quiet.threads[tid][0] += 1
        else:
            if not _Quiet.threads:
                _Quiet.stderr = _StderrTap(sys.stderr)
                sys.stderr = _Quiet.stderr  # type: ignore[assignment]
                _Quiet.handlers = _torch_handlers()
                for h in _Quiet.handlers:
                    h.addFilter(_FOLD)
            _Quiet.threads[tid] = [1, []]
    try:
        yield
    finally:
        with _Quiet.lock:
            entry = _Quiet.threads[tid]
            entry[0] -= 1
            text = ""
            if entry[0] == 0:
                del _Quiet.threads[tid]
                text = "".join(entry[1]).strip()
                if not _Quiet.threads:
                    for h in _Quiet.handlers:
                        h.removeFilter(_FOLD)
                    _Quiet.handlers = []
                    if sys.stderr is _Quiet.stderr and _Quiet.stderr is not None:
                        sys.stderr = _Quiet.stderr.target
                    _Quiet.stderr = None
        if text:
            log.debug("while %s, torch printed:\n%s", what, text)
