"""The layer taxonomy: what a weight layer is, what a normalization layer is. One definition, every stage.

measure marks weight layers in a trace, diagnose judges drift between them, predict walks them, init draws
them and fix plans them: all ask this module, so a layer counted in one stage is counted in all. A weight
layer whose fans no rule knows (a custom layer) is still a weight layer: init and fix then say which
``sp.init.register_fans`` call would teach them, instead of skipping it.

>>> from torch import nn
>>> is_weight_layer(nn.Linear(3, 4)), is_weight_layer(nn.LayerNorm(4)), is_weight_layer(nn.ReLU())
(True, False, False)
>>> weight_names(nn.LSTM(3, 4))
['weight_ih_l0', 'weight_hh_l0']
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["NORM_TYPES", "ChannelDims", "channel_layout", "is_norm", "is_norm_kind", "is_weight_layer", "weight_names"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
"""Normalization layers of torch itself: each divides its input's scale out (BatchNorm, InstanceNorm,
LayerNorm, GroupNorm, LocalResponseNorm, RMSNorm)."""

_NORM_SUFFIXES = ("Norm", "LayerNorm", "RMSNorm", "Norm1d", "Norm2d", "Norm3d", "Normalization")


def is_norm_kind(kind: str) -> bool:
    """True for a module class name that reads as a normalization layer.

    ``LlamaRMSNorm``, ``BatchNorm2d``, ``T5LayerNorm`` do; an activation class named ``...Norm...`` does
    not. For layers known only by their class name (a trace's ``kind``).

    Args:
        kind: A module class name.

    Returns:
        Whether it ends like a normalization layer's name.

    Examples:
        >>> is_norm_kind("LlamaRMSNorm"), is_norm_kind("BatchNorm2d"), is_norm_kind("Linear")
        (True, True, False)
    """
    return kind.endswith(_NORM_SUFFIXES) and "Activation" not in kind


def is_norm(m: nn.Module) -> bool:
    """True for a normalization layer: one of :data:`NORM_TYPES`, or a class whose name reads as one.

    Args:
        m: Any module (transformers' ``LlamaRMSNorm``, ``T5LayerNorm``, ... count by name).

    Returns:
        Whether ``m`` divides its input's scale out.

    Examples:
        >>> is_norm(nn.BatchNorm2d(3)), is_norm(nn.Linear(2, 2))
        (True, False)
    """
    return isinstance(m, NORM_TYPES) or is_norm_kind(type(m).__name__)


def weight_names(m: nn.Module) -> list[str]:
    """Names of the tensors of two or more dimensions that ``m`` owns directly, in registration order.

    Its parameters, and the tensors it computes through a parametrization (``weight_norm``,
    ``spectral_norm``, ``orthogonal``) under their parametrized name (``weight``, not ``original0``).

    Args:
        m: Any module; its children are not looked into.

    Returns:
        The attribute names, possibly empty.

    Examples:
        >>> from torch.nn.utils.parametrizations import weight_norm
        >>> weight_names(weight_norm(nn.Linear(3, 4))), weight_names(nn.MultiheadAttention(4, 2))
        (['weight'], ['in_proj_weight'])
    """
    names = [k for k, p in m._parameters.items() if p is not None and p.dim() >= 2]
    if parametrize.is_parametrized(m):
        for k, plist in m.parametrizations.items():  # type: ignore[union-attr,operator]
            original = getattr(plist, "original", None)
            if original is None:
                original = getattr(plist, "original0", None)
            shape = getattr(m, k).shape if original is None or original.dim() < 2 else original.shape
            if len(shape) >= 2 and k not in names:
                names.append(k)
    return names


def is_weight_layer(m: nn.Module) -> bool:
    """True for a module that owns a weight of two or more dimensions and is not a normalization layer.

    That is Linear, Bilinear, ConvNd, ConvTransposeNd, Embedding(Bag), MultiheadAttention (``in_proj_weight``),
    RNN/LSTM/GRU, transformers' Conv1D, a layer under ``weight_norm`` and any custom layer holding its own
    weight matrix (used through ``F.linear`` or ``F.conv2d``): the layers an initialization acts on.

    Args:
        m: Any module.

    Returns:
        Whether :func:`weight_names` finds a weight and ``m`` is not a normalization layer (:func:`is_norm`).

    Examples:
        >>> is_weight_layer(nn.Conv2d(1, 2, 3)), is_weight_layer(nn.Embedding(5, 3)), is_weight_layer(nn.BatchNorm1d(4))
        (True, True, False)
    """
    if is_norm(m) or isinstance(m, parametrize.ParametrizationList):
        return False  # a ParametrizationList holds the originals of its parent's parametrized weight
    return bool(weight_names(m))


# ---- where a layer's output keeps its channels ----------------------------------------------------------------
_CHANNEL_FIRST: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,  # BatchNorm, InstanceNorm: (N, C, ...)
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
_CHANNEL_LAST: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.Embedding,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_CHANNEL_LAST_NAMES = ("Conv1D",)  # transformers' GPT-2 Conv1D: x @ W + b, features last


def channel_layout(m: nn.Module) -> str | None:
    """Where ``m``'s output keeps its channels, from its type alone.

    Args:
        m: Any module.

    Returns:
        ``"first"`` (dim 1: convolutions, BatchNorm, pooling), ``"last"`` (Linear-like layers, LayerNorm,
        RMSNorm, Embedding) or None (unknown).

    Examples:
        >>> channel_layout(nn.Conv2d(3, 8, 3)), channel_layout(nn.Linear(3, 8)), channel_layout(nn.ReLU())
        ('first', 'last', None)
    """
    if isinstance(m, _CHANNEL_FIRST):
        return "first"
    if isinstance(m, _CHANNEL_LAST) or type(m).__name__ in _CHANNEL_LAST_NAMES:
        return "last"
    return None


class ChannelDims:
    """The channel dimension of each module output in one model: the one rule measure, the Monitor and the
    fixes use for per-channel statistics (dead units, a bias's broadcast dimension).

    A layer of known layout (:func:`channel_layout`) says where its channels are: dim 1 for (N, C, ...),
    the last dim for (..., features). Any other module's output is read by its rank: 2-D as (N, features),
    4-D and higher as (N, C, ...), and 3-D as (N, C, L) when a channel-first layer of the same model gave
    that shape (a Conv1d stack's activation), else as (B, T, features). 0-D and 1-D tensors have none.

    Examples:
        >>> dims = ChannelDims()
        >>> dims(nn.Conv1d(4, 8, 3), torch.zeros(2, 8, 5)), dims(nn.ReLU(), torch.zeros(2, 8, 5))
        (1, 1)
        >>> dims(nn.ReLU(), torch.zeros(2, 7, 16)), dims(nn.Linear(3, 8), torch.zeros(2, 4, 4, 8))
        (-1, -1)
    """

    def __init__(self) -> None:
        self._channel_first: set[tuple[int, ...]] = set()

    def __call__(self, module: nn.Module, t: torch.Tensor) -> int | None:
        """The channel dimension of ``t``, the output of ``module`` (negative: counted from the end)."""
        if t.dim() <= 1:
            return None
        layout = channel_layout(module)
        if layout == "last":
            return -1
        if layout == "first":
            if t.dim() == 3:
                self._channel_first.add(tuple(t.shape))
            return 1
        if t.dim() != 3:
            return 1
        return 1 if tuple(t.shape) in self._channel_first else -1
