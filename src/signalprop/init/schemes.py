"""Tensor-level initializers, with the ``torch.nn.init`` contract: ``name_(tensor, ...) -> tensor``, in place.

Each scheme is a target standard deviation (a function of the fans and a gain) plus a distribution:

==================  ============================================================  ===============================
scheme              weight variance                                               paper
==================  ============================================================  ===============================
He / Kaiming        ``gain(act)^2 / fan`` (fan = fan_in or fan_out)                He et al. 2015, Eq. 10 and 14
Glorot / Xavier     ``gain^2 * 2 / (fan_in + fan_out)``                            Glorot & Bengio 2010, Eq. 16
LeCun               ``1 / fan_in``                                                 LeCun et al. 1998, Sec. 4.6
variance scaling    ``scale / fan`` (fan_in, fan_out or their mean)                Keras ``VarianceScaling``
orthogonal          ``W W^T = gain^2 I`` (rows <= cols, else ``W^T W``)            Saxe et al. 2014
delta-orthogonal    orthogonal ``[out, in]`` at the kernel's centre, zeros around   Xiao et al. 2018, Alg. 2
==================  ============================================================  ===============================

The orthogonal pair lives in :mod:`signalprop.init.orthogonal`; the rest here.

He's gain is the second-moment gain ``1/sqrt(E[act(z)^2])`` of :func:`signalprop.theory.gain` (relu:
sqrt 2; leaky_relu(a): sqrt(2 / (1 + a^2)); tanh: 1.5925, where ``torch.nn.init.calculate_gain`` says 5/3).

Distributions with a given standard deviation ``s``: ``normal`` is ``N(0, s^2)``; ``uniform`` is
``U(-sqrt(3) s, sqrt(3) s)``; ``truncated_normal`` draws ``N(0, (s/c)^2)`` cut at two of its own standard
deviations, where ``c = sqrt(1 - 4 phi(2) / (2 Phi(2) - 1)) = 0.87962566`` is the standard deviation of a
standard normal truncated to [-2, 2], so the variance is exactly ``s^2`` (Keras' correction).

Fans default to PyTorch's reading of the tensor's shape (dim 0 = outputs, dim 1 = inputs, the rest the
receptive field); pass ``fans=(fan_in, fan_out)`` for anything else. :mod:`signalprop.init.initializers` does
that from the layer, which is the point: the module-level functions know strided, transposed, grouped and
attention layers, a bare tensor does not.

Every function samples into float32 (or the tensor's own float64) and casts, so a bfloat16 weight gets the
float32 draw rounded; with a ``generator`` on another device the draw happens there and is copied, so a
seeded generator gives the same weights on every device; a DTensor (a sharded parameter) gets the shard of
the draw the unsharded tensor would get (see :mod:`signalprop.init._dtensor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .. import theory
from .._errors import SignalpropError
from ..theory import ActLike

DISTRIBUTIONS = ("normal", "uniform", "truncated_normal")
MODES = ("fan_in", "fan_out", "fan_avg")
TRUNC_AT = 2.0
"""The truncated normal is cut at this many of its underlying standard deviations (Keras, TF)."""


def _truncated_std_factor(a: float = TRUNC_AT) -> float:
    """Standard deviation of N(0, 1) truncated to [-a, a]: sqrt(1 - 2 a phi(a) / (2 Phi(a) - 1))."""
    pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(a / math.sqrt(2))
    return math.sqrt(1.0 - 2.0 * a * pdf / mass)


TRUNC_STD_FACTOR = _truncated_std_factor()
"""0.8796256610342398: the standard deviation of a standard normal truncated at +-2."""


# ---- checks ----------------------------------------------------------------------------------------
def _check_tensor(t: object, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise SignalpropError(f"{what} needs a floating-point torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise SignalpropError(
            f"{what} needs a floating-point tensor (float16, bfloat16, float32, float64), got dtype "
            f"{t.dtype}; convert it first, e.g. tensor.float()"
        )
    return t


def default_fans(t: torch.Tensor) -> tuple[float, float]:
    """PyTorch's shape rule: ``(size(1) * receptive, size(0) * receptive)``; right for Linear and stride 1.

    Args:
        t: A tensor of at least 2 dimensions, ``[out, in, *kernel]``.

    Returns:
        ``(fan_in, fan_out)``.

    Raises:
        SignalpropError: Fewer than 2 dimensions.

    Examples:
        >>> default_fans(torch.empty(128, 64, 3, 3))
        (576, 1152)
    """
    if t.ndim < 2:
        raise SignalpropError(
            f"cannot read fans off a tensor of shape {tuple(t.shape)} (it needs at least 2 dimensions); "
            "pass fans=(fan_in, fan_out)"
        )
    receptive = math.prod(int(s) for s in t.shape[2:])
    return int(t.shape[1]) * receptive, int(t.shape[0]) * receptive


def _fans(t: torch.Tensor, fans: tuple[float, float] | None) -> tuple[float, float]:
    if fans is None:
        return default_fans(t)
    try:
        fi, fo = (float(v) for v in fans)
    except (TypeError, ValueError) as exc:
        raise SignalpropError(f"fans must be a pair (fan_in, fan_out) of positive numbers, got {fans!r}") from exc
    if not (fi > 0 and fo > 0 and math.isfinite(fi) and math.isfinite(fo)):
        raise SignalpropError(f"fans must be positive and finite, got {fans!r}")
    return fi, fo


def _pick(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise SignalpropError(f"unknown {what} {value!r}; use one of: {', '.join(allowed)}")
    return value


def _fan(fan_in: float, fan_out: float, mode: str) -> float:
    mode = _pick(mode, MODES, "mode")
    if mode == "fan_in":
        return fan_in
    if mode == "fan_out":
        return fan_out
    return (fan_in + fan_out) / 2.0


def _as_gain(gain: float | ActLike) -> float:
    """A number stays a number; an activation (name, callable, module) becomes :func:`theory.gain`."""
    if isinstance(gain, bool):
        raise SignalpropError(f"gain must be a positive number or an activation, got {gain!r}")
    if isinstance(gain, (int, float)):
        g = float(gain)
        if not (g > 0 and math.isfinite(g)):
            raise SignalpropError(f"gain must be positive and finite, got {gain!r}")
        return g
    return theory.gain(gain)


# ---- standard deviations (the plan; no tensor touched) -------------------------------------------
def he_std(fan_in: float, fan_out: float, *, mode: str = "fan_in", nonlinearity: ActLike = "relu") -> float:
    """He et al. (2015): ``std = gain(act) / sqrt(fan)``; mode fan_in keeps activations, fan_out gradients.

    Args:
        fan_in: Inputs per output unit.
        fan_out: Outputs per input unit.
        mode: ``fan_in`` (Eq. 10) or ``fan_out`` (Eq. 14).
        nonlinearity: The activation; its gain is :func:`signalprop.theory.gain`.

    Returns:
        The std.

    Examples:
        >>> round(he_std(576, 1152), 5), round(he_std(576, 1152, mode="fan_out"), 5)  # sqrt(2/576), sqrt(2/1152)
        (0.05893, 0.04167)
    """
    if _pick(mode, MODES, "mode") == "fan_avg":
        raise SignalpropError("He init takes mode 'fan_in' or 'fan_out'; for 'fan_avg' use variance_scaling_")
    return theory.gain(nonlinearity) / math.sqrt(_fan(fan_in, fan_out, mode))


def glorot_std(fan_in: float, fan_out: float, *, gain: float | ActLike = 1.0) -> float:
    """Glorot & Bengio (2010), Eq. 16: ``std = gain * sqrt(2 / (fan_in + fan_out))``.

    Args:
        fan_in: Inputs per output unit.
        fan_out: Outputs per input unit.
        gain: A positive number or an activation (:func:`signalprop.theory.gain`).

    Returns:
        The std.

    Examples:
        >>> round(glorot_std(300, 100), 4)  # sqrt(2 / 400)
        0.0707
    """
    return _as_gain(gain) * math.sqrt(2.0 / (fan_in + fan_out))


def lecun_std(fan_in: float, fan_out: float) -> float:
    """LeCun et al. (1998): ``std = 1 / sqrt(fan_in)`` (SELU's self-normalizing init, Klambauer et al. 2017).

    Args:
        fan_in: Inputs per output unit.
        fan_out: Outputs per input unit.

    Returns:
        The std.

    Examples:
        >>> lecun_std(256, 10)
        0.0625
    """
    del fan_out
    return 1.0 / math.sqrt(fan_in)


def variance_scaling_std(fan_in: float, fan_out: float, *, scale: float = 1.0, mode: str = "fan_in") -> float:
    """Keras' ``VarianceScaling``: ``std = sqrt(scale / fan)``, fan = fan_in, fan_out or (fan_in + fan_out) / 2.

    Args:
        fan_in: Inputs per output unit.
        fan_out: Outputs per input unit.
        scale: The variance numerator, positive.
        mode: ``fan_in``, ``fan_out`` or ``fan_avg``.

    Returns:
        The std.

    Raises:
        SignalpropError: A non-positive scale or an unknown mode.

    Examples:
        >>> round(variance_scaling_std(200, 100, scale=2.0, mode="fan_avg"), 4)  # sqrt(2 / 150)
        0.1155
    """
    if not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0 and math.isfinite(scale)):
        raise SignalpropError(f"scale must be a positive finite number, got {scale!r}")
    return math.sqrt(float(scale) / _fan(fan_in, fan_out, mode))


def orthogonal_std(rows: int, cols: int, *, gain: float = 1.0) -> float:
    """The root mean square entry of a ``rows x cols`` matrix with ``W W^T = gain^2 I`` (or ``W^T W``).

    ``min(rows, cols)`` singular values equal ``gain``, so the sum of squares is ``gain^2 min(rows, cols)``
    and the mean square ``gain^2 / max(rows, cols)``.

    Args:
        rows: Rows (output units).
        cols: Columns.
        gain: The singular value.

    Returns:
        The root mean square entry, ``gain / sqrt(max(rows, cols))``.

    Examples:
        >>> orthogonal_std(32, 64), orthogonal_std(64, 32, gain=2.0)
        (0.125, 0.25)
    """
    return _as_gain(gain) / math.sqrt(max(rows, cols))


# ---- writing into tensors: plain, cross-device, low precision, sharded ---------------------------
@contextmanager
def writable(t: torch.Tensor, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """A plain full-size tensor to sample into; on exit its values land in ``t``.

    ``t`` itself when it is a plain contiguous float32/float64 tensor on the generator's device; a meta
    scratch (sampling is a no-op) when ``t`` is on the meta device; else a float32/float64 scratch tensor on the generator's device, copied into
    ``t`` afterwards; for a DTensor the scratch has the *global* shape and ``t`` receives its own shard.

    Args:
        t: The tensor to fill.
        generator: The generator the draw will use (its device decides where the scratch lives).

    Yields:
        The tensor to sample into.

    Examples:
        A bfloat16 tensor gets a float32 scratch, copied in on exit:

        >>> t = torch.zeros(3, dtype=torch.bfloat16)
        >>> with writable(t, None) as full:
        ...     _ = full.fill_(1.5)
        >>> full.dtype, t.tolist()
        (torch.float32, [1.5, 1.5, 1.5])
    """
    from ._dtensor import copy_shard_, is_dtensor, shared_generator

    if t.is_meta:  # nothing to fill (a meta DTensor included); sampling into a meta scratch is a no-op
        yield torch.empty(tuple(t.shape), dtype=torch.float32, device="meta")
        return
    if is_dtensor(t):
        if generator is None:
            generator = shared_generator(t)
        dev = generator.device
        dtype = t.dtype if t.dtype == torch.float64 else torch.float32
        full = torch.empty(tuple(t.shape), dtype=dtype, device=dev)
        yield full
        copy_shard_(t, full)
        return
    dev = generator.device if generator is not None else t.device
    if dev == t.device and t.dtype in (torch.float32, torch.float64) and t.is_contiguous():
        yield t
        return
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    scratch = torch.empty(tuple(t.shape), dtype=dtype, device=dev)
    yield scratch
    t.copy_(scratch)


def _sample(full: torch.Tensor, std: float, distribution: str, generator: torch.Generator | None) -> None:
    """Fill the plain tensor ``full`` with zero-mean draws of standard deviation ``std`` (meta: nothing)."""
    if full.is_meta:  # (sampling ops on meta tensors import torch._dynamo: seconds, for a no-op)
        return
    if distribution == "normal":
        full.normal_(0.0, std, generator=generator)
    elif distribution == "uniform":
        bound = math.sqrt(3.0) * std
        full.uniform_(-bound, bound, generator=generator)
    else:
        s = std / TRUNC_STD_FACTOR
        torch.nn.init.trunc_normal_(full, 0.0, s, -TRUNC_AT * s, TRUNC_AT * s, generator=generator)


def sample_(
    tensor: torch.Tensor,
    std: float,
    distribution: str = "normal",
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``tensor`` in place with zero-mean draws of standard deviation ``std`` and return it.

    ``distribution``: ``normal``, ``uniform`` (bound sqrt(3) std) or ``truncated_normal`` (cut at 2 of its
    own standard deviations, widened by 1/0.87962566 so the variance is exactly std^2).

    Args:
        tensor: A floating-point tensor.
        std: The standard deviation, finite and non-negative.
        distribution: ``normal``, ``uniform`` or ``truncated_normal``.
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Raises:
        SignalpropError: A non-float tensor, an unknown distribution or a bad std.

    Examples:
        >>> w = sample_(torch.empty(1000, 100), 0.5, "uniform", generator=torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= 0.5 * 3 ** 0.5)  # U(-sqrt(3) std, sqrt(3) std)
        True
    """
    tensor = _check_tensor(tensor, "sample_")
    _pick(distribution, DISTRIBUTIONS, "distribution")
    if not (std >= 0 and math.isfinite(std)):
        raise SignalpropError(f"std must be a finite non-negative number, got {std!r}")
    with torch.no_grad(), writable(tensor, generator) as full:
        _sample(full, float(std), distribution, generator)
    return tensor


def _scheme(std_fn: Callable[[float, float], float], distribution: str) -> Callable[..., torch.Tensor]:
    def init_(
        tensor: torch.Tensor,
        *,
        fans: tuple[float, float] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        tensor = _check_tensor(tensor, "initializer")
        fi, fo = _fans(tensor, fans)
        return sample_(tensor, std_fn(fi, fo), distribution, generator=generator)

    return init_


def he_normal_(
    tensor: torch.Tensor,
    *,
    mode: str = "fan_in",
    nonlinearity: ActLike = "relu",
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """He et al. (2015), Eq. 10: ``N(0, gain(nonlinearity)^2 / fan)``; relu's gain is ``sqrt(2)``.

    Args:
        tensor: A floating-point tensor of at least 2 dimensions (or any shape with ``fans``).
        mode: ``fan_in`` (keep activations) or ``fan_out`` (keep gradients).
        nonlinearity: The activation after the layer: a name, a tensor callable or an ``nn.Module``; its
            gain is :func:`signalprop.theory.gain`.
        fans: ``(fan_in, fan_out)``; default: PyTorch's reading of the shape (dim 0 outputs, dim 1 inputs,
            the rest the receptive field).
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Examples:
        >>> w = he_normal_(torch.empty(256, 512), generator=torch.Generator().manual_seed(0))
        >>> round(float(w.std() * 512 ** 0.5), 1)  # sqrt(2)
        1.4
    """
    return _scheme(lambda fi, fo: he_std(fi, fo, mode=mode, nonlinearity=nonlinearity), "normal")(
        tensor, fans=fans, generator=generator
    )


def he_uniform_(
    tensor: torch.Tensor,
    *,
    mode: str = "fan_in",
    nonlinearity: ActLike = "relu",
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """He et al. (2015) with ``U(-b, b)``, ``b = sqrt(3) * gain(nonlinearity) / sqrt(fan)``.

    The uniform distribution on ``[-b, b]`` has std ``b / sqrt(3)``, so this is the std of :func:`he_normal_`.

    Args:
        tensor: A floating-point tensor of at least 2 dimensions (or any shape with ``fans``).
        mode: ``fan_in`` (keep activations) or ``fan_out`` (keep gradients).
        nonlinearity: The activation after the layer: a name, a tensor callable or an ``nn.Module``; its
            gain is :func:`signalprop.theory.gain`.
        fans: ``(fan_in, fan_out)``; default: PyTorch's reading of the shape (dim 0 outputs, dim 1 inputs,
            the rest the receptive field).
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Examples:
        >>> w = he_uniform_(torch.empty(256, 512), generator=torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= 3 ** 0.5 * (2 / 512) ** 0.5)
        True
    """
    return _scheme(lambda fi, fo: he_std(fi, fo, mode=mode, nonlinearity=nonlinearity), "uniform")(
        tensor, fans=fans, generator=generator
    )


def glorot_normal_(
    tensor: torch.Tensor,
    *,
    gain: float | ActLike = 1.0,
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Glorot & Bengio (2010), Eq. 16 with a normal draw: ``N(0, gain^2 * 2 / (fan_in + fan_out))``.

    Args:
        tensor: A floating-point tensor of at least 2 dimensions (or any shape with ``fans``).
        gain: A positive number, or an activation whose :func:`signalprop.theory.gain` is used.
        fans: ``(fan_in, fan_out)``; default: PyTorch's reading of the shape (dim 0 outputs, dim 1 inputs,
            the rest the receptive field).
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Examples:
        >>> w = glorot_normal_(torch.empty(256, 512), generator=torch.Generator().manual_seed(0))
        >>> round(float(w.std() * (768 / 2) ** 0.5), 1)  # std sqrt(2 / (512 + 256))
        1.0
    """
    return _scheme(lambda fi, fo: glorot_std(fi, fo, gain=gain), "normal")(tensor, fans=fans, generator=generator)


def glorot_uniform_(
    tensor: torch.Tensor,
    *,
    gain: float | ActLike = 1.0,
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Glorot & Bengio (2010), Eq. 16: ``U(-b, b)``, ``b = gain * sqrt(6 / (fan_in + fan_out))``.

    Args:
        tensor: A floating-point tensor of at least 2 dimensions (or any shape with ``fans``).
        gain: A positive number, or an activation whose :func:`signalprop.theory.gain` is used.
        fans: ``(fan_in, fan_out)``; default: PyTorch's reading of the shape (dim 0 outputs, dim 1 inputs,
            the rest the receptive field).
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Examples:
        >>> w = glorot_uniform_(torch.empty(100, 300), generator=torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= (6 / 400) ** 0.5)
        True
    """
    return _scheme(lambda fi, fo: glorot_std(fi, fo, gain=gain), "uniform")(tensor, fans=fans, generator=generator)


def lecun_normal_(
    tensor: torch.Tensor,
    *,
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LeCun et al. (1998), "Efficient BackProp", Sec. 4.6: ``N(0, 1 / fan_in)``.

    Args:
        tensor: A floating-point tensor of at least 2 dimensions (or any shape with ``fans``).
        fans: ``(fan_in, fan_out)``; default: PyTorch's reading of the shape (dim 0 outputs, dim 1 inputs,
            the rest the receptive field).
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Examples:
        >>> w = lecun_normal_(torch.empty(256, 512), generator=torch.Generator().manual_seed(0))
        >>> round(float(w.std() * 512 ** 0.5), 1)  # std 1 / sqrt(512)
        1.0
    """
    return _scheme(lecun_std, "normal")(tensor, fans=fans, generator=generator)


def lecun_uniform_(
    tensor: torch.Tensor,
    *,
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """LeCun et al. (1998): ``U(-b, b)``, ``b = sqrt(3 / fan_in)`` (std ``1 / sqrt(fan_in)``).

    Args:
        tensor: A floating-point tensor of at least 2 dimensions (or any shape with ``fans``).
        fans: ``(fan_in, fan_out)``; default: PyTorch's reading of the shape (dim 0 outputs, dim 1 inputs,
            the rest the receptive field).
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Examples:
        >>> w = lecun_uniform_(torch.empty(100, 300), generator=torch.Generator().manual_seed(0))
        >>> bool(w.abs().max() <= (3 / 300) ** 0.5)
        True
    """
    return _scheme(lecun_std, "uniform")(tensor, fans=fans, generator=generator)


def variance_scaling_(
    tensor: torch.Tensor,
    *,
    scale: float = 1.0,
    mode: str = "fan_in",
    distribution: str = "truncated_normal",
    fans: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keras' ``VarianceScaling``: variance ``scale / fan`` exactly, for every ``distribution``.

    Args:
        tensor: A floating-point tensor of at least 2 dimensions (or any shape with ``fans``).
        scale: The variance numerator, positive.
        mode: ``fan_in``, ``fan_out`` or ``fan_avg``.
        distribution: ``truncated_normal``, ``normal`` or ``uniform``.
        fans: ``(fan_in, fan_out)``; default: PyTorch's reading of the shape.
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Examples:
        >>> w = variance_scaling_(torch.empty(400, 500), scale=2.0, generator=torch.Generator().manual_seed(0))
        >>> round(float(w.var() * 500), 1)
        2.0
    """
    _pick(distribution, DISTRIBUTIONS, "distribution")
    return _scheme(lambda fi, fo: variance_scaling_std(fi, fo, scale=scale, mode=mode), distribution)(
        tensor, fans=fans, generator=generator
    )
