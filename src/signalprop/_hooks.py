"""Hooks signalprop registers on a user's model, and the mark on every forward that signalprop runs itself.

A long-lived hook (the Monitor's) must record the user's own forward and backward only: not the forwards
that measure, graph capture, probe or LSUV run, nor the fake and meta tensors of torch.export. Those
forwards run inside :func:`internal_run`, and :func:`is_internal` says so from any hook on the same thread.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["HookSet", "internal_run", "is_internal", "is_real"]

_INTERNAL: contextvars.ContextVar[bool] = contextvars.ContextVar("signalprop_internal_run", default=False)


@contextlib.contextmanager
def internal_run() -> Iterator[None]:
    """Mark the forwards and backwards run inside as signalprop's own (per thread and per async task)."""
    token = _INTERNAL.set(True)
    try:
        yield
    finally:
        _INTERNAL.reset(token)


def is_internal() -> bool:
    """True inside :func:`internal_run` on this thread."""
    return _INTERNAL.get()


def is_real(t: Any) -> bool:
    """True for a plain tensor with storage: not a FakeTensor or other subclass (torch.export, fx), not meta."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta


class HookSet:
    """The handles of hooks registered together, removed together (also when the code between raises).

    >>> from torch import nn
    >>> m = nn.Linear(2, 2)
    >>> with HookSet() as hooks:
    ...     _ = hooks.add(m.register_forward_hook(lambda mod, i, o: None))
    ...     len(m._forward_hooks)
    1
    >>> len(m._forward_hooks)
    0
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def add(self, handle: Any) -> Any:
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
