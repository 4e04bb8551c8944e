"""Sharded (DTensor) parameters: recognize them, draw one global tensor on every rank alike, copy each rank's shard.

The lowest layer of ``init``: schemes, apply and materialization all call it, and it calls none of them.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch

from .._errors import SignalpropError

__all__ = ["accepts", "copy_shard_", "is_dtensor", "shared_generator", "shared_seed"]


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 / tensor-parallel sharded tensor).

    Never imports ``torch.distributed.tensor`` (slow to import): no DTensor can exist before it is loaded.
    """
    mod = sys.modules.get("torch.distributed.tensor")
    dtensor = getattr(mod, "DTensor", None) if mod is not None else None
    return dtensor is not None and isinstance(t, dtensor)


def copy_shard_(t: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's shard of the global tensor ``full`` into the DTensor ``t`` (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    assert isinstance(t, DTensor)
    local = t._local_tensor
    if local.is_meta:
        return
    if tuple(full.shape) != tuple(t.shape):
        raise SignalpropError(f"internal: a draw of shape {tuple(full.shape)} for a DTensor of {tuple(t.shape)}")
    mine = distribute_tensor(full.to(local.device), t.device_mesh, t.placements, src_data_rank=None)
    local.copy_(mine._local_tensor)


def shared_seed() -> int:
    """A seed drawn from rank 0's default generator and broadcast to every rank (one collective).

    Without an initialized process group, or with one rank, the local draw.
    """
    seed = int(torch.randint(0, 2**62, (1,)).item())
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box: list[Any] = [seed]
        dist.broadcast_object_list(box, src=0)
        seed = int(box[0])
    return seed


def shared_generator(t: torch.Tensor | None = None) -> torch.Generator:
    """A CPU generator in the same state on every rank (seeded by :func:`shared_seed`)."""
    del t
    return torch.Generator().manual_seed(shared_seed())


def accepts(fn: Callable[..., Any], kw: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return kw in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
