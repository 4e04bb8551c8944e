"""`signalprop` command line: a thin dispatcher; each sub-command lives in ``signalprop.cli.<name>``.

Each sub-command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``
and imports heavy libraries (matplotlib, rich, transformers) inside ``run`` only.
Exit status: 0 clean, 1 when a diagnosis found a warning or an error, 2 for usage errors (one-line reason).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .._errors import SignalpropError
from .._version import __version__

COMMANDS: dict[str, str] = {
    "demo": "signalprop.cli.demo",
    "diagnose": "signalprop.cli.diagnose",
    "fix": "signalprop.cli.fix",
    "reproduce": "signalprop.cli.reproduce",
    "gain": "signalprop.cli.gain",
    "critical": "signalprop.cli.critical",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signalprop",
        description="Keep the signal in deep networks in range: measure, predict, diagnose and fix.",
    )
    parser.add_argument("--version", action="version", version=f"signalprop {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import os

    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        os.environ["COLUMNS"] = "140"  # piped into a file or a CI log: rich would squeeze tables into 80 columns
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args))
    except SignalpropError as exc:
        print(f"signalprop {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head` and closed: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
