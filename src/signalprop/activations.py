"""Activation functions by name: the registry theory's expectations evaluate, and the names signalprop prints.

A name is case-blind ("ReLU", "leaky-relu"), may carry parameters (``leaky_relu(0.2)``,
``hardtanh(min_val=-2, max_val=2)``), and every name :func:`activation_name` gives is one :func:`resolve`
reads back to the same function. Modules (``nn.LeakyReLU(0.2)``, transformers' ``GELUActivation``) and plain
tensor functions are accepted wherever a name is.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ._errors import SignalpropError

ActLike = str | Callable[[torch.Tensor], torch.Tensor] | nn.Module | None
"""What an ``act`` argument takes: a name, a tensor function, an ``nn.Module`` instance, or None (linear)."""

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "linear": lambda x: x,
    "identity": lambda x: x,
    "relu": torch.relu,
    "leaky_relu": lambda x: torch.nn.functional.leaky_relu(x, 0.01),
    "relu6": torch.nn.functional.relu6,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "silu": torch.nn.functional.silu,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # CLIP's GELU approximation
    "relu_squared": lambda x: torch.relu(x).square(),  # Primer (So et al. 2021)
    "swish": torch.nn.functional.silu,
    "mish": torch.nn.functional.mish,
    "elu": torch.nn.functional.elu,
    "selu": torch.nn.functional.selu,
    "celu": torch.nn.functional.celu,
    "softplus": torch.nn.functional.softplus,
    "softsign": torch.nn.functional.softsign,
    "hardtanh": torch.nn.functional.hardtanh,
    "hardswish": torch.nn.functional.hardswish,
    "erf": torch.erf,
    "sin": torch.sin,
}
"""Activation name -> float64 tensor function. Adding one is one line (dks' ``_ACTIVATION_TABLE`` habit)."""

_F = torch.nn.functional
_PARAMETERS: dict[str, tuple[tuple[str, float], ...]] = {
    "leaky_relu": (("negative_slope", 0.01),),
    "elu": (("alpha", 1.0),),
    "celu": (("alpha", 1.0),),
    "softplus": (("beta", 1.0), ("threshold", 20.0)),
    "hardtanh": (("min_val", -1.0), ("max_val", 1.0)),
}
"""Activations a name can carry parameters for, ``leaky_relu(0.2)`` or ``hardtanh(min_val=-2, max_val=2)``:
name -> (parameter, default) in the order of the ``torch.nn.functional`` call. :func:`activation_name`
writes a module with other than the defaults in this form, and :func:`resolve` reads it back."""

_WITH_PARAMETERS: dict[str, Callable[..., Callable[[torch.Tensor], torch.Tensor]]] = {
    "leaky_relu": lambda a: lambda x: _F.leaky_relu(x, a),
    "elu": lambda a: lambda x: _F.elu(x, a),
    "celu": lambda a: lambda x: _F.celu(x, a),
    "softplus": lambda b, t: lambda x: _F.softplus(x, b, t),
    "hardtanh": lambda lo, hi: lambda x: _F.hardtanh(x, lo, hi),
}

# nn.Module class name -> registry name, for modules whose parameters do not change the function.
_MODULE_NAMES: dict[str, str] = {
    "Identity": "linear",
    "ReLU": "relu",
    "ReLU6": "relu6",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "SiLU": "silu",
    "Mish": "mish",
    "SELU": "selu",
    "Softsign": "softsign",
    "Hardswish": "hardswish",
    "Softplus": "softplus",
    "GELU": "gelu",
    "ELU": "elu",
    "CELU": "celu",
    "LeakyReLU": "leaky_relu",
    "Hardtanh": "hardtanh",
    "PReLU": "leaky_relu",
    # transformers' activation classes
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
    "ReLUSquaredActivation": "relu_squared",
}

# PyTorch's torch.nn.init.calculate_gain convention, for side-by-side documentation.
_TORCH_GAIN: dict[str, float] = {
    "linear": 1.0,
    "identity": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
    "selu": 3.0 / 4.0,
}


def known_activations() -> list[str]:
    """The activation names :func:`resolve` accepts, sorted.

    Returns:
        The registry's names; those in :func:`parse_name`'s parameter table also take parameters,
        ``leaky_relu(0.2)``.

    Examples:
        >>> names = known_activations()
        >>> "relu" in names and "gelu_tanh" in names
        True
    """
    return sorted(_ACTIVATIONS)


def resolve(act: ActLike) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float64 tensor function for ``act``: a name, a tensor callable, or an ``nn.Module`` instance.

    Module parameters are honoured (``LeakyReLU(0.2)``, ``ELU(alpha=0.5)``, ``GELU(approximate="tanh")``);
    the module's forward is called directly, so its hooks are never triggered and it is never changed.

    Args:
        act: A name as :func:`parse_name` reads it (``"relu"``, ``"leaky_relu(0.2)"``), a tensor function
            (returned as it is), an ``nn.Module`` instance, or None for the identity.

    Returns:
        A function from a tensor to a tensor of the same shape.

    Raises:
        SignalpropError: ``act`` is an unknown name, a name with bad parameters, or not callable.

    Examples:
        >>> x = torch.tensor([-2.0, 3.0], dtype=torch.float64)
        >>> resolve("leaky_relu(0.5)")(x).tolist()
        [-1.0, 3.0]
        >>> resolve(nn.Hardtanh(-1.0, 2.0))(x).tolist()
        [-1.0, 2.0]
    """
    if act is None:
        return _ACTIVATIONS["linear"]
    if isinstance(act, str):
        key, params = parse_name(act)
        if params is None:
            return _ACTIVATIONS[key]
        return _WITH_PARAMETERS[key](*params)
    if isinstance(act, nn.Module):
        return _module_fn(act)
    if callable(act):
        return act
    raise SignalpropError(
        f"cannot use {type(act).__name__} as an activation: pass a name ({', '.join(known_activations())}), "
        "a tensor function, or an nn.Module instance such as nn.LeakyReLU(0.2)"
    )


def parse_name(act: str) -> tuple[str, tuple[float, ...] | None]:
    """Split an activation name into its registry key and its parameters.

    The name is case-blind and takes ``-`` for ``_``. Five activations take parameters, numbers by position
    or by keyword, the rest taking their defaults: ``leaky_relu(negative_slope)``, ``elu(alpha)``,
    ``celu(alpha)``, ``softplus(beta, threshold)``, ``hardtanh(min_val, max_val)``, in the order of their
    ``torch.nn.functional`` calls.

    Args:
        act: The name, e.g. ``"Tanh"``, ``"leaky-relu(0.2)"``, ``"hardtanh(max_val=2)"``.

    Returns:
        ``(key, params)``: the registry key and every parameter as a float, defaults filled in, or None
        when the name has no parentheses.

    Raises:
        SignalpropError: Naming what is wrong: an unknown name, parameters on a name that takes none, too
            many or unknown parameters, a value that is not a finite number or that torch rejects.

    Examples:
        >>> parse_name("Tanh")
        ('tanh', None)
        >>> parse_name("leaky-relu(0.2)")
        ('leaky_relu', (0.2,))
        >>> parse_name("hardtanh(max_val=2)")
        ('hardtanh', (-1.0, 2.0))
    """
    text = act.strip()
    head, paren, rest = text.partition("(")
    key = head.strip().lower().replace("-", "_")
    if key not in _ACTIVATIONS:
        raise SignalpropError(
            f"unknown activation {act!r}; known names are: {', '.join(known_activations())}, and with "
            f"parameters {_forms()}. You can also pass a tensor function (torch.tanh, lambda x: ...) or an "
            "nn.Module instance."
        )
    if not paren:
        return key, None
    if key not in _PARAMETERS:
        raise SignalpropError(f"activation {key!r} takes no parameters, got {act!r}; names with parameters: {_forms()}")
    spec = _PARAMETERS[key]
    example = f"{key}({', '.join(_number(d) for _, d in spec)})"
    try:
        call = ast.parse(f"_({rest}", mode="eval").body
        assert isinstance(call, ast.Call)
        given = [ast.literal_eval(a) for a in call.args]
        named = {str(k.arg): ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError, AssertionError):
        raise SignalpropError(f"bad activation {act!r}: write numbers in the parentheses, e.g. {example}") from None
    names = [n for n, _ in spec]
    unknown = sorted(set(named) - set(names)) if None not in named else ["**"]
    if len(given) > len(spec) or unknown or any(n in named for n in names[: len(given)]):
        raise SignalpropError(
            f"bad activation {act!r}: {key} takes {', '.join(names)} (by position or keyword), e.g. {example}"
        )
    values = [*given, *(named.get(n, d) for n, d in spec[len(given):])]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise SignalpropError(f"bad activation {act!r}: the parameters must be finite numbers, e.g. {example}")
    params = tuple(float(v) for v in values)
    try:
        _WITH_PARAMETERS[key](*params)(torch.zeros(1, dtype=torch.float64))
    except (RuntimeError, ValueError) as exc:  # torch's own check, e.g. celu's alpha = 0
        raise SignalpropError(f"bad activation {act!r}: {str(exc).strip().splitlines()[0]}") from None
    if key == "hardtanh" and not params[0] < params[1]:
        raise SignalpropError(f"bad activation {act!r}: hardtanh needs min_val < max_val, e.g. {example}")
    return key, params


def _forms() -> str:
    return ", ".join(f"{k}({', '.join(n for n, _ in spec)})" for k, spec in _PARAMETERS.items())


def _number(x: float) -> str:
    """The shortest text that reads back as exactly ``x``: 0.2, 1e-05, 0.123456789."""
    short = f"{x:g}"
    return short if float(short) == x else repr(float(x))


def _with(key: str, *params: float) -> str:
    """``key`` with its parameters, ``leaky_relu(0.2)``, trailing defaults left out; ``key`` alone at defaults."""
    defaults = [d for _, d in _PARAMETERS[key]]
    values = list(params)
    if key != "leaky_relu":  # leaky_relu keeps its slope in the name, the one number users look for
        while values and values[-1] == defaults[len(values) - 1]:
            values.pop()
    return f"{key}({', '.join(_number(v) for v in values)})" if values else key


def _module_fn(m: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    cls = type(m).__name__
    if cls == "LeakyReLU":
        slope = float(getattr(m, "negative_slope", 0.01))
        return lambda x: torch.nn.functional.leaky_relu(x, slope)
    if cls == "PReLU":
        slope = _prelu_slope(m)
        return lambda x: torch.nn.functional.leaky_relu(x, slope)
    if isinstance(m, nn.ELU):
        alpha = float(m.alpha)
        return lambda x: torch.nn.functional.elu(x, alpha)
    if isinstance(m, nn.GELU):
        approx = m.approximate
        return lambda x: torch.nn.functional.gelu(x, approximate=approx)
    if isinstance(m, nn.Softplus):
        beta, threshold = float(m.beta), float(m.threshold)
        return lambda x: torch.nn.functional.softplus(x, beta, threshold)
    if isinstance(m, nn.Hardtanh):
        lo, hi = float(m.min_val), float(m.max_val)
        return lambda x: torch.nn.functional.hardtanh(x, lo, hi)

    def call(x: torch.Tensor) -> torch.Tensor:
        try:
            return m.forward(x)
        except RuntimeError:  # a module whose parameters are float32 only
            return m.forward(x.float()).double()

    return call


def _prelu_slope(m: nn.Module) -> float:
    """A PReLU's slope: the mean of its learned slopes (one per channel, or one shared)."""
    weight = m.weight
    assert isinstance(weight, torch.Tensor)
    w = weight.detach().to(torch.float64).flatten()
    return float(w.mean()) if w.numel() else 0.25


def activation_name(act: ActLike) -> str:
    """A short human name for ``act`` ("relu", "leaky_relu(0.2)", "tanh", "<lambda>", ...).

    Every name it gives a known activation, parameters included (``nn.ELU(0.5)`` -> ``"elu(0.5)"``,
    ``nn.PReLU()`` -> ``"leaky_relu(0.25)"``), is one :func:`resolve` and ``theory.gain`` accept, for the
    same function. Parameters at their defaults are left out, except leaky ReLU's slope.

    Args:
        act: A name, a tensor function, an ``nn.Module`` instance, or None (``"linear"``).

    Returns:
        The canonical name of a known activation; for anything else the lower-cased string, the function's
        ``__name__`` or the module's class name. It never raises.

    Examples:
        >>> activation_name("Leaky-ReLU( 0.20 )")
        'leaky_relu(0.2)'
        >>> activation_name(nn.ELU(alpha=0.5)), activation_name(nn.PReLU()), activation_name(torch.tanh)
        ('elu(0.5)', 'leaky_relu(0.25)', 'tanh')
    """
    if act is None:
        return "linear"
    if isinstance(act, str):
        try:
            key, params = parse_name(act)
        except SignalpropError:
            return act.lower()
        return key if params is None else f"{key}({', '.join(_number(p) for p in params)})"
    if isinstance(act, nn.Module):
        cls = type(act).__name__
        base = _MODULE_NAMES.get(cls, cls)
        if isinstance(act, nn.LeakyReLU):
            return _with("leaky_relu", float(act.negative_slope))
        if cls == "PReLU":  # its slopes are learned float32 values: the shortest text of the float32 mean
            return _with("leaky_relu", float(str(np.float32(_prelu_slope(act)))))
        if isinstance(act, nn.ELU):
            return _with("elu", float(act.alpha))
        if isinstance(act, nn.CELU):
            return _with("celu", float(act.alpha))
        if isinstance(act, nn.Softplus):
            return _with("softplus", float(act.beta), float(act.threshold))
        if cls == "Hardtanh" and isinstance(act, nn.Hardtanh):  # not its subclass ReLU6 (relu6)
            return _with("hardtanh", float(act.min_val), float(act.max_val))
        if isinstance(act, nn.GELU) and act.approximate == "tanh":
            return "gelu_tanh"
        return base
    for name, fn in _ACTIVATIONS.items():
        if fn is act:
            return name
    return getattr(act, "__name__", type(act).__name__)


def activation_key(m: nn.Module) -> str | None:
    """The registry name of an activation module's kind, parameters left out.

    Args:
        m: Any module; only its class name is read (transformers' ``GELUActivation`` and the like count).

    Returns:
        The registry key (``nn.LeakyReLU(0.2)`` -> ``"leaky_relu"``), or None when ``m`` is not a known
        activation.

    Examples:
        >>> activation_key(nn.LeakyReLU(0.2)), activation_key(nn.Linear(2, 2))
        ('leaky_relu', None)
    """
    return _MODULE_NAMES.get(type(m).__name__)
