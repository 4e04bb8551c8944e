"""Drift rules: exploding / vanishing signals and gradients (He et al. 2015) over the whole body, with
repeated blocks compared role by role, against the predicted finite-width band (Hanin & Nica 2019); and mean
drift (Brock et al. 2021).

Which layers are compared with which (:func:`comparisons`): the judged layers are the body's weight layers
in call order (in reverse for gradients). The first is the reference. When no role repeats (a plain stack)
every layer is compared with the reference, so a drift over the whole body is always seen; numbered stages
of one design (``s1.0``, ``s2.0``, ...) share their roles (:func:`role`). In a stack of repeated blocks
whose block holds two roles or more (a transformer's attention and MLP, a ResNet block), the first block
(the calls of that stack before one of its roles comes back) sets its roles' levels: its layers differ from
one another by design (GPT-2's residual projections are small on purpose, attention queries get tiny
gradients). A later layer of such a role is compared with that role's first layer, and any other layer with
the reference (one whose role occurs only once, such as an embedding or a pooler, only beyond
``factor**2``: part of its level is its design). A drift across repeated blocks therefore shows in every
role it touches, and nothing is left out. An encoder and a decoder are parallel paths, judged apart
(:func:`paths`).

Direction (:func:`_entry`): the reference is the first *judged* layer. When weight layers before it were not
judged (they feed normalization layers, which keep the scale at their gain, usually 1) and the reference
is already ``factor**2`` below or above that unit scale, the signal was lost or blown up on the way there:
that is the finding, and a later climb back towards the unit scale is recovery, not explosion.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from ..layers import is_norm_kind
from ..trace import Stats, Trace
from ._findings import Finding
from ._rulekit import (
    FIX_TOOLS,
    RuleContext,
    following_activation,
    g,
    label,
    normalized,
    planned_fix,
    positive,
    role,
    role_groups,
    split_body_head,
    stack,
    weight_indices,
)

_SHRINKING_GAIN = 0.5  # a normalization layer whose gain (rms) is below this shrinks the signal it passes


@dataclass(frozen=True)
class Point:
    """One judged layer: its trace index, its role and the std read from it (forward or gradient)."""

    index: int
    role: str
    std: float


@dataclass(frozen=True)
class Comparison:
    """``point`` against ``base`` (the reference, or its role's first layer): ``ratio`` = std / base std,
    ``level`` the point's std on the reference's scale (ratio x reference std), ``steps`` the judged layers
    from the base to the point; ``lone``: a layer whose role occurs once among repeated blocks (a stem, an
    embedding, a pooler), whose level against the reference is partly design, so only a drift beyond
    ``factor**2`` counts."""

    point: Point
    base: Point
    ratio: float
    level: float
    steps: int
    by_role: bool
    lone: bool = False


def points(trace: Trace, idx: list[int], grad: bool) -> list[Point]:
    """The judged layers ``idx`` with a finite std, in the order the signal meets them."""
    attr = "bwd" if grad else "fwd"
    out = []
    for i in idx:
        s: Stats | None = getattr(trace[i], attr)
        if s is None or not math.isfinite(s.std) or s.std < 0:
            continue
        out.append(Point(i, role(trace[i].name), s.std))
    return out[::-1] if grad else out


def comparisons(pts: list[Point]) -> list[Comparison]:
    """Each point against what it is judged by (see the module docstring); the reference is ``pts[0]``."""
    if not pts or not positive(pts[0].std):
        return []
    ref = pts[0]
    roles = [p.role for p in pts]
    count = Counter(roles)
    designed = _first_blocks(roles) if len(count) < len(roles) else set()
    first: dict[str, int] = {}
    out = []
    for k, p in enumerate(pts):
        b = first.setdefault(p.role, k)
        if k == 0:
            continue
        if p.role in designed:
            if b == k:
                continue  # the role's first layer: its level against the reference is its block's design
        else:
            b = 0
        base = pts[b]
        if not positive(base.std):
            continue
        r = p.std / base.std
        lone = bool(designed) and count[p.role] == 1
        out.append(Comparison(p, base, r, r * ref.std, k - b, b != 0, lone))
    return out


def _first_blocks(roles: list[str]) -> set[str]:
    """The roles of each repeating stack's first block (the calls of that stack, :func:`stack`, before one of
    its roles comes back) when that block holds two roles or more: layers whose levels differ by design.
    A stack of one role (``features.#``, numbered stages ``s#.#``) has no such design: its first layer is
    compared with the reference like any other."""
    seen: dict[str, set[str]] = {}
    closed: set[str] = set()
    for r in roles:
        st = stack(r)
        if st in closed:
            continue
        if r in seen.setdefault(st, set()):
            closed.add(st)
        else:
            seen[st].add(r)
    blocks = [seen[st] for st in closed if len(seen[st]) >= 2]
    return set().union(*blocks) if blocks else set()


def paths(trace: Trace, idx: list[int]) -> list[list[int]]:
    """``idx`` split into parallel paths: when two or more top-level parts of the model (the first component
    of the role: ``encoder``, ``decoder``) each hold repeated blocks with a design of their own, each part is
    judged on its own, since an encoder-decoder's decoder starts its stream from its own inputs and the
    encoder's gradient arrives through cross-attention: they are not one chain. Otherwise one path."""
    groups: dict[str, list[int]] = {}
    for i in idx:
        groups.setdefault(role(trace[i].name).split(".")[0], []).append(i)
    designed = [g for g in groups.values() if _first_blocks([role(trace[i].name) for i in g])]
    return list(groups.values()) if len(designed) >= 2 else [idx]


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


# ---- the judgement ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Drift:
    """One drift to report: ``point`` is ``ratio`` x ``base_std`` (``base`` a trace index, or None for the
    unit scale)."""

    point: Point
    base: int | None
    base_std: float
    ratio: float
    steps: int
    by_role: bool
    first: int  # trace index of the first layer beyond factor in this direction
    recovery: Point | None = None  # for a drift against the unit scale: a later judged layer far above this one
    prev: int | None = None  # trace index of the judged layer the signal met just before this one


def _entry(trace: Trace, pts: list[Point], part: str, grad: bool) -> float | None:
    """1, the scale a normalization layer with its usual unit gain keeps, when the forward body's reference
    is not the first weight layer the signal passed and every one before it feeds a normalization layer (so
    none was judged); else None."""
    if grad or part != "body" or not pts:
        return None
    before = [i for i in weight_indices(trace) if i < pts[0].index]
    return 1.0 if before and all(normalized(trace, i) for i in before) else None


def _drifts(trace: Trace, ctx: RuleContext, pts: list[Point], entry: float | None) -> list[tuple[_Drift, bool]]:
    """The worst drift up and the worst down, each with ``up``; a drift must exceed ``factor`` against its
    base and, when the unit scale ``entry`` applies, against the larger (up) / smaller (down) of it and the
    reference's std."""
    f = ctx.factor
    comps = comparisons(pts)
    if not comps and entry is None:
        return []
    ref = pts[0]
    out: list[tuple[_Drift, bool]] = []
    for up in (True, False):
        beyond = [c for c in comps if (c.ratio > _limit(c, f) if up else c.ratio < 1 / _limit(c, f))]
        if entry is not None:
            beyond = [c for c in beyond if (c.level > f * max(entry, ref.std) if up else c.level < min(entry, ref.std) / f)]
        if entry is not None and (ref.std > entry * f * f if up else ref.std < entry / (f * f)):
            top = max(pts, key=lambda p: p.std)
            climb = top if not up and top.std > f * ref.std else None
            out.append((_Drift(ref, None, entry, ref.std / entry, 0, False, ref.index, climb), up))
            continue
        if not beyond:
            continue
        c = max(beyond, key=lambda c: c.ratio) if up else min(beyond, key=lambda c: c.ratio)
        k = pts.index(c.point)
        prev = pts[k - 1].index if k > 0 else None
        out.append((_Drift(c.point, c.base.index, c.base.std, c.ratio, c.steps, c.by_role, beyond[0].point.index,
                           prev=prev), up))
    return out


def _limit(c: Comparison, factor: float) -> float:
    return factor * factor if c.lone else factor


def _shrinking_norms(trace: Trace, lo: int, hi: int) -> list[int]:
    """Normalization layers between trace indices ``lo`` and ``hi`` that shrink what they pass: a gain whose
    rms (``meta["gain_rms"]``) is below 0.5, or an output far below the gain (rms under half of it: the
    input's variance is below eps, so the norm no longer divides it out); without a recorded gain, an
    output rms below 0.25."""
    out = []
    for k in range(max(lo, 0), min(hi, len(trace) - 1) + 1):
        layer = trace[k]
        if not is_norm_kind(layer.kind) or not math.isfinite(layer.fwd.rms):
            continue
        gain = layer.meta.get("gain_rms")
        if isinstance(gain, float) and math.isfinite(gain):
            if gain < _SHRINKING_GAIN or layer.fwd.rms < gain * _SHRINKING_GAIN:
                out.append(k)
        elif layer.fwd.rms < _SHRINKING_GAIN / 2:
            out.append(k)
    return out


def _norm_cause(trace: Trace, lo: int, hi: int, grad: bool, least: int = 1) -> tuple[str, str, list[str]]:
    """(message, fix, names) when at least ``least`` normalization layers between trace indices ``lo`` and
    ``hi``, and at least half of those there, shrink the signal; else empty strings."""
    norms = [k for k in range(max(lo, 0), min(hi, len(trace) - 1) + 1) if is_norm_kind(trace[k].kind)]
    small = _shrinking_norms(trace, lo, hi)
    if len(small) < least or 2 * len(small) < len(norms):
        return "", "", []
    gains = {k: float(x) for k in small if isinstance(x := trace[k].meta.get("gain_rms"), float)}
    low_gain = [k for k, x in gains.items() if x < _SHRINKING_GAIN]
    stale = [k for k in small if k not in low_gain and trace[k].meta.get("stale_stats")]
    tiny = [k for k in small if k not in low_gain and k not in stale]
    kinds = sorted({trace[k].kind for k in small})
    eps = next((trace[k].meta.get("eps") for k in tiny if isinstance(trace[k].meta.get("eps"), float)), None)
    parts = []
    if low_gain:
        rms = math.sqrt(sum(gains[k] ** 2 for k in low_gain) / len(low_gain))
        parts.append(f"{_n(low_gain)} gains of rms {g(rms)} (a norm sets its output's scale to its gain)")
    if stale:
        parts.append(f"{_n(stale)} in eval mode with running statistics never updated (mean 0, var 1), which do "
                     "not normalize")
    if tiny:
        parts.append(
            f"{_n(tiny)} inputs whose variance is below eps"
            + (f" ({g(eps)})" if eps else "")
            + ", which no longer divide the scale out"
        )
    msg = (
        f" The cause is not the weights: of the {len(norms)} normalization layers on the way, {len(small)} "
        f"({', '.join(kinds)}; first {trace[small[0]].name}) shrink what they pass: {'; '.join(parts)}"
        + (
            ". A norm's backward multiplies the gradient by gain / sqrt(variance + eps), large when its input "
            "is that small."
            if grad
            else ". The loss compounds from layer to layer."
        )
    )
    fixes = []
    if low_gain:
        gain_kinds = sorted({trace[k].kind for k in low_gain})
        fixes.append(f"set the normalization gains to 1: torch.nn.init.ones_(m.weight) for every "
                     f"{' / '.join(gain_kinds)} m (their usual init)")
    if stale:
        fixes.append("diagnose an untrained model in model.train(), or fill the running statistics first")
    if tiny:
        fixes.append("keep the signal that reaches these normalization layers well above sqrt(eps): fix the "
                     "layer that shrinks it first")
    return msg, "; ".join(fixes) + "; the weight layers' init is not the cause", [trace[k].name for k in small]


def _n(ks: list[int]) -> str:
    return f"{len(ks)} with" if len(ks) != 1 else "one with"


def _zero_cause(trace: Trace, i: int, grad: bool) -> tuple[str, str]:
    """(message, fix) when the layer owns tensors that are all zero (``meta["zero_tensors"]``): a class token
    or position table left at zero makes rows without variance, which a LayerNorm after them amplifies."""
    zeros = trace[i].meta.get("zero_tensors")
    if not zeros:
        return "", ""
    names = ", ".join(str(z) for z in zeros)
    msg = (
        f" {trace[i].name} holds tensors that are all zero ({names}): what is built from them alone has no "
        "variance, and a normalization layer after it divides by sqrt(variance + eps)"
        + (", so its backward multiplies those rows' gradient by up to 1 / sqrt(eps). The drift is confined "
           "to those rows (a class token's), and the parameters behind them get a gradient that large: it "
           "dominates a global gradient-norm clip, which then scales every other gradient down by as much."
           if grad else ".")
    )
    fix = (f"give {names} a small random init, e.g. torch.nn.init.trunc_normal_(p, std=0.02) for each "
           "(as ViT does)")
    return msg, fix


def _finding(trace: Trace, ctx: RuleContext, d: _Drift, up: bool, part: str, grad: bool,
             across: tuple[float, str] | None = None) -> Finding:
    attr = "bwd" if grad else "fwd"
    i = d.point.index
    layer = trace[i]
    std = d.point.std
    kind = ("grad_" if grad else "") + ("exploding" if up else "vanishing")
    what = "gradient std" if grad else "forward std"
    per = d.ratio ** (1.0 / d.steps) if d.ratio > 0 and d.steps > 0 else 0.0
    if d.base is None:
        msg = (
            f"{label(layer)}: {what} {g(std)}, {g(d.ratio)}x the unit scale that normalization layers keep at "
            "their usual gain of 1: the signal was "
            + ("blown up" if up else "lost")
            + " before it got here. This is the first weight layer judged one by one (those before it feed "
            "normalization layers)."
        )
        if d.recovery is not None:
            msg += (
                f" The later rise to {g(d.recovery.std)} at {trace[d.recovery.index].name} is recovery towards that "
                "scale, not explosion."
            )
        lo, hi = 0, d.first
    else:
        base = trace[d.base]
        where = "last" if grad else "first"
        scope = f"{role(layer.name)} layer" if d.by_role else ("head weight layer" if part == "head" else "weight layer")
        msg = f"{label(layer)}: {what} {g(std)}, {g(d.ratio)}x the {where} {scope}'s ({base.name}, {g(d.base_std)})"
        if d.ratio == 0:
            msg += "; the gradient is gone" if grad else "; the signal is gone"
        elif d.steps > 1:
            rate = per if up else 1 / per
            if grad:
                msg += f"; gradients {'grow' if up else 'shrink'} about {g(rate)}x per layer on the way back"
            else:
                msg += f"; the signal {'grows' if up else 'shrinks'} about {g(rate)}x per layer"
        if d.first != i:
            msg += f" (first beyond {g(ctx.factor)}x at {trace[d.first].name})"
        msg += "."
        lo, hi = sorted((d.base, i))
    inside = False
    if d.base is not None:
        note, inside = _band_note(trace, ctx, d.base, i, attr)
        msg += note
    cause, cause_fix, norms = "", "", list[str]()
    if d.prev is not None:  # the step into this layer first: a single norm there can be the whole story
        cause, cause_fix, norms = _norm_cause(trace, min(d.prev, i), max(d.prev, i), grad, least=1)
    if not cause:
        cause, cause_fix, norms = _norm_cause(trace, lo, hi, grad)
    if not cause:
        cause, cause_fix = _zero_cause(trace, i, grad)
    msg += cause
    act = following_activation(trace, i)
    init_text, fix_data = planned_fix(ctx, layer, act, "fan_out" if grad else "fan_in")
    if cause_fix:
        fix = f"{cause_fix}; for reference, {init_text}"
    elif inside:
        fix = (
            "not another scale: the init is right on average. Fit the scale to this network and your data "
            "with sp.fix.lsuv_(model, inputs), or use wider layers (the spread shrinks as 1/width); "
            f"for reference, {init_text}"
        )
    elif fix_data.get("fix_scheme") == "keep":
        fix = f"{init_text}; then {ctx.fix_call} plans it with the others"
    elif ctx.plan is not None:
        fix = f"{init_text}; {ctx.fix_call.replace('auto_init_', 'plan')} shows the plan of every layer"
    else:
        fix = f"{init_text}; {FIX_TOOLS}"
    r = d.ratio
    beyond = r > ctx.factor**2 or r < ctx.factor**-2
    if across is not None:
        total, other = across
        msg += (f" The {other} drifts the same way, so end to end the {'gradient' if grad else 'signal'} "
                f"{'grows' if up else 'shrinks'} by {g(total if up else 1 / total)}x.")
        beyond = beyond or total > ctx.factor**2 or total < ctx.factor**-2
    severity = "error" if beyond else "warning"
    if cause and not norms and trace[i].meta.get("zero_tensors"):
        severity = "warning"  # confined to the rows built from the zero tensors; the rest is in range
    data = {
        "ratio": r,
        "std": std,
        "reference": "unit scale" if d.base is None else trace[d.base].name,
        "reference_std": d.base_std,
        "per_layer": per,
        "part": part,
        "inside_band": inside,
        "basis": "unit" if d.base is None else ("role" if d.by_role else "reference"),
        **fix_data,
    }
    if across is not None:
        data["end_to_end"] = across[0]
    if norms:
        data["cause"] = "normalization_gain"
        data["norms"] = norms
    elif cause:
        data["cause"] = "zero_tensors"
    return Finding(kind, severity, layer.name, msg, fix, data)


def _drift_parts(trace: Trace, ctx: RuleContext, grad: bool) -> list[Finding]:
    body, head = split_body_head(trace)
    found: list[tuple[_Drift, bool, str]] = []
    for part, idx in (("body", body), ("head", head)):
        for path in paths(trace, idx):
            pts = points(trace, path, grad)
            entry = _entry(trace, pts, part, grad)
            if len(pts) < 2 and entry is None:
                continue
            found.extend((d, up, part) for d, up in _drifts(trace, ctx, pts, entry))
    across = _compounded(found)
    return [_finding(trace, ctx, d, up, part, grad, across.get((up, part)) if d.base is not None else None)
            for d, up, part in found]


def _compounded(found: list[tuple[_Drift, bool, str]]) -> dict[tuple[bool, str], tuple[float, str]]:
    """Where the body and the head (judged apart: global pooling sets a level of its own) both drift the
    same way, the drift end to end is the product of the two: ``(direction, part) -> (product, the other
    part's worst layer)``. Each part alone may stay under ``factor^2`` while the network as a whole does not
    (three N(0, 1) convs and three N(0, 1) Linears: 54x and 25x, 1,350x end to end)."""
    out: dict[tuple[bool, str], tuple[float, str]] = {}
    for up in (True, False):
        worst: dict[str, _Drift] = {}
        for d, u, part in found:
            if u != up or d.base is None:
                continue
            if part not in worst or (d.ratio > worst[part].ratio if up else d.ratio < worst[part].ratio):
                worst[part] = d
        if len(worst) == 2:
            product = worst["body"].ratio * worst["head"].ratio
            out[(up, "body")] = (product, "head")
            out[(up, "head")] = (product, "body")
    return out


def explosion_found(trace: Trace, ctx: RuleContext) -> bool:
    """True when the forward drift rule finds an explosion: the rules that look for one it cannot see (a
    hidden weight gain, a peak inside normalized blocks) stay quiet then, since that finding names it."""
    return any(f.kind == "exploding" for f in rule_forward_drift(trace, ctx))


def rule_forward_drift(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """exploding / vanishing: a body weight layer's output std beyond ``factor`` x the first one's (of the
    same role where blocks repeat; see the module docstring).

    He et al. 2015, Eq. 10: Var[y_L] = Var[y_1] prod_l (1/2 n_l Var[w_l]) for ReLU; one factor off by c
    per layer compounds to c^L. The head (after global pooling) is judged on its own.
    """
    return _drift_parts(trace, ctx, grad=False)


def rule_gradient_drift(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """grad_exploding / grad_vanishing: a body weight layer's output-gradient std beyond ``factor`` x the
    last body weight layer's (of the same role where blocks repeat); He et al. 2015, Eq. 14: the backward
    product uses fan_out."""
    return _drift_parts(trace, ctx, grad=True)


def rule_mean_drift(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """mean_drift: |mean| / std of the body weight layers' outputs grows with depth.

    Uses each channel's mean against its spread (sqrt of the channel squared mean over the channel
    variance, Brock et al. 2021, Signal Propagation Plots) where the trace has them, else the mean and
    variance over all elements. The first activation after the (zero-mean) input sets a level that is
    structure, not drift (ReLU: 1/sqrt(pi - 1) = 0.68; after a max-pool more), so the rule compares with
    the second body weight layer: a later one at twice that and above ``mean_ratio_info`` (1) is info, above
    ``mean_ratio_warning`` (3: inputs alike to the deep layers, their correlation near 1) a warning.
    With n values per channel the ratio is corrected for its small-sample bias (see :func:`_mean_ratio`);
    a channel holding one value per batch (a batch of one sample and no positions) has no spread: such
    layers are not judged, and when that leaves the body unjudged an info finding says so.
    """
    body, _ = split_body_head(trace)
    th = ctx.thresholds
    worst: tuple[float, float, int, int] | None = None  # (ratio, reference ratio, index, reference index)
    single = [i for i in body if _values_per_channel(trace, i) == 1]
    for group in role_groups(trace, [i for i in body if i not in single]):
        ratios = [(_mean_ratio(trace[i].fwd, _values_per_channel(trace, i)), i) for i in group]
        ratios = [(r, i) for r, i in ratios if math.isfinite(r)]
        if len(ratios) < 3:
            continue
        r1, i1 = ratios[1]
        r, i = max(ratios[2:])
        if r >= th["mean_ratio_info"] and r >= 2 * r1 and (worst is None or r > worst[0]):
            worst = (r, r1, i, i1)
    if worst is None:
        if len(single) >= 3 and len(single) * 2 >= len(body):
            return [_cannot_judge_mean(trace, single)]
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


def _values_per_channel(trace: Trace, i: int) -> int | None:
    """How many values each channel of layer ``i``'s output holds (batch x positions), when known."""
    layer = trace[i]
    if not layer.shape or layer.fwd.numel <= 0:
        return None
    dim = layer.meta.get("channel_dim", 1 if len(layer.shape) >= 2 else 0)
    if not isinstance(dim, int) or not -len(layer.shape) <= dim < len(layer.shape) or layer.shape[dim] <= 0:
        return None
    return layer.fwd.numel // layer.shape[dim]


def _cannot_judge_mean(trace: Trace, single: list[int]) -> Finding:
    batch = trace.meta.get("batch_size")
    layer = trace[single[0]]
    n = f"a batch of {batch}" if isinstance(batch, int) else "one value per channel"
    return Finding(
        "mean_drift",
        "info",
        "",
        f"cannot judge with {n}: each channel of {len(single)} body weight layers ({layer.name}, ...) holds one "
        "value, so its mean across the batch has no spread to compare with. The forward and gradient stds over "
        "all elements are judged as usual.",
        "measure a batch of 2 or more samples (16 or more for a stable ratio)",
        {"batch_size": batch, "layers": [trace[k].name for k in single]},
    )


def _mean_ratio(s: Stats, n: int | None = None) -> float:
    """sqrt(mean_c mu_c^2 / mean_c sigma_c^2) over channels c; with ``n`` values per channel the sample
    moments are corrected for their small-sample bias (E[m_c^2] = mu_c^2 + sigma_c^2 / n and E[v_c] =
    sigma_c^2 (n - 1) / n), so that a zero-mean signal reads about 0 rather than 1 / sqrt(n - 1)."""
    if math.isfinite(s.chan_sq_mean) and positive(s.chan_var):
        if n is not None and n >= 2:
            var = s.chan_var * n / (n - 1)
            return math.sqrt(max(s.chan_sq_mean - var / n, 0.0) / var)
        return math.sqrt(s.chan_sq_mean / s.chan_var)
    if math.isfinite(s.mean) and positive(s.var):
        return abs(s.mean) / math.sqrt(s.var)
    return math.nan
