"""Predict: per-layer forward and backward statistics from the weights and mean-field theory, before running anything.

He et al. (2015): ``Var[y_L] = Var[y_1] * prod_l (1/2 * n_l * Var[w_l])`` for ReLU nets, generalized to any
activation and bias by the q-map of Poole et al. (2016) (:mod:`signalprop.theory`), walked over the captured
graph (:mod:`signalprop.graph`).
"""

from ._predict import predict as predict
from ._registry import PredictWarning as PredictWarning
from ._registry import register_rule as register_rule

__all__ = ["PredictWarning", "predict", "register_rule"]
