"""What diagnose rules share: the context they read, the thresholds, and helpers over a Trace (which
layers are the body and the head, which layers play the same role, the activation after a weight layer, the
init a fix names: the step of :func:`signalprop.fix.plan` when diagnose has the model, else the formula)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .. import theory
from ..graph._analysis import activation_in_order, kind_step
from ..layers import is_norm_kind
from ..trace import LayerStats, Trace
from ._findings import Finding

THRESHOLDS: dict[str, float] = {
    # Fraction of a ReLU layer's units that output 0 for every input in the batch. With zero bias and
    # symmetric weights a unit's sign is a coin flip, so inputs that have become alike (deep ReLU nets drive
    # the correlation between inputs towards 1, Poole et al. 2016) silence up to half the units at init;
    # more than half needs a negative shift (bias, input mean): that is the warning.
    # So a layer is a warning only when more than half its units are dead and a binomial test against
    # "each unit dead with chance 1/2" rejects at dead_p (4 units: never; 64 units: 42 or more dead).
    "dead_info": 0.10,
    "dead_warning": 0.50,
    "dead_error": 0.90,
    "dead_p": 0.01,
    "dead_min_elements": 16,  # a healthy unit is zero on all of m inputs with chance 2^-m: judge from 16 on
    "dead_zero_frac": 0.99,  # trace-only fallback: fraction of zero outputs that counts as dead
    "sat_info": 0.05,  # fraction of tanh/sigmoid outputs within 1% of the bounds
    "sat_warning": 0.25,
    # Fraction of an RNN/LSTM/GRU's gate pre-activations beyond the saturation bounds. PyTorch's default
    # uniform(+-1/sqrt(hidden)) and the orthogonal/fan init put well under 1% there on unit inputs; a tenth
    # means the weights are several times too large.
    "gate_sat_warning": 0.10,
    # A weight layer's gain sqrt(fan_in E[w^2]): the factor by which it multiplies the rms it receives. Sound
    # inits give 0.58 (PyTorch's default) to 1.41 (He); N(0, 1) weights give sqrt(fan_in). Above 4 (a variance
    # 8x He's) the layer's own pre-activations are far too large even when a normalization hides it.
    "weight_gain_warning": 4.0,
    # Share of an attention's query rows whose softmax puts more than 99% of its weight on one key: a
    # one-hot row passes no gradient to its logits (see diagnosis/_attention.py). At init with queries and
    # keys at 1/sqrt(fan_in) the logits have std about 1 and no row is one-hot unless it has a handful of keys.
    "attn_sat_info": 0.05,
    "attn_sat_warning": 0.25,
    "attn_sat_error": 0.75,
    "overflow_margin": 8.0,  # absmax within this factor of the dtype's largest finite value
    "mean_ratio_info": 1.0,  # |mean| / std per channel (Brock et al. 2021) of a body weight layer's output
    "mean_ratio_warning": 3.0,
    "subnormal_warning": 0.10,  # fraction of a layer's values in the subnormal range
}
"""Default thresholds; pass ``thresholds={...}`` to :func:`signalprop.diagnose.diagnose` to change one."""

FIX_TOOLS = (
    "sp.fix.auto_init_(model) sets the matching scheme on every weight layer; "
    "sp.fix.lsuv_(model, inputs) scales each layer to std 1 on your data"
)

RELU_KEYS = {"relu", "relu6"}
SAT_BOUNDS: dict[str, str] = {"tanh": "+-1", "sigmoid": "0 and 1", "hardtanh": "+-1", "softsign": "+-1"}
_GLOBAL_POOLS = re.compile(r"^(Flatten|Adaptive(Avg|Max)Pool[123]d)$")
_CONV = re.compile(r"^(Lazy)?Conv(Transpose)?[123]d$")
_PASS_THROUGH = re.compile(r"^(Dropout\d?d?|AlphaDropout|Identity)$")


@dataclass
class RuleContext:
    """What rules may read besides the trace.

    ``input`` holds the input's statistics (mean, std, absmax, nonfinite_frac) when known;
    ``predicted`` a predicted Trace whose Stats carry ``var_band``; ``notes`` collects remarks for
    ``Report.meta`` (why a number was missing). ``plan`` maps each weight layer's module name to the
    :class:`signalprop.fix.LayerPlan` that ``fix_call`` (the exact ``sp.fix.auto_init_`` call) would apply:
    a fix quotes that step, so the advice and the action are one plan. Without it (a saved trace) a fix
    names the textbook formula.
    """

    factor: float = 10.0
    predicted: Trace | None = None
    input: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=lambda: dict(THRESHOLDS))
    notes: list[str] = field(default_factory=list)
    plan: dict[str, Any] | None = None
    fix_call: str = "sp.fix.auto_init_(model)"


Rule = Callable[[Trace, RuleContext], list[Finding]]


# ---- helpers --------------------------------------------------------------------------------------
def g(x: float) -> str:
    """A number as people write it in a finding: 3 significant digits, exponent when far from 1."""
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.3g}"
    return f"{x:.2e}"


def positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def is_conv(kind: str) -> bool:
    return bool(_CONV.match(kind))


def act_key(layer: LayerStats) -> str | None:
    """The activation registry name of a layer (``"relu"``, ``"tanh"``) or None."""
    key = layer.meta.get("act_key")
    if isinstance(key, str):
        return key
    return theory._MODULE_NAMES.get(layer.kind)


def label(layer: LayerStats) -> str:
    return f"{layer.name} ({layer.kind})"


def weight_indices(trace: Trace) -> list[int]:
    """Indices of the layers that mix their inputs through a weight (Linear, Conv, HF Conv1D, ...).

    ``meta["mixing"]`` decides where diagnose recorded it from the model (``sp.init``'s definition, lookup
    tables such as ``nn.Embedding`` left out: their scale is a modelling choice); else ``weight_layer``.
    """
    if any("mixing" in layer.meta for layer in trace):
        return [i for i, layer in enumerate(trace) if layer.meta.get("mixing")]
    return [i for i, layer in enumerate(trace) if layer.weight_layer]


def split_body_head(trace: Trace) -> tuple[list[int], list[int]]:
    """Indices (into ``trace``) of the body's and the head's weight layers.

    The body ends at the first global pooling or flatten (``Flatten``, ``AdaptiveAvg/MaxPool``, or a
    pooling whose output is 1 x 1; or a functional one such as ``x.mean((2, 3))``, recorded by diagnose
    from the captured graph as ``meta["pooled"]`` on the call before it) that no convolution follows: the
    feature extractor. What comes after is the head, judged on its own, because pooling rescales
    per-element gradients by design (a 16x16 average pool divides them by 256). Networks without such a
    boundary are all body. Weight layers that feed a normalization layer (:func:`normalized`) are in neither.
    """
    weights = [i for i in weight_indices(trace) if not normalized(trace, i)]
    for i, layer in enumerate(trace):
        after = bool(layer.meta.get("pooled"))  # the pooling follows this call
        if not (after or _is_global_pool(layer)):
            continue
        if any(is_conv(trace[j].kind) for j in weights if j > i):
            continue
        body = [j for j in weights if j < i or (after and j == i)]
        if body:
            return body, [j for j in weights if j > i]
        break
    return weights, []


def normalized(trace: Trace, i: int) -> bool:
    """True when weight layer ``i`` feeds a normalization layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm,
    ...): the norm divides its scale out, forward and backward, so drift in its raw output is by design and
    not judged.

    Read off the trace: the next call (dropout and identities skipped) is a normalization layer of the same
    parent module, other than a BatchNorm in eval mode whose running statistics were never updated (``features.3`` -> ``features.4``, ``conv_stem.convolution`` -> ``conv_stem.normalization``).
    A norm of another parent is the next block's (a pre-norm transformer's ``h.0.attn.c_proj`` is followed
    by ``h.0.ln_2``, but its output goes to the residual stream, not into that norm).
    """
    return norm_after(trace, i) is not None


def norm_after(trace: Trace, i: int) -> int | None:
    """Index of the normalization layer weight layer ``i`` feeds (see :func:`normalized`), or None."""
    for j in range(i + 1, len(trace)):
        layer = trace[j]
        if _PASS_THROUGH.match(layer.kind):
            continue
        if is_norm_kind(layer.kind) and _parent(layer.name) == _parent(trace[i].name):
            # a BatchNorm in eval mode with running statistics never updated (mean 0, var 1) passes its
            # input through at its gain: it does not normalize, so the layer before it is judged
            return None if layer.meta.get("stale_stats") else j
        return None
    return None


def _parent(name: str) -> str:
    base = name.split("#")[0]
    return base.rsplit(".", 1)[0] if "." in base else ""


def role(name: str) -> str:
    """A layer's role: its name with every all-digit component (block, stage, position) replaced by '#',
    and the numbers inside the components before the first such one (the stage that holds the blocks)
    too.

    ``h.3.mlp.c_proj`` -> ``h.#.mlp.c_proj``, ``features.10`` -> ``features.#``, ``s2.0`` -> ``s#.#`` and
    ``layer3.1.conv1`` -> ``layer#.#.conv1`` (numbered stages of one design); ``mlp.fc1`` and ``mlp.fc2``
    stay apart (different roles in one block); a reuse suffix ``#k`` is dropped.
    """
    parts = name.split("#")[0].split(".")
    digit = [part.isdigit() for part in parts]
    if not any(digit):
        return ".".join(parts)
    k = digit.index(True)
    return ".".join(
        "#" if d else (re.sub(r"\d+", "#", part) if i < k else part) for i, (part, d) in enumerate(zip(parts, digit))
    )


def stack(role_name: str) -> str:
    """The stack a role belongs to: the part of the role before its first '#' (``h.#.attn.c_attn`` -> ``h``,
    ``encoder.layers.#.fc1`` -> ``encoder.layers``); the role itself when it has none."""
    parts = role_name.split(".")
    return ".".join(parts[: parts.index("#")]) if "#" in parts else role_name


def role_groups(trace: Trace, idx: list[int]) -> list[list[int]]:
    """The weight layers ``idx`` grouped by :func:`role`, each group in execution order.

    In a plain stack (``features.0``, ``features.3``, ...) that is one group, and drift is judged over the
    whole body (docs/diagnose.md). In networks of repeated blocks (transformers, ResNets) a layer is compared
    with the same layer of the first block (``h.#.attn.c_attn``), not with a layer of another role whose
    scale differs by design (GPT-2's residual branches are small on purpose). When no role repeats, the
    whole list is one group.
    """
    groups: dict[str, list[int]] = {}
    for i in idx:
        groups.setdefault(role(trace[i].name), []).append(i)
    repeated = [g for g in groups.values() if len(g) >= 2]
    return repeated if repeated else ([idx] if idx else [])


def _is_global_pool(layer: LayerStats) -> bool:
    if _GLOBAL_POOLS.match(layer.kind):
        return True
    return "Pool" in layer.kind and len(layer.shape) >= 3 and all(s == 1 for s in layer.shape[2:])


def following_activation(trace: Trace, i: int) -> str:
    """The activation after weight layer ``i``: recorded in meta (diagnose reads it off the captured graph),
    else :func:`signalprop.graph._analysis.activation_in_order` over the calls after it, else ``"linear"``."""
    key = trace[i].meta.get("act")
    if isinstance(key, str):
        return key
    rows = list(trace)[i + 1 :]
    steps = (kind_step(r.kind, weight_layer=r.weight_layer, act_key=r.meta.get("act_key")) for r in rows)
    act = activation_in_order(steps)
    return act if isinstance(act, str) else "linear"


def preceding_weight(trace: Trace, i: int) -> int | None:
    for j in range(i - 1, -1, -1):
        if trace[j].weight_layer:
            return j
    return None


def init_fix(layer: LayerStats, act: str, mode: str = "fan_in") -> str:
    """'He (fan_in, relu): std = sqrt(2/2304) = 0.0295' for this layer, from its recorded fans."""
    try:
        g2 = 1.0 / float(theory.second_moment(act, 1.0))
    except Exception:  # an activation theory cannot integrate: fall back to the linear gain
        act, g2 = "linear", 1.0
    if act in ("relu", "leaky_relu", "relu6"):
        scheme = "He"
    elif act in ("linear", "identity"):
        scheme = "LeCun"
    else:
        scheme = "He-style gain"
    num = f"{g2:.4g}" if abs(g2 - round(g2)) > 1e-9 else str(round(g2))
    fan = layer.meta.get(mode)
    if isinstance(fan, int | float) and fan > 0:
        n = int(fan) if float(fan).is_integer() else fan
        std = math.sqrt(g2 / float(fan))
        return f"{scheme} ({mode}, {act}) for {layer.name}: std = sqrt({num}/{n}) = {std:.3g}"
    return f"{scheme} ({mode}, {act}) for {layer.name}: std = sqrt({num}/{mode})"


SCHEME_NAMES: dict[str, str] = {
    "he": "He",
    "lecun": "LeCun",
    "gain": "second-moment gain",
    "mean_field": "mean-field critical",
    "mean_field_input": "mean-field critical (first layer of the chain)",
    "mean_field_readout": "mean-field readout",
    "linear": "linear (geometric mean of the fans)",
}
"""How a fix text names a :class:`signalprop.fix.LayerPlan` scheme; an unknown scheme is named as it is."""


def planned_fix(ctx: RuleContext, layer: LayerStats, act: str, mode: str = "fan_in") -> tuple[str, dict[str, Any]]:
    """The fix for one weight layer: (text, data with ``fix_scheme`` and ``fix_std``).

    With a plan (diagnose had the model) the text quotes the step ``ctx.fix_call`` would apply to this
    layer, ``std = sqrt(std^2 fan_in / fan_in)`` so the numerator reads as the scheme's variance gain
    (He's 2 for ReLU, the critical sigma_w^2 for tanh), and ``data`` carries that exact scheme and std
    (``fix_scheme``, ``fix_std``) and the layer they are for (``fix_layer``).
    A layer the plan keeps (no fan rule) gets the plan's reason, which names the ``register_fans`` call.
    Without a plan: :func:`init_fix`, the textbook formula from the recorded fans.
    """
    step = ctx.plan.get(layer.name.split("#")[0]) if ctx.plan is not None else None
    if step is None:
        return init_fix(layer, act, mode), {}
    data: dict[str, Any] = {"fix_layer": step.layer, "fix_scheme": step.scheme, "fix_std": step.std}
    if step.scheme == "keep":
        why = step.reason.split("left as it is: ", 1)[-1]
        return f"{ctx.fix_call} leaves {layer.name} as it is: {why}", data
    if step.scheme == "lsuv":
        data["fix_lsuv"] = True
        return f"{ctx.fix_call} rescales {layer.name} by its LSUV pass only: {step.reason}", data
    name = SCHEME_NAMES.get(step.scheme, step.scheme)
    fan = step.fan_in
    formula = f"std = {step.std:.4g}"
    if isinstance(fan, int | float) and math.isfinite(fan) and fan > 0:
        n = int(fan) if float(fan).is_integer() else fan
        formula = f"std = sqrt({step.std * step.std * fan:.4g}/{n}) = {step.std:.4g}"
    act_text = f" for {step.activation}" if step.activation not in ("none", "linear") else ""
    text = f"{ctx.fix_call} sets {layer.name} to {name}{act_text}: {formula}"
    if step.bias_std > 0:
        text += f", bias std {step.bias_std:.3g}"
    if step.factor != 1.0:
        text += f" (residual factor {step.factor:.3g} included)"
    if step.lsuv:
        text += ", then an LSUV pass rescales its output to std 1"
        data["fix_lsuv"] = True
    return text, data
