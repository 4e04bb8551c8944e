"""Glorot & Bengio (2010) reproduction: the qualitative claims and the mean-field numbers behind them."""

from __future__ import annotations

import json
import math

import pytest
import torch

from signalprop import SignalpropError
from signalprop.experiments import glorot2010 as G


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> G.Result:
    torch.manual_seed(0)
    return G.run(out=tmp_path_factory.mktemp("glorot"), quick=True, seed=0)


@pytest.mark.slow
def test_quick_run_reproduces_figs_6_and_7(quick: G.Result) -> None:
    assert quick.ok, quick.summary()
    std_act = quick.act_var["standard"]
    # Var shrinks by n Var[W] = 1/3 per square layer in the linear regime: 3^-4 = 0.012 from layer 1 to 5
    assert std_act[-1] / std_act[0] < 0.05
    # gradients: standard spans ~3^4 = 81x, normalized only tanh' ^2 per layer (measured 3.4x)
    assert quick.ratio("grad", "standard") > 30
    assert quick.ratio("grad", "normalized") < 5
    assert quick.ratio("grad", "normalized") * 5 < quick.ratio("grad", "standard")
    # standard: gradients shrink going down, layer 1 has the smallest
    assert quick.grad_var["standard"][0] == min(quick.grad_var["standard"])


@pytest.mark.slow
def test_measured_variances_match_mean_field(quick: G.Result) -> None:
    """The q-map prediction from each net's actual weights: one width-n layer's empirical variance over
    n units and N samples has relative std about sqrt(2 / n) (chi-square), accumulating over l layers;
    averaged over ``nets`` nets. 4 sigma of that is the tolerance."""
    cfg = quick.config
    for s in G.SCHEMES:
        for layer, (m, p) in enumerate(zip(quick.act_var[s], quick.act_var_predicted[s]), start=1):
            tol = 4 * math.sqrt(2 * layer / cfg.width) / math.sqrt(cfg.nets)
            assert abs(m / p - 1) < tol, (s, layer, m, p, tol)
        # the gradient prediction is anchored at the top layer and carried down by the same theory
        for layer, (m, p) in enumerate(zip(quick.grad_var[s], quick.grad_var_predicted[s]), start=1):
            depth_below = cfg.hidden - layer
            tol = 4 * math.sqrt(2 * max(depth_below, 1) / cfg.width) / math.sqrt(cfg.nets)
            assert abs(m / p - 1) < tol, (s, layer, m, p, tol)


@pytest.mark.slow
def test_histograms_and_files(quick: G.Result) -> None:
    for s in G.SCHEMES:
        assert len(quick.act_hist[s]) == len(quick.grad_hist[s]) == quick.config.hidden
        for h in quick.act_hist[s]:
            assert sum(h.counts) == quick.config.samples * quick.config.width
            assert -1 <= h.edges[0] and h.edges[-1] <= 1  # tanh's range
    assert quick.png is not None and quick.png.stat().st_size < 300_000
    assert quick.json is not None
    data = json.loads(quick.json.read_text())
    assert data["experiment"] == "glorot2010" and data["ok"] is True
    assert data["act_var"]["standard"] == pytest.approx(quick.act_var["standard"])


def test_inits_have_the_papers_variances() -> None:
    """standard: U[-1/sqrt(n_in), +] has Var = 1/(3 n_in); normalized: Var = 2/(n_in + n_out). The sample
    variance of k uniform entries has relative std sqrt(0.8 / k) (kurtosis 9/5), so 6 of those is the band."""
    for scheme, var in (("standard", lambda i, o: 1 / (3 * i)), ("normalized", lambda i, o: 2 / (i + o))):
        model = G.build(scheme, hidden=3, width=256, seed=1)
        for m in model:
            if isinstance(m, torch.nn.Linear):
                w = m.weight.detach().double()
                k = w.numel()
                assert abs(float(w.var()) / var(m.in_features, m.out_features) - 1) < 6 * math.sqrt(0.8 / k)
                assert float(w.abs().max()) <= math.sqrt(3 * var(m.in_features, m.out_features)) + 1e-6
                assert float(m.bias.detach().abs().max()) == 0.0


def test_bad_input() -> None:
    with pytest.raises(SignalpropError, match="unknown glorot2010 scheme"):
        G.build("xavier")
    with pytest.raises(SignalpropError, match="at least 2 hidden"):
        G.Config(hidden=1)
    with pytest.raises(SignalpropError, match="positive integer"):
        G.Config(width=0)
    with pytest.raises(SignalpropError, match="config must be"):
        G.run(config=object())  # type: ignore[arg-type]
