"""The user's inputs: how signalprop calls a model with them, and how it finds the tensor that matters.

Every stage takes inputs in one of three forms, as the model's own ``forward`` receives them: a tensor
(``model(x)``), a tuple or list (``model(*inputs)``), or a mapping of keyword arguments
(``model(**inputs)``, e.g. a transformers tokenizer's ``BatchEncoding``). :func:`call_args` turns them into
``(args, kwargs)`` and :func:`call_model` calls the model; both raise a :class:`SignalpropError` naming the
three forms for anything else. :func:`first_tensor` finds the first tensor in inputs or outputs (nested
tuples, lists, dicts and transformers' ``ModelOutput``, an ordered dict, depth-first).

>>> import torch
>>> call_args({"x": torch.zeros(2)})[1].keys()
dict_keys(['x'])
>>> first_tensor(((1, torch.arange(3)), torch.zeros(2)), floating=True).dtype
torch.float32
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ._errors import SignalpropError

__all__ = ["Inputs", "call_args", "call_model", "check_inputs", "first_float_tensor", "first_tensor"]

Inputs = torch.Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]

_FORMS = (
    "inputs must be a tensor (called as model(x)), a tuple or list of positional inputs (model(*inputs)) "
    "or a dict of keyword inputs (model(**inputs))"
)


def _is_mapping(obj: Any) -> bool:
    # transformers' BatchEncoding is a UserDict (a Mapping); duck typing covers look-alikes that are not.
    return isinstance(obj, Mapping) or (hasattr(obj, "keys") and hasattr(obj, "__getitem__"))


def check_inputs(inputs: Any) -> None:
    """Raise a :class:`SignalpropError` unless ``inputs`` is a tensor, a tuple or list, or a mapping."""
    if not (isinstance(inputs, torch.Tensor | tuple | list) or _is_mapping(inputs)):
        raise SignalpropError(f"cannot feed inputs of type {type(inputs).__name__} to the model: {_FORMS}")


def call_args(inputs: Any, *, copy: bool = False) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``(args, kwargs)`` for ``model(*args, **kwargs)``: ``((x,), {})``, ``(tuple(inputs), {})`` or
    ``((), dict(inputs))``.

    ``copy=True`` gives the model copies of the floating-point tensors (detached leaves that require no
    grad, as a training loop's inputs are): a model that writes its input in place writes the copy, never
    the user's tensor, and one that sets ``requires_grad`` on its input (or a view of it) may.
    """
    check_inputs(inputs)
    if isinstance(inputs, torch.Tensor):
        args: tuple[Any, ...] = (inputs,)
        kwargs: dict[str, Any] = {}
    elif isinstance(inputs, tuple | list):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (), {str(k): inputs[k] for k in inputs.keys()}
    if copy:
        args = tuple(_copy(v) for v in args)
        kwargs = {k: _copy(v) for k, v in kwargs.items()}
    return args, kwargs


def _copy(v: Any) -> Any:
    return v.detach().clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a mapping,
    on copies of the floating-point tensors (see :func:`call_args`)."""
    args, kwargs = call_args(inputs, copy=True)
    return model(*args, **kwargs)


def first_tensor(obj: Any, *, floating: bool = False) -> torch.Tensor | None:
    """The first tensor in ``obj`` (the first floating-point one with ``floating=True``): ``obj`` itself, or
    depth-first through tuples, lists and mappings (which covers transformers' ``ModelOutput``)."""
    if isinstance(obj, torch.Tensor):
        return obj if (obj.is_floating_point() or not floating) else None
    if isinstance(obj, tuple | list):
        items: Iterable[Any] = obj
    elif isinstance(obj, Mapping):
        items = obj.values()
    elif _is_mapping(obj) and not isinstance(obj, str | bytes):
        items = (obj[k] for k in obj.keys())
    else:
        return None
    for v in items:
        t = first_tensor(v, floating=floating)
        if t is not None:
            return t
    return None


def first_float_tensor(obj: Any) -> torch.Tensor | None:
    """The first floating-point tensor in ``obj`` (see :func:`first_tensor`): the one whose statistics
    measure records for a module's output, and where its backward pass starts."""
    return first_tensor(obj, floating=True)
