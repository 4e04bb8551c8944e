"""Mean-field signal propagation, framework-free (no hooks, no modules of the user's model).

Everything here is a Gaussian expectation E[f(z)], z ~ N(0, 1), computed by quadrature. Activations have
their kinks at 0 (ReLU, leaky ReLU, ELU, SELU, ...), where Gauss-Hermite converges only algebraically, so the
rule is Gauss-Legendre on panels of each half-line [0, 12] with the Gaussian weight folded in: a kink at 0 is a
panel border and integrates to float64 round-off (E[relu(z)^2] = 1/2 to 1e-15).

References: He et al. 2015 (gain, variance product); Poole et al. 2016 (q-map, c-map, chi1, order-to-chaos);
Schoenholz et al. 2017 (depth scales xi_q, xi_c); Hanin & Nica 2019 (finite-width kurtosis factor).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from ._errors import SignalpropError

ActLike = str | Callable[[torch.Tensor], torch.Tensor] | nn.Module | None

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "identity": lambda x: x,
    "relu": torch.relu,
    "leaky_relu": lambda x: torch.nn.functional.leaky_relu(x, 0.01),
    "relu6": torch.nn.functional.relu6,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "swish": torch.nn.functional.silu,
    "mish": torch.nn.functional.mish,
    "elu": torch.nn.functional.elu,
    "selu": torch.nn.functional.selu,
    "celu": torch.nn.functional.celu,
    "softplus": torch.nn.functional.softplus,
    "softsign": torch.nn.functional.softsign,
    "hardtanh": torch.nn.functional.hardtanh,
    "hardswish": torch.nn.functional.hardswish,
    "erf": torch.erf,
    "sin": torch.sin,
}
"""Activation name -> float64 tensor function. Adding one is one line (dks' ``_ACTIVATION_TABLE`` habit)."""

_F = torch.nn.functional
_PARAMETERS: dict[str, tuple[tuple[str, float], ...]] = {
    "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),),
    "celu": (("alpha", 1.0),),
    "softplus": (("beta", 1.0), ("threshold", 20.0)),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
}
"""Activations a name can carry parameters for, ``leaky_relu(0.2)`` or ``hardtanh(min_val=-2, max_val=2)``:
name -> (parameter, default) in the order of the ``torch.nn.functional`` call. :func:`activation_name`
writes a module with other than the defaults in this form, and :func:`resolve` reads it back."""

_WITH_PARAMETERS: dict[str, Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = {
    "leaky_relu": lambda a: lambda x: _F.leaky_relu(x, a),
    "elu": lambda a: lambda x: _F.elu(x, a),
    "celu": lambda a: lambda x: _F.celu(x, a),
    "softplus": lambda b, t: lambda x: _F.softplus(x, b, t),
    "hardtanh": lambda lo, hi: lambda x: _F.hardtanh(x, lo, hi),
}

# nn.Module class name -> registry name, for modules whose parameters do not change the function.
_MODULE_NAMES: dict[str, str] = {
    "Identity": "linear",
    "ReLU": "relu",
    "ReLU6": "relu6",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "SiLU": "silu",
    "Mish": "mish",
    "SELU": "selu",
    "Softsign": "softsign",
    "Hardswish": "hardswish",
    "Softplus": "softplus",
    "GELU": "gelu",
    "ELU": "elu",
    "CELU": "celu",
    "LeakyReLU": "leaky_relu",
    "Hardtanh": "hardtanh",
    "PReLU": "leaky_relu",
    # transformers' activation classes
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "silu",
    "SiLUActivation": "silu",
    "ReLUSquaredActivation": "relu",
}

# PyTorch's torch.nn.init.calculate_gain convention, for side-by-side documentation.
_TORCH_GAIN: dict[str, float] = {
    "linear": 1.0,
    "identity": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
    "selu": 3.0 / 4.0,
}


def known_activations() -> list[str]:
    """The activation names :func:`resolve` accepts."""
    return sorted(_ACTIVATIONS)


def resolve(act: ActLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float64 tensor function for ``act``: a name, a tensor callable, or an ``nn.Module`` instance.

    Module parameters are honoured (``LeakyReLU(0.2)``, ``ELU(alpha=0.5)``, ``GELU(approximate="tanh")``);
    the module's forward is called directly, so its hooks are never triggered and it is never changed.
    """
    if act is None:
        return _ACTIVATIONS["linear"]
    if isinstance(act, str):
        key, params = parse_name(act)
        if params is None:
            return _ACTIVATIONS[key]
        return _WITH_PARAMETERS[key](*params)
    if isinstance(act, nn.Module):
        return _module_fn(act)
    if callable(act):
        return act
    raise SignalpropError(
        f"cannot use {type(act).__name__} as an activation: pass a name ({', '.join(known_activations())}), "
        "a tensor function, or an nn.Module instance such as nn.LeakyReLU(0.2)"
    )


def parse_name(act: str) -> tuple[str, tuple[float, ...] | None]:
    """``"leaky_relu(0.2)"`` -> ``("leaky_relu", (0.2,))``; ``"Tanh"`` -> ``("tanh", None)``.

    The name is case-blind and takes ``-`` for ``_``; the parameters of the names in :data:`_PARAMETERS` are
    numbers, by position or by keyword, the rest taking their defaults. Raises :class:`SignalpropError`
    naming what is wrong: an unknown name, parameters on a name that takes none, a bad value.
    """
    text = act.strip()
    head, paren, rest = text.partition("(")
    key = head.strip().lower().replace("-", "_")
    if key not in _ACTIVATIONS:
        raise SignalpropError(
            f"unknown activation {act!r}; known names are: {', '.join(known_activations())}, and with "
            f"parameters {_forms()}. You can also pass a tensor function (torch.tanh, lambda x: ...) or an "
            "nn.Module instance."
        )
    if not paren:
        return key, None
    if key not in _PARAMETERS:
        raise SignalpropError(f"activation {key!r} takes no parameters, got {act!r}; names with parameters: {_forms()}")
    spec = _PARAMETERS[key]
    example = f"{key}({', '.join(_number(d) for _, d in spec)})"
    try:
        call = ast.parse(f"_({rest}", mode="eval").body
        assert isinstance(call, ast.Call)
        given = [ast.literal_eval(a) for a in call.args]
        named = {str(k.arg): ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, AssertionError):
        raise SignalpropError(f"bad activation {act!r}: write numbers in the parentheses, e.g. {example}") from None
    names = [n for n, _ in spec]
    unknown = sorted(set(named) - set(names)) if None not in named else ["**"]
    if len(given) > len(spec) or unknown or any(n in named for n in names[: len(given)]):
        raise SignalpropError(
            f"bad activation {act!r}: {key} takes {', '.join(names)} (by position or keyword), e.g. {example}"
        )
    values = [*given, *(named.get(n, d) for n, d in spec[len(given):])]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise SignalpropError(f"bad activation {act!r}: the parameters must be finite numbers, e.g. {example}")
    params = tuple(float(v) for v in values)
    try:
        _WITH_PARAMETERS[key](*params)(torch.zeros(1, dtype=torch.float64))
    except (RuntimeError, ValueError) as exc:  # torch's own check, e.g. celu's alpha = 0
        raise SignalpropError(f"bad activation {act!r}: {str(exc).strip().splitlines()[0]}") from None
    if key == "hardtanh" and not params[0] < params[1]:
        raise SignalpropError(f"bad activation {act!r}: hardtanh needs min_val < max_val, e.g. {example}")
    return key, params


def _forms() -> str:
    return ", ".join(f"{k}({', '.join(n for n, _ in spec)})" for k, spec in _PARAMETERS.items())


def _number(x: float) -> str:
    """The shortest text that reads back as exactly ``x``: 0.2, 1e-05, 0.123456789."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def _with(key: str, *params: float) -> str:
    """``key`` with its parameters, ``leaky_relu(0.2)``, trailing defaults left out; ``key`` alone at defaults."""
    defaults = [d for _, d in _PARAMETERS[key]]
    values = list(params)
    if key != "leaky_relu":  # leaky_relu keeps its slope in the name, the one number users look for
        while values and values[-1] == defaults[len(values) - 1]:
            values.pop()
    return f"{key}({', '.join(_number(v) for v in values)})" if values else key


def _module_fn(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    cls = type(m).__name__
    if cls == "LeakyReLU":
        slope = float(getattr(m, "negative_slope", 0.01))
        return lambda x: torch.nn.functional.leaky_relu(x, slope)
    if cls == "PReLU":
        slope = _prelu_slope(m)
        return lambda x: torch.nn.functional.leaky_relu(x, slope)
    if isinstance(m, nn.ELU):
        alpha = float(m.alpha)
        return lambda x: torch.nn.functional.elu(x, alpha)
    if isinstance(m, nn.GELU):
        approx = m.approximate
        return lambda x: torch.nn.functional.gelu(x, approximate=approx)
    if isinstance(m, nn.Softplus):
        beta, threshold = float(m.beta), float(m.threshold)
        return lambda x: torch.nn.functional.softplus(x, beta, threshold)
    if isinstance(m, nn.Hardtanh):
        lo, hi = float(m.min_val), float(m.max_val)
        return lambda x: torch.nn.functional.hardtanh(x, lo, hi)

    def call(x: torch.Tensor) -> torch.Tensor:
        try:
            return m.forward(x)
        except RuntimeError:  # a module whose parameters are float32 only
            return m.forward(x.float()).double()

    return call


def _prelu_slope(m: nn.Module) -> float:
    """A PReLU's slope: the mean of its learned slopes (one per channel, or one shared)."""
    weight = m.weight
    assert isinstance(weight, torch.Tensor)
    w = weight.detach().to(torch.float64).flatten()
    return float(w.mean()) if w.numel() else 0.25


def activation_name(act: ActLike) -> str:
    """A short human name for ``act`` ("relu", "leaky_relu(0.2)", "tanh", "<lambda>", ...).

    Every name it gives a known activation, parameters included (``nn.ELU(0.5)`` -> ``"elu(0.5)"``,
    ``nn.PReLU()`` -> ``"leaky_relu(0.25)"``), is one :func:`resolve` and :func:`gain` accept, for the same
    function. Names are canonical: ``"Leaky-ReLU( 0.20 )"`` -> ``"leaky_relu(0.2)"``.
    """
    if act is None:
        return "linear"
    if isinstance(act, str):
        try:
            key, params = parse_name(act)
        except SignalpropError:
            return act.lower()
        return key if params is None else f"{key}({', '.join(_number(p) for p in params)})"
    if isinstance(act, nn.Module):
        cls = type(act).__name__
        base = _MODULE_NAMES.get(cls, cls)
        if isinstance(act, nn.LeakyReLU):
            return _with("leaky_relu", float(act.negative_slope))
        if cls == "PReLU":  # its slopes are learned float32 values: the shortest text of the float32 mean
            return _with("leaky_relu", float(str(np.float32(_prelu_slope(act)))))
        if isinstance(act, nn.ELU):
            return _with("elu", float(act.alpha))
        if isinstance(act, nn.CELU):
            return _with("celu", float(act.alpha))
        if isinstance(act, nn.Softplus):
            return _with("softplus", float(act.beta), float(act.threshold))
        if cls == "Hardtanh" and isinstance(act, nn.Hardtanh):  # not its subclass ReLU6 (relu6)
            return _with("hardtanh", float(act.min_val), float(act.max_val))
        if isinstance(act, nn.GELU) and act.approximate == "tanh":
            return "gelu_tanh"
        return base
    for name, fn in _ACTIVATIONS.items():
        if fn is act:
            return name
    return getattr(act, "__name__", type(act).__name__)


def activation_key(m: nn.Module) -> str | None:
    """The registry name of an activation module, or None when ``m`` is not a known activation."""
    return _MODULE_NAMES.get(type(m).__name__)


# ---- quadrature ---------------------------------------------------------------------------------
@lru_cache(maxsize=8)
def _rule(panels: int, order: int, half_width: float = 12.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights for E[f(z)], z ~ N(0,1): Gauss-Legendre on ``panels`` panels per half-line."""
    x, w = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(0.0, half_width, panels + 1)
    a, b = edges[:-1, None], edges[1:, None]
    nodes = ((b - a) / 2 * x + (a + b) / 2).ravel()
    weights = ((b - a) / 2 * w).ravel() * np.exp(-(nodes**2) / 2) / math.sqrt(2 * math.pi)
    z = np.concatenate([-nodes[::-1], nodes])
    wz = np.concatenate([weights[::-1], weights])
    return torch.from_numpy(z), torch.from_numpy(wz)


def gauss_nodes(fine: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadrature nodes z and weights w with sum(w * f(z)) ~ E[f(z)], z ~ N(0,1) (float64)."""
    return _rule(24, 16) if fine else _rule(12, 10)


def expect(f: Callable[[torch.Tensor], torch.Tensor], *, fine: bool = True) -> float:
    """E[f(z)] for z ~ N(0, 1)."""
    z, w = gauss_nodes(fine)
    with torch.no_grad():
        return float((w * f(z)).sum())


def _as_q(q: Any) -> tuple[torch.Tensor, bool]:
    arr = torch.as_tensor(np.asarray(q, dtype=np.float64))
    return arr.reshape(-1), arr.ndim == 0


def _moment(act: ActLike, q: Any, power: int) -> Any:
    """E[phi(sqrt(q) z)^power], vectorized over q."""
    fn = resolve(act)
    qs, scalar = _as_q(q)
    z, w = gauss_nodes()
    with torch.no_grad():
        vals = fn(torch.sqrt(qs.clamp_min(0))[:, None] * z[None, :]) ** power
        out = (vals * w).sum(-1).numpy()
    return float(out[0]) if scalar else out


def second_moment(act: ActLike, q: Any = 1.0) -> Any:
    """E[phi(sqrt(q) z)^2], z ~ N(0,1): the factor a layer passes on (He et al. 2015, Eq. 7 uses 1/2 for ReLU)."""
    return _moment(act, q, 2)


def mean_act(act: ActLike, q: Any = 1.0) -> Any:
    """E[phi(sqrt(q) z)]: the mean an activation adds (ReLU: sqrt(q / 2 pi))."""
    return _moment(act, q, 1)


def gain(act: ActLike) -> float:
    """He's gain 1/sqrt(E[act(z)^2]), z ~ N(0,1): a weight std of gain/sqrt(fan_in) keeps E[y^2] steady.

    relu -> sqrt(2) (He et al. 2015), linear -> 1, tanh -> 1.5925 (PyTorch's ``calculate_gain`` says
    5/3, a heuristic from LeCun et al. 1998 that targets a fixed point, not the second moment).

    >>> round(gain("relu"), 6)
    1.414214
    """
    m2 = second_moment(act, 1.0)
    if not m2 > 0 or not math.isfinite(m2):
        raise SignalpropError(
            f"activation {activation_name(act)} has E[act(z)^2] = {m2!r} for z ~ N(0,1); a gain needs a "
            "positive finite second moment"
        )
    return 1.0 / math.sqrt(m2)


def torch_gain(act: ActLike) -> float | None:
    """PyTorch's ``calculate_gain`` value for ``act`` (None where PyTorch has no entry), for comparison."""
    if isinstance(act, nn.LeakyReLU):
        return math.sqrt(2.0 / (1 + act.negative_slope**2))
    name = activation_name(act)
    try:
        key, params = parse_name(name)
    except SignalpropError:
        return None
    if key == "leaky_relu":
        slope = params[0] if params else 0.01
        return math.sqrt(2.0 / (1 + slope**2))
    return None if params else _TORCH_GAIN.get(key)


def kurtosis_factor(act: ActLike, q: float = 1.0) -> float:
    """beta = E[phi^4] / E[phi^2]^2 - 1: the relative variance one layer's random weights add per unit.

    One layer of width n multiplies the signal's variance by a random factor of relative variance beta/n
    (Hanin 2018; Hanin & Nica 2019). ReLU: 5; identity (a Gaussian input): 2.
    """
    m2 = _moment(act, q, 2)
    m4 = _moment(act, q, 4)
    return float(m4 / (m2 * m2) - 1.0)


# ---- derivatives ----------------------------------------------------------------------------------
def _derivs(act: ActLike, x: torch.Tensor, order: int = 1) -> list[torch.Tensor]:
    """phi(x), phi'(x) (and phi''(x) when order == 2), elementwise, by autograd."""
    fn = resolve(act)
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        y = fn(xg)
        (d1,) = torch.autograd.grad(y.sum(), xg, create_graph=order > 1, allow_unused=True)
        if d1 is None:
            d1 = torch.zeros_like(xg)
        out = [y.detach(), d1.detach()]
        if order > 1:
            if d1.requires_grad:
                (d2,) = torch.autograd.grad(d1.sum(), xg, allow_unused=True)
                out.append(d2.detach() if d2 is not None else torch.zeros_like(xg))
            else:
                out.append(torch.zeros_like(xg))
    return out


def deriv_second_moment(act: ActLike, q: Any = 1.0) -> Any:
    """E[phi'(sqrt(q) z)^2]: the factor a layer passes on to gradients (times weight variance)."""
    qs, scalar = _as_q(q)
    z, w = gauss_nodes()
    x = torch.sqrt(qs.clamp_min(_Q_FLOOR))[:, None] * z[None, :]
    _, d1 = _derivs(act, x)
    out = ((d1**2) * w).sum(-1).numpy()
    return float(out[0]) if scalar else out


def _bracket_root(f: Callable[[float], float], a: float, b: float, *, tol: float = 1e-13) -> float:
    """A root of f in [a, b] (f(a), f(b) of opposite sign): Illinois regula falsi, about 10 evaluations."""
    fa, fb = f(a), f(b)
    side = 0
    for _ in range(100):
        if fa == fb:
            break
        c = (a * fb - b * fa) / (fb - fa)
        fc = f(c)
        if fc == 0 or abs(b - a) <= tol * max(1.0, abs(c)):
            return c
        if (fc > 0) == (fb > 0):
            b, fb = c, fc
            if side == -1:
                fa /= 2
            side = -1
        else:
            a, fa = c, fc
            if side == 1:
                fb /= 2
            side = 1
    return (a + b) / 2


# ---- mean-field maps (Poole et al. 2016) ----------------------------------------------------------
_Q_FLOOR = 1e-12  # q* -> 0 limits are taken at this q (ReLU's chi1 = w/2 at every q, tanh's -> w)


def qmap(act: ActLike, q: Any, *, weight_var: float, bias_var: float = 0.0) -> Any:
    """The length map q_{l+1} = weight_var * E[phi(sqrt(q_l) z)^2] + bias_var (Poole et al. 2016, Eq. 3).

    ``q`` is a pre-activation variance (a float or an array); ReLU at weight_var 2 keeps every q.
    """
    return weight_var * second_moment(act, q) + bias_var


def fixed_point(
    act: ActLike,
    *,
    weight_var: float,
    bias_var: float = 0.0,
    q0: float = 1.0,
) -> float:
    """The stable fixed point q* of :func:`qmap` that iterating from ``q0`` reaches.

    Found without iterating: r(q) = qmap(q)/q - 1 on a log grid of q in [1e-14, 1e14] (one vectorized
    quadrature), then bisection in log q on the first sign change in the direction r(q0) points.
    Returns ``inf`` when q grows without bound (ReLU above weight_var 2), 0 when it dies out (tanh below
    weight_var 1 at bias 0), and ``q0`` when the map is the identity (ReLU at weight_var 2, bias 0).
    """

    def r(q: Any) -> Any:
        return qmap(act, q, weight_var=weight_var, bias_var=bias_var) / q - 1.0

    grid = np.unique(np.concatenate([np.logspace(-14, 14, 141), [float(q0)]]))
    rs = np.asarray(r(grid), dtype=np.float64)
    if np.all(np.abs(rs) < 1e-9):
        return float(q0)
    i0 = int(np.searchsorted(grid, q0))
    if abs(rs[i0]) < 1e-12:
        return float(q0)
    if rs[i0] > 0:
        above = np.nonzero(rs[i0:] <= 0)[0]
        if above.size == 0:
            return math.inf
        j = i0 + int(above[0])
        lo, hi = grid[j - 1], grid[j]
    else:
        below = np.nonzero(rs[: i0 + 1] >= 0)[0]
        if below.size == 0:
            return 0.0
        j = int(below[-1])
        lo, hi = grid[j], grid[j + 1]
    return math.exp(_bracket_root(lambda t: float(r(math.exp(t))), math.log(lo), math.log(hi)))


def chi1(act: ActLike, *, weight_var: float, bias_var: float = 0.0, q: float | None = None) -> float:
    """chi1 = weight_var * E[phi'(sqrt(q*) z)^2]: the per-layer gradient gain (Poole et al. 2016, Eq. 9).

    chi1 < 1 is the ordered phase (gradients vanish), > 1 the chaotic one (they explode); ReLU: weight_var/2.
    ``q`` overrides the fixed point (use the actual pre-activation variance of a finite-depth net).
    """
    if q is None:
        q = fixed_point(act, weight_var=weight_var, bias_var=bias_var)
        if not math.isfinite(q):
            q = 1.0  # scale-free activations (ReLU family) have the same chi1 at every q
    return float(weight_var * deriv_second_moment(act, q))


def critical_weight_var(act: ActLike, *, bias_var: float = 0.0, lo: float = 1e-3, hi: float = 1e3) -> float:
    """The weight variance on the order-to-chaos line chi1 = 1 at this bias variance (bisection in log space).

    ReLU: 2 at bias_var 0 (He's init); tanh: 1 at bias_var 0, about 1.76 at bias_var 0.05.

    At bias_var 0, an activation with phi(0) = 0 whose q-map dies out at the critical point (tanh, erf, sin,
    ELU, SELU, ...) has q* = 0 there, where chi1 = weight_var * E[phi'(0)^2]: the critical weight variance
    is 1 / E[phi'(0)^2] exactly (tanh: 1, erf: pi/4; Poole et al. 2016, Sec. 3), returned as such. A root
    search could only approach it: chi1 - 1 touches 0 there without crossing fast, so bisection stops about
    1e-8 above it, where the q-map has a spurious fixed point q* ~ 1e-8 instead of 0.
    """
    if bias_var == 0.0:
        wv0 = _ordered_edge(act)
        if wv0 is not None and lo <= wv0 <= hi:
            return wv0

    def f(wv: float) -> float:
        return chi1(act, weight_var=wv, bias_var=bias_var) - 1.0

    flo, fhi = f(lo), f(hi)
    if flo > 0 or fhi < 0:
        raise SignalpropError(
            f"no weight variance in [{lo:g}, {hi:g}] puts {activation_name(act)} at chi1 = 1 with bias_var "
            f"{bias_var:g} (chi1 ranges {flo + 1:.3g} .. {fhi + 1:.3g}); try a smaller bias variance"
        )
    return math.exp(_bracket_root(lambda t: f(math.exp(t)), math.log(lo), math.log(hi)))


def _ordered_edge(act: ActLike) -> float | None:
    """1 / E[phi'(0)^2] (the mean of the one-sided slopes' squares at 0) when phi(0) = 0 and, at that weight
    variance and no bias, the q-map still shrinks every q to 0; else None (ReLU's map keeps every q,
    GELU's grows)."""
    x = torch.tensor([-1e-150, 0.0, 1e-150], dtype=torch.float64)
    phi, d1 = _derivs(act, x)
    if float(phi[1]) != 0.0:
        return None
    slope2 = float((d1[0] ** 2 + d1[2] ** 2) / 2)
    if not (slope2 > 0 and math.isfinite(slope2)):
        return None
    wv = 1.0 / slope2
    return wv if fixed_point(act, weight_var=wv) == 0.0 else None


def _pair_rule() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z, w = gauss_nodes(fine=False)
    z1, z2 = torch.meshgrid(z, z, indexing="ij")
    return z1.reshape(-1), z2.reshape(-1), (w[:, None] * w[None, :]).reshape(-1)


def _pair_expect(act: ActLike, q: float, c: Any, deriv: bool) -> Any:
    """E[g(u1) g(u2)] with u1, u2 ~ N(0, q) of correlation c; g = phi or phi' (vectorized over c)."""
    cs, scalar = _as_q(c)
    cs = cs.clamp(-1.0, 1.0)[:, None]
    z1, z2, w = _pair_rule()
    sq = math.sqrt(max(q, _Q_FLOOR))
    u1 = sq * z1
    u2 = sq * (cs * z1 + torch.sqrt((1 - cs * cs).clamp_min(0.0)) * z2)
    if deriv:
        g1, g2 = _derivs(act, u1)[1], _derivs(act, u2)[1]
    else:
        fn = resolve(act)
        with torch.no_grad():
            g1, g2 = fn(u1), fn(u2)
    arr = (w * g1 * g2).sum(-1).numpy()
    return float(arr[0]) if scalar else arr


def _usable_q(act: ActLike, weight_var: float, bias_var: float) -> float:
    """q* where it is finite and positive, else 1 (scale-free activations: the c-map does not depend on q)."""
    q = fixed_point(act, weight_var=weight_var, bias_var=bias_var)
    return q if math.isfinite(q) and q > 0 else 1.0


def cmap(act: ActLike, c: Any, *, weight_var: float, bias_var: float = 0.0, q: float | None = None) -> Any:
    """The correlation map c_{l+1} = (weight_var * E[phi(u1) phi(u2)] + bias_var) / q* (Poole et al. 2016).

    u1, u2 are N(0, q*) with correlation c; vectorized over c. At c = 1 it returns 1.
    """
    if q is None:
        q = _usable_q(act, weight_var, bias_var)
    qq = float(qmap(act, q, weight_var=weight_var, bias_var=bias_var))
    num = weight_var * _pair_expect(act, q, c, deriv=False) + bias_var
    return num / qq


def c_fixed_point(
    act: ActLike, *, weight_var: float, bias_var: float = 0.0, q: float | None = None
) -> float:
    """The stable fixed point c* of :func:`cmap` below 1 (chaotic phase), or 1 (ordered phase).

    cmap(c) - c is evaluated on a grid of c (one vectorized quadrature); the largest sign change from
    + to - below 1 is refined by bisection.
    """
    if q is None:
        q = _usable_q(act, weight_var, bias_var)
    grid = np.linspace(-0.99, 0.9999, 60)
    d = np.asarray(cmap(act, grid, weight_var=weight_var, bias_var=bias_var, q=q)) - grid
    cross = np.nonzero((d[:-1] > 0) & (d[1:] <= 0))[0]
    if cross.size == 0:
        return 1.0
    j = int(cross[-1])
    return _bracket_root(
        lambda c: float(cmap(act, c, weight_var=weight_var, bias_var=bias_var, q=q)) - c, grid[j], grid[j + 1]
    )


def depth_scales(act: ActLike, *, weight_var: float, bias_var: float = 0.0) -> tuple[float, float]:
    """(xi_q, xi_c): how many layers the length and the correlation take to settle (Schoenholz et al. 2017).

    xi_q^-1 = -log(chi1 + weight_var * E[phi''(u) phi(u)]) and xi_c^-1 = -log(chi_c), with
    chi_c = weight_var * E[phi'(u1) phi'(u2)] at the correlation fixed point c*. xi_c diverges (inf) on the
    critical line chi1 = 1; deep signal propagation is possible for about 6 xi_c layers.
    """
    q = fixed_point(act, weight_var=weight_var, bias_var=bias_var)
    if not math.isfinite(q) or q <= 0:
        q = _Q_FLOOR if q <= 0 else 1.0
    z, w = gauss_nodes()
    u = math.sqrt(max(q, _Q_FLOOR)) * z
    phi, d1, d2 = _derivs(act, u, order=2)
    c1 = float(weight_var * (w * d1**2).sum())
    tq = c1 + float(weight_var * (w * d2 * phi).sum())
    c_star = c_fixed_point(act, weight_var=weight_var, bias_var=bias_var, q=q)
    chi_c = float(weight_var * _pair_expect(act, q, c_star, deriv=True)) if c_star < 1 - 1e-6 else c1

    def scale(t: float) -> float:
        if t <= 0:
            return 0.0
        if abs(math.log(t)) < 1e-9:
            return math.inf
        return -1.0 / math.log(t) if t < 1 else math.inf

    return scale(tq), scale(chi_c)
