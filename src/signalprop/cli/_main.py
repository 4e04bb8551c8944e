"""`signalprop` command line: a thin dispatcher; each sub-command lives in ``signalprop.cli.<name>``.

Each sub-command module defines ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``,
and imports nothing beyond the standard library at import time: torch, matplotlib, rich and transformers
are imported inside ``run``. Building the parser therefore imports no torch, and ``signalprop --help`` and
``--version`` answer in a few tens of milliseconds instead of the seconds torch takes to import.

Exit status (:data:`EXIT_CODES`, also in ``signalprop --help``): 0 clean, 1 findings, 2 usage or bad input,
3 internal failure. Errors are one line on stderr; ``--debug`` adds the full traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
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
    "coord-check": "signalprop.cli.coord_check",
    "sweep": "signalprop.cli.sweep",
}

CLEAN, FINDINGS, USAGE, INTERNAL = 0, 1, 2, 3
INTERRUPTED, BROKEN_PIPE = 130, 141
EXIT_CODES: dict[int, str] = {
    CLEAN: "clean: the command succeeded with nothing to report (no warning or error finding)",
    FINDINGS: "findings: a warning or an error in the diagnosis (diagnose; fix, after fixing), "
              "or a paper's claim that did not hold (reproduce)",
    USAGE: "usage or bad input: an option, TARGET, shape, weights file or output path that does not "
           "work; one line says what and how to fix it",
    INTERNAL: "internal failure: signalprop itself failed; one line names the error, --debug prints the "
              "traceback (please report it)",
    INTERRUPTED: "interrupted (Ctrl-C)",
}


def _epilog() -> str:
    lines = ["exit status:"]
    for code, text in EXIT_CODES.items():
        lines += textwrap.wrap(text, 100, initial_indent=f"  {code:>3}  ", subsequent_indent=" " * 7)
    return "\n".join(lines)


def _add_debug(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="on an error, print the full traceback before the one-line message")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every sub-command; imports the sub-command modules, which import no torch."""
    parser = argparse.ArgumentParser(
        prog="signalprop",
        description="Keep the signal in deep networks in range: measure, predict, diagnose and fix.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"signalprop {__version__}")
    _add_debug(parser, False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, epilog=_epilog(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        # SUPPRESS: a sub-command's --debug is set only when given, so `signalprop --debug CMD` still counts
        _add_debug(p, argparse.SUPPRESS)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (``sys.argv[1:]`` when None) and return its exit status."""
    if not sys.stdout.isatty() and "COLUMNS" not in os.environ:
        os.environ["COLUMNS"] = "140"  # piped into a file or a CI log: rich would squeeze tables into 80 columns
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and --version (0); argparse's usage errors, already printed (2)
        return exc.code if isinstance(exc.code, int) else (CLEAN if exc.code is None else USAGE)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return USAGE
    try:
        return int(args._run(args))
    except SignalpropError as exc:
        return _fail(args, "error", str(exc), USAGE)
    except KeyboardInterrupt:
        return INTERRUPTED
    except BrokenPipeError:  # output piped into `head` and closed: stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except OSError as exc:
        if exc.filename is None:
            return _internal(args, exc)
        # a path the user named or the machine refused (permission, disk full): bad input, not a bug
        return _fail(args, "error", f"cannot access {exc.filename}: {exc.strerror or _first_line(exc)}", USAGE)
    except Exception as exc:  # noqa: BLE001 - anything else is signalprop's own failure
        return _internal(args, exc)


def _internal(args: argparse.Namespace, exc: BaseException) -> int:
    return _fail(args, "internal error", f"{type(exc).__name__}: {_first_line(exc)}", INTERNAL,
                 hint="" if args.debug else " (run again with --debug for the traceback)")


def _fail(args: argparse.Namespace, what: str, message: str, code: int, hint: str = "") -> int:
    """One line on stderr, ``signalprop CMD: what: message``; the traceback first under ``--debug``."""
    if args.debug:
        import traceback

        traceback.print_exc()
    print(f"signalprop {args.command}: {what}: {message}{hint}", file=sys.stderr)
    return code


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
