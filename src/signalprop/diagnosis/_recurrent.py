"""Gate saturation inside RNN, LSTM and GRU modules, which a module hook cannot see from outside.

A recurrent module's output is ``h = o * tanh(c)`` (LSTM) or a convex mix of states (GRU): bounded whatever
its weights, so its output std never explodes, while its gates sit at 0 or 1 and pass no gradient. The probe
replays each layer from the module's input: the gate pre-activations ``x W_ih^T + b_ih + h_{t-1} W_hh^T +
b_hh`` for every step, and counts those whose sigmoid lies within 1% of 0 or 1 (``|z| > ln 99 = 4.6``) or
whose tanh lies within 1% of +-1 (``|z| > atanh 0.99 = 2.65``), the bounds of the saturation rule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

__all__ = ["gate_saturation"]

_SIGMOID_Z = math.log(99.0)
_TANH_Z = math.atanh(0.99)


def _layer_outputs(m: nn.RNNBase, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer ``layer``'s output sequence for input sequence ``x`` (batch first), from a one-layer replica."""
    kw: dict[str, Any] = {"nonlinearity": m.nonlinearity} if isinstance(m, nn.RNN) else {}
    cls: Any = type(m)
    one = cls(x.shape[-1], m.hidden_size, 1, bias=m.bias, batch_first=True, device="meta", **kw)
    params = {f"{k}_l0": getattr(m, f"{k}_l{layer}") for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
              if hasattr(m, f"{k}_l{layer}")}
    out, _ = functional_call(one, params, (x,))
    return out


def gate_saturation(m: nn.Module, args: tuple[Any, ...]) -> float | None:
    """Fraction of ``m``'s gate pre-activations that saturate on this input, over all layers and steps.

    None for what it does not replay: a module given an initial state, a bidirectional or projected LSTM,
    an RNN with ReLU, an unbatched or packed input.
    """
    if not isinstance(m, nn.LSTM | nn.GRU | nn.RNN) or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    if m.bidirectional or getattr(m, "proj_size", None) or (isinstance(m, nn.RNN) and m.nonlinearity != "tanh"):
        return None
    x = args[0].detach().float()
    if x.dim() != 3 or x.numel() == 0:
        return None
    if not m.batch_first:
        x = x.transpose(0, 1)
    saturated = total = 0
    with torch.no_grad():
        for layer in range(m.num_layers):
            h = _layer_outputs(m, x, layer).float()
            prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
            w_ih, w_hh = getattr(m, f"weight_ih_l{layer}").float(), getattr(m, f"weight_hh_l{layer}").float()
            gi = x @ w_ih.T
            gh = prev @ w_hh.T
            if m.bias:
                gi = gi + getattr(m, f"bias_ih_l{layer}").float()
                gh = gh + getattr(m, f"bias_hh_l{layer}").float()
            if isinstance(m, nn.LSTM):
                z = gi + gh
                i, f, g, o = z.chunk(4, dim=-1)
                sig = torch.cat([i, f, o], dim=-1)
                saturated += int((sig.abs() > _SIGMOID_Z).sum()) + int((g.abs() > _TANH_Z).sum())
                total += z.numel()
            elif isinstance(m, nn.GRU):
                ir, iz, i_n = gi.chunk(3, dim=-1)
                hr, hz, h_n = gh.chunk(3, dim=-1)
                r = torch.sigmoid(ir + hr)
                sig = torch.cat([ir + hr, iz + hz], dim=-1)
                n = i_n + r * h_n
                saturated += int((sig.abs() > _SIGMOID_Z).sum()) + int((n.abs() > _TANH_Z).sum())
                total += sig.numel() + n.numel()
            else:
                z = gi + gh
                saturated += int((z.abs() > _TANH_Z).sum())
                total += z.numel()
            x = h
    return saturated / total if total else None
