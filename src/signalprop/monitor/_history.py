"""A bounded history: the recent recorded steps in full, and a thinned view of the whole run.

A run of 500 K steps recording every step would hold 500 K records. :class:`History` keeps at most
``keep`` recent ones, and of the older ones a *long view*: every ``2^k``-th recorded step (uniform over the
run, ``k`` raised by one whenever the view holds more than ``keep``), plus the recorded steps numbered
1, 2, 4, 8, ... (log-spaced, the early steps where a run changes fastest). So a plot of the whole run stays
possible at any length, in memory bounded by ``2 * keep + log2(recorded steps)`` entries; the first
recorded step is always kept (its number, 0, is a multiple of every stride) and the last is the newest
recent one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


def _power_of_two(i: int) -> bool:
    return i > 0 and i & (i - 1) == 0


class History(Generic[T]):
    """Entries numbered 0, 1, 2, ... in the order added; at most ``keep`` recent ones plus the long view
    (``keep=None``: every entry).

    >>> h = History(keep=2)
    >>> for i in range(10):
    ...     h.add(i)
    >>> list(h)
    [0, 1, 2, 4, 8, 9]
    """

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        """Recent entries kept in full, and uniform entries of the long view at most; None: every entry."""
        self.added = 0
        """Entries added since the start (also those thinned out)."""
        self._recent: deque[tuple[int, T]] = deque()
        self._long: list[tuple[int, T]] = []
        self._stride = 1
        self._uniform = 0
        """Entries of the long view whose number is a multiple of the stride."""

    def add(self, entry: T) -> None:
        """Add the newest entry; the oldest recent one moves to the long view or is dropped."""
        self._recent.append((self.added, entry))
        self.added += 1
        if self.keep is None or len(self._recent) <= self.keep:
            return
        i, old = self._recent.popleft()
        if i % self._stride and not _power_of_two(i):
            return
        self._long.append((i, old))
        self._uniform += i % self._stride == 0
        while self._uniform > self.keep:
            self._stride *= 2
            self._long = [(j, e) for j, e in self._long if j % self._stride == 0 or _power_of_two(j)]
            self._uniform = sum(j % self._stride == 0 for j, _ in self._long)

    def numbered(self) -> Iterator[tuple[int, T]]:
        """(number, entry) of every entry held, oldest first."""
        yield from self._long
        yield from self._recent

    def __iter__(self) -> Iterator[T]:
        for _, entry in self.numbered():
            yield entry

    def __len__(self) -> int:
        return len(self._long) + len(self._recent)
