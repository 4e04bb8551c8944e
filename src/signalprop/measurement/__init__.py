"""Measure: per-layer activation and gradient statistics of a real model, in one forward and one backward pass.

``measure(model, inputs)`` hooks every module, reduces each output and output gradient to one row of
statistics on the model's device (:mod:`signalprop.stats`), and returns a :class:`~signalprop.trace.Trace`.
"""

from ._measure import ModuleFilter as ModuleFilter
from ._measure import measure as measure
from ._measure import select_modules as select_modules

__all__ = ["ModuleFilter", "measure", "select_modules"]
