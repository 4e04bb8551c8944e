"""Orthogonal and delta-orthogonal tensor initializers (Saxe et al. 2014; Xiao et al. 2018), grouped and
transposed layouts included: the tensor-level functions behind ``sp.init.orthogonal_`` and
``sp.init.delta_orthogonal_``.
"""

from __future__ import annotations

import torch

from .._errors import SignalpropError
from ..theory import ActLike
from .schemes import _as_gain, _check_tensor, writable

__all__ = ["delta_orthogonal_", "orthogonal_"]


# ---- orthogonal ---------------------------------------------------------------------------------
def _orthogonal_matrix(
    rows: int, cols: int, gain: float, dtype: torch.dtype, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """A Haar-random ``rows x cols`` matrix with orthonormal rows (rows <= cols) or columns, times gain.

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q (Mezzadri 2007), as in
    ``torch.nn.init.orthogonal_``.
    """
    big, small = max(rows, cols), min(rows, cols)
    g = torch.empty(big, small, dtype=dtype, device=device).normal_(0.0, 1.0, generator=generator)
    q, r = torch.linalg.qr(g)
    d = torch.diagonal(r).sign()
    q = q * torch.where(d == 0, torch.ones_like(d), d)
    if rows < cols:
        q = q.T
    return q * gain


def _out_matrix_view(sub: torch.Tensor, out_dim: int) -> tuple[int, int]:
    """(rows, cols) of ``sub`` seen as a matrix with one row per output unit."""
    n_out = int(sub.shape[out_dim])
    return n_out, sub.numel() // max(n_out, 1)


def _write_matrix(sub: torch.Tensor, m: torch.Tensor, out_dim: int) -> None:
    if out_dim == 0:
        sub.copy_(m.reshape(sub.shape))
    else:
        shape = (sub.shape[1], sub.shape[0], *sub.shape[2:])
        sub.copy_(m.reshape(shape).transpose(0, 1))


def _check_groups(t: torch.Tensor, groups: int, out_dim: int) -> None:
    if t.ndim < 2:
        raise SignalpropError(
            f"an orthogonal init needs a tensor with at least 2 dimensions, got shape {tuple(t.shape)}"
        )
    if out_dim not in (0, 1):
        raise SignalpropError(f"out_dim must be 0 or 1, got {out_dim!r}")
    if not isinstance(groups, int) or groups < 1 or t.shape[0] % groups:
        raise SignalpropError(
            f"groups={groups!r} must be a positive integer that divides dim 0 of the shape {tuple(t.shape)}"
        )


def orthogonal_(
    tensor: torch.Tensor,
    *,
    gain: float | ActLike = 1.0,
    groups: int = 1,
    out_dim: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Saxe et al. (2014): ``W W^T = gain^2 I`` when rows <= cols, else ``W^T W = gain^2 I``.

    The matrix has one row per output unit: dim ``out_dim`` (0 for ``[out, in, *k]``, 1 for ``[in, out]``
    weights such as transformers' Conv1D and transposed convolutions); the remaining dims are flattened into
    the columns. ``groups`` splits dim 0 into that many independent matrices (grouped convolutions: each
    group maps its own channels, so a depthwise ``[C, 1, 3, 3]`` kernel gets one unit-norm 9-vector per
    channel rather than PyTorch's ``C x 9`` matrix with orthonormal columns).

    Args:
        tensor: A floating-point tensor of at least 2 dimensions.
        gain: A positive number or an activation (:func:`signalprop.theory.gain`).
        groups: Independent matrices along dim 0.
        out_dim: The dimension that indexes output units (0 or 1).
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Raises:
        SignalpropError: Fewer than 2 dimensions, a bad ``out_dim``, or ``groups`` not dividing dim 0.

    Examples:
        >>> w = orthogonal_(torch.empty(3, 5), generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(w @ w.T, torch.eye(3), atol=1e-6)
        True
    """
    tensor = _check_tensor(tensor, "orthogonal_")
    _check_groups(tensor, groups, out_dim)
    g = _as_gain(gain)
    with torch.no_grad(), writable(tensor, generator) as full:
        if full.is_meta:
            return tensor
        step = full.shape[0] // groups
        for j in range(groups):
            sub = full[j * step : (j + 1) * step]
            rows, cols = _out_matrix_view(sub, out_dim)
            m = _orthogonal_matrix(rows, cols, g, full.dtype, full.device, generator)
            _write_matrix(sub, m, out_dim)
    return tensor


def delta_orthogonal_(
    tensor: torch.Tensor,
    *,
    gain: float | ActLike = 1.0,
    groups: int = 1,
    out_dim: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Xiao et al. (2018), Algorithm 2: an orthogonal ``[out, in]`` matrix at the kernel's centre, zeros elsewhere.

    For a convolution weight ``[out, in, *k]`` the centre is index ``k // 2`` in every spatial dim; the
    convolution then acts at each position as the orthogonal matrix, so it preserves the norm of an input
    away from the border exactly when ``out >= in`` (``W^T W = gain^2 I``). A 2-D tensor gets
    :func:`orthogonal_`. ``groups`` and ``out_dim`` as in :func:`orthogonal_`.

    Args:
        tensor: A floating-point tensor of at least 2 dimensions.
        gain: A positive number or an activation (:func:`signalprop.theory.gain`).
        groups: Independent matrices along dim 0.
        out_dim: The dimension that indexes output units (0 or 1).
        generator: The random generator to draw from.

    Returns:
        ``tensor``, filled in place.

    Examples:
        >>> w = delta_orthogonal_(torch.empty(16, 8, 3, 3), generator=torch.Generator().manual_seed(0))
        >>> centre = w[:, :, 1, 1]
        >>> torch.allclose(centre.T @ centre, torch.eye(8), atol=1e-6), float(w[:, :, 0, 0].abs().max())
        (True, 0.0)
    """
    tensor = _check_tensor(tensor, "delta_orthogonal_")
    _check_groups(tensor, groups, out_dim)
    if tensor.ndim == 2:
        return orthogonal_(tensor, gain=gain, groups=groups, out_dim=out_dim, generator=generator)
    g = _as_gain(gain)
    with torch.no_grad(), writable(tensor, generator) as full:
        if full.is_meta:
            return tensor
        full.zero_()
        index: tuple[slice | int, ...] = (slice(None), slice(None), *(int(k) // 2 for k in full.shape[2:]))
        centre = full[index]
        step = full.shape[0] // groups
        for j in range(groups):
            sub = centre[j * step : (j + 1) * step]
            m = _orthogonal_matrix(int(sub.shape[out_dim]), int(sub.shape[1 - out_dim]), g, full.dtype,
                                   full.device, generator)
            _write_matrix(sub, m, out_dim)
    return tensor
