"""Diagnose rules: small functions ``rule(trace, ctx) -> list[Finding]``, registered in a plain dict.

Each rule reads a :class:`~signalprop.trace.Trace` (measured or predicted) and the context
(:class:`RuleContext`: the drift factor, the predicted trace with its finite-width band, the input's
statistics, thresholds). Numbers that a trace alone cannot hold (per-unit dead fractions, saturation
fractions, subnormal fractions, fans, the activation after each weight layer) come from
``LayerStats.meta``; :func:`signalprop.diagnose.diagnose` fills them in with one extra forward pass, and
rules fall back to what the ``Stats`` say when they are absent (a saved or predicted trace).

Adding a rule is one line: ``RULES["name"] = my_rule``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..trace import Stats, Trace
from ._attention import rule_attention_saturation
from ._drift import rule_forward_drift, rule_gradient_drift, rule_mean_drift
from ._findings import Finding
from ._peak import rule_peak
from ._rulekit import (
    RELU_KEYS,
    SAT_BOUNDS,
    THRESHOLDS,
    Rule,
    RuleContext,
    act_key,
    following_activation,
    g,
    label,
    planned_fix,
    positive,
    preceding_weight,
    split_body_head,
)
from ._weights import rule_weight_gain

__all__ = ["RULES", "THRESHOLDS", "Rule", "RuleContext", "run_rules", "split_body_head"]


def _count(s: Stats) -> str:
    """'3 of its 4096 elements' (a count, from the recorded fraction and size)."""
    if s.numel > 0:
        return f"{round(s.nonfinite_frac * s.numel)} of its {s.numel} elements"
    return f"a fraction {s.nonfinite_frac:.3g} of its elements"


def rule_nonfinite(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """The first layer whose output holds inf/NaN, and where the backward pass first made them; NaN already
    in the input is named as the input.

    Going back, the gradient at a layer's output is computed by the backward of what consumes that output,
    so the module that made a non-finite gradient is the next call whose own output gradient is still
    finite. It overflowed when the finite values around it reach the dtype's range (within
    ``overflow_margin`` x of its largest value); otherwise an operation made inf/NaN from finite values
    (sqrt or pow at 0, log of 0, division by 0, a custom ``autograd.Function``), which
    ``torch.autograd.detect_anomaly`` pins to the exact op.
    """
    out: list[Finding] = []
    frac_in = ctx.input.get("nonfinite_frac", 0.0)
    if frac_in and frac_in > 0:
        out.append(
            Finding(
                "nonfinite",
                "error",
                "input",
                f"the input already holds inf/NaN ({frac_in:.3g} of its elements); every layer after it "
                "inherits them, so no layer is to blame.",
                "clean the data first: torch.nan_to_num(x) or drop the bad samples; check the loader and "
                "any normalization that divides by a zero std",
                {"nonfinite_frac": frac_in},
            )
        )
        return out
    fwd_first = next((i for i, layer in enumerate(trace) if layer.fwd.nonfinite_frac > 0), None)
    if fwd_first is not None:
        layer = trace[fwd_first]
        prev = trace[fwd_first - 1] if fwd_first > 0 else None
        before = (
            f"; the layer before it ({prev.name}) peaks at {g(prev.fwd.absmax)}"
            if prev is not None and math.isfinite(prev.fwd.absmax)
            else ""
        )
        big = prev is not None and math.isfinite(prev.fwd.absmax) and prev.fwd.absmax > 1e30
        out.append(
            Finding(
                "nonfinite",
                "error",
                layer.name,
                f"{label(layer)} is the first layer whose output holds inf/NaN ({_count(layer.fwd)}){before}.",
                (
                    "the values overflowed: rescale the init (see the exploding finding) or compute in a "
                    "wider dtype"
                    if big or layer.fwd.absmax == math.inf
                    else "look for a division by zero, log of a non-positive value, or inf/NaN in this "
                    "layer's parameters (torch.isfinite(p).all() for each)"
                ),
                {"nonfinite_frac": layer.fwd.nonfinite_frac, "nonfinite": _bad(layer.fwd), "index": fwd_first},
            )
        )
    bwd = [i for i, layer in enumerate(trace) if layer.bwd is not None and layer.bwd.nonfinite_frac > 0]
    if bwd:
        out.append(_backward_nonfinite(trace, ctx, bwd[-1], fwd_first is not None))
    return out


def _bad(s: Stats) -> int | None:
    return round(s.nonfinite_frac * s.numel) if s.numel > 0 else None


def _backward_nonfinite(trace: Trace, ctx: RuleContext, i: int, fwd_bad: bool) -> Finding:
    """The finding for the first non-finite gradient in backward order (at ``trace[i]``'s output)."""
    layer = trace[i]
    assert layer.bwd is not None
    base = layer.name.split("#")[0]
    j = next(
        (
            k
            for k in range(i + 1, len(trace))
            if trace[k].bwd is not None
            and trace[k].bwd.finite  # type: ignore[union-attr]
            and not trace[k].name.startswith(base + ".")
        ),
        None,
    )
    data: dict[str, Any] = {"nonfinite_frac": layer.bwd.nonfinite_frac, "nonfinite": _bad(layer.bwd), "index": i,
                            "backward": True, "receives": layer.name}
    anomaly = ("run the backward once under `with torch.autograd.detect_anomaly():` to get the exact op "
               "and the forward line that made it")
    if fwd_bad:
        msg = (f"{label(layer)} is the first layer in the backward pass whose output gradient holds inf/NaN "
               f"({_count(layer.bwd)}). It follows from the non-finite forward pass.")
        return Finding("nonfinite", "error", layer.name, msg, "fix the forward first", data)
    if j is None:
        msg = (f"{label(layer)}: its output gradient holds inf/NaN ({_count(layer.bwd)}), and no later call has a "
               "finite one: the gradient was already non-finite where it entered the network (the loss, or "
               "the operations after the last module).")
        return Finding("nonfinite", "error", layer.name, msg, f"check the loss for inf/NaN; {anomaly}", data)
    culprit = trace[j]
    up = culprit.bwd
    assert up is not None
    try:
        limit = float(torch.finfo(getattr(torch, culprit.dtype)).max)
    except (AttributeError, TypeError):
        limit = math.inf
    margin = ctx.thresholds["overflow_margin"]
    peaks = [x for x in (up.absmax, layer.bwd.absmax, culprit.fwd.absmax) if math.isfinite(x)]
    overflow = bool(peaks) and max(peaks) >= limit / margin
    data.update({"index": j, "upstream_absmax": up.absmax, "limit": limit,
                 "cause": "overflow" if overflow else "operation"})
    between = f"the backward from {culprit.name}'s output to {layer.name}'s output ({culprit.name} itself, or an "               "operation between the two)"
    if overflow:
        msg = (f"{label(culprit)}: {between} overflowed {culprit.dtype}: the gradient at its output peaks at "
               f"{g(up.absmax)}, within {g(limit / max(peaks))}x of the largest value {g(limit)}, and "
               f"{layer.name}'s output gradient holds inf/NaN ({_count(layer.bwd)}).")
        fix = ("rescale the init for gradients (fan_out), scale or clip the loss, or compute this part in a wider "
               f"dtype; {anomaly}")
    else:
        msg = (f"{label(culprit)}: {between} made inf/NaN from finite values: the gradient at its output is "
               f"finite and small (absmax {g(up.absmax)}, far inside {culprit.dtype}'s range), yet "
               f"{layer.name}'s output gradient holds inf/NaN ({_count(layer.bwd)}). This is not an overflow: "
               "an operation's backward divided by zero (sqrt or pow at 0, log of 0, x / 0) or a custom "
               "autograd.Function returned inf/NaN.")
        fix = f"{anomaly}; then keep its input away from the singular point (clamp(min=eps), add eps)"
    return Finding("nonfinite", "error", culprit.name, msg, fix, data)


def rule_dead_units(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """dead_units: ReLU units that output 0 for every input in the batch (per-unit, from the probe pass),
    or, without it, ReLU outputs that are zero almost everywhere. When no ReLU layer's units hold
    ``dead_min_elements`` values (a batch of one sample through an MLP), an info finding says the batch
    cannot be judged."""
    th = ctx.thresholds
    hits: list[tuple[float, int, str]] = []
    pvals: dict[int, float] = {}
    few: list[int] = []  # ReLU layers whose units hold too few values to judge
    judged = 0
    for i, layer in enumerate(trace):
        if act_key(layer) not in RELU_KEYS:
            continue
        dead = layer.meta.get("dead_frac")
        m = layer.meta.get("unit_elements", 0)
        if isinstance(dead, float):
            if m < th["dead_min_elements"]:
                few.append(i)
            else:
                judged += 1
        if isinstance(dead, float) and m >= th["dead_min_elements"] and dead >= th["dead_info"]:
            units = int(layer.meta.get("units", 0))
            hits.append((dead, i, f"{dead:.1%} of its {units} units output 0 for every one of {m} inputs"))
            pvals[i] = _more_than_half(round(dead * units), units)
        elif "dead_frac" not in layer.meta and layer.fwd.zero_frac >= th["dead_zero_frac"]:
            hits.append((layer.fwd.zero_frac, i, f"{layer.fwd.zero_frac:.1%} of its outputs are exactly 0"))
    if not hits:
        return [_cannot_judge_dead(trace, few, int(th["dead_min_elements"]))] if few and not judged else []
    frac, i, what = max(hits, key=lambda h: (h[0], -h[1]))  # the worst; the earliest among equals
    layer = trace[i]
    significant = pvals.get(i, 0.0) < th["dead_p"]  # trace-only fallback (no unit count): judge the fraction
    severity = "info"
    if significant and frac >= th["dead_warning"]:
        severity = "error" if frac >= th["dead_error"] else "warning"
    msg = f"{label(layer)}: {what}."
    if len(hits) > 1:
        msg += f" {len(hits)} ReLU layers have dead units."
    if severity == "info":
        msg += (
            " Up to half the units can be silent at init when the inputs look alike to this layer (each "
            "unit's sign is a coin flip); this many is within that."
        )
    j = preceding_weight(trace, i)
    if j is not None:
        w = trace[j]
        shift = ""
        if math.isfinite(w.fwd.mean) and positive(w.fwd.std) and w.fwd.mean < -0.5 * w.fwd.std:
            shift = (
                f" Its input from {w.name} has mean {g(w.fwd.mean)} against std {g(w.fwd.std)}: a negative "
                "shift (bias or input mean) pushes it below zero."
            )
        msg += shift
        text, fix_data = planned_fix(ctx, w, "relu")
        fix = (
            f"re-initialize {w.name} with zero bias: {text}; or use LeakyReLU. Narrow deep ReLU "
            "nets also lose units by chance (Lu et al. 2019): wider layers or normalization help"
        )
    else:
        fix, fix_data = "re-initialize the layer before it with zero bias, or use LeakyReLU", {}
    data = {"dead_frac": frac, "layers": {trace[k].name: f for f, k, _ in hits}, **fix_data}
    return [Finding("dead_units", severity, layer.name, msg, fix, data)]


def _cannot_judge_dead(trace: Trace, few: list[int], need: int) -> Finding:
    layer = trace[few[0]]
    m = int(layer.meta.get("unit_elements", 0))
    batch = trace.meta.get("batch_size")
    n = f"a batch of {batch}" if isinstance(batch, int) else f"{m} values per unit"
    return Finding(
        "dead_units",
        "info",
        layer.name,
        f"cannot judge with {n}: each unit of {layer.name} (and {len(few) - 1} other ReLU layers) outputs {m} "
        f"value(s) per batch, and a healthy unit is zero on all of m inputs with chance 2^-m, so a unit that is "
        f"zero throughout says nothing until m >= {need}.",
        f"measure a batch of {need} or more samples",
        {"batch_size": batch, "unit_elements": m, "layers": [trace[k].name for k in few]},
    )


def _more_than_half(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2): how likely k of n units are dead if each were a coin flip."""
    if n <= 0:
        return 1.0
    k = max(0, min(k, n))
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2.0**n if n <= 1000 else _normal_tail(k, n)


def _normal_tail(k: int, n: int) -> float:
    z = (k - 0.5 - n / 2) / math.sqrt(n / 4)
    return 0.5 * math.erfc(z / math.sqrt(2))


def rule_saturation(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """saturation: tanh/sigmoid outputs within 1% of their bounds (|tanh| > 0.99) for a large fraction of
    elements (Glorot & Bengio 2010, Sec. 3: saturated sigmoid units stop learning)."""
    th = ctx.thresholds
    hits: list[tuple[float, int, str]] = []
    for i, layer in enumerate(trace):
        key = act_key(layer)
        sat = layer.meta.get("sat_frac")
        if layer.meta.get("gates") and isinstance(sat, float):
            if sat >= th["sat_info"]:
                hits.append((sat, i, f"{sat:.1%} of its gates' pre-activations saturate (a sigmoid within 1% of 0 "
                                     "or 1, a tanh within 1% of +-1)"))
            continue
        if key not in SAT_BOUNDS:
            continue
        if isinstance(sat, float):
            if sat >= th["sat_info"]:
                hits.append((sat, i, f"{sat:.1%} of its outputs lie within 1% of {SAT_BOUNDS[key]}"))
        elif key in ("tanh", "softsign", "hardtanh") and math.isfinite(layer.fwd.rms) and layer.fwd.rms > 0.95:
            hits.append((layer.fwd.rms, i, f"its outputs' rms is {g(layer.fwd.rms)}, next to the bound 1"))
    if not hits:
        return []
    frac, i, what = max(hits, key=lambda h: (h[0], -h[1]))  # the worst; the earliest among equals
    layer = trace[i]
    warn_at = th["gate_sat_warning"] if layer.meta.get("gates") else th["sat_warning"]
    severity = "warning" if frac >= warn_at else "info"
    msg = f"{label(layer)}: {what}; saturated units pass almost no gradient."
    if len(hits) > 1:
        msg += f" {len(hits)} layers saturate."
    j = preceding_weight(trace, i)
    key = act_key(layer) or "tanh"
    if layer.meta.get("gates"):
        fix = (f"draw {layer.name} as recurrent nets are drawn: sp.fix.auto_init_(model) (or "
               "sp.init.recurrent_(module)) sets input weights by fan per gate, recurrent weights orthogonal "
               "(Saxe et al. 2014) and the LSTM forget-gate bias to 1 (Jozefowicz et al. 2015)")
        data = {"sat_frac": frac, "layers": {trace[k].name: f for f, k, _ in hits}}
        return [Finding("saturation", severity, layer.name, msg, fix, data)]
    if j is not None:
        w = trace[j]
        msg += f" Its input from {w.name} has std {g(w.fwd.std)}."
        text, fix_data = planned_fix(ctx, w, key)
        fix = f"shrink {w.name}'s weights: {text}, which keeps the pre-activation variance in range"
    else:
        fix, fix_data = "scale the input of this activation down to unit variance", {}
    data = {"sat_frac": frac, "layers": {trace[k].name: f for f, k, _ in hits}, **fix_data}
    return [Finding("saturation", severity, layer.name, msg, fix, data)]


def rule_overflow_risk(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """overflow_risk: a layer's output (or its gradient) within ``overflow_margin`` x of the dtype's largest
    finite value (float16: 65504; bfloat16: 3.4e38)."""
    margin = ctx.thresholds["overflow_margin"]
    for i, layer in enumerate(trace):
        try:
            info = torch.finfo(getattr(torch, layer.dtype))
        except (AttributeError, TypeError):
            continue
        for attr, what in (("fwd", "output"), ("bwd", "output gradient")):
            s: Stats | None = getattr(layer, attr)
            if s is None or not math.isfinite(s.absmax) or s.absmax < info.max / margin:
                continue
            return [
                Finding(
                    "overflow_risk",
                    "warning",
                    layer.name,
                    f"{label(layer)}: {what} absmax {g(s.absmax)} is within {g(info.max / s.absmax)}x of "
                    f"{layer.dtype}'s largest value {g(float(info.max))}; a slightly larger input overflows to inf.",
                    f"keep this layer in float32 (torch.autocast excludes it with enabled=False), or rescale "
                    f"the weights before it: {planned_fix(ctx, layer, following_activation(trace, i))[0]}"
                    if layer.weight_layer
                    else "keep this part of the model in float32, or rescale the weights before it",
                    {"absmax": s.absmax, "dtype": layer.dtype, "limit": float(info.max), "backward": attr == "bwd"},
                )
            ]
    return []


def rule_subnormal(trace: Trace, ctx: RuleContext) -> list[Finding]:
    """subnormal: a float32/float64 layer whose values fall below the smallest normal number (1.2e-38 for
    float32); CPUs handle them in microcode, about 6x slower per step (measured here; the fix is
    torch.set_flush_denormal(True))."""
    hits: list[tuple[float, int]] = []
    for i, layer in enumerate(trace):
        if layer.dtype not in ("float32", "float64"):
            continue
        frac = layer.meta.get("subnormal_frac")
        tiny = float(torch.finfo(getattr(torch, layer.dtype)).tiny)
        if isinstance(frac, float):
            if frac > 0:
                hits.append((frac, i))
        elif 0 < layer.fwd.absmax < tiny:
            hits.append((1.0, i))
    if not hits:
        return []
    frac, i = hits[0]
    layer = trace[i]
    tiny = float(torch.finfo(getattr(torch, layer.dtype)).tiny)
    severity = "warning" if frac >= ctx.thresholds["subnormal_warning"] else "info"
    return [
        Finding(
            "subnormal",
            severity,
            layer.name,
            f"{label(layer)}: {frac:.1%} of its values are subnormal (below {g(tiny)}); {len(hits)} layers "
            "hold them. On a CPU every operation on them runs in microcode: a step can be about 6x slower.",
            "fix the vanishing signal (see the vanishing finding); meanwhile torch.set_flush_denormal(True) "
            "flushes them to zero",
            {"subnormal_frac": frac, "layers": [trace[k].name for _, k in hits]},
        )
    ]


RULES: dict[str, Rule] = {
    "nonfinite": rule_nonfinite,
    "forward_drift": rule_forward_drift,
    "gradient_drift": rule_gradient_drift,
    "dead_units": rule_dead_units,
    "saturation": rule_saturation,
    "attention_saturation": rule_attention_saturation,
    "weight_gain": rule_weight_gain,
    "peak": rule_peak,
    "overflow_risk": rule_overflow_risk,
    "mean_drift": rule_mean_drift,
    "subnormal": rule_subnormal,
}
"""Rule name -> rule. Adding one is one line: ``RULES["mine"] = my_rule``."""


def run_rules(trace: Trace, ctx: RuleContext, rules: dict[str, Rule] | None = None) -> list[Finding]:
    """Every rule's findings, worst first; a rule that fails on odd numbers is noted, never raised."""
    findings: list[Finding] = []
    for name, rule in (rules if rules is not None else RULES).items():
        try:
            findings.extend(rule(trace, ctx))
        except Exception as exc:  # a rule must never hide the others; the note says which and why
            ctx.notes.append(f"rule {name} failed: {type(exc).__name__}: {exc}")
    return sorted(findings, key=lambda f: -f.rank)
