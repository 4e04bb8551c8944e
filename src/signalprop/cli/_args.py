"""The arguments the commands on a ``TARGET`` share, declared without importing torch.

``signalprop --help`` builds every sub-command's parser, so this module (and each sub-command module at
import) stays on the standard library; loading the model and running it live in ``_target``, imported by
the commands' ``run`` only.
"""

from __future__ import annotations

import argparse

TARGET_HELP = (
    "path/to/file.py:factory or package.module:factory, e.g. signalprop.models:alexnet or "
    "\"signalprop.models:plain_cnn(depth=30, act='tanh')\""
)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``TARGET`` and ``--input-shape``: the model and the shape of one input, batch excluded."""
    parser.add_argument("target", metavar="TARGET", help=TARGET_HELP)
    parser.add_argument("--input-shape", required=True, help="input shape without the batch, e.g. 3,224,224")


def add_input_arguments(
    parser: argparse.ArgumentParser, *, dtypes: tuple[str, ...], weights_help: str, device: bool = False
) -> None:
    """``--batch``, ``--dtype`` (one of ``dtypes``), ``--device`` (when ``device``), ``--weights``, ``--vocab``."""
    parser.add_argument("--batch", type=int, default=16, help="batch size of the random input (default 16)")
    parser.add_argument("--dtype", choices=dtypes, default="float32", help="dtype of model and input")
    if device:
        parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    parser.add_argument("--weights", help=weights_help)
    parser.add_argument(
        "--vocab",
        type=int,
        help="feed integer token ids in [0, VOCAB) instead of N(0, 1) values (language models)",
    )
