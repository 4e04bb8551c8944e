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
  ``E[phi(u_a) phi(u_b)] - E[phi(u)]^2``, by Mehler's formula: with ``c_k = E[phi(m + sqrt(v) z) h_k(z)]``
  for the normalized Hermite polynomials ``h_k = He_k / sqrt(k!)``,
  ``E[phi(u_a) phi(u_b)] = sum_k c_k^2 rho^k`` (Mehler 1866; the Hermite form of the correlation map of
  Poole et al. 2016). The sum stops at ``K = 64``; the tail is bounded by ``D rho^(K+1)`` with
  ``D = E[phi^2] - sum_{k<=K} c_k^2`` (every term is non-negative), which is added, so the result is
  exact at ``rho = 0`` and ``rho = 1`` and off by at most ``D rho^(K+1) (1 - rho)``-ish in between
  (ReLU: ``D ~ 1e-4 v``). For ReLU ``c_k`` is closed form: ``c_0 = E[relu]``, ``c_1 = sigma Phi(t)``,
  ``c_k = sigma phi(t) h_{k-2}(-t) / sqrt(k (k - 1))`` for ``k >= 2`` (``t = m / sigma``; Stein's lemma
  ``E[f(z) He_k(z)] = E[f'(z) He_{k-1}(z)]`` twice);
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

import torch

from .. import theory

K_HERMITE = 64
_Z_CLAMP = 40.0  # phi(40) underflows: beyond it the Hermite tail terms are zero


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


def _ndtr(x: torch.Tensor) -> torch.Tensor:
    return torch.special.ndtr(x)


def _pdf(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)


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


def _relu_closed(m: torch.Tensor, v: torch.Tensor, order: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[r], E[r^2], E[r^4], P(u > 0) and Hermite coefficients c_k (k <= order) of r = relu(u), u ~ N(m, v).

    Truncated moments M_j = E[z^j; z > a], a = -m / sigma: M_0 = Phi(-a), M_1 = phi(a),
    M_j = a^(j-1) phi(a) + (j - 1) M_(j-2); then E[r^p] = sum_j C(p, j) m^(p-j) sigma^j M_j.
    A zero variance is the deterministic relu(m).
    """
    sig = v.clamp_min(0).sqrt()
    pos = sig > 0
    safe = torch.where(pos, sig, torch.ones_like(sig))
    a = torch.where(pos, -m / safe, torch.where(m > 0, -torch.inf, torch.inf))
    a_c = a.clamp(-_Z_CLAMP, _Z_CLAMP)
    p = torch.where(a.abs() < _Z_CLAMP, _pdf(a_c), torch.zeros_like(a))
    big_p = _ndtr(-a)
    mom = [big_p, p]
    for j in range(2, 5):
        mom.append(a_c ** (j - 1) * p + (j - 1) * mom[j - 2])
    s0 = torch.where(pos, sig, torch.zeros_like(sig))
    e1 = m * mom[0] + s0 * mom[1]
    e2 = m * m * mom[0] + 2 * m * s0 * mom[1] + s0 * s0 * mom[2]
    e4 = sum(math.comb(4, j) * m ** (4 - j) * s0**j * mom[j] for j in range(5))
    r = m.clamp_min(0)
    e1 = torch.where(pos, e1, r).clamp_min(0)
    e2 = torch.where(pos, e2, r * r).clamp_min(0)
    e4 = torch.where(pos, e4, r**4).clamp_min(0)  # type: ignore[arg-type]
    coef = torch.zeros((*m.shape, order + 1), dtype=m.dtype)
    coef[..., 0] = e1
    if order >= 1:
        coef[..., 1] = s0 * big_p
    if order >= 2:
        h = _hermite(a_c, order - 2)
        k = torch.arange(2, order + 1, dtype=m.dtype)
        coef[..., 2:] = (s0 * p)[..., None] * h / torch.sqrt(k * (k - 1))
    return e1, e2, e4, big_p, coef


def _piecewise(slope: float, m: torch.Tensor, v: torch.Tensor, order: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """phi(u) = slope u + (1 - slope) relu(u): u relu(u) = relu(u)^2 gives E[phi^2] = a^2 E[u^2] +
    (1 - a^2) E[r^2], E[phi^4] = a^4 E[u^4] + (1 - a^4) E[r^4]; Hermite coefficients are linear in phi."""
    e1, e2, e4, big_p, coef = _relu_closed(m, v, order)
    if slope == 0.0:
        return e1, e2, e4, big_p, coef
    a = slope
    u2 = m * m + v
    u4 = m**4 + 6 * m * m * v + 3 * v * v
    coef = coef * (1 - a)
    coef[..., 0] += a * m
    if order >= 1:
        coef[..., 1] += a * v.clamp_min(0).sqrt()
    return (a * m + (1 - a) * e1, a * a * u2 + (1 - a * a) * e2, a**4 * u4 + (1 - a**4) * e4,
            big_p + a * a * (1 - big_p), coef)


def act_moments(act: Any, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per element of u ~ N(m, v) sharing covariance s within its channel: E[phi], E[phi^2], E[phi^4],
    E[phi'^2] and the covariance phi passes on (None when s is None). See the module docstring."""
    m, v = torch.broadcast_tensors(m, v)
    shared = s is not None and bool((s > 0).any())
    if shared:
        assert s is not None
        m, v, s = torch.broadcast_tensors(m, v, s)
        rho = torch.where(v > 0, s / v.clamp_min(1e-300), torch.zeros_like(v)).clamp(0, 1)
    else:
        rho = torch.zeros_like(v)
    uniq, inv = unique_rows(m.reshape(-1), v.reshape(-1), rho.reshape(-1))
    slope = piecewise_slope(act)
    order = K_HERMITE if shared else 0
    outs = []
    for chunk in torch.split(uniq, 4096):
        cm, cv, cr = chunk[:, 0], chunk[:, 1], chunk[:, 2]
        if slope is not None:
            e1, e2, e4, d2, coef = _piecewise(slope, cm, cv, order)
        else:
            e1, e2, e4, d2, coef = _quadrature(act, cm, cv, order)
        cols = [e1, e2, e4, d2]
        if shared:
            c2 = coef * coef
            tail = (e2 - c2.sum(-1)).clamp_min(0)
            powers = cr[:, None] ** torch.arange(1, order + 1, dtype=cr.dtype)
            cols.append((c2[:, 1:] * powers).sum(-1) + tail * cr ** (order + 1))
        outs.append(torch.stack(cols, 1))
    res = torch.cat(outs)[inv].reshape(*m.shape, -1)
    return res[..., 0], res[..., 1], res[..., 2], res[..., 3], (res[..., 4] if shared else
                                                                  (torch.zeros_like(m) if s is not None else None))


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
