"""The predicted 90% band at the first layers: the batch and the first weights' finite fan-in, checked by
coverage over seeds."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.graph import capture
from signalprop.prediction import predict

SEEDS = 200
# a count of Binomial(200, 0.9) lies within 4 standard deviations (sqrt(200 * 0.9 * 0.1) = 4.24) of 180
LOW, HIGH = 180 - 4 * math.sqrt(SEEDS * 0.09), 180 + 4 * math.sqrt(SEEDS * 0.09)


def _coverage(make: Callable[[], nn.Module], shape: tuple[int, ...], batch: int, names: list[str]
              ) -> dict[tuple[str, str], int]:
    """How often, over SEEDS fresh networks and batches, each layer's measured variance falls in the band
    predicted from the batch itself (``inputs=``: its own input variance) and from the shape alone
    (``batch=``: input variance 1)."""
    torch.manual_seed(0)
    x0 = torch.randn(batch, *shape)
    graph = capture(make(), x0)
    hits: dict[tuple[str, str], int] = {}
    for _ in range(SEEDS):
        model = make()
        x = torch.randn(batch, *shape)
        m = sp.measure(model, x, backward=False)
        for mode, p in (("inputs", predict(model, inputs=x, graph=graph)),
                        ("shape", predict(model, shape, batch=batch, graph=graph))):
            for name in names:
                lo, hi = p[name].fwd.var_band
                hits[(mode, name)] = hits.get((mode, name), 0) + int(lo <= m[name].fwd.var <= hi)
    return hits


@pytest.mark.parametrize("case", ["linear-relu", "conv-relu", "linear-tanh"])
def test_first_layers_band_covers_90_percent(case: str) -> None:
    """The first weight layer and the activation after it have nothing compounded yet: their scatter is the
    batch's (a chi-square over B x E squared deviations) and the first weights' (outputs correlated through
    shared inputs, 1 / fan_in per other channel, plus a convolution's overlapping receptive fields). The
    band had zero width there; now the measured variance falls inside it about 90% of the time, with the
    input variance taken from the batch or given, for a Linear (batch 16), a 3x3 convolution (batch 4, 8x8
    outputs) and a saturating activation."""
    makers = {
        "linear-relu": (lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU()), (64,), 16),
        "conv-relu": (lambda: nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU()), (3, 10, 10), 4),
        "linear-tanh": (lambda: nn.Sequential(nn.Linear(256, 32), nn.Tanh()), (256,), 8),
    }
    make, shape, batch = makers[case]
    hits = _coverage(make, shape, batch, ["0", "1"])
    for key, count in hits.items():
        assert LOW <= count <= HIGH, (key, count, hits)


def test_band_without_batch_is_the_weights_only() -> None:
    """With an input shape and no batch, the band is that of an infinite batch: the first layer's
    expectation over inputs is exact given its weights, so its band has zero width; given a batch it
    widens by kappa / (B E) (1 + (C - 1) / fan_in) in relative variance, 2 / (16 * 128) * (1 + 127 / 64)."""
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU())
    lo, hi = predict(model, (64,))["0"].fwd.var_band
    assert lo == hi
    t = predict(model, (64,), batch=16)
    lo, hi = t["0"].fwd.var_band
    assert t["0"].meta["log_var_std"] == pytest.approx(math.sqrt(2 / (16 * 128) * (1 + 127 / 64)), rel=1e-9)
    assert math.log(hi / lo) == pytest.approx(2 * 1.6448536269514722 * t["0"].meta["log_var_std"], rel=1e-9)
