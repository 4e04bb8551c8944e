"""Save everything a forward/backward pass could change about a model, and put it back exactly.

:func:`signalprop.measure` runs the user's model, possibly several times (a careful pass after non-finite
sums, a histogram pass); each run must see the model as the user left it, and the model must be left that
way afterwards, also when the forward raises. What a forward can change, and how it is put back:

- buffers (BatchNorm's running mean/var and ``num_batches_tracked`` move in train mode): cloned, then
  copied back into the *same* tensor objects (so references the user holds stay valid); buffers that a
  forward reassigned or added are set back / removed;
- parameters (a forward should not change them, but some code does: weight-norm style re-assignments,
  lazy modules): the same objects are put back, and their values are copied back when their version
  counter moved;
- ``.grad`` of every parameter: the same object (or None) is put back (measure itself never writes it);
- ``requires_grad`` of every parameter and ``training`` of every module;
- torch's CPU RNG state and, for CUDA parameters, that device's RNG state (dropout consumes them).

Module and global hooks are the caller's business: measure removes its own by their handles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ModelState:
    """A snapshot of one model (see the module docstring for what is in it)."""

    training: list[tuple[nn.Module, bool]] = field(default_factory=list)
    params: list[tuple[nn.Module, dict[str, nn.Parameter | None]]] = field(default_factory=list)
    param_values: dict[int, tuple[int, torch.Tensor]] = field(default_factory=dict)
    grads: list[tuple[nn.Parameter, torch.Tensor | None, bool]] = field(default_factory=list)
    buffers: list[tuple[nn.Module, dict[str, torch.Tensor | None], dict[str, torch.Tensor]]] = field(
        default_factory=list
    )
    cpu_rng: torch.Tensor | None = None
    cuda_rng: dict[int, torch.Tensor] = field(default_factory=dict)


def save_state(model: nn.Module) -> ModelState:
    """Snapshot ``model``: one clone of every buffer and of every parameter's values (memory: one model copy).

    Parameters are cloned so that a forward that writes them in place can be undone; the clone is cheap
    next to a forward pass (a 50-layer 32-channel CNN has 0.5 M parameters).
    """
    st = ModelState()
    seen_params: set[int] = set()
    for m in model.modules():
        st.training.append((m, m.training))
        st.params.append((m, dict(m._parameters)))
        bufs = dict(m._buffers)
        st.buffers.append((m, bufs, {k: b.detach().clone() for k, b in bufs.items() if b is not None}))
        for p in m._parameters.values():
            if p is None or id(p) in seen_params:
                continue
            seen_params.add(id(p))
            st.param_values[id(p)] = (p._version, p.detach().clone())
            st.grads.append((p, p.grad, p.requires_grad))
    st.cpu_rng = torch.get_rng_state()
    devices = {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    for d in devices:
        st.cuda_rng[d] = torch.cuda.get_rng_state(d)
    return st


def restore_rng(st: ModelState) -> None:
    """Put back the RNG states saved in ``st`` (between passes and at the end)."""
    if st.cpu_rng is not None:
        torch.set_rng_state(st.cpu_rng)
    for d, s in st.cuda_rng.items():
        torch.cuda.set_rng_state(s, d)


def restore_state(st: ModelState) -> None:
    """Put ``model`` back exactly as :func:`save_state` found it."""
    with torch.no_grad():
        for m, bufs, values in st.buffers:
            for k in list(m._buffers):
                if k not in bufs:
                    del m._buffers[k]
            for k, b in bufs.items():
                m._buffers[k] = b
                if b is not None and k in values:
                    b.copy_(values[k])
        for m, params in st.params:
            for k in list(m._parameters):
                if k not in params:
                    del m._parameters[k]
            for k, p in params.items():
                m._parameters[k] = p
        for p, g, req in st.grads:
            version, value = st.param_values[id(p)]
            if p._version != version:
                p.copy_(value)
            p.grad = g
            p.requires_grad_(req)
    for m, training in st.training:
        m.training = training
    restore_rng(st)
