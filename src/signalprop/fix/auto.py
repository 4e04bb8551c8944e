"""``auto_init_``: initialize every weight layer for the activation that follows it, whatever the depth.

Plan, then apply: :func:`signalprop.fix.plan` reads the model's structure (the captured graph when
example inputs or an input shape are given, module order otherwise) and computes one
:class:`~signalprop.fix.plan.LayerPlan` per layer; :func:`~signalprop.fix.plan.apply_plan` writes it; and
when some layers are GELU-like or custom and example inputs are given, an LSUV pass
(:func:`signalprop.fix.lsuv_`, ``orthogonal=False``) pins those layers' output std at the plan's targets.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from ._common import Inputs, refuse_meta
from .lsuv import run, warn_result
from .plan import RESIDUAL_MODES, Plan, apply_plan, plan
from .residual_schemes import SCHEMES, check, residual_

__all__ = ["auto_init_"]


def auto_init_(
    model: nn.Module,
    *,
    example_inputs: Inputs | None = None,
    residual: str | None = "fixup",
    input_shape: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialize ``model`` in place, one scheme per weight layer from the activation that follows it.

    ReLU family: He (gain sqrt(2/(1+a^2)), He et al. 2015); tanh, sigmoid and other saturating activations:
    orthogonal weights and biases at the mean-field variances chosen for the chain's depth, width and
    biases (on the critical line chi1 = 1 with biases; sigma_b^2 = 0 and sigma_w^2 just above 1 without),
    the first layer set so the pre-activation variance starts at the fixed point q* (Poole et al. 2016;
    Schoenholz et al. 2017; Pennington et al. 2017); SELU: LeCun normal; GELU, SiLU, ...: their
    second-moment gain and, with ``example_inputs``, an LSUV pass on those layers (Mishkin & Matas 2016) to
    the output std that keeps their chain's gradient in range; RNN/LSTM/GRU: :func:`signalprop.init.recurrent_`
    (orthogonal recurrent weights, forget-gate bias 1); layers without an activation: Var[w] = 1/sqrt(fan_in
    fan_out), which splits a fan mismatch evenly between forward and backward. A weight shared by several
    layers is planned once; ``weight_norm`` layers are drawn through their parametrization. Residual
    branches (found from the graph's additions): ``residual="fixup"`` scales each branch by L^(-1/2) (Zhang
    et al. 2019), ``"zero"`` starts each branch at zero (Goyal et al. 2017), ``"depth_mup"``, ``"rezero"``,
    ``"skipinit"`` and ``"deepnorm"`` initialize every layer first and then apply
    :func:`signalprop.fix.residual_` with that scheme (a gate on each branch), None leaves them. See
    :mod:`signalprop.fix.plan`, :mod:`signalprop.fix.residual` and :mod:`signalprop.fix.residual_schemes`
    for every formula.

    Args:
        model: The model to initialize in place.
        example_inputs: One batch (tensor | tuple | dict): the structure is captured from it, the first
            mean-field layer uses its measured second moment, and the LSUV pass runs on it.
        residual: ``"fixup"`` (default), ``"zero"``, ``"depth_mup"``, ``"rezero"``, ``"skipinit"``,
            ``"deepnorm"`` or None. The last four need ``example_inputs`` or ``input_shape`` (branches come
            from the graph).
        input_shape: One sample's shape (no batch dimension), to capture the structure when there are no
            inputs. Without either, module order is used (exact for ``nn.Sequential``; a warning otherwise).
        generator: A ``torch.Generator`` for the random draws (the global RNG otherwise).

    Returns:
        The model. Print ``signalprop.fix.plan(model, ...)`` to see what it will do, and why.

    Raises:
        SignalpropError: ``model`` is not a module, or is on the meta device (there is nothing to write
            into: ``sp.init.materialize_`` it first); an unknown ``residual``, or one of the gated schemes
            without ``example_inputs`` / ``input_shape``.

    Examples:
        A 40-layer tanh MLP gets orthogonal weights of mean square ``sigma_w^2 / fan_in`` with
        ``sigma_w^2 = 1.761``, the critical point of tanh at ``sigma_b^2 = 0.05`` (Poole et al. 2016):

        >>> import torch, signalprop as sp
        >>> net = sp.fix.auto_init_(sp.models.mlp(40, 64, "tanh"), generator=torch.Generator().manual_seed(0))
        >>> round(float(net[2].weight.detach().pow(2).mean() * 64), 3)
        1.761
    """
    if not isinstance(model, nn.Module):
        raise SignalpropError(f"auto_init_ needs an nn.Module, got {type(model).__name__}")
    refuse_meta(model, "auto_init_")
    graph = None
    gated = residual not in RESIDUAL_MODES
    if gated:
        if residual not in SCHEMES:
            names = ", ".join(repr(k) for k in dict.fromkeys([*filter(None, RESIDUAL_MODES), *SCHEMES]))
            raise SignalpropError(f"auto_init_: unknown residual {residual!r}; choose one of {names} or None")
        if example_inputs is None and input_shape is None:
            raise SignalpropError(
                f"auto_init_(residual={residual!r}) finds the residual branches from the captured graph: pass "
                "example_inputs=... (one batch) or input_shape=... (one sample's shape)"
            )
        graph = _capture(model, example_inputs, input_shape)
        check(model, str(residual), graph)  # refused before any layer is drawn
    p: Plan = plan(model, example_inputs=example_inputs, input_shape=input_shape,
                   residual=None if gated else residual, graph=graph)
    apply_plan(model, p, generator=generator)
    if p.needs_lsuv and example_inputs is not None:
        modules = dict(model.named_modules())
        steps = [s for s in p if s.lsuv]
        result = run(model, example_inputs, [(s.layer, modules[s.layer]) for s in steps],
                     {s.layer: s.target_std for s in steps}, orthogonal=False)
        warn_result(result, "auto_init_")
    if gated:
        residual_(model, str(residual), graph=graph)
    return model


def _capture(model: nn.Module, example_inputs: Inputs | None, input_shape: Sequence[int] | None) -> Any:
    """The graph the plan and the residual scheme share (one capture); a fallback is said as plan says it."""
    from ..graph import CaptureWarning, capture

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CaptureWarning)
        graph = capture(model, example_inputs, input_shape=input_shape)
    for w in caught:
        if issubclass(w.category, CaptureWarning):
            warnings.warn(f"auto_init_: {w.message}", UserWarning, stacklevel=3)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return graph
