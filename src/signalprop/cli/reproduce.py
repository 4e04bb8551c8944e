"""`signalprop reproduce {he2015,glorot2010,criticality,xiao2018,all}`: re-run the papers' evidence on bundled data."""

from __future__ import annotations

import argparse

HELP = ("re-run the papers' evidence (He 2015, Glorot & Bengio 2010, Schoenholz 2017, Xiao 2018) on scikit-learn's "
        "bundled digits; writes PNG + JSON")

_NAMES = ("he2015", "glorot2010", "criticality", "xiao2018")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", choices=(*_NAMES, "all"),
                        help="he2015: xavier vs He on 22/30-layer ReLU CNNs; glorot2010: tanh activation and "
                             "gradient histograms; criticality: tanh phase diagram and c-map check; xiao2018: "
                             "delta-orthogonal vs Gaussian on a 1,000-layer tanh CNN (100 with --quick); all: the four")
    parser.add_argument("--out", default="signalprop-reproduce",
                        help="folder for the PNG and JSON files (created; default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="small versions of seconds to a minute or two (what the tests run); the full ones take minutes, "
                             "xiao2018's about 5 on a CPU")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Run the chosen experiments; exit 0 when every paper's claim held, 1 when one did not."""
    from .._errors import SignalpropError
    from ..experiments import EXPERIMENTS

    if args.seed < 0:
        raise SignalpropError(f"--seed must be a non-negative integer, got {args.seed}")
    names = _NAMES if args.experiment == "all" else (args.experiment,)
    ok = True
    for name in names:
        result = EXPERIMENTS[name].run(out=args.out, quick=args.quick, seed=args.seed, progress=not args.quiet)
        print(result.summary(), flush=True)
        ok = ok and result.ok
    if not ok:
        print("signalprop reproduce: some of the papers' claims did not hold in this run (see FAILED above)")
    return 0 if ok else 1
