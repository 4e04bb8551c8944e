"""signalprop.fix.lsuv_ against the `lsuv` package (PyPI, LSUVinit) on a 50-layer plain CNN, batch 64.

Same run, same model (deep copies of one network), same batch, both with orthogonal pre-init. Prints each
one's wall time, the time in forward passes of the same model, and the worst per-layer |std - 1| of the
weight layers' outputs afterwards (measured the same way for both: population std over every element, eval
mode). The package is run with std_tol=0.01 (its default is 0.1) so both aim at the same tolerance.

    python bench/lsuv.py [--depth 50] [--width 32] [--batch 64] [--image 16] [--reps 3]

Timed in interleaved rounds (a forward pass, lsuv_, the package, ``--reps`` times) and reported as medians,
so a load spike hits one round of each rather than one contender: the ratio is what a busy machine keeps.

Goal: lsuv_ at least 10x faster than the package, every layer within 0.01.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import time
from pathlib import Path

import torch

import signalprop as sp


def _seconds(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--image", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    here = Path(__file__).resolve().parent  # this file is bench/lsuv.py: keep it from shadowing the package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    try:
        import lsuv
    except ImportError:
        raise SystemExit("the lsuv package is not installed: pip install lsuv") from None

    torch.manual_seed(0)
    base = sp.models.plain_cnn(args.depth, args.width)
    x = torch.randn(args.batch, 3, args.image, args.image)

    def forward() -> None:
        with torch.no_grad():
            base(x)

    def ours() -> torch.nn.Module:
        m = copy.deepcopy(base)
        sp.fix.lsuv_(m, x, target_std=1.0, tol=0.01)
        return m

    def theirs() -> torch.nn.Module:
        m = copy.deepcopy(base)
        with contextlib.redirect_stdout(io.StringIO()):
            lsuv.lsuv_with_singlebatch(m, x, needed_std=1.0, std_tol=0.01, max_attempts=10,
                                       do_orthonorm=True, verbose=False)
        return m

    forward()
    contenders = {"signalprop.fix.lsuv_": ours, "lsuv package": theirs}
    times: dict[str, list[float]] = {"forward": [], **{k: [] for k in contenders}}
    last: dict[str, torch.nn.Module] = {}
    for _ in range(args.reps):
        times["forward"] += [_seconds(forward) for _ in range(3)]
        for name, fn in contenders.items():
            times[name].append(_seconds(lambda name=name, fn=fn: last.__setitem__(name, fn())))  # type: ignore[misc]
    t_fwd = _median(times["forward"])
    print(f"plain CNN depth {args.depth}, width {args.width}, batch {args.batch}x3x{args.image}x{args.image}, "
          f"{torch.get_num_threads()} threads, medians of {args.reps} interleaved rounds; one forward pass: "
          f"{t_fwd * 1e3:.1f} ms (median of {len(times['forward'])})", flush=True)
    results = {}
    for name in contenders:
        t = _median(times[name])
        stds = sp.fix.output_stds(last[name], x)
        worst = max(abs(s - 1.0) for s in stds.values())
        results[name] = (t, worst, len(stds))
        print(f"  {name:22s} {t:8.3f} s = {t / t_fwd:6.1f} forward passes (rounds {min(times[name]):.3f}-"
              f"{max(times[name]):.3f} s); worst |std - 1| over {len(stds)} layers: {worst:.2e}", flush=True)
    ratio = results["lsuv package"][0] / results["signalprop.fix.lsuv_"][0]
    print(f"  speed-up: {ratio:.1f}x (goal >= 10x); every layer within 0.01: "
          f"{'yes' if results['signalprop.fix.lsuv_'][1] <= 0.01 else 'no'}")


if __name__ == "__main__":
    main()
