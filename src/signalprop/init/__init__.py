"""Initializers that know each layer's effective fans: ``sp.init.he_(model)`` and friends.

Module-level functions (a layer or a whole model): :func:`he_`, :func:`glorot_`, :func:`lecun_`,
:func:`variance_scaling_`, :func:`orthogonal_`, :func:`delta_orthogonal_`; :func:`recurrent_` for RNN/LSTM/GRU
(LeCun input weights, orthogonal recurrent weights, forget-gate bias 1); :func:`materialize_` for models
built on the meta device. The plan as data: :func:`plan`, :func:`target_std`. Fans: :func:`fans`,
:func:`weight_blocks`, :func:`weight_layers`, :func:`register_fans`. Tensor-level functions with the
``torch.nn.init`` contract live in :mod:`signalprop.init.schemes` (``he_normal_``, ``glorot_uniform_``, ...).
"""

from __future__ import annotations

from ..layers import is_weight_layer as is_weight_layer
from . import schemes as schemes
from .apply import InitStep as InitStep
from .apply import plan as plan
from .apply import target_std as target_std
from .fans import WeightBlock as WeightBlock
from .fans import fans as fans
from .fans import has_fan_rule as has_fan_rule
from .fans import register_fans as register_fans
from .fans import weight_blocks as weight_blocks
from .fans import weight_layers as weight_layers
from .initializers import SCHEMES as SCHEMES
from .initializers import delta_orthogonal_ as delta_orthogonal_
from .initializers import glorot_ as glorot_
from .initializers import he_ as he_
from .initializers import lecun_ as lecun_
from .initializers import orthogonal_ as orthogonal_
from .initializers import variance_scaling_ as variance_scaling_
from .recurrent import recurrent_ as recurrent_
from .schemes import glorot_normal_ as glorot_normal_
from .schemes import glorot_uniform_ as glorot_uniform_
from .schemes import he_normal_ as he_normal_
from .schemes import he_uniform_ as he_uniform_
from .schemes import lecun_normal_ as lecun_normal_
from .schemes import lecun_uniform_ as lecun_uniform_
from .sharded import materialize_ as materialize_

__all__ = [
    "SCHEMES",
    "InitStep",
    "WeightBlock",
    "delta_orthogonal_",
    "fans",
    "glorot_",
    "glorot_normal_",
    "glorot_uniform_",
    "he_",
    "he_normal_",
    "he_uniform_",
    "has_fan_rule",
    "is_weight_layer",
    "lecun_",
    "lecun_normal_",
    "lecun_uniform_",
    "materialize_",
    "orthogonal_",
    "plan",
    "recurrent_",
    "register_fans",
    "schemes",
    "target_std",
    "variance_scaling_",
    "weight_blocks",
    "weight_layers",
]
