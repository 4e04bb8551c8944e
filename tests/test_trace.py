"""The Trace schema: construction, lookup, JSON round trip with nan/inf, histograms and bands."""

from __future__ import annotations

import math

import pytest

from signalprop import LayerStats, SignalpropError, Stats, Trace
from signalprop.trace import Histogram


def _trace() -> Trace:
    a = LayerStats(
        "features.0",
        "Conv2d",
        Stats(mean=0.1, var=4.0, std=2.0, rms=math.sqrt(4.01), absmax=math.inf, zero_frac=0.0,
              nonfinite_frac=0.25, numel=8, hist=Histogram((0.0, 1.0, 2.0), (3, 5))),
        Stats.from_moments(0.0, 1.0),
        shape=(2, 3, 4, 4),
        weight_layer=True,
        meta={"call": 0},
    )
    b = LayerStats("features.1", "ReLU", Stats.from_moments(0.5, 0.25, var_band=(0.1, 0.4)), None, shape=(2, 3))
    return Trace([a, b], source="predicted", meta={"input_shape": [3, 4, 4], "x": (1, 2)})


def test_lookup_by_index_name_and_slice() -> None:
    t = _trace()
    assert len(t) == 2 and t.names == ["features.0", "features.1"]
    assert t["features.1"].kind == "ReLU"
    assert t[0].name == "features.0"
    assert isinstance(t[:1], Trace) and len(t[:1]) == 1
    assert t.weight_layers().names == ["features.0"]
    with pytest.raises(KeyError, match="features.0"):
        t["nope"]


def test_json_round_trip_keeps_nan_inf_band_and_histogram(tmp_path) -> None:
    t = _trace()
    path = tmp_path / "t.json"
    text = t.to_json(path)
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    back = Trace.from_json(path)
    assert back == t
    assert back.source == "predicted"
    assert math.isinf(back[0].fwd.absmax)
    assert math.isnan(back[1].fwd.absmax)
    assert back[1].fwd.var_band == (0.1, 0.4)
    assert back[0].fwd.hist == Histogram((0.0, 1.0, 2.0), (3, 5))
    assert back[1].bwd is None
    assert Trace.from_json(text) == t


def test_from_moments_derives_std_and_rms() -> None:
    s = Stats.from_moments(3.0, 16.0)
    assert s.std == 4.0 and s.rms == 5.0
    assert math.isnan(s.absmax) and s.finite


def test_not_a_trace_is_a_clear_error() -> None:
    with pytest.raises(SignalpropError, match="signalprop.trace/1"):
        Trace.from_dict({"layers": []})
