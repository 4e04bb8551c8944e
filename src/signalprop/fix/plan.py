"""The per-layer plan behind :func:`signalprop.fix.auto_init_`: which scheme, which std, which bias std, why.

Plan, then apply (einops' recipe habit): :func:`plan` computes the whole plan as data without touching the
model, so it can be printed, tested and diffed; :func:`apply_plan` writes it. The scheme of a weight layer
comes from the activation that follows it (found by :func:`signalprop.graph.capture`):

========================  ===================================================================================
following activation      scheme
========================  ===================================================================================
ReLU family               He et al. (2015): std = gain / sqrt(fan_in), gain = 1/sqrt(E[act(z)^2]) =
(relu, leaky, PReLU)      sqrt(2 / (1 + a^2)) for slope a (Eq. 10 with the leaky slope, Sec. 2.2).
tanh, sigmoid, hardtanh,  mean field (Poole et al. 2016; Schoenholz et al. 2017): weight variance
softsign, erf             sigma_w^2 / fan_in and bias variance sigma_b^2 on the order-to-chaos line chi1 = 1,
                          sigma_b^2 chosen for the depth (see :func:`mean_field_choice`); the first layer of
                          the chain is scaled so its pre-activation variance starts at the fixed point q*.
SELU                      LeCun normal, std = 1/sqrt(fan_in) (Klambauer et al. 2017, self-normalizing).
GELU, SiLU, Mish, ELU,    their second-moment gain, std = gain / sqrt(fan_in) (gain = theory.gain), then an
softplus, ...             LSUV pass on these layers when example inputs are given: q = 1 is an *unstable*
                          fixed point of their q-map (GELU: q-map slope 1/4 near 0, 1/2 for large q), so no
                          data-free scale keeps a deep chain there.
none (a linear layer)     Var[w] = 1/sqrt(fan_in fan_out): no scale preserves both directions through a layer
                          whose fans differ (He et al. 2015, Sec. 2.2: forward needs 1/fan_in, backward
                          1/fan_out), so the geometric mean splits the change evenly: the forward variance
                          changes by sqrt(fan_in/fan_out), the backward one by its inverse (a 4096 -> 10
                          readout: 6.4x each way instead of 410x one way); LeCun's 1/fan_in when the fans
                          agree. A readout right after a mean-field chain keeps the chain's sigma_w^2,
                          sigma_b^2, so its output variance is q* too.
embeddings                left as they are: a lookup has no fan-in; its scale is a modelling choice.
========================  ===================================================================================

Residual branches (Fixup, zero-init) add their factors on top; see :mod:`signalprop.fix.residual`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import theory
from .._errors import SignalpropError
from .._inputs import call_model
from .._state import preserved, preserving
from ..theory import ActLike
from ._common import Inputs
from ._steps import LayerPlan, Plan

__all__ = [
    "FAMILIES",
    "LayerPlan",
    "Plan",
    "apply_plan",
    "mean_field_choice",
    "plan",
]

FAMILIES: dict[str, str] = {
    "relu": "he",
    "leaky_relu": "he",
    "relu6": "he",
    "tanh": "mean_field",
    "sigmoid": "mean_field",
    "hardtanh": "mean_field",
    "softsign": "mean_field",
    "erf": "mean_field",
    "selu": "lecun",
    "gelu": "gain",
    "gelu_tanh": "gain",
    "silu": "gain",
    "swish": "gain",
    "mish": "gain",
    "elu": "gain",
    "celu": "gain",
    "softplus": "gain",
    "hardswish": "gain",
    "linear": "linear",
    "identity": "linear",
}
"""Activation registry name -> scheme family. Adding an activation is one line; unknown ones get "gain"."""

RESIDUAL_MODES = ("fixup", "zero", None)

# sigma_b^2 candidates for the mean-field schemes, in order of preference: 0.05 is the usual choice near the
# critical line (Schoenholz et al. 2017; Pennington et al. 2017); the others are tried when depth demands.
_BIAS_VARS = (0.05, 0.1, 0.02, 0.2, 0.01)
_DRIFT_LIMIT = math.log(2.0)  # predicted forward or gradient drift over the depth: at most 2x (diagnose: 10x)


# ---- mean field ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeanFieldChoice:
    """A point on the critical line and what theory predicts for a chain of ``depth`` layers."""

    weight_var: float
    bias_var: float
    q_star: float
    chi1: float
    xi_q: float
    forward_drift: float  # predicted max |std_l / std_1|, as a factor >= 1, starting off q* by 2x
    gradient_drift: float  # predicted max gradient ratio over the depth, as a factor >= 1


def mean_field_choice(act: ActLike, depth: int) -> MeanFieldChoice:
    """sigma_w^2, sigma_b^2 on the critical line chi1 = 1 for a chain of ``depth`` layers of ``act``.

    The critical line is parametrized by the fixed point q* itself (Poole et al. 2016, Eqs. 3 and 9):
    chi1 = sigma_w^2 E[phi'(sqrt(q*) z)^2] = 1 gives sigma_w^2 = 1 / E[phi'^2], and q* = sigma_w^2
    E[phi(sqrt(q*) z)^2] + sigma_b^2 gives sigma_b^2 = q* - sigma_w^2 E[phi^2]; so one vectorized quadrature
    over a grid of q* and a bisection find the point of each sigma_b^2 candidate (0.05 first, then 0.1,
    0.02, 0.2, 0.01), and only stable fixed points (q-map slope < 1) count. The first layer is set so q
    starts at q*, where neither the forward variance nor the gradient moves; an input whose second moment is
    off by 2x starts q off q*, and the q-map brings it back at the rate xi_q = -1/log(q-map slope at q*)
    (Schoenholz et al. 2017). The prediction iterates q_{l+1} = qmap(q_l) and multiplies chi1(q_l) over
    ``depth`` layers from q_1 = q*/2 and 2 q*; the first candidate whose forward and gradient drift both
    stay within 2x (diagnose flags 10x) is taken, else the one that drifts least. At sigma_b^2 = 0, tanh's
    q* is 0 and q decays like 1/l: never chosen.

    >>> c = mean_field_choice("tanh", 40)
    >>> round(c.bias_var, 3), round(c.weight_var, 3), round(c.chi1, 6)
    (0.05, 1.761, 1.0)
    """
    if not isinstance(depth, int) or depth < 1:
        raise SignalpropError(f"depth must be a positive integer (layers in the chain), got {depth!r}")
    name = theory.activation_name(act)
    if isinstance(act, str) or name in theory.known_activations():
        return _mean_field_choice(name, depth, None)  # a parameter-free activation: cached by name
    return _mean_field_choice(name, depth, act)


_Q_GRID = np.logspace(-4, 3, 281)


def _line(act: ActLike, q: Any) -> tuple[Any, Any, Any]:
    """(sigma_w^2, sigma_b^2, q-map slope) of the critical point whose fixed point is q (vectorized)."""
    q = np.asarray(q, dtype=np.float64)
    wv = 1.0 / np.asarray(theory.deriv_second_moment(act, q))
    m2 = np.asarray(theory.second_moment(act, q))
    eps = 1e-4
    dm2 = (np.asarray(theory.second_moment(act, q * (1 + eps))) - np.asarray(theory.second_moment(act, q * (1 - eps))))
    slope = wv * dm2 / (2 * eps * q)
    return wv, q - wv * m2, slope


@lru_cache(maxsize=64)
def _mean_field_choice(name: str, depth: int, act_obj: Any) -> MeanFieldChoice:
    act: ActLike = act_obj if act_obj is not None else name
    wv_g, bv_g, slope_g = _line(act, _Q_GRID)
    best: MeanFieldChoice | None = None
    for bv in _BIAS_VARS:
        ok = np.isfinite(bv_g) & np.isfinite(wv_g) & (slope_g < 1.0) & (wv_g > 0)
        cross = np.nonzero(ok[:-1] & ok[1:] & ((bv_g[:-1] - bv) * (bv_g[1:] - bv) <= 0))[0]
        if cross.size == 0:
            continue
        lo, hi = math.log(_Q_GRID[cross[0]]), math.log(_Q_GRID[cross[0] + 1])
        f_lo = float(bv_g[cross[0]]) - bv
        for _ in range(40):
            mid = (lo + hi) / 2
            f_mid = float(_line(act, math.exp(mid))[1]) - bv
            if (f_mid > 0) == (f_lo > 0):
                lo, f_lo = mid, f_mid
            else:
                hi = mid
        q_star = math.exp((lo + hi) / 2)
        wv, bv_exact, slope = (float(v) for v in _line(act, q_star))
        fwd, grad = _predict_drift(act, wv, bv_exact, np.array([q_star / 2, q_star * 2]), depth)
        xi_q = -1.0 / math.log(slope) if 0 < slope < 1 else math.inf
        chi = wv * float(theory.deriv_second_moment(act, q_star))
        choice = MeanFieldChoice(wv, bv_exact, q_star, chi, xi_q, math.exp(fwd), math.exp(grad))
        if fwd <= _DRIFT_LIMIT and grad <= _DRIFT_LIMIT:
            return choice
        if best is None or max(fwd, grad) < math.log(max(best.forward_drift, best.gradient_drift)):
            best = choice
    if best is None:
        raise SignalpropError(
            f"no stable point of {name}'s critical line chi1 = 1 was found for bias variances {_BIAS_VARS}; "
            "initialize these layers with signalprop.init (e.g. glorot_) or use lsuv_ with example inputs"
        )
    return best


def _predict_drift(act: ActLike, wv: float, bv: float, q1: Any, depth: int) -> tuple[float, float]:
    """(max |log(std_l/std_1)|, max |log prod chi1|) over ``depth`` layers from each q_1 (mean field)."""
    q = np.asarray(q1, dtype=np.float64)
    log_g = np.zeros_like(q)
    fwd = grad = 0.0
    for _ in range(max(depth - 1, 0)):
        log_g = log_g + np.log(np.maximum(wv * np.asarray(theory.deriv_second_moment(act, q)), 1e-300))
        q = np.asarray(theory.qmap(act, q, weight_var=wv, bias_var=bv))
        fwd = max(fwd, float(np.max(np.abs(0.5 * np.log(q / q1)))))
        grad = max(grad, float(np.max(np.abs(log_g))))
    return fwd, grad


# ---- structure ---------------------------------------------------------------------------------------------
@dataclass
class _Structure:
    layers: list[tuple[str, nn.Module, ActLike]]  # weight layers in first-call order, following activation
    method: str
    residuals: list[Any] = field(default_factory=list)
    node_of: dict[str, int] = field(default_factory=dict)  # call name -> node index (ordering norms vs layers)
    notes: list[str] = field(default_factory=list)


def _structure(model: nn.Module, example_inputs: Inputs | None, input_shape: Sequence[int] | None) -> _Structure:
    if example_inputs is None and input_shape is None:
        return _module_order(model)
    from ..graph import _graph as _graph

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", _graph.CaptureWarning)
        g = _graph.capture(model, example_inputs, input_shape=input_shape)
    notes = [str(w.message) for w in caught if issubclass(w.category, _graph.CaptureWarning)]
    for n in notes:
        warnings.warn(f"auto_init_: {n}", UserWarning, stacklevel=4)
    modules = dict(model.named_modules())
    layers: list[tuple[str, nn.Module, ActLike]] = []
    seen: set[str] = set()
    for c in g.weight_layers():
        if c.module in seen:
            continue  # a reused module: the first call's activation decides
        seen.add(c.module)
        layers.append((c.module, modules[c.module], g.activations.get(c.name)))
    return _Structure(layers, g.method, list(g.residuals), {c.name: c.node for c in g.calls}, notes)


def _module_order(model: nn.Module) -> _Structure:
    """Without inputs: weight layers and activations in ``named_modules`` order (exact for nn.Sequential)."""
    from ..graph._analysis import TRANSPARENT_MODULES, activation_module
    from ..layers import is_norm, is_weight_layer

    leaves = [(n, m) for n, m in model.named_modules() if is_weight_layer(m) or not list(m.children())]
    layers: list[tuple[str, nn.Module, ActLike]] = []
    for i, (name, m) in enumerate(leaves):
        if not is_weight_layer(m):
            continue
        act: ActLike = None
        for _, nxt in leaves[i + 1 :]:
            if activation_module(nxt):
                act = nxt
                break
            if is_weight_layer(nxt) or not (type(nxt).__name__ in TRANSPARENT_MODULES or is_norm(nxt)):
                break
        layers.append((name, m, act))
    notes = []
    sequential = all(isinstance(m, nn.Sequential) for m in model.modules() if list(m.children()))
    if not sequential:
        msg = (
            f"auto_init_ got no example inputs, so it read {type(model).__name__}'s structure in module "
            "order (which is the call order only for nn.Sequential models) and could not see residual "
            "branches; pass example_inputs=... or input_shape=... for the captured graph"
        )
        notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=4)
    return _Structure(layers, "module-order", [], {}, notes)


# ---- the plan ----------------------------------------------------------------------------------------------
def _family(act: ActLike) -> tuple[str, str]:
    """(scheme family, activation label) of a following activation."""
    if act is None:
        return "linear", "none"
    label = theory.activation_name(act)
    if isinstance(act, nn.Module):
        key = theory.activation_key(act) or label
    elif isinstance(act, str):
        key = act.lower()
    else:
        key = label
    return FAMILIES.get(key, "gain"), label


@preserving  # reading a parametrized weight in train mode runs its parametrization (spectral norm's u, v)
def plan(
    model: nn.Module,
    *,
    example_inputs: Inputs | None = None,
    input_shape: Sequence[int] | None = None,
    residual: str | None = "fixup",
) -> Plan:
    """The plan :func:`signalprop.fix.auto_init_` would write, as data; the model is not changed.

    ``example_inputs`` (tensor | tuple | dict) or ``input_shape`` (one sample, no batch dimension) let
    :func:`signalprop.graph.capture` find the activation after each layer and the residual branches;
    without either, module order is used (exact for ``nn.Sequential``; a warning otherwise). Example inputs
    also give the input's second moment for the first mean-field layer and enable the LSUV pass for
    GELU-like layers. ``residual``: ``"fixup"``, ``"zero"`` or None (see :mod:`signalprop.fix.residual`).

    >>> import signalprop as sp
    >>> p = sp.fix.plan(sp.models.mlp(3, 64, "tanh"))
    >>> [s.scheme for s in p]
    ['mean_field_input', 'mean_field', 'mean_field', 'mean_field_readout']
    """
    from .residual import residual_steps

    if residual not in RESIDUAL_MODES:
        raise SignalpropError(
            f"residual must be 'fixup', 'zero' or None, got {residual!r}: 'fixup' scales each residual "
            "branch's output by L^(-1/2) (Zhang et al. 2019), 'zero' starts each branch at zero "
            "(Goyal et al. 2017), None leaves branches to the per-layer schemes"
        )
    if not isinstance(model, nn.Module):
        raise SignalpropError(f"plan needs an nn.Module, got {type(model).__name__}")
    st = _structure(model, example_inputs, input_shape)
    if not st.layers:
        raise SignalpropError(
            f"{type(model).__name__} has no weight layers to initialize (Linear, convolutions, "
            "MultiheadAttention, transformers' Conv1D or types registered with signalprop.init.register_fans)"
        )
    notes = list(st.notes)
    steps = _layer_steps(model, st, example_inputs, notes)
    steps, n_branches = residual_steps(model, steps, st.residuals, st.node_of, residual)
    return Plan(tuple(steps), st.method, residual, n_branches, tuple(notes))


def _layer_steps(model: nn.Module, st: _Structure, example_inputs: Inputs | None, notes: list[str]) -> list[LayerPlan]:
    from ..init import fans as _fans
    from ..init.fans import has_fan_rule, unplanned

    families = [_family(act) for _, _, act in st.layers]
    mf_count: dict[str, int] = {}
    for fam, label in families:
        if fam == "mean_field":
            mf_count[label] = mf_count.get(label, 0) + 1
    first_mf: dict[str, str] = {}
    steps: list[LayerPlan] = []
    prev: LayerPlan | None = None
    for (name, m, act), (fam, label) in zip(st.layers, families):
        kind = type(m).__name__
        if isinstance(m, nn.Embedding | nn.EmbeddingBag):
            step = LayerPlan(name, kind, label, "keep", math.nan, math.nan,
                             "an embedding is a lookup with no fan-in; its scale is a modelling choice")
            steps.append(step)
            continue
        if not has_fan_rule(m):
            why = unplanned(name, m)
            steps.append(LayerPlan(name, kind, label, "keep", math.nan, math.nan, why))
            notes.append(why)
            continue
        fan_in = float(_fans(m)[0])
        if fam == "he":
            g = theory.gain(act)
            step = LayerPlan(name, kind, label, "he", g / math.sqrt(fan_in), 0.0,
                             f"He et al. 2015: {label} keeps E[x^2] with gain {g:.4g} = 1/sqrt(E[act(z)^2])",
                             fan_in)
        elif fam == "lecun":
            step = LayerPlan(name, kind, label, "lecun", 1 / math.sqrt(fan_in), 0.0,
                             "LeCun normal: SELU is self-normalizing at Var[w] = 1/fan_in (Klambauer et al. 2017)",
                             fan_in)
        elif fam == "gain":
            g = theory.gain(act)
            lsuv = example_inputs is not None
            step = LayerPlan(name, kind, label, "gain", g / math.sqrt(fan_in), 0.0,
                             f"second-moment gain {g:.4g}; q = 1 is an unstable fixed point of its q-map, so "
                             + ("an LSUV pass pins each layer's output std at 1" if lsuv
                                else "pass example_inputs for the LSUV pass that pins it"),
                             fan_in, lsuv=lsuv)
        elif fam == "mean_field":
            act_for = act if act is not None else label
            ch = mean_field_choice(act_for, mf_count[label])
            base = (f"chi1 = 1 at sigma_w^2 {ch.weight_var:.4g}, sigma_b^2 {ch.bias_var:g}, q* {ch.q_star:.4g} "
                    f"(depth {mf_count[label]}: predicted drift <= {max(ch.forward_drift, ch.gradient_drift):.3g}x)")
            if label not in first_mf:
                first_mf[label] = name
                m2, how = _input_second_moment(model, m, example_inputs)
                var = (ch.q_star - ch.bias_var) / (fan_in * m2)
                step = LayerPlan(name, kind, label, "mean_field_input", math.sqrt(var), math.sqrt(ch.bias_var),
                                 f"{base}; first layer of the chain: pre-activation variance starts at q* "
                                 f"(input E[x^2] = {m2:.4g}, {how})", fan_in)
                if how.startswith("assumed"):
                    notes.append(f"the input of {name!r} is assumed to have E[x^2] = 1; pass example_inputs "
                                 "to measure it")
            else:
                step = LayerPlan(name, kind, label, "mean_field", math.sqrt(ch.weight_var / fan_in),
                                 math.sqrt(ch.bias_var), base, fan_in)
        elif prev is not None and prev.scheme.startswith("mean_field") and prev.scheme != "mean_field_readout":
            fam_act = prev.activation
            ch = mean_field_choice(fam_act, mf_count.get(fam_act, 1))
            step = LayerPlan(name, kind, "none", "mean_field_readout", math.sqrt(ch.weight_var / fan_in),
                             math.sqrt(ch.bias_var),
                             f"readout after a {fam_act} chain: its sigma_w^2, sigma_b^2 keep the output "
                             f"variance at q* = {ch.q_star:.4g}", fan_in)
        else:
            fan_out = float(_fans(m)[1])
            step = LayerPlan(name, kind, label, "linear", (fan_in * fan_out) ** -0.25, 0.0,
                             "no activation follows: Var[w] = 1/sqrt(fan_in fan_out) changes the forward and "
                             "the backward variance by the same factor (fan_in/fan_out)^(+-1/2); LeCun's "
                             "1/fan_in when the fans agree", fan_in)
        steps.append(step)
        prev = step
    return steps


def _input_second_moment(model: nn.Module, layer: nn.Module, example_inputs: Inputs | None) -> tuple[float, str]:
    """E[x^2] of ``layer``'s first input on the example inputs (one read-only forward), or 1 when unknown."""
    if example_inputs is None:
        return 1.0, "assumed"
    found: list[float] = []

    def pre(m: nn.Module, args: Any) -> None:
        if not found and args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            x = args[0].detach().to(torch.float64)
            found.append(float((x * x).mean()))

    h = layer.register_forward_pre_hook(pre)
    try:
        with preserved(model) as state, state.run(eval=True), torch.no_grad():
            call_model(model, example_inputs)
    finally:
        h.remove()
    if not found or not (math.isfinite(found[0]) and found[0] > 0):
        return 1.0, "assumed (the measured input had no finite positive second moment)"
    return found[0], "measured on the example inputs"


# ---- apply -------------------------------------------------------------------------------------------------
def apply_plan(model: nn.Module, plan: Plan, *, generator: torch.Generator | None = None) -> nn.Module:
    """Write ``plan`` into ``model``: weights from N(0, std^2), biases from N(0, bias_std^2) or zero, norm gains.

    Every step is checked first (the layer exists, the std is finite), so a bad plan changes nothing.
    Weights are drawn with :func:`signalprop.init.variance_scaling_` (normal, Var[w] = std^2 exactly, with
    the layer's effective fans and weight layout), so transformers' Conv1D and attention blocks are handled.
    """
    from ..init import variance_scaling_

    modules = dict(model.named_modules())
    for s in plan:
        if s.layer not in modules:
            raise SignalpropError(f"apply_plan: the plan names layer {s.layer!r}, which {type(model).__name__} "
                                  "does not have; build the plan from this model with signalprop.fix.plan")
        if s.scheme not in ("keep", "norm_gain") and not (math.isfinite(s.std) and s.std >= 0):
            raise SignalpropError(f"apply_plan: layer {s.layer!r} has std {s.std!r}; stds must be finite and >= 0")
    with torch.no_grad():
        for s in plan:
            m = modules[s.layer]
            if s.scheme == "keep":
                continue
            if s.scheme == "norm_gain":
                w = getattr(m, "weight", None)
                if isinstance(w, torch.Tensor):
                    w.fill_(float(s.gain if s.gain is not None else 1.0))
                continue
            if s.std == 0.0:
                for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                    if isinstance(p, torch.Tensor):
                        p.zero_()
                continue
            variance_scaling_(m, scale=s.std * s.std * s.fan_in, mode="fan_in", distribution="normal",
                              zero_bias=True, generator=generator)
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor) and s.bias_std > 0:
                bias.normal_(0.0, s.bias_std, generator=generator)
    return model
