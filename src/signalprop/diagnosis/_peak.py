"""A weight layer whose output is ``factor^4`` above an earlier one's, wherever the drift rules cannot see it.

The drift rules compare each weight layer with the first of its part (body or head), or with the first of
its role where blocks repeat (``blocks.3.attn.proj`` with ``blocks.0.attn.proj``). A block that blows the
signal up inside and is normalized again before the next one keeps every role at the same level, so no role
drifts: Mamba with N(0, 1) weights has each selective scan's output projection at std 6.6e7 and 2.4e8
against its input projection's 5.5 and 5.9, and the drift rules compare the two output projections (3.6x).
This rule reads the whole trace in order: a weight layer's output std against the smallest one before it.
Sound inits keep different roles within ``factor^2`` of each other (35 architectures of the trial harness:
at most 22x), so ``factor^4`` (1e4 at the default factor) is a scale no design explains.
"""

from __future__ import annotations

import math

from ..trace import Trace
from ._drift import explosion_found
from ._findings import Finding
from ._rulekit import RuleContext, following_activation, g, label, planned_fix, split_body_head

__all__ = ["rule_peak"]


def rule_peak(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """exploding (peak): the largest ratio of a weight layer's forward std to the smallest std of a weight
    layer before it (in call order; layers that feed a normalization left out, as for the drift rules),
    when it exceeds ``factor^4``, the layer's own std exceeds ``factor^2`` (the unit scale blown up: a
    signal rising back towards 1 after it was lost is recovery, which the vanishing finding names) and no
    drift finding names an explosion already. One error, at the layer with that ratio."""
    body, head = split_body_head(trace)
    idx = sorted(i for i in body + head if math.isfinite(trace[i].fwd.std) and trace[i].fwd.std > 0)
    best: tuple[float, int, int] | None = None
    low = None
    for i in idx:
        if low is not None and trace[i].fwd.std > ctx.factor**2:  # blown up, not recovering from a loss
            r = trace[i].fwd.std / trace[low].fwd.std
            if best is None or r >= best[0] * (1 - 1e-12):  # a tie (a module and its last layer): the later
                best = (r, i, low)
        if low is None or trace[i].fwd.std < trace[low].fwd.std:
            low = i
    if best is None or best[0] <= ctx.factor**4:
        return []
    if explosion_found(trace, ctx):
        return []  # the drift finding names it and its fix
    r, i, ref = best
    layer = trace[i]
    msg = (
        f"{label(layer)}: forward std {g(layer.fwd.std)}, {g(r)}x that of {trace[ref].name} "
        f"({g(trace[ref].fwd.std)}) before it. No layer drifts from the first of its role (repeated blocks "
        f"stay alike), but between these two the signal grows beyond {g(ctx.factor**4)}x, more than the roles "
        "of a sound init ever differ: the init's scale is wrong (a float16 activation overflows at 65504)."
    )
    text, fix_data = planned_fix(ctx, layer, following_activation(trace, i))
    fix = f"{text}; sp.fix.lsuv_(model, inputs) also brings each layer's output to unit scale"
    data = {"ratio": r, "std": layer.fwd.std, "reference": trace[ref].name, "reference_std": trace[ref].fwd.std,
            "basis": "peak", **fix_data}
    return [Finding("exploding", "error", layer.name, msg, fix, data)]
