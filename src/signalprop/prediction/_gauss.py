"""Gaussian expectations behind :func:`signalprop.predict`: an activation of N(m, v) and what it shares.

Every element of a layer is modelled as a Gaussian pre-activation ``u = m + sqrt(s) g0 + sqrt(v - s) g1``:
``m`` its mean (a bias), ``v`` its variance over weight draws and inputs, and ``s <= v`` the part of it
shared by every element of the same channel (``g0`` is one draw per channel of one network: the channel's
random offset; ``g1`` is drawn per element). Two distinct elements of one channel are then jointly
Gaussian with covariance ``s``, correlation ``rho = s / v`` (see ``_predict_rules`` for where ``s`` comes
from). This module computes, per element:

* ``E[phi(u)]``, ``E[phi(u)^2]``, ``E[phi(u)^4]``, ``E[phi'(u)^2]``: closed forms for the piecewise-linear
  activations (ReLU, leaky ReLU, identity: truncated Gaussian moments), quadrature otherwise;
* the covariance the output passes on to another element of its channel,
  ``E[phi(u_a) phi(u_b)] - E[phi(u)]^2``: for the piecewise-linear activations in closed form from the
  truncated moments of the bivariate normal (``_relu_pair``); otherwise by Mehler's formula: with
  ``c_k = E[phi(m + sqrt(v) z) h_k(z)]`` for the normalized Hermite polynomials ``h_k = He_k / sqrt(k!)``,
  ``E[phi(u_a) phi(u_b)] = sum_k c_k^2 rho^k`` (Mehler 1866; the Hermite form of the correlation map of
  Poole et al. 2016). The sum stops at ``K = 64``; the tail is bounded by ``D rho^(K+1)`` with
  ``D = E[phi^2] - sum_{k<=K} c_k^2`` (every term is non-negative), which is added, so the result is
  exact at ``rho = 0`` and ``rho = 1`` and off by at most ``D rho^(K+1) (1 - rho)``-ish in between;
* the maximum of ``k`` elements of one channel (max pooling): equicorrelated Gaussians are
  ``m + sqrt(s) g0 + sqrt(v - s) g_i``, so their maximum is ``m + sqrt(s) g0 + sqrt(v - s) M_k`` with
  ``M_k`` the maximum of ``k`` i.i.d. standard normals (density ``k Phi^(k-1) phi``), and for a
  non-decreasing activation ``max phi(u_i) = phi(max u_i)``: a two-dimensional integral over ``g0`` and
  ``M_k``, done by nested quadrature. Two windows of one channel share ``g0``, which gives their
  covariance (windows taken as disjoint).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .. import theory

K_HERMITE = 64
_Z_CLAMP = 40.0  # phi(40) underflows: beyond it the Hermite tail terms are zero
_INV_SQRT_2PI = 1.0 / math.sqrt(2 * math.pi)


@lru_cache(maxsize=4)
def hermite_matrix(fine: bool, order: int = K_HERMITE) -> torch.Tensor:
    """Normalized probabilists' Hermite polynomials h_k(z) = He_k(z) / sqrt(k!) at the quadrature nodes.

    Three-term recurrence ``h_k = (z h_{k-1} - sqrt(k - 1) h_{k-2}) / sqrt(k)``, stable in float64 (the
    unnormalized He_k overflow long before). Shape (nodes, order + 1).
    """
    z, _ = theory.gauss_nodes(fine)
    return _hermite(z, order)


def _hermite(z: torch.Tensor, order: int) -> torch.Tensor:
    cols = [torch.ones_like(z), z.clone()]
    for k in range(2, order + 1):
        cols.append((z * cols[-1] - math.sqrt(k - 1) * cols[-2]) / math.sqrt(k))
    return torch.stack(cols[: order + 1], dim=-1)


def piecewise_slope(act: Any) -> float | None:
    """The negative-side slope of a piecewise-linear activation (ReLU 0, leaky ReLU a, identity 1), else None."""
    if type(act).__name__ == "PReLU":
        w = act.weight.detach().to(torch.float64).flatten()
        return float(w.mean()) if w.numel() else 0.25
    name = theory.activation_name(act)
    if name == "relu":
        return 0.0
    if name in ("linear", "identity"):
        return 1.0
    if name.startswith("leaky_relu"):
        slope = getattr(act, "negative_slope", None)
        if slope is None and "(" in name:
            slope = float(name[name.index("(") + 1: name.index(")")])
        return float(0.01 if slope is None else slope)
    return None


def _ndtr(x: np.ndarray) -> np.ndarray:
    """Phi(x) as ``erfc(-x / sqrt 2) / 2``, accurate in the far left tail (``torch.special.ndtr`` returns
    0 for float64 x below about -20, where Phi(-23.5) = 4e-122: a ReLU's moments there came out 0)."""
    return 0.5 * torch.special.erfc(torch.from_numpy(np.ascontiguousarray(x) * -math.sqrt(0.5))).numpy()


def _relu_closed(m: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """E[r], E[r^2], E[r^4] and P(u > 0) of r = relu(u), u ~ N(m, v) (float64 arrays).

    Truncated moments M_j = E[z^j; z > a], a = -m / sigma: M_0 = Phi(-a), M_1 = phi(a),
    M_j = a^(j-1) phi(a) + (j - 1) M_(j-2); then E[r^p] = sum_j C(p, j) m^(p-j) sigma^j M_j. In this form
    the far tail (m / sigma = -25: E[r^2] ~ 1e-150) keeps its digits; collecting the terms into
    polynomials in m and v times Phi and phi loses them all to cancellation. A zero variance is the
    deterministic relu(m).
    """
    sig = np.sqrt(np.maximum(v, 0.0))
    pos = sig > 0
    if not pos.all():
        return _relu_closed_mixed(m, v, sig, pos)
    a = -m / sig
    a_c = np.minimum(np.maximum(a, -_Z_CLAMP), _Z_CLAMP)
    p = np.exp(-0.5 * a_c * a_c) * _INV_SQRT_2PI  # at |a| = 40 it is 1e-348: zero, as beyond
    big_p = _ndtr(-a)
    ap = a_c * p
    m2 = ap + big_p
    m3 = a_c * ap + 2 * p
    m4 = a_c * a_c * ap + 3 * m2
    sp = sig * p
    mm = m * m
    s2 = sig * sig
    e1 = m * big_p + sp
    e2 = mm * big_p + 2 * m * sp + s2 * m2
    e4 = mm * mm * big_p + 4 * mm * m * sp + 6 * mm * s2 * m2 + 4 * m * s2 * sig * m3 + s2 * s2 * m4
    return np.maximum(e1, 0.0), np.maximum(e2, 0.0), np.maximum(e4, 0.0), big_p


def _relu_closed_mixed(m: np.ndarray, v: np.ndarray, sig: np.ndarray, pos: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_relu_closed` where some elements have zero variance: those are relu(m) exactly."""
    e1, e2, e4, big_p = _relu_closed(np.where(pos, m, 0.0), np.where(pos, v, 1.0))
    r = np.maximum(m, 0.0)
    return (np.where(pos, e1, r), np.where(pos, e2, r * r), np.where(pos, e4, r**4),
            np.where(pos, big_p, (m > 0).astype(np.float64)))


def _piecewise(slope: float, m: np.ndarray, v: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """phi(u) = slope u + (1 - slope) relu(u): u relu(u) = relu(u)^2 gives E[phi^2] = a^2 E[u^2] +
    (1 - a^2) E[r^2], E[phi^4] = a^4 E[u^4] + (1 - a^4) E[r^4], E[phi'^2] = P + a^2 (1 - P)."""
    e1, e2, e4, big_p = _relu_closed(m, v)
    if slope == 0.0:
        return e1, e2, e4, big_p
    a = slope
    u2 = m * m + v
    u4 = m**4 + 6 * m * m * v + 3 * v * v
    return (a * m + (1 - a) * e1, a * a * u2 + (1 - a * a) * e2, a**4 * u4 + (1 - a**4) * e4,
            big_p + a * a * (1 - big_p))


def act_moments(act: Any, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per element of u ~ N(m, v) sharing covariance s within its channel: E[phi], E[phi^2], E[phi^4],
    E[phi'^2] and the covariance phi passes on (None when s is None). See the module docstring.

    Elements are computed once per distinct (m, v, rho) when there are many (a full spatial map); the
    piecewise-linear activations use closed forms throughout (:func:`_piecewise_cov` for the covariance)."""
    slope = piecewise_slope(act)
    if slope is not None and m.numel() == 1 and v.numel() == 1 and (s is None or s.numel() == 1):
        return _piecewise_scalar(slope, m, v, s)
    if slope is not None and max(m.numel(), v.numel(), 1 if s is None else s.numel()) <= 4096 and all(
            t.device.type == "cpu" for t in (m, v) + (() if s is None else (s,))):
        return _piecewise_arrays(slope, m, v, s)
    m, v = torch.broadcast_tensors(m, v)
    shared = s is not None and bool((s > 0).any())
    if shared:
        assert s is not None
        m, v, s = torch.broadcast_tensors(m, v, s)
        rho = torch.where(v > 0, s / v.clamp_min(1e-300), torch.zeros_like(v)).clamp(0, 1)
    else:
        rho = torch.zeros_like(v)
    flat = (m.reshape(-1), v.reshape(-1), rho.reshape(-1))
    inv: torch.Tensor | None = None
    if flat[0].numel() > 4096:
        uniq, inv = unique_rows(*flat)
        flat = (uniq[:, 0], uniq[:, 1], uniq[:, 2])
    if slope is not None:
        res = _piecewise_rows(slope, *flat, shared)
    else:
        order = K_HERMITE if shared else 0
        outs = []
        for chunk in torch.split(torch.stack(flat, 1), 4096):
            cm, cv, cr = chunk[:, 0], chunk[:, 1], chunk[:, 2]
            e1, e2, e4, d2, coef = _quadrature(act, cm, cv, order)
            cols = [e1, e2, e4, d2]
            if shared:
                c2 = coef * coef
                tail = (e2 - c2.sum(-1)).clamp_min(0)
                powers = cr[:, None] ** torch.arange(1, order + 1, dtype=cr.dtype)
                cols.append((c2[:, 1:] * powers).sum(-1) + tail * cr ** (order + 1))
            outs.append(torch.stack(cols, 1))
        res = torch.cat(outs)
    if inv is not None:
        res = res[inv]
    res = res.reshape(*m.shape, -1)
    return res[..., 0], res[..., 1], res[..., 2], res[..., 3], (res[..., 4] if shared else
                                                                  (torch.zeros_like(m) if s is not None else None))


def _piecewise_scalar(slope: float, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`act_moments` of a piecewise-linear activation when every element shares one (m, v, s): the
    same closed forms on one-element arrays, read and written back in two transfers (a deep chain of
    bias-free layers spends its time here, once a layer)."""
    nd = max(m.dim(), v.dim(), 0 if s is None else s.dim())
    vals = [m.item(), v.item()] + ([] if s is None else [s.item()])
    mf, vf = float(vals[0]), float(vals[1])
    shared = s is not None and vals[2] > 0
    e1, e2, e4, d2 = _piecewise_float(slope, mf, vf)
    cov = 0.0
    if shared:
        cr = np.clip(np.array([vals[2] / vf if vf > 0 else 0.0]), 0.0, 1.0)
        cov = float(_piecewise_cov(slope, np.array([mf]), np.array([vf]), cr, np.array([e1]))[0])
    res = torch.tensor([e1, e2, e4, d2, cov], dtype=torch.float64).reshape(5, *([1] * nd))
    return res[0], res[1], res[2], res[3], (res[4] if s is not None else None)


def _piecewise_arrays(slope: float, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`act_moments` of a piecewise-linear activation on up to 4096 elements on the CPU (a layer's
    biases): the closed forms on numpy views of the tensors. The correlation rho = s / v is taken on the
    compact values (one number when a layer's v and s are), so the pair's quadrature nodes are shared."""
    arrays = [t.detach().to(torch.float64).numpy() for t in (m, v) + (() if s is None else (s,))]
    shape = np.broadcast_shapes(*(x.shape for x in arrays))
    cm, cv = (np.broadcast_to(x, shape).ravel() for x in arrays[:2])
    r: np.ndarray | float | None = None
    if s is not None:
        vs, ss = np.broadcast_arrays(arrays[1], arrays[2])
        if (ss > 0).any():
            rho = np.clip(np.divide(ss, vs, out=np.zeros(vs.shape), where=vs > 0), 0.0, 1.0)
            r = float(rho.flat[0]) if rho.size == 1 else np.broadcast_to(rho, shape).ravel()
    cols = _piecewise_cols(slope, cm, cv, r)
    if s is not None and r is None:  # nothing shared: nothing passed on
        cols.append(np.zeros_like(cm))
    out = [torch.from_numpy(np.ascontiguousarray(c)).reshape(shape) for c in cols]
    return out[0], out[1], out[2], out[3], (out[4] if s is not None else None)


def _ndtr_float(x: float) -> float:
    """Phi(x) for one float (``torch.special.ndtr``'s formula: erf near 0, erfc in the tails)."""
    y = x * math.sqrt(0.5)
    if abs(y) < math.sqrt(0.5):
        return 0.5 + 0.5 * math.erf(y)
    return 1.0 - 0.5 * math.erfc(y) if y > 0 else 0.5 * math.erfc(-y)


def _piecewise_float(slope: float, m: float, v: float) -> tuple[float, float, float, float]:
    """:func:`_piecewise` (through :func:`_relu_closed`) on one float mean and variance."""
    sig = math.sqrt(max(v, 0.0))
    pos = sig > 0
    if pos:
        a = -m / sig
    else:
        a = -math.inf if m > 0 else math.inf
    a_c = min(max(a, -_Z_CLAMP), _Z_CLAMP)
    p = math.exp(-0.5 * a_c * a_c) / math.sqrt(2 * math.pi) if abs(a) < _Z_CLAMP else 0.0
    big_p = _ndtr_float(-a)
    m2 = a_c * p + big_p
    m3 = a_c * a_c * p + 2 * p
    m4 = a_c**3 * p + 3 * m2
    s0 = sig if pos else 0.0
    r = max(m, 0.0)
    if pos:
        e1 = m * big_p + s0 * p
        e2 = m * m * big_p + 2 * m * s0 * p + s0 * s0 * m2
        e4 = m**4 * big_p + 4 * m**3 * s0 * p + 6 * m * m * s0 * s0 * m2 + 4 * m * s0**3 * m3 + s0**4 * m4
    else:
        e1, e2, e4 = r, r * r, r**4
    e1, e2, e4 = max(e1, 0.0), max(e2, 0.0), max(e4, 0.0)
    if slope == 0.0:
        return e1, e2, e4, big_p
    u2 = m * m + v
    u4 = m**4 + 6 * m * m * v + 3 * v * v
    return (slope * m + (1 - slope) * e1, slope * slope * u2 + (1 - slope * slope) * e2,
            slope**4 * u4 + (1 - slope**4) * e4, big_p + slope * slope * (1 - big_p))


def _piecewise_rows(slope: float, m: torch.Tensor, v: torch.Tensor, rho: torch.Tensor, shared: bool
                    ) -> torch.Tensor:
    """Columns E[phi], E[phi^2], E[phi^4], E[phi'^2] (and the covariance when ``shared``) of a
    piecewise-linear activation, in closed form on numpy arrays (a few dozen array ops per layer)."""
    cm, cv, cr = (t.detach().to(torch.float64).contiguous().numpy() for t in (m, v, rho))
    return torch.from_numpy(np.stack(_piecewise_cols(slope, cm, cv, cr if shared else None), 1))


def _piecewise_cols(slope: float, m: np.ndarray, v: np.ndarray, rho: np.ndarray | float | None
                    ) -> list[np.ndarray]:
    """E[phi], E[phi^2], E[phi^4], E[phi'^2] and, when ``rho`` is given, the covariance phi passes on
    (:func:`_piecewise_cov`): the closed forms every array path of :func:`act_moments` returns."""
    e1, e2, e4, d2 = _piecewise(slope, m, v)
    return [e1, e2, e4, d2] + ([] if rho is None else [_piecewise_cov(slope, m, v, rho, e1)])


_GL_X, _GL_W = np.polynomial.legendre.leggauss(16)


def _relu_pair(m: np.ndarray, v: np.ndarray, rho: np.ndarray | float) -> np.ndarray:
    """``E[relu(u_a) relu(u_b)]`` for u_a, u_b ~ N(m, v) with correlation rho, in closed form.

    With ``u = m + sigma X``, ``relu(u) = sigma (X - a)^+``, ``a = -m / sigma``, and the truncated moments of
    the standard bivariate normal above (a, a) (Rosenbaum 1961): ``L = P(X > a, Y > a) = Phi(-a)^2 +
    1/(2 pi) int_0^{asin rho} exp(-a^2 / (1 + sin t)) dt`` (Plackett's formula, 16-point Gauss-Legendre in
    t), ``E[X; .] = (1 + rho) phi(a) Q``, ``E[XY; .] = rho L + 2 rho a phi(a) Q + sqrt(1 - rho^2) / sqrt(2 pi)
    phi(a sqrt(2 / (1 + rho)))``, ``Q = Phi(-a sqrt((1 - rho) / (1 + rho)))``; then
    ``E[(X - a)^+ (Y - a)^+] = E[XY; .] - 2 a E[X; .] + a^2 L`` (checked against Monte Carlo)."""
    sig = np.sqrt(np.maximum(v, 0.0))
    pos = sig > 0
    every = bool(pos.all())
    a = -m / sig if every else -m / np.where(pos, sig, 1.0)
    a = np.minimum(np.maximum(a, -_Z_CLAMP), _Z_CLAMP)
    aa = a * a
    r = np.clip(rho, 0.0, 1.0 - 1e-12)  # one correlation for the layer, or one per element
    half = np.arcsin(r) / 2
    # 16-point Gauss-Legendre nodes in t: 16 for a shared correlation (the reciprocal taken on those 16 and
    # the sum a matrix product: as fast as a separate path for it), 16 per element otherwise
    inv = 1 / (1 + np.sin(np.multiply.outer(half, _GL_X + 1)))
    weights = np.multiply.outer(half, _GL_W)
    plackett = np.matmul(np.exp(-aa[..., None] * inv)[..., None, :], weights[..., :, None])[..., 0, 0]
    k = np.sqrt((1 - r) / (1 + r))
    c1, c2 = np.sqrt(1 - r * r) * _INV_SQRT_2PI, 1 / (1 + r)
    n = a.size
    cdf = _ndtr(np.concatenate([-a.ravel(), (-a * k).ravel()]))  # one call for both: its cost is the call
    big_l = cdf[:n].reshape(a.shape) ** 2 + plackett / (2 * math.pi)
    pq = np.exp(-0.5 * aa) * _INV_SQRT_2PI * cdf[n:].reshape(a.shape)
    exy = r * (big_l + 2 * a * pq) + c1 * np.exp(-aa * c2) * _INV_SQRT_2PI
    out = np.maximum(v * (exy - 2 * a * (1 + r) * pq + aa * big_l), 0.0)
    return out if every else np.where(pos, out, np.maximum(m, 0.0) ** 2)


def _piecewise_cov(slope: float, m: np.ndarray, v: np.ndarray, rho: np.ndarray | float, e1: np.ndarray
                   ) -> np.ndarray:
    """Covariance of ``phi = slope u + (1 - slope) relu(u)`` at two elements of correlation rho:
    ``E[phi_a phi_b] = s^2 E[u_a u_b] + 2 s (1 - s) E[u_a r_b] + (1 - s)^2 E[r_a r_b] - E[phi]^2`` with
    ``E[u_a u_b] = m^2 + rho v`` and ``E[u_a r_b] = m E[r] + rho v Phi(m / sigma)`` (Stein's lemma)."""
    rr = _relu_pair(m, v, rho)
    if slope == 0.0:
        return np.maximum(rr - e1 * e1, 0.0)
    sig = np.sqrt(np.maximum(v, 0.0))
    pos = sig > 0
    er = (e1 - slope * m) / (1 - slope) if slope != 1.0 else np.maximum(m, 0.0)
    p_pos = np.where(pos, _ndtr(m / np.where(pos, sig, 1.0)), (m > 0).astype(np.float64))
    ur = m * er + rho * v * p_pos
    uu = m * m + rho * v
    pair = slope * slope * uu + 2 * slope * (1 - slope) * ur + (1 - slope) ** 2 * rr
    return np.maximum(pair - e1 * e1, 0.0)


def _quadrature(act: Any, m: torch.Tensor, v: torch.Tensor, order: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    fn = theory.resolve(act)
    z, w = theory.gauss_nodes()
    x = (m[:, None] + v.clamp_min(0).sqrt()[:, None] * z[None, :]).requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        (d,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
    y = y.detach()
    d = torch.zeros_like(x) if d is None else d.detach()
    wy = w * y
    coef = wy @ hermite_matrix(True, order) if order else wy.sum(1, keepdim=True)
    return wy.sum(1), (wy * y).sum(1), (wy * y**3).sum(1), (w * d * d).sum(1), coef


def max_moments(act: Any, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None, k: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[y], E[y^2], E[y^4] and the covariance of y with another window's y, y = max of phi over a window of
    k equicorrelated N(m, v) (covariance s) elements of one channel; phi non-decreasing (module docstring)."""
    if s is None:
        s = torch.zeros_like(v)
    m, v, s = torch.broadcast_tensors(m, v, s)
    s = torch.minimum(s.clamp_min(0), v.clamp_min(0))
    fn = theory.resolve(act)
    zi, wi = theory.gauss_nodes()
    wi = wi * k * torch.special.ndtr(zi) ** (k - 1)
    uniq, inv = unique_rows(m.reshape(-1), v.reshape(-1), s.reshape(-1))
    if not bool((uniq[:, 2] > 0).any()):
        outs = []
        for chunk in torch.split(uniq, 2048):
            with torch.no_grad():
                y = fn(chunk[:, :1] + chunk[:, 1:2].clamp_min(0).sqrt() * zi[None, :])
            wy = wi * y
            e1 = wy.sum(1)
            outs.append(torch.stack([e1, (wy * y).sum(1), (wy * y**3).sum(1), torch.zeros_like(e1)], 1))
    else:
        outs = []
        order = torch.argsort(uniq[:, 1] - uniq[:, 2])
        uniq, inv = uniq[order], torch.argsort(order)[inv]
        w_all = (uniq[:, 1] - uniq[:, 2]).clamp_min(0)
        for w in torch.unique(w_all):
            outs.append(_max_shared(fn, uniq[w_all == w], float(w), zi, wi))
    res = torch.cat(outs)[inv].reshape(*m.shape, 4)
    return res[..., 0], res[..., 1], res[..., 2], res[..., 3]


def _max_shared(fn: Any, rows: torch.Tensor, w: float, zi: torch.Tensor, wi: torch.Tensor) -> torch.Tensor:
    """[E y, E y^2, E y^4, cov] for rows (m, v, s) sharing w = v - s: y = phi(m + sqrt(s) g0 + sqrt(w) M).

    The inner expectation over the maximum M, ``F_j(c) = E_M[phi(c + sqrt(w) M)^j]``, depends on
    ``c = m + sqrt(s) g0`` only, so it is tabulated once on a grid of c (spacing sqrt(w) / 20, at most
    4097 points, linear interpolation) and the outer expectation over g0 reads the table: one
    table per distinct w instead of a two-dimensional quadrature per element.
    """
    zo, wo = theory.gauss_nodes(fine=False)
    m, s = rows[:, 0], rows[:, 2].clamp_min(0)
    c = m[:, None] + s.sqrt()[:, None] * zo[None, :]
    lo, hi = float(c.min()) - 1e-9, float(c.max()) + 1e-9
    step = min((hi - lo) / 4096, math.sqrt(w) / 20) if w > 0 else (hi - lo) / 4096
    n = int(min(max((hi - lo) / max(step, 1e-300), 2), 4096)) + 1
    if c.numel() <= n:  # fewer outer points than table entries: integrate directly
        with torch.no_grad():
            y = fn(c[..., None] + math.sqrt(w) * zi)
        wy = wi * y
        f = torch.stack([wy.sum(-1), (wy * y).sum(-1), (wy * y**3).sum(-1)], -1)
        e = (wo[None, :, None] * f).sum(1)
        cov = (wo * f[..., 0] * f[..., 0]).sum(1) - e[:, 0] ** 2
        return torch.stack([e[:, 0], e[:, 1], e[:, 2], cov.clamp_min(0)], 1)
    grid = torch.linspace(lo, hi, n, dtype=torch.float64)
    tables = []
    for part in torch.split(grid, max(1, 2_000_000 // zi.numel())):
        with torch.no_grad():
            y = fn(part[:, None] + math.sqrt(w) * zi[None, :])
        wy = wi * y
        tables.append(torch.stack([wy.sum(1), (wy * y).sum(1), (wy * y**3).sum(1)], 1))
    table = torch.cat(tables)
    pos = (c - lo) / (hi - lo) * (n - 1)
    i0 = pos.floor().clamp(0, n - 2).long()
    frac = (pos - i0)[..., None]
    f = table[i0] * (1 - frac) + table[i0 + 1] * frac  # (rows, outer nodes, 3)
    e = (wo[None, :, None] * f).sum(1)
    cov = (wo * f[..., 0] * f[..., 0]).sum(1) - e[:, 0] ** 2
    return torch.stack([e[:, 0], e[:, 1], e[:, 2], cov.clamp_min(0)], 1)


def unique_rows(*cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct rows of the stacked columns and the inverse index, via 1-D uniques (``unique(dim=0)`` is
    about 100x slower)."""
    inv = torch.zeros(cols[0].shape, dtype=torch.int64)
    n = 1
    for c in cols:
        u, i = torch.unique(c, return_inverse=True)
        ukey, inv = torch.unique(inv * u.numel() + i, return_inverse=True)  # compressed: no overflow
        n = ukey.numel()
    first = torch.zeros(n, dtype=torch.int64).scatter_(0, inv, torch.arange(inv.numel()))
    return torch.stack([c[first] for c in cols], dim=1), inv
