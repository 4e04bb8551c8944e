"""How much a Monitor slows a real training step: the same loop with and without it, in the same run.

Model: a plain 20-layer, 32-channel ReLU CNN (He init), batch 32 of 3x32x32, SGD with momentum, cross
entropy; 43 module calls a step, so 86 tensors (outputs and output gradients) to reduce. Plain and
monitored steps run in adjacent pairs (see :func:`paired`) and the median of the per-pair ratios is printed
for each Monitor setting. The goal (issue 6): at most 1.10x on CPU with ``every=1``.

    python bench/monitor.py [--pairs 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import signalprop as sp
from signalprop.monitor import Monitor


def make_loop(seed: int = 0) -> tuple[nn.Module, Callable[[], None]]:
    torch.manual_seed(seed)
    model = sp.models.plain_cnn(20, 32)
    sp.init.he_(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))

    def step() -> None:
        opt.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return model, step


def timed(step: Callable[[], None], after: Callable[[], None] | None = None) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step. CPU time is the steadier of the two on a shared machine."""
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    if after is not None:
        after()
    return time.perf_counter() - t0, time.process_time() - c0


def paired(step: Callable[[], None], mon: Monitor, pairs: int) -> list[tuple[float, float]]:
    """Per pair: (monitored / plain) wall and CPU ratios of two adjacent steps, the order alternating, so that
    load on the machine, which drifts over seconds, hits both sides of each ratio alike. The monitored step
    includes attaching and removing the hooks and the host transfer (``close`` flushes): a slight
    overestimate."""
    out = []
    for i in range(pairs):
        def monitored() -> tuple[float, float]:
            mon.start()
            try:
                return timed(step, mon.step)
            finally:
                mon.close()
        if i % 2:
            p = timed(step)
            m = monitored()
        else:
            m = monitored()
            p = timed(step)
        out.append((m[0] / p[0], m[1] / p[1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    settings: dict[str, dict[str, object]] = {
        "every=1 (sample 16384)": {"every": 1},
        "every=1, sample=None (exact)": {"every": 1, "sample": None},
    }
    model, step = make_loop()
    monitors = {name: Monitor(model, **kw) for name, kw in settings.items()}  # type: ignore[arg-type]
    for mon in monitors.values():  # warm-up: allocator, kernels, the first record
        paired(step, mon, 2)
    base = [timed(step) for _ in range(3)]
    print(f"plain 20-layer CNN training step: median {statistics.median(b[0] for b in base) * 1e3:.1f} ms wall, "
          f"{statistics.median(b[1] for b in base) * 1e3:.1f} ms CPU ({args.threads} threads)")
    for name, mon in monitors.items():
        r = paired(step, mon, args.pairs)
        w = sorted(x[0] for x in r)
        c = sorted(x[1] for x in r)
        print(f"  Monitor({name:<28}) median over {args.pairs} step pairs: wall ratio {statistics.median(w):.3f}x "
              f"(quartiles {w[len(w) // 4]:.3f}-{w[3 * len(w) // 4]:.3f}), CPU ratio {statistics.median(c):.3f}x "
              f"(quartiles {c[len(c) // 4]:.3f}-{c[3 * len(c) // 4]:.3f})")
    mon = monitors["every=1 (sample 16384)"]
    print(f"  records kept by the every=1 monitor: {len(mon.history)}; "
          f"{len(mon.history[-1].trace)} calls and {len(mon.history[-1].params)} parameters each")


if __name__ == "__main__":
    main()
