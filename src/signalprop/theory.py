"""Mean-field signal propagation, framework-free (no hooks, no modules of the user's model).

Everything here is a Gaussian expectation E[f(z)], z ~ N(0, 1), computed by quadrature. Activations have
their kinks at 0 (ReLU, leaky ReLU, ELU, SELU, ...), where Gauss-Hermite converges only algebraically, so the
rule is Gauss-Legendre on panels of each half-line [0, 12] with the Gaussian weight folded in: a kink at 0 is a
panel border and integrates to float64 round-off (E[relu(z)^2] = 1/2 to 1e-15).

References: He et al. 2015 (gain, variance product); Poole et al. 2016 (q-map, c-map, chi1, order-to-chaos);
Schoenholz et al. 2017 (depth scales xi_q, xi_c); Hanin & Nica 2019 (finite-width kurtosis factor).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from ._errors import SignalpropError

# signalprop.activations' public names are sp.theory's too; graph and diagnosis read its tables from here.
from .activations import _MODULE_NAMES as _MODULE_NAMES
from .activations import _PARAMETERS as _PARAMETERS
from .activations import _TORCH_GAIN
from .activations import ActLike as ActLike
from .activations import activation_key as activation_key
from .activations import activation_name as activation_name
from .activations import known_activations as known_activations
from .activations import parse_name as parse_name
from .activations import resolve as resolve


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
    """Quadrature nodes z and weights w with sum(w * f(z)) ~ E[f(z)], z ~ N(0,1) (float64).

    Args:
        fine: 24 panels of 16 nodes per half-line (768 nodes) when True, else 12 of 10 (240 nodes), the
            rule the two-dimensional expectations of :func:`cmap` use on each axis.

    Returns:
        ``(z, w)``, two float64 tensors of the same length; the weights sum to 1.

    Examples:
        >>> z, w = gauss_nodes()
        >>> len(z), round(float(w.sum()), 12), round(float((w * z**4).sum()), 12)
        (768, 1.0, 3.0)
    """
    return _rule(24, 16) if fine else _rule(12, 10)


def expect(f: Callable[[torch.Tensor], torch.Tensor], *, fine: bool = True) -> float:
    """E[f(z)] for z ~ N(0, 1), by the quadrature of :func:`gauss_nodes`.

    Args:
        f: A float64 tensor function, applied elementwise to the nodes.
        fine: Use the fine rule (768 nodes) or the coarse one (240).

    Returns:
        The expectation as a float.

    Examples:
        >>> round(expect(lambda z: z**2), 12), round(expect(torch.relu), 6)  # 1, 1/sqrt(2 pi)
        (1.0, 0.398942)
    """
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
    """E[phi(sqrt(q) z)^2], z ~ N(0,1): the factor a layer passes on (He et al. 2015, Eq. 7 uses 1/2 for ReLU).

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        q: The pre-activation variance, a float or an array of them.

    Returns:
        A float for a scalar ``q``, else a float64 array of ``q``'s shape, flattened.

    Examples:
        >>> second_moment("relu"), second_moment("relu", [1.0, 4.0]).tolist()
        (0.5, [0.5, 2.0])
    """
    return _moment(act, q, 2)


def mean_act(act: ActLike, q: Any = 1.0) -> Any:
    """E[phi(sqrt(q) z)], z ~ N(0,1): the mean an activation adds (ReLU: sqrt(q / 2 pi)).

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        q: The pre-activation variance, a float or an array of them.

    Returns:
        A float for a scalar ``q``, else a float64 array.

    Examples:
        >>> round(mean_act("relu", 2 * math.pi), 12)
        1.0
    """
    return _moment(act, q, 1)


def gain(act: ActLike) -> float:
    """He's gain 1/sqrt(E[act(z)^2]), z ~ N(0,1): a weight std of gain/sqrt(fan_in) keeps E[y^2] steady.

    relu -> sqrt(2) (He et al. 2015), linear -> 1, tanh -> 1.5925 (PyTorch's ``calculate_gain`` says
    5/3, a heuristic from LeCun et al. 1998 that targets a fixed point, not the second moment).

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).

    Returns:
        1 / sqrt(:func:`second_moment` (act, 1)).

    Raises:
        SignalpropError: The activation's second moment is zero or not finite.

    Examples:
        >>> round(gain("relu"), 6), round(gain("tanh"), 4), round(gain("linear"), 4)
        (1.414214, 1.5925, 1.0)
    """
    m2 = second_moment(act, 1.0)
    if not m2 > 0 or not math.isfinite(m2):
        raise SignalpropError(
            f"activation {activation_name(act)} has E[act(z)^2] = {m2!r} for z ~ N(0,1); a gain needs a "
            "positive finite second moment"
        )
    return 1.0 / math.sqrt(m2)


def torch_gain(act: ActLike) -> float | None:
    """PyTorch's ``calculate_gain`` value for ``act`` (None where PyTorch has no entry), for comparison.

    PyTorch's table: linear, identity and sigmoid 1, tanh 5/3, relu sqrt(2), selu 3/4, leaky ReLU
    sqrt(2 / (1 + slope^2)); :func:`gain` computes the value from the activation instead.

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).

    Returns:
        The table's value, or None for an activation PyTorch does not list (GELU, SiLU, ...).

    Examples:
        >>> round(torch_gain("tanh"), 6), round(torch_gain("leaky_relu(0.2)"), 6), torch_gain("gelu")
        (1.666667, 1.38675, None)
    """
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

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        q: The pre-activation variance (scale-free activations such as ReLU give the same beta at every q).

    Returns:
        beta, a float.

    Examples:
        >>> round(kurtosis_factor("relu"), 9), round(kurtosis_factor("linear"), 9)
        (5.0, 2.0)
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
    """E[phi'(sqrt(q) z)^2], z ~ N(0,1): the factor a layer passes on to gradients (times weight variance).

    The backward analogue of :func:`second_moment` (He et al. 2015, Sec. 2.2; Poole et al. 2016, Eq. 9);
    phi' comes from autograd, and ``q`` is floored at 1e-12.

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        q: The pre-activation variance, a float or an array of them.

    Returns:
        A float for a scalar ``q``, else a float64 array.

    Examples:
        >>> deriv_second_moment("relu"), round(deriv_second_moment("tanh", 1e-12), 9)  # 1/2, tanh'(0)^2
        (0.5, 1.0)
    """
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

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        q: The pre-activation variance q_l, a float or an array of them.
        weight_var: sigma_w^2, the weight variance times fan-in.
        bias_var: sigma_b^2, the bias variance.

    Returns:
        q_{l+1}: a float for a scalar ``q``, else a float64 array.

    Examples:
        >>> qmap("relu", 3.0, weight_var=2.0)
        3.0
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

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        weight_var: sigma_w^2, the weight variance times fan-in.
        bias_var: sigma_b^2, the bias variance.
        q0: The starting variance (the input's), which picks the fixed point when there are several.

    Returns:
        q*, a float: 0, a positive number, or ``inf``.

    Examples:
        >>> round(fixed_point("tanh", weight_var=1.5, bias_var=0.05), 6)
        0.418037
        >>> fixed_point("relu", weight_var=3.0), fixed_point("tanh", weight_var=0.5)
        (inf, 0.0)
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

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        weight_var: sigma_w^2, the weight variance times fan-in.
        bias_var: sigma_b^2, the bias variance.
        q: The pre-activation variance to evaluate at; default the fixed point q* of :func:`fixed_point`
            (q = 1 where q* is infinite: the ReLU family's chi1 is the same at every q).

    Returns:
        chi1, a float.

    Examples:
        >>> chi1("relu", weight_var=2.0)
        1.0
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

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        bias_var: sigma_b^2, the bias variance.
        lo: The smallest weight variance searched.
        hi: The largest weight variance searched.

    Returns:
        sigma_w^2 with :func:`chi1` = 1, a float.

    Raises:
        SignalpropError: chi1 does not cross 1 for weight variances in [lo, hi] (too large a bias variance).

    Examples:
        >>> critical_weight_var("tanh"), round(critical_weight_var("erf"), 12) == round(math.pi / 4, 12)
        (1.0, True)
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

    u1, u2 are N(0, q*) with correlation c; vectorized over c. At c = 1 it returns 1. For ReLU at
    weight_var 2 it is the arc-cosine kernel (Cho & Saul 2009): (sqrt(1 - c^2) + (pi - arccos c) c) / pi.

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        c: The correlation of two inputs' pre-activations, a float or an array in [-1, 1].
        weight_var: sigma_w^2, the weight variance times fan-in.
        bias_var: sigma_b^2, the bias variance.
        q: The pre-activation variance both inputs have; default the fixed point q* (1 where q* is 0 or
            infinite).

    Returns:
        c_{l+1}: a float for a scalar ``c``, else a float64 array.

    Examples:
        >>> round(cmap("relu", 0.0, weight_var=2.0) * math.pi, 9)  # 1/pi
        1.0
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
    + to - below 1 is refined by bisection. In the ordered phase (chi1 < 1) every pair of inputs ends up
    perfectly correlated; in the chaotic phase they settle at c* < 1 (Poole et al. 2016, Fig. 2).

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        weight_var: sigma_w^2, the weight variance times fan-in.
        bias_var: sigma_b^2, the bias variance.
        q: The pre-activation variance; default the fixed point q* (1 where q* is 0 or infinite).

    Returns:
        c*, a float in [-1, 1].

    Examples:
        >>> c_fixed_point("tanh", weight_var=1.0, bias_var=0.05)
        1.0
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

    Args:
        act: The activation phi: a name, a tensor function or an ``nn.Module`` (:func:`resolve`).
        weight_var: sigma_w^2, the weight variance times fan-in.
        bias_var: sigma_b^2, the bias variance.

    Returns:
        ``(xi_q, xi_c)`` in layers; ``inf`` where a quantity never decays (on the critical line, or for
        ReLU at weight_var 2, whose q-map keeps every q).

    Examples:
        >>> xi_q, xi_c = depth_scales("tanh", weight_var=1.5, bias_var=0.05)
        >>> round(xi_q, 2), round(xi_c, 2)
        (1.68, 15.79)
        >>> depth_scales("relu", weight_var=2.0)
        (inf, inf)
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
