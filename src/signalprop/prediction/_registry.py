"""What predict knows by name: the ops it moves moments through without arithmetic of their own (views,
identities, shape-only ops), the elementwise functions it treats as activations; what it can be taught (a
rule per module class, :func:`register_rule`); and the warning that names what it had no rule for
(:class:`PredictWarning`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._errors import SignalpropError
from ..graph._ir import MULTI_OUTPUT_OPS, Node
from . import _rules as R

IDENTITY_OPS = frozenset({"to", "type", "float", "half", "double", "bfloat16", "detach", "alias", "clone",
                          "contiguous", "identity", "lift_fresh_copy", "type_as", "copy"})
SHAPE_OPS = frozenset({"view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "unsqueeze",
                       "squeeze", "expand", "getitem", "narrow", "slice", "select", "cat", "concat", "pad",
                       "constant_pad_nd", "repeat", "stack", "movedim", "expand_as", "view_as", "reshape_as",
                       "index", "index_select", "gather", "take_along_dim", "take", "masked_select", "flip",
                       "roll", "tril", "triu", "diagonal", "repeat_interleave", "tile", "broadcast_to",
                       "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d",
                       "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
                       "pixel_shuffle", "pixel_unshuffle", "channel_shuffle", "unfold", "swapaxes"})
MULTI_OPS = MULTI_OUTPUT_OPS
"""Ops with several outputs on data: read lazily, piece by piece, through ``getitem``."""
VALUE_FREE_OPS = frozenset({"ones_like", "zeros_like", "full_like", "empty_like", "new_ones", "new_zeros",
                            "new_full", "new_empty", "size", "sym_size", "dim", "numel", "sym_numel"})
"""Ops whose result depends on their input's shape and dtype only: computed exactly."""
ELEMENTWISE = {"exp": torch.exp, "sin": torch.sin, "cos": torch.cos}
"""Elementwise functions of data that are not activations to the graph (no init gain follows from them):
predicted like one, by quadrature over each element's Gaussian (Mamba's discretized state, exp(A dt))."""
SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "layout", "is_cuda"})
"""Tensor attributes fx records as ``getattr`` (``b, n, d = x.shape``): read from a placeholder, exactly."""
NO_OPS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "_functional_assert_async",
                    "sym_constrain_range_for_size", "sym_constrain_range", "_check_is_size"})
SHAPE_MODULES = frozenset({"Flatten", "Unflatten", "ZeroPad1d", "ZeroPad2d", "ZeroPad3d"})


Rule = Callable[[nn.Module, "R.Moments", Node], "tuple[R.Moments, R.Back]"]

MODULE_RULES: dict[str, Rule] = {}
"""Module class name -> rule(module, input moments, node) -> (output moments, backward). One line to add."""


class PredictWarning(UserWarning):
    """Some module or op has no prediction rule and was passed through unchanged.

    The warning names the op, the module it sits in and how many calls; the prediction downstream of it
    assumes the op leaves its input's statistics as they are.

    Examples:
        >>> import warnings
        >>> class Clip(nn.Module):
        ...     def forward(self, x):
        ...         return torch.ops.aten.clamp(x, -50.0, 50.0)
        >>> from signalprop.prediction import predict
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = predict(nn.Sequential(nn.Linear(8, 8), Clip()), (8,))
        >>> [type(w.message).__name__ for w in caught]
        ['PredictWarning']
    """


def register_rule(kind: str, rule: Rule) -> None:
    """Add a prediction rule for modules of class name ``kind`` (see :data:`MODULE_RULES`).

    A rule maps a module call's input moments (per-element mean, variance and the rest of
    :class:`signalprop.prediction._rules.Moments`) to its output moments, and returns with them the backward
    map from the output gradient's second moment to the input's. It replaces the module's body: use it for
    a custom layer whose ops predict has no rule for (a :class:`PredictWarning` names them).

    Args:
        kind: The module's class name (``type(module).__name__``).
        rule: ``rule(module, moments, node) -> (moments, backward)``, ``backward(g2) -> [g2_input]``.

    Returns:
        None; every later :func:`predict` call uses the rule.

    Raises:
        SignalpropError: ``kind`` is not a string or ``rule`` is not callable.

    Examples:
        A clipping layer that never clips at the scales in play passes its input's statistics on:

        >>> class Clip(nn.Module):
        ...     def forward(self, x):
        ...         return torch.ops.aten.clamp(x, -50.0, 50.0)
        >>> register_rule("Clip", lambda module, x, node: (x, lambda g2: [g2]))
        >>> import signalprop as sp
        >>> net = sp.init.orthogonal_(nn.Sequential(nn.Linear(64, 64, bias=False), Clip(), nn.ReLU()))
        >>> round(float(sp.predict(net, (64,))["2"].fwd.var), 4)  # 1/2 - 1/(2 pi): ReLU of a unit variance
        0.3408
        >>> del MODULE_RULES["Clip"]
    """
    if not isinstance(kind, str) or not callable(rule):
        raise SignalpropError("register_rule needs a module class name (str) and a callable "
                              "rule(module, moments, node) -> (moments, backward)")
    MODULE_RULES[kind] = rule
