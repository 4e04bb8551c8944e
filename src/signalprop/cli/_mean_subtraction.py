"""The asker's idea, tested: does subtracting the mean at the end of each layer keep a deep ReLU CNN in range?

A 30-layer ReLU CNN (3x3 convolutions, 32 channels, N(0, 1) weights) is measured six ways: as it is, with
the mean subtracted after each layer, with BatchNorm, with LayerNorm, with He init, and after LSUV. Mean
subtraction removes the mean, not the scale: a conv output of variance q gives ``relu`` outputs of variance
``q (1/2 - 1/(2 pi))`` once their mean ``sqrt(q / (2 pi))`` is taken out, so each layer still multiplies the
std by ``sqrt(n Var[w] (1/2 - 1/(2 pi)))`` = 9.9 for n = 288 inputs per unit, against
``sqrt(n Var[w] / 2)`` = 12 with the mean kept (He et al. 2015, Eq. 7-10). Normalization divides the scale
out; a good init keeps it at 1 by construction. Circular padding gives every output unit all n inputs, so
these factors hold at the borders too.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..fix.lsuv import lsuv_
from ..measurement import measure
from ..trace import Trace

__all__ = ["VARIANTS", "MeanSubtraction", "MeanSubtract", "growth_per_layer", "mean_subtraction", "theory_growth"]


class MeanSubtract(nn.Module):
    """Subtract each channel's mean over the batch and the spatial positions: the mean goes, the scale stays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        return x - x.mean(dim=dims, keepdim=True)


VARIANTS: dict[str, str] = {
    "nothing": "N(0, 1) weights",
    "mean": "N(0, 1) + mean subtracted",
    "batchnorm": "N(0, 1) + BatchNorm",
    "layernorm": "N(0, 1) + LayerNorm",
    "he": "He init",
    "lsuv": "N(0, 1) + LSUV",
}
"""Key -> label of the six variants, in the order they are drawn."""


def _net(depth: int, width: int, after: Callable[[], nn.Module] | None, before: Callable[[], nn.Module] | None
         ) -> nn.Sequential:
    """conv{i} -> [norm{i}] -> relu{i} -> [mean{i}]: the same names in every variant, so plots line up."""
    layers: dict[str, nn.Module] = {}
    c_in = 3
    for i in range(1, depth + 1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, width, 3, padding=1, padding_mode="circular", bias=False)
        if before is not None:
            layers[f"norm{i}"] = before()
        layers[f"relu{i}"] = nn.ReLU()
        if after is not None:
            layers[f"mean{i}"] = after()
        c_in = width
    return nn.Sequential(OrderedDict(layers))


def _build(key: str, depth: int, width: int, gen: torch.Generator) -> nn.Sequential:
    norms: dict[str, tuple[Callable[[], nn.Module] | None, Callable[[], nn.Module] | None]] = {
        "mean": (MeanSubtract, None),
        "batchnorm": (None, lambda: nn.BatchNorm2d(width)),
        "layernorm": (None, lambda: nn.GroupNorm(1, width)),
    }
    after, before = norms.get(key, (None, None))
    net = _net(depth, width, after, before)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                std = math.sqrt(2.0 / (m.in_channels * 9)) if key == "he" else 1.0
                m.weight.normal_(0.0, std, generator=gen)
    return net


def theory_growth(key: str, width: int = 32) -> float:
    """Predicted factor by which each conv output's std grows per layer: ``sqrt(n Var[w] E[x^2] / q)``.

    ``nothing``: E[relu(z)^2] = q/2 -> ``sqrt(n / 2)``; ``mean``: Var[relu(z)] = q (1/2 - 1/(2 pi)) ->
    ``sqrt(n (1/2 - 1/(2 pi)))``; the normalized and initialized variants: 1.
    """
    n = 9 * width
    if key == "nothing":
        return math.sqrt(n * 0.5)
    if key == "mean":
        return math.sqrt(n * (0.5 - 1.0 / (2.0 * math.pi)))
    return 1.0


def growth_per_layer(trace: Trace) -> float:
    """The median ratio of consecutive conv outputs' std, from the second conv on (the first sees the input)."""
    stds = [layer.fwd.std for layer in trace if layer.kind == "Conv2d"]
    ratios = sorted(b / a for a, b in zip(stds[1:], stds[2:]) if a > 0 and math.isfinite(a) and math.isfinite(b))
    if not ratios:
        return math.nan
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else math.sqrt(ratios[mid - 1] * ratios[mid])


@dataclass(frozen=True)
class MeanSubtraction:
    """Per variant: the measured trace, the measured and predicted growth per layer, and one sentence."""

    traces: dict[str, Trace]
    growth: dict[str, float]
    theory: dict[str, float]

    def sentences(self) -> dict[str, str]:
        """One plain sentence per variant: what it does to the scale, measured beside the theory."""
        g, t = self.growth, self.theory
        return {
            "nothing": f"N(0, 1) weights: each layer multiplies the std by {g['nothing']:.1f} "
                       f"(theory sqrt(n Var[w] / 2) = {t['nothing']:.1f}).",
            "mean": f"Mean subtracted after each layer: still x{g['mean']:.1f} per layer "
                    f"(theory sqrt(n Var[w] (1/2 - 1/(2 pi))) = {t['mean']:.1f}): it removes the mean, not the scale.",
            "batchnorm": f"BatchNorm: x{g['batchnorm']:.2f} per layer: it divides the scale out.",
            "layernorm": f"LayerNorm: x{g['layernorm']:.2f} per layer: it divides the scale out, per sample.",
            "he": f"He init: x{g['he']:.2f} per layer: 1/2 n Var[w] = 1 keeps the scale by construction.",
            "lsuv": f"LSUV: x{g['lsuv']:.2f} per layer: each layer rescaled to unit output std, in one pass.",
        }


def mean_subtraction(depth: int = 30, width: int = 32, batch: int = 8, size: int = 16, seed: int = 0
                     ) -> MeanSubtraction:
    """Measure the six :data:`VARIANTS` of a ``depth``-layer ReLU CNN, forward and backward, on one batch."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=gen)
    traces: dict[str, Trace] = {}
    for key in VARIANTS:
        net = _build("nothing" if key == "lsuv" else key, depth, width, gen)
        if key == "lsuv":
            lsuv_(net, x)
        traces[key] = measure(net, x)
    return MeanSubtraction(traces, {k: growth_per_layer(t) for k, t in traces.items()},
                           {k: theory_growth(k, width) for k in VARIANTS})
