"""Residual branches: Fixup scaling or zero-init, found structurally from the captured graph's additions.

A residual network adds each branch's output to the stream, x_{l+1} = x_l + f_l(x_l), so with every
branch at its own variance-preserving init the stream's variance grows with each of the L branches:
Var[x_L] ~ prod (1 + Var[f_l] / Var[x_l]) -> 2^L when branches match the stream. Two remedies:

* **Fixup** (Zhang, Dauphin & Ma 2019, "Fixup initialization", Sec. 3): rescale the weight layers inside
  each branch of m layers by L^(-1/(2m-2)) and zero the branch's last layer. By positive homogeneity the
  m - 1 rescaled layers multiply the branch by (L^(-1/(2m-2)))^(m-1) = L^(-1/2). Here that product,
  L^(-1/2), goes on the branch's *last* layer, which keeps its scheme's std instead of zero (for the common
  m = 2 this is exactly L^(-1/(2m-2)) on the last layer). So each branch starts at L^(-1/2) of the stream,
  the stream's variance grows at most (1 + 1/L)^L <= e over the whole network, and no layer's output or
  gradient is zero (a zero layer blocks the gradient to the branch's other layers and reads as "vanishing").
  When a normalization follows the branch's last weight layer (post-norm; ResNet's last BatchNorm), the
  factor goes on that norm's gain, because in training the norm would undo a weight scale. Branches of one
  weight layer (m = 1) get L^(-1/2) too.
* **Zero** (Goyal et al. 2017, "Accurate, large minibatch SGD", Sec. 5.1): the branch's last normalization
  gain is set to 0, so every block starts as the identity. Where no normalization follows the branch's last
  weight layer (pre-norm transformers), that layer's weight and bias are zeroed instead (SkipInit, De & Smith
  2020, in spirit).

L counts the residual additions the graph found (each with a branch holding at least one weight layer).
A layer that ends several nested branches is scaled once, by its innermost branch.

These are plan steps (a fresh draw, for :func:`signalprop.fix.auto_init_`). Scaling the branches of a model
in place, with these Fixup factors or with depth-muP, ReZero, SkipInit or DeepNorm:
:func:`signalprop.fix.residual_` (:mod:`signalprop.fix.residual_schemes`).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from torch import nn

from .._errors import SignalpropError
from ._steps import LayerPlan

__all__ = ["fixup_factor", "residual_steps"]


def fixup_factor(num_branches: int, branch_layers: int) -> float:
    """The multiplier of one branch's output: (L^(-1/(2m-2)))^(m-1) = L^(-1/2) (Zhang et al. 2019, Sec. 3).

    Args:
        num_branches: L, the number of residual branches.
        branch_layers: m, the weight layers in one branch (kept for the per-layer factor L^(-1/(2m-2)) it
            stands for).

    Returns:
        The factor the branch's output is multiplied by, L^(-1/2).

    Examples:
        >>> fixup_factor(16, 2)
        0.25
    """
    if num_branches < 1 or branch_layers < 1:
        raise SignalpropError(f"fixup_factor needs L >= 1 and m >= 1, got L={num_branches}, m={branch_layers}")
    per_layer = num_branches ** (-1.0 / (2 * branch_layers - 2)) if branch_layers > 1 else num_branches**-0.5
    return per_layer ** max(branch_layers - 1, 1)


def residual_steps(
    model: nn.Module,
    steps: list[LayerPlan],
    residuals: list[Any],
    node_of: dict[str, int],
    mode: str | None,
) -> tuple[list[LayerPlan], int]:
    """Add the residual factors of ``mode`` ("fixup", "zero" or None) to the per-layer ``steps``.

    ``residuals`` are :class:`signalprop.graph.Residual` records (branch weight-layer calls, norms);
    ``node_of`` maps call names to node indices, to tell whether a norm comes after the last weight layer.
    Returns the new steps and L, the number of branches.
    """
    branches = [r for r in residuals if r.branch]
    if mode is None or not branches:
        return steps, len(branches)
    modules = dict(model.named_modules())
    index = {s.layer: i for i, s in enumerate(steps)}
    out = list(steps)
    extra: list[LayerPlan] = []
    done: set[str] = set()
    n = len(branches)
    for r in sorted(branches, key=lambda r: len(r.branch)):
        last = _module_of(r.last_weight)
        if last in done or last not in index:
            continue
        done.add(last)
        m = len(r.branch)
        norm = _norm_after(r, node_of, modules)
        if mode == "fixup":
            factor = fixup_factor(n, m)
            why = (f"Fixup (Zhang et al. 2019): branch {_short(r.branch)} of m={m} layers among L={n}: "
                   f"(L^(-1/(2m-2)))^(m-1) = {factor:.4g}")
            if norm is not None:
                extra.append(LayerPlan(norm, type(modules[norm]).__name__, "", "norm_gain", 0.0, 0.0,
                                       f"{why}, on the gain of the norm after the branch's last layer",
                                       factor=factor, gain=factor))
            else:
                s = out[index[last]]
                if s.scheme == "keep":
                    continue
                out[index[last]] = replace(s, std=s.std * factor, factor=s.factor * factor,
                                           scheme=f"{s.scheme}+fixup", reason=f"{s.reason}; {why}", lsuv=False)
        else:
            why = f"zero-init (Goyal et al. 2017): branch {_short(r.branch)} starts as zero, the block as identity"
            if norm is not None:
                extra.append(LayerPlan(norm, type(modules[norm]).__name__, "", "norm_gain", 0.0, 0.0,
                                       f"{why}; the gain of the norm after its last layer is 0", gain=0.0))
            else:
                s = out[index[last]]
                out[index[last]] = replace(s, std=0.0, bias_std=0.0, factor=0.0, scheme="zero",
                                           reason=f"{why}; no norm follows its last layer, so that layer is 0",
                                           lsuv=False)
    return out + extra, n


def _module_of(call: str | None) -> str:
    return (call or "").split("#")[0]


def _short(branch: tuple[str, ...]) -> str:
    return branch[0] if len(branch) == 1 else f"{branch[0]} .. {branch[-1]}"


def _norm_after(r: Any, node_of: dict[str, int], modules: dict[str, nn.Module]) -> str | None:
    """The branch's last normalization when it comes after the branch's last weight layer and has a gain."""
    norm = r.last_norm
    if norm is None or r.last_weight is None:
        return None
    if node_of.get(norm, -1) <= node_of.get(r.last_weight, math.inf):
        return None
    name = _module_of(norm)
    weight = getattr(modules.get(name), "weight", None)
    return name if weight is not None else None
