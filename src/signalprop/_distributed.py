"""Reducing measure's packed statistics across torch.distributed ranks.

Every entry of the packed vector is a sum over elements except the extremes, so one all_gather followed by
a local sum (a max on the extremes) gives every rank the statistics of the whole, sharded batch; measure and
Monitor both use it. With
the gloo backend the vector goes to the host first (gloo reduces CPU tensors); that is the one transfer
measure makes anyway.
"""

from __future__ import annotations

import torch

from ._errors import SignalpropError


def world_size(distributed: bool | None) -> int:
    """How many ranks measure and Monitor reduce over: 1 unless a process group is initialized (and not opted out)."""
    if distributed is False:
        return 1
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    if distributed:
        raise SignalpropError(
            "distributed=True but no torch.distributed process group is initialized; call "
            "torch.distributed.init_process_group first, or leave distributed=None"
        )
    return 1


def reduce_rows(vec: torch.Tensor, max_index: list[int], group_size: int) -> torch.Tensor:
    """Combine every rank's packed vector with ONE collective: all_gather, then a sum over ranks (a max at
    ``max_index``, the extremes). With gloo the result stays on the host, where the caller brings it anyway."""
    if group_size <= 1 or vec.numel() == 0:
        return vec
    import torch.distributed as dist

    if dist.get_backend() == "gloo" and vec.device.type != "cpu":
        vec = vec.cpu()
    vec = vec.contiguous()
    out = torch.empty(group_size * vec.numel(), dtype=vec.dtype, device=vec.device)
    _all_gather(out, vec)
    parts = out.view(group_size, vec.numel())
    red = parts.sum(0)
    if max_index:
        idx = torch.tensor(max_index, dtype=torch.long, device=vec.device)
        red[idx] = parts[:, idx].amax(0)
    return red


def rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    import torch.distributed as dist

    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


def gather_sizes(n: int, device: torch.device, group_size: int) -> list[int]:
    """Every rank's ``n`` (a batch size), in rank order, with one all_gather of one number per rank."""
    if group_size <= 1:
        return [n]
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        device = torch.device("cpu")
    out = torch.zeros(group_size, dtype=torch.int64, device=device)
    _all_gather(out, torch.tensor([n], dtype=torch.int64, device=device))
    return [int(v) for v in out.tolist()]


_IN_FLIGHT: list[torch.Tensor] = []


def _all_gather(out: torch.Tensor, vec: torch.Tensor) -> None:
    """``all_gather_into_tensor(out, vec)``, the two tensors kept referenced until the next collective.

    gloo's worker thread drops its reference to a finished collective's tensors a moment after ``wait``
    returns; were that the last reference, it would free the tensors' Python objects and need the GIL,
    while ``destroy_process_group`` right after the last collective holds the GIL and joins that thread:
    a deadlock (seen at the end of a 2-rank run). Holding the last pair here keeps that release off the
    worker thread. Inside a :func:`signalprop._state.preserved` block the collective runs outside its
    dispatch mode, which would otherwise hand the collective's tensors to Python on the way.
    """
    import torch.distributed as dist

    from ._state import untracked

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.12
    with untracked():  # a collective writes no model state: not through the Python dispatch mode
        gather(out, vec)
    _IN_FLIGHT[:] = [out, vec]
