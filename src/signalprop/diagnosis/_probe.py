"""What diagnose needs beyond a Trace: per-unit and per-element facts from one extra forward pass, and
per-layer facts read off the model (fans, the activation after each weight layer).

The pass runs under ``torch.no_grad`` with forward hooks on the few modules that need it (ReLU-family
outputs: units that are zero for the whole batch; tanh/sigmoid outputs: the fraction near the bounds;
layers whose measured rms is tiny: the fraction of subnormal values), and leaves the model as it found
it (:func:`signalprop._state.preserved`, the snapshot measure uses: inside ``sp.diagnose`` the same one):
what the forward writes is put back, dropout draws the masks of the measured pass from a generator of its
own, the hooks are removed, no ``.grad`` is created.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from .. import theory
from .._errors import SignalpropError
from .._hooks import HookSet, is_real
from .._inputs import call_model, first_tensor
from .._state import preserved
from ..layers import is_norm, is_weight_layer
from ..trace import LayerStats, Trace
from ._attention import watch_attention
from ._recurrent import gate_saturation

_RELU = {"relu", "relu6"}
_SAT = {"tanh", "sigmoid", "hardtanh", "softsign"}
_TINY_RMS = 1e-25  # below this a float32 layer may hold subnormal values (float32 tiny: 1.2e-38)


def input_stats(inputs: Any) -> dict[str, float]:
    """mean, std, absmax and nonfinite_frac of the first floating input tensor, in float64."""
    t = first_tensor(inputs)
    if t is None or not t.is_floating_point() or t.numel() == 0:
        return {}
    x = t.detach().to(torch.float64).reshape(-1)
    finite = torch.isfinite(x)
    frac = 1.0 - float(finite.double().mean())
    xf = x[finite]
    if xf.numel() == 0:
        return {"nonfinite_frac": frac}
    return {
        "mean": float(xf.mean()),
        "std": float(xf.std(unbiased=False)),
        "absmax": float(xf.abs().max()),
        "nonfinite_frac": frac,
    }


def _unit_dims(trace: Trace) -> dict[str, int]:
    """Layer name -> the dimension that indexes units: measure's ``channel_dim`` when recorded, else 1
    after a convolution and the last dimension otherwise."""
    out: dict[str, int] = {}
    conv = False
    for layer in trace:
        if layer.weight_layer:
            conv = layer.kind.startswith(("Conv", "LazyConv")) and layer.kind != "Conv1D"
        dim = layer.meta.get("channel_dim")
        out[layer.name] = int(dim) if isinstance(dim, int) else (1 if conv else -1)
    return out


def probe(model: nn.Module, inputs: Any, trace: Trace,
          attention: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, Any]]:
    """One hooked forward pass: per-layer ``dead_frac``, ``sat_frac``, ``subnormal_frac`` (trace names);
    ``attention``, when given, is filled with each attention module's softmax rows
    (:func:`signalprop.diagnosis._attention.watch_attention`).

    A unit is dead when it outputs 0 for every element of the batch (and every spatial position): for a
    conv the unit is a channel (dim 1), otherwise the last dimension.
    """
    keys = {layer.name.split("#")[0]: theory._MODULE_NAMES.get(layer.kind) for layer in trace}
    tiny = {layer.name for layer in trace if math.isfinite(layer.fwd.rms) and layer.fwd.rms < _TINY_RMS}
    unit_dims = _unit_dims(trace)
    named = dict(model.named_modules())
    recurrent = {layer.name.split("#")[0] for layer in trace if isinstance(named.get(layer.name.split("#")[0]), nn.RNNBase)}
    wanted = {n for n, k in keys.items() if k in _RELU or k in _SAT} | {n.split("#")[0] for n in tiny} | recurrent
    found: dict[str, dict[str, Any]] = {}
    calls: dict[str, int] = {}
    def hook_for(name: str, key: str | None) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            k = calls.get(name, 0)
            calls[name] = k + 1
            full = name if k == 0 else f"{name}#{k}"
            if name in recurrent:
                sat = gate_saturation(module, args)
                if sat is not None:
                    found.setdefault(full, {}).update(sat_frac=sat, gates=True)
                return
            t = output if isinstance(output, torch.Tensor) else first_tensor(output)
            if t is None or not t.is_floating_point() or t.numel() == 0:
                return
            found[full] = _facts(t.detach(), key, unit_dims.get(full, -1), full in tiny)

        return hook

    seed = trace.meta.get("seed", 0)  # measure's: the same dropout masks as the measured pass
    with preserved(model) as state, state.run(seed=seed if isinstance(seed, int) else 0), torch.no_grad():
        with HookSet() as hooks:
            for name in wanted:
                if name in named:
                    hooks.add(named[name].register_forward_hook(hook_for(name, keys.get(name))))
            if attention is None:
                call_model(model, inputs)
            else:
                with watch_attention(model) as seen:
                    call_model(model, inputs)
                attention.update(seen)
    return found


def _facts(t: torch.Tensor, key: str | None, unit_dim: int, tiny: bool) -> dict[str, Any]:
    x = t.float()
    out: dict[str, Any] = {}
    if key in _RELU and x.dim() >= 2 and -x.dim() <= unit_dim < x.dim():
        units = x.movedim(unit_dim, -1)
        flat = units.reshape(-1, units.shape[-1])
        out["dead_frac"] = float((flat.amax(0) <= 0).float().mean())
        out["units"] = int(flat.shape[1])
        out["unit_elements"] = int(flat.shape[0])
    if key in ("tanh", "hardtanh", "softsign"):
        out["sat_frac"] = float((x.abs() > 0.99).float().mean())
    elif key == "sigmoid":
        out["sat_frac"] = float(((x < 0.01) | (x > 0.99)).float().mean())
    if tiny and t.dtype in (torch.float32, torch.float64):
        a = t.abs()
        out["subnormal_frac"] = float(((a > 0) & (a < torch.finfo(t.dtype).tiny)).float().mean())
    return out


def annotate(
    trace: Trace,
    model: nn.Module | None,
    facts: dict[str, dict[str, Any]],
    activations: dict[str, str] | None = None,
) -> Trace:
    """The trace with ``meta`` filled in from the model: ``mixing`` (a weight layer in ``sp.init``'s sense),
    ``fan_in``/``fan_out`` for those, ``act_key`` for activation modules, ``gain_rms`` and ``eps`` for
    normalization layers with a gain, ``act`` (the activation after each weight layer, from the captured
    graph's ``activations``), and the probe's facts."""
    named = dict(model.named_modules()) if model is not None else {}
    tables = {id(m.weight) for m in named.values() if isinstance(m, nn.Embedding | nn.EmbeddingBag)}
    layers: list[LayerStats] = []
    for layer in trace:
        meta = dict(layer.meta)
        m = named.get(layer.name.split("#")[0])
        if m is not None:
            key = theory.activation_key(m)
            if key is not None:
                meta.setdefault("act_key", key)
            meta["mixing"] = _mixing(m)
            if meta["mixing"] and "fan_in" not in meta:
                meta.update(_fans(m))
            if meta["mixing"] and "weight_gain" not in meta:
                gain = _weight_gain(m, meta.get("fan_in"), tables)
                if gain is not None:
                    meta["weight_gain"] = gain
            if is_norm(m):
                meta.update(_norm_facts(m))
            elif meta["mixing"]:
                zeros = _zero_tensors(m)
                if zeros:
                    meta["zero_tensors"] = zeros
        if activations is not None and layer.name in activations:
            meta["act"] = activations[layer.name]
        meta.update(facts.get(layer.name, {}))
        layers.append(replace(layer, meta=meta))
    return trace.with_layers(layers)


def _mixing(m: nn.Module) -> bool:
    """True for layers that mix their inputs through a weight, as ``sp.init`` defines them (not lookup
    tables such as nn.Embedding, whose output scale is a modelling choice)."""
    return is_weight_layer(m) and not isinstance(m, nn.Embedding | nn.EmbeddingBag)


def _weight_gain(m: nn.Module, fan_in: Any, tables: set[int]) -> float | None:
    """``sqrt(fan_in E[w^2])`` of the module's ``weight`` (the effective one under a parametrization): the
    factor by which the layer multiplies the rms it receives. None without a fan, a real floating weight of
    two or more dimensions, or for a weight shared with an embedding table (a tied output head, whose scale
    is the table's)."""
    if not isinstance(fan_in, int | float) or not fan_in > 0:
        return None
    try:
        w = getattr(m, "weight", None)
    except Exception:  # a parametrization that cannot be evaluated: no gain
        return None
    if not isinstance(w, torch.Tensor) or w.dim() < 2 or not w.is_floating_point() or not is_real(w):
        return None
    if id(w) in tables or w.numel() == 0:
        return None
    with torch.no_grad():
        return float(math.sqrt(fan_in * float(w.detach().double().pow(2).mean())))


def _norm_facts(m: nn.Module) -> dict[str, float]:
    """``gain_rms`` (root mean square of the gain, the scale the norm gives its output) and ``eps``."""
    out: dict[str, float] = {}
    w = getattr(m, "weight", None)
    if isinstance(w, torch.Tensor) and w.numel() > 0 and w.is_floating_point() and is_real(w):
        out["gain_rms"] = float(w.detach().double().pow(2).mean().sqrt())
    eps = getattr(m, "eps", getattr(m, "variance_epsilon", None))
    if isinstance(eps, int | float):
        out["eps"] = float(eps)
    if _stale(m):
        out["stale_stats"] = 1.0
    return out


def _stale(m: nn.Module) -> bool:
    """A BatchNorm in eval mode whose running statistics were never updated (mean 0, var 1): it does not
    normalize."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats:
        n = m.num_batches_tracked
        return n is not None and int(n) == 0
    return False


def _zero_tensors(m: nn.Module) -> list[str]:
    """Names of the module's own parameters of two or more dimensions that are exactly zero everywhere."""
    out = []
    for k, p in m._parameters.items():
        if p is not None and p.dim() >= 2 and p.numel() > 0 and is_real(p) and not bool(p.detach().any()):
            out.append(k)
    return out


def untrained_norms_in_eval(model: nn.Module) -> list[str]:
    """Names of BatchNorm layers in eval mode whose running statistics were never updated: they do not
    normalize (running mean 0, var 1), so an eval-mode measurement is not what training sees."""
    return [name for name, m in model.named_modules() if _stale(m)]


def _fans(m: nn.Module) -> dict[str, float]:
    from ..init.fans import fans

    try:
        fi, fo = fans(m)
    except SignalpropError:  # a layer type without a fan rule: the fix text then names the formula only
        return {}
    return {"fan_in": fi, "fan_out": fo}
