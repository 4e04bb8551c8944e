"""How much does ``sp.measure`` cost next to the work it must do anyway? Same run, ratios printed.

Model: ``sp.models.plain_cnn(50, 32)``, He-initialized, on a batch of 32 RGB 32x32 images (1 M-element
activations).
Compared, each timed as the median of interleaved repetitions (so that load from other processes hits every
variant alike):

(a) baseline: a plain forward + ``torch.autograd.grad(out, x, cot)`` with ``x`` requiring grad -- the same
    gradient work measure does (gradients with respect to activations, none for weights; docs/design.md, "What a
    fair overhead ratio compares with");
(b) a hook collector that syncs per layer with ``.item()`` (mean, std, absmax, zero fraction of each output
    and output gradient, the way common activation-statistics callbacks work);
(c) TorchLens (``torchlens.trace``, saving every output), which records every tensor operation of the
    forward pass; printed as "unavailable" with the reason when it cannot run here;
and ``sp.measure(model, x)`` itself. The target: measure <= 1.3x (a); aim for 1.1x. The physical
limit is one read of each activation and gradient plus one host sync: the "reads" line times exactly
that (a ``sum`` of every recorded tensor, on top of (a)).

Run: ``python bench/measure_overhead.py [--reps 15] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import signalprop as sp


def baseline(model: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> None:
    xx = x.detach().requires_grad_(True)
    out = model(xx)
    torch.autograd.grad(out, xx, cot)


def reads(model: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> None:
    """The floor: one sum per output and per output gradient, one stack and one transfer at the end."""
    sums: list[torch.Tensor] = []

    def fwd(m: nn.Module, a: object, o: torch.Tensor) -> None:
        sums.append(o.detach().sum())
        o.register_hook(lambda g: sums.append(g.sum()))

    hs = [m.register_forward_hook(fwd) for m in model.modules() if next(m.children(), None) is None]
    try:
        baseline(model, x, cot)
        torch.stack(sums).cpu()
    finally:
        for h in hs:
            h.remove()


def item_collector(model: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> None:
    """Per-layer .item() syncs, the way typical callbacks collect activation statistics."""
    stats: list[tuple[float, float, float, float]] = []

    def summarize(t: torch.Tensor) -> None:
        t = t.detach()
        stats.append((t.mean().item(), t.std().item(), t.abs().max().item(), (t == 0).float().mean().item()))

    def fwd(m: nn.Module, a: object, o: torch.Tensor) -> None:
        summarize(o)
        o.register_hook(lambda g: summarize(g))

    hs = [m.register_forward_hook(fwd) for m in model.modules() if next(m.children(), None) is None]
    try:
        baseline(model, x, cot)
    finally:
        for h in hs:
            h.remove()


def torchlens_variant() -> tuple[Callable[[nn.Module, torch.Tensor, torch.Tensor], None] | None, str]:
    """TorchLens records every tensor op of the forward pass (``torchlens.trace``, saving all outputs).

    Its torch-function wrappers are removed after each call (``unwrap_when_done=True``), so that they do not
    slow down the other variants timed in the same process.
    """
    try:
        import torchlens as tl
        from torchlens.options import CaptureOptions
    except Exception as e:  # noqa: BLE001 - any import failure means "unavailable here"
        return None, f"import failed: {type(e).__name__}: {e}"

    def run(model: nn.Module, x: torch.Tensor, cot: torch.Tensor) -> None:
        tl.trace(model, x, capture=CaptureOptions(unwrap_when_done=True))

    return run, ""


def _torchlens_cleanup() -> None:
    import gc

    import torchlens as tl

    tl.clear_capture_cache()
    gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=50)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip-torchlens", action="store_true", help="leave out the slow TorchLens peer")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = sp.models.plain_cnn(args.depth, 32)
    for m in model.modules():  # He init keeps signal and gradients in range (no subnormal slow-down)
        if isinstance(m, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    x = torch.randn(args.batch, 3, 32, 32)
    with torch.no_grad():
        cot = torch.randn_like(model(x))

    variants: dict[str, Callable[[], object]] = {
        "(a) forward + autograd.grad(out, x)": lambda: baseline(model, x, cot),
        "floor: one sum per tensor, one sync": lambda: reads(model, x, cot),
        "sp.measure": lambda: sp.measure(model, x),
        "(b) hooks with per-layer .item()": lambda: item_collector(model, x, cot),
    }
    for f in variants.values():  # warm-up: lazy imports, allocator
        f()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.reps):
        for k, f in variants.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    # TorchLens keeps a lot per call (it saves every op's output): timed after the others, a few times,
    # with its caches cleared in between, against the same baseline.
    tl_run, why = torchlens_variant() if not args.skip_torchlens else (None, "--skip-torchlens given")
    tl_name = "(c) torchlens.trace (forward only, saves all)"
    if tl_run is not None:
        try:
            tl_times = []
            for _ in range(max(2, args.reps // 3)):
                t0 = time.perf_counter()
                tl_run(model, x, cot)
                tl_times.append(time.perf_counter() - t0)
                _torchlens_cleanup()
            times[tl_name] = tl_times[1:]
        except Exception as e:  # noqa: BLE001 - report why the peer cannot run, keep the rest
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    base = statistics.median(times["(a) forward + autograd.grad(out, x)"])
    print(f"plain_cnn({args.depth}, 32), batch {args.batch}x3x32x32, {args.threads} threads, "
          f"{args.reps} interleaved reps, medians (min in brackets)")
    for k, ts in times.items():
        med = statistics.median(ts)
        print(f"  {k:48s} {med * 1e3:8.1f} ms [{min(ts) * 1e3:7.1f}]  {med / base:5.2f}x")
    if tl_name not in times:
        print(f"  (c) torchlens: unavailable here ({why})")
    ratio = statistics.median(times["sp.measure"]) / base
    floor = statistics.median(times["floor: one sum per tensor, one sync"]) / base
    print(f"measure / baseline = {ratio:.2f}x (target <= 1.3x, aim 1.1x); floor = {floor:.2f}x")


if __name__ == "__main__":
    main()
