"""Drift rules: exploding / vanishing signals and gradients (He et al. 2015), judged per role against the
reference layer and against the predicted finite-width band (Hanin & Nica 2019), and mean drift (Brock et
al. 2021)."""

from __future__ import annotations

import math

from ..trace import Stats, Trace
from ._findings import Finding
from ._rulekit import (
    FIX_TOOLS,
    RuleContext,
    following_activation,
    g,
    init_fix,
    label,
    positive,
    role,
    role_groups,
    split_body_head,
)


def _band_note(trace: Trace, ctx: RuleContext, ref: int, idx: int, attr: str) -> tuple[str, bool]:
    """Compare a drift with the predicted trace: (sentence, inside_band)."""
    pred = ctx.predicted
    if pred is None:
        return "", False
    names = pred.names
    a, b = trace[ref].name, trace[idx].name
    if a not in names or b not in names:
        return "", False
    pa, pb = getattr(pred[a], attr), getattr(pred[b], attr)
    if pa is None or pb is None or not (positive(pa.var) and positive(pb.var)):
        return "", False
    pred_ratio = math.sqrt(pb.var / pa.var)
    measured = getattr(trace[idx], attr)
    band = pb.var_band
    mf = f"mean-field std {g(math.sqrt(pb.var))}, {g(pred_ratio)}x the reference layer's"
    up = getattr(trace[idx], attr).std > getattr(trace[ref], attr).std
    half = math.sqrt(ctx.factor)  # the prediction drifts the same way by more than sqrt(factor): the scale
    if (up and pred_ratio > half) or (not up and pred_ratio < 1.0 / half):
        return f" The prediction from these weights agrees ({mf}): the init's scale is wrong.", False
    if band is None or measured is None or not math.isfinite(measured.var):
        return f" The prediction from these weights stays in range ({mf}).", False
    std_band = f"std {g(math.sqrt(band[0]))} .. {g(math.sqrt(band[1]))}"
    if band[0] <= measured.var <= band[1]:
        return (
            f" It lies inside the predicted 90% band for one network of this width ({std_band}; {mf}): the "
            "scale is right on average, and this network drew an unlucky product of random layers.",
            True,
        )
    return (
        f" The prediction from these weights stays in range ({mf}) and the measured value lies outside its 90% "
        f"band for one network ({std_band}): more than weight-draw luck, so look at the data (inputs unlike "
        "i.i.d. unit-variance values) or at dead units.",
        False,
    )


# ---- rules ----------------------------------------------------------------------------------------
def _drift(
    trace: Trace, ctx: RuleContext, idx: list[int], part: str, grad: bool, whole: bool = True
) -> list[Finding]:
    """Some layer's std more than factor x above/below the reference (first layer fwd, last layer bwd)."""
    if len(idx) < 2:
        return []
    attr = "bwd" if grad else "fwd"
    seq = idx[::-1] if grad else idx
    ref = seq[0]
    ref_stats: Stats | None = getattr(trace[ref], attr)
    if ref_stats is None or not positive(ref_stats.std):
        return []
    ratios: list[tuple[float, int, int]] = []  # (ratio, trace index, steps from the reference)
    for steps, i in enumerate(seq[1:], start=1):
        s = getattr(trace[i], attr)
        if s is None or not math.isfinite(s.std) or s.std < 0:
            continue
        ratios.append((s.std / ref_stats.std, i, steps))
    if not ratios:
        return []
    hi = max(ratios, key=lambda r: r[0])
    lo = min(ratios, key=lambda r: r[0])
    out = []
    for (ratio, i, steps), up in ((hi, True), (lo, False)):
        if (up and ratio <= ctx.factor) or (not up and ratio >= 1.0 / ctx.factor):
            continue
        out.append(_drift_finding(trace, ctx, ref, i, steps, ratio, up, part, grad, ratios, whole))
    return out


def _drift_finding(
    trace: Trace,
    ctx: RuleContext,
    ref: int,
    i: int,
    steps: int,
    ratio: float,
    up: bool,
    part: str,
    grad: bool,
    ratios: list[tuple[float, int, int]],
    whole: bool,
) -> Finding:
    attr = "bwd" if grad else "fwd"
    layer, ref_layer = trace[i], trace[ref]
    std, ref_std = getattr(layer, attr).std, getattr(ref_layer, attr).std
    kind = ("grad_" if grad else "") + ("exploding" if up else "vanishing")
    crossed = ratio > ctx.factor if up else ratio < 1 / ctx.factor
    first = next(j for r, j, _ in ratios if (r > ctx.factor if up else r < 1 / ctx.factor))
    per = ratio ** (1.0 / steps) if ratio > 0 else 0.0
    what = "gradient std" if grad else "forward std"
    where = "last" if grad else "first"
    scope = f"{part} weight layer" if part == "head" else "weight layer"
    if not whole:
        scope = f"{role(layer.name)} layer"
    msg = f"{label(layer)}: {what} {g(std)}, {g(ratio)}x the {where} {scope}'s ({ref_layer.name}, {g(ref_std)})"
    if ratio == 0:
        msg += "; the gradient is gone" if grad else "; the signal is gone"
    elif steps > 1:
        rate = per if up else 1 / per
        if grad:
            msg += f"; gradients {'grow' if up else 'shrink'} about {g(rate)}x per layer on the way back"
        else:
            msg += f"; the signal {'grows' if up else 'shrinks'} about {g(rate)}x per layer"
    if crossed and first != i:
        msg += f" (first beyond {g(ctx.factor)}x at {trace[first].name})"
    msg += "."
    note, inside = _band_note(trace, ctx, ref, i, attr)
    msg += note
    act = following_activation(trace, i)
    mode = "fan_out" if grad else "fan_in"
    if inside:
        fix = (
            "not another scale: the init is right on average. Fit the scale to this network and your data "
            "with sp.fix.lsuv_(model, inputs), or use wider layers (the spread shrinks as 1/width); "
            f"for reference, {init_fix(layer, act, mode)}"
        )
    else:
        fix = f"{init_fix(layer, act, mode)}; {FIX_TOOLS}"
    severity = "error" if (ratio > ctx.factor**2 or ratio < ctx.factor**-2) else "warning"
    data = {
        "ratio": ratio,
        "std": std,
        "reference": ref_layer.name,
        "reference_std": ref_std,
        "per_layer": per,
        "part": part,
        "inside_band": inside,
    }
    return Finding(kind, severity, layer.name, msg, fix, data)


def _drift_groups(trace: Trace, ctx: RuleContext, grad: bool) -> list[Finding]:
    body, head = split_body_head(trace)
    out: list[Finding] = []
    for part, idx in (("body", body), ("head", head)):
        found = [
            f for group in role_groups(trace, idx) for f in _drift(trace, ctx, group, part, grad, group == idx)
        ]
        for kind in {f.kind for f in found}:  # one finding per kind and part: the worst group
            same = [f for f in found if f.kind == kind]
            out.append(max(same, key=lambda f: abs(math.log(f.data["ratio"])) if f.data["ratio"] > 0 else math.inf))
    return out


def rule_forward_drift(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """exploding / vanishing: a body weight layer's output std beyond ``factor`` x the first one's (of
    the same role, see :func:`role_groups`).

    He et al. 2015, Eq. 10: Var[y_L] = Var[y_1] prod_l (1/2 n_l Var[w_l]) for ReLU; one factor off by c
    per layer compounds to c^L. The head (after global pooling) is judged on its own.
    """
    return _drift_groups(trace, ctx, grad=False)


def rule_gradient_drift(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """grad_exploding / grad_vanishing: a body weight layer's output-gradient std beyond ``factor`` x the
    last body weight layer's (of the same role); He et al. 2015, Eq. 14: the backward product uses fan_out."""
    return _drift_groups(trace, ctx, grad=True)


def rule_mean_drift(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """mean_drift: |mean| / std of the body weight layers' outputs grows with depth.

    Uses each channel's mean against its spread (sqrt of the channel squared mean over the channel
    variance, Brock et al. 2021, Signal Propagation Plots) where the trace has them, else the mean and
    variance over all elements. The first activation after the (zero-mean) input sets a level that is
    structure, not drift (ReLU: 1/sqrt(pi - 1) = 0.68; after a max-pool more), so the rule compares with
    the second body weight layer: a later one at twice that and above ``mean_ratio_info`` (1) is info, above
    ``mean_ratio_warning`` (3: inputs alike to the deep layers, their correlation near 1) a warning.
    """
    body, _ = split_body_head(trace)
    th = ctx.thresholds
    worst: tuple[float, float, int, int] | None = None  # (ratio, reference ratio, index, reference index)
    for group in role_groups(trace, body):
        ratios = [(_mean_ratio(trace[i].fwd), i) for i in group]
        ratios = [(r, i) for r, i in ratios if math.isfinite(r)]
        if len(ratios) < 3:
            continue
        r1, i1 = ratios[1]
        r, i = max(ratios[2:])
        if r >= th["mean_ratio_info"] and r >= 2 * r1 and (worst is None or r > worst[0]):
            worst = (r, r1, i, i1)
    if worst is None:
        return []
    r, r1, i, i1 = worst
    layer = trace[i]
    severity = "warning" if r >= th["mean_ratio_warning"] else "info"
    return [
        Finding(
            "mean_drift",
            severity,
            layer.name,
            f"{label(layer)}: each channel's mean is {g(r)}x its spread, against {g(r1)}x at {trace[i1].name}; "
            "the mean grows relative to the std with depth, so different inputs look more and more alike "
            "to the deep layers.",
            "centre the signal: zero the biases, use a zero-mean activation (tanh, SELU) or add "
            "normalization (BatchNorm/LayerNorm); in residual nets scale the branches (sp.fix.auto_init_)",
            {"ratio": r, "reference_ratio": r1, "reference": trace[i1].name},
        )
    ]


def _mean_ratio(s: Stats) -> float:
    if math.isfinite(s.chan_sq_mean) and positive(s.chan_var):
        return math.sqrt(s.chan_sq_mean / s.chan_var)
    if math.isfinite(s.mean) and positive(s.var):
        return abs(s.mean) / math.sqrt(s.var)
    return math.nan
