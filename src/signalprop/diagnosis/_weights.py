"""Weight gain: a weight layer whose init multiplies the rms it receives far beyond 1, which normalization or
a small scale after it hides from every output std.

A weight layer's output sums ``fan_in`` products, so with zero-mean weights of mean square ``E[w^2]`` it
multiplies the rms of what it receives by ``gain = sqrt(fan_in E[w^2])`` (He et al. 2015, Eq. 7). Sound
inits give 0.58 (PyTorch's default ``kaiming_uniform_(a=sqrt(5))``) to 1.41 (He for ReLU); N(0, 1) weights
give ``sqrt(fan_in)``. Where a BatchNorm or LayerNorm follows (a ResNet's convs), or a layer scale of 1e-6
(ConvNeXt), the output stds the drift rules read stay in range, yet the layer's pre-activations are ``gain``
times too large, and the backward of a normalization after it divides the gradient by the same factor: the
weights' update relative to their size shrinks by ``gain^2`` under SGD (the effective learning rate of a
scale-invariant layer is ``lr / |w|^2``, van Laarhoven 2017), and a layer-scaled branch whose scale grows
during training releases the full ``gain``.
"""

from __future__ import annotations

import math
from typing import Any

from ..trace import Trace
from ._drift import explosion_found
from ._findings import Finding
from ._rulekit import RuleContext, following_activation, g, label, norm_after, planned_fix

__all__ = ["rule_weight_gain"]


def _sound_scale(ctx: RuleContext, name: str, fan_in: Any) -> float:
    """How many times He's gain (sqrt 2) the plan's own gain for this layer is, at least 1: a sigmoid chain's
    critical init has a gain near 4 (sigmoid'(0) = 1/4), so its limit rises with it."""
    step = ctx.plan.get(name) if ctx.plan is not None else None
    std = getattr(step, "std", None)
    if not isinstance(std, float) or not isinstance(fan_in, int | float) or not fan_in > 0:
        return 1.0
    return max(1.0, std * math.sqrt(fan_in) / math.sqrt(2.0))


def rule_weight_gain(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """exploding (weight gain): weight layers whose ``meta["weight_gain"]`` (``sqrt(fan_in E[w^2])``, recorded
    by diagnose from the model) exceeds ``weight_gain_warning`` (4: a variance 8x He's; times the plan's gain
    over He's where the plan's is larger, as for sigmoid) in two or more and at
    least half of the weight layers, while no forward drift shows it (else the exploding finding already
    names it); one warning for the worst, naming how many there are. A single layer that steps the signal up
    to the scale the others keep (an input layer under a fixed-point init, LSUV scaling a head that
    receives a small signal) is not the init's scale being wrong."""
    limit = ctx.thresholds["weight_gain_warning"]
    hits = []
    judged = 0
    for i, layer in enumerate(trace):
        gain = layer.meta.get("weight_gain")
        if isinstance(gain, float) and math.isfinite(gain) and "#" not in layer.name:
            judged += 1
            if gain > limit * _sound_scale(ctx, layer.name, layer.meta.get("fan_in")):
                hits.append((gain, i))
    if len(hits) < 2 or 2 * len(hits) < judged:
        return []  # one layer stepping the signal up to a scale the others keep is a choice, not the init's scale
    if explosion_found(trace, ctx):
        return []  # the drift is visible: the forward drift finding names it and its fix
    gain, i = max(hits)
    layer = trace[i]
    fan = layer.meta.get("fan_in")
    n = norm_after(trace, i)
    hidden = (
        f"The {trace[n].kind} after it divides that out, so no output std shows it; its backward divides the "
        f"gradient by the same factor: these weights' updates relative to their size are {g(gain * gain)}x "
        "smaller than at a unit gain under SGD (lr / |w|^2 for a layer before a normalization)."
        if n is not None
        else "What follows it (a normalization further on, a small layer scale, a residual sum) keeps the "
        "output stds in range, but its own outputs are that much too large, and so is the gradient it passes "
        "back once that scale grows in training."
    )
    fan_text = f" (fan_in {int(fan) if float(fan).is_integer() else g(float(fan))})" if isinstance(fan, int | float) else ""
    msg = (
        f"{label(layer)}: its weights multiply the rms they receive by {g(gain)}{fan_text}: sqrt(fan_in E[w^2]), "
        f"against 0.58 to 1.41 for a sound init; N(0, 1) weights give sqrt(fan_in). {hidden}"
    )
    msg += f" {len(hits)} of the {judged} weight layers have a gain above {g(limit)}: the init's scale is wrong."
    text, fix_data = planned_fix(ctx, layer, following_activation(trace, i))
    fix = f"{text}; sp.fix.lsuv_(model, inputs) also brings each layer's output to unit scale"
    data: dict[str, Any] = {"weight_gain": gain, "fan_in": fan, "basis": "weight_gain", "normalized": n is not None,
                            "layers": {trace[k].name: x for x, k in hits}, **fix_data}
    return [Finding("exploding", "warning", layer.name, msg, fix, data)]
