"""sp.measure under torch.distributed: 2 CPU processes on gloo, each measuring half of a batch, must both
get what one process measures on the whole batch."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import signalprop as sp

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _close(a: float, b: float) -> bool:
    if math.isnan(a) and math.isnan(b):
        return True
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9)


def _worker(rank: int, port: int, sizes: tuple[int, ...]) -> None:
    """Rank r measures rows sum(sizes[:r]) : sum(sizes[:r+1]) of one batch; the whole batch is measured locally."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = sp.models.plain_cnn(3, 8)
        x = torch.randn(sum(sizes), 3, 16, 16)
        x[0, 0, 0, 0] = float("nan")  # non-finite on rank 0 only: both ranks must take the careful pass
        whole = sp.measure(model, x, distributed=False, histograms=True, hist_bins=8)
        part = sp.measure(model, x.split(list(sizes))[rank], histograms=True, hist_bins=8)
        assert part.meta["world_size"] == WORLD and part.meta["batch_size"] == x.shape[0]
        assert part.meta["passes"] == whole.meta["passes"] == 3
        assert part.names == whole.names
        for a, b in zip(part, whole):
            for sa, sb in ((a.fwd, b.fwd), (a.bwd, b.bwd)):
                assert sa is not None and sb is not None
                assert sa.numel == sb.numel and sa.zero_frac == sb.zero_frac, a.name
                assert sa.absmax == sb.absmax and sa.nonfinite_frac == sb.nonfinite_frac, a.name
                for field in ("mean", "var", "rms", "chan_sq_mean", "chan_var"):
                    assert _close(getattr(sa, field), getattr(sb, field)), (a.name, field)
                assert sa.hist is not None and sb.hist is not None
                assert sa.hist.counts == sb.hist.counts, a.name
        assert whole[0].fwd.nonfinite_frac > 0
    finally:
        # Both ranks leave together: a rank that tears gloo down while its peer is still inside the last
        # collective's exchange aborts that peer ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch() -> None:
    mp.spawn(_worker, args=(_free_port(), (4, 4)), nprocs=WORLD, join=True)


def test_uneven_batches_report_the_true_total_and_match_one_process() -> None:
    """Ranks holding 3 and 5 samples: batch_size is 8 (not 2 x the local batch), and each rank's cotangent is
    its own rows of the draw for the whole batch, so the gradients match a single process too."""
    mp.spawn(_worker, args=(_free_port(), (3, 5)), nprocs=WORLD, join=True)
