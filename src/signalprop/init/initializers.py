"""The model-level initializers ``he_``, ``glorot_``, ``lecun_``, ``variance_scaling_``, ``orthogonal_`` and
``delta_orthogonal_``: one layer or a whole model, planned as data by :mod:`signalprop.init.apply`, then
written (every error is raised before a single weight changes).

Every initializer takes one layer or a whole model (then every weight layer in it, including the layer
itself), zeroes biases unless ``zero_bias=False``, takes an optional ``torch.Generator`` and returns what it
was given. ``fans=(fan_in, fan_out)`` overrides the fans of a single layer (and lets you initialize a layer
type signalprop does not know).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn  # noqa: F401  (the examples use it)

from ..theory import ActLike
from .apply import M, _run, plan, target_std  # noqa: F401  (plan, target_std: the examples use them)

__all__ = ["SCHEMES", "delta_orthogonal_", "glorot_", "he_", "lecun_", "orthogonal_", "variance_scaling_"]


def he_(
    m: M,
    *,
    mode: str = "fan_in",
    nonlinearity: ActLike = "relu",
    distribution: str = "normal",
    zero_bias: bool = True,
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> M:
    """He et al. (2015): weight std ``gain(nonlinearity) / sqrt(fan)``, fan = effective fan_in or fan_out.

    ``Var[y_L] = Var[y_1] prod_l (1/2 n_l Var[w_l])`` for ReLU (He et al. 2015, Eq. 10) stays put when
    ``Var[w] = 2 / fan_in``; ``mode="fan_out"`` keeps gradients instead (Eq. 14). ``nonlinearity`` is a
    name, a tensor callable or an ``nn.Module`` (``nn.LeakyReLU(0.2)``, ``nn.GELU()``), and the gain is
    :func:`signalprop.theory.gain`, ``1/sqrt(E[act(z)^2])``. ``distribution``: normal, uniform,
    truncated_normal (all with exactly that std).

    Args:
        m: One layer or a whole model (then every weight layer in it).
        mode: ``fan_in`` (keep activations) or ``fan_out`` (keep gradients).
        nonlinearity: The activation after the layer: a name, a tensor callable or an ``nn.Module``.
        distribution: ``normal``, ``uniform`` or ``truncated_normal``.
        zero_bias: Zero the biases (else leave them as they are).
        fans: ``(fan_in, fan_out)`` overriding the fans of a single layer (and initializing a layer type
            signalprop has no fan rule for).
        generator: The random generator to draw from (a seeded one gives the same weights on every device).

    Returns:
        ``m``, initialized in place.

    Raises:
        SignalpropError: An unknown setting or layer type; nothing is written then.

    Examples:
        ``std = sqrt(2) / sqrt(512)``, so ``std * sqrt(fan_in)`` is close to ``sqrt(2) = 1.41``:

        >>> net = he_(nn.Sequential(nn.Linear(512, 512), nn.ReLU()), generator=torch.Generator().manual_seed(0))
        >>> round(float(net[0].weight.detach().std() * 512 ** 0.5), 2), float(net[0].bias.detach().abs().max())
        (1.41, 0.0)
    """
    return _run(m, "he", {"mode": mode, "nonlinearity": nonlinearity, "distribution": distribution},
                zero_bias=zero_bias, fans=fans, generator=generator)


def glorot_(
    m: M,
    *,
    distribution: str = "uniform",
    gain: float | ActLike = 1.0,
    zero_bias: bool = True,
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> M:
    """Glorot & Bengio (2010), Eq. 16: weight std ``gain * sqrt(2 / (fan_in + fan_out))``.

    The compromise between keeping activations (``1/fan_in``) and gradients (``1/fan_out``) for symmetric
    activations near the identity. ``gain`` is a number or an activation (then :func:`theory.gain`).

    Args:
        m: One layer or a whole model (then every weight layer in it).
        distribution: ``uniform`` (Glorot's ``U(-b, b)``, ``b = gain * sqrt(6 / (fan_in + fan_out))``),
            ``normal`` or ``truncated_normal``.
        gain: A positive number, or an activation whose :func:`signalprop.theory.gain` is used.
        zero_bias: Zero the biases (else leave them as they are).
        fans: ``(fan_in, fan_out)`` overriding the fans of a single layer (and initializing a layer type
            signalprop has no fan rule for).
        generator: The random generator to draw from (a seeded one gives the same weights on every device).

    Returns:
        ``m``, initialized in place.

    Raises:
        SignalpropError: An unknown setting or layer type; nothing is written then.

    Examples:
        ``Linear(300, 100)``: ``b = sqrt(6 / 400) = 0.1225``, no entry beyond it:

        >>> layer = glorot_(nn.Linear(300, 100), generator=torch.Generator().manual_seed(0))
        >>> bool(layer.weight.detach().abs().max() <= (6 / 400) ** 0.5)
        True
        >>> round(target_std(nn.Linear(300, 100), "glorot"), 4)  # sqrt(2 / 400)
        0.0707
    """
    return _run(m, "glorot", {"distribution": distribution, "gain": gain},
                zero_bias=zero_bias, fans=fans, generator=generator)


def lecun_(
    m: M,
    *,
    distribution: str = "normal",
    zero_bias: bool = True,
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> M:
    """LeCun et al. (1998): weight std ``1 / sqrt(fan_in)``; with SELU, self-normalizing (Klambauer et al. 2017).

    Keeps the second moment of a linear (or SELU, tanh near 0) layer's output equal to its input's
    (LeCun et al. 1998, "Efficient BackProp", Sec. 4.6).

    Args:
        m: One layer or a whole model (then every weight layer in it).
        distribution: ``normal``, ``uniform`` (``b = sqrt(3 / fan_in)``) or ``truncated_normal``.
        zero_bias: Zero the biases (else leave them as they are).
        fans: ``(fan_in, fan_out)`` overriding the fans of a single layer (and initializing a layer type
            signalprop has no fan rule for).
        generator: The random generator to draw from (a seeded one gives the same weights on every device).

    Returns:
        ``m``, initialized in place.

    Raises:
        SignalpropError: An unknown setting or layer type; nothing is written then.

    Examples:
        >>> [round(s.std, 4) for s in plan(nn.Linear(256, 128), "lecun")]  # 1 / sqrt(256)
        [0.0625]
        >>> net = lecun_(nn.Sequential(nn.Linear(256, 128), nn.SELU()))
        >>> float(net[0].bias.detach().abs().max())
        0.0
    """
    return _run(m, "lecun", {"distribution": distribution},
                zero_bias=zero_bias, fans=fans, generator=generator)


def variance_scaling_(
    m: M,
    *,
    scale: float = 1.0,
    mode: str = "fan_in",
    distribution: str = "truncated_normal",
    zero_bias: bool = True,
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> M:
    """Keras' ``VarianceScaling``: weight variance ``scale / fan`` exactly, fan = fan_in, fan_out or fan_avg.

    ``truncated_normal`` cuts at two underlying standard deviations and widens by 1/0.87962566 first, so the
    variance is exactly ``scale / fan`` (as Keras does since 2.3).

    Args:
        m: One layer or a whole model (then every weight layer in it).
        scale: The variance numerator, a positive number.
        mode: ``fan_in``, ``fan_out`` or ``fan_avg`` (``(fan_in + fan_out) / 2``).
        distribution: ``truncated_normal``, ``normal`` or ``uniform``.
        zero_bias: Zero the biases (else leave them as they are).
        fans: ``(fan_in, fan_out)`` overriding the fans of a single layer (and initializing a layer type
            signalprop has no fan rule for).
        generator: The random generator to draw from (a seeded one gives the same weights on every device).

    Returns:
        ``m``, initialized in place.

    Raises:
        SignalpropError: An unknown setting or layer type; nothing is written then.

    Examples:
        ``Linear(200, 100)`` with ``scale=2, mode="fan_avg"``: ``std = sqrt(2 / 150)``:

        >>> [round(s.std, 4) for s in plan(nn.Linear(200, 100), "variance_scaling", scale=2.0, mode="fan_avg")]
        [0.1155]
        >>> layer = variance_scaling_(nn.Linear(200, 100), scale=2.0, generator=torch.Generator().manual_seed(0))
        >>> bool(layer.weight.detach().abs().max() <= 2 * (2 / 200) ** 0.5 / 0.87962566)  # the cut at 2
        True
    """
    return _run(m, "variance_scaling", {"scale": scale, "mode": mode, "distribution": distribution},
                zero_bias=zero_bias, fans=fans, generator=generator)


def orthogonal_(
    m: M,
    *,
    gain: float | ActLike = 1.0,
    zero_bias: bool = True,
    generator: torch.Generator | None = None,
) -> M:
    """Saxe et al. (2014): each weight block, seen with one row per output unit, has ``W W^T = gain^2 I``.

    (``W^T W = gain^2 I`` when it has more rows than columns.) Grouped convolutions get one orthogonal
    matrix per group; attention's q, k and v one each.

    Args:
        m: One layer or a whole model (then every weight layer in it).
        gain: A positive number, or an activation whose :func:`signalprop.theory.gain` is used.
        zero_bias: Zero the biases (else leave them as they are).
        generator: The random generator to draw from.

    Returns:
        ``m``, initialized in place.

    Examples:
        >>> layer = orthogonal_(nn.Linear(64, 32), generator=torch.Generator().manual_seed(0))
        >>> w = layer.weight.detach()
        >>> torch.allclose(w @ w.T, torch.eye(32), atol=1e-5)
        True
        >>> round(plan(nn.Linear(64, 32), "orthogonal")[0].std, 4)  # root mean square entry 1 / sqrt(64)
        0.125
    """
    return _run(m, "orthogonal", {"gain": gain}, zero_bias=zero_bias, fans=None, generator=generator)


def delta_orthogonal_(
    m: M,
    *,
    gain: float | ActLike = 1.0,
    zero_bias: bool = True,
    generator: torch.Generator | None = None,
) -> M:
    """Xiao et al. (2018): an orthogonal matrix at each conv kernel's centre, zeros elsewhere.

    A convolution so initialized (with ``out_channels >= in_channels / groups``) preserves the norm of any
    input away from the border; with ``gain = theory.gain(act)`` and the right activation this is the
    dynamical-isometry init that trains 10,000-layer CNNs. Layers without a kernel get :func:`orthogonal_`.

    Args:
        m: One layer or a whole model (then every weight layer in it).
        gain: A positive number, or an activation whose :func:`signalprop.theory.gain` is used.
        zero_bias: Zero the biases (else leave them as they are).
        generator: The random generator to draw from.

    Returns:
        ``m``, initialized in place.

    Examples:
        >>> conv = delta_orthogonal_(nn.Conv2d(16, 32, 3), generator=torch.Generator().manual_seed(0))
        >>> w = conv.weight.detach()
        >>> centre = w[:, :, 1, 1]
        >>> float(w[:, :, 0, 0].abs().max()), torch.allclose(centre.T @ centre, torch.eye(16), atol=1e-5)
        (0.0, True)
    """
    return _run(m, "delta_orthogonal", {"gain": gain}, zero_bias=zero_bias, fans=None, generator=generator)


SCHEMES: dict[str, Callable[..., Any]] = {
    "he": he_,
    "kaiming": he_,
    "glorot": glorot_,
    "xavier": glorot_,
    "lecun": lecun_,
    "variance_scaling": variance_scaling_,
    "orthogonal": orthogonal_,
    "delta_orthogonal": delta_orthogonal_,
}
"""Scheme name -> module-level initializer."""

_SCHEME_OF: dict[Callable[..., Any], str] = {
    he_: "he",
    glorot_: "glorot",
    lecun_: "lecun",
    variance_scaling_: "variance_scaling",
    orthogonal_: "orthogonal",
    delta_orthogonal_: "delta_orthogonal",
}
