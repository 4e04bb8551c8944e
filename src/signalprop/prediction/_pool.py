"""Rules of :func:`signalprop.predict` that combine or move elements: pooling, means, views.

Pooling over positions averages (or takes the maximum of) elements of one channel, which share the
channel's random offset: covariance ``s`` between any two of them (``_predict_rules``). Pooling that runs
over the channel dimension itself combines independent offsets. Views, permutations, concatenation and
padding move each moment tensor alike, and the channel dimension is followed through them by replaying
the op on a probe that holds each element's channel index.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import theory
from .._errors import SignalpropError
from ..graph._ir import Node, Ref, map_refs
from . import _gauss as G
from ._rules import Back, Moments, clamp_shared

Pool = Callable[[torch.Tensor], torch.Tensor]

_MONOTONE = {"relu", "leaky_relu", "relu6", "tanh", "sigmoid", "elu", "selu", "celu", "softplus",
             "softsign", "hardtanh", "erf", "linear", "identity"}


def _monotone(act: Any) -> bool:
    name = theory.activation_name(act).split("(")[0]
    return name in _MONOTONE


def coherent(x: Moments, pooled_dims: int) -> bool:
    """True when pooling over the last ``pooled_dims`` dims stays within channels (the channel dim is
    not among them), so the pooled elements share their channel's offset."""
    nd = len(x.shape or ())
    return x.chan is None or (x.chan % max(nd, 1)) < nd - pooled_dims


def max_pool(x: Moments, k: int, pool: Pool, avg: Pool, same_channel: bool = True) -> tuple[Moments, Back]:
    """Max over windows of k elements of one channel, equicorrelated with covariance s (mean-field).

    When the input is a non-decreasing activation of a Gaussian (ReLU, tanh, ... after a conv), the max of
    phi(u_i) is phi(max u_i) and ``max u_i = m + sqrt(s) g0 + sqrt(v - s) M_k`` (``_predict_gauss``):
    exact for the mean-field input; otherwise the input is taken as Gaussian. Two windows share ``g0``
    (their covariance is the output's s); overlapping windows are taken as disjoint. With
    ``same_channel=False`` (pooling across channels) the window's elements are independent. The gradient
    goes to one element of each window: E[g_in^2] = avg-pool's adjoint applied to E[g^2].
    """
    if x.src is not None and _monotone(x.src[0]):
        act, m_pre, v_pre, s_pre = x.src
    else:
        act, m_pre, v_pre, s_pre = "linear", x.mean, x.var, x.s
    mean, second, fourth, cov = G.max_moments(act, m_pre, v_pre, s_pre if same_channel else None, k)
    var = (second - mean * mean).clamp_min(0)
    shared = torch.minimum(cov.clamp_min(0), var)
    out_shape = tuple(pool(torch.zeros(x.shape)).shape)  # type: ignore[arg-type]
    if _spatially_constant(mean, second, fourth, shared):
        out = Moments(mean, var, fourth, None, x.lv, x.rnd, out_shape, shared, x.chan, corr=x.corr)
        c = math.prod(out_shape) * k / math.prod(x.shape or ())  # windows holding one input
        return out, lambda g2: [g2 * (c / k)]
    out = Moments(pool(x.full(mean)), pool(x.full(var)), pool(x.full(fourth)), None, x.lv, x.rnd,
                  None, pool(x.full(shared)), x.chan, corr=x.corr)
    return out, lambda g2: [_adjoint(avg, x.full(x.mean), g2.expand(out_shape))]


def avg_pool(x: Moments, k: float, pool: Pool, same_channel: bool = True) -> tuple[Moments, Back]:
    """Average of k elements: mean kept; within one channel ``Var = (v - s) / k + s`` with s kept, across
    channels (independent offsets) ``v / k`` and ``s / k``. Backward: the gradient's second moment / k^2
    per window, summed over the windows that hold an input."""
    out_shape = tuple(pool(torch.zeros(x.shape)).shape)  # type: ignore[arg-type]
    sh = x.shared
    if same_channel:
        var, s_out = (x.var - sh).clamp_min(0) / k + sh, sh
    else:
        var, s_out = x.var / k, sh / k
    if _spatially_constant(x.mean, var, s_out):
        out = Moments(x.mean, var, None, None, x.lv, x.rnd, out_shape, clamp_shared(s_out, var), x.chan, corr=x.corr)
        c = math.prod(out_shape) * k / math.prod(x.shape or ())  # windows holding one input
        return out, lambda g2: [g2 * (c / (k * k))]
    pv = pool(x.full(var))
    out = Moments(pool(x.full(x.mean)), pv, None, None, x.lv, x.rnd, None, clamp_shared(pool(x.full(s_out)), pv),
                  x.chan, corr=x.corr)
    return out, lambda g2: [_adjoint(pool, x.full(x.mean), g2.expand(out_shape)) / k]


def mean_reduce(node: Node, x: Moments) -> tuple[Moments, Back]:
    """``x.mean(dims, keepdim)``: the average of k elements, of which those in one channel share s.

    With Cr channels among the reduced elements: ``Var = (v - s) / k + s / Cr``, shared part ``s / Cr``
    (Cr = 1 when the channel dim is not reduced: global average pooling written as ``x.mean((2, 3))``).
    """
    shape = tuple(x.shape or ())
    nd = len(shape)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keep = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
    if dim is None or isinstance(dim, Ref) or (isinstance(dim, list | tuple) and not dim):
        dims = list(range(nd))
    else:
        dims = sorted({int(d) % nd for d in (dim if isinstance(dim, list | tuple) else [dim])})
    k = float(math.prod(shape[d] for d in dims)) or 1.0
    chan = None if x.chan is None else x.chan % nd
    cr = float(shape[chan]) if chan is not None and chan in dims else 1.0
    sh = x.shared
    var = (x.var - sh).clamp_min(0) / k + sh / cr

    def red(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape((1,) * (nd - t.dim()) + tuple(t.shape)) if t.dim() < nd else t
        eff = [d for d in dims if t.shape[d] > 1]
        r = t.mean(eff, keepdim=True) if eff else t
        return r if keep else r.reshape([r.shape[d] for d in range(nd) if d not in dims])

    out_shape = tuple(1 if d in dims else shape[d] for d in range(nd)) if keep else tuple(
        shape[d] for d in range(nd) if d not in dims)
    if chan is None or chan in dims:
        new_chan = None
    else:
        new_chan = chan if keep else chan - sum(1 for d in dims if d < chan)
    s_out = red(sh / cr)
    v_out = red(var)
    out = Moments(red(x.mean), v_out, None, None, x.lv, x.rnd, out_shape, clamp_shared(s_out, v_out), new_chan,
                  corr=x.corr)

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        g = g2.reshape(g2.shape if keep or g2.dim() == nd else
                       [1 if d in dims else g2.shape[len([e for e in range(d) if e not in dims])]
                        for d in range(nd)]) if g2.numel() > 1 else g2.reshape((1,) * nd)
        return [g / (k * k)]

    return out, back


def _spatially_constant(*ts: torch.Tensor) -> bool:
    """True when the compact tensors vary at most along batch and channel (dims 0 and 1)."""
    return all(t.dim() <= 2 or all(s == 1 for s in t.shape[2:]) for t in ts)


def _adjoint(f: Pool, like: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The transpose of the linear map ``f`` applied to ``g`` (autograd's vector-Jacobian product)."""
    x = torch.zeros_like(like).requires_grad_(True)
    with torch.enable_grad():
        (out,) = torch.autograd.grad(f(x), x, g)
    return out


def pool_fns(node: Node, m: Any, x: Moments) -> tuple[str, float, Pool, Pool, int]:
    """("max"|"avg", window size k, the pooling map, the matching average pool, the number of pooled
    trailing dims) for a pooling module or function."""
    if m is not None:
        name = type(m).__name__
        kind = "max" if "Max" in name else "avg"
        dim = int(name[-2])
        if "Adaptive" in name:
            out_size = m.output_size  # type: ignore[attr-defined]
            avg_cls = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[dim]

            def avg(t: torch.Tensor) -> torch.Tensor:
                return avg_cls(t, out_size)  # type: ignore[operator]
            pool = m.forward if kind == "max" else avg
        else:
            ks = m.kernel_size  # type: ignore[attr-defined]
            ks_t = (ks,) * dim if isinstance(ks, int) else tuple(ks)
            stride = m.stride or ks  # type: ignore[attr-defined]
            pad = m.padding  # type: ignore[attr-defined]
            ceil = bool(getattr(m, "ceil_mode", False))
            avg_f = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[dim]

            def avg(t: torch.Tensor) -> torch.Tensor:
                return avg_f(t, ks_t, stride, pad, ceil, True)  # type: ignore[operator]
            pool = m.forward if kind == "max" else avg
            return kind, float(math.prod(ks_t)), pool, avg, dim
    else:
        kind = "max" if "max" in node.name else "avg"
        dim = int(node.name[-2]) if node.name[-2:-1].isdigit() else 2

        def pool(t: torch.Tensor) -> torch.Tensor:
            return replay(node, {node.inputs[0]: t})

        avg = pool
    probe = pool(torch.ones(x.shape))  # type: ignore[arg-type]
    k = math.prod(x.shape or ()) / probe.numel()
    return kind, float(k), pool, avg, dim


def replay(node: Node, values: dict[int, Any]) -> Any:
    """Call the node's function with the given tensors in place of its inputs (other inputs: zero moments)."""
    def sub(o: Any) -> Any:
        return values[o.index] if isinstance(o, Ref) else o

    if node.fn is None:
        raise SignalpropError(f"cannot replay {node.name}: the capture kept no function for it")
    args, kwargs = map_refs(node.args, sub), map_refs(node.kwargs, sub)
    if (node.name == "view" and len(args) > 1 and isinstance(args[0], torch.Tensor) and not kwargs
            and not isinstance(args[1], torch.dtype)):
        # the same values as the model's view; the moments' own tensors need not have its strides
        return args[0].reshape(*args[1:])
    return node.fn(*args, **kwargs)


def view_moments(f: Callable[[dict[int, torch.Tensor]], torch.Tensor], ins: dict[int, Moments]
                 ) -> tuple[Moments, Back]:
    """A view-like map ``f`` (view, flatten, permute, cat, slicing, padding, indexing with known indices,
    nearest upsampling) applied to each moment tensor alike; the channel dim follows the elements
    (:func:`_follow_channel`). Each output element is one input element (or zero), so its moments are
    that element's; the backward is the map's adjoint (a gather's is a scatter-add: gradients of one
    input element reached by several outputs add, their second moments too, being independent)."""
    keys = list(ins)

    def each(get: Callable[[Moments], torch.Tensor]) -> torch.Tensor:
        return f({k: ins[k].full(get(ins[k])) for k in keys})

    mean, var, m4 = each(lambda x: x.mean), each(lambda x: x.var), each(lambda x: x.fourth())
    shared = each(lambda x: x.shared) if any(x.s is not None for x in ins.values()) else None
    first = ins[keys[0]]
    src = None
    if first.src is not None and len(keys) == 1:
        pre_s = first.src[3]
        src = (first.src[0], f({keys[0]: first.full(first.src[1])}), f({keys[0]: first.full(first.src[2])}),
               None if pre_s is None else f({keys[0]: first.full(pre_s)}))
    lv = max(x.lv for x in ins.values())
    out_shape = tuple(mean.shape)
    chan = _follow_channel(f, ins, out_shape)

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        xs = {k: torch.zeros(ins[k].shape, dtype=torch.float64).requires_grad_(True) for k in keys}  # type: ignore[arg-type]
        with torch.enable_grad():
            grads = torch.autograd.grad(f(xs), [xs[k] for k in keys], g2.expand(out_shape), allow_unused=True)
        return list(grads)

    out = Moments(mean, var, m4, src, lv, any(x.rnd for x in ins.values()), out_shape, clamp_shared(shared, var),
                  chan, corr=max(x.corr for x in ins.values()))
    return out, back


def shape_op(node: Node, ins: dict[int, Moments]) -> tuple[Moments, Back, list[int]]:
    """A view-like function node, replayed on each moment tensor (:func:`view_moments`); known integer or
    boolean inputs (indices, masks) are passed as they are. Returns the data inputs the backward covers."""
    fixed = {k: v.value for k, v in ins.items() if v.known and not _floating(v.value)}
    data = {k: v for k, v in ins.items() if k not in fixed}
    out, back = view_moments(lambda vals: replay(node, {**fixed, **vals}), data)
    return out, back, list(data)


def _floating(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _follow_channel(f: Callable[[dict[int, torch.Tensor]], torch.Tensor], ins: dict[int, Moments],
                    out_shape: tuple[int, ...]) -> int | None:
    """The output dim that indexes the input's channels, found by mapping a probe that holds each element's
    channel index (1..C; other inputs 0): the dim along which the probe varies while it is constant along
    all others. None when channels are merged with other dims (flatten of C x H x W) or unknown."""
    chans = {x.chan for x in ins.values()}
    if len(chans) != 1 or None in chans:
        return None
    keys = list(ins)
    x0 = ins[keys[0]]
    shape = tuple(x0.shape or ())
    c = next(iter(chans))
    assert c is not None
    c %= max(len(shape), 1)
    if not shape or shape[c] < 2:
        return None
    vals = {}
    for k in keys:
        sh = tuple(ins[k].shape or ())
        if ins[k].chan is None or len(sh) != len(shape):
            vals[k] = torch.zeros(sh, dtype=torch.float64)
            continue
        ck = (ins[k].chan or 0) % len(sh)
        idx = torch.arange(1, sh[ck] + 1, dtype=torch.float64).reshape([-1 if d == ck else 1 for d in range(len(sh))])
        vals[k] = idx.expand(sh).contiguous()
    try:
        probe = f(vals)
    except Exception:  # noqa: BLE001 - an op that cannot take the probe: channels unknown
        return None
    if (not isinstance(probe, torch.Tensor) or probe.dim() == 0 or probe.numel() == 0
            or tuple(probe.shape) != out_shape):
        return None  # an empty piece (a split of size 0) has no channel to follow
    for d in range(probe.dim()):
        if probe.shape[d] < 2:
            continue
        others = [e for e in range(probe.dim()) if e != d]
        lo = probe.amin(others) if others else probe
        hi = probe.amax(others) if others else probe
        if torch.equal(lo, hi) and bool((lo > 0).all()) and not bool((lo == lo[0]).all()):
            return d
    return _split_channel(probe)


def _split_channel(probe: torch.Tensor) -> int | None:
    """The channel dim split into adjacent dims (features into heads x head size): the innermost of them.

    Elements that agree on it and on the outer parts (one head) are one channel; the matrix products of
    attention compare elements of one head only, so the innermost part plays the channel's role there."""
    vary = [d for d in range(probe.dim()) if probe.shape[d] > 1 and not torch.equal(
        probe.amin(d, keepdim=True).expand_as(probe), probe)]
    if len(vary) < 2 or vary != list(range(vary[0], vary[-1] + 1)) or not bool((probe > 0).all()):
        return None
    rest = [e for e in range(probe.dim()) if e not in vary]
    if rest and not torch.equal(probe.amin(rest), probe.amax(rest)):
        return None
    return vary[-1]
