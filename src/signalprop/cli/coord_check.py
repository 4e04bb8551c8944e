"""`signalprop coord-check`: each layer's coordinate size over widths, standard parametrization against muP."""

from __future__ import annotations

import argparse

HELP = ("train an MLP at several widths for a few steps and plot each layer's coordinate size: flat under muP "
        "(sp.fix.mup_), drifting under the standard parametrization; writes PNG + JSON")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048, 4096],
                        help="widths to compare (default: 2^6 .. 2^12)")
    parser.add_argument("--depth", type=int, default=3, help="hidden layers of the MLP (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="training steps (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2, help="learning rate at the base width (default: %(default)s)")
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--base-width", type=int, default=64, help="muP's base width (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds averaged (default: %(default)s)")
    parser.add_argument("--out", default="signalprop-coord-check",
                        help="folder for coord_check.png and coord_check.json (created; default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    """Run both parametrizations; exit 0 when muP's coordinates stay within 1.3x over the widths, else 1."""
    import json
    from pathlib import Path

    import torch

    from .._errors import SignalpropError
    from ..fix.coords import coord_check, plot_coord_check
    from ..models import mlp

    if args.depth < 1 or args.steps < 1 or args.seeds < 1 or args.base_width < 1 or args.lr <= 0:
        raise SignalpropError("--depth, --steps, --seeds, --base-width and --lr must be positive")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))

    def make(width: int) -> torch.nn.Module:
        return mlp(args.depth, width, in_features=32, out_features=16)

    kw = {"widths": tuple(args.widths), "steps": args.steps, "lr": args.lr, "optimizer": args.optimizer,
          "base_width": args.base_width, "seeds": tuple(range(args.seeds))}
    checks = [coord_check(make, x, parametrization=p, **kw) for p in ("sp", "mup")]
    png = plot_coord_check(checks, out / "coord_check.png")
    (out / "coord_check.json").write_text(json.dumps([c.to_dict() for c in checks], indent=1))
    for c in checks:
        spread = c.spread()
        worst = max(spread, key=lambda k: spread[k])
        print(f"{c.parametrization:>3}: after {c.steps} steps, max/min of each layer's mean |output| over widths "
              f"{c.widths[0]}..{c.widths[-1]}: " + ", ".join(f"{k} {v:.2f}x" for k, v in spread.items())
              + f" (worst: {worst})")
    print(f"wrote {png} and {out / 'coord_check.json'}")
    return 0 if max(checks[1].spread().values()) <= 1.3 else 1
