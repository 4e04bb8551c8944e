"""signalprop: keep the signal in deep networks in range.

initialize (``sp.init``), predict (``sp.predict``), measure (``sp.measure``), diagnose (``sp.diagnose``),
fix (``sp.fix``) and show (``Report.table/plot/to_html``). Public names are re-exported here and loaded on
first use, so ``import signalprop`` stays light (no matplotlib, rich or transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import SignalpropError
from ._version import __version__

# The stages' functions live in packages named for the stage (measurement, prediction, diagnosis), so
# ``signalprop.measure`` is always the function, never a module. These import only torch and numpy.
from .diagnosis import Finding, Report, diagnose, diagnose_trace
from .init.fans import fans
from .measurement import measure
from .prediction import predict
from .theory import gain
from .trace import LayerStats, Stats, Trace

if TYPE_CHECKING:
    from . import experiments, fix, graph, init, models, report, theory
    from .monitor import Monitor

_LAZY: dict[str, tuple[str, str | None]] = {
    "Monitor": ("signalprop.monitor", "Monitor"),
    "theory": ("signalprop.theory", None),
    "graph": ("signalprop.graph", None),
    "report": ("signalprop.report", None),
    "init": ("signalprop.init", None),
    "fix": ("signalprop.fix", None),
    "models": ("signalprop.models", None),
    "experiments": ("signalprop.experiments", None),
}

__all__ = [
    "Finding",
    "LayerStats",
    "Monitor",
    "Report",
    "SignalpropError",
    "Stats",
    "Trace",
    "__version__",
    "diagnose",
    "diagnose_trace",
    "experiments",
    "fans",
    "fix",
    "gain",
    "graph",
    "init",
    "measure",
    "models",
    "predict",
    "report",
    "theory",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'signalprop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
