"""A scalar gate on one module's output, keeping every existing ``state_dict`` key and module name.

:func:`gate_` turns a module into an instance of a subclass of its own class (same class name, same
parameters and children) whose ``forward`` returns ``super().forward(...) * residual_gate``: an ordinary
``nn.Module`` forward, so ``torch.compile``, ``torch.export``, hooks and ``sp.measure`` see a plain module.
When the module returns a tuple (``nn.MultiheadAttention``), its first element is scaled.

* A *learnable* gate (ReZero, SkipInit) is a 0-dim ``nn.Parameter`` named ``residual_gate``: it adds the key
  ``<module>.residual_gate`` to the state_dict. A checkpoint saved before gating lacks that key; a
  load_state_dict pre-hook fills it with 1, the gate under which the gated model computes what the
  checkpoint's model computed, so ``load_state_dict(old, strict=True)`` loads it unchanged.
* A *constant* gate (depth-muP's 1/sqrt(L), DeepNorm's 1/alpha) is a non-persistent buffer: the state_dict
  keys are exactly the model's own. The constant is part of the architecture, not of the checkpoint:
  re-apply the scheme before loading a checkpoint trained with it.

Gated modules pickle (``torch.save(model)``) and deep-copy: the subclass is rebuilt from the original class.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["GATE", "gate_", "gate_of"]

GATE = "residual_gate"
_CLASSES: dict[type, type] = {}


class _Gated:
    """Mixin put in front of a module's own class: multiplies the output by ``residual_gate``."""

    _residual_base: type
    residual_gate: torch.Tensor

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)  # type: ignore[misc]
        g = self.residual_gate
        if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
            return (out[0] * g, *out[1:])
        return out * g

    def __reduce_ex__(self, protocol: Any) -> Any:
        return (_new_gated, (self._residual_base,), self.__dict__.copy())


def _gated_class(base: type) -> type:
    """The gated subclass of ``base`` (one per class), named as ``base`` so name-based rules still match it."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_Gated, base), {"_residual_base": base, "__module__": base.__module__,
                                                    "__qualname__": base.__qualname__})
        _CLASSES[base] = cls
    return cls


def _new_gated(base: type) -> Any:
    """An empty instance of ``base``'s gated subclass (unpickling fills its ``__dict__``)."""
    cls = _gated_class(base)
    return object.__new__(cls)


def _fill_missing_gate(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: a checkpoint without the gate (saved before gating) loads with gate 1."""
    key = prefix + GATE
    gate = module._parameters.get(GATE)
    if key not in state_dict and gate is not None:
        state_dict[key] = torch.ones_like(gate)


def gate_of(module: nn.Module) -> torch.Tensor | None:
    """The module's residual gate, or None when it has none."""
    return getattr(module, GATE, None) if isinstance(module, _Gated) else None


def gate_(module: nn.Module, value: float, *, learnable: bool) -> None:
    """Multiply ``module``'s output by a scalar starting at ``value`` (see the module docstring).

    Applying again replaces the gate (value and kind); the module keeps one gate.
    """
    ref = next(module.parameters(recurse=False), None)
    if ref is None:
        ref = next(module.parameters(), None)
    device = ref.device if ref is not None else torch.device("cpu")
    dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
    t = torch.full((), float(value), device=device, dtype=dtype)
    if not isinstance(module, _Gated):
        module.__class__ = _gated_class(type(module))
        module.register_load_state_dict_pre_hook(_fill_missing_gate)
    module._parameters.pop(GATE, None)
    module._buffers.pop(GATE, None)
    module._non_persistent_buffers_set.discard(GATE)
    if learnable:
        module.register_parameter(GATE, nn.Parameter(t))
    else:
        module.register_buffer(GATE, t, persistent=False)
