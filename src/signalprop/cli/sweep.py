"""`signalprop sweep`: every init scheme's signal and gradient over a depth x width grid, as heat maps + JSON."""

from __future__ import annotations

import argparse

HELP = ("each init scheme's last-layer std and first-layer gradient std over depths x widths for one family "
        "(mlp, cnn, resnet, prenorm, postnorm), measured or predicted per cell; writes a heat map PNG and JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", default="mlp", help="mlp, cnn, resnet, prenorm or postnorm (default: mlp)")
    parser.add_argument("--depths", type=int, nargs="+", default=[10, 100, 1000],
                        help="weight layers per network (default: 10 100 1000)")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 256], help="default: 64 256")
    parser.add_argument("--schemes", nargs="+", default=None,
                        help="any of default glorot lecun he orthogonal auto (default: all)")
    parser.add_argument("--batch", type=int, default=16, help="samples per measurement (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="signalprop-sweep",
                        help="folder for sweep_FAMILY.png and .json (created; default: %(default)s)")
    parser.add_argument("--method", default="auto", choices=["auto", "predict", "measure"],
                        help="auto: measure up to --measure-depth, predict deeper mlp/cnn cells (sp.predict); "
                        "predict or measure: every cell (default: auto)")
    parser.add_argument("--measure-depth", type=int, default=300,
                        help="with --method auto, the deepest cell measured (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Run the sweep and print one line per scheme: the worst last-layer and first-gradient std over the grid."""
    import math

    from .._errors import SignalpropError
    from ..experiments.sweep import SCHEMES, sweep

    if any(d < 2 for d in args.depths) or any(w < 1 for w in args.widths) or args.batch < 1:
        raise SignalpropError("--depths must be >= 2, --widths and --batch >= 1")
    r = sweep(args.family, depths=args.depths, widths=args.widths, schemes=args.schemes or SCHEMES, batch=args.batch,
              seed=args.seed, progress=not args.quiet, out=args.out, method=args.method,
              measure_depth=args.measure_depth)

    def worst(grid: list[list[float]]) -> float:
        return max((abs(math.log10(v)) if v > 0 else math.inf for row in grid for v in row), default=math.nan)

    for s in r.schemes:
        print(f"{s:>10}: worst |log10 std| over the grid: forward {worst(r.forward[s]):.2f}, "
              f"gradient {worst(r.gradient[s]):.2f}")
    cells = [v for g in r.source.values() for row in g for v in row]
    print(f"{cells.count('predicted')} of {len(cells)} cells predicted, the rest measured")
    print(f"wrote {args.out}/sweep_{args.family}.png and .json in {r.seconds:.0f} s")
    return 0
