"""Rules of :func:`signalprop.predict` for functional ops: products of activations, weight ops on known
weights, embeddings, masking, sums, normalizations called as functions, and interpolation.

**Product of two activations** (``matmul``, ``bmm``, ``@``): ``out_ij = sum_l A_il B_lj`` with A and B
independent. Per output element

    E[out^2] = sum_l E[A_l^2] E[B_l^2] + sum_{l != l'} E[A_l A_l'] E[B_l B_l'],

the first sum the product of the second moments over the contracted size k (``k E[A^2] E[B^2]`` for
uniform moments), the second the means and the shared parts: two elements of A along the contracted dim
are in one channel (covariance ``s_A``) unless that dim is A's channel dim, and likewise for B. A known
operand (a weight) has zero variance, which makes this ``sum_l E[A_l^2] W_lj^2``. A softmax output
(``simplex``) has ``sum_{l != l'} E[P_l P_l'] = 1 - E[sum_l P_l^2]`` exactly, because its rows sum to one.
The output's channel is B's columns (``P @ V``, ``x @ W``) or A's rows (``q @ k^T``: each query row shares
its query), with the covariance of two elements of one such channel worked out the same way. Backward:
``E[g_A^2] = E[g^2] @ E[B^2]^T`` and ``E[g_B^2] = E[A^2]^T @ E[g^2]`` (gradients of distinct output elements
uncorrelated); the gradient of a softmax output keeps only B's part that varies along the contracted dim
(``v - s``), since the softmax's Jacobian removes what is common to the row.

**Interpolation** (``upsample_bilinear2d``, linear, bicubic, trilinear): each output is ``sum_k a_k x_k``
over neighbours of one channel with the interpolation weights a_k (summing to one), so
``Var = sum_k a_k^2 (v - s) + (sum_k a_k)^2 s`` (Var = v for a copy, (v + s) / 2 + ... in between), per
output position. The weights are read off the op itself: interpolation is separable, so replaying the
node on an identity (one-hot) probe per spatial dim gives each dimension's matrix exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from ..graph._ir import Node, Ref
from . import _pool as P
from . import _rules as R
from ._rules import Back, Moments

Step = tuple[Moments, "Back | None", list[int]]
BROADCAST_OPS = frozenset({"add", "sub", "rsub", "mul", "div", "where", "masked_fill"})
"""Elementwise ops whose inputs broadcast: an input's gradient sums over its copies."""


def operand(n: Node, pos: int, ins: dict[int, Moments], key: str = "other") -> tuple[Moments, int | None]:
    """The moments of argument ``pos`` (or keyword ``key``) and its node index (None for a literal)."""
    v = n.args[pos] if len(n.args) > pos else n.kwargs.get(key, 0.0)
    if isinstance(v, Ref):
        return ins[v.index], v.index
    return R.const(float(v) if not isinstance(v, torch.Tensor) else v), None


def bshape(*xs: Moments) -> tuple[int, ...]:
    return tuple(np.broadcast_shapes(*(x.shape or () for x in xs)))


def _nd(t: torch.Tensor, nd: int) -> torch.Tensor:
    return t.reshape((1,) * (nd - t.dim()) + tuple(t.shape)) if t.dim() < nd else t


def _arg(n: Node, i: int, key: str, default: Any) -> Any:
    v = n.args[i] if len(n.args) > i else n.kwargs.get(key, default)
    return default if v is None else v


def _literal(n: Node, i: int, key: str, default: Any) -> Any:
    """An argument given as a literal; ``default`` when it is a graph value or missing."""
    v = _arg(n, i, key, default)
    return default if isinstance(v, Ref) else v


def _known(ins: dict[int, Moments], v: Any) -> Any:
    """The value of a Ref argument that is known (a weight), the literal itself, or None."""
    if isinstance(v, Ref):
        x = ins[v.index]
        return x.value if x.known else None
    return v


# ---- matmul ------------------------------------------------------------------------------------------------
def matmul_moments(a: Moments, b: Moments, center: bool = False) -> tuple[Moments, Back]:
    """``a @ b`` for operands of two or more dims (module docstring). ``center``: the output feeds a softmax,
    so a's gradient keeps only b's part that varies along the contracted dim."""
    sa, sb = tuple(a.shape or ()), tuple(b.shape or ())
    na, nb = len(sa), len(sb)
    k, n_rows, m_cols = sa[-1], sa[-2], sb[-1]
    batch = tuple(np.broadcast_shapes(sa[:-2], sb[:-2]))
    out_shape = batch + (n_rows, m_cols)
    nd = len(out_shape)

    def ka(t: torch.Tensor) -> torch.Tensor:
        t = _nd(t, na)
        return t.expand(*t.shape[:-1], k)

    def kb(t: torch.Tensor) -> torch.Tensor:
        t = _nd(t, nb)
        return t.expand(*t.shape[:-2], k, t.shape[-1])

    m_a, v_a, s_a = ka(a.mean), ka(a.var), ka(a.shared)
    m_b, v_b, s_b = kb(b.mean), kb(b.var), kb(b.shared)
    q_a, q_b = m_a * m_a + v_a, m_b * m_b + v_b
    ca = None if a.chan is None else a.chan % na
    cb = None if b.chan is None else b.chan % nb
    simplex = a.simplex is not None
    alpha_a = not simplex and a.s is not None and ca != na - 1  # A's contracted dim within one channel
    alpha_b = b.s is not None and cb != nb - 2
    s_ac = s_a.mean(-1, keepdim=True) if alpha_a else None
    s_bc = s_b.mean(-2, keepdim=True) if alpha_b else None
    mean = m_a @ m_b
    m2 = (m_a * m_a) @ (m_b * m_b)
    s1a, s2a = m_a.sum(-1, keepdim=True), (m_a * m_a).sum(-1, keepdim=True)
    s1b, s2b = m_b.sum(-2, keepdim=True), (m_b * m_b).sum(-2, keepdim=True)
    lam: torch.Tensor | float = 1.0
    if simplex:
        assert a.simplex is not None
        w = _nd(a.simplex, na)
        spread = (1 - s2a).clamp_min(0)
        lam = torch.where(spread > 1e-12, (1 - w).clamp_min(0) / spread.clamp_min(1e-12), torch.ones_like(spread))
    off = lam * (mean * mean - m2)
    if s_ac is not None:
        off = off + s_ac * (s1b * s1b - s2b)
    if s_bc is not None:
        off = off + lam * s_bc * (s1a * s1a - s2a)
    if s_ac is not None and s_bc is not None:
        off = off + s_ac * s_bc * k * (k - 1)
    var = (q_a @ q_b + off - mean * mean).clamp_min(0)
    chan: int | None = None
    cov: torch.Tensor | None = None
    if cb == nb - 1 or (b.known and not a.known):
        chan = nd - 1  # two rows of one column
        cov = (m_a * m_a) @ v_b
        if a.s is not None and not simplex and ca in (na - 1, None):
            cov = cov + s_a @ q_b
        if s_bc is not None:
            cov = cov + s_bc * (s1a * s1a - s2a)
    elif cb == nb - 2 or ca == na - 2:
        chan = nd - 2  # two columns of one row
        cov = v_a @ (m_b * m_b)
        if b.s is not None and cb == nb - 2:
            cov = cov + q_a @ s_b
        if s_ac is not None:
            cov = cov + s_ac * (s1b * s1b - s2b)
    corr = (m_cols - 1) / k if b.known else max(a.corr, b.corr)
    out = Moments(mean, var, None, None, max(a.lv, b.lv), a.rnd or b.rnd or b.known, out_shape,
                  R.clamp_shared(cov, var), chan, corr=corr)
    if simplex:  # the softmax runs over the contracted dim: drop b's part common along it
        g_b = v_b - s_bc if s_bc is not None else v_b
    elif center:  # the softmax runs over b's columns: drop b's part common to a row
        g_b = v_b - s_b if (b.s is not None and cb == nb - 2) else v_b
    else:
        g_b = q_b

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        g = _nd(g2, nd)
        g_m = g.expand(*g.shape[:-1], m_cols)
        ga = g_m @ _nd(g_b, nb).expand(*g_b.shape[:-1], m_cols).transpose(-1, -2)
        g_n = g.expand(*g.shape[:-2], n_rows, g.shape[-1])
        gb = _nd(q_a, na).expand(*q_a.shape[:-2], n_rows, k).transpose(-1, -2) @ g_n
        return [_fit(ga, batch + (n_rows, k), sa), _fit(gb, batch + (k, m_cols), sb)]

    return out, back


def _fit(g: torch.Tensor, full: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    """A gradient moment for an operand broadcast along batch dims: summed over its copies."""
    pad = len(full) - len(shape)
    padded = (1,) * pad + tuple(shape)
    g = _nd(g, len(full))
    factor = 1.0
    dims = []
    for i, (f, s) in enumerate(zip(full, padded)):
        if s == 1 and f > 1:
            if g.shape[i] == 1:
                factor *= f
            else:
                dims.append(i)
    if dims:
        g = g.sum(dims, keepdim=True)
    g = g * factor
    return g.reshape(g.shape[pad:]) if pad else g


def matmul(n: Node, ins: dict[int, Moments]) -> Step | None:
    """``a @ b`` (``matmul``, ``bmm``, ``mm``) of two matrices or batches of them; None for a vector operand."""
    a, ia = operand(n, 0, ins, "input")
    b, ib = operand(n, 1, ins, "other" if "other" in n.kwargs else "mat2")
    if len(a.shape or ()) < 2 or len(b.shape or ()) < 2:
        return None
    out, back = matmul_moments(a, b)
    return _used(out, back, [(ia, a), (ib, b)])


def _used(out: Moments, back: Back, pairs: list[tuple[int | None, Moments]]) -> Step:
    """Keep the backward's entries for the operands that are data (not literals, not known)."""
    keep = [pos for pos, (i, v) in enumerate(pairs) if i is not None and not v.known]
    used = [pairs[pos][0] for pos in keep]

    def back2(g2: torch.Tensor) -> list[torch.Tensor | None]:
        gs = back(g2)
        return [gs[pos] for pos in keep]

    return out, back2, [i for i in used if i is not None]


# ---- weight ops on known weights --------------------------------------------------------------------------
def linear_fn(n: Node, ins: dict[int, Moments]) -> Step:
    """``F.linear(x, W, b)``: a weight layer when W is known (a parametrization's output, a custom layer's
    parameter, a tied embedding), else the product of two activations."""
    x, ix = operand(n, 0, ins, "input")
    w = _known(ins, _arg(n, 1, "weight", None))
    bias = _known(ins, _arg(n, 2, "bias", None))
    if not isinstance(w, torch.Tensor) or ix is None:
        wm, iw = operand(n, 1, ins, "weight")
        out, back = matmul_moments(x, _transposed(wm))
        return _used(out, back, [(ix, x), (iw, wm)])
    fan_in, fan_out = float(w.shape[-1]), float(w.shape[0])
    out, back = R.weight_op(R.mean_square(w), fan_in, fan_out, fan_in,
                            bias if isinstance(bias, torch.Tensor) else None, x, tuple(n.shape or ()), False)
    return out, back, [ix]


def _transposed(x: Moments) -> Moments:
    def t(v: torch.Tensor | None) -> torch.Tensor | None:
        if v is None:
            return None
        v = _nd(v, len(x.shape or ()))
        return v.transpose(-1, -2)

    shape = tuple(x.shape or ())
    mean, var = t(x.mean), t(x.var)
    assert mean is not None and var is not None
    nd = len(shape)
    chan = None if x.chan is None else {nd - 1: nd - 2, nd - 2: nd - 1}.get(x.chan % nd, x.chan % nd)
    return Moments(mean, var, None, None, x.lv, x.rnd, shape[:-2] + (shape[-1], shape[-2]), t(x.s), chan,
                   known=x.known, value=None if not x.known else x.value.transpose(-1, -2), corr=x.corr)


def conv_fn(n: Node, ins: dict[int, Moments]) -> Step:
    """``F.conv1d/2d/3d`` and ``aten.convolution`` on a known weight: a weight layer with the fans of
    ``signalprop.init.fans`` (fan_in = in/groups * prod(k); fan_out = out/groups * prod(k) / prod(stride);
    transposed: the roles swapped)."""
    x, ix = operand(n, 0, ins, "input")
    w = _known(ins, _arg(n, 1, "weight", None))
    bias = _known(ins, _arg(n, 2, "bias", None))
    if not isinstance(w, torch.Tensor) or ix is None:
        return x, None, []
    k = math.prod(w.shape[2:])
    stride = _arg(n, 3, "stride", 1)
    strides = [int(s) for s in stride] if isinstance(stride, list | tuple) else [int(stride)] * (w.dim() - 2)
    st = math.prod(strides) or 1
    if n.name == "convolution":
        transposed = bool(_arg(n, 6, "transposed", False))
        groups = int(_arg(n, 8, "groups", 1))
    else:  # conv{1,2,3}d and conv_transpose{1,2,3}d both have groups at position 6
        transposed = n.name.startswith("conv_transpose")
        groups = int(_arg(n, 6, "groups", 1))
    if transposed:
        fan_in, fan_out = w.shape[0] / groups * k / st, float(w.shape[1] * k)
        n_in = float(w.shape[0])
    else:
        fan_in, fan_out = float(w.shape[1] * k), w.shape[0] / groups * k / st
        n_in = float(w.shape[1] * groups)
    c_in = w.shape[0] if transposed else w.shape[1] * groups
    c_out = w.shape[1] * groups if transposed else w.shape[0]
    out, back = R.weight_op(R.mean_square(w), float(fan_in), float(fan_out), n_in,
                            bias if isinstance(bias, torch.Tensor) else None, x, tuple(n.shape or ()), True,
                            R.overlap_corr(c_out, c_in, k, 1 if transposed else st))
    return out, back, [ix]


def embedding_fn(n: Node, ins: dict[int, Moments]) -> Step | None:
    """``aten.embedding(weight, ids)`` (``F.embedding(ids, weight)``): the table is the floating operand."""
    refs = [a for a in n.args[:2] if isinstance(a, Ref)]
    vals = [ins[r.index] for r in refs]
    w = next((v for v in vals if v.known and P._floating(v.value)), None)
    idx = next((v for v in vals if v is not w), None)
    if w is None:  # a table computed from data: not an embedding this rule knows
        return None
    out, back = R.embedding(w.value, idx, tuple(n.shape or ()))
    return out, back, []


# ---- masking and reductions -----------------------------------------------------------------------------
def where(n: Node, ins: dict[int, Moments]) -> Step:
    """``where(cond, a, b)`` and ``masked_fill(x, mask, v)`` with a known condition: each element's moments
    are those of the operand it takes."""
    if n.name == "masked_fill":
        cond_ref, (a, ia), (b, ib) = n.args[1], operand(n, 2, ins, "value"), operand(n, 0, ins, "input")
    else:
        cond_ref, (a, ia), (b, ib) = n.args[0], operand(n, 1, ins, "input"), operand(n, 2, ins, "other")
    cond = ins[cond_ref.index] if isinstance(cond_ref, Ref) else R.const(cond_ref)
    if not cond.known or not isinstance(cond.value, torch.Tensor):
        x = a if not a.known else b
        return x, (lambda g2: [g2]), [i for i in (ia, ib) if i is not None and not ins[i].known][:1]
    c = cond.value.bool()

    def sel(ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        return torch.where(c, ta, tb)

    shape = tuple(np.broadcast_shapes(tuple(c.shape), a.shape or (), b.shape or ()))
    mean, var = sel(a.mean, b.mean), sel(a.var, b.var)
    shared = sel(a.shared, b.shared) if (a.s is not None or b.s is not None) else None
    out = Moments(mean, var, sel(a.fourth(), b.fourth()), None, max(a.lv, b.lv), a.rnd or b.rnd, shape,
                  R.clamp_shared(shared, var), a.chan if a.chan is not None else b.chan, corr=max(a.corr, b.corr))
    zero = torch.zeros((), dtype=torch.float64)

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        return [torch.where(c, g2, zero), torch.where(c, zero, g2)]

    return _used(out, back, [(ia, a), (ib, b)])


def sum_reduce(n: Node, ins: dict[int, Moments]) -> Step:
    """``x.sum(dims)``: k times the mean over the same k elements (variances and shared parts k^2 times);
    each input element receives its sum's gradient."""
    x, ix = operand(n, 0, ins, "input")
    out, back = P.mean_reduce(n, x)
    k = math.prod(x.shape or ()) / max(math.prod(out.shape or ()), 1)
    s = None if out.s is None else out.s * k * k
    res = Moments(out.mean * k, out.var * k * k, None, None, out.lv, out.rnd, out.shape, s, out.chan, corr=x.corr)
    return res, (lambda g2: back(g2 * k * k)), [ix] if ix is not None else []


def _norm_fn(n: Node, ins: dict[int, Moments]) -> Step:
    """Normalizations called as functions (``F.layer_norm``, ``F.group_norm``, ``F.batch_norm``,
    ``F.rms_norm``): the module rules with the weights read from the arguments."""
    x, ix = operand(n, 0, ins, "input")

    def val(i: int, key: str) -> Any:
        return _known(ins, _arg(n, i, key, None))

    if n.name == "layer_norm":
        m = SimpleNamespace(normalized_shape=tuple(_arg(n, 1, "normalized_shape", ())), weight=val(2, "weight"),
                            bias=val(3, "bias"), eps=float(_arg(n, 4, "eps", 1e-5)))
        out, back = R.layer_norm(m, x)  # type: ignore[arg-type]
    elif n.name == "rms_norm":
        eps = _arg(n, 3, "eps", None)
        m = SimpleNamespace(normalized_shape=tuple(_arg(n, 1, "normalized_shape", ())), weight=val(2, "weight"),
                            bias=None, eps=float(eps) if eps is not None else 1e-6)
        out, back = R.layer_norm(m, x, rms=True)  # type: ignore[arg-type]
    elif n.name == "group_norm":
        m = SimpleNamespace(num_groups=int(_arg(n, 1, "num_groups", 1)), weight=val(2, "weight"),
                            bias=val(3, "bias"), eps=float(_arg(n, 4, "eps", 1e-5)))
        out, back = R.group_norm(m, x)  # type: ignore[arg-type]
    else:  # aten.batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps)
        functional = n.fn is torch.nn.functional.batch_norm
        order = (3, 4, 1, 2) if functional else (1, 2, 3, 4)
        training = bool(_arg(n, 5, "training", False))
        m = SimpleNamespace(weight=val(order[0], "weight"), bias=val(order[1], "bias"),
                            running_mean=None if training else val(order[2], "running_mean"),
                            running_var=None if training else val(order[3], "running_var"),
                            training=training, eps=float(_arg(n, 7, "eps", 1e-5)))
        out, back = R.batch_norm(m, x)
    return out, back, [ix] if ix is not None else []


# ---- interpolation ----------------------------------------------------------------------------------------
def interpolate(n: Node, ins: dict[int, Moments]) -> Step:
    """Linear, bilinear, bicubic or trilinear upsampling (module docstring): per spatial dim the exact
    interpolation matrix U_d, replayed from the node on a one-hot probe."""
    x, ix = operand(n, 0, ins, "input")
    if ix is None:
        return x, None, []
    shape = tuple(x.shape or ())
    nsp = len(shape) - 2
    mats = []
    for d in range(nsp):
        size = shape[2 + d]
        probe_shape = [1, size] + [1] * nsp
        probe_shape[2 + d] = size
        eye = torch.eye(size, dtype=torch.float64).reshape(probe_shape)
        out = P.replay(n, {ix: eye})
        idx = [0] + [slice(None)] + [slice(None) if e == d else 0 for e in range(nsp)]
        mats.append(out[tuple(idx)].transpose(0, 1).to(torch.float64))  # (out_d, in_d)
    sq = [u * u for u in mats]
    nd = len(shape)
    m, v, s = _nd(x.mean, nd), _nd(x.var, nd), _nd(x.shared, nd)
    ones = torch.ones((1,) * nd, dtype=torch.float64)
    row = _sep(ones, mats)
    mean = _sep(m, mats)
    shared = _sep(s, mats) * row
    var = (_sep((v - s).clamp_min(0), sq) + shared).clamp_min(0)
    out = Moments(mean, var, None, None, x.lv, x.rnd, tuple(n.shape or ()),
                  R.clamp_shared(shared, var) if x.s is not None else None, x.chan, corr=x.corr)

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        return [_sep_t(_nd(g2, nd), sq, shape)]

    return out, back, [ix]


def _sep(t: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """Apply U_d along spatial dim 2 + d of a compact tensor (a size-1 dim is constant: times U_d's row sums)."""
    for d, u in enumerate(mats):
        ax = 2 + d
        if t.shape[ax] == 1:
            t = t * u.sum(1).reshape([-1 if i == ax else 1 for i in range(t.dim())])
        else:
            t = torch.tensordot(t, u, dims=([ax], [1])).movedim(-1, ax)
    return t


def _sep_t(g: torch.Tensor, mats: list[torch.Tensor], in_shape: tuple[int, ...]) -> torch.Tensor:
    """The transpose of :func:`_sep` (column sums for a constant gradient)."""
    for d, u in enumerate(mats):
        ax = 2 + d
        if g.shape[ax] == 1:
            g = g * u.sum(0).reshape([-1 if i == ax else 1 for i in range(g.dim())])
        else:
            g = torch.tensordot(g, u, dims=([ax], [0])).movedim(-1, ax)
    return g


FN_RULES: dict[str, Callable[[Node, dict[int, Moments]], Step | None]] = {
    "matmul": matmul, "bmm": matmul, "mm": matmul, "linear": linear_fn, "where": where, "masked_fill": where, "sum": sum_reduce,
    "mean": lambda n, ins: _mean(n, ins), "embedding": embedding_fn,
    "conv1d": conv_fn, "conv2d": conv_fn, "conv3d": conv_fn, "convolution": conv_fn,
    "conv_transpose1d": conv_fn, "conv_transpose2d": conv_fn, "conv_transpose3d": conv_fn,
    "layer_norm": _norm_fn, "rms_norm": _norm_fn, "group_norm": _norm_fn, "batch_norm": _norm_fn,
    "upsample_bilinear2d": interpolate, "upsample_linear1d": interpolate, "upsample_bicubic2d": interpolate,
    "upsample_trilinear3d": interpolate, "_upsample_bilinear2d_aa": interpolate,
    "_upsample_bicubic2d_aa": interpolate,
}


def _mean(n: Node, ins: dict[int, Moments]) -> Step:
    x, ix = operand(n, 0, ins, "input")
    out, back = P.mean_reduce(n, x)
    return out, back, [ix] if ix is not None else []


def add(n: Node, ins: dict[int, R.Moments]) -> Step:
    """Sum (or difference) of independent values: means add (subtract), variances and shared parts add."""
    a, ia = operand(n, 0, ins, "input")
    b, ib = operand(n, 1, ins, "other")
    alpha = float(_literal(n, 2, "alpha", 1.0))
    sign = -1.0 if n.name == "sub" else 1.0
    if n.name == "rsub":
        a, b, ia, ib, sign = b, a, ib, ia, -1.0
    s = sign * alpha
    mean = a.mean + s * b.mean
    var = a.var + s * s * b.var
    shared = a.shared + s * s * b.shared if (a.s is not None or b.s is not None) else None
    va, vb = float(a.var.mean()), float(b.var.mean())
    lv = (va * va * a.lv + (s * s * vb) ** 2 * b.lv) / ((va + s * s * vb) ** 2) if va + vb > 0 else 0.0
    chan = a.chan if a.chan is not None else b.chan
    out = R.Moments(mean, var, None, None, lv, a.rnd or b.rnd, bshape(a, b), R.clamp_shared(shared, var), chan,
                    corr=max(a.corr, b.corr))
    used = [i for i, v in ((ia, a), (ib, b)) if i is not None and not v.known]

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        return [g2 if i == ia else g2 * s * s for i in used]

    return out, back, used


def mul(n: Node, ins: dict[int, R.Moments]) -> Step:
    """Product of independent values: E[ab] = E[a]E[b], E[(ab)^2] = E[a^2]E[b^2]; division by a known value
    multiplies by its reciprocal."""
    a, ia = operand(n, 0, ins, "input")
    if n.name == "neg":
        b, ib = R.const(-1.0), None
    else:
        b, ib = operand(n, 1, ins, "other")
        if n.name == "div":
            b = R.const(1.0 / b.mean)
            ib = None
    mean = a.mean * b.mean
    var = (a.q * b.q - mean * mean).clamp_min(0)
    shared = None
    if a.s is not None or b.s is not None:  # E[(ab)_1 (ab)_2] = E[a_1 a_2] E[b_1 b_2] for independent a, b
        shared = a.cross * b.cross - mean * mean
    chan = a.chan if a.chan is not None else b.chan
    out = R.Moments(mean, var, None, None, max(a.lv, b.lv), a.rnd or b.rnd, bshape(a, b),
                    R.clamp_shared(shared, var), chan, corr=max(a.corr, b.corr))
    used = [i for i, v in ((ia, a), (ib, b)) if i is not None and not v.known]

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        return [g2 * (b.q if i == ia else a.q) for i in used]

    return out, back, used
