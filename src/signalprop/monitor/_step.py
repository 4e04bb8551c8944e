"""What a Monitor's hooks collect during one recorded step: a :class:`Forward` per module call, a
:class:`Backward` per output gradient, each holding a :class:`Queued` tensor's statistics on the device.

Nothing here synchronizes with the device: a tensor's sample is copied into the step's
:class:`~signalprop.monitor._batch.PrefixBatch` (or, for exact statistics and histograms, reduced on its
own by :func:`~signalprop.monitor._sums.compact_sums`), and the whole tensor is summed once, the
non-finite check, where the sample is only part of it. :mod:`signalprop.monitor._pack` turns a closed step
into one device vector.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ._batch import PrefixBatch
from ._sums import compact_sums, full_sum, standardized_histogram


@dataclass(slots=True)
class Queued:
    """One tensor's statistics, queued on the device.

    Its compact row (``[SUMSQ, ZEROS, MAXV, NEGMIN, channel sums...]``, see
    :func:`~signalprop.monitor._sums.compact_sums`) is row ``ticket[1]`` of the step's block ``ticket[0]``
    of the sample store, or ``row``; ``counts`` (moment elements, zero-sample elements) are host numbers
    that complete a compact row (None: ``row`` is a full ``tensor_sums`` row of a 0-d or empty tensor).
    ``check`` is the sum over every one of the tensor's ``numel`` elements where the sample is only part
    of it (None: the sample is the whole tensor); ``hist`` the sample's standardized histogram."""

    numel: int
    ticket: tuple[int, int] | None = None
    row: torch.Tensor | None = None
    counts: tuple[int, int] | None = None
    check: torch.Tensor | None = None
    hist: torch.Tensor | None = None


@dataclass(slots=True)
class Forward:
    """One module call of a recorded step: where it sits, and its output's statistics (None until the
    call returns, and for a call that returned no floating tensor)."""

    name: str
    kind: str
    weight_layer: bool
    out: Queued | None = None
    shape: tuple[int, ...] = ()
    dtype: str = ""
    channel_dim: int | None = None


@dataclass(slots=True)
class Backward:
    """The gradient with respect to one call's output (the first to arrive in the step)."""

    call: Forward
    grad: Queued


@dataclass
class OpenStep:
    """The recorded step in progress: calls in the order they began, output gradients in the order the
    backward pass produced them."""

    forwards: list[Forward] = field(default_factory=list)
    backwards: list[Backward] = field(default_factory=list)
    calls: dict[int, int] = field(default_factory=dict)
    """id(module) -> calls of it so far (names the k-th call ``name#k``, as measure does)."""
    running: dict[int, list[Forward]] = field(default_factory=dict)
    """id(module) -> its calls that began and have not returned (a module may call itself)."""
    closed: bool = False
    device: torch.device | None = None
    """The device of the first output recorded (where the step's numbers are packed)."""

    def begin(self, module: object, name: str, kind: str, weight_layer: bool) -> None:
        k = self.calls.get(id(module), 0)
        self.calls[id(module)] = k + 1
        call = Forward(name if k == 0 else f"{name}#{k}", kind, weight_layer)
        self.forwards.append(call)
        self.running.setdefault(id(module), []).append(call)

    def end(self, module: object) -> Forward | None:
        """The call of ``module`` that returns now, or None when it began outside this step."""
        stack = self.running.get(id(module))
        return stack.pop() if stack else None


def queue(
    t: torch.Tensor, channel_dim: int | None, batch: PrefixBatch | None, sample: int | None, bins: int | None
) -> Queued:
    """Queue ``t``'s statistics: its sample copied into ``batch`` and, where the sample is not all of it, its
    full sum; or, without a batch (exact statistics, histograms of ``bins`` bins) or for a sample too large
    to batch, its own compact row (:func:`~signalprop.monitor._sums.compact_sums`)."""
    t = t.detach()
    if batch is not None:
        ticket = batch.add(t, channel_dim)
        if ticket is not None:
            g, i, n, zero_n, partial = ticket
            return Queued(t.numel(), ticket=(g, i), counts=(n, zero_n), check=full_sum(t) if partial else None)
    row, head, check, counts = compact_sums(t, channel_dim, sample)
    hist = standardized_histogram(head, bins) if bins is not None else None
    return Queued(t.numel(), row=row, counts=counts, check=check, hist=hist)
