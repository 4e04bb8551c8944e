"""Monitor under torch.distributed: 2 gloo processes, each with half the batch, record whole-batch statistics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import signalprop as sp
from signalprop.monitor import Monitor
from signalprop.trace import Trace

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

WORLD = 2
BATCH = 8  # per rank


def _model() -> nn.Module:
    torch.manual_seed(0)
    return sp.models.plain_cnn(3, 4)


def _batch() -> torch.Tensor:
    return torch.randn(WORLD * BATCH, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def _run(model: nn.Module, x: torch.Tensor, sample: int | None, steps: int = 2) -> Monitor:
    """Sum loss: each rank's output gradients equal the single process's on the same rows."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with Monitor(model, sample=sample) as mon:
        for _ in range(steps):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            mon.step()
    return mon


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model())
        x = _batch()[rank * BATCH : (rank + 1) * BATCH]
        exact = _run(model, x, sample=None)
        sampled = _run(model, x, sample=32)
        # step 0: before any update (DDP averages parameter gradients, one process sums them)
        exact.history[0].trace.to_json(Path(out_dir) / f"exact{rank}.json")
        sampled.history[0].trace.to_json(Path(out_dir) / f"sampled{rank}.json")
        assert exact.history[0].trace.meta["world_size"] == WORLD
    finally:
        # Both ranks leave together: a rank that tears gloo down while its peer is still inside the last
        # collective's exchange aborts that peer ("terminate called without an active exception").
        dist.barrier()
        dist.destroy_process_group()


def test_each_rank_sees_the_statistics_of_the_concatenated_batch(tmp_path: Path) -> None:
    # fork: the children reuse this process's imports (spawn would import torch again, seconds each)
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    single = _run(_model(), _batch(), sample=None).history[0].trace
    for rank in range(WORLD):
        got = Trace.from_json(tmp_path / f"exact{rank}.json")
        assert [n.removeprefix("module.") for n in got.names] == single.names
        for a, b in zip(got, single):
            for part in ("fwd", "bwd"):
                sa, sb = getattr(a, part), getattr(b, part)
                assert sa.numel == sb.numel, (a.name, part)
                for field in ("mean", "std", "absmax", "zero_frac", "chan_var"):
                    assert getattr(sa, field) == pytest.approx(getattr(sb, field), rel=1e-4, abs=1e-7), (a.name, part, field)
        sampled = Trace.from_json(tmp_path / f"sampled{rank}.json")
        assert sampled.names == got.names
        assert [x.fwd.numel for x in sampled] == [x.fwd.numel for x in got]  # counts of the whole batch
        assert all(x.fwd.finite and x.fwd.std > 0 for x in sampled)
    assert Trace.from_json(tmp_path / "exact0.json") == Trace.from_json(tmp_path / "exact1.json")
