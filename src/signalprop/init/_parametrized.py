"""Weights computed through ``torch.nn.utils.parametrize`` (``weight_norm``, ``spectral_norm``, ``orthogonal``).

A parametrized layer's ``weight`` is recomputed from its originals at every access (``weight_norm``: ``g * v /
||v||`` from ``original0 = g`` and ``original1 = v``), so writing into the tensor that ``layer.weight``
returns changes nothing. Assigning to ``layer.weight`` calls the parametrizations' ``right_inverse``
(``weight_norm``: ``g = ||W||`` per output unit, ``v = W``), which sets the originals so the effective
weight is the assigned one: that is how an initializer writes a planned weight into such a layer.

Some parametrizations fix the scale whatever is assigned (``spectral_norm`` divides by the largest singular
value; ``orthogonal`` keeps ``W W^T = I``): an init cannot set their std, :func:`scale_fixed` says so.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._errors import SignalpropError

__all__ = ["assign_", "is_parametrized", "scale_fixed", "storage"]

_SCALE_FIXED = {
    "_SpectralNorm": "spectral_norm divides it by its largest singular value, which is then 1 whatever is drawn",
    "_Orthogonal": "orthogonal keeps it orthogonal (every singular value 1), whatever is drawn",
}


def is_parametrized(m: nn.Module, name: str) -> bool:
    """True when ``m.<name>`` is computed by a parametrization."""
    return parametrize.is_parametrized(m, name)


def scale_fixed(m: nn.Module, name: str) -> str | None:
    """Why no init can set the scale of ``m.<name>`` (a parametrization normalizes it), or None."""
    if not is_parametrized(m, name):
        return None
    for p in m.parametrizations[name]:  # type: ignore[union-attr,index]
        why = _SCALE_FIXED.get(type(p).__name__)
        if why is not None:
            return f"its {name} is parametrized by {type(p).__name__.lstrip('_')}: {why}"
    return None


def storage(m: nn.Module, name: str) -> torch.Tensor | None:
    """The tensor that stores ``m.<name>``: the parameter itself, or its parametrization's first original.

    Two layers that share a weight (a tied embedding and output head) share this tensor.
    """
    if is_parametrized(m, name):
        plist = m.parametrizations[name]  # type: ignore[union-attr,index]
        t = getattr(plist, "original", None)
        return t if isinstance(t, torch.Tensor) else getattr(plist, "original0", None)
    t = m._parameters.get(name)
    if t is None:
        t = m._buffers.get(name)
    return t


def assign_(m: nn.Module, name: str, value: torch.Tensor, where: str) -> None:
    """Set the effective ``m.<name>`` to ``value`` through the parametrizations' ``right_inverse``.

    Checks that the layer then computes ``value`` (to float32 rounding); a parametrization without a
    right inverse, or one that changes what was assigned, raises :class:`SignalpropError` naming it.
    """
    kinds = ", ".join(type(p).__name__.lstrip("_") for p in m.parametrizations[name])  # type: ignore[union-attr,index]
    current = getattr(m, name)
    with torch.no_grad():
        try:
            setattr(m, name, value.to(dtype=current.dtype, device=current.device))
        except (NotImplementedError, RuntimeError, ValueError) as exc:
            raise SignalpropError(
                f"{where}: {name} is computed by the parametrization {kinds}, which cannot be set from a weight "
                f"({exc}); initialize its originals (module.parametrizations.{name}.original*) yourself"
            ) from exc
        got = getattr(m, name).detach().to(torch.float64)
    want = value.detach().to(torch.float64)
    err = float((got - want).norm()) / max(float(want.norm()), 1e-30)
    if not err <= 1e-3:
        raise SignalpropError(
            f"{where}: {name} is computed by the parametrization {kinds}, which does not give back the weight "
            f"assigned to it (relative difference {err:.3g}): its output scale is not the init's to set. "
            "Initialize its originals (module.parametrizations."
            f"{name}.original*) yourself, or remove the parametrization"
        )
