"""How much a Monitor slows a real training step: the same loop with and without it, in the same run.

Model: a plain 20-layer, 32-channel ReLU CNN (He init), batch 32 of 3x32x32, SGD with momentum, cross
entropy; 43 module calls a step, so 86 tensors (outputs and output gradients) to reduce. Plain and
monitored steps of two identical models run in adjacent pairs (see :func:`paired`) and the median of the per-pair ratios is printed
for each Monitor setting. The goal: at most 1.10x on CPU with ``every=1``.

The same run also times a *floor*: hooks on the same module calls that do only what exact non-finite
detection cannot avoid, one sum over every element of every output and output gradient, and one host
transfer per step (no statistics, no parameter norms). The Monitor's ratio against the floor's says how
close it gets to that limit.

Allocator: with glibc's default settings a freed 4 MB activation is often handed back to the kernel and
the next one page-faults anew, which makes the plain step itself slower and its time noisier (here 190-290
ms instead of 160-170 ms). ``--steady-allocator`` re-runs the benchmark with glibc told to keep freed memory
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``), the setting under which a
ratio is least flattered by a slow baseline; ``make bench`` runs both. Each line also gives the minor page
faults a step of the plain and the watched loop: under glibc's defaults they swing a ratio by 100 ms a
step either way, whichever loop happens to re-touch the memory glibc gave back.

    python bench/monitor.py [--pairs 20] [--threads 2] [--exact] [--steady-allocator]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
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


class Floor:
    """The least a per-layer non-finite watcher must do: one full sum per tensor, one transfer per step."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.sums: list[torch.Tensor] = []
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.history: list[torch.Tensor] = []

    def __enter__(self) -> Floor:
        for m in self.model.modules():
            if not list(m.children()):
                self.handles.append(m.register_forward_hook(self._hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()

    def _hook(self, mod: nn.Module, args: object, out: torch.Tensor) -> None:
        self.sums.append(out.detach().sum())
        if out.requires_grad:
            out.register_hook(lambda g: self.sums.append(g.sum()) and None)

    def step(self) -> None:
        self.history.append(torch.stack(self.sums).cpu())
        self.sums = []


def timed(step: Callable[[], None], after: Callable[[], None] | None = None) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, minor page faults) of one step. CPU time is the steadier of the
    two on a shared machine; the page faults tell a step that re-touched memory the allocator gave back."""
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    if after is not None:
        after()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


def paired(
    plain: Callable[[], None], monitored: Callable[[], None], mon: Monitor | Floor, pairs: int
) -> list[tuple[float, float, float, int, int]]:
    """Per pair: (monitored / plain) wall and CPU ratios of two adjacent steps, the wall milliseconds the
    monitored one took more and the page faults of each (plain, monitored), the order alternating, so that load on the machine, which drifts over seconds,
    hits both sides of each ratio alike. The added milliseconds compare across hosts of different speed,
    where the ratio follows the plain step's.

    The two loops train two identical models (same seed, same data); the monitored one runs inside an open
    Monitor the whole time, as in real use, so each monitored step pays for everything a training run pays
    for per step: the hooks, the reductions, ``mon.step()`` with its parameter norms, the one host transfer
    and building the Record. Attaching the hooks (once per run) is not timed."""
    out = []
    for i in range(pairs):
        if i % 2:
            p = timed(plain)
            m = timed(monitored, mon.step)
        else:
            m = timed(monitored, mon.step)
            p = timed(plain)
        out.append((m[0] / p[0], m[1] / p[1], (m[0] - p[0]) * 1e3, p[2], m[2]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--exact", action="store_true", help="also time sample=None (exact statistics)")
    ap.add_argument("--steady-allocator", action="store_true",
                    help="re-run with glibc keeping freed memory (no page faults from returned activations)")
    args = ap.parse_args()
    if args.steady_allocator and os.environ.get("MALLOC_TRIM_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 32), MALLOC_TRIM_THRESHOLD_=str(1 << 36),
                   MALLOC_TOP_PAD_=str(1 << 30))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)  # glibc reads these at start-up only
    if args.steady_allocator:
        print("steady allocator: MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_ set")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    settings: dict[str, dict[str, object]] = {
        "every=1 (sample 16384)": {"every": 1},
    }
    if args.exact:
        settings["every=1, sample=None (exact)"] = {"every": 1, "sample": None}
    _, plain = make_loop()
    model, monitored = make_loop()
    results = {}
    with Floor(model) as floor:
        paired(plain, monitored, floor, 2)
        results["floor: one full sum per tensor"] = paired(plain, monitored, floor, args.pairs)
    for name, kw in settings.items():
        with Monitor(model, **kw) as mon:  # type: ignore[arg-type]
            paired(plain, monitored, mon, 2)  # warm-up: allocator, kernels, the first record
            base = [timed(plain) for _ in range(3)]
            results[name] = paired(plain, monitored, mon, args.pairs)
            kept = (len(mon.history), len(mon.history[-1].trace), len(mon.history[-1].params))
        if name.startswith("every=1 (sample"):
            print(f"plain 20-layer CNN training step: median {statistics.median(b[0] for b in base) * 1e3:.1f} ms "
                  f"wall, {statistics.median(b[1] for b in base) * 1e3:.1f} ms CPU ({args.threads} threads)")
            print(f"  records kept by the every=1 monitor: {kept[0]}; {kept[1]} calls and {kept[2]} parameters each")
    for name, r in results.items():
        w = sorted(x[0] for x in r)
        c = sorted(x[1] for x in r)
        added = statistics.median(x[2] for x in r)
        print(f"  {'Monitor(' + name + ')' if not name.startswith('floor') else name:<38} median over {args.pairs} step pairs: wall ratio {statistics.median(w):.3f}x "
              f"(quartiles {w[len(w) // 4]:.3f}-{w[3 * len(w) // 4]:.3f}), CPU ratio {statistics.median(c):.3f}x "
              f"(quartiles {c[len(c) // 4]:.3f}-{c[3 * len(c) // 4]:.3f}), {added:+.1f} ms a step; page faults a step "
              f"{statistics.median(x[3] for x in r):.0f} plain, {statistics.median(x[4] for x in r):.0f} watched")


if __name__ == "__main__":
    main()
