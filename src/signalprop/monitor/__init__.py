"""Watch a training run: per-layer statistics and per-parameter norms every few steps, at low overhead."""

from ._monitor import Monitor as Monitor
from ._record import Event as Event
from ._record import NonFiniteWarning as NonFiniteWarning
from ._record import OverflowRiskWarning as OverflowRiskWarning
from ._record import ParamStats as ParamStats
from ._record import Record as Record

__all__ = ["Event", "Monitor", "NonFiniteWarning", "OverflowRiskWarning", "ParamStats", "Record"]
