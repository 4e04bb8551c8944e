"""Capture a model's structure once (torch.export, then fx, then hook order).

The captured :class:`Graph` says which activation follows each weight layer and where residual branches
join; predict, the fix planner and residual detection all read it.
"""

from .._state import preserved as preserved
from ._graph import METHODS as METHODS
from ._graph import capture as capture
from ._graph import example_inputs as example_inputs
from ._types import Call as Call
from ._types import CaptureWarning as CaptureWarning
from ._types import Graph as Graph
from ._types import Residual as Residual

__all__ = ["METHODS", "Call", "CaptureWarning", "Graph", "Residual", "capture", "example_inputs", "preserved"]
