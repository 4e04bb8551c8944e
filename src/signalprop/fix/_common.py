"""Helpers the fix modules share: the weight layers to act on, where a layer's bias broadcasts, and saving /
restoring the weights a fix writes when it fails half-way (the model's other state: :mod:`signalprop._state`;
calling the model: :mod:`signalprop._inputs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from .._errors import SignalpropError
from .._inputs import Inputs as Inputs
from ..layers import channel_layout

# Layers that carry a weight but take no signal to mix (an index lookup): LSUV and the fan-based schemes
# have no fan-in to act on, so they are left alone (their scale is a modelling choice, not a propagation one).
_NOT_MIXING = (nn.Embedding, nn.EmbeddingBag)

def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every weight layer that mixes its inputs, in ``named_modules`` order.

    Uses :func:`signalprop.layers.is_weight_layer` (the one definition of "weight layer": Linear, ConvNd and
    transposed convolutions, transformers' Conv1D, RNN/LSTM/GRU, parametrized and custom layers, ...) and
    drops lookup tables (``nn.Embedding``), which have no fan-in and no input signal to keep in range.
    """
    from ..layers import is_weight_layer

    return [(n, m) for n, m in model.named_modules() if is_weight_layer(m) and not isinstance(m, _NOT_MIXING)]


def channel_dim(layer: nn.Module, out: torch.Tensor) -> int | None:
    """The output dimension along which ``layer``'s bias broadcasts, or None when it cannot be told.

    Layers whose channels come first (:func:`signalprop.layers.channel_layout`: convolutions, BatchNorm) at
    dim 1 (N, C, ...); every other weight layer (nn.Linear, transformers' Conv1D, nn.Bilinear, custom
    ``F.linear`` layers) at the last dim. The size must match the bias, or None is returned.
    """
    bias = getattr(layer, "bias", None)
    if not isinstance(bias, torch.Tensor) or out.dim() == 0:
        return None
    dim = 1 if channel_layout(layer) == "first" and out.dim() >= 2 else out.dim() - 1
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
    """Copies of every parameter of these layers, their parametrizations' originals included, each once
    (for restoring them when a fix fails half-way)."""
    out: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    with torch.no_grad():
        for _, m in layers:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((p, p.detach().clone()))
    return out


def refuse_meta(model: nn.Module, what: str) -> None:
    """Raise when ``model`` has tensors on the meta device: they have no values to measure or write."""
    meta = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if meta:
        raise SignalpropError(
            f"{what}: {len(meta)} tensor(s) of {type(model).__name__} are on the meta device ({', '.join(meta[:3])}"
            f"{', ...' if len(meta) > 3 else ''}), with no storage to measure or write. Allocate and initialize "
            "them first: sp.init.materialize_(model, device='cpu') (or 'cuda'), then call "
            f"{what.split(':')[0]} again"
        )


def restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for p, copy in saved:
            p.copy_(copy)
