"""The scales a fix picks for a chain of layers of one activation, so neither the signal nor the gradient drifts.

Two questions, one budget (a predicted drift of at most 2x over the chain; diagnose flags 10x):

* :func:`mean_field_choice` (``auto_init_``'s tanh, sigmoid, erf, ... chains): weight and bias variances
  for a chain of ``depth`` layers. With biases, a point on the order-to-chaos line chi1 = 1 (Poole et al.
  2016; Schoenholz et al. 2017). Without biases the only critical point of tanh is q* = 0, where q decays
  like 1/l and the gradient with it (power-law decay): the choice is then sigma_w^2 a little above 1 on the
  line sigma_b^2 = 0, whose small fixed point q* > 0 holds the signal and whose chi1(q*) = 1 + O(q*^2)
  (tanh: 1 + 4/3 q*^2) keeps the gradient within the budget over the depth.
* :func:`lsuv_target` (``lsuv_``): LSUV pins every layer's pre-activation variance at q = target^2, so
  consecutive layers of activation phi have weight variance q / E[phi(sqrt(q) z)^2] and the gradient's
  variance changes per layer by r(q) = q E[phi'^2] / E[phi^2] (that chi1, sigma_b^2 = 0). r = 1 at every q
  only for the ReLU family; tanh 1.18 at q = 1 (a 50-layer chain: 60x), GELU 1.07, SELU 1.07, sigmoid 0.15
  (its mean inflates q without any gradient), softplus 0.32. The target is kept where the chain's predicted
  drift r^((L-1)/2) stays in budget, else moved to the nearest q that does.

Both add the finite-width spread of the gradient with orthogonal weights: one layer multiplies the gradient's
squared norm by the mean of phi'^2 over its n units, whose relative variance is CV^2/n (CV^2 =
Var[phi'^2]/E[phi'^2]^2), so over L layers log(gradient std) spreads by sd = sqrt(L CV^2 / n) / 2, and
the prediction is the mean-field drift plus 2 sd (Hanin & Nica 2019 for the Gaussian-weight analogue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .. import theory
from .._errors import SignalpropError
from ..theory import ActLike

__all__ = ["MeanFieldChoice", "chain_spread", "lsuv_target", "mean_field_choice"]

NOT_SUITED = "LSUV does not suit it"
DRIFT_LIMIT = math.log(2.0)  # predicted forward or gradient drift over a chain: at most 2x (diagnose: 10x)

# sigma_b^2 candidates on the critical line, in order of preference: 0.05 is the usual choice (Schoenholz
# et al. 2017; Pennington et al. 2017); smaller ones put q* nearer 0, where the chain is closer to dynamical
# isometry (Pennington et al. 2017), for deep or narrow chains; larger ones for activations whose small-q*
# points are unstable.
_BIAS_VARS = (0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.1, 0.2)
_Q_GRID = np.logspace(-4, 3, 281)  # q* on the critical line (bias) ...
_Q_ZERO_BIAS = np.logspace(1, -3, 121)  # ... and on the line sigma_b^2 = 0, largest (strongest signal) first
_Q_LSUV = np.logspace(-4, 4, 321)  # LSUV targets q = std^2


# ---- moments ----------------------------------------------------------------------------------------------
def _moments(act: ActLike, q: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(E[phi^2], E[phi'^2], Var[phi'^2]/E[phi'^2]^2) at pre-activation variances q (vectorized quadrature)."""
    qs = torch.as_tensor(np.atleast_1d(np.asarray(q, dtype=np.float64)))
    z, w = theory.gauss_nodes()
    fn = theory.resolve(act)
    x = (torch.sqrt(qs.clamp_min(1e-12))[:, None] * z[None, :]).requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        (d,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    d = torch.zeros_like(x) if d is None else d.detach()
    y = y.detach()
    m2 = (y * y * w).sum(-1)
    d2 = (d * d * w).sum(-1)
    d4 = (d**4 * w).sum(-1)
    cv2 = torch.where(d2 > 0, d4 / (d2 * d2).clamp_min(1e-300) - 1.0, torch.zeros_like(d2))
    return m2.numpy(), d2.numpy(), cv2.clamp_min(0.0).numpy()


_TABLE_Q = np.logspace(-8, 6, 1401)  # 100 points per decade: log-log interpolation errs by < 1e-4 relative


@lru_cache(maxsize=64)
def _table(name: str, act_obj: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(log q, log E[phi^2], log E[phi'^2], CV^2) on a fine grid, computed once per activation."""
    m2, d2, cv2 = _moments(act_obj if act_obj is not None else name, _TABLE_Q)
    return np.log(_TABLE_Q), np.log(np.maximum(m2, 1e-300)), np.log(np.maximum(d2, 1e-300)), cv2


class _Act:
    """E[phi^2], E[phi'^2] and CV^2 of one activation at any q, interpolated from :func:`_table`."""

    def __init__(self, act: ActLike) -> None:
        name = theory.activation_name(act)
        key = None if (isinstance(act, str) or name in theory.known_activations()) else act
        self.name = name
        self.lq, self.lm2, self.ld2, self.cv2_t = _table(name, key)

    def _at(self, table: np.ndarray, q: Any) -> np.ndarray:
        lq = np.log(np.clip(np.asarray(q, dtype=np.float64), _TABLE_Q[0], _TABLE_Q[-1]))
        return np.interp(lq, self.lq, table)

    def m2(self, q: Any) -> np.ndarray:
        return np.exp(self._at(self.lm2, q))

    def d2(self, q: Any) -> np.ndarray:
        return np.exp(self._at(self.ld2, q))

    def cv2(self, q: Any) -> np.ndarray:
        return self._at(self.cv2_t, q)

    def kappa(self, q: Any) -> np.ndarray:
        """dlog E[phi^2] / dlog q: how a relative change of one input's q grows through a layer whose weight
        scale is fixed by the batch (> 1: the q-map is unstable at q, and inputs' norms drift apart)."""
        return self._at(np.gradient(self.lm2, self.lq), q)

    def dm2(self, q: Any) -> np.ndarray:
        """d E[phi^2] / dq = E[phi^2] / q * dlog E[phi^2] / dlog q."""
        q = np.asarray(q, dtype=np.float64)
        return self.m2(q) / q * self.kappa(q)


def chain_spread(act: ActLike, q: float, depth: int, width: int | None) -> float:
    """sd of log(gradient std) over ``depth`` layers of ``width`` units at pre-activation variance q:
    sqrt((depth - 1) CV^2 / width) / 2, 0 when the width is unknown (see the module docstring).

    Args:
        act: The activation.
        q: The pre-activation variance.
        depth: Layers in the chain.
        width: Units per layer (None or 0: unknown).

    Returns:
        The sd of log(gradient std), 0 for one layer or an unknown width.

    Examples:
        >>> chain_spread("tanh", 1.0, 1, 64), chain_spread("tanh", 1.0, 50, None)
        (0.0, 0.0)
        >>> round(chain_spread("tanh", 1.0, 50, 64), 4)
        0.3342
    """
    if not width or depth <= 1:
        return 0.0
    return 0.5 * math.sqrt((depth - 1) * float(_Act(act).cv2(q)) / width)


# ---- mean field ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeanFieldChoice:
    """A weight and bias variance for a chain of layers and what theory predicts for it.

    ``forward_drift`` / ``gradient_drift``: predicted max |std_l / std_1| (mean field) over the depth, as
    factors >= 1, starting off q* by 2x; ``spread``: exp(2 sd) of the finite-width spread of the gradient
    (1 when the width is not given).

    Attributes:
        weight_var: sigma_w^2 (weights of std ``sqrt(sigma_w^2 / fan_in)``).
        bias_var: sigma_b^2.
        q_star: The fixed point q* of the q-map.
        chi1: chi1 at q* (Poole et al. 2016, Eq. 9).
        xi_q: The depth scale of q's return to q* (Schoenholz et al. 2017).
        forward_drift: Predicted max forward std ratio over the depth.
        gradient_drift: Predicted max gradient std ratio over the depth.
        spread: The finite-width spread factor of the gradient.

    Examples:
        >>> c = mean_field_choice("tanh", 40)
        >>> round(c.q_star, 3), c.forward_drift < 2
        (0.57, True)
    """

    weight_var: float
    bias_var: float
    q_star: float
    chi1: float
    xi_q: float
    forward_drift: float
    gradient_drift: float
    spread: float = 1.0


def mean_field_choice(act: ActLike, depth: int, *, bias: bool = True, width: int | None = None) -> MeanFieldChoice:
    """sigma_w^2, sigma_b^2 for a chain of ``depth`` layers of ``act`` (of ``width`` units, when given).

    ``bias=True``: the critical line chi1 = 1 is parametrized by the fixed point q* itself (Poole et al.
    2016, Eqs. 3 and 9): sigma_w^2 = 1 / E[phi'(sqrt(q*) z)^2] and sigma_b^2 = q* - sigma_w^2
    E[phi(sqrt(q*) z)^2]; one vectorized quadrature over a grid of q* and a bisection find the point of
    each sigma_b^2 candidate (0.05 first, then 0.02 down to 0.001, then 0.1, 0.2); only stable fixed points
    (q-map slope < 1) count. ``bias=False`` (layers without a bias): the points of the line sigma_b^2 = 0,
    sigma_w^2 = q* / E[phi(sqrt(q*) z)^2], from the largest q* down. The first layer is set so q starts at q*; an
    input whose second moment is off by 2x starts it off q*, and the q-map brings it back at the rate
    xi_q = -1/log(q-map slope at q*) (Schoenholz et al. 2017). The prediction iterates q_{l+1} = qmap(q_l)
    and multiplies chi1(q_l) over ``depth`` layers from q_1 = q*/2 and 2 q*, adds 2 sd of the gradient's
    finite-width spread (:func:`chain_spread`) when ``width`` is given, and takes the first candidate whose
    forward and gradient drift both stay within 2x (diagnose flags 10x), else the one that drifts least.

    Args:
        act: The activation after every layer of the chain: a name, a tensor callable or an ``nn.Module``.
        depth: Layers in the chain, a positive integer.
        bias: Whether every layer of the chain has a bias (else the line sigma_b^2 = 0).
        width: Units per layer, for the finite-width spread of the gradient; None ignores it.

    Returns:
        A :class:`MeanFieldChoice`: ``weight_var`` (sigma_w^2, so std = sqrt(sigma_w^2 / fan_in)),
        ``bias_var``, ``q_star``, ``chi1`` at q*, ``xi_q`` and the predicted drifts.

    Raises:
        SignalpropError: A bad depth or width, or no stable point on the line for this activation.

    Examples:
        On the critical line (chi1 = 1) at sigma_b^2 = 0.05, tanh needs sigma_w^2 = 1.761:

        >>> c = mean_field_choice("tanh", 40)
        >>> round(c.bias_var, 3), round(c.weight_var, 3), round(c.chi1, 6)
        (0.05, 1.761, 1.0)
        >>> c = mean_field_choice("tanh", 100, bias=False, width=64)
        >>> c.bias_var, round(c.weight_var, 3), c.chi1 > 1, c.gradient_drift * c.spread < 2
        (0.0, 1.121, True, True)
    """
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise SignalpropError(f"depth must be a positive integer (layers in the chain), got {depth!r}")
    if width is not None and not (isinstance(width, int) and width >= 1):
        raise SignalpropError(f"width must be a positive integer (units per layer) or None, got {width!r}")
    name = theory.activation_name(act)
    key = None if (isinstance(act, str) or name in theory.known_activations()) else act
    return _mean_field_choice(name, depth, bool(bias), width, key)


@lru_cache(maxsize=128)
def _mean_field_choice(name: str, depth: int, bias: bool, width: int | None, act_obj: Any) -> MeanFieldChoice:
    a = _Act(act_obj if act_obj is not None else name)
    wv, bv, q_star = _candidates(a, bias)
    if q_star.size == 0:
        raise SignalpropError(
            f"no stable point of {name}'s {'critical line chi1 = 1' if bias else 'line sigma_b^2 = 0'} was found"
            f"{' for bias variances ' + str(_BIAS_VARS) if bias else ''}; initialize these layers with "
            "signalprop.init (e.g. glorot_) or use lsuv_ with example inputs"
        )
    fwd, grad = _predict_drift(a, wv, bv, q_star, depth)
    sd = 0.5 * np.sqrt(max(depth - 1, 0) * a.cv2(q_star) / width) if width else np.zeros_like(q_star)
    total = np.maximum(fwd, grad + 2 * sd)
    ok = np.nonzero(total <= DRIFT_LIMIT)[0]
    i = int(ok[0]) if ok.size else int(np.argmin(total))
    act: ActLike = act_obj if act_obj is not None else name
    w, b, q = _exact(act, float(q_star[i]), float(bv[i]))
    slope = float(w * a.dm2(q))
    xi_q = -1.0 / math.log(slope) if 0 < slope < 1 else math.inf
    return MeanFieldChoice(w, b, q, w * float(theory.deriv_second_moment(act, q)), xi_q,
                           math.exp(float(fwd[i])), math.exp(float(grad[i])), math.exp(2 * float(sd[i])))


def _exact(act: ActLike, q: float, b: float) -> tuple[float, float, float]:
    """(sigma_w^2, sigma_b^2, q*) of a candidate from the exact quadratures (the tables only pick it).

    sigma_b^2 = 0: sigma_w^2 = q* / E[phi^2](q*). Otherwise q* is refined by bisection in log q so that
    q* - E[phi^2](q*) / E[phi'^2](q*) = sigma_b^2 to float precision, with sigma_w^2 = 1 / E[phi'^2](q*).
    """
    if b == 0.0:
        return q / float(theory.second_moment(act, q)), 0.0, q

    def f(t: float) -> float:
        qq = math.exp(t)
        return qq - float(theory.second_moment(act, qq)) / float(theory.deriv_second_moment(act, qq)) - b

    lo, hi = math.log(q) - 0.05, math.log(q) + 0.05
    f_lo = f(lo)
    if (f_lo > 0) == (f(hi) > 0):
        return 1.0 / float(theory.deriv_second_moment(act, q)), b, q
    for _ in range(45):
        mid = (lo + hi) / 2
        f_mid = f(mid)
        if (f_mid > 0) == (f_lo > 0):
            lo, f_lo = mid, f_mid
        else:
            hi = mid
    q = math.exp((lo + hi) / 2)
    return 1.0 / float(theory.deriv_second_moment(act, q)), b, q


def _candidates(a: _Act, bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigma_w^2, sigma_b^2, q*) of the stable candidate points, in order of preference."""
    if not bias:
        q = _Q_ZERO_BIAS
        wv = q / a.m2(q)
        slope = wv * a.dm2(q)
        keep = np.isfinite(wv) & (wv > 0) & (slope < 1.0) & (slope > 0.0)
        return wv[keep], np.zeros(int(keep.sum())), q[keep]

    def line(q: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # (sigma_w^2, sigma_b^2, q-map slope)
        wv = 1.0 / a.d2(q)
        return wv, np.asarray(q) - wv * a.m2(q), wv * a.dm2(q)

    wv_g, bv_g, slope_g = line(_Q_GRID)
    out: list[tuple[float, float, float]] = []
    ok = np.isfinite(bv_g) & np.isfinite(wv_g) & (slope_g < 1.0) & (wv_g > 0)
    for b in _BIAS_VARS:
        cross = np.nonzero(ok[:-1] & ok[1:] & ((bv_g[:-1] - b) * (bv_g[1:] - b) <= 0))[0]
        if cross.size == 0:
            continue
        lo, hi = math.log(_Q_GRID[cross[0]]), math.log(_Q_GRID[cross[0] + 1])
        f_lo = float(bv_g[cross[0]]) - b
        for _ in range(40):
            mid = (lo + hi) / 2
            f_mid = float(line(math.exp(mid))[1]) - b
            if (f_mid > 0) == (f_lo > 0):
                lo, f_lo = mid, f_mid
            else:
                hi = mid
        q_star = math.exp((lo + hi) / 2)
        out.append((float(line(q_star)[0]), b, q_star))
    arr = np.array(out, dtype=np.float64).reshape(-1, 3)
    return arr[:, 0], arr[:, 1], arr[:, 2]


def _predict_drift(a: _Act, wv: Any, bv: Any, q_star: Any, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate: (max |log(std_l/std_1)|, max |log prod sqrt(chi1)|) over ``depth`` layers, from
    q_1 = q*/2 and 2 q* (mean field), vectorized over the candidates."""
    wv2, bv2 = np.repeat(np.asarray(wv, dtype=np.float64), 2), np.repeat(np.asarray(bv, dtype=np.float64), 2)
    q1 = np.repeat(np.asarray(q_star, dtype=np.float64), 2) * np.tile([0.5, 2.0], len(np.atleast_1d(wv)))
    q = q1.copy()
    log_g = np.zeros_like(q)
    fwd = np.zeros_like(q)
    grad = np.zeros_like(q)
    for _ in range(max(depth - 1, 0)):
        log_g = log_g + 0.5 * np.log(np.maximum(wv2 * a.d2(q), 1e-300))
        q = wv2 * a.m2(q) + bv2
        fwd = np.maximum(fwd, np.abs(0.5 * np.log(np.maximum(q, 1e-300) / q1)))
        grad = np.maximum(grad, np.abs(log_g))
    return fwd.reshape(-1, 2).max(1), grad.reshape(-1, 2).max(1)


# ---- LSUV ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LSUVTarget:
    """The output std an LSUV pass pins for a layer of a chain, and why (``note`` empty when unchanged)."""

    std: float
    gradient_drift: float  # predicted over the chain at this std, with the finite-width spread
    note: str = ""


def lsuv_target(act: ActLike, depth: int, width: int | None, target_std: float) -> LSUVTarget:
    """The output std LSUV should pin for a chain of ``depth`` layers followed by ``act`` (module docstring).

    The predicted gradient drift at q = std^2 is ((depth - 1)/2) |log r(q)| plus 2 :func:`chain_spread`;
    ``target_std`` is kept when that stays within 2x (or when no std does better), else the nearest std
    (in log) that does is taken; when none does, the one that drifts least.

    Here r(q) = q E[phi'(sqrt(q) z)^2] / E[phi(sqrt(q) z)^2] is the chi1 of a chain whose weights LSUV
    scales to output second moment q (Mishkin & Matas 2016 pin q = 1; Poole et al. 2016 for chi1): the
    gradient changes by sqrt(r) per layer.

    Args:
        act: The activation after the layers (None or linear: ``target_std`` is kept).
        depth: Layers in the chain.
        width: Units per layer, for the finite-width spread; None ignores it.
        target_std: The output std asked for (LSUV's 1.0).

    Returns:
        An :class:`LSUVTarget`: ``std`` to pin, the predicted ``gradient_drift`` factor, and a ``note``
        saying why when ``std`` differs from ``target_std``.

    Examples:
        ReLU is scale-free (r = 1 at every q), so std 1 is kept; tanh at std 1 has r < 1 and its gradient
        shrinks over 50 layers, so a smaller std, where tanh is nearly linear, is pinned:

        >>> lsuv_target("relu", 50, 64, 1.0).std
        1.0
        >>> t = lsuv_target("tanh", 50, 64, 1.0)
        >>> round(t.std, 2), t.gradient_drift < 2
        (0.4, True)
    """
    if act is None or depth <= 1:
        return LSUVTarget(target_std, 1.0)
    name = theory.activation_name(act)
    if name in ("linear", "identity"):
        return LSUVTarget(target_std, 1.0)
    key = None if (isinstance(act, str) or name in theory.known_activations()) else act
    return _lsuv_target(name, depth, width, float(target_std), key)


@lru_cache(maxsize=256)
def _lsuv_target(name: str, depth: int, width: int | None, target: float, act_obj: Any) -> LSUVTarget:
    a = _Act(act_obj if act_obj is not None else name)
    q = np.append(_Q_LSUV, target * target)
    m2, d2, cv2 = a.m2(q), a.d2(q), a.cv2(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = q * d2 / m2
        drift = 0.5 * (depth - 1) * np.abs(np.log(r))
    sd = 0.5 * np.sqrt((depth - 1) * cv2 / width) if width else np.zeros_like(q)
    apart = 2.0 * (depth - 1) * np.maximum(np.log(a.kappa(q)), 0.0)  # <= log 2: kappa^(L-1) <= sqrt(2)
    total = np.where(np.isfinite(drift), np.maximum(drift + 2 * sd, apart), np.inf)
    best = float(np.min(total))
    if not math.isfinite(best):
        return LSUVTarget(target, math.inf)
    det = float(np.min(np.where(np.isfinite(drift), np.maximum(drift, apart), np.inf)))  # width aside
    beyond = (f"; no std keeps a chain of {depth} {name} layers within {math.exp(DRIFT_LIMIT):g}x (least: "
              f"{math.exp(det):.3g}x), so {NOT_SUITED}: add normalization layers, or use an activation whose chains "
              "it keeps (the ReLU family)") if det > DRIFT_LIMIT else ""
    if total[-1] <= max(DRIFT_LIMIT, best + 1e-9):
        return LSUVTarget(target, math.exp(float(total[-1])), f"{name}{beyond}" if beyond else "")
    ok = np.nonzero(total <= max(DRIFT_LIMIT, best + 1e-9))[0]
    i = int(ok[np.argmin(np.abs(np.log(q[ok] / q[-1])))])
    std = math.sqrt(float(q[i]))
    per = math.sqrt(float(r[-1]))
    why = (f"every layer multiplies the gradient by sqrt(r) = {per:.4g} (r = q E[phi'^2]/E[phi^2], the chi1 of a "
           f"chain at q = std^2), {per ** (depth - 1):.3g}x over {depth} layers" if drift[-1] > DRIFT_LIMIT else
           f"inputs' second moments drift apart by kappa^{depth - 1} = {math.exp(apart[-1] / 2):.3g}x (kappa = "
           "dlog E[phi^2]/dlog q > 1: an unstable q-map)" if apart[-1] > drift[-1] + 2 * sd[-1] else
           f"the finite-width spread of the gradient is {math.exp(2 * sd[-1]):.3g}x")
    note = (f"{name}: at output std {target:g} {why}; LSUV pins std {std:.3g} instead, where the predicted "
            f"drift is {math.exp(float(total[i])):.3g}x{beyond}")
    return LSUVTarget(std, math.exp(float(total[i])), note)
