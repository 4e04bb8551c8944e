"""`signalprop fix TARGET --input-shape 3,224,224 [--method auto|lsuv] --out fixed.pt`.

Diagnoses the model on a random batch, fixes it (``auto``: :func:`signalprop.fix.auto_init_` from the
captured graph, with its plan printed; ``lsuv``: :func:`signalprop.fix.lsuv_` on that batch), diagnoses it
again and saves the fixed state dict (the folder of ``--out`` is created when missing). Exit status 0 when
the diagnosis after the fix is clean, 1 when it still has a warning or an error, 2 for usage errors, 3 when
signalprop itself fails.
"""

from __future__ import annotations

import argparse

from ._args import add_input_arguments, add_target_arguments

HELP = "re-initialize a model so its signal stays in range (auto_init_ or LSUV), diagnose before and after"

_DTYPES = ("float32", "float64")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.add_argument("--method", choices=("auto", "lsuv"), default="auto",
                        help="auto: a scheme per layer from the following activation (default); lsuv: data-driven")
    parser.add_argument("--residual", choices=("fixup", "zero", "none"), default="fixup",
                        help="residual branches under --method auto (default fixup)")
    parser.add_argument("--out", required=True, metavar="F", help="where to save the fixed state dict (torch.save)")
    add_input_arguments(
        parser, dtypes=_DTYPES, weights_help="checkpoint to load first, with torch.load(weights_only=True)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random input and the init (default 0)")
    parser.add_argument("--quiet", action="store_true", help="print the findings only, not the layer tables")


def run(args: argparse.Namespace) -> int:
    import torch

    from ..diagnosis import diagnose
    from ..fix import auto_init_, lsuv_run, plan
    from ._target import (
        check_forward,
        check_input_arguments,
        load_target,
        output_path,
        random_input,
        show_report,
        write_output,
    )

    shape = check_input_arguments(args, min_batch=2)
    output_path(args.out, "--out")
    dtype = getattr(torch, args.dtype)
    model = load_target(args.target, args.weights).to(dtype=dtype)
    x = random_input(args, shape, dtype=dtype, draw_dtype=dtype)
    check_forward(model.eval(), x)

    print("== before ==")
    before = diagnose(model, x)
    show_report(before, args.quiet)

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
    show_report(after, args.quiet)
    write_output(args.out, "--out", lambda path: torch.save(model.state_dict(), path), announce=False)
    print(f"\nwrote {args.out} ({sum(t.numel() for t in model.state_dict().values())} values); "
          f"findings: {len(before.findings)} before, {len(after.findings)} after")
    return 0 if after.ok else 1

