"""A 1,000-layer prediction equals He's product taken layer by layer, and the batched weight reads agree with
the one-tensor ones."""

from __future__ import annotations

import math

import pytest
import torch

import signalprop as sp
from signalprop.prediction import _rules as R


def test_thousand_layer_prediction_equals_the_per_layer_reference() -> None:
    """Bias-free He-initialized ReLU chain, 1,000 hidden layers: predicted Var at every weight layer is
    ``fan_in mean(w_1^2) prod_{l>=2} fan_in mean(w_l^2) / 2`` and the first layer's gradient E[g^2] is
    ``prod_{l>=2} fan_out mean(w_l^2) / 2`` (He et al. 2015, Eqs. 7 and 13), each mean(w^2) taken in float64
    per layer. 1e-6 relative over 1,000 factors: the float32 row sums of the batched reads err ~1e-9 each."""
    torch.manual_seed(0)
    depth, width = 1000, 64
    model = sp.models.mlp(depth, width, bias=False)
    sp.init.he_(model)
    graph = sp.graph.capture(model, input_shape=(width,), methods=("fx",))
    t = sp.predict(model, (width,), graph=graph).weight_layers()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert len(t) == len(linears) == depth + 1
    w2 = [float(m.weight.detach().double().pow(2).mean()) for m in linears]
    var = width * w2[0]
    for layer, m2 in zip(t, w2):
        if layer is not t[0]:
            var *= width * m2 / 2
        assert math.isclose(layer.fwd.var, var, rel_tol=1e-6), (layer.name, layer.fwd.var, var)
    grad = math.prod(width * m2 / 2 for m2 in w2[1:])  # 1,000 ReLUs between the first layer and the output
    assert t[0].bwd is not None and math.isclose(t[0].bwd.var, grad, rel_tol=1e-6)
    assert 0.1 < t[-1].fwd.var < 10  # He keeps it near 2: a real number, not an underflow


def test_batched_mean_squares_match_one_tensor_reads() -> None:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(256, 256, generator=g), torch.randn(3, 5, generator=g), torch.randn(4096 + 7, generator=g),
          torch.empty(0), torch.randn(64, 64, generator=g).half(), torch.randn(8, dtype=torch.float64, generator=g)]
    got = R.mean_squares(ws)
    for w, v in zip(ws, got):
        ref = float(w.double().pow(2).mean()) if w.numel() else 0.0
        assert math.isclose(v, ref, rel_tol=1e-7), (tuple(w.shape), v, ref)
        assert v == R.mean_square(w)


def test_one_number_closed_forms_match_the_array_ones() -> None:
    """The host-float ReLU / leaky-ReLU moments (one mean and variance for every element) equal the array
    closed forms they stand in for, also at zero variance and far in the tails. Phi is erf/erfc of the math
    library instead of torch's (an ulp apart); in the lower tail the closed forms cancel (``E[r^2]`` at
    m = -3, v = 0.5 is 1e-7 of its terms), so each moment is held to 1e-12 of its scale ``E[u^2]^(p/2)``."""
    import numpy as np

    from signalprop.prediction import _gauss as G

    for slope in (0.0, 0.2, 1.0):
        for m in (-3.0, -0.4, 0.0, 1e-3, 0.7, 50.0):
            for v in (0.0, 1e-300, 1e-6, 0.5, 2.0, 1e4):
                want = G._piecewise(slope, np.array([m]), np.array([v]))
                got = G._piecewise_float(slope, m, v)
                q = m * m + v
                for w, x, scale in zip(want, got, (math.sqrt(q), q, q * q, 1.0)):
                    assert math.isclose(float(w[0]), x, rel_tol=1e-12, abs_tol=1e-12 * scale), (slope, m, v, w, x)


def test_host_biases_drop_zero_keep_nonfinite() -> None:
    """The biases come to the host as float64 in one transfer; an all-zero or empty one becomes None (the
    scalar path), a nan or inf one is kept (a zero test on its absolute values must not hide it)."""
    b = [torch.zeros(4), None, torch.tensor([0.0, float("nan")]), torch.arange(6.0).reshape(2, 3),
         torch.empty(0), torch.tensor([float("inf")], dtype=torch.float16)]
    got = R.host_biases(b)
    assert got[0] is None and got[1] is None and got[4] is None
    assert got[2] is not None and math.isnan(float(got[2][1]))
    assert got[3] is not None and got[3].dtype == torch.float64 and got[3].tolist() == [[0, 1, 2], [3, 4, 5]]
    assert got[5] is not None and float(got[5][0]) == math.inf
    assert R.host_biases([None, torch.zeros(3)]) == [None, None]


def test_predict_pauses_and_restores_the_cycle_collector() -> None:
    """The collector is off during a prediction and as it was afterwards: on, off, and after an error."""
    import gc

    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    assert gc.isenabled()
    sp.predict(net, (4,))
    assert gc.isenabled()
    gc.disable()
    try:
        sp.predict(net, (4,))
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(Exception):  # noqa: B017, PT011 - any failure: the state must come back
        sp.predict(net, (5,))
    assert gc.isenabled()
