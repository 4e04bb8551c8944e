"""The standard initialization of recurrent layers (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``), gate by gate.

Each layer and direction stacks its gates' matrices in rows (LSTM: input, forget, cell, output; GRU:
reset, update, new; :mod:`signalprop.init.fans`), and every gate is initialized as a matrix of its own:

* input weights ``weight_ih_l{k}``: LeCun normal per gate, std ``1/sqrt(fan_in)`` (fan_in = that layer's
  input size), so each gate's input contribution to its pre-activation has the input's second moment, where
  sigmoid and tanh gates are near their linear range instead of saturated (He's gain sqrt(2) for
  ``nonlinearity="relu"`` RNNs);
* recurrent weights ``weight_hh_l{k}``: orthogonal per gate (Saxe et al. 2014), every singular value 1, so
  the recurrence neither grows nor shrinks the hidden state's norm through its linear part, at any sequence
  length; an LSTM's projection ``weight_hr_l{k}`` is orthogonal too;
* biases 0, except an LSTM's forget gate: 1 (Jozefowicz et al. 2015, "An empirical exploration of recurrent
  network architectures", Sec. 2.2; Gers et al. 2000), so the cell starts by keeping its state (forget gate
  sigmoid(1) = 0.73) instead of halving it at every step. PyTorch adds ``bias_ih`` and ``bias_hh``: the
  forget slice ``[H:2H]`` of ``bias_ih`` gets the value, that of ``bias_hh`` 0, so they sum to it.
"""

from __future__ import annotations

import math
from typing import TypeVar

import torch
from torch import nn

from .._errors import SignalpropError
from . import schemes as S
from .apply import InitStep, _check_layer, _Spec, _step, _write
from .fans import weight_blocks

M = TypeVar("M", bound=nn.Module)

__all__ = ["recurrent_", "recurrent_plan"]


def recurrent_plan(layer: nn.Module, name: str = "") -> list[InitStep]:
    """The per-gate steps :func:`recurrent_` writes into one RNN/LSTM/GRU, as data (the layer is untouched).

    Args:
        layer: An ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.
        name: The layer's qualified name, for the steps.

    Returns:
        One :class:`~signalprop.init.InitStep` per gate and weight matrix.

    Raises:
        SignalpropError: ``layer`` is not a recurrent layer.

    Examples:
        A GRU(4, 8): input gates ``N(0, 1/4)`` (LeCun et al. 1998), recurrent gates orthogonal, whose root
        mean square entry is ``1/sqrt(8)``:

        >>> [(s.param, s.scheme, round(s.std, 4)) for s in recurrent_plan(nn.GRU(4, 8))][2:4]
        [('weight_ih_l0', 'lecun', 0.5), ('weight_hh_l0', 'orthogonal', 0.3536)]
    """
    if not isinstance(layer, nn.RNNBase):
        raise SignalpropError(f"recurrent_plan needs an nn.RNN, nn.LSTM or nn.GRU, got {type(layer).__name__}")
    gain = math.sqrt(2.0) if getattr(layer, "nonlinearity", "tanh") == "relu" else 1.0
    steps: list[InitStep] = []
    for b in weight_blocks(layer):
        if b.param.startswith("weight_ih_"):
            spec = _Spec("lecun" if gain == 1.0 else "he", "normal", lambda fi, fo: gain / math.sqrt(fi))
        else:
            spec = _Spec("orthogonal", "orthogonal", gain=1.0)
        steps.append(_step(name, layer, b, spec))
    return steps


def recurrent_(
    m: M,
    *,
    forget_bias: float = 1.0,
    generator: torch.Generator | None = None,
) -> M:
    """Initialize every RNN/LSTM/GRU in ``m``: LeCun input weights, orthogonal recurrent weights, per gate.

    Input weights ``N(0, 1 / fan_in)`` (LeCun et al. 1998; ``2 / fan_in`` for a relu RNN, He et al.
    2015), recurrent weights orthogonal (Saxe et al. 2014), zero biases except an LSTM's forget gate,
    ``forget_bias`` (Jozefowicz et al. 2015); the module docstring says why each.

    Args:
        m: A recurrent layer or a model holding some; other layers are left as they are.
        forget_bias: The LSTM forget gate's bias (``bias_ih`` gets it, ``bias_hh`` 0, so they sum to it).
        generator: The random generator to draw from.

    Returns:
        ``m``, initialized in place.

    Raises:
        SignalpropError: ``m`` holds no ``nn.RNN``, ``nn.LSTM`` or ``nn.GRU``.

    Examples:
        >>> lstm = recurrent_(nn.LSTM(8, 16), generator=torch.Generator().manual_seed(0))
        >>> w = lstm.weight_hh_l0.detach()[16:32]  # the forget gate's recurrent matrix
        >>> bool(torch.allclose(w @ w.T, torch.eye(16), atol=1e-5))
        True
        >>> float(lstm.bias_ih_l0.detach()[16:32].mean() + lstm.bias_hh_l0.detach()[16:32].mean())
        1.0
    """
    _check_layer(m, "recurrent_")
    if not (isinstance(forget_bias, int | float) and math.isfinite(forget_bias)):
        raise SignalpropError(f"recurrent_: forget_bias must be a finite number, got {forget_bias!r}")
    layers: list[tuple[str, nn.Module]] = [(n, layer) for n, layer in m.named_modules()
                                           if isinstance(layer, nn.RNNBase)]
    if not layers:
        raise SignalpropError(
            f"recurrent_: {type(m).__name__} holds no nn.RNN, nn.LSTM or nn.GRU; use he_, glorot_ or lecun_ "
            "for other layers"
        )
    steps: list[tuple[InitStep, nn.Module]] = [(st, layer) for name, layer in layers
                                               for st in recurrent_plan(layer, name)]
    _write(steps, [layer for _, layer in layers], generator, zero_bias=True)
    for _, layer in layers:
        assert isinstance(layer, nn.RNNBase)
        if layer.mode != "LSTM" or not layer.bias or forget_bias == 0:
            continue
        h = int(layer.hidden_size)
        for pname, b in layer._parameters.items():
            if b is not None and pname.startswith("bias_ih_"):
                with torch.no_grad(), S.writable(b, generator) as full:
                    if not full.is_meta:  # (the scratch of a bfloat16 or sharded bias is copied whole)
                        full.zero_()
                        full[h : 2 * h] = float(forget_bias)
    return m
