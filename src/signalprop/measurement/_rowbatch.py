"""measure's batch of rows: many tensors' reductions in a few device operations and one host copy.

The rows are those of :func:`signalprop.stats.tensor_sums` (layout in :mod:`signalprop.stats`); the fast
path's per-tensor reductions are :func:`signalprop.stats.compact_row`'s, expanded on the host by
:func:`signalprop.stats.expand_compact`.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..stats import (
    MAX_POSITIONS,
    _check_tensor,
    _fast_parts,
    default_channel_dim,
    expand_compact,
    tensor_sums,
)


class RowBatch:
    """Many tensors' rows, built with as few device operations as possible and moved to the host at once.

    ``add(t)`` runs the reductions of :func:`tensor_sums` (five kernels on the fast path, against some
    twenty small operations for a standalone row) and returns a key; :meth:`device_vector` packs
    everything into one float64 device tensor (SUM-reducible except at :meth:`max_positions`), and
    :meth:`rows` unpacks the host copy of that vector into rows in :func:`tensor_sums`' layout. Per-tensor
    Python and kernel-launch overhead is what a many-layer measurement pays for besides the reads
    themselves, so this is what :func:`signalprop.measure` and a monitor should use.
    """

    def __init__(self) -> None:
        self._entries: list[tuple[str, int]] = []
        self._sumsq: list[torch.Tensor] = []
        self._lo: list[torch.Tensor] = []
        self._hi: list[torch.Tensor] = []
        self._zeros: list[torch.Tensor] = []
        self._chan: list[torch.Tensor] = []
        self._counts: list[tuple[int, int, int]] = []  # numel, zero_n, channels
        self._rows: list[torch.Tensor] = []
        self._layout: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self,
        t: torch.Tensor,
        *,
        channel_dim: int | Literal["auto"] | None = "auto",
        careful: bool = False,
    ) -> int:
        """Queue the reductions of ``t`` (arguments as :func:`tensor_sums`); returns the entry's key."""
        t = _check_tensor(t).detach()
        cd = default_channel_dim(t.dim()) if channel_dim == "auto" else channel_dim
        if careful or t.numel() == 0 or t.dim() == 0 or (cd is not None and not -t.dim() <= cd < t.dim()):
            self._entries.append(("row", len(self._rows)))
            self._rows.append(tensor_sums(t, channel_dim=cd, careful=careful))
            return len(self._entries) - 1
        if cd is not None:
            cd %= t.dim()
        sumsq, lo, hi, zeros, chan, zero_n = _fast_parts(t, cd)
        self._entries.append(("fast", len(self._sumsq)))
        self._sumsq.append(sumsq)
        self._lo.append(lo)
        self._hi.append(hi)
        self._zeros.append(zeros)
        self._chan.append(chan)
        self._counts.append((t.numel(), zero_n, chan.numel()))
        return len(self._entries) - 1

    def device_vector(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Everything queued, as one float64 tensor on ``device`` (default: that of the first entry).

        Layout: [numel..., zero_n..., sumsq..., zeros..., channel sums..., full rows..., max..., -min...]."""
        parts = [*self._sumsq, *self._rows, *self._chan]
        if not parts:
            return torch.zeros(0, dtype=torch.float64)
        dev = torch.device(device) if device is not None else parts[0].device
        f = len(self._sumsq)
        pieces: list[torch.Tensor] = []
        if f:
            counts = [float(c[0]) for c in self._counts] + [float(c[1]) for c in self._counts]
            pieces.append(torch.tensor(counts, dtype=torch.float64, device=dev))
            pieces.append(_stack64(self._sumsq, dev))
            pieces.append(_stack64(self._zeros, dev))
            pieces.append(_cat64(self._chan, dev))
        pieces.extend(r.to(dev) for r in self._rows)
        if f:
            pieces.append(_stack64(self._hi, dev))
            pieces.append(-_stack64(self._lo, dev))
        vec = torch.cat(pieces)
        self._layout = (f, sum(c[2] for c in self._counts), sum(r.numel() for r in self._rows), vec.numel())
        return vec

    def max_positions(self) -> list[int]:
        """Positions of :meth:`device_vector` to combine across ranks with MAX (all others: SUM)."""
        f, nchan, _, total = self._layout
        pos = list(range(total - 2 * f, total))
        start = 4 * f + nchan
        for r in self._rows:
            pos.extend(start + p for p in MAX_POSITIONS)
            start += r.numel()
        return sorted(pos)

    def rows(self, vec: torch.Tensor) -> list[list[float]]:
        """Unpack a host copy of :meth:`device_vector` (possibly reduced over ranks) into one row per entry."""
        f, nchan, nrows, total = self._layout
        v = vec.tolist()
        numel, zero_n = v[0:f], v[f : 2 * f]
        sumsq, zeros = v[2 * f : 3 * f], v[3 * f : 4 * f]
        chan_all = v[4 * f : 4 * f + nchan]
        rows_all = v[4 * f + nchan : 4 * f + nchan + nrows]
        hi, neglo = v[total - 2 * f : total - f], v[total - f :]
        fast: list[list[float]] = []
        c0 = 0
        for i, (_, _, c) in enumerate(self._counts):
            compact = [sumsq[i], zeros[i], hi[i], neglo[i], *chan_all[c0 : c0 + c]]
            c0 += c
            fast.append(expand_compact(compact, numel[i], numel[i], zero_n[i]))
        full: list[list[float]] = []
        r0 = 0
        for r in self._rows:
            full.append(rows_all[r0 : r0 + r.numel()])
            r0 += r.numel()
        return [fast[i] if kind == "fast" else full[i] for kind, i in self._entries]


def _stack64(ts: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    if all(t.dtype == ts[0].dtype and t.device == dev for t in ts):
        return torch.stack(ts).to(torch.float64)
    return torch.stack([t.to(dev, torch.float64) for t in ts])


def _cat64(ts: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    if all(t.dtype == ts[0].dtype and t.device == dev for t in ts):
        return torch.cat(ts).to(torch.float64)
    return torch.cat([t.to(dev, torch.float64) for t in ts])
