"""Planning and writing an initialization: one layer or a whole model, planned as data, then written.

The initializers of :mod:`signalprop.init.initializers` (``he_(model)``, ...) first build a plan, one
:class:`InitStep` per weight block (layer, parameter, effective fans from :mod:`signalprop.init.fans`, the
std it will set, the distribution), so every error (an unknown layer type, an unknown activation, a bad
mode) is raised before a single weight changes; then they write the plan with the tensor functions of
:mod:`signalprop.init.schemes`. :func:`plan` and :func:`target_std` give the plan without touching the model
(diagnose names "the exact std it would set" with them).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch
from torch import nn

from .._errors import SignalpropError
from ..theory import ActLike
from . import _parametrized as _P
from . import orthogonal as O
from . import schemes as S
from .fans import WeightBlock, _check_layer, _rule_for, has_fan_rule, weight_blocks, weight_layers

M = TypeVar("M", bound=nn.Module)

_BIAS_NAMES = ("bias", "in_proj_bias", "bias_k", "bias_v")


def bias_names(layer: nn.Module) -> list[str]:
    """The bias parameters a weight layer's initializer writes.

    ``bias`` (attention: ``in_proj_bias``, ``bias_k``, ``bias_v``), and an RNN's ``bias_ih_l*`` /
    ``bias_hh_l*``.

    Args:
        layer: A weight layer.

    Returns:
        The names of its bias parameters that are set (not None).

    Examples:
        >>> bias_names(nn.Linear(2, 3)), bias_names(nn.MultiheadAttention(4, 2)), bias_names(nn.GRU(2, 3))
        (['bias'], ['in_proj_bias'], ['bias_ih_l0', 'bias_hh_l0'])
    """
    rnn = isinstance(layer, nn.RNNBase)
    return [k for k, v in layer._parameters.items()
            if v is not None and (k in _BIAS_NAMES or (rnn and k.startswith("bias_")))]


@dataclass(frozen=True)
class InitStep:
    """One weight block of the plan: where, which fans, and the std and distribution it gets.

    ``std`` is the standard deviation of the block's entries: the sampling std for the variance schemes,
    the root mean square entry for orthogonal ones (``gain / sqrt(max(rows, cols))``; delta-orthogonal
    spreads that over the whole kernel, most of it zeros).

    Attributes:
        layer: Qualified name of the layer in the model (``""`` for the layer itself).
        kind: The layer's class name.
        param: The parameter the block lives in (``"weight"``, ``"in_proj_weight"``, ...).
        rows: The block's row range in ``param`` (q, k, v thirds, RNN gates), or None for all of it.
        fan_in: Effective fan-in (:func:`signalprop.init.fans`).
        fan_out: Effective fan-out.
        scheme: ``he``, ``glorot``, ``lecun``, ``variance_scaling``, ``orthogonal`` or ``delta_orthogonal``.
        distribution: ``normal``, ``uniform``, ``truncated_normal``, ``orthogonal`` or ``delta_orthogonal``.
        std: The standard deviation of the block's entries.
        groups: Independent matrices along dim 0 for the orthogonal schemes (grouped convolutions).
        out_dim: The dimension that indexes output units (1 for transposed convolutions and Conv1D).
        gain: The orthogonal schemes' gain (1.0 for the variance schemes).

    Examples:
        >>> step = plan(nn.Conv2d(64, 128, 3), "he")[0]
        >>> step.param, step.fan_in, step.fan_out, round(step.std, 5)  # sqrt(2 / (64 * 9))
        ('weight', 576, 1152, 0.05893)
    """

    layer: str
    kind: str
    param: str
    rows: tuple[int, int] | None
    fan_in: float
    fan_out: float
    scheme: str
    distribution: str
    std: float
    groups: int = 1
    out_dim: int = 0
    gain: float = 1.0


@dataclass(frozen=True)
class _Spec:
    """A scheme with its settings bound: ``std(fan_in, fan_out)`` and a distribution (or orthogonal)."""

    name: str
    distribution: str
    std: Callable[[float, float], float] | None = None
    gain: float = 1.0


def _dist(distribution: str) -> str:
    return S._pick(distribution, S.DISTRIBUTIONS, "distribution")


def _spec_he(mode: str = "fan_in", nonlinearity: ActLike = "relu", distribution: str = "normal") -> _Spec:
    S.he_std(1.0, 1.0, mode=mode, nonlinearity=nonlinearity)  # validates mode and nonlinearity now
    return _Spec(
        "he", _dist(distribution), lambda fi, fo: S.he_std(fi, fo, mode=mode, nonlinearity=nonlinearity)
    )


def _spec_glorot(distribution: str = "uniform", gain: float | ActLike = 1.0) -> _Spec:
    g = S._as_gain(gain)
    return _Spec("glorot", _dist(distribution), lambda fi, fo: S.glorot_std(fi, fo, gain=g))


def _spec_lecun(distribution: str = "normal") -> _Spec:
    return _Spec("lecun", _dist(distribution), S.lecun_std)


def _spec_vs(scale: float = 1.0, mode: str = "fan_in", distribution: str = "truncated_normal") -> _Spec:
    S.variance_scaling_std(1.0, 1.0, scale=scale, mode=mode)
    return _Spec(
        "variance_scaling", _dist(distribution), lambda fi, fo: S.variance_scaling_std(fi, fo, scale=scale, mode=mode)
    )


def _spec_orth(gain: float | ActLike = 1.0) -> _Spec:
    return _Spec("orthogonal", "orthogonal", gain=S._as_gain(gain))


def _spec_delta(gain: float | ActLike = 1.0) -> _Spec:
    return _Spec("delta_orthogonal", "delta_orthogonal", gain=S._as_gain(gain))


_SPECS: dict[str, Callable[..., _Spec]] = {
    "he": _spec_he,
    "kaiming": _spec_he,
    "glorot": _spec_glorot,
    "xavier": _spec_glorot,
    "lecun": _spec_lecun,
    "variance_scaling": _spec_vs,
    "orthogonal": _spec_orth,
    "delta_orthogonal": _spec_delta,
}
"""Scheme name -> settings -> spec. ``kaiming`` and ``xavier`` are aliases."""


def _make_spec(scheme: str, kwargs: dict[str, Any]) -> _Spec:
    if not isinstance(scheme, str) or scheme not in _SPECS:
        raise SignalpropError(f"unknown scheme {scheme!r}; use one of: {', '.join(_SPECS)}")
    try:
        return _SPECS[scheme](**kwargs)
    except TypeError as exc:
        raise SignalpropError(f"scheme {scheme!r} does not take {sorted(kwargs)}: {exc}") from exc


# ---- the plan ---------------------------------------------------------------------------------
def _block_params(m: nn.Module) -> list[str]:
    """Names of the parameters a weight layer's blocks cover."""
    return sorted({b.param for b in weight_blocks(m)})


def _layer_blocks(m: nn.Module, fans: tuple[float, float] | None) -> list[WeightBlock]:
    if fans is None:
        return weight_blocks(m)
    fi, fo = S._fans(torch.empty(0), fans)
    if _rule_for(m) is None:
        w = m._parameters.get("weight")
        if not isinstance(w, torch.Tensor):
            raise SignalpropError(
                f"{type(m).__name__} has no parameter 'weight' to initialize with fans={fans!r}"
            )
        return [WeightBlock("weight", fi, fo)]
    return [replace(b, fan_in=fi, fan_out=fo) for b in weight_blocks(m)]


def _block_dims(m: nn.Module, b: WeightBlock) -> tuple[int, int, int]:
    """(rows, cols, kernel positions) of one group of a block seen as an output-major matrix."""
    p = getattr(m, b.param)
    shape = tuple(int(s) for s in p.shape)
    if b.rows is not None:
        shape = (b.rows[1] - b.rows[0], *shape[1:])
    shape = (shape[0] // b.groups, *shape[1:])
    kernel = math.prod(shape[2:]) if len(shape) > 2 else 1
    n_out = shape[b.out_dim] if len(shape) > 1 else shape[0]
    n_other = (shape[1 - b.out_dim] if len(shape) > 1 else 1) * kernel
    return n_out, n_other, kernel


def _step(name: str, m: nn.Module, b: WeightBlock, spec: _Spec) -> InitStep:
    if spec.std is not None:
        std = spec.std(b.fan_in, b.fan_out)
    else:
        rows, cols, kernel = _block_dims(m, b)
        if spec.distribution == "delta_orthogonal" and kernel > 1:
            centre_rows, centre_cols = rows, cols // kernel
            std = spec.gain * math.sqrt(min(centre_rows, centre_cols) / (centre_rows * centre_cols * kernel))
        else:
            std = S.orthogonal_std(rows, cols, gain=spec.gain)
    return InitStep(
        layer=name,
        kind=type(m).__name__,
        param=b.param,
        rows=b.rows,
        fan_in=b.fan_in,
        fan_out=b.fan_out,
        scheme=spec.name,
        distribution=spec.distribution,
        std=float(std),
        groups=b.groups,
        out_dim=b.out_dim,
        gain=spec.gain,
    )


def _targets(m: object, fans: tuple[float, float] | None, what: str) -> list[tuple[str, nn.Module]]:
    m = _check_layer(m, what)
    if fans is not None:
        layers = list(weight_layers(m))
        if len(layers) > 1:
            raise SignalpropError(
                f"{what}: fans={fans!r} applies to one layer, but {type(m).__name__} holds {len(layers)} weight "
                "layers; call it per layer, or teach signalprop the layer type with register_fans"
            )
        return [("", m)] if not layers else layers
    layers = list(weight_layers(m, strict=True))
    if not layers:
        if _rule_for(m) is not None:  # a known layer type without its weight
            weight_blocks(m)
        raise SignalpropError(
            f"{what}: {type(m).__name__} has no weight layers to initialize (weight layers are Linear, "
            "Conv/ConvTranspose 1d/2d/3d, MultiheadAttention, Embedding, transformers' Conv1D and registered "
            "types); pass a layer or a model that contains some"
        )
    return layers


def _plan(
    m: object, spec: _Spec, fans: tuple[float, float] | None, what: str
) -> list[tuple[InitStep, nn.Module]]:
    """One step per weight block of every target layer; a tied weight is planned once (its first user)."""
    return _plan_layers(_targets(m, fans, what), spec, fans, what)


def _plan_layers(
    layers: list[tuple[str, nn.Module]], spec: _Spec, fans: tuple[float, float] | None, what: str
) -> list[tuple[InitStep, nn.Module]]:
    out: list[tuple[InitStep, nn.Module]] = []
    seen: set[tuple[int, tuple[int, int] | None]] = set()
    for name, layer in layers:
        try:
            blocks = _layer_blocks(layer, fans)
        except SignalpropError as exc:
            raise SignalpropError(f"{what}: layer {name or '<given>'!r}: {exc}") from None
        for b in blocks:
            p = getattr(layer, b.param)
            if not p.is_floating_point():
                raise SignalpropError(
                    f"{what}: layer {name or '<given>'!r} ({type(layer).__name__}) has a non-floating-point "
                    f"{b.param} (dtype {p.dtype}); initializers need float16/bfloat16/float32/float64"
                )
            fixed = _P.scale_fixed(layer, b.param)
            if fixed is not None:
                raise SignalpropError(f"{what}: layer {name or '<given>'!r}: {fixed}; no init sets its scale")
            key = (id(_P.storage(layer, b.param) if _P.is_parametrized(layer, b.param) else p), b.rows)
            if key in seen:
                continue
            seen.add(key)
            out.append((_step(name, layer, b, spec), layer))
    return out


def plan(model: nn.Module, scheme: str, *, fans: tuple[float, float] | None = None, **settings: Any) -> list[InitStep]:
    """The plan ``scheme`` would write into ``model``, as data; the model is not touched.

    Every check the initializer makes (layer types, activation, mode) happens here, so a plan that builds
    is a plan the initializer writes. A weight tied between layers is planned once, at its first user.

    Args:
        model: One layer or a whole model; every weight layer in it is planned.
        scheme: ``he`` (alias ``kaiming``), ``glorot`` (``xavier``), ``lecun``, ``variance_scaling``,
            ``orthogonal`` or ``delta_orthogonal``.
        fans: ``(fan_in, fan_out)`` overriding the fans of a single layer.
        **settings: That initializer's keywords (``mode``, ``nonlinearity``, ``distribution``, ``gain``,
            ``scale``).

    Returns:
        One :class:`InitStep` per weight block, in ``named_modules`` order.

    Raises:
        SignalpropError: An unknown scheme, setting or layer type.

    Examples:
        He et al. (2015): ``std = sqrt(2 / fan_in)`` for ReLU, here ``sqrt(2 / 512)``:

        >>> [round(s.std, 4) for s in plan(nn.Linear(512, 256), "he")]
        [0.0625]
        >>> [(s.layer, s.rows) for s in plan(nn.MultiheadAttention(16, 2), "he")]  # q, k, v; out_proj
        [('', (0, 16)), ('', (16, 32)), ('', (32, 48)), ('out_proj', None)]
    """
    spec = _make_spec(scheme, settings)
    return [step for step, _ in _plan(model, spec, fans, "plan")]


def target_std(layer: nn.Module, scheme: str, *, fans: tuple[float, float] | None = None, **settings: Any) -> float:
    """The standard deviation ``scheme`` would give ``layer``'s weight entries, without touching it.

    Args:
        layer: One weight layer.
        scheme: A scheme name, as for :func:`plan`.
        fans: ``(fan_in, fan_out)`` overriding the layer's fans.
        **settings: The initializer's keywords, as for :func:`plan`.

    Returns:
        The std of every weight block of ``layer`` (the formulas of :mod:`signalprop.init.schemes`).

    Raises:
        SignalpropError: The layer's blocks get different stds (use :func:`plan` to see each), or the
            layer type has no fan rule.

    Examples:
        He et al. (2015), ``std = sqrt(2 / fan_in)`` with the effective fan-in (a transposed convolution
        of stride 2 gathers half the taps PyTorch's shape rule counts):

        >>> round(target_std(nn.Conv2d(64, 128, 3), "he"), 5)  # sqrt(2 / (64 * 9))
        0.05893
        >>> round(target_std(nn.ConvTranspose2d(256, 128, 4, stride=2), "he"), 5)  # sqrt(2 / 1024)
        0.04419
    """
    _check_layer(layer, "target_std")
    if fans is None and not has_fan_rule(layer):
        weight_blocks(layer)  # raises the precise reason
    steps = [s for s in plan(layer, scheme, fans=fans, **settings) if s.layer == ""]
    stds = {round(s.std, 12) for s in steps}
    if len(stds) != 1:
        each = ", ".join(f"{s.param}{list(s.rows) if s.rows else ''}: {s.std:.4g}" for s in steps)
        raise SignalpropError(
            f"{type(layer).__name__}'s weight blocks get different stds under {scheme} ({each}); "
            "use signalprop.init.plan(layer, scheme) to see each"
        )
    return steps[0].std


# ---- writing ----------------------------------------------------------------------------------
def _write(
    steps: list[tuple[InitStep, nn.Module]],
    layers: list[nn.Module],
    generator: torch.Generator | None,
    zero_bias: bool,
    only: set[tuple[int, str]] | None = None,
) -> None:
    from ._dtensor import is_dtensor, shared_generator

    if generator is None and any(is_dtensor(getattr(layer, st.param)) for st, layer in steps):
        generator = shared_generator()
    by_param: dict[tuple[int, str], list[tuple[InitStep, nn.Module]]] = {}
    for st, layer in steps:
        by_param.setdefault((id(layer), st.param), []).append((st, layer))
    with torch.no_grad():
        for key, group in by_param.items():
            if only is not None and key not in only:
                continue
            layer = group[0][1]
            param = getattr(layer, key[1])
            if _P.is_parametrized(layer, key[1]):
                # the effective weight is drawn whole, then set through the parametrization's right_inverse
                dev = generator.device if generator is not None else param.device
                dtype = torch.float64 if param.dtype == torch.float64 else torch.float32
                full = param.detach().to(device=dev, dtype=dtype).clone()
                for st, _ in group:
                    _write_block(full[st.rows[0] : st.rows[1]] if st.rows is not None else full, st, generator)
                _P.assign_(layer, key[1], full, f"{group[0][0].scheme} init of layer {group[0][0].layer!r}")
                continue
            with S.writable(param, generator) as full:
                for st, _ in group:
                    view = full[st.rows[0] : st.rows[1]] if st.rows is not None else full
                    _write_block(view, st, generator)
        for layer in layers:
            _init_biases(layer, generator, zero_bias, only)


def _write_block(view: torch.Tensor, st: InitStep, generator: torch.Generator | None) -> None:
    if view.is_meta:
        return
    if st.distribution == "orthogonal":
        O.orthogonal_(view, gain=st.gain, groups=st.groups, out_dim=st.out_dim, generator=generator)
    elif st.distribution == "delta_orthogonal":
        O.delta_orthogonal_(view, gain=st.gain, groups=st.groups, out_dim=st.out_dim, generator=generator)
    else:
        S._sample(view, st.std, st.distribution, generator)


def _init_biases(
    layer: nn.Module,
    generator: torch.Generator | None,
    zero_bias: bool,
    only: set[tuple[int, str]] | None,
) -> None:
    for bname in bias_names(layer):
        b = layer._parameters[bname]
        assert b is not None
        if only is not None and (id(layer), bname) not in only:
            continue
        if zero_bias:
            with S.writable(b, generator) as full:
                if not full.is_meta:
                    full.zero_()
        elif only is not None:
            # A freshly materialized bias has no values yet: PyTorch's default, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            # (an RNN's: U(-1/sqrt(hidden_size), 1/sqrt(hidden_size))).
            fan_in = int(layer.hidden_size) if isinstance(layer, nn.RNNBase) else weight_blocks(layer)[0].fan_in
            with S.writable(b, generator) as full:
                S._sample(full, 1.0 / math.sqrt(3.0 * fan_in), "uniform", generator)


def _run(
    m: M,
    scheme: str,
    settings: dict[str, Any],
    *,
    zero_bias: bool,
    fans: tuple[float, float] | None,
    generator: torch.Generator | None,
) -> M:
    """Initialize every weight layer of ``m`` by ``scheme``; errors name the public function ``{scheme}_``."""
    what = f"{scheme}_"
    if generator is not None and not isinstance(generator, torch.Generator):
        raise SignalpropError(f"{what}: generator must be a torch.Generator, got {type(generator).__name__}")
    spec = _make_spec(scheme, settings)
    layers = _targets(m, fans, what)
    steps = _plan_layers(layers, spec, fans, what)
    _write(steps, [layer for _, layer in layers], generator, zero_bias)
    return m


def _constant(std: float) -> Callable[[float, float], float]:
    return lambda fan_in, fan_out: std


def draw_std_(
    layer: nn.Module,
    std: float,
    *,
    distribution: str = "normal",
    generator: torch.Generator | None = None,
    zero_bias: bool = True,
    fan_in: float | None = None,
) -> nn.Module:
    """Give every weight block of ``layer`` entries of standard deviation ``std`` (the fix planner's writer).

    ``distribution``: normal, uniform, truncated_normal, or orthogonal: a Haar-orthogonal matrix (Saxe et al.
    2014) scaled so its mean square entry is ``std^2`` (gain ``std * sqrt(max(rows, cols))``), which gives the
    same pre-activation variance ``fan_in * std^2 * E[x^2]`` as a normal draw, without the normal draw's
    spread of singular values. With ``fan_in``, ``std`` is meant for a block of that fan-in and a block of
    another fan-in gets ``std * sqrt(fan_in / its fan_in)`` (attention's k and v with their own kdim, vdim).
    Goes through a parametrization like every initializer here.

    Args:
        layer: One weight layer.
        std: The entries' standard deviation, positive and finite.
        distribution: ``normal``, ``uniform``, ``truncated_normal`` or ``orthogonal``.
        generator: The random generator to draw from.
        zero_bias: Zero the biases.
        fan_in: The fan-in ``std`` is meant for, when the layer's blocks differ in fan-in.

    Returns:
        ``layer``, drawn in place.

    Raises:
        SignalpropError: A non-positive or non-finite std, or a parametrization that fixes the scale.

    Examples:
        An orthogonal draw has exactly the root mean square entry asked for:

        >>> layer = draw_std_(nn.Linear(256, 128), 0.05, distribution="orthogonal",
        ...                   generator=torch.Generator().manual_seed(0))
        >>> round(float(layer.weight.detach().pow(2).mean().sqrt()), 6)
        0.05
    """
    if not (math.isfinite(std) and std > 0):
        raise SignalpropError(f"draw_std_ needs a positive finite std, got {std!r}")
    steps = []
    for b in weight_blocks(layer):
        fixed = _P.scale_fixed(layer, b.param)
        if fixed is not None:
            raise SignalpropError(f"{type(layer).__name__}: {fixed}; no init sets its scale")
        sb = std * math.sqrt(fan_in / b.fan_in) if fan_in is not None and math.isfinite(fan_in) else std
        if distribution == "orthogonal":
            rows, cols, _ = _block_dims(layer, b)
            spec = _Spec("orthogonal", "orthogonal", gain=sb * math.sqrt(max(rows, cols)))
        else:
            spec = _Spec("std", _dist(distribution), _constant(sb))
        steps.append((_step("", layer, b, spec), layer))
    _write(steps, [layer], generator, zero_bias)
    return layer


# ---- public initializers ----------------------------------------------------------------------
