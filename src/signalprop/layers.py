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

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["NORM_TYPES", "is_norm", "is_norm_kind", "is_weight_layer", "weight_names"]

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
