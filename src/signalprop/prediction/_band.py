"""The 90% band of :func:`signalprop.predict`: what one network measures on one batch, around the prediction.

The prediction is an expectation over weight draws and inputs; one measurement differs from it by three
independent parts, added as variances of the log-variance:

* **finite width, compounded** (``Moments.lv``): each weight layer whose input is itself random multiplies
  the variance by a random factor of relative variance ``beta / n`` (``beta = E[x^4] / E[x^2]^2 - 1`` of
  its input units, n their count; Hanin 2018, Hanin & Nica 2019), summed over the layers up to here;
  normalization starts it again from zero;
* **the channel offsets**: one network's G channels each carry a random offset of variance s, whose
  spread is missing from the measured variance (``E[measured] = var - s / G``, the band's centre) and adds
  a chi-square with G degrees of freedom, ``2 (s / var)^2 / G``;
* **the batch** (when its size B is given): the measured variance averages ``B E`` squared deviations
  (E elements per sample), each of relative variance ``kappa = Var[(x - E x)^2] / Var[x]^2`` (2 for a
  Gaussian, about 4.4 after a ReLU). Elements of one sample are correlated through the inputs they share:
  two outputs of a weight layer with fan-in n have correlation ``w_i . w_j / |w_i||w_j|``, of mean square
  ``1 / n``, so each of the ``C - 1`` other channels at a position adds ``1 / n``, and a convolution's
  outputs at overlapping positions add their overlaps (``_rules.overlap_corr``); after an activation each
  such pair keeps the share ``c_2(f)^2 / Var[f]`` of the squared deviations' variance:

      relvar = kappa / (B E) * (1 + corr),   corr = (C - 1) / n + overlaps.

  For a Linear layer on Gaussian inputs this is exact: ``Var[mean_b |W x_b|^2] / E^2 =
  2 ||W W^T||_F^2 / (B tr(W W^T)^2) = 2 / B (1 / N + 1 / n)`` for random W. It is the whole band at the
  first layers, where nothing has compounded yet: the batch and the first weights' finite fan-in. When
  the input variance is the batch's own (``predict(inputs=...)``, diagnose), the part that follows the
  input's sample second moment, ``kappa_x / (B n_x)``, is already in the prediction and is taken out
  (never below the units' own ``kappa / (B E)``).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import theory
from ..trace import Stats
from . import _rules as R
from ._rules import Moments


def batch_relvar(x: Moments, batch: int | None, cond: float) -> float:
    """Relative variance of one batch's measured variance about its expectation (module docstring);
    ``cond`` is the input-second-moment part already in the prediction (0 when the input variance is a
    population value)."""
    shape = tuple(x.shape or ())
    if not batch or len(shape) < 2 or x.known or float(x.var.mean()) <= 0:
        return 0.0
    per = math.prod(shape[1:]) or 1
    if x.src is not None:
        kappa, mult = _activation_factors(x.src)
    else:
        q = float(x.q.mean())
        kappa = 2.0 if x.m4 is None else max(float(x.fourth().mean()) / (q * q) - 1.0, 0.0)
        mult = 1.0
    own = kappa / (batch * per)
    return max(own * (1.0 + x.corr * mult) - cond, own)


def _activation_factors(src: tuple[Any, torch.Tensor, torch.Tensor, Any]) -> tuple[float, float]:
    """For ``y = phi(u)``, u ~ N(m, v) (the mean pre-activation): ``kappa = Var[f] / Var[y]^2`` of the squared
    deviation ``f = (y - E y)^2``, and ``c_2(f)^2 / Var[f]``, the share of f's variance that two units with
    correlated pre-activations (correlation rho) share: ``Cov(f_1, f_2) = sum_k c_k(f)^2 rho^k`` (Mehler),
    whose rho^1 term averages out over random weights and whose rho^2 term remains (1 for a linear unit)."""
    act, m, v = src[0], float(src[1].mean()), float(src[2].mean())
    fn = theory.resolve(act)
    z, w = theory.gauss_nodes(fine=False)
    with torch.no_grad():
        y = fn(m + math.sqrt(max(v, 0.0)) * z)
    mu = float((w * y).sum())
    f = (y - mu) ** 2
    var_y = float((w * f).sum())
    var_f = float((w * f * f).sum()) - var_y * var_y
    if var_y <= 0 or var_f <= 0:
        return 2.0, 1.0
    c2 = float((w * f * (z * z - 1)).sum()) / math.sqrt(2.0)
    return var_f / (var_y * var_y), min(c2 * c2 / var_f, 1.0)


def stats(x: Moments, batch: int | None = None, cond: float = 0.0) -> tuple[Stats, dict[str, Any]]:
    """Stats of one predicted value: the mean-field mean and variance, the band of one network on one batch.

    ``var`` is the per-element variance ``mean(q) - mean^2`` (He's formula); the band is centred on
    ``E[measured var] = var - mean(s) / G`` (``meta["expected_var"]``) with the log-variance std
    ``sqrt(lv + 2 (s / var)^2 / G + batch part)`` (module docstring). ``chan_sq_mean`` and ``chan_var``
    follow ``sp.measure``'s channels (dim 1): a channel's mean carries its offset,
    ``chan_sq_mean = mean_c(m_c^2 + s_c / G_c)``, ``chan_var = mean(q) - chan_sq_mean`` (Brock et al. 2021).
    """
    shape = tuple(x.shape or ())
    nd = len(shape)
    numel = math.prod(shape)
    chan = None if x.chan is None or nd == 0 else x.chan % nd
    # the channel count a channel's mean averages over (sp.measure's channels are dim 1)
    g_c = 1.0 if chan == 1 else (float(shape[chan]) if chan is not None else float(math.prod(shape[2:]) or 1))
    sc = R.scalars(x)
    chan_sq: float | None = None
    if sc is not None:  # one (m, v, s) everywhere: host floats, the same operations
        mean, q, s_bar = sc[0], sc[0] * sc[0] + sc[1], sc[2]
        if nd >= 2:
            chan_sq = mean * mean + s_bar / g_c
    else:  # every mean in one transfer
        parts = [x.mean.mean(), x.q.mean(), x.shared.mean()]
        if nd >= 2:
            dims = [d for d in range(nd) if d != 1]
            m_c = R._mean_over(x.mean, nd, dims)
            parts.append((m_c * m_c + R._mean_over(x.shared, nd, dims) / g_c).mean())
        mean, q, s_bar, *rest = torch.stack(parts).tolist()
        chan_sq = rest[0] if rest else None
    var = max(q - mean * mean, 0.0)
    groups = float(shape[chan]) if chan is not None else float(math.prod(shape[1:]) or 1)
    expected = max(var - s_bar / groups, 0.0)
    offsets = 2.0 * (s_bar / var) ** 2 / groups if var > 0 else 0.0
    lv = max(x.lv, 0.0) + offsets + batch_relvar(x, batch, cond)
    sd = math.sqrt(lv)
    band = (expected * math.exp(-R.Z90 * sd), expected * math.exp(R.Z90 * sd))
    extra: dict[str, float] = {}
    if chan_sq is not None:
        extra["chan_sq_mean"] = chan_sq
        extra["chan_var"] = max(q - chan_sq, 0.0)
    fwd = Stats.from_moments(mean, var, var_band=band, numel=numel, **extra)
    return fwd, {"log_var_std": sd, "expected_var": expected, "shared_var": s_bar}


def grad_stats(g2: torch.Tensor | None, numel: int) -> Stats:
    """Stats of a predicted gradient: mean 0, variance E[g^2]."""
    return Stats.from_moments(0.0, float(g2.mean()) if g2 is not None else 0.0, numel=numel)
