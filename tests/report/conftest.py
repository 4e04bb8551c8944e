"""Hand-built traces and reports for the renderer tests (no model run needed).

The traces follow a small AlexNet-like body: conv/ReLU pairs whose output std shrinks by a fixed factor
per layer, then a classifier. Histograms are built from real normal samples, so the densities drawn are
those of a known distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from signalprop.diagnosis._findings import Finding
from signalprop.trace import Histogram, LayerStats, Stats, Trace


@dataclass
class FakeReport:
    """The fields of diagnose's Report that the renderers read (the contract: findings, trace, predicted,
    meta, ok)."""

    findings: list[Any]
    trace: Trace
    predicted: Trace | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not any(f.severity in ("warning", "error") for f in self.findings)


def _hist(std: float, rng: np.random.Generator, relu: bool) -> Histogram:
    x = rng.standard_normal(4000) * std
    if relu:
        x = np.maximum(x, 0.0)
    counts, edges = np.histogram(x, bins=31)
    return Histogram(tuple(float(e) for e in edges), tuple(int(c) for c in counts))


def make_trace(
    n_conv: int = 5,
    *,
    factor: float = 0.5,
    hist: bool = False,
    bwd: bool = True,
    names: list[str] | None = None,
    source: str = "measured",
    band: bool = False,
    seed: int = 0,
) -> Trace:
    """conv/ReLU pairs (std shrinking by ``factor`` per conv), then flatten and one Linear."""
    rng = np.random.default_rng(seed)
    layers: list[LayerStats] = []
    std = 1.0
    for i in range(n_conv):
        name = names[i] if names else f"features.{2 * i}"
        var = std * std
        vb = (var * 0.5, var * 2.0) if band else None
        grad_std = 0.01 * factor ** (n_conv - i)
        f = Stats(mean=0.01 * std, var=var, std=std, rms=std, absmax=4 * std, zero_frac=0.0, nonfinite_frac=0.0,
                  numel=1000, var_band=vb, chan_sq_mean=1e-4 * var, chan_var=var,
                  hist=_hist(std, rng, False) if hist else None)
        b = Stats.from_moments(0.0, grad_std**2, hist=_hist(grad_std, rng, False) if hist else None) if bwd else None
        layers.append(LayerStats(name, "Conv2d", f, b, shape=(8, 16, 4, 4), weight_layer=True))
        relu_var = var / 2
        fr = Stats(mean=std / math.sqrt(2 * math.pi), var=relu_var, std=math.sqrt(relu_var), rms=std / math.sqrt(2),
                   absmax=4 * std, zero_frac=0.5, nonfinite_frac=0.0, numel=1000,
                   chan_sq_mean=0.16 * var, chan_var=relu_var, hist=_hist(std, rng, True) if hist else None)
        br = Stats.from_moments(0.0, grad_std**2 * 2) if bwd else None
        layers.append(LayerStats(f"features.{2 * i + 1}", "ReLU", fr, br, shape=(8, 16, 4, 4)))
        std *= factor
    layers.append(LayerStats("flatten", "Flatten", layers[-1].fwd, layers[-1].bwd, shape=(8, 256)))
    out = Stats.from_moments(0.0, 0.04, var_band=(0.02, 0.08) if band else None)
    layers.append(LayerStats("classifier.0", "Linear", out, Stats.from_moments(0.0, 1.0) if bwd else None,
                             shape=(8, 10), weight_layer=True))
    return Trace(layers, source=source, meta={"input_shape": [3, 32, 32], "batch": 8})


def nonfinite_trace() -> Trace:
    """A trace whose signal overflows: a huge std, then inf, then nan, and a zero gradient."""
    t = make_trace(4, factor=1e6)
    inf = float("inf")
    nan = float("nan")
    t = t.replace_layer(4, fwd=Stats(mean=nan, var=inf, std=inf, rms=inf, absmax=inf, zero_frac=0.0,
                                     nonfinite_frac=0.25, numel=1000))
    t = t.replace_layer(6, fwd=Stats(mean=nan, var=nan, std=nan, rms=nan, absmax=nan, zero_frac=0.0,
                                     nonfinite_frac=1.0, numel=1000),
                        bwd=Stats(mean=0.0, var=0.0, std=0.0, rms=0.0, absmax=0.0, zero_frac=1.0,
                                  nonfinite_frac=0.0, numel=1000))
    return t


def findings_for(trace: Trace) -> list[Finding]:
    last = trace.weight_layers()[-2].name
    return [
        Finding("vanishing", "warning", last,
                f"output std falls from 1 at features.0 to {trace[last].fwd.std:.3g} at {last}",
                "he_normal_: set features.4.weight std to 0.0589 (sqrt(2 / fan_in), fan_in 576)"),
        Finding("dead_units", "info", "features.1", "50% of features.1's outputs are exactly zero", ""),
        Finding("nonfinite", "error", "input", "the input already holds NaN", "clean the data"),
    ]


@pytest.fixture
def trace() -> Trace:
    return make_trace()


@pytest.fixture
def report() -> FakeReport:
    t = make_trace(hist=True)
    return FakeReport(findings_for(t), t, predicted=make_trace(source="predicted", band=True, bwd=True),
                      meta={"model": "tiny <AlexNet>", "dtype": "float32"})
