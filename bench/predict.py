"""How close sp.predict comes to sp.measure, and how long capture and predict take.

Accuracy: for each reference case, the mean over random nets of the measured variance divided by the mean
of the predicted one (``meta["expected_var"]``: what one network of that width measures), forward and backward, per module call (1.00 is exact; the prediction is an expectation
over weight draws, so it is compared with an arithmetic mean: a geometric mean would be biased low by about
s^2 / 2 in log, s the finite-width band's log-std). Timing:
capture, predict with a fresh capture, and predict reusing one captured graph, on AlexNet (224x224) and
plain_cnn(50) (32x32), in the same process; and predict on a deep MLP (``--depth``, width 256, graph
captured once) against one forward pass at batch 64, timed in interleaved rounds (the ratio is what a
loaded machine does not change). Run: ``.venv/bin/python bench/predict.py [--nets 8] [--depth 1000]``.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import signalprop as sp
from signalprop.graph import capture
from signalprop.prediction import predict


def _pool_net(padding: int = 1, he: bool = False) -> nn.Module:
    size = 4 if padding else 2
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=padding), nn.ReLU(), nn.AvgPool2d(2),
                        nn.Conv2d(32, 32, 3, padding=padding), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32 * size * size, 10)).eval()
    if he:
        sp.init.he_(net)
    return net


def _valid_cnn() -> nn.Module:
    """He-initialized CNN with unpadded convolutions (no border effects) and a global-average-pool head."""
    net = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    sp.init.he_(net)
    return net


CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "plain_cnn(8, 32) eval": (lambda: sp.models.plain_cnn(8, 32).eval(), (3, 16, 16)),
    "pool net eval": (_pool_net, (3, 16, 16)),
    "pool net, unpadded convs, He init": (lambda: _pool_net(0, True), (3, 14, 14)),
    "unpadded He CNN, global pool head": (_valid_cnn, (3, 16, 16)),
    "resnet (1,1) BN train": (lambda: sp.models.resnet((1, 1), 16).train(), (3, 16, 16)),
    "resnet (1,1) no norm eval": (lambda: sp.models.resnet((1, 1), 16, norm=False).eval(), (3, 16, 16)),
}


def ratios(make: Callable[[], nn.Module], shape: tuple[int, ...], nets: int, batch: int
           ) -> dict[str, tuple[float, float]]:
    sums: dict[str, list[float]] = {}
    graph = capture(make(), input_shape=shape)
    for _ in range(nets):
        model = make()
        p = predict(model, shape, graph=graph)
        m = sp.measure(model, torch.randn(batch, *shape))
        for a, b in zip(p, m):
            acc = sums.setdefault(a.name, [0.0, 0.0, 0.0, 0.0])
            for i, v in enumerate((b.fwd.var, a.meta["expected_var"], b.bwd.var, a.bwd.var)):
                acc[i] += v
    return {k: (v[0] / v[1], v[2] / v[3]) for k, v in sums.items()}


def timings() -> None:
    for label, model, shape in [("alexnet 224", sp.models.alexnet(), (3, 224, 224)),
                                ("plain_cnn(50) 32", sp.models.plain_cnn(50), (3, 32, 32))]:
        t0 = time.perf_counter()
        g = capture(model, input_shape=shape)
        t1 = time.perf_counter()
        predict(model, shape)
        t2 = time.perf_counter()
        predict(model, shape, graph=g)
        t3 = time.perf_counter()
        print(f"{label:18s} capture {t1 - t0:6.2f} s   predict {t2 - t1:6.2f} s   predict(graph=g) {t3 - t2:6.2f} s")


def depth_ratio(depth: int, rounds: int = 5) -> None:
    """sp.predict on a ``depth``-layer width-256 ReLU MLP (graph already captured) / one forward at batch 64.

    Interleaved rounds, medians. Also timed: reading the weights' mean squares alone (``mean_squares``, the
    floor any prediction from the weights pays), and predict on the same net with zero biases (one number
    per layer: the host-float path)."""
    from signalprop.prediction._rules import mean_squares

    model = sp.models.mlp(depth, 256)
    zero = sp.models.mlp(depth, 256)
    with torch.no_grad():
        for m in zero.modules():
            if isinstance(m, nn.Linear):
                m.bias.zero_()
    graph = capture(model, input_shape=(256,), methods=("fx",))
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    x = torch.randn(64, 256)
    predict(model, (256,), graph=graph)
    times: dict[str, list[float]] = {"predict": [], "predict, zero bias": [], "forward": [], "weights": []}
    for _ in range(rounds):
        for key, fn in (("predict", lambda: predict(model, (256,), graph=graph)),
                        ("forward", lambda: model(x)),
                        ("predict, zero bias", lambda: predict(zero, (256,), graph=graph)),
                        ("weights", lambda: mean_squares(weights))):
            t0 = time.perf_counter()
            with torch.no_grad():
                fn()
            times[key].append(time.perf_counter() - t0)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    f = med["forward"]
    print(f"mlp({depth}, 256), medians of {rounds} interleaved rounds, {torch.get_num_threads()} threads: forward at "
          f"batch 64 {f * 1e3:.1f} ms")
    for key in ("predict", "predict, zero bias", "weights"):
        print(f"  {key:20s} {med[key] * 1e3:8.1f} ms  ({med[key] / depth * 1e6:5.0f} us a layer)  "
              f"ratio to forward {med[key] / f:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--nets", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--only", default="", help="run the accuracy cases whose name contains this text")
    ap.add_argument("--depth", type=int, default=1000, help="depth of the MLP timed against a forward pass")
    args = ap.parse_args()
    torch.manual_seed(0)
    warnings.simplefilter("ignore")
    if not args.no_timing:
        t0 = time.perf_counter()
        capture(nn.Sequential(nn.Linear(2, 2)), input_shape=(2,))
        print(f"first export in this process: {time.perf_counter() - t0:.2f} s")
        timings()
        depth_ratio(args.depth)
    for name, (make, shape) in CASES.items():
        if args.only not in name:
            continue
        print(f"\n{name}: measured / predicted variance, mean over {args.nets} nets (fwd, bwd)")
        for layer, (f, b) in ratios(make, shape, args.nets, args.batch).items():
            print(f"  {layer:22s} {f:6.2f} {b:6.2f}")


if __name__ == "__main__":
    main()
