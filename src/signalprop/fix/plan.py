"""The per-layer plan behind :func:`signalprop.fix.auto_init_`: which scheme, which std, which bias std, why.

Plan, then apply (einops' recipe habit): :func:`plan` computes the whole plan as data without touching the
model, so it can be printed, tested and diffed; :func:`apply_plan` writes it. The scheme of a weight layer
comes from the activation that follows it (found by :func:`signalprop.graph.capture`):

========================  ===================================================================================
following activation      scheme
========================  ===================================================================================
ReLU family               He et al. (2015): std = gain / sqrt(fan_in), gain = 1/sqrt(E[act(z)^2]) =
(relu, leaky, PReLU)      sqrt(2 / (1 + a^2)) for slope a (Eq. 10 with the leaky slope, Sec. 2.2).
tanh, sigmoid, hardtanh,  mean field (Poole et al. 2016; Schoenholz et al. 2017), orthogonal weights (Saxe et
softsign, erf             al. 2014) of variance sigma_w^2 / fan_in and biases of variance sigma_b^2, chosen for
                          the chain's depth and width by :func:`signalprop.fix.mean_field_choice`: on the
                          critical line chi1 = 1 when every layer of the chain has a bias, on the line
                          sigma_b^2 = 0 (sigma_w^2 a little above 1) when some layer has none; the first layer
                          of the chain is scaled so its pre-activation variance starts at the fixed point q*.
SELU                      LeCun normal, std = 1/sqrt(fan_in) (Klambauer et al. 2017, self-normalizing).
GELU, SiLU, Mish, ELU,    their second-moment gain, std = gain / sqrt(fan_in) (gain = theory.gain), then an
softplus, ...             LSUV pass on these layers when example inputs are given (q = 1 is an *unstable*
                          fixed point of their q-map: GELU's slope is 1/4 near 0, 1/2 for large q), to the
                          output std that keeps the chain's gradient in range
                          (:func:`signalprop.fix.lsuv_target`).
none (a linear layer)     Var[w] = 1/sqrt(fan_in fan_out): no scale preserves both directions through a layer
                          whose fans differ (He et al. 2015, Sec. 2.2: forward needs 1/fan_in, backward
                          1/fan_out), so the geometric mean splits the change evenly: the forward variance
                          changes by sqrt(fan_in/fan_out), the backward one by its inverse (a 4096 -> 10
                          readout: 6.4x each way instead of 410x one way); LeCun's 1/fan_in when the fans
                          agree. A readout right after a mean-field chain keeps the chain's sigma_w^2,
                          sigma_b^2, so its output variance is q* too.
========================  ===================================================================================

Other layers: RNN/LSTM/GRU get :func:`signalprop.init.recurrent_` (LeCun input weights and orthogonal
recurrent weights per gate, forget-gate bias 1); embeddings are kept (a lookup has no fan-in; its scale is a
modelling choice); a weight shared by several layers (a tied embedding and head) is planned once, at its
first user, and kept at the others; a weight whose parametrization fixes its scale (``spectral_norm``,
``orthogonal``) is kept; a parametrized weight (``weight_norm``) is drawn through the parametrization; a
custom layer without a fan rule is rescaled by the LSUV pass when example inputs are given (its output is
linear in its weight), else kept with the ``register_fans`` call that would plan it.

Residual branches (Fixup, zero-init) add their factors on top; see :mod:`signalprop.fix.residual`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .. import theory
from .._errors import SignalpropError
from .._inputs import call_model
from .._state import preserved, preserving
from ..theory import ActLike
from ._common import Inputs, refuse_meta, restore, snapshot
from ._critical import LSUVTarget, MeanFieldChoice, lsuv_target, mean_field_choice
from ._steps import LayerPlan, Plan
from ._structure import Structure, chain_depths, structure, units

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


def _family(act: ActLike) -> tuple[str, str]:
    """(scheme family, activation label) of a following activation."""
    if act is None:
        return "linear", "none"
    name = theory.activation_name(act)
    if isinstance(act, nn.Module):
        key = theory.activation_key(act) or name
    elif isinstance(act, str):
        key = act.lower()
    else:
        key = name
    return FAMILIES.get(key, "gain"), name


@preserving  # reading a parametrized weight in train mode runs its parametrization (spectral norm's u, v)
def plan(
    model: nn.Module,
    *,
    example_inputs: Inputs | None = None,
    input_shape: Sequence[int] | None = None,
    residual: str | None = "fixup",
    graph: Any = None,
) -> Plan:
    """The plan :func:`signalprop.fix.auto_init_` would write, as data; the model is not changed.

    ``example_inputs`` (tensor | tuple | dict) or ``input_shape`` (one sample, no batch dimension) let
    :func:`signalprop.graph.capture` find the activation after each layer and the residual branches;
    without either, module order is used (exact for ``nn.Sequential``; a warning otherwise). Example inputs
    also give the input's second moment for the first mean-field layer and enable the LSUV pass for
    GELU-like and custom layers. ``residual``: ``"fixup"``, ``"zero"`` or None (see
    :mod:`signalprop.fix.residual`). ``graph``: a :func:`signalprop.graph.capture` of this model to read the
    structure from instead of capturing again (diagnose shares its capture this way); the plan is the one
    those inputs would give.

    Args:
        model: The model to plan for.
        example_inputs: Inputs to call the model with (tensor, tuple or dict).
        input_shape: One sample's shape, no batch dimension, when no inputs are given.
        residual: ``"fixup"``, ``"zero"`` or None.
        graph: A capture of this model to read the structure from.

    Returns:
        The :class:`Plan`: one :class:`LayerPlan` per module acted on, with the scheme, std and reason
        (the table in the module docstring gives each formula and its paper).

    Raises:
        SignalpropError: Bad inputs, an unknown residual mode, or a model on the meta device.

    Examples:
        A tanh MLP gets the mean-field critical init (Poole et al. 2016): ``sigma_w^2 = 1.761``,
        ``sigma_b^2 = 0.05`` (:func:`mean_field_choice`), so ``std = sqrt(1.761 / 64)``:

        >>> import signalprop as sp
        >>> p = sp.fix.plan(sp.models.mlp(3, 64, "tanh"))
        >>> [s.scheme for s in p]
        ['mean_field_input', 'mean_field', 'mean_field', 'mean_field_readout']
        >>> round(p[1].std, 4), round(p[1].bias_std ** 2, 3)
        (0.1659, 0.05)
    """
    from .residual import residual_steps

    if residual not in RESIDUAL_MODES:
        raise SignalpropError(
            f"residual must be 'fixup', 'zero' or None, got {residual!r}: 'fixup' scales each residual "
            "branch's output by L^(-1/2) (Zhang et al. 2019), 'zero' starts each branch at zero "
            "(Goyal et al. 2017), None leaves branches to the per-layer schemes; 'depth_mup', 'rezero', "
            "'skipinit' and 'deepnorm' gate the branches after init: auto_init_(residual=...) or sp.fix.residual_"
        )
    if not isinstance(model, nn.Module):
        raise SignalpropError(f"plan needs an nn.Module, got {type(model).__name__}")
    if example_inputs is not None:
        refuse_meta(model, "plan")
    st = structure(model, example_inputs, input_shape, graph=graph)
    if not st.layers:
        raise SignalpropError(
            f"{type(model).__name__} has no weight layers to initialize (Linear, convolutions, RNN/LSTM/GRU, "
            "MultiheadAttention, transformers' Conv1D or types registered with signalprop.init.register_fans)"
        )
    notes = list(st.notes)
    steps = _layer_steps(model, st, example_inputs, notes)
    steps, n_branches = residual_steps(model, steps, st.residuals, st.node_of, residual)
    return Plan(tuple(steps), st.method, residual, n_branches, tuple(notes))


# ---- the steps ---------------------------------------------------------------------------------------------
def _keep_reason(name: str, m: nn.Module, owners: dict[int, str], lsuv_ok: bool) -> tuple[str, str] | None:
    """(scheme, reason) for a layer no scheme draws ("keep", or "lsuv": only the LSUV pass rescales it)."""
    from ..init._parametrized import scale_fixed, storage
    from ..init.fans import has_fan_rule, register_call, unplanned
    from ..layers import weight_names

    names = weight_names(m)
    tied = [owners[id(t)] for k in names if (t := storage(m, k)) is not None and owners.get(id(t), name) != name]
    if tied:
        return "keep", (f"its weight is {tied[0]}'s (tied: one tensor): planned once, at {tied[0]}")
    if isinstance(m, nn.Embedding | nn.EmbeddingBag):
        return "keep", "an embedding is a lookup with no fan-in; its scale is a modelling choice"
    fixed = next((why for k in names if (why := scale_fixed(m, k)) is not None), None)
    if fixed is not None:
        return "keep", f"{fixed}, so no init sets its scale"
    if not has_fan_rule(m):
        kind = type(m).__name__
        if lsuv_ok and len(names) == 1:
            return "lsuv", (f"no fan rule for {kind} ({register_call(m)} would let a scheme draw it); its output "
                            f"is linear in its {names[0]}, which the LSUV pass rescales")
        return "keep", unplanned(name, m)
    return None


def _chains(st: Structure, families: list[tuple[str, str]], skip: set[str]) -> dict[str, MeanFieldChoice]:
    """The mean-field choice of each activation's chain: its depth, its width, whether every layer has a bias."""
    members: dict[str, list[nn.Module]] = {}
    acts: dict[str, ActLike] = {}
    for (name, m, act), (fam, lab) in zip(st.layers, families):
        if fam == "mean_field" and name not in skip:
            members.setdefault(lab, []).append(m)
            acts.setdefault(lab, act)
    out = {}
    for lab, ms in members.items():
        act = acts[lab]
        widths = [w for m in ms if (w := units(m)) is not None]
        bias = all(isinstance(getattr(m, "bias", None), torch.Tensor) for m in ms)
        out[lab] = mean_field_choice(act if act is not None else lab, len(ms), bias=bias,
                                     width=min(widths) if widths else None)
    return out


def _layer_steps(model: nn.Module, st: Structure, example_inputs: Inputs | None, notes: list[str]) -> list[LayerPlan]:
    from ..init import fans as _fans
    from ..init._parametrized import storage
    from ..layers import weight_names

    families = [_family(act) for _, _, act in st.layers]
    owners: dict[int, str] = {}
    special: dict[str, tuple[str, str]] = {}
    for name, m, _ in st.layers:
        kept = _keep_reason(name, m, owners, example_inputs is not None)
        for k in weight_names(m):
            t = storage(m, k)
            if t is not None:
                owners.setdefault(id(t), name)
        if kept is not None:
            special[name] = kept
    chains = _chains(st, families, set(special) | {n for n, m, _ in st.layers if isinstance(m, nn.RNNBase)})
    lsuv_names = [(n, lab) for (n, m, _), (fam, lab) in zip(st.layers, families)
                  if special.get(n, ("",))[0] == "lsuv" or (n not in special and fam == "gain"
                                                            and example_inputs is not None
                                                            and not isinstance(m, nn.RNNBase))]
    depths = chain_depths(lsuv_names, st.branch_of())
    first_mf: set[str] = set()
    steps: list[LayerPlan] = []
    prev: LayerPlan | None = None
    for (name, m, act), (fam, lab) in zip(st.layers, families):
        kind = type(m).__name__
        if name in special:
            scheme, why = special[name]
            step = LayerPlan(name, kind, lab, scheme, math.nan, math.nan, why)
            if scheme == "lsuv":
                # no activation after it: it keeps the scale the layer before it left (an LSUV target or 1)
                tgt = (lsuv_target(act, depths[name], None, 1.0) if act is not None else
                       LSUVTarget(steps[-1].target_std if steps and steps[-1].lsuv else 1.0, 1.0))
                step = LayerPlan(name, kind, lab, "lsuv", math.nan, math.nan, f"{why} to output std {tgt.std:.3g}"
                                 + (f" ({tgt.note})" if tgt.note else ""), lsuv=True, target_std=tgt.std)
            elif why not in notes and not why.startswith(("an embedding", "its weight is")):
                notes.append(why)
            steps.append(step)
            continue
        if isinstance(m, nn.RNNBase):
            steps.append(_recurrent_step(name, m, lab))
            continue
        fan_in = float(_fans(m)[0])
        if fam == "he":
            g = theory.gain(act)
            step = LayerPlan(name, kind, lab, "he", g / math.sqrt(fan_in), 0.0,
                             f"He et al. 2015: {lab} keeps E[x^2] with gain {g:.4g} = 1/sqrt(E[act(z)^2])", fan_in)
        elif fam == "lecun":
            step = LayerPlan(name, kind, lab, "lecun", 1 / math.sqrt(fan_in), 0.0,
                             "LeCun normal: SELU is self-normalizing at Var[w] = 1/fan_in (Klambauer et al. 2017)",
                             fan_in)
        elif fam == "gain":
            step = _gain_step(name, m, act, lab, fan_in, depths.get(name))
        elif fam == "mean_field":
            ch = chains[lab]
            step = _mean_field_step(model, name, m, lab, fan_in, ch, lab not in first_mf, example_inputs, notes)
            first_mf.add(lab)
        elif prev is not None and prev.scheme.startswith("mean_field") and prev.scheme != "mean_field_readout":
            ch = chains[prev.activation]
            step = LayerPlan(name, kind, "none", "mean_field_readout", math.sqrt(ch.weight_var / fan_in),
                             math.sqrt(ch.bias_var),
                             f"readout after a {prev.activation} chain: its sigma_w^2, sigma_b^2 keep the output "
                             f"variance at q* = {ch.q_star:.4g}", fan_in, distribution="orthogonal")
        else:
            fan_out = float(_fans(m)[1])
            step = LayerPlan(name, kind, lab, "linear", (fan_in * fan_out) ** -0.25, 0.0,
                             "no activation follows: Var[w] = 1/sqrt(fan_in fan_out) changes the forward and "
                             "the backward variance by the same factor (fan_in/fan_out)^(+-1/2); LeCun's "
                             "1/fan_in when the fans agree", fan_in)
        steps.append(step)
        prev = step
    return steps


def _recurrent_step(name: str, m: nn.RNNBase, lab: str) -> LayerPlan:
    from ..init.recurrent import recurrent_plan

    first = recurrent_plan(m, name)[0]
    forget = " and the forget gate's 1 (Jozefowicz et al. 2015)" if m.mode == "LSTM" and m.bias else ""
    return LayerPlan(
        name, type(m).__name__, lab, "recurrent", first.std, 0.0,
        f"sp.init.recurrent_: input weights {first.scheme} per gate (std 1/sqrt(fan_in), {first.std:.4g} at "
        f"layer 0), recurrent weights orthogonal per gate (Saxe et al. 2014), biases 0{forget}",
        float(first.fan_in), distribution="per gate")


def _gain_step(name: str, m: nn.Module, act: ActLike, lab: str, fan_in: float, depth: int | None) -> LayerPlan:
    g = theory.gain(act)
    head = f"second-moment gain {g:.4g}; q = 1 is an unstable fixed point of its q-map, so "
    if depth is None:
        return LayerPlan(name, type(m).__name__, lab, "gain", g / math.sqrt(fan_in), 0.0,
                         head + "pass example_inputs for the LSUV pass that pins it", fan_in)
    t = lsuv_target(act, depth, units(m), 1.0)
    why = head + f"an LSUV pass pins each layer's output std at {t.std:.3g}" + (f" ({t.note})" if t.note else "")
    return LayerPlan(name, type(m).__name__, lab, "gain", g / math.sqrt(fan_in), 0.0, why, fan_in, lsuv=True,
                     target_std=t.std, distribution="orthogonal")


def _mean_field_step(model: nn.Module, name: str, m: nn.Module, lab: str, fan_in: float, ch: MeanFieldChoice,
                     first: bool, example_inputs: Inputs | None, notes: list[str]) -> LayerPlan:
    line = (f"chi1 = 1 at sigma_w^2 {ch.weight_var:.4g}, sigma_b^2 {ch.bias_var:g}" if ch.bias_var > 0 else
            f"no bias in the chain: sigma_b^2 = 0, sigma_w^2 {ch.weight_var:.4g} (chi1 = {ch.chi1:.4g} at q*; "
            "sigma_w^2 = 1 would make q decay like 1/depth)")
    base = (f"{line}, q* {ch.q_star:.4g}, orthogonal weights (predicted drift <= "
            f"{max(ch.forward_drift, ch.gradient_drift * ch.spread):.3g}x)")
    if not first:
        return LayerPlan(name, type(m).__name__, lab, "mean_field", math.sqrt(ch.weight_var / fan_in),
                         math.sqrt(ch.bias_var), base, fan_in, distribution="orthogonal")
    m2, how = _input_second_moment(model, m, example_inputs)
    var = (ch.q_star - ch.bias_var) / (fan_in * m2)
    if how.startswith("assumed"):
        notes.append(f"the input of {name!r} is assumed to have E[x^2] = 1; pass example_inputs to measure it")
    return LayerPlan(name, type(m).__name__, lab, "mean_field_input", math.sqrt(var), math.sqrt(ch.bias_var),
                     f"{base}; first layer of the chain: pre-activation variance starts at q* "
                     f"(input E[x^2] = {m2:.4g}, {how})", fan_in, distribution="orthogonal")


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
_NOT_DRAWN = ("keep", "lsuv", "norm_gain", "recurrent")


def apply_plan(model: nn.Module, plan: Plan, *, generator: torch.Generator | None = None) -> nn.Module:
    """Write ``plan`` into ``model``: weights of the planned std and distribution, biases from N(0, bias_std^2)
    or zero, norm gains, the recurrent init.

    Every step is checked first (the layer exists, the std is finite), and a step that fails half-way (a
    parametrization that cannot be set) restores every weight, so a bad plan changes nothing. Weights are
    drawn with :func:`signalprop.init.apply.draw_std_` (each weight block of the layer, with its effective
    layout: transformers' Conv1D and attention blocks; through ``weight_norm``-style parametrizations).

    Args:
        model: The model the plan was made for.
        plan: A :class:`Plan` from :func:`plan` (possibly edited with ``dataclasses.replace``).
        generator: The random generator to draw from.

    Returns:
        ``model``, written in place (no LSUV pass: :func:`signalprop.fix.auto_init_` adds that).

    Raises:
        SignalpropError: A step names a layer the model lacks, or has a non-finite std.

    Examples:
        >>> import torch, signalprop as sp
        >>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> net = apply_plan(net, sp.fix.plan(net), generator=torch.Generator().manual_seed(0))
        >>> float(net[0].bias.detach().abs().max())
        0.0
    """
    from ..init.apply import draw_std_
    from ..init.recurrent import recurrent_

    refuse_meta(model, "apply_plan")
    modules = dict(model.named_modules())
    for s in plan:
        if s.layer not in modules:
            raise SignalpropError(f"apply_plan: the plan names layer {s.layer!r}, which {type(model).__name__} "
                                  "does not have; build the plan from this model with signalprop.fix.plan")
        if s.scheme not in _NOT_DRAWN and not (math.isfinite(s.std) and s.std >= 0):
            raise SignalpropError(f"apply_plan: layer {s.layer!r} has std {s.std!r}; stds must be finite and >= 0")
    saved = snapshot([(s.layer, modules[s.layer]) for s in plan if s.scheme not in ("keep", "lsuv")])
    try:
        with torch.no_grad():
            for s in plan:
                m = modules[s.layer]
                if s.scheme in ("keep", "lsuv"):
                    continue
                if s.scheme == "norm_gain":
                    w = getattr(m, "weight", None)
                    if isinstance(w, torch.Tensor):
                        w.fill_(float(s.gain if s.gain is not None else 1.0))
                elif s.scheme == "recurrent":
                    recurrent_(m, generator=generator)
                elif s.std == 0.0:
                    _zero_(m)
                else:
                    dist = s.distribution if s.distribution in ("normal", "orthogonal") else "normal"
                    draw_std_(m, s.std, distribution=dist, generator=generator, zero_bias=True, fan_in=s.fan_in)
                    bias = getattr(m, "bias", None)
                    if isinstance(bias, torch.Tensor) and s.bias_std > 0:
                        bias.normal_(0.0, s.bias_std, generator=generator)
    except BaseException:
        restore(saved)
        raise
    return model


def _zero_(m: nn.Module) -> None:
    """Zero a layer's weights (through a parametrization when it has one) and its bias."""
    from ..init._parametrized import assign_, is_parametrized
    from ..layers import weight_names

    for k in weight_names(m):
        w = getattr(m, k)
        if is_parametrized(m, k):
            assign_(m, k, torch.zeros_like(w), f"zero-init of {type(m).__name__}")
        else:
            w.zero_()
    bias = getattr(m, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.zero_()
