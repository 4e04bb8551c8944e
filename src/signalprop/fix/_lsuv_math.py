"""LSUV's arithmetic: the moments of a layer's output and the weight scale that puts its std on target.

With a bias b (broadcast along the channel dimension), std(y)^2 = s^2 var(a) + 2 s cov(a, b) + var(b)
with a = W x: a quadratic in s, solved exactly for its positive root. When the bias alone carries more
variance than the target (no positive root), weight and bias are scaled together, y -> s y.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._errors import SignalpropError

__all__ = ["Moments", "moments", "scales"]


@dataclass(frozen=True)
class Moments:
    var_y: float  # var(y), y = a + b
    var_a: float  # var(W x)
    var_b: float  # var of the broadcast bias
    cov: float  # cov(a, b)


def moments(y: torch.Tensor, dim: int | None, bias: torch.Tensor | None, name: str) -> Moments:
    """Population moments over all elements of y from one sum (per channel when a bias is present) and one
    dot product, reduced in the tensor's dtype on its device, combined in float64 on the host."""
    n = y.numel()
    if n == 0:
        raise SignalpropError(f"lsuv_: layer {name!r} produced an empty output (shape {tuple(y.shape)})")
    flat = y.reshape(-1)
    if dim is None or bias is None:
        sums = y.sum().reshape(1)
    else:
        sums = y.sum(dim=[d for d in range(y.dim()) if d != dim])
    packed = torch.cat([sums.to(torch.float64), torch.dot(flat, flat).reshape(1).to(torch.float64)])
    vals = packed.tolist()  # the one host sync of this layer
    q = vals[-1]
    if not math.isfinite(q) or not all(math.isfinite(v) for v in vals[:-1]):
        if not bool(torch.isfinite(y).all()):
            raise SignalpropError(
                f"lsuv_: the output of layer {name!r} contains inf or nan before it could be rescaled: its "
                "input or its weights are already non-finite. Check the inputs, or pass orthogonal=True to "
                "start from orthogonal weights"
            )
        y64 = y.detach().to(torch.float64)  # finite but the float32 squares overflowed: redo in float64
        sums = y64.sum().reshape(1) if dim is None or bias is None else y64.sum(
            dim=[d for d in range(y.dim()) if d != dim]
        )
        vals = sums.tolist() + [float(torch.dot(y64.reshape(-1), y64.reshape(-1)))]
        q = vals[-1]
    s_c = vals[:-1]
    mean_y = math.fsum(s_c) / n
    var_y = q / n - mean_y * mean_y
    if var_y < 1e-4 * mean_y * mean_y:  # cancellation: a large mean over a small spread; two-pass in float64
        var_y = float(y.detach().to(torch.float64).var(correction=0))
    if bias is None:
        return Moments(var_y=var_y, var_a=var_y, var_b=0.0, cov=0.0)
    b = bias.to(torch.float64).reshape(-1).tolist()
    n_c = n / len(b)
    sum_bs = math.fsum(bi * si for bi, si in zip(b, s_c))
    sum_b = math.fsum(b)
    sum_b2 = math.fsum(bi * bi for bi in b)
    mean_b = sum_b / len(b)
    var_b = sum_b2 / len(b) - mean_b * mean_b
    mean_a = mean_y - mean_b
    e_ab = (sum_bs - n_c * sum_b2) / n
    cov = e_ab - mean_a * mean_b
    var_a = var_y - var_b - 2.0 * cov
    return Moments(var_y=var_y, var_a=max(var_a, 0.0), var_b=max(var_b, 0.0), cov=cov)


def scales(mom: Moments, target: float) -> tuple[float, float]:
    """(weight scale, bias scale) that put std(s_w a + s_b b) on ``target``.

    s_b = 1 and s_w the positive root of var_a s^2 + 2 cov s + var_b = target^2 when there is one;
    otherwise both scaled together by target / std(y).
    """
    t2 = target * target
    if mom.var_b > 0.0:
        disc = mom.cov * mom.cov - mom.var_a * (mom.var_b - t2)
        if disc >= 0.0:
            s = (-mom.cov + math.sqrt(disc)) / mom.var_a
            if s > 0.0 and math.isfinite(s):
                return s, 1.0
        s = target / math.sqrt(mom.var_y)
        return s, s
    s = target / math.sqrt(mom.var_a)
    return s, s
