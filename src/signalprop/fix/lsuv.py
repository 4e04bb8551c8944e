"""Layer-sequential unit-variance initialization (Mishkin & Matas 2016, "All you need is a good init"),
in about one forward pass plus one verifying pass, on any model, traceable or not.

Why one pass is enough: a weight layer's output is linear in its weight, y = s * (W x) + b, so one
measurement of its output gives the exact scale s that puts std(y) on the target. A forward hook may return
a replacement output; if each weight layer's hook measures its output, rescales the layer's weight and
returns the rescaled output, every layer downstream already sees the corrected inputs. The layers are
thus fixed in execution order in a single forward, where the original procedure (and the ``lsuv`` package)
runs one full forward per layer and attempt. A second, measuring pass proves the result; any layer still
outside the tolerance (a model whose forward is not a function of its weights alone, a weight tied to an
earlier layer) is corrected again in the same way, up to ``max_iters`` passes.

With a bias b (broadcast along the channel dimension), std(y)^2 = s^2 var(a) + 2 s cov(a, b) + var(b)
with a = W x: a quadratic in s, solved exactly for its positive root. When the bias alone carries more
variance than the target (no positive root), weight and bias are scaled together, y -> s y.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from .._inputs import call_model
from .._state import eval_mode, forked_rng, preserved
from ._common import Inputs, channel_dim, mha_fastpath_disabled, restore, snapshot, weight_layers

__all__ = ["LSUVResult", "lsuv_", "lsuv_run", "output_stds"]


@dataclass(frozen=True)
class LSUVResult:
    """What :func:`lsuv_run` did.

    ``layers``: the weight layers it rescaled, in the order of their first call; ``stds``: each one's output
    std measured in the last pass (the verifying one when ``converged``); ``passes``: forward passes run;
    ``skipped``: layer name -> why it was left alone (never called as a module, non-tensor output, output
    without variance).
    """

    layers: tuple[str, ...]
    stds: tuple[float, ...]
    passes: int
    converged: bool
    target_std: float
    tol: float
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def worst(self) -> float:
        """max over layers of |std - target_std| (0 when there were no layers)."""
        return max((abs(s - self.target_std) for s in self.stds), default=0.0)


def lsuv_(
    model: nn.Module,
    inputs: Inputs,
    *,
    target_std: float = 1.0,
    tol: float = 0.01,
    max_iters: int = 10,
    orthogonal: bool = True,
    layers: Sequence[str] | None = None,
) -> nn.Module:
    """Rescale every weight layer so its output std on ``inputs`` is ``target_std`` (LSUV), in place.

    Mishkin & Matas (2016), Algorithm 1: pre-initialize with orthonormal matrices (Saxe et al. 2014), then,
    layer by layer in execution order, scale W by ``target_std / std(W x + b)``. Here every layer is fixed
    within one forward (see the module docstring) and a second forward verifies; the cost is about three
    forward-pass times on a 50-layer CNN, against one forward per layer and attempt for the ``lsuv`` package.

    Parameters
    ----------
    model:
        Any ``nn.Module``; its weight layers are those of :func:`signalprop.init.weight_layers` (Linear,
        convolutions, transformers' Conv1D, ...), embeddings excepted (they have no input to normalize).
    inputs:
        One batch: a tensor (``model(x)``), a tuple (``model(*inputs)``) or a dict (``model(**inputs)``).
        The std is taken over every element of a layer's output on this batch.
    target_std, tol:
        The target and the absolute tolerance: afterwards |std - target_std| <= tol at every layer.
    max_iters:
        At most this many correcting passes (one usually suffices), each followed by a verifying pass.
    orthogonal:
        Re-initialize each weight layer orthogonally (:func:`signalprop.init.orthogonal_`) with a zero bias
        first, as the paper does; ``False`` keeps the current weights and biases and only rescales weights.
    layers:
        Only these weight layers (qualified names from ``named_modules``); default all of them.

    Notes
    -----
    The model runs in eval mode (dropout off; BatchNorm uses, and does not update, its running statistics),
    so a forward is deterministic; each module's train/eval mode, the RNG state, the model's hooks and
    buffers are restored, and no ``.grad`` is created. A layer called more than once in a forward (shared
    weights) is rescaled on its first call only: the first call decides, later calls see the new weight.
    When a layer's output feeds an in-place activation (``ReLU(inplace=True)``), the hook has measured it
    before the activation runs. On an exception the weights are restored.
    Warns (and returns the model) when some layer is still outside ``tol`` after ``max_iters`` passes.

    >>> import torch, signalprop as sp
    >>> net = sp.models.mlp(20, 64, "tanh")
    >>> _ = sp.fix.lsuv_(net, torch.randn(256, 64))
    """
    result = lsuv_run(model, inputs, target_std=target_std, tol=tol, max_iters=max_iters, orthogonal=orthogonal,
                      layers=layers)
    if not result.converged:
        bad = [f"{n} (std {s:.4g})" for n, s in zip(result.layers, result.stds) if abs(s - target_std) > tol]
        warnings.warn(
            f"lsuv_: after {result.passes} passes {len(bad)} layer(s) are still outside target_std "
            f"{target_std:g} +- {tol:g}: {', '.join(bad[:5])}. The model's forward is not a fixed function "
            "of its weights on these inputs (randomness in eval mode, weights tied across layers); raise "
            "max_iters or tol, or check those layers.",
            stacklevel=2,
        )
    return model


def lsuv_run(
    model: nn.Module,
    inputs: Inputs,
    *,
    target_std: float = 1.0,
    tol: float = 0.01,
    max_iters: int = 10,
    orthogonal: bool = True,
    layers: Sequence[str] | None = None,
) -> LSUVResult:
    """:func:`lsuv_` that returns an :class:`LSUVResult` (per-layer stds, passes, skipped layers)."""
    _check_args(target_std, tol, max_iters)
    all_layers = weight_layers(model)
    if layers is None:
        chosen = all_layers
    else:
        names = [layers] if isinstance(layers, str) else list(layers)
        known = {n for n, _ in all_layers}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SignalpropError(
                f"lsuv_: layers {unknown[:5]} are not weight layers of {type(model).__name__}; weight layers "
                f"are: {', '.join(sorted(known)[:20])}"
            )
        chosen = [(n, m) for n, m in all_layers if n in set(names)]
    if not chosen:
        raise SignalpropError(
            f"lsuv_ found no weight layer in {type(model).__name__}: it rescales Linear, convolution and "
            "other layers that signalprop.init.weight_layers lists; register a custom layer type with "
            "signalprop.init.register_fans"
        )
    saved = snapshot(chosen)
    try:
        with forked_rng(model), eval_mode(model), mha_fastpath_disabled(), torch.no_grad():
            if orthogonal:
                _orthogonal_(chosen)
            return _passes(model, inputs, chosen, target_std, tol, max_iters)
    except BaseException:
        restore(saved)
        raise


def output_stds(model: nn.Module, inputs: Inputs) -> dict[str, float]:
    """The output std of every weight layer on ``inputs`` (first call of each), in eval mode; read-only.

    Population std over every element of the output, from float64 moments. A cheap check for LSUV's
    target that needs no :func:`signalprop.measure`; the model, its modes and its RNG are left as found.
    """
    layers = weight_layers(model)
    stds: dict[str, float] = {}
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            if isinstance(m, nn.MultiheadAttention) and isinstance(out, tuple):
                out = out[0]
            if name not in stds and isinstance(out, torch.Tensor) and out.is_floating_point():
                o = out.detach().to(torch.float64)
                stds[name] = float(o.std(correction=0)) if o.numel() else math.nan

        return hook

    try:
        with preserved(model) as state, state.run(eval=True), mha_fastpath_disabled(), torch.no_grad():
            for name, m in layers:
                handles.append(m.register_forward_hook(make(name)))
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {name: stds[name] for name, _ in layers if name in stds}


# ---- internals ---------------------------------------------------------------------------------------
def _check_args(target_std: float, tol: float, max_iters: int) -> None:
    if not (isinstance(target_std, int | float) and math.isfinite(target_std) and target_std > 0):
        raise SignalpropError(f"target_std must be a positive finite number, got {target_std!r}; the usual is 1.0")
    if not (isinstance(tol, int | float) and math.isfinite(tol) and 0 < tol < target_std):
        raise SignalpropError(
            f"tol must be a positive number below target_std ({target_std:g}), got {tol!r}; the usual is 0.01"
        )
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 1:
        raise SignalpropError(f"max_iters must be an integer >= 1, got {max_iters!r}; one pass usually suffices")


def _orthogonal_(layers: list[tuple[str, nn.Module]]) -> None:
    from ..init import orthogonal_

    for name, m in layers:
        try:
            orthogonal_(m)
        except SignalpropError as exc:
            raise SignalpropError(f"lsuv_: orthogonal pre-init of layer {name!r} failed: {exc}") from exc
        bias = getattr(m, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()


class _Pass:
    """One forward in which each weight layer's hook measures (and, when asked, corrects) its output."""

    def __init__(self, target: float, tol: float, rescale_all: bool, may_rescale: bool) -> None:
        self.target = target
        self.tol = tol
        self.rescale_all = rescale_all
        self.may_rescale = may_rescale
        self.order: list[str] = []
        self.stds: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.rescaled = 0
        self.touched: set[int] = set()  # ids of weights already rescaled in this pass (tied weights)

    def hook(self, name: str) -> Callable[..., Any]:
        def fn(m: nn.Module, args: Any, out: Any) -> Any:
            if name in self.stds or name in self.skipped:
                return None  # a shared layer: the first call decided
            # nn.MultiheadAttention returns (output, weights) and applies its out_proj functionally:
            # its output is linear in out_proj's weight, so that is the weight to scale.
            scaled = m.out_proj if isinstance(m, nn.MultiheadAttention) else m
            y = out[0] if isinstance(m, nn.MultiheadAttention) and isinstance(out, tuple) else out
            if not isinstance(y, torch.Tensor) or not y.is_floating_point():
                self.skipped[name] = f"its output is a {type(out).__name__}, not a floating-point tensor"
                return None
            new = self._visit(name, scaled, y)
            if new is None or y is out:
                return new
            return (new, *out[1:])

        return fn

    def _visit(self, name: str, m: nn.Module, y: torch.Tensor) -> torch.Tensor | None:
        weight = getattr(m, "weight", None)
        layer_bias = getattr(m, "bias", None)
        if not isinstance(weight, torch.Tensor):
            self.skipped[name] = "it has no weight tensor to scale"
            return None
        layer_bias = layer_bias if isinstance(layer_bias, torch.Tensor) else None
        dim = channel_dim(m, y)
        # The bias enters the quadratic only where it broadcasts along a known dimension and is not zero;
        # otherwise weight and bias are scaled together (exact: the output is then s * y).
        bias = layer_bias if dim is not None else None
        if bias is not None and not bool(bias.detach().any()):
            bias = None  # a zero bias changes nothing: skip the per-channel sums
        mom = _moments(y, None if bias is None else dim, None if bias is None else bias.detach(), name)
        std = math.sqrt(max(mom.var_y, 0.0))
        self.order.append(name)
        self.stds[name] = std
        if mom.var_a <= 0.0:
            self.skipped[name] = "its output has no variance from the weight (the input carries no signal)"
            return None
        if not self.may_rescale or (not self.rescale_all and abs(std - self.target) <= self.tol):
            return None
        if id(weight) in self.touched:
            return None  # a weight shared with a layer fixed earlier in this pass: that layer decided
        self.touched.add(id(weight))
        sw, sb = _scales(mom, self.target) if bias is not None else (self.target / std,) * 2
        self.rescaled += 1
        weight.mul_(sw)
        if sb == sw:
            if layer_bias is not None:
                layer_bias.mul_(sb)
            return y * sw
        assert bias is not None and dim is not None
        shape = [1] * y.dim()
        shape[dim] = -1
        return torch.add(y * sw, bias.detach().reshape(shape), alpha=1.0 - sw)


@dataclass(frozen=True)
class _Moments:
    var_y: float  # var(y), y = a + b
    var_a: float  # var(W x)
    var_b: float  # var of the broadcast bias
    cov: float  # cov(a, b)


def _moments(y: torch.Tensor, dim: int | None, bias: torch.Tensor | None, name: str) -> _Moments:
    """Population moments over all elements of y from one sum (per channel when a bias is present) and one
    dot product, reduced in the tensor's dtype on its device, combined in float64 on the host."""
    n = y.numel()
    if n == 0:
        raise SignalpropError(f"lsuv_: layer {name!r} produced an empty output (shape {tuple(y.shape)})")
    flat = y.reshape(-1)
    if dim is None or bias is None:
        sums = y.sum().reshape(1)
    else:
        sums = y.sum(dim=[d for d in range(y.dim()) if d != dim])
    packed = torch.cat([sums.to(torch.float64), torch.dot(flat, flat).reshape(1).to(torch.float64)])
    vals = packed.tolist()  # the one host sync of this layer
    q = vals[-1]
    if not math.isfinite(q) or not all(math.isfinite(v) for v in vals[:-1]):
        if not bool(torch.isfinite(y).all()):
            raise SignalpropError(
                f"lsuv_: the output of layer {name!r} contains inf or nan before it could be rescaled: its "
                "input or its weights are already non-finite. Check the inputs, or pass orthogonal=True to "
                "start from orthogonal weights"
            )
        y64 = y.detach().to(torch.float64)  # finite but the float32 squares overflowed: redo in float64
        sums = y64.sum().reshape(1) if dim is None or bias is None else y64.sum(
            dim=[d for d in range(y.dim()) if d != dim]
        )
        vals = sums.tolist() + [float(torch.dot(y64.reshape(-1), y64.reshape(-1)))]
        q = vals[-1]
    s_c = vals[:-1]
    mean_y = math.fsum(s_c) / n
    var_y = q / n - mean_y * mean_y
    if var_y < 1e-4 * mean_y * mean_y:  # cancellation: a large mean over a small spread; two-pass in float64
        var_y = float(y.detach().to(torch.float64).var(correction=0))
    if bias is None:
        return _Moments(var_y=var_y, var_a=var_y, var_b=0.0, cov=0.0)
    b = bias.to(torch.float64).reshape(-1).tolist()
    n_c = n / len(b)
    sum_bs = math.fsum(bi * si for bi, si in zip(b, s_c))
    sum_b = math.fsum(b)
    sum_b2 = math.fsum(bi * bi for bi in b)
    mean_b = sum_b / len(b)
    var_b = sum_b2 / len(b) - mean_b * mean_b
    mean_a = mean_y - mean_b
    e_ab = (sum_bs - n_c * sum_b2) / n
    cov = e_ab - mean_a * mean_b
    var_a = var_y - var_b - 2.0 * cov
    return _Moments(var_y=var_y, var_a=max(var_a, 0.0), var_b=max(var_b, 0.0), cov=cov)


def _scales(mom: _Moments, target: float) -> tuple[float, float]:
    """(weight scale, bias scale) that put std(s_w a + s_b b) on ``target``.

    s_b = 1 and s_w the positive root of var_a s^2 + 2 cov s + var_b = target^2 when there is one;
    otherwise both scaled together by target / std(y).
    """
    t2 = target * target
    if mom.var_b > 0.0:
        disc = mom.cov * mom.cov - mom.var_a * (mom.var_b - t2)
        if disc >= 0.0:
            s = (-mom.cov + math.sqrt(disc)) / mom.var_a
            if s > 0.0 and math.isfinite(s):
                return s, 1.0
        s = target / math.sqrt(mom.var_y)
        return s, s
    s = target / math.sqrt(mom.var_a)
    return s, s


def _passes(
    model: nn.Module,
    inputs: Inputs,
    layers: list[tuple[str, nn.Module]],
    target: float,
    tol: float,
    max_iters: int,
) -> LSUVResult:
    p: _Pass | None = None
    passes = 0
    for i in range(max_iters + 1):
        p = _Pass(target, tol, rescale_all=i == 0, may_rescale=i < max_iters)
        handles = [m.register_forward_hook(p.hook(name), prepend=True) for name, m in layers]
        try:
            call_model(model, inputs)
        finally:
            for h in handles:
                h.remove()
        passes += 1
        if i > 0 and p.rescaled == 0:
            break
    assert p is not None
    called = set(p.order) | set(p.skipped)
    called |= {f"{n}.out_proj" if n else "out_proj" for n, m in layers if isinstance(m, nn.MultiheadAttention)}
    skipped = dict(p.skipped)
    for name, _ in layers:
        if name not in called:
            skipped[name] = "never called as a module in the forward (its weight may be used functionally)"
    names = tuple(n for n in p.order if n not in skipped)
    stds = tuple(p.stds[n] for n in names)
    converged = all(abs(s - target) <= tol for s in stds)
    return LSUVResult(
        layers=names,
        stds=stds,
        passes=passes,
        converged=converged,
        target_std=target,
        tol=tol,
        skipped=skipped,
    )
