"""Attention in :func:`signalprop.predict`: softmax over scores, and ``scaled_dot_product_attention``.

**Softmax.** The scores of one row (one query) are taken as independent Gaussians around their known
means (an additive mask or bias, ``-inf`` where masked) with the within-row variance ``sigma^2`` (the
score variance less the part shared by the whole row). The mean weights are ``p = softmax(mean scores)``,
and what the output's variance needs is ``W = E[sum_j P_j^2]``: for n equal means and i.i.d.
``z_j ~ N(0, sigma^2)``, ``W = n E[e^{2 z_1} / S^2]`` with ``S = sum_j e^{z_j}``, computed exactly through
``1 / S^2 = int_0^inf t e^{-t S} dt``:

    W(n, sigma^2) = n int_0^inf t E[e^{2z} e^{-t e^z}] E[e^{-t e^z}]^(n-1) dt,

two one-dimensional Gaussian expectations per t and a quadrature over log t (matches Monte Carlo to 3
digits; the log-normal shortcut ``e^{sigma^2} / n`` is 3x too high at sigma^2 = 2, n = 64). Unequal
means (masks, biases) enter through the effective count ``n = 1 / sum_j p_j^2``. W runs from ``1/n``
(uniform attention, sigma^2 = 0: the state of a transformer at its usual small init) to 1 (one key).

**Attention output.** ``out_i = sum_j P_ij v_j`` with P independent of the values: ``E[out^2] = W E[v^2] +
(1 - W) E[v_a v_b]``, i.e. ``Var = W (v - s) + s`` (s: the values' covariance across positions; the
simplex matmul of ``_ops``). The gradient reaching the values is ``sum_i E[P_ij^2] E[g_i^2]``; the scores
receive ``E[dP^2] E[P_j^2 (1 - 2 P_j + sum_l P_l^2)]`` (the softmax Jacobian ``P_j (dP_j - sum_l P_l dP_l)``
with ``dP`` centred across keys), whose row sum ``E[sum P^2] - 2 E[sum P^3] + E[(sum P^2)^2]`` comes from
the same integrals (:func:`softmax_sums`; it vanishes as attention becomes one-hot), and the queries and
keys the products of that with the other side's spread.

**Assumptions, stated in the band.** Scores Gaussian and independent across keys, and independent of
the values; at the small init of transformers both hold well (attention is nearly uniform). As attention
concentrates they hold less, so the finite-width band of everything downstream is widened by
``log(W / W_uniform)`` on each side (90%), the full departure from uniform attention. Attention dropout
(``dropout_p``, training mode) is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..graph._ir import Node, Ref
from . import _ops as O
from . import _rules as R
from ._rules import Back, Moments

Step = tuple[Moments, "Back | None", list[int]]
_MASKED = -1e30  # an additive score at or below this is a mask (-inf, finfo.min)


@lru_cache(maxsize=64)
def _laplace_tables(sigma2: float) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(u = log t grid, t, [E[e^{k z} e^{-t e^z}] for k = 0..4]) for z ~ N(0, sigma2) (module docstring)."""
    import numpy as np

    z, w = np.polynomial.hermite_e.hermegauss(96)
    zt = torch.tensor(z, dtype=torch.float64) * math.sqrt(sigma2)
    wt = torch.tensor(w / w.sum(), dtype=torch.float64)
    sd = math.sqrt(sigma2)
    u = torch.linspace(-12.0 * sd - 60.0, 12.0 * sd + 10.0, 3000, dtype=torch.float64)
    t = u.exp()
    ez = zt.exp()
    ex = wt * torch.exp(-t[:, None] * ez[None, :])
    return u, t, [(ex * ez**k).sum(1) for k in range(5)]


def softmax_sums(n_eff: torch.Tensor, sigma2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(E[sum_j P_j^2], E[sum_j P_j^3], E[(sum_j P_j^2)^2])`` for softmax rows of ``n_eff`` i.i.d.
    N(0, sigma2) scores, broadcast together: with ``phi_k(t) = E[e^{kz} e^{-t e^z}]`` and
    ``1 / S^m = int_0^inf t^(m-1) / (m-1)! e^{-t S} dt``,

        E[sum P^2]      = n     int t   phi_2 phi_0^(n-1) dt,
        E[sum P^3]      = n     int t^2 / 2 phi_3 phi_0^(n-1) dt,
        E[(sum P^2)^2]  = n     int t^3 / 6 phi_4 phi_0^(n-1) dt + n (n-1) int t^3 / 6 phi_2^2 phi_0^(n-2) dt.

    Uniform rows (sigma2 = 0): 1/n, 1/n^2, 1/n^2."""
    n_eff, sigma2 = torch.broadcast_tensors(n_eff.to(torch.float64), sigma2.to(torch.float64))
    outs = [torch.empty_like(n_eff) for _ in range(3)]
    flat_n, flat_s = n_eff.reshape(-1), sigma2.reshape(-1)
    flats = [o.reshape(-1) for o in outs]
    s_round = (flat_s.clamp(0, 50) * 1e4).round() / 1e4
    for s_val in torch.unique(s_round).tolist():
        pick = s_round == s_val
        ns = flat_n[pick].clamp_min(1.0)
        if s_val <= 1e-8:
            flats[0][pick], flats[1][pick], flats[2][pick] = 1.0 / ns, 1.0 / ns**2, 1.0 / ns**2
            continue
        u, t, ph = _laplace_tables(float(s_val))
        uniq, inv = torch.unique(ns, return_inverse=True)
        log0 = ph[0].clamp_min(1e-300).log()
        pw = torch.exp((uniq[:, None] - 1) * log0[None, :])  # phi_0^(n-1)
        pw2 = torch.exp((uniq[:, None] - 2).clamp_min(0) * log0[None, :])

        w2 = uniq * _integral(t * ph[2] * pw, t, u)
        w3 = uniq * _integral(t**2 / 2 * ph[3] * pw, t, u)
        w22 = (uniq * _integral(t**3 / 6 * ph[4] * pw, t, u)
               + uniq * (uniq - 1) * _integral(t**3 / 6 * ph[2] ** 2 * pw2, t, u))
        w2 = torch.maximum(w2, 1.0 / uniq).clamp_max(1.0)
        flats[0][pick] = w2[inv]
        flats[1][pick] = torch.maximum(w3, 1.0 / uniq**2).clamp_max(1.0)[inv]
        flats[2][pick] = torch.maximum(w22, w2 * w2).clamp_max(1.0)[inv]
    return outs[0], outs[1], outs[2]


def _integral(f: torch.Tensor, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """int f dt over the grid u = log t (dt = t du), along the last dim."""
    return torch.trapezoid(f * t, u, dim=-1)


def attention_w(n_eff: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """``W = E[sum_j P_j^2]`` for softmax rows of effective size ``n_eff`` and within-row score variance
    ``sigma2`` (broadcast together), exact for i.i.d. Gaussian scores (:func:`softmax_sums`)."""
    return softmax_sums(n_eff, sigma2)[0]


def softmax_moments(x: Moments, dim: int = -1) -> tuple[Moments, Back]:
    """Softmax over ``dim`` of scores with moments ``x`` (module docstring). The output carries
    ``simplex`` (W per row) when ``dim`` is the last one, for the product with the values that follows."""
    shape = tuple(x.shape or ())
    nd = len(shape)
    d = dim % nd
    size = shape[d]
    mean = O._nd(x.mean, nd)
    mean = mean.expand(*[size if i == d else mean.shape[i] for i in range(nd)])
    p = torch.softmax(mean.clamp_min(-1e300), d)
    p = torch.nan_to_num(p, nan=1.0 / size)
    w0 = (p * p).sum(d, keepdim=True)
    row_shared = x.s is not None and x.chan is not None and x.chan % nd != d
    spread = (O._nd(x.var, nd) - (O._nd(x.shared, nd) if row_shared else 0.0)).clamp_min(0)
    allowed = mean > _MASKED
    spread = torch.where(allowed, spread, torch.zeros_like(spread)) if spread.shape == allowed.shape else spread
    sigma2 = (p * spread).sum(d, keepdim=True) if spread.shape[d] == size else spread
    w, w3, w22 = softmax_sums(1.0 / w0, sigma2)
    w = torch.maximum(w, w0)
    q = p * p * (w / w0)
    var = (q - p * p).clamp_min(0)
    widen = float(torch.log(w / w0).clamp_min(0).mean()) / R.Z90
    simplex = w if d == nd - 1 else None
    out = Moments(p, var, None, None, x.lv + widen * widen, x.rnd, shape, None, None, corr=x.corr, simplex=simplex)
    factor = q * ((w - 2 * w3 + w22) / w).clamp_min(0)  # E[P_j^2 (1 - 2 P_j + sum_l P_l^2)], row total split as q

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        return [g2 * factor]

    return out, back


def softmax(n: Node, ins: dict[int, Moments]) -> Step:
    x, ix = O.operand(n, 0, ins, "input")
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", -1)
    if ix is None or not isinstance(dim, int):
        return x, None, []
    out, back = softmax_moments(x, dim)
    return out, back, [ix]


def sdpa(n: Node, ins: dict[int, Moments]) -> Step | None:
    """``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)``:
    scores ``scale * q @ k^T`` (+ the known mask, causal masking), softmax, times the values; the
    gradient goes back through the same three steps (module docstring)."""
    names = ("query", "key", "value")
    parts = [O.operand(n, i, ins, key) for i, key in enumerate(names)]
    (q, iq), (k, ik), (v, iv) = parts
    if any(len(x.shape or ()) < 2 for x, _ in parts):
        return None
    mask_arg = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
    causal = bool(_arg(n, 5, "is_causal", False))
    scale = _arg(n, 6, "scale", None)
    d = (q.shape or ())[-1]
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(d)
    hq, hk = _heads(q), _heads(k)
    group = max(hq // hk, 1) if hq and hk else 1
    if group > 1:
        k, v = _repeat_heads(k, group), _repeat_heads(v, group)
    k_t = O._transposed(k)
    scores, back_qk = O.matmul_moments(q, k_t, center=True)
    scores = _scaled(scores, scale)
    bias = _mask(ins, mask_arg, causal, (q.shape or ())[-2], (k.shape or ())[-2])
    if bias is not None:
        scores = R.Moments(scores.mean + bias, scores.var, None, None, scores.lv, scores.rnd,
                           tuple(np.broadcast_shapes(scores.shape or (), tuple(bias.shape))),
                           scores.s, scores.chan, corr=scores.corr)
    probs, back_sm = softmax_moments(scores, -1)
    out, back_pv = O.matmul_moments(probs, v)
    out.shape = tuple(n.shape or out.shape or ())
    used = [(iq, q), (ik, k), (iv, v)]

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        g_p, g_v = back_pv(g2)
        assert g_p is not None
        g_s = back_sm(g_p)[0]
        assert g_s is not None
        g_q, g_kt = back_qk(g_s * scale * scale)
        g_k = None if g_kt is None else g_kt.transpose(-1, -2)
        return [g_q, _heads_back(g_k, k, group), _heads_back(g_v, v, group)]

    keep = [pos for pos, (i, x) in enumerate(used) if i is not None and not x.known]

    def back_used(g2: torch.Tensor) -> list[torch.Tensor | None]:
        gs = back(g2)
        return [gs[pos] for pos in keep]

    return out, back_used, [used[pos][0] for pos in keep if used[pos][0] is not None]  # type: ignore[misc]


def _arg(n: Node, i: int, key: str, default: Any) -> Any:
    v = n.args[i] if len(n.args) > i else n.kwargs.get(key, default)
    return default if v is None or isinstance(v, Ref) else v


def _heads(x: Moments) -> int:
    shape = tuple(x.shape or ())
    return int(shape[-3]) if len(shape) >= 3 else 0


def _repeat_heads(x: Moments, group: int) -> Moments:
    """Keys or values of grouped-query attention, each head repeated for the ``group`` query heads."""
    shape = tuple(x.shape or ())
    nd = len(shape)

    def rep(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = O._nd(t, nd)
        return t.repeat_interleave(group, dim=-3) if t.shape[-3] > 1 else t

    mean, var = rep(x.mean), rep(x.var)
    assert mean is not None and var is not None
    new_shape = shape[:-3] + (shape[-3] * group,) + shape[-2:]
    return Moments(mean, var, None, None, x.lv, x.rnd, new_shape, rep(x.s), x.chan, corr=x.corr)


def _heads_back(g: torch.Tensor | None, x: Moments, group: int) -> torch.Tensor | None:
    """A key or value head shared by ``group`` query heads (grouped-query attention) collects their
    gradients (independent, so their second moments add)."""
    if g is None or group == 1:
        return g
    if g.shape[-3] == 1:
        return g * group
    return g.reshape(*g.shape[:-3], g.shape[-3] // group, group, *g.shape[-2:]).sum(-3)


def _scaled(x: Moments, c: float) -> Moments:
    return R.Moments(x.mean * c, x.var * c * c, None, None, x.lv, x.rnd, x.shape,
                     None if x.s is None else x.s * c * c, x.chan, corr=x.corr)


def _mask(ins: dict[int, Moments], mask_arg: Any, causal: bool, lq: int, lk: int) -> torch.Tensor | None:
    """The additive score bias: a boolean mask (False: -inf), a float mask as given, causal masking."""
    bias: torch.Tensor | None = None
    if isinstance(mask_arg, Ref):
        m = ins[mask_arg.index]
        if m.known and isinstance(m.value, torch.Tensor):
            mv = m.value
            if mv.dtype == torch.bool:
                bias = torch.zeros(mv.shape, dtype=torch.float64).masked_fill(~mv, -math.inf)
            else:
                bias = mv.to(torch.float64)
        else:
            bias = m.mean
    if causal:
        tri = torch.ones(lq, lk, dtype=torch.bool).tril()
        c = torch.zeros(lq, lk, dtype=torch.float64).masked_fill(~tri, -math.inf)
        bias = c if bias is None else bias + c
    return bias


FN_RULES: dict[str, Callable[[Node, dict[int, Moments]], Step | None]] = {
    "softmax": softmax, "scaled_dot_product_attention": sdpa,
}
