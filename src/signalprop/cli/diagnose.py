"""`signalprop diagnose TARGET --input-shape 3,224,224`: measure a model on random inputs and report.

Exit status 0 when no finding is a warning or an error, 1 when one is (so it fits a CI pipeline), 2 for
usage errors (bad target, missing factory, bad shape, a forward that fails on the given shape, an output
path that cannot be written), 3 when signalprop itself fails. Missing folders of ``--json``, ``--html``
and ``--plot`` are created.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ._args import add_input_arguments, add_target_arguments

HELP = "measure a model on random inputs and report exploding, vanishing, dead or saturated layers"

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    add_input_arguments(
        parser, dtypes=_DTYPES, device=True, weights_help="checkpoint to load with torch.load(weights_only=True)"
    )
    parser.add_argument("--factor", type=float, default=10.0, help="allowed std drift factor (default 10)")
    parser.add_argument("--train", action="store_true", help="measure in train mode (default: eval mode)")
    parser.add_argument("--no-predict", action="store_true", help="skip the data-free prediction and its band")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input (default 0)")
    parser.add_argument("--html", metavar="F", help="write a self-contained HTML report to F")
    parser.add_argument("--json", metavar="F", help="write the report as JSON to F (Report.from_json reads it)")
    parser.add_argument("--plot", metavar="F", help="write the std-per-layer plot to F (png, svg, pdf)")
    parser.add_argument("--quiet", action="store_true", help="print only the findings, not the layer table")


def run(args: argparse.Namespace) -> int:
    import torch

    from .._errors import SignalpropError
    from ..diagnosis import diagnose
    from ._target import (
        check_forward,
        check_input_arguments,
        first_line,
        load_target,
        output_path,
        random_input,
        show_report,
        write_output,
    )

    shape = check_input_arguments(args)
    outputs = [(opt, path) for opt, path in (("--json", args.json), ("--plot", args.plot), ("--html", args.html))
               if path]
    for opt, path in outputs:
        output_path(path, opt)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SignalpropError(f"bad --device {args.device!r}: use cpu, cuda, cuda:1, mps, ...") from None
    dtype = getattr(torch, args.dtype)
    model = load_target(args.target, args.weights)
    try:
        model = model.to(device=device, dtype=dtype)  # integer buffers (token ids, positions) keep their dtype
    except (RuntimeError, AssertionError) as exc:
        raise SignalpropError(f"cannot move the model to {device} / {args.dtype}: {first_line(exc)}") from None
    model.train(args.train)
    x = random_input(args, shape, dtype=dtype, device=device)
    check_forward(model, x)
    report = diagnose(model, x, factor=args.factor, predicted=not args.no_predict)
    show_report(report, args.quiet)
    writers: dict[str, Callable[[str], Any]] = {
        "--json": report.to_json, "--plot": report.plot, "--html": report.to_html
    }
    for opt, path in outputs:
        write_output(path, opt, writers[opt])
    return 0 if report.ok else 1

