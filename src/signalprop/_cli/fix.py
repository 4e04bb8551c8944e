"""`signalprop fix TARGET --input-shape 3,224,224 [--method auto|lsuv] --out fixed.pt`.

Diagnoses the model on a random batch, fixes it (``auto``: :func:`signalprop.fix.auto_init_` from the
captured graph, with its plan printed; ``lsuv``: :func:`signalprop.fix.lsuv_` on that batch), diagnoses it
again and saves the fixed state dict. Exit status 0 when the diagnosis after the fix is clean, 1 when it
still has a warning or an error, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import sys

HELP = "re-initialize a model so its signal stays in range (auto_init_ or LSUV), diagnose before and after"

_DTYPES = ("float32", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "target",
        metavar="TARGET",
        help="path/to/file.py:factory or package.module:factory, e.g. signalprop.models:alexnet or "
        "\"signalprop.models:plain_cnn(depth=30, act='tanh')\"",
    )
    parser.add_argument("--input-shape", required=True, help="input shape without the batch, e.g. 3,224,224")
    parser.add_argument("--method", choices=("auto", "lsuv"), default="auto",
                        help="auto: a scheme per layer from the following activation (default); lsuv: data-driven")
    parser.add_argument("--residual", choices=("fixup", "zero", "none"), default="fixup",
                        help="residual branches under --method auto (default fixup)")
    parser.add_argument("--out", required=True, metavar="F", help="where to save the fixed state dict (torch.save)")
    parser.add_argument("--batch", type=int, default=16, help="batch size of the random input (default 16)")
    parser.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype of model and input")
    parser.add_argument("--weights", help="checkpoint to load first, with torch.load(weights_only=True)")
    parser.add_argument("--vocab", type=int,
                        help="feed integer token ids in [0, VOCAB) instead of N(0, 1) values (language models)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input and the init (default 0)")
    parser.add_argument("--quiet", action="store_true", help="print the findings only, not the layer tables")


def run(args: argparse.Namespace) -> int:
    import torch

    from .._errors import SignalpropError
    from ..diagnose import diagnose
    from ..fix import auto_init_, lsuv_run, plan
    from ._target import load_target, parse_shape

    shape = parse_shape(args.input_shape)
    if args.batch < 2:
        raise SignalpropError(f"--batch must be an integer >= 2 (a std needs a sample), got {args.batch}")
    if args.vocab is not None and args.vocab < 1:
        raise SignalpropError(f"--vocab must be a positive integer, got {args.vocab}")
    model = load_target(args.target, args.weights).to(dtype=getattr(torch, args.dtype))
    gen = torch.Generator().manual_seed(args.seed)
    if args.vocab is not None:
        x = torch.randint(0, args.vocab, (args.batch, *shape), generator=gen)
    else:
        x = torch.randn((args.batch, *shape), generator=gen, dtype=getattr(torch, args.dtype))
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:  # the user's forward on our input: a usage error, one line
        raise SignalpropError(
            f"the model's forward failed on an input of shape {tuple(x.shape)} ({x.dtype}): "
            f"{type(exc).__name__}: {_line(exc)}; check --input-shape, --dtype or --vocab"
        ) from None

    print("== before ==")
    before = diagnose(model, x)
    _show(before, args.quiet)

    residual = None if args.residual == "none" else args.residual
    init_gen = torch.Generator().manual_seed(args.seed)
    if args.method == "auto":
        p = plan(model, example_inputs=x, residual=residual)
        print(f"\n== plan ({len(p)} steps) ==")
        print(p.table())
        auto_init_(model, example_inputs=x, residual=residual, generator=init_gen)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(args.seed)
            result = lsuv_run(model, x)
        print(f"\n== lsuv: {len(result.layers)} layers, {result.passes} forward passes, worst |std - 1| "
              f"{result.worst:.2e}, converged: {result.converged} ==")
        for name, why in result.skipped.items():
            print(f"  skipped {name}: {why}")

    print("\n== after ==")
    after = diagnose(model, x)
    _show(after, args.quiet)
    torch.save(model.state_dict(), args.out)
    print(f"\nwrote {args.out} ({sum(t.numel() for t in model.state_dict().values())} values); "
          f"findings: {len(before.findings)} before, {len(after.findings)} after")
    return 0 if after.ok else 1


def _show(report, quiet: bool) -> None:  # type: ignore[no-untyped-def]
    if quiet:
        print(report.summary())
    else:
        report.table()
        if not report.findings:
            print(report.summary())
    for note in report.meta.get("notes", []):
        print(f"note: {note}", file=sys.stderr)


def _line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
