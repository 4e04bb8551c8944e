"""Show a Report or a Trace: a rich table (:mod:`.table`), matplotlib figures (:mod:`.plots`) and one
self-contained HTML page (:mod:`.html`).

report renders; it computes nothing new: every number comes from a Trace's ``Stats`` or a Report's
findings. The submodules import rich and matplotlib inside their functions, so
``import signalprop.report`` stays light; import the submodule you need::

    from signalprop.report import html, plots, table
    table.render(report, console=rich.console.Console())
    plots.plot_report(report, "out/report.png")
    html.write_html(report, "out/report.html")
"""

from __future__ import annotations

__all__ = ["html", "plots", "table", "training"]

import importlib
from types import ModuleType


def __getattr__(name: str) -> ModuleType:
    """Load a submodule on first attribute access (``signalprop.report.plots``)."""
    if name in __all__:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
