"""Fix a network's signal propagation, whatever its depth.

* :func:`auto_init_`: one scheme per weight layer from the activation that follows it (He, mean-field
  critical, LeCun, second-moment gain + LSUV), Fixup or zero-init on residual branches; :func:`plan` gives
  that per-layer plan as data first, :func:`apply_plan` writes it.
* :func:`lsuv_`: data-driven layer-sequential unit variance (Mishkin & Matas 2016) in about one forward pass
  plus a verifying one, each layer's target chosen so its chain's gradient stays in range
  (:func:`lsuv_target`); :func:`lsuv_run` returns what it did, :func:`output_stds` checks it.
* :func:`mup_`: width-independent init and learning rates (muP; Yang et al. 2022); :func:`coord_check`
  shows each layer's coordinate size over widths, flat under muP.
* :mod:`signalprop.fix.residual`: Fixup factors (Zhang et al. 2019) and zero-init (Goyal et al. 2017) as
  plan steps; :func:`residual_` scales the residual branches of any model in place (depth-muP, ReZero,
  SkipInit, Fixup, DeepNorm).
"""

from __future__ import annotations

from ._critical import lsuv_target as lsuv_target
from .auto import auto_init_ as auto_init_
from .coords import CoordCheck as CoordCheck
from .coords import coord_check as coord_check
from .coords import plot_coord_check as plot_coord_check
from .lsuv import LSUVResult as LSUVResult
from .lsuv import lsuv_ as lsuv_
from .lsuv import lsuv_run as lsuv_run
from .lsuv import output_stds as output_stds
from .mup import MupPlan as MupPlan
from .mup import mup_ as mup_
from .mup import mup_plan as mup_plan
from .plan import FAMILIES as FAMILIES
from .plan import LayerPlan as LayerPlan
from .plan import Plan as Plan
from .plan import apply_plan as apply_plan
from .plan import mean_field_choice as mean_field_choice
from .plan import plan as plan
from .residual import fixup_factor as fixup_factor
from .residual_schemes import SCHEMES as RESIDUAL_SCHEMES
from .residual_schemes import deepnorm_factors as deepnorm_factors
from .residual_schemes import residual_ as residual_

__all__ = [
    "FAMILIES",
    "RESIDUAL_SCHEMES",
    "CoordCheck",
    "MupPlan",
    "LSUVResult",
    "LayerPlan",
    "Plan",
    "apply_plan",
    "auto_init_",
    "coord_check",
    "deepnorm_factors",
    "fixup_factor",
    "lsuv_",
    "lsuv_run",
    "lsuv_target",
    "mean_field_choice",
    "mup_",
    "mup_plan",
    "output_stds",
    "plot_coord_check",
    "plan",
    "residual_",
]
