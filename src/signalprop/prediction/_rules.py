"""Per-op rules of :func:`signalprop.predict`: how one module call or function moves the moments.

A value is described element by element by compact float64 tensors, broadcastable to its shape (batch of
2): ``mean`` E[x] and ``var`` Var[x] over weight draws and inputs (so E[x^2] = mean^2 + var, the ``q`` of
mean-field theory), optionally the fourth moment ``m4``, ``src`` when x is an activation of a Gaussian
(for max pooling), and ``s``: the covariance of x with another element *of the same channel* (another
position or another sample), i.e. the part of ``var`` that one network shares over the whole channel as a
random offset. ``chan`` is the dimension that indexes those channels (1 after a convolution, the last one
after a linear layer; None when unknown). ``lv`` is the variance of the log-variance that one finite-width
network adds (Hanin & Nica 2019). Each rule returns the output :class:`Moments` and a backward function
mapping E[g^2] at the output to E[g^2] at each input.

A value can also be *known*: a parameter, buffer or literal, an integer model input (token ids, masks),
or any op applied to known values only (positions from ``arange``, an additive attention mask, rotary
tables), which is then computed exactly by running the op. ``tokens`` marks a known value that came from
a model input: an embedding reads such ids as data (uniformly random tokens), other ids (positions) as
the exact rows they select.

**Where the shared part comes from.** A layer ``y_c = sum_j w_cj x_j + b_c`` with zero-mean i.i.d. weights
of mean square ``sigma_w^2`` gives, for two distinct elements a, b of output channel c,
``E[y_a y_b] = sum_j sigma_w^2 E[x_ja x_jb] + b_c^2``: only products sharing a weight survive, and they
pair one input channel and tap at two distinct positions (or samples). Hence

    s_out = fan_in * sigma_w^2 * E[x_a x_b] = fan_in * sigma_w^2 * (s_in + m_in^2),
    v_out = fan_in * sigma_w^2 * E[x^2]     = fan_in * sigma_w^2 * (v_in + m_in^2)     (He et al. 2015, Eq. 7).

With i.i.d. zero-mean inputs s = 0 at the first layer; after a ReLU ``m_in^2 = q / (2 pi)``, so the next
layer shares ``s / v = 1 / pi`` of its variance: the weights times the nonzero mean of a ReLU output. In one
network that is a per-channel offset, the same at every position and for every sample. Random
convolutions pass on the covariance at each displacement separately (Xiao et al. 2018, Sec. 2), so with
i.i.d. inputs every pair of distinct elements of a channel carries the same ``s``. Per-element moments
(and so He's product formula) are untouched; what changes is every op that combines elements of a
channel:

* activations: two elements are jointly Gaussian with covariance s; ``E[phi(u_a) phi(u_b)]`` by Mehler's
  formula (``_predict_gauss``);
* average pooling of k positions: ``(v - s) / k + s``, s kept; global pooling keeps s and ``1 / HW`` of the
  rest, which is why the head after it was under-predicted 7-14x when s was ignored;
* max pooling: the maximum of k equicorrelated Gaussians (``_predict_gauss.max_moments``);
* BatchNorm in training normalizes with one network's batch statistics: its mean removes the channel
  offset and its variance is the within-channel ``v - s``. Output variance ``(v - s) a^2`` with
  ``a = gamma / sqrt(v - s + eps)``, s = 0, and the gradient scaled by ``a^2`` (using v instead of v - s
  under-predicted gradients about 3x near the input of a BatchNorm ResNet);
* LayerNorm and GroupNorm: the per-sample mean over a set holding Cg channels removes ``s / Cg`` (Cg = 1
  for InstanceNorm, the feature count for LayerNorm over features);
* dropout (independent masks) keeps s; sums of independent values add s; products multiply the cross
  moments ``s + m^2``; views and permutations move s with the elements.

Gradients carry no shared part across samples (the cotangent is drawn independently per sample), and
per-element E[g^2] is what every backward rule needs; overlapping pooling windows, where two windows'
gradients meet in one input, are taken as uncorrelated.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from . import _gauss as G

Back = Callable[[torch.Tensor], list[torch.Tensor | None]]
Z90 = 1.6448536269514722  # the standard normal's 95% quantile: a two-sided 90% band


@dataclass
class Moments:
    """Per-element moments, stored compactly: tensors broadcastable to ``shape`` (constant along batch and,
    for convolutions, along positions), materialized only where an op needs the full layout."""

    mean: torch.Tensor
    var: torch.Tensor
    m4: torch.Tensor | None = None
    src: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None  # (act, pre m, v, s)
    lv: float = 0.0
    rnd: bool = False  # depends on some weight layer's random weights
    shape: tuple[int, ...] | None = None
    s: torch.Tensor | None = None  # covariance with another element of the channel; None is 0
    chan: int | None = None
    known: bool = False  # the exact value is known (module docstring)
    value: Any = None  # that value, in its own dtype (a tuple for an op with several outputs)
    tokens: bool = False  # the known value came from a model input
    lazy: Any = None  # (node, input moments) of an op with several outputs on data, read by getitem
    simplex: torch.Tensor | None = None  # softmax output over the last dim: E[sum_j P_j^2] per row
    corr: float = 0.0  # sum over the other elements of one sample of their squared correlation with one (band)

    def __post_init__(self) -> None:
        if self.shape is None:
            self.shape = tuple(np.broadcast_shapes(self.mean.shape, self.var.shape))

    def full(self, t: torch.Tensor) -> torch.Tensor:
        shape = self.shape or ()
        return t.expand(shape).contiguous() if tuple(t.shape) != tuple(shape) else t

    @property
    def q(self) -> torch.Tensor:
        return self.mean * self.mean + self.var

    @property
    def shared(self) -> torch.Tensor:
        return self.s if self.s is not None else torch.zeros_like(self.var)

    @property
    def cross(self) -> torch.Tensor:
        """E[x_a x_b] for two distinct elements of one channel: s + mean^2."""
        return self.shared + self.mean * self.mean

    def fourth(self) -> torch.Tensor:
        if self.m4 is not None:
            return self.m4
        m, v = self.mean, self.var
        return m**4 + 6 * m * m * v + 3 * v * v  # Gaussian


def const(value: Any, shape: tuple[int, ...] | None = None, tokens: bool = False) -> Moments:
    """A known value: its moments are the value itself (mean) and zero variance; non-tensors (None, a
    tuple of tensors, a size) are carried in ``value`` only."""
    if isinstance(value, torch.Tensor | float | int | bool) and not (
            isinstance(value, torch.Tensor) and value.is_complex()):
        raw = torch.as_tensor(value).detach()
        t = raw.to(torch.float64)
        return Moments(t, torch.zeros_like(t), shape=tuple(t.shape) if shape is None else shape, known=True,
                       value=raw, tokens=tokens)
    z = torch.zeros((), dtype=torch.float64)
    return Moments(z, z, shape=() if shape is None else shape, known=True, value=value, tokens=tokens)


def clamp_shared(s: torch.Tensor | None, var: torch.Tensor) -> torch.Tensor | None:
    """0 <= s <= var: a covariance never exceeds the variance (guards rounding)."""
    if s is None:
        return None
    return torch.minimum(s.clamp_min(0), var.clamp_min(0))


def gauss_moments(act: Any, m: torch.Tensor, v: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[phi(g)], E[phi(g)^2], E[phi(g)^4], E[phi'(g)^2] per element, g ~ N(m, v) (see ``_predict_gauss``)."""
    e1, e2, e4, d2, _ = G.act_moments(act, m, v)
    return e1, e2, e4, d2


def _mean_over(t: torch.Tensor, nd: int, dims: list[int]) -> torch.Tensor:
    """Mean over ``dims`` of a compact tensor of a value with ``nd`` dims (broadcast dims cost nothing)."""
    t = t.reshape((1,) * (nd - t.dim()) + tuple(t.shape)) if t.dim() < nd else t
    eff = [d for d in dims if t.shape[d] > 1]
    return t.mean(eff, keepdim=True) if eff else t


# ---- rules ------------------------------------------------------------------------------------------------
def activation(act: Any, x: Moments) -> tuple[Moments, Back]:
    mean, second, fourth, d2, shared = G.act_moments(act, x.mean, x.var, x.s)
    var = (second - mean * mean).clamp_min(0)
    out = Moments(mean, var, fourth, (act, x.mean, x.var, x.s), x.lv, x.rnd, x.shape,
                  clamp_shared(shared, var), x.chan, corr=x.corr)
    return out, lambda g2: [g2 * d2]


def _square_sums(w: torch.Tensor) -> list[torch.Tensor]:
    """``sum(w^2)`` as float64 0-d tensors (one, or two with a tail), left on the device: the parts that
    :func:`mean_squares` adds on the host."""
    flat = w.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    n = flat.numel()
    cut = n // 4096 * 4096
    parts = []
    if cut:
        rows = flat[:cut].reshape(-1, 4096)
        parts.append(torch.linalg.vecdot(rows, rows).sum(dtype=torch.float64))
    if cut < n:
        tail = flat[cut:].double()
        parts.append(torch.dot(tail, tail))
    return parts


def mean_squares(weights: list[torch.Tensor]) -> list[float]:
    """mean(w^2) of each tensor, accumulated in float64 from float32 dot products of 4096-element rows.

    ``w.pow(2).sum(dtype=float64)`` converts every element (about 1 s for AlexNet's 38 M-parameter layer on
    2 cores); row dots plus a float64 sum of the rows take a tenth of that, with relative error ~1e-9. All
    the sums stay on their device and come back in one transfer per device (one host sync, not one a
    layer: a 1,000-layer net spent most of its prediction waiting on per-layer syncs).

    Args:
        weights: tensors of any shape, dtype and device.

    Returns:
        One float per tensor, 0.0 for an empty one.

    Example:
        >>> mean_squares([torch.full((3, 4), 2.0), torch.ones(5000)])
        [4.0, 1.0]
    """
    parts = [_square_sums(w) for w in weights]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for ps in parts:
        for t in ps:
            by_device.setdefault(t.device, []).append(t)
    host = {dev: iter(torch.stack(ts).tolist()) for dev, ts in by_device.items()}
    out = []
    for w, ps in zip(weights, parts):
        total = 0.0
        for t in ps:
            total += next(host[t.device])
        n = w.numel()
        out.append(total / n if n else 0.0)
    return out


def host_biases(biases: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """The biases as float64 CPU tensors, brought over in one transfer (the moments are the CPU's tiny
    tensors, also for a model on a GPU); an all-zero or empty bias becomes None, so the mean stays one
    number for every element (the rules' scalar path). A nan or inf bias is kept."""
    present = [b.reshape(-1) for b in biases if b is not None and b.numel()]
    if not present:
        return [None] * len(biases)
    flat = torch.cat([b.to(present[0].device) for b in present]).to("cpu", torch.float64)
    sizes = [b.numel() for b in present]
    zero = np.add.reduceat(np.abs(flat.numpy()), np.cumsum([0] + sizes[:-1])) == 0
    parts = iter(zip(torch.split(flat, sizes), zero.tolist()))
    out: list[torch.Tensor | None] = []
    for b in biases:
        if b is None or not b.numel():
            out.append(None)
            continue
        part, is_zero = next(parts)
        out.append(None if is_zero else part.reshape(b.shape))
    return out


def mean_square(w: torch.Tensor) -> float:
    """mean(w^2) of one tensor (:func:`mean_squares`)."""
    return mean_squares([w])[0]


@dataclass(frozen=True)
class LayerNumbers:
    """What the weight-layer rule needs from a module: read from it once, under the model's tracker, so
    the rule's arithmetic never touches the module (see :func:`layer_numbers`)."""

    fan_in: float
    fan_out: float
    n_in: float
    bias: torch.Tensor | None  # detached, its own dtype and device (predict brings all to the host at once)
    conv: bool
    overlap: float
    w2: float = 0.0


def layer_numbers(m: Any) -> tuple[LayerNumbers, torch.Tensor]:
    """The fans, bias and convolution facts :func:`weight_layer` uses, and the weight (mean square still to
    take: :func:`mean_squares` takes them all at once).

    Args:
        m: a module with a fan rule (Linear, ConvNd, ConvTransposeNd, transformers' Conv1D, registered).

    Returns:
        ``(numbers with w2 = 0, weight tensor)``.

    Example:
        >>> nums, w = layer_numbers(nn.Linear(8, 4))
        >>> (nums.fan_in, nums.fan_out, nums.conv, tuple(w.shape))
        (8.0, 4.0, False, (4, 8))
    """
    from ..init.fans import fans

    fan_in, fan_out = (float(f) for f in fans(m))
    bias = getattr(m, "bias", None)
    conv = isinstance(m, nn.modules.conv._ConvNd)
    extra = 0.0
    if conv:
        transposed = bool(getattr(m, "transposed", False))
        extra = overlap_corr(m.out_channels, m.in_channels, math.prod(m.kernel_size),
                             1 if transposed else math.prod(m.stride))
    b = bias.detach() if isinstance(bias, torch.Tensor) else None
    return LayerNumbers(fan_in, fan_out, _independent_inputs(m, fan_in), b, conv, extra), m.weight


def weight_layer(m: Any, x: Moments, shape: tuple[int, ...], nums: LayerNumbers | None = None
                 ) -> tuple[Moments, Back]:
    """y = W x + b with W's entries of mean square mean(w^2): Var[y] = fan_in * mean(w^2) * E[x^2].

    He et al. (2015), Eq. 7 (forward) and Eq. 13 (backward, fan_out); the mean is the bias. The shared
    part is ``fan_in * mean(w^2) * (s_in + m_in^2)`` (module docstring). Positions of a convolution are
    treated as interior ones (full receptive field): zero padding at the borders lowers the border
    outputs' variance by the share of taps that fall outside, which this ignores. ``nums``: the module's
    :class:`LayerNumbers` read before (with ``w2``); None reads them here.
    """
    if nums is None:
        nums, w = layer_numbers(m)
        nums = LayerNumbers(nums.fan_in, nums.fan_out, nums.n_in, nums.bias, nums.conv, nums.overlap,
                            mean_square(w))
    return weight_op(nums.w2, nums.fan_in, nums.fan_out, nums.n_in, nums.bias, x, shape, nums.conv,
                     nums.overlap)


def overlap_corr(c_out: int, c_in: int, taps: int, stride: int) -> float:
    """Squared correlations a convolution's output element has with the outputs at *other* positions whose
    receptive fields overlap its own, summed: two outputs sharing o input taps (of n = c_in * taps) have
    correlation of mean square o / n^2 over random weights, and the overlaps of one position with all others
    sum to ``c_in taps (taps / stride - 1)``, over c_out channels each: ``c_out / c_in (1 / stride - 1 /
    taps)`` (0 for a 1x1 or non-overlapping convolution)."""
    return max(c_out / max(c_in, 1) * (1.0 / max(stride, 1) - 1.0 / max(taps, 1)), 0.0)


def weight_op(w2: float, fan_in: float, fan_out: float, n_in: float, bias: torch.Tensor | None, x: Moments,
              shape: tuple[int, ...], conv: bool, overlap: float = 0.0) -> tuple[Moments, Back]:
    """The rule of :func:`weight_layer` from the numbers it needs: mean(w^2), the fans, the count of i.i.d.
    input units ``n_in`` (Hanin-Nica), the bias, whether channels are dim 1 (convolutions) or the last
    dim, and a convolution's :func:`overlap_corr`; functional ops (``F.linear``, ``F.conv1d`` on a
    parametrized weight) call it directly. Two outputs at one position correlate through the weights'
    rows, ``w_i . w_j / |w_i||w_j|`` of mean square 1 / fan_in: ``corr = (C - 1) / fan_in + overlap``."""
    sc = scalars(x)
    if sc is not None:  # one (m, v, s) for every element: the same sums on host floats
        m_, v_, s_, m4_ = sc
        q_in = m_ * m_ + v_
        cross = _between_scalar(x, m_, s_)
    else:
        q = x.q
        if x.rnd:  # E[x^2], E[(E x^2)^2], E[x^4] in one transfer
            q_in, q2_in, f4_in = torch.stack([q.mean(), (q * q).mean(), x.fourth().mean()]).tolist()
        else:
            q_in = float(q.mean())
        cross = between(x)
    gain = fan_in * w2
    compact = (1,) * len(shape)
    v_out = gain * q_in
    var = torch.full(compact, v_out, dtype=torch.float64)
    shared = torch.full(compact, _clamp_cov(gain * cross, v_out), dtype=torch.float64)
    chan = 1 if conv else len(shape) - 1
    if isinstance(bias, torch.Tensor):
        mean = bias.detach().to(torch.float64).reshape([1] * chan + [-1] + [1] * (len(shape) - 1 - chan))
    else:
        mean = torch.zeros(compact, dtype=torch.float64)
    lv = x.lv
    if x.rnd and sc is not None:
        f4 = m4_ if m4_ is not None else m_**4 + 6 * m_ * m_ * v_ + 3 * v_ * v_
        beta = _ieee_div(f4 - q_in * q_in, q_in**2) if q_in > 0 else 0.0
        lv += max(beta, 0.0) / n_in
    elif x.rnd:
        beta = (f4_in - q2_in) / q_in**2 if q_in > 0 else 0.0
        lv += max(beta, 0.0) / n_in
    in_compact = (1,) * len(x.shape or ())

    def back(g2: torch.Tensor) -> list[torch.Tensor | None]:
        return [torch.full(in_compact, fan_out * w2 * float(g2.mean()), dtype=torch.float64)]

    c_out = shape[chan] if shape else 1
    corr = (c_out - 1) / max(fan_in, 1.0) + overlap
    return Moments(mean, var, None, None, lv, True, tuple(shape), shared, chan, corr=corr), back


def _clamp_cov(s: float, v: float) -> float:
    """:func:`clamp_shared` on floats: 0 <= s <= max(v, 0), nan kept."""
    if math.isnan(s) or math.isnan(v):
        return math.nan
    return min(max(s, 0.0), max(v, 0.0))


def _ieee_div(a: float, b: float) -> float:
    """a / b as a float64 tensor divides: a zero divisor (an underflowed square) gives inf or nan."""
    if b != 0:
        return a / b
    return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a) * math.copysign(1.0, b)


def scalars(x: Moments) -> tuple[float, float, float, float | None] | None:
    """``(mean, var, s, m4)`` as floats when each is one number for every element (a bias-free or zero-bias
    chain), else None: the rules then skip a dozen one-element tensor ops a layer."""
    m4 = x.m4
    if x.mean.numel() != 1 or x.var.numel() != 1 or (x.s is not None and x.s.numel() != 1) or (
            m4 is not None and m4.numel() != 1):
        return None
    return (x.mean.item(), x.var.item(), 0.0 if x.s is None else x.s.item(),
            None if m4 is None else m4.item())


def _between_scalar(x: Moments, m: float, s: float) -> float:
    """:func:`between` for one mean ``m`` and shared part ``s`` everywhere, with the same float operations."""
    shape = tuple(x.shape or ())
    nd = len(shape)
    if nd == 0:
        return s + m * m
    chan = nd - 1 if x.chan is None else x.chan % nd
    pos = [d for d in range(1, nd) if d != chan]
    n_pos = math.prod(shape[d] for d in pos)
    if n_pos <= 1:
        return s + m * m
    factor = 1.0
    for d in pos:
        factor *= shape[d]
    s1 = m * factor
    s2 = m * m * factor
    return s + (s1 * s1 - s2) / (n_pos * (n_pos - 1))


def between(x: Moments) -> float:
    """``E[x_a x_b]`` for two distinct elements of one channel in one sample, averaged: ``s + m_a m_b``.

    The mean product over the P(P - 1) ordered pairs of positions is ``((sum_p m_p)^2 - sum_p m_p^2) /
    (P (P - 1))``: the square of the channel's mean when its means are equal (a bias), about zero for
    known means that vary with position and average out (position embeddings). Without positions (a
    vector per sample) the pairs are two samples: the square of the mean.
    """
    shape = tuple(x.shape or ())
    nd = len(shape)
    if nd == 0:
        return float(x.cross.mean())
    chan = nd - 1 if x.chan is None else x.chan % nd
    pos = [d for d in range(1, nd) if d != chan]
    n_pos = math.prod(shape[d] for d in pos)
    m = x.mean.reshape((1,) * (nd - x.mean.dim()) + tuple(x.mean.shape)) if x.mean.dim() < nd else x.mean
    if n_pos <= 1:
        m_c = _mean_over(m, nd, [d for d in range(nd) if d != chan])
        return float(x.shared.mean()) + float((m_c * m_c).mean())
    s1 = _sum_full(m, pos, shape)
    s2 = _sum_full(m * m, pos, shape)
    pair = (s1 * s1 - s2) / (n_pos * (n_pos - 1))
    return float(x.shared.mean()) + float(pair.mean())


def _sum_full(t: torch.Tensor, dims: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Sum over ``dims`` of a compact tensor as if expanded to ``shape`` (a size-1 dim counts its copies)."""
    factor = 1.0
    eff = []
    for d in dims:
        if t.shape[d] == 1:
            factor *= shape[d]
        else:
            eff.append(d)
    return (t.sum(eff, keepdim=True) if eff else t) * factor


def _independent_inputs(m: Any, fan_in: float) -> float:
    """Units whose squared outputs are summed i.i.d. in one layer: features (Linear) or channels (conv)."""
    if isinstance(m, nn.Linear):
        return float(m.in_features)
    if isinstance(m, nn.modules.conv._ConvNd):
        return float(m.in_channels)
    if type(m).__name__ == "Conv1D":
        return float(m.weight.shape[0])
    return fan_in


def embedding(weight: torch.Tensor, idx: Moments | None, shape: tuple[int, ...]) -> tuple[Moments, Back]:
    """Rows of the table. Ids that came from a model input (token ids) are data: uniformly random tokens,
    so each feature's mean and variance are its column's over the vocabulary (the output's variance is
    the weight's); two tokens are drawn independently, so nothing is shared beyond the known mean. Known
    ids that are not data (positions from ``arange``, a buffer) select their exact rows: a known value."""
    if idx is not None and idx.known and not idx.tokens and isinstance(idx.value, torch.Tensor):
        return const(torch.nn.functional.embedding(idx.value.long(), weight.detach())), lambda g2: [None]
    w = weight.detach().to(torch.float64)
    mean = w.mean(0)
    var = w.var(0, unbiased=False)
    return (Moments(mean, var, None, None, 0.0, True, tuple(shape), torch.zeros_like(var), len(shape) - 1),
            lambda g2: [None])


def dropout(x: Moments, p: float, train: bool) -> tuple[Moments, Back]:
    """Inverted dropout in training multiplies E[x^2] by 1/(1-p); mean and s (independent masks
    E[d_a d_b] = (1-p)^2, rescaled by 1/(1-p)^2) unchanged; identity in eval."""
    if not train or p <= 0:
        return x, lambda g2: [g2]
    if p >= 1:
        z = torch.zeros_like(x.mean)
        return (Moments(z, z.clone(), z.clone(), None, x.lv, x.rnd, x.shape, None, x.chan, corr=x.corr),
                lambda g2: [torch.zeros_like(g2)])
    s = 1.0 / (1.0 - p)
    var = x.q * s - x.mean * x.mean
    return (Moments(x.mean, var, x.fourth() * s**3, None, x.lv, x.rnd, x.shape, clamp_shared(x.s, var), x.chan,
                    corr=x.corr),
            lambda g2: [g2 * s])


def _groups_in(x: Moments, dims: list[int]) -> float:
    """How many channels (each with its own random offset) a normalization set over ``dims`` holds."""
    shape = x.shape or ()
    if x.chan is None:
        return float(math.prod(shape[d] for d in dims)) or 1.0
    return float(shape[x.chan]) if x.chan in dims else 1.0


def batch_norm(m: Any, x: Moments) -> tuple[Moments, Back]:
    """Eval with running statistics: (x - mu_run) / sqrt(var_run + eps) * gamma + beta, per channel.

    Training (or no running statistics): one network's batch statistics of a channel, whose mean holds the
    channel's random offset and whose variance is the within-channel ``mean(v + m^2) - mu^2 - s``; the
    output has variance gamma^2, mean beta and no shared part (Ioffe & Szegedy 2015), and the gradient is
    scaled by gamma^2 / (within-channel variance + eps). A normalized value's finite-width fluctuation
    starts again from zero.
    """
    assert x.shape is not None
    nd = len(x.shape)
    c = x.shape[1]
    view = [1, c] + [1] * (nd - 2)
    train = m.training or getattr(m, "running_mean", None) is None
    dims = [d for d in range(nd) if d != 1]
    if train:
        mu = _mean_over(x.mean, nd, dims)
        cg = _groups_in(x, dims)
        s_bar = _mean_over(x.shared, nd, dims)
        var = (_mean_over(x.q, nd, dims) - mu * mu - s_bar / cg).clamp_min(0)
        out_var = (x.var - x.shared / cg).clamp_min(0)
        out_s = x.shared * (1 - 1 / cg)
    else:
        mu = m.running_mean.detach().to(torch.float64).reshape(view)  # type: ignore[union-attr]
        var = m.running_var.detach().to(torch.float64).reshape(view)  # type: ignore[union-attr]
        out_var, out_s = x.var, x.shared
    gamma, beta = _affine(m, c, view)
    a = gamma / torch.sqrt(var + float(m.eps))  # type: ignore[arg-type]
    ov = out_var * a * a
    out = Moments((x.mean - mu) * a + beta, ov, None, None, 0.0 if train else x.lv, x.rnd, x.shape,
                  clamp_shared(out_s * a * a, ov), x.chan, corr=x.corr)
    return out, lambda g2: [g2 * a * a]


def _affine(m: nn.Module, c: int, view: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    ones = torch.ones(view, dtype=torch.float64)
    gamma = w.detach().to(torch.float64).reshape(view) if isinstance(w, torch.Tensor) else ones
    beta = b.detach().to(torch.float64).reshape(view) if isinstance(b, torch.Tensor) else ones * 0
    return gamma, beta


def layer_norm(m: nn.Module, x: Moments, rms: bool = False) -> tuple[Moments, Back]:
    """Per-sample normalization over the last dims (Ba et al. 2016; RMSNorm: Zhang & Sennrich 2019).

    The per-sample mean and variance over the normalized set are taken as their expectations (wide
    layers). The set holds Cg channels (:func:`_groups_in`); its mean removes ``s / Cg`` of their shared
    offsets, so ``V = mean(q) - M^2 - mean(s) / Cg``, output mean ``gamma (m - M) / sqrt(V + eps) + beta``,
    variance ``(v - s / Cg) a^2`` and shared part ``s (1 - 1 / Cg) a^2``. RMSNorm divides by
    ``sqrt(mean(q) + eps)`` and removes nothing.
    """
    shape = getattr(m, "normalized_shape", None)
    k = len(shape) if isinstance(shape, tuple | list) else 1
    assert x.shape is not None
    nd = len(x.shape)
    dims = list(range(nd - k, nd))
    eps = float(getattr(m, "eps", None) or getattr(m, "variance_epsilon", 1e-6) or 1e-6)
    q = _mean_over(x.q, nd, dims)
    if rms:
        mu, cg_inv = torch.zeros_like(q), 0.0
        var = q
    else:
        mu = _mean_over(x.mean, nd, dims)
        cg_inv = 1.0 / _groups_in(x, dims)
        var = (q - mu * mu - _mean_over(x.shared, nd, dims) * cg_inv).clamp_min(0)
    tail = tuple(x.shape[-k:])
    w, b = getattr(m, "weight", None), getattr(m, "bias", None)
    gamma = w.detach().to(torch.float64).reshape(tail) if isinstance(w, torch.Tensor) else 1.0
    beta = b.detach().to(torch.float64).reshape(tail) if isinstance(b, torch.Tensor) else 0.0
    a = gamma / torch.sqrt(var + eps)
    ov = (x.var - x.shared * cg_inv).clamp_min(0) * a * a
    out = Moments((x.mean - mu) * a + beta, ov, None, None, 0.0, x.rnd, x.shape,
                  clamp_shared(x.shared * (1 - cg_inv) * a * a, ov), x.chan, corr=x.corr)
    return out, lambda g2: [g2 * a * a]


def group_norm(m: nn.GroupNorm, x: Moments) -> tuple[Moments, Back]:
    """GroupNorm (Wu & He 2018): LayerNorm's rule over each group of C / G channels and the positions."""
    assert x.shape is not None
    mean, var, sh = x.full(x.mean), x.full(x.var), x.full(x.shared)
    n, c = mean.shape[:2]
    g = m.num_groups
    cg_inv = 0.0 if x.chan is None else (g / c if x.chan == 1 else 1.0 / (x.shape[x.chan] or 1))
    mean_g = mean.reshape(n, g, -1)
    q = (mean * mean + var).reshape(n, g, -1).mean(-1, keepdim=True)
    mu = mean_g.mean(-1, keepdim=True)
    s_bar = sh.reshape(n, g, -1).mean(-1, keepdim=True)
    a_g = (1.0 / torch.sqrt((q - mu * mu - s_bar * cg_inv).clamp_min(0) + m.eps)).expand_as(mean_g)
    view = [1, c] + [1] * (mean.dim() - 2)
    gamma, beta = _affine(m, c, view)
    a = a_g.reshape(mean.shape) * gamma
    ov = (var - sh * cg_inv).clamp_min(0) * a * a
    out = Moments((mean_g - mu).reshape(mean.shape) * a + beta, ov, None, None, 0.0, x.rnd, x.shape,
                  clamp_shared(sh * (1 - cg_inv) * a * a, ov), x.chan, corr=x.corr)
    return out, lambda g2: [g2 * a * a]
