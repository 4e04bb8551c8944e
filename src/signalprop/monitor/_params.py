"""A Monitor's per-parameter numbers, in a few device operations: norms, gradient norms, update norms.

Every recorded step the :class:`~signalprop.monitor.Monitor` reports, per trainable parameter ``w``, the
norms ``||w_t||``, ``||g_t||``, ``||w_t - w_{t-1}||`` and ``||w_{t-1}||`` (the update ratio is the third
over the fourth), all accumulated in float64: float32 squares overflow once a norm passes 1.8e19, which an
exploding run reaches while its values are still finite, and the Monitor must not call those inf.

On the CPU ``torch._foreach_norm(..., dtype=torch.float64)`` is one kernel per tensor, about 12 us each
inside a training step here: 126 norms of a 20-layer CNN's 42 parameters cost 1.6-2.4 ms a step, the
largest fixed cost of the Monitor. So every *small* parameter (at most :data:`SMALL` elements, where
dispatch costs more than the read) gets a row in a zero-padded float64 buffer shared with parameters of
similar size (:func:`padded_length`: at most 25% padding; those of at most :data:`TINY` elements share
one). Its value, its gradient, the snapshot taken at
the start of the step and the update (value minus snapshot, subtracted in float64, where the difference of
two float32 numbers is exact) are four rows of that buffer, filled by two multi-tensor copies and one
subtraction, and one ``vector_norm`` over the last dimension gives all four norms of every parameter in
the group: exact float64 norms (zeros add nothing) in four operations per group instead of four per
parameter. When the step before was recorded too (``every=1``), the snapshot is the value row that step's
:meth:`ParamNorms.vector` has just filled: the two rows swap roles instead of copying the parameters
again (a third multi-tensor copy, 0.4 ms a group inside a 20-layer CNN's step here). Parameters above :data:`SMALL`, past :data:`BUDGET` bytes of buffers, or not plain dense
tensors (DTensor shards, sparse gradients) keep one norm per tensor and a snapshot in their own dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SMALL = 1 << 16
"""Parameters with at most this many elements share padded buffers (larger ones are read-bound)."""

TINY = 1024
"""Parameters of at most this many elements (biases, norm scales, small layers) share one group per device,
padded to the longest of them: a few KB each, and four operations fewer for every length saved."""

BUDGET = 64 << 20
"""Bytes of padded float64 buffers at most; parameters beyond it take the per-tensor path."""

_ROWS = 4  # value, gradient, update (value - snapshot), snapshot: the vector's order
_SWAPPED = [3, 1, 2, 0]  # the rows' order while value and snapshot have swapped places (see ParamNorms.begin)


def padded_length(n: int) -> int:
    """The row length of a parameter of ``n`` elements: ``n`` rounded up to a multiple of a quarter of the
    largest power of two not above it (9216 -> 10240, 4608 -> 5120, 32 -> 32), so at most 25% padding and
    few distinct lengths."""
    if n <= 4:
        return max(n, 1)
    quarter = 1 << (n.bit_length() - 3)
    return -(-n // quarter) * quarter


@dataclass
class _Group:
    """Parameters of one device and padded length: rows ``buf[r, i]`` (r: value, grad, update, snapshot)."""

    members: list[int]
    """Positions in the parameter list."""
    buf: torch.Tensor
    views: list[list[torch.Tensor]] = field(default_factory=list)
    """``views[r][i]``: row r of member i, its first numel elements shaped like the parameter."""


def _plain(p: torch.Tensor) -> bool:
    """A parameter whose value can be copied into a padded row: a dense floating tensor, no subclass."""
    return type(p.data) is torch.Tensor and p.layout is torch.strided and p.is_floating_point() and not p.is_meta


def _dense(g: torch.Tensor) -> bool:
    """A gradient that can be copied into a padded row (not sparse, no subclass)."""
    return type(g) is torch.Tensor and g.layout is torch.strided


class ParamNorms:
    """The four norms of each of ``params``: :meth:`begin` at the start of every step, :meth:`vector` at
    the end of a recorded one. ``update=False`` skips the snapshot (update and previous norms are NaN)."""

    def __init__(
        self, params: list[torch.Tensor], update: bool, small: int | None = None, budget: int | None = None
    ) -> None:
        small = SMALL if small is None else small
        budget = BUDGET if budget is None else budget
        self.params = params
        self.update = update
        self.groups: list[_Group] = []
        self.large: list[int] = []
        self._snapshot: list[torch.Tensor] | None = None
        """Snapshot of the large parameters, in their own dtype."""
        self._snapped = False
        self._swapped = False
        """Value and snapshot rows have swapped places: the value is in row 3, the snapshot in row 0."""
        self._fresh = False
        """:meth:`vector` ran and no step began since: the value rows hold the parameters as they are, and
        ``_last`` the large parameters' norms."""
        self._last: torch.Tensor | None = None
        """Norms of the large parameters from the last vector (the next snapshot's, while ``_fresh``)."""
        self._prev: torch.Tensor | None = None
        by_key: dict[tuple[torch.device, int], list[int]] = {}
        used = 0
        rows = _ROWS if update else 2
        for i, p in enumerate(params):
            n = p.numel()
            length = padded_length(n) if n > TINY else TINY  # (the tiny ones: one group per device)
            cost = rows * length * 8
            if not _plain(p) or n > small or n == 0 or used + cost > budget:
                self.large.append(i)
                continue
            used += cost
            by_key.setdefault((p.device, length), []).append(i)
        for (dev, length), members in by_key.items():
            if length == TINY:
                length = padded_length(max(params[i].numel() for i in members))
            buf = torch.zeros((rows, len(members), length), dtype=torch.float64, device=dev)
            views = [
                [buf[r, j, : params[i].numel()].view(params[i].shape) for j, i in enumerate(members)]
                for r in range(rows)
            ]
            self.groups.append(_Group(members, buf, views))
        self.position = [0] * len(params)
        """The column of parameter i in :meth:`vector`'s rows (groups first, then the large ones): the host
        reads them in place, so no device operation reorders them."""
        for pos, i in enumerate([i for g in self.groups for i in g.members] + self.large):
            self.position[i] = pos

    @property
    def nbytes(self) -> int:
        """Bytes of the padded buffers."""
        return sum(g.buf.numel() * 8 for g in self.groups)

    def begin(self, snapshot: bool) -> None:
        """Start a step; ``snapshot`` (a recorded step, with updates) remembers the parameters as they are now.
        The large parameters' previous norms are those :meth:`vector` just took when nothing ran since."""
        fresh, self._fresh = self._fresh, False
        self._snapped = snapshot and self.update
        if not self._snapped:
            return
        with torch.no_grad():
            if fresh:  # the value rows hold the parameters as they are now: they become the snapshot rows
                self._swapped = not self._swapped
            else:
                snap = 0 if self._swapped else 3
                for g in self.groups:
                    torch._foreach_copy_(g.views[snap], [self.params[i] for i in g.members])
            if self.large:
                ps = [self.params[i] for i in self.large]
                if self._snapshot is None:
                    self._snapshot = [p.detach().clone() for p in ps]
                else:
                    torch._foreach_copy_(self._snapshot, ps)
                self._prev = self._last if fresh else None

    def vector(self, dev: torch.device) -> torch.Tensor:
        """``[norms, grad norms (-1: no .grad), update norms, previous norms]`` of every parameter, float64
        on ``dev``, parameter i in column ``position[i]`` of each block (update and previous NaN without a
        snapshot)."""
        p_count = len(self.params)
        if not p_count:
            return torch.zeros(0, dtype=torch.float64, device=dev)
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            missing = [i for i, g in enumerate(grads) if g is None]
            odd: list[int] = []  # a sparse (or otherwise not dense) gradient of a small parameter: its own norm
            cols: list[torch.Tensor] = []
            value, snap = (3, 0) if self._swapped else (0, 3)
            for g in self.groups:
                torch._foreach_copy_(g.views[value], [self.params[i] for i in g.members])
                rows: list[torch.Tensor] = []
                srcs: list[torch.Tensor] = []
                for v, i in zip(g.views[1], g.members):
                    gr = grads[i]
                    if gr is None:
                        continue
                    if _dense(gr):
                        rows.append(v)
                        srcs.append(gr)
                    else:
                        odd.append(i)
                if rows:
                    torch._foreach_copy_(rows, srcs)
                if self._snapped:
                    torch.sub(g.buf[value], g.buf[snap], out=g.buf[2])
                norms = torch.linalg.vector_norm(g.buf, dim=2)
                cols.append((norms[_SWAPPED] if self._swapped else norms).to(dev))
            self._fresh = self.update
            if self.large:
                cols.append(self._large_norms(grads, dev))
            out = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
            if out.shape[0] == 2:
                out = torch.cat([out, out.new_full((2, p_count), math.nan)])
            elif not self._snapped:
                out[2:] = math.nan
            if odd:
                cols_odd = torch.tensor([self.position[i] for i in odd], device=out.device)
                out[1, cols_odd] = _norms([grads[i] for i in odd], out.device)  # type: ignore[misc]
            if missing:
                out[1, torch.tensor([self.position[i] for i in missing], device=out.device)] = -1.0
            return out.reshape(-1)

    def _large_norms(self, grads: list[torch.Tensor | None], dev: torch.device) -> torch.Tensor:
        """(4, len(large)) norms of the per-tensor parameters; ``(2, ...)`` without updates."""
        ps = [self.params[i] for i in self.large]
        norms = _norms(ps, dev)
        self._last = norms
        gs = [grads[i] for i in self.large]
        present = [j for j, g in enumerate(gs) if g is not None]
        if len(present) == len(gs):
            gn = _norms(gs, dev)  # type: ignore[arg-type]
        else:  # (the -1 of a missing gradient is written by vector())
            gn = torch.zeros(len(gs), dtype=torch.float64, device=dev)
            if present:
                gn[torch.tensor(present, device=dev)] = _norms([gs[j] for j in present], dev)  # type: ignore[misc]
        if not self.update:
            return torch.stack([norms, gn])
        if not self._snapped or self._snapshot is None:
            nan = torch.full_like(norms, math.nan)
            return torch.stack([norms, gn, nan, nan])
        upd = _norms(list(torch._foreach_sub(ps, self._snapshot)), dev)
        prev = self._prev if self._prev is not None else _norms(self._snapshot, dev)
        return torch.stack([norms, gn, upd, prev])


def _norms(ts: list[torch.Tensor], dev: torch.device) -> torch.Tensor:
    """L2 norm of each tensor, accumulated in float64, on ``dev``; one kernel per tensor on the CPU. A sparse
    tensor's norm is that of its coalesced values (repeated indices add up, as in the dense tensor)."""
    ts = [t if t.layout is torch.strided else _values(t) for t in ts]
    out = torch._foreach_norm(ts, 2, dtype=torch.float64)
    if all(n.device == dev for n in out):
        return torch.stack(out)
    return torch.stack([n.to(dev, torch.float64) for n in out])


def _values(t: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse tensor, which hold its whole norm (COO: after summing repeats)."""
    if t.layout is torch.sparse_coo:
        return t.coalesce().values()
    return t.to_dense()
