"""What :func:`signalprop.predict` takes as inputs: example inputs or a shape, their variances and batch."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._errors import SignalpropError


def capture_inputs(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The example inputs in the form capture takes: a tuple of positional inputs or a dict of keywords."""
    if kwargs and args:
        raise SignalpropError("predict takes inputs as a tensor, a tuple (positional) or a dict (keyword)")
    return dict(kwargs) if kwargs else tuple(args)


def input_relvar(x: torch.Tensor, batch: int) -> float:
    """Relative variance of a batch's input mean square, ``kappa_x / (B n_x)`` (``_band``)."""
    t = x.detach().double()
    q = float(t.pow(2).mean())
    if not (q > 0 and math.isfinite(q)):
        return 0.0
    kappa = max(float(t.pow(4).mean()) / (q * q) - 1.0, 0.0)
    return kappa / (batch * max(t[0].numel() if t.dim() else 1, 1))


def tensors(obj: Any) -> list[torch.Tensor]:
    from ..graph._ir import map_refs

    found: list[torch.Tensor] = []
    map_refs(obj, lambda o: found.append(o) if isinstance(o, torch.Tensor) else None)
    return found


def batch_of(args: Any, kwargs: Any) -> int | None:
    ts = [t for t in tensors((args, kwargs)) if t.dim() >= 1]
    return int(ts[0].shape[0]) if ts else None


def input_vars(input_var: Any, flat: list[torch.Tensor], given: bool) -> list[float] | float:
    """One variance per floating input (a list) or one for all (a float), checked."""
    if input_var is None:
        if not given:
            return 1.0
        out = [float(t.detach().double().pow(2).mean()) if t.numel() else 1.0 for t in flat]
        bad = [v for v in out if not (math.isfinite(v) and v > 0)]
        if bad:
            raise SignalpropError("an example input's mean square is not a positive finite number; pass "
                                  "input_var= explicitly")
        return out
    vals = list(input_var) if isinstance(input_var, list | tuple) else [input_var]
    for v in vals:
        if isinstance(v, bool) or not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise SignalpropError(f"input_var must be a positive finite number (or one per floating input), "
                                  f"got {input_var!r}")
    if isinstance(input_var, list | tuple):
        if given and len(vals) != len(flat):
            raise SignalpropError(f"input_var has {len(vals)} values for {len(flat)} floating inputs")
        return [float(v) for v in vals]
    return float(vals[0])
