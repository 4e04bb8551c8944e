"""Helpers the fix modules share: the weight layers to act on, where a layer's bias broadcasts, and saving /
restoring the weights a fix writes when it fails half-way (the model's other state: :mod:`signalprop._state`;
calling the model: :mod:`signalprop._inputs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .._inputs import Inputs as Inputs

# Layers that carry a weight but take no signal to mix (an index lookup): LSUV and the fan-based schemes
# have no fan-in to act on, so they are left alone (their scale is a modelling choice, not a propagation one).
_NOT_MIXING = (nn.Embedding, nn.EmbeddingBag)

_CONV_TYPES = (nn.modules.conv._ConvNd,)


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every weight layer that mixes its inputs, in ``named_modules`` order.

    Uses :func:`signalprop.init.weight_layers` (the one definition of "weight layer": Linear, ConvNd and
    transposed convolutions, transformers' Conv1D, ...) and drops lookup tables (``nn.Embedding``), which
    have no fan-in and no input signal to keep in range.
    """
    from ..init import weight_layers as _init_weight_layers

    return [(n, m) for n, m in _init_weight_layers(model) if not isinstance(m, _NOT_MIXING)]


def channel_dim(layer: nn.Module, out: torch.Tensor) -> int | None:
    """The output dimension along which ``layer``'s bias broadcasts, or None when it cannot be told.

    Convolutions put channels at dim 1 (N, C, ...); Linear-like layers (nn.Linear, transformers' Conv1D,
    nn.Bilinear) at the last dim. The size must match the bias, or None is returned.
    """
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, torch.Tensor) or out.dim() == 0:
        return None
    dim = 1 if isinstance(layer, _CONV_TYPES) and out.dim() >= 2 else out.dim() - 1
    if out.shape[dim] != bias.numel():
        return None
    return dim


@contextlib.contextmanager
def mha_fastpath_disabled() -> Iterator[None]:
    """nn.MultiheadAttention's fused eval fast path skips its submodules' forward (so their hooks never fire)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None:
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


def snapshot(layers: list[tuple[str, nn.Module]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of each layer's weight and bias (for restoring them when a fix fails half-way)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for _, m in layers:
            for attr in ("weight", "bias"):
                p = getattr(m, attr, None)
                if isinstance(p, torch.Tensor):
                    out.append((p, p.detach().clone()))
    return out


def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for p, copy in saved:
            p.copy_(copy)
