"""Layer-sequential unit-variance initialization (Mishkin & Matas 2016, "All you need is a good init"),
in about one forward pass plus one verifying pass, on any model, traceable or not, with targets that keep
the gradient in range.

Why one pass is enough: a weight layer's output is linear in its weight, y = s * (W x) + b, so one
measurement of its output gives the exact scale s that puts std(y) on the target. A forward hook may return
a replacement output; if each weight layer's hook measures its output, rescales the layer's weight and
returns the rescaled output, every layer downstream already sees the corrected inputs. The layers are
thus fixed in execution order in a single forward, where the original procedure (and the ``lsuv`` package)
runs one full forward per layer and attempt. A second, measuring pass proves the result; any layer still
outside the tolerance (a model whose forward is not a function of its weights alone, a weight tied to an
earlier layer) is corrected again in the same way, up to ``max_iters`` passes. The arithmetic (bias
included) is in :mod:`signalprop.fix._lsuv_math`.

Why not always std 1: pinning every pre-activation at variance q makes a chain of L layers of activation phi
multiply its gradient by r(q)^((L-1)/2), r(q) = q E[phi'^2]/E[phi^2] (1 for the ReLU family only; tanh
1.18 at q = 1: a 50-layer tanh net gets gradients 60x larger at its first layer than at its last). With
``keep_gradient`` (the default) each layer's target is the std nearest ``target_std`` at which its chain's
predicted gradient drift stays within 2x (:func:`signalprop.fix.lsuv_target`; the chains are read from the
model's graph in one extra forward).

Recurrent layers (RNN/LSTM/GRU) are not rescaled (their output is a bounded nonlinear function of their
weights): the orthogonal pre-init gives them :func:`signalprop.init.recurrent_`. A custom layer without a
fan rule is rescaled when its output is W x + b in its one weight (checked on its own inputs).
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
from ._common import Inputs, mha_fastpath_disabled, refuse_meta, restore, snapshot, weight_layers
from ._lsuv_pass import _Pass

__all__ = ["LSUVResult", "lsuv_", "lsuv_run", "output_stds"]


@dataclass(frozen=True)
class LSUVResult:
    """What :func:`lsuv_run` did.

    ``layers``: the weight layers it rescaled, in the order of their first call; ``stds``: each one's output
    std measured in the last pass (the verifying one when ``converged``); ``targets``: each one's target
    (``target_std``, or the std that keeps its chain's gradient in range); ``passes``: forward passes run;
    ``skipped``: layer name -> why it was not rescaled (never called as a module, non-tensor output,
    output without variance, a recurrent layer, a parametrization that fixes the scale); ``notes``: why
    targets moved.

    Attributes:
        layers: The rescaled weight layers, in the order of their first call.
        stds: Each one's output std in the last pass.
        passes: Forward passes run.
        converged: Whether every layer ended within ``tol`` of its target.
        target_std: The std asked for.
        tol: The tolerance asked for.
        skipped: Layer name -> why it was not rescaled.
        targets: Each layer's target.
        notes: Why targets moved off ``target_std``.

    Examples:
        >>> import torch, signalprop as sp
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> r = lsuv_run(net, torch.randn(128, 16, generator=torch.Generator().manual_seed(0)))
        >>> r.layers, r.targets, r.converged
        (('0', '2'), (1.0, 1.0), True)
    """

    layers: tuple[str, ...]
    stds: tuple[float, ...]
    passes: int
    converged: bool
    target_std: float
    tol: float
    skipped: dict[str, str] = field(default_factory=dict)
    targets: tuple[float, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def worst(self) -> float:
        """max over layers of |std - target| (0 when there were no layers)."""
        targets = self.targets or (self.target_std,) * len(self.stds)
        return max((abs(s - t) for s, t in zip(self.stds, targets)), default=0.0)


def lsuv_(
    model: nn.Module,
    inputs: Inputs,
    *,
    target_std: float = 1.0,
    tol: float = 0.01,
    max_iters: int = 10,
    orthogonal: bool = True,
    layers: Sequence[str] | None = None,
    keep_gradient: bool = True,
) -> nn.Module:
    """Rescale every weight layer so its output std on ``inputs`` is on target (LSUV), in place.

    Mishkin & Matas (2016), Algorithm 1: pre-initialize with orthonormal matrices (Saxe et al. 2014), then,
    layer by layer in execution order, scale W by ``target / std(W x + b)``. Here every layer is fixed
    within one forward (see the module docstring) and a second forward verifies; the cost is about three
    forward-pass times on a 50-layer CNN, against one forward per layer and attempt for the ``lsuv`` package.

    The model runs in eval mode (dropout off; BatchNorm uses, and does not update, its running statistics),
    so a forward is deterministic; each module's train/eval mode, the RNG state, the model's hooks and
    buffers are restored, and no ``.grad`` is created. A layer called more than once in a forward (shared
    weights) is rescaled on its first call only: the first call decides, later calls see the new weight.
    When a layer's output feeds an in-place activation (``ReLU(inplace=True)``), the hook has measured it
    before the activation runs. On an exception the weights are restored.
    Warns (and returns the model) when some layer is still outside ``tol`` after ``max_iters`` passes, and
    when a recurrent layer is left as it is (``orthogonal=False``), and when no target keeps a chain's
    gradient in range (LSUV does not suit that chain).

    Args:
        model: Any ``nn.Module``; its weight layers are those of :func:`signalprop.layers.is_weight_layer`
            (Linear, convolutions, transformers' Conv1D, custom layers, ...), embeddings excepted (they have
            no input to normalize) and RNNs only pre-initialized (see the module docstring).
        inputs: One batch: a tensor (``model(x)``), a tuple (``model(*inputs)``) or a dict
            (``model(**inputs)``). The std is taken over every element of a layer's output on this batch.
        target_std: The output std to pin (the paper's 1.0).
        tol: The tolerance: afterwards |std - target| <= tol * target / target_std at every layer, target
            being ``target_std`` or, with ``keep_gradient``, the std its chain needs.
        max_iters: At most this many correcting passes (one usually suffices), each followed by a
            verifying pass.
        orthogonal: Re-initialize each weight layer orthogonally (:func:`signalprop.init.orthogonal_`) with
            a zero bias first, as the paper does (recurrent layers: :func:`signalprop.init.recurrent_`);
            ``False`` keeps the current weights and biases and only rescales weights.
        layers: Only these weight layers (qualified names from ``named_modules``); default all of them.
        keep_gradient: Move a layer's target off ``target_std`` where pinning it there would make the
            gradient drift by more than 2x over its chain (tanh, sigmoid, GELU, SELU, softplus chains;
            :func:`lsuv_target`); ``False`` is the original LSUV, every layer at ``target_std``.

    Returns:
        ``model``, rescaled in place; :func:`lsuv_run` returns what was done.

    Raises:
        SignalpropError: Bad settings, a model on the meta device, or inputs the model cannot take.

    Examples:
        A ReLU MLP: every layer's output std is pinned at 1 (ReLU keeps the gradient at any scale):

        >>> import torch, signalprop as sp
        >>> net = sp.models.mlp(8, 64, "relu")
        >>> x = torch.randn(256, 64, generator=torch.Generator().manual_seed(0))
        >>> stds = output_stds(sp.fix.lsuv_(net, x), x)
        >>> all(abs(s - 1.0) <= 0.01 for s in stds.values())
        True
    """
    result = lsuv_run(model, inputs, target_std=target_std, tol=tol, max_iters=max_iters, orthogonal=orthogonal,
                      layers=layers, keep_gradient=keep_gradient)
    warn_result(result, "lsuv_")
    return model


def warn_result(result: LSUVResult, what: str) -> None:
    """The warnings of an LSUV run: layers still off target, recurrent layers left as they are."""
    if not result.converged:
        bad = [f"{n} (std {s:.4g}, target {t:.4g})" for n, s, t in zip(result.layers, result.stds, result.targets)
               if abs(s - t) > result.tol * t / result.target_std]
        warnings.warn(
            f"{what}: after {result.passes} passes {len(bad)} layer(s) are still outside their target +- "
            f"tol: {', '.join(bad[:5])}. The model's forward is not a fixed function of its weights on "
            "these inputs (randomness in eval mode, weights tied across layers); raise max_iters or tol, or "
            "check those layers.",
            stacklevel=3,
        )
    from ._critical import NOT_SUITED

    kept = [f"{n}: {why}" for n, why in result.skipped.items() if why.startswith("recurrent, left as it is")]
    kept += [note for note in result.notes if NOT_SUITED in note]
    if kept:
        warnings.warn(f"{what}: " + "; ".join(kept), UserWarning, stacklevel=3)


def lsuv_run(
    model: nn.Module,
    inputs: Inputs,
    *,
    target_std: float = 1.0,
    tol: float = 0.01,
    max_iters: int = 10,
    orthogonal: bool = True,
    layers: Sequence[str] | None = None,
    keep_gradient: bool = True,
) -> LSUVResult:
    """:func:`lsuv_` that returns an :class:`LSUVResult` (per-layer stds and targets, passes, skipped layers).

    Mishkin & Matas (2016), Algorithm 1, as :func:`lsuv_`, without its warnings: the result says whether it
    converged and which layers were skipped and why.

    Args:
        model: The model to rescale in place.
        inputs: One batch (tensor, tuple or dict).
        target_std: The output std to pin.
        tol: The tolerance, as in :func:`lsuv_`.
        max_iters: At most this many correcting passes.
        orthogonal: Pre-initialize orthogonally (Saxe et al. 2014) first.
        layers: Only these weight layers; default all.
        keep_gradient: Move targets where the chain's gradient needs it (:func:`lsuv_target`).

    Returns:
        The :class:`LSUVResult`.

    Raises:
        SignalpropError: As :func:`lsuv_`.

    Examples:
        A 20-layer tanh chain: std 1 would shrink the gradient, so the targets move to the std that keeps
        it in range (:func:`lsuv_target`):

        >>> import torch, signalprop as sp
        >>> net = sp.models.mlp(20, 64, "tanh")
        >>> r = sp.fix.lsuv_run(net, torch.randn(256, 64, generator=torch.Generator().manual_seed(0)))
        >>> round(r.targets[0], 2), round(r.targets[-1], 2)  # the tanh chain's std; the readout keeps it
        (0.56, 0.56)
        >>> r.converged, r.worst <= 0.01
        (True, True)
    """
    _check_args(target_std, tol, max_iters)
    if not isinstance(model, nn.Module):
        raise SignalpropError(f"lsuv_ needs an nn.Module, got {type(model).__name__}")
    refuse_meta(model, "lsuv_")
    chosen = _choose(model, layers)
    with preserved(model) as state, state.run(eval=True), mha_fastpath_disabled(), torch.no_grad():
        targets, notes = (_targets(model, inputs, chosen, target_std) if keep_gradient
                          else ({n: target_std for n, _ in chosen}, []))
    return run(model, inputs, chosen, targets, target_std=target_std, tol=tol, max_iters=max_iters,
               orthogonal=orthogonal, notes=notes)


def run(
    model: nn.Module,
    inputs: Inputs,
    chosen: list[tuple[str, nn.Module]],
    targets: dict[str, float],
    *,
    target_std: float = 1.0,
    tol: float = 0.01,
    max_iters: int = 10,
    orthogonal: bool = True,
    notes: Sequence[str] = (),
) -> LSUVResult:
    """The LSUV passes on ``chosen`` layers, each to its own target (``auto_init_`` passes its plan's)."""
    from ..init._parametrized import scale_fixed
    from ..layers import weight_names

    skipped: dict[str, str] = {}
    scaled: list[tuple[str, nn.Module]] = []
    for name, m in chosen:
        fixed = next((why for k in weight_names(m) if (why := scale_fixed(m, k)) is not None), None)
        if isinstance(m, nn.RNNBase):
            why = "its output is a bounded nonlinear function of its weights, which no weight scale puts on a target"
            skipped[name] = (
                f"recurrent: {why}; given sp.init.recurrent_ instead (LeCun input weights and orthogonal "
                "recurrent weights per gate, forget-gate bias 1)" if orthogonal else
                f"recurrent, left as it is: {why}, and orthogonal=False keeps its weights; "
                "sp.init.recurrent_(model) gives it the standard init"
            )
        elif fixed is not None:
            skipped[name] = f"{fixed}, so no rescaling sets its output std"
        else:
            scaled.append((name, m))
    saved = snapshot(chosen)
    try:
        with forked_rng(model), eval_mode(model), mha_fastpath_disabled(), torch.no_grad():
            if orthogonal:
                _pre_init(chosen, skipped)
            result = _passes(model, inputs, scaled, targets, tol / target_std, max_iters, orthogonal)
    except BaseException:
        restore(saved)
        raise
    stds = result.stds
    return LSUVResult(result.layers, stds, result.passes, result.converged, target_std, tol,
                      {**skipped, **result.skipped}, tuple(targets[n] for n in result.layers), tuple(notes))


def output_stds(model: nn.Module, inputs: Inputs) -> dict[str, float]:
    """The output std of every weight layer on ``inputs`` (first call of each), in eval mode; read-only.

    Population std over every element of the output, from float64 moments. A cheap check for LSUV's
    target that needs no :func:`signalprop.measure`; the model, its modes and its RNG are left as found.

    Args:
        model: The model.
        inputs: One batch (tensor, tuple or dict).

    Returns:
        Layer name -> output std (NaN for an empty output), in module order; layers not called are left out.

    Examples:
        >>> import torch
        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(0.5), net[0].bias.zero_()
        >>> output_stds(net, torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))  # outputs +-2
        {'0': 2.0}
    """
    layers = weight_layers(model)
    stds: dict[str, float] = {}
    handles = []

    def make(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, tuple) and (isinstance(m, nn.MultiheadAttention | nn.RNNBase)):
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


def _choose(model: nn.Module, layers: Sequence[str] | None) -> list[tuple[str, nn.Module]]:
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
            "other layers that hold a weight matrix (signalprop.layers.is_weight_layer)"
        )
    return chosen


def _targets(
    model: nn.Module, inputs: Inputs, chosen: list[tuple[str, nn.Module]], target_std: float
) -> tuple[dict[str, float], list[str]]:
    """Each layer's target: ``target_std``, or the std at which its chain keeps the gradient (one capture)."""
    from ._critical import lsuv_target
    from ._structure import chain_depths, label, structure, units

    targets = {n: target_std for n, _ in chosen}
    try:
        st = structure(model, inputs, None, methods=("hooks",), what="lsuv_")
    except SignalpropError as exc:
        return targets, [f"the activations after each layer could not be read ({exc}); every layer's target "
                         f"is {target_std:g}"]
    acts = {n: a for n, _, a in st.layers}
    mods = dict(chosen)
    names = [(n, label(acts.get(n))) for n, m in chosen if n in acts and not isinstance(m, nn.RNNBase)]
    depths = chain_depths(names, st.branch_of())
    notes: list[str] = []
    carried = target_std  # a layer with no activation after it keeps the scale of the chain before it
    for n, lab in names:
        if lab == "none":
            targets[n] = carried
            continue
        t = lsuv_target(acts[n], depths[n], units(mods[n]), target_std)
        targets[n] = carried = t.std
        if t.note and t.note not in notes:
            notes.append(t.note)
    return targets, notes


def _pre_init(layers: list[tuple[str, nn.Module]], skipped: dict[str, str]) -> None:
    """The paper's orthonormal pre-init with zero biases; recurrent layers get their standard init."""
    from ..init import orthogonal_
    from ..init.fans import has_fan_rule
    from ..init.recurrent import recurrent_

    for name, m in layers:
        if name in skipped and not isinstance(m, nn.RNNBase):
            continue
        try:
            if isinstance(m, nn.RNNBase):
                recurrent_(m)
                continue
            if not has_fan_rule(m):
                continue  # a custom layer: pre-initialized in the pass, once its output is known to be W x + b
            orthogonal_(m)
        except SignalpropError as exc:
            raise SignalpropError(f"lsuv_: orthogonal pre-init of layer {name!r} failed: {exc}") from exc
        bias = getattr(m, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.zero_()


def _passes(
    model: nn.Module,
    inputs: Inputs,
    layers: list[tuple[str, nn.Module]],
    targets: dict[str, float],
    rel_tol: float,
    max_iters: int,
    orthogonal: bool,
) -> LSUVResult:
    p: _Pass | None = None
    passes = 0
    affine: dict[str, str | None] = {}
    for i in range(max_iters + 1):
        p = _Pass(targets, rel_tol, rescale_all=i == 0, may_rescale=i < max_iters, affine=affine,
                  orthogonal=orthogonal)
        handles = [m.register_forward_hook(p.hook(name), prepend=True, with_kwargs=True) for name, m in layers]
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
    converged = all(abs(s - targets[n]) <= rel_tol * targets[n] for n, s in zip(names, stds))
    return LSUVResult(layers=names, stds=stds, passes=passes, converged=converged, target_std=1.0,
                      tol=rel_tol, skipped=skipped)
