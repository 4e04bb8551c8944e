"""Sharded (DTensor / FSDP2) parameters and meta-device models.

**Sharded parameters.** A DTensor's ``shape`` is the global shape, so the fans every rule reads are the
unsharded layer's. Drawing on each rank's shard with its own generator would give shards that are not the
slices of any one draw (and identical shards on ranks seeded alike). Instead every rank draws the *global*
tensor with a generator in the same state on all ranks and keeps its own slice
(``distribute_tensor(full, mesh, placements, src_data_rank=None)``, no communication). The assembled tensor
is then bit-for-bit the tensor the unsharded initializer draws from the same generator state, whatever
the mesh. The price is one full parameter in memory at a time (not the whole model). Without a
``generator``, rank 0 draws a seed from the default generator and broadcasts it (one collective per call).

**Meta-device models.** :func:`materialize_` allocates every meta tensor of a model on a real device and
initializes it in one step: weight layers with the chosen scheme (biases zero), every other module that
owns meta tensors with its own ``reset_parameters()`` (normalization layers: weight 1, bias 0, running
statistics reset). Tied parameters stay tied. Anything nobody can initialize is reported before a single
tensor is allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from ._dtensor import is_dtensor, shared_seed
from .apply import _block_params, _make_spec, _plan_layers, _write, bias_names
from .fans import has_fan_rule
from .initializers import _SCHEME_OF, SCHEMES

# ---- meta-device materialization ------------------------------------------------------------------


def _is_meta(t: torch.Tensor | None) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


def _target_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "meta":
            raise SignalpropError("materialize_ needs a real device (cpu, cuda, ...), got 'meta'")
        return dev
    for p in model.parameters():
        if is_dtensor(p):
            kind = p.device_mesh.device_type  # type: ignore[attr-defined]
            if kind == "cpu":
                return torch.device("cpu")
            mod = getattr(torch, kind, None)
            if mod is not None and hasattr(mod, "current_device"):
                return torch.device(kind, int(mod.current_device()))
            return torch.device(kind)
    return torch.device("cpu")


def _plan_materialize(model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
    """(weight layers with meta tensors, other modules to reset); raises for what nothing can initialize."""

    weight_layers: list[tuple[str, nn.Module]] = []
    resets: list[tuple[str, nn.Module]] = []
    orphans: list[str] = []
    for name, m in model.named_modules():
        meta = [k for k, v in (*m._parameters.items(), *m._buffers.items()) if _is_meta(v)]
        if not meta:
            continue
        covered: set[str] = set()
        if has_fan_rule(m):
            weight_layers.append((name, m))
            covered = set(_block_params(m)) | set(bias_names(m))
        rest = [k for k in meta if k not in covered]
        if rest:
            if callable(getattr(m, "reset_parameters", None)):
                if (name, m) not in weight_layers:
                    resets.append((name, m))
            else:
                orphans += [f"{name + '.' if name else ''}{k} ({type(m).__name__})" for k in rest]
    if orphans:
        raise SignalpropError(
            "materialize_ cannot initialize these meta tensors: " + ", ".join(orphans) + ". They are neither "
            "weights or biases of a weight layer nor owned by a module with reset_parameters(). Give those "
            "modules a reset_parameters() that fills them, or build them on a real device."
        )
    return weight_layers, resets


def _empty(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    # torch.empty_like on a meta tensor runs a Python reference that imports half of torch (seconds);
    # a DTensor needs it (it keeps the mesh and placements), a plain tensor does not.
    if is_dtensor(t):
        return torch.empty_like(t, device=device)
    return torch.empty(tuple(t.shape), dtype=t.dtype, device=device)


def _allocate(model: nn.Module, device: torch.device) -> None:
    """Replace every meta parameter and buffer by an uninitialized one on ``device``; tied ones stay tied."""
    memo: dict[int, torch.Tensor] = {}
    for m in model.modules():
        for key, p in list(m._parameters.items()):
            if _is_meta(p):
                assert p is not None
                if id(p) not in memo:
                    memo[id(p)] = nn.Parameter(_empty(p, device), requires_grad=p.requires_grad)
                m._parameters[key] = memo[id(p)]  # type: ignore[assignment]
        for key, b in list(m._buffers.items()):
            if _is_meta(b):
                assert b is not None
                if id(b) not in memo:
                    memo[id(b)] = _empty(b, device)
                m._buffers[key] = memo[id(b)]


def materialize_(
    model: nn.Module,
    scheme: str | Callable[..., Any] = "he",
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    **scheme_kwargs: Any,
) -> nn.Module:
    """Allocate a meta-device model's tensors on ``device`` and initialize them with ``scheme``, in one step.

    ``scheme`` is a name (``"he"``, ``"glorot"``, ``"lecun"``, ``"orthogonal"``, ``"delta_orthogonal"``,
    ``"variance_scaling"``) or a module-level initializer such as :func:`signalprop.init.he_`;
    ``scheme_kwargs`` go to it (``nonlinearity="tanh"``, ``zero_bias=False`` ...). Weight layers get the
    scheme; every other module with meta tensors gets its own ``reset_parameters()``. Only tensors that
    were on the meta device are written: a model that is partly materialized keeps its real tensors.
    ``device`` defaults to the device mesh's device for FSDP2 / DTensor models and to ``cpu`` otherwise;
    sharded parameters are initialized as :mod:`signalprop.init.sharded` describes (each rank keeps its
    shard of one global draw), so ``generator`` must be in the same state on every rank, or omitted.

    Args:
        model: A model (or layer) built on the meta device, in whole or in part.
        scheme: A scheme name or a module-level initializer (called per layer as ``scheme(layer, **kw)``).
        device: Where the tensors go; default as above.
        generator: The random generator to draw from; the same state gives the same weights as the
            scheme applied to the same model built eagerly.
        **scheme_kwargs: The scheme's keywords.

    Returns:
        ``model``, its meta tensors allocated and initialized.

    Raises:
        SignalpropError: ``model`` is not a module or ``scheme`` is unknown.

    Examples:
        Weight layers get He's ``sqrt(2 / fan_in)``; LayerNorm its own ``reset_parameters`` (weight 1):

        >>> with torch.device("meta"):
        ...     net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.LayerNorm(64))
        >>> net = materialize_(net, "he", generator=torch.Generator().manual_seed(0))
        >>> net[0].weight.device.type, float(net[2].weight.detach().mean())
        ('cpu', 1.0)
    """

    if not isinstance(model, nn.Module):
        raise SignalpropError(f"materialize_ needs an nn.Module, got {type(model).__name__}")
    if isinstance(scheme, str):
        if scheme not in SCHEMES:
            raise SignalpropError(f"unknown scheme {scheme!r}; use one of: {', '.join(SCHEMES)}")
        init_fn = SCHEMES[scheme]
    elif callable(scheme):
        init_fn = scheme
    else:
        raise SignalpropError(
            f"scheme must be a name ({', '.join(SCHEMES)}) or an initializer function, got {type(scheme).__name__}"
        )
    dev = _target_device(model, device)
    weight_layers, resets = _plan_materialize(model)
    if not weight_layers and not resets:
        return model
    if generator is None and any(is_dtensor(p) for p in model.parameters()):
        generator = torch.Generator().manual_seed(shared_seed())
    # Keep the real tensors of modules that reset_parameters() would overwrite.
    keep = {
        (id(m), k): v.detach().clone()
        for _, m in resets
        for k, v in (*m._parameters.items(), *m._buffers.items())
        if isinstance(v, torch.Tensor) and not v.is_meta
    }
    metas: set[tuple[int, str]] = {
        (id(m), k)
        for _, m in weight_layers
        for k, v in (*m._parameters.items(), *m._buffers.items())
        if _is_meta(v)
    }
    _allocate(model, dev)
    with torch.no_grad():
        for _, m in resets:
            m.reset_parameters()  # type: ignore[operator]
            for (mid, k), v in keep.items():
                if mid == id(m):
                    getattr(m, k).copy_(v)
        _init_layers(weight_layers, init_fn, generator, scheme_kwargs, only=metas)
    return model


def _init_layers(
    layers: list[tuple[str, nn.Module]],
    init_fn: Callable[..., Any],
    generator: torch.Generator | None,
    settings: dict[str, Any],
    only: set[tuple[int, str]],
) -> None:
    """Initialize the listed tensors of these layers (materialize_'s path): nothing else is written.

    A built-in scheme is planned over all layers at once, so the draws come in the same order as
    ``scheme_(model)`` on the same model built eagerly: the same generator state gives the same weights.
    Any other callable is called as ``init_fn(layer, **settings)`` per layer.
    """
    kwargs = dict(settings)
    scheme = _SCHEME_OF.get(init_fn)
    if scheme is None:
        from ._dtensor import accepts as _accepts

        if generator is not None and _accepts(init_fn, "generator"):
            kwargs["generator"] = generator
        for _, layer in layers:
            init_fn(layer, **kwargs)
        return
    zero_bias = bool(kwargs.pop("zero_bias", True))
    spec = _make_spec(scheme, kwargs)
    steps = _plan_layers(layers, spec, None, scheme + "_")
    _write(steps, [layer for _, layer in layers], generator, zero_bias, only=only)
