"""One LSUV pass: a forward in which each weight layer's hook measures its output's std and, when asked,
rescales the layer so that it becomes the target (Mishkin & Matas 2016, Alg. 1), with the checks that a
layer's output is ``W x + b`` before it is scaled."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._common import channel_dim
from ._lsuv_math import moments, scales


class _Pass:
    """One forward in which each weight layer's hook measures (and, when asked, corrects) its output."""

    def __init__(self, targets: dict[str, float], rel_tol: float, rescale_all: bool, may_rescale: bool,
                 affine: dict[str, str | None], orthogonal: bool) -> None:
        self.targets = targets
        self.affine = affine  # layer -> why its output is not W x + b (None: it is), checked once per run
        self.orthogonal = orthogonal  # pre-initialize custom layers when their check passes
        self.rel_tol = rel_tol
        self.rescale_all = rescale_all
        self.may_rescale = may_rescale
        self.order: list[str] = []
        self.stds: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.rescaled = 0
        self.touched: set[int] = set()  # ids of weights already rescaled in this pass (tied weights)

    def hook(self, name: str) -> Callable[..., Any]:
        def fn(m: nn.Module, args: Any, kwargs: Any, out: Any) -> Any:
            if name in self.stds or name in self.skipped:
                return None  # a shared layer: the first call decided
            # nn.MultiheadAttention returns (output, weights) and applies its out_proj functionally:
            # its output is linear in out_proj's weight, so that is the weight to scale.
            scaled = m.out_proj if isinstance(m, nn.MultiheadAttention) else m
            y = out[0] if isinstance(m, nn.MultiheadAttention) and isinstance(out, tuple) else out
            if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                self.skipped[name] = f"its output is a {type(out).__name__}, not a floating-point tensor"
                return None
            new = self._visit(name, scaled, y, args, kwargs)
            if new is None or y is out:
                return new
            return (new, *out[1:])

        return fn

    def _visit(self, name: str, m: nn.Module, y: torch.Tensor, args: Any, kwargs: Any) -> torch.Tensor | None:
        from ..init.fans import has_fan_rule

        wname = _weight_name(m)
        if wname is None:
            self.skipped[name] = "it has no single weight tensor to scale"
            return None
        dim = channel_dim(m, y)
        if name not in self.affine:
            self.affine[name] = _not_affine(m, wname, y, dim, args, kwargs)
            if self.affine[name] is None and self.orthogonal and not has_fan_rule(m):
                y = _orthogonal_custom(m, wname, args, kwargs)  # a new output: passed on even unscaled
                new = self._rescale(name, m, y, wname, dim)
                return y if new is None else new
        why = self.affine[name]
        if why is not None:
            self.skipped[name] = why
            return None
        return self._rescale(name, m, y, wname, dim)

    def _rescale(self, name: str, m: nn.Module, y: torch.Tensor, wname: str, dim: int | None) -> torch.Tensor | None:
        """Measure ``y`` and, when asked, scale the weight so the output is on target; the new output or None."""
        from ..init._parametrized import assign_, is_parametrized, storage

        layer_bias = getattr(m, "bias", None)
        layer_bias = layer_bias if isinstance(layer_bias, torch.Tensor) else None
        # The bias enters the quadratic only where it broadcasts along a known dimension and is not zero;
        # otherwise weight and bias are scaled together (exact: the output is then s * y).
        bias = layer_bias if dim is not None else None
        if bias is not None and not bool(bias.detach().any()):
            bias = None  # a zero bias changes nothing: skip the per-channel sums
        mom = moments(y, None if bias is None else dim, None if bias is None else bias.detach(), name)
        std = math.sqrt(max(mom.var_y, 0.0))
        target = self.targets[name]
        self.order.append(name)
        self.stds[name] = std
        if mom.var_a <= 0.0:
            self.skipped[name] = "its output has no variance from the weight (the input carries no signal)"
            return None
        if not self.may_rescale or (not self.rescale_all and abs(std - target) <= self.rel_tol * target):
            return None
        key = id(storage(m, wname))
        if key in self.touched:
            return None  # a weight shared with a layer fixed earlier in this pass: that layer decided
        self.touched.add(key)
        sw, sb = scales(mom, target) if bias is not None else (target / std,) * 2
        self.rescaled += 1
        if is_parametrized(m, wname):
            assign_(m, wname, getattr(m, wname).detach() * sw, f"lsuv_ on layer {name!r}")
        else:
            getattr(m, wname).mul_(sw)
        if sb == sw:
            if layer_bias is not None:
                layer_bias.mul_(sb)
            return y * sw
        assert bias is not None and dim is not None
        shape = [1] * y.dim()
        shape[dim] = -1
        return torch.add(y * sw, bias.detach().reshape(shape), alpha=1.0 - sw)


def _orthogonal_custom(m: nn.Module, wname: str, args: Any, kwargs: Any) -> torch.Tensor:
    """The paper's pre-init for a custom layer (its weight orthogonal as PyTorch reads its shape, its bias
    zero), and its output on the same inputs."""
    from ..init.orthogonal import orthogonal_

    w = m._parameters[wname]
    assert w is not None
    orthogonal_(w)
    bias = getattr(m, "bias", None)
    if isinstance(bias, torch.Tensor):
        bias.zero_()
    out = m.forward(*args, **kwargs)
    assert isinstance(out, torch.Tensor)
    return out


def _weight_name(m: nn.Module) -> str | None:
    """The weight LSUV scales: ``weight`` (Linear, convolutions, Conv1D), else the layer's only weight."""
    from ..layers import weight_names

    if isinstance(getattr(m, "weight", None), torch.Tensor):
        return "weight"
    names = weight_names(m)
    return names[0] if len(names) == 1 else None


def _not_affine(m: nn.Module, wname: str, y: torch.Tensor, dim: int | None, args: Any, kwargs: Any) -> str | None:
    """For a layer without a fan rule: why its output is not W x + b in its weight (None when it is), from
    its forward at weights 0 and 2 W on the same inputs (the layer types with a fan rule are affine)."""
    from ..init.fans import has_fan_rule

    if has_fan_rule(m) or isinstance(m, nn.MultiheadAttention):
        return None
    w = m._parameters.get(wname)
    if not isinstance(w, torch.Tensor):
        return f"its {wname} is not a parameter of its own"
    saved = w.detach().clone()
    try:
        w.zero_()
        y0 = m.forward(*args, **kwargs)
        w.copy_(saved * 2)
        y2 = m.forward(*args, **kwargs)
    finally:
        w.copy_(saved)
    if not (isinstance(y0, torch.Tensor) and isinstance(y2, torch.Tensor) and y0.shape == y.shape == y2.shape):
        return f"its forward at other {wname} values does not give an output like its own"
    bias = getattr(m, "bias", None)
    c = torch.zeros_like(y)
    if isinstance(bias, torch.Tensor) and dim is not None:
        shape = [1] * y.dim()
        shape[dim] = -1
        c = c + bias.detach().reshape(shape)
    scale = float(y.detach().abs().max()) or 1.0
    if float((y0 - c).abs().max()) > 1e-4 * scale or float((y2 - (2 * y - c)).abs().max()) > 1e-3 * scale:
        return (f"its output is not W x + b in its {wname} (checked at {wname} = 0 and 2 {wname}), so no scale "
                "of it puts the output std on target")
    return None
