"""`signalprop diagnose TARGET --input-shape 3,224,224`: measure a model on random inputs and report.

Exit status 0 when no finding is a warning or an error, 1 when one is (so it fits a CI pipeline), 2 for
usage errors (bad target, missing factory, bad shape, a forward that fails on the given shape).
"""

from __future__ import annotations

import argparse
import sys

HELP = "measure a model on random inputs and report exploding, vanishing, dead or saturated layers"

_DTYPES = ("float32", "float64", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="path/to/file.py:factory or package.module:factory, e.g. signalprop.models:alexnet or "
        "\"signalprop.models:plain_cnn(depth=30, act='tanh')\"",
    )
    parser.add_argument("--input-shape", required=True, help="input shape without the batch, e.g. 3,224,224")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the random input (default 16)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype of model and input")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--weights", help="checkpoint to load with torch.load(weights_only=True)")
    parser.add_argument(
        "--vocab",
        type=int,
        help="feed integer token ids in [0, VOCAB) instead of N(0, 1) values (language models)",
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
    from ..diagnose import diagnose
    from ._target import load_target, parse_shape

    shape = parse_shape(args.input_shape)
    if args.batch < 1:
        raise SignalpropError(f"--batch must be a positive integer, got {args.batch}")
    if args.vocab is not None and args.vocab < 1:
        raise SignalpropError(f"--vocab must be a positive integer, got {args.vocab}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SignalpropError(f"bad --device {args.device!r}: use cpu, cuda, cuda:1, mps, ...") from None
    dtype = getattr(torch, args.dtype)
    model = load_target(args.target, args.weights)
    try:
        model = model.to(device=device, dtype=dtype)  # integer buffers (token ids, positions) keep their dtype
    except (RuntimeError, AssertionError) as exc:
        raise SignalpropError(f"cannot move the model to {device} / {args.dtype}: {_line(exc)}") from None
    model.train(args.train)
    gen = torch.Generator().manual_seed(args.seed)
    if args.vocab is not None:
        x = torch.randint(0, args.vocab, (args.batch, *shape), generator=gen).to(device)
    else:
        x = torch.randn((args.batch, *shape), generator=gen).to(device=device, dtype=dtype)
    try:
        with torch.no_grad():
            model(x)
    except Exception as exc:  # the user's forward on our input: a usage error (shape, dtype), one line
        raise SignalpropError(
            f"the model's forward failed on an input of shape {tuple(x.shape)} ({x.dtype}): "
            f"{type(exc).__name__}: {_line(exc)}; check --input-shape, --dtype or --vocab"
        ) from None
    report = diagnose(model, x, factor=args.factor, predicted=not args.no_predict)
    if args.quiet:
        print(report.summary())
    else:
        report.table()
        if not report.findings:
            print(report.summary())
    for note in report.meta.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        report.to_json(args.json)
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    if args.html:
        report.to_html(args.html)
        print(f"wrote {args.html}")
    return 0 if report.ok else 1


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
