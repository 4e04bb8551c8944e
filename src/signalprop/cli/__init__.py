"""The `signalprop` command line (``python -m signalprop`` or ``signalprop``)."""

from ._main import main as main

__all__ = ["main"]
