"""Reducing measure's packed statistics across torch.distributed ranks (issue 6, part 3).

Every entry of the packed vector is a sum over elements except the extremes, so one all_reduce with SUM
and one with MAX (on the extremes only) give every rank the statistics of the whole, sharded batch. With
the gloo backend the vector goes to the host first (gloo reduces CPU tensors); that is the one transfer
measure makes anyway.
"""

from __future__ import annotations

import torch

from ._errors import SignalpropError


def world_size(distributed: bool | None) -> int:
    """How many ranks measure reduces over: 1 unless a process group is initialized (and not opted out)."""
    if distributed is False:
        return 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if distributed:
        raise SignalpropError(
            "distributed=True but no torch.distributed process group is initialized; call "
            "torch.distributed.init_process_group first, or leave distributed=None"
        )
    return 1


def reduce_rows(vec: torch.Tensor, max_index: list[int], group_size: int) -> torch.Tensor:
    """All-reduce across ranks: SUM for every entry, then MAX for the extremes (two collectives)."""
    if group_size <= 1 or vec.numel() == 0:
        return vec
    import torch.distributed as dist

    if dist.get_backend() == "gloo" and vec.device.type != "cpu":
        vec = vec.cpu()
    idx = torch.tensor(max_index, dtype=torch.long, device=vec.device)
    extremes = vec.index_select(0, idx) if max_index else None
    dist.all_reduce(vec, op=dist.ReduceOp.SUM)
    if extremes is not None:
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        vec.index_copy_(0, idx, extremes)
    return vec
