"""Helpers the fix modules share: calling a model on tensor | tuple | dict inputs, the weight layers to act
on, where a layer's bias broadcasts, and saving / restoring what a fix must leave as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError

Inputs = Any  # torch.Tensor | tuple | list | dict[str, Any]

# Layers that carry a weight but take no signal to mix (an index lookup): LSUV and the fan-based schemes
# have no fan-in to act on, so they are left alone (their scale is a modelling choice, not a propagation one).
_NOT_MIXING = (nn.Embedding, nn.EmbeddingBag)

_CONV_TYPES = (nn.modules.conv._ConvNd,)


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, torch.Tensor):
        return model(inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    # transformers' BatchEncoding is a UserDict, not a dict
    if hasattr(inputs, "keys") and hasattr(inputs, "__getitem__"):
        return model(**{k: inputs[k] for k in inputs.keys()})
    raise SignalpropError(
        f"cannot feed inputs of type {type(inputs).__name__} to the model: pass a tensor (called as "
        "model(x)), a tuple of positional inputs (model(*inputs)) or a dict of keyword inputs (model(**inputs))"
    )


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


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def preserved_rng(model: nn.Module) -> Iterator[None]:
    """Run a block that draws random numbers without moving the user's RNG streams (CPU and the model's GPU)."""
    dev = model_device(model)
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block and give each back its own mode afterwards.

    Eval mode makes a forward deterministic (dropout off) and read-only on buffers (BatchNorm uses and does
    not update its running statistics). Modes are restored per module, not just at the top, because a
    model may hold a mix (a frozen BatchNorm in eval inside a model in training).
    """
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


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
