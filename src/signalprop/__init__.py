"""signalprop: keep the signal in deep networks in range.

initialize (``sp.init``), predict (``sp.predict``), measure (``sp.measure``), diagnose (``sp.diagnose``),
fix (``sp.fix``) and show (``Report.table/plot/to_html``). Every public name except ``SignalpropError`` and
``__version__`` is loaded on first use (PEP 562 module ``__getattr__``), so ``import signalprop`` imports
neither torch nor anything heavier, and ``signalprop --help`` answers at once; ``sp.measure``,
``from signalprop import measure`` and ``from signalprop import *`` load what they name.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._errors import SignalpropError
from ._version import __version__

if TYPE_CHECKING:
    from . import diagnosis as diagnosis
    from . import experiments, fix, graph, init, models, report, theory
    from . import layers as layers
    from . import measurement as measurement
    from . import prediction as prediction
    from . import stats as stats
    from . import trace as trace
    from .diagnosis import Finding, Report, diagnose, diagnose_trace
    from .fix import coord_check
    from .init.fans import fans
    from .measurement import measure
    from .monitor import Monitor
    from .prediction import predict
    from .theory import gain
    from .trace import LayerStats, Stats, Trace

# public name -> (module, attribute of it; None: the module itself). The stages' functions live in packages
# named for the stage (measurement, prediction, diagnosis), so ``signalprop.measure`` is always the function.
_LAZY: dict[str, tuple[str, str | None]] = {
    "Finding": ("signalprop.diagnosis", "Finding"),
    "Report": ("signalprop.diagnosis", "Report"),
    "diagnose": ("signalprop.diagnosis", "diagnose"),
    "diagnose_trace": ("signalprop.diagnosis", "diagnose_trace"),
    "fans": ("signalprop.init.fans", "fans"),
    "coord_check": ("signalprop.fix", "coord_check"),
    "measure": ("signalprop.measurement", "measure"),
    "predict": ("signalprop.prediction", "predict"),
    "gain": ("signalprop.theory", "gain"),
    "LayerStats": ("signalprop.trace", "LayerStats"),
    "Stats": ("signalprop.trace", "Stats"),
    "Trace": ("signalprop.trace", "Trace"),
    "Monitor": ("signalprop.monitor", "Monitor"),
    "theory": ("signalprop.theory", None),
    "graph": ("signalprop.graph", None),
    "report": ("signalprop.report", None),
    "init": ("signalprop.init", None),
    "fix": ("signalprop.fix", None),
    "models": ("signalprop.models", None),
    "experiments": ("signalprop.experiments", None),
}
# the stage packages and lower layers, reachable as attributes (``sp.layers.is_weight_layer``) as the
# public sub-packages are, though not star-exported
_SUBMODULES = ("activations", "diagnosis", "layers", "measurement", "prediction", "stats", "trace")

__all__ = [
    "Finding",
    "LayerStats",
    "Monitor",
    "Report",
    "SignalpropError",
    "Stats",
    "Trace",
    "__version__",
    "coord_check",
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
    """Load a public name on first use and keep it in the module's namespace (PEP 562)."""
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"signalprop.{name}")
    raise AttributeError(f"module 'signalprop' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
