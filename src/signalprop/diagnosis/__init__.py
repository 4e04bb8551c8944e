"""Diagnose: rules over a :class:`~signalprop.trace.Trace` that give plain verdicts with the layer, the numbers and the fix."""

from ._diagnose import Report as Report
from ._diagnose import diagnose as diagnose
from ._diagnose import diagnose_trace as diagnose_trace
from ._findings import Finding as Finding

__all__ = ["Finding", "Report", "diagnose", "diagnose_trace"]
