"""He et al. (2015) reproduction: at 30 layers Caffe's xavier stalls at ln 10 while He's init learns."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch

from signalprop import SignalpropError
from signalprop.experiments import he2015 as H
from signalprop.experiments._common import digits_caffe


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> H.Result:
    torch.manual_seed(0)
    return H.run(out=tmp_path_factory.mktemp("he"), quick=True, seed=0)


@pytest.mark.slow
def test_quick_run_reproduces_fig_3(quick: H.Result) -> None:
    assert quick.ok, quick.summary()
    final = quick.final_loss[30]
    assert abs(final["xavier"] - H.LN10) < 0.05  # stalls: nothing learnt
    assert final["he"] < final["xavier"] - 0.25  # a clear margin: xavier's 50-step mean moves by < 0.01
    assert quick.learnt_at[30]["xavier"] is None


@pytest.mark.slow
def test_clipping_acts_on_he_s_first_steps_never_on_the_xavier_plateau(quick: H.Result) -> None:
    """The gradient-norm clip (10, the same for both) exists for He's raw-scale start, whose initial logits
    are in the tens; a xavier net on its plateau has a gradient norm of 0.15-0.3, far below it."""
    assert quick.config.clip == 10.0
    assert quick.clipped[30]["xavier"] == 0
    assert 0 < quick.clipped[30]["he"] < quick.config.steps // 4


@pytest.mark.slow
def test_xavier_signal_is_2_to_the_minus_L_over_2(quick: H.Result) -> None:
    """He et al. 2015, Eq. 10: each xavier layer halves the variance, so after 30 conv layers the std is
    2^-15 of He's *on average*. One pair of random width-16 nets scatters around that by about 2 in log2
    (Hanin & Rolnick 2018: the log of a deep ReLU net's output norm has a variance growing like
    5 * sum_l 1/n_l; measured here over 16 seeds: sd 2.2), so the claim is checked on the mean of 12 pairs,
    within 4 standard errors (from the pairs' own spread), and the quick run's pair within 4 sd."""
    x, _ = digits_caffe()
    ratios = [math.log2(H._output_std(H.build(30, "he", width=16, seed=s), x)
                        / H._output_std(H.build(30, "xavier", width=16, seed=s), x)) for s in range(12)]
    mean, sd = statistics.mean(ratios), statistics.stdev(ratios)
    assert abs(mean - 15) < 4 * sd / math.sqrt(len(ratios)), (mean, sd)
    stds = quick.output_std[30]
    assert abs(math.log2(stds["he"] / stds["xavier"]) - 15) < 4 * sd


@pytest.mark.slow
def test_files(quick: H.Result) -> None:
    assert quick.png is not None and 0 < quick.png.stat().st_size < 300_000
    assert quick.json is not None
    data = json.loads(quick.json.read_text())
    assert data["experiment"] == "he2015" and data["ok"] is True
    assert len(data["losses"]["30"]["he"]) == quick.config.steps
    assert "xavier" in quick.summary() and "ok" in quick.summary()


def test_inits_have_the_papers_variances() -> None:
    """Caffe xavier: U(-sqrt(3/n), sqrt(3/n)), Var 1/n; He: N(0, 2/n); n = fan_in = 9 * in_channels. The
    sample variance of k entries has relative std sqrt((kurtosis - 1) / k): 6 of those is the band."""
    for scheme, scale, kurt in (("xavier", 1.0, 1.8), ("he", 2.0, 3.0)):
        model = H.build(6, scheme, width=32, seed=2)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 6
        for m in convs[1:]:
            w = m.weight.detach().double()
            fan_in = w.shape[1] * 9
            assert abs(float(w.var()) * fan_in / scale - 1) < 6 * math.sqrt((kurt - 1) / w.numel())
            assert m.bias is not None and float(m.bias.detach().abs().max()) == 0.0
        if scheme == "xavier":
            assert float(convs[1].weight.detach().abs().max()) <= math.sqrt(3 / (32 * 9)) + 1e-7


def test_same_data_order_and_epochs() -> None:
    cfg = H.Config(depths=(3,), steps=130, batch_size=32, window=10)
    order = H._batches(1797, cfg, seed=4)
    assert order.shape == (130, 32)
    assert torch.equal(order, H._batches(1797, cfg, seed=4))
    per_epoch = 1797 // 32
    first = order[:per_epoch].flatten()
    assert len(set(first.tolist())) == first.numel()  # an epoch visits each digit at most once


def test_bad_input() -> None:
    with pytest.raises(SignalpropError, match="unknown he2015 scheme"):
        H.build(3, "glorot", width=4, seed=0)
    with pytest.raises(SignalpropError, match="depths"):
        H.Config(depths=())
    with pytest.raises(SignalpropError, match="lr > 0"):
        H.Config(lr=0.0)
    with pytest.raises(SignalpropError, match="window"):
        H.Config(steps=10, window=20)
    with pytest.raises(SignalpropError, match="clip"):
        H.Config(clip=0.0)
    with pytest.raises(SignalpropError, match="seed"):
        H.run(seed=-3)


def test_divergence_is_reported() -> None:
    cfg = H.Config(depths=(3,), width=4, batch_size=16, steps=20, lr=1e6, window=5, clip=None)
    with pytest.raises(SignalpropError, match="diverged"):
        H.run(config=cfg)
