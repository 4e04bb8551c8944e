"""predict: He's product formula exactly, the mean over nets, the finite-width band, norms/residuals/pooling."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import signalprop as sp
from signalprop.graph import capture
from signalprop.prediction import PredictWarning, predict

Z90 = 1.6448536269514722


@settings(max_examples=6)
@given(depth=st.integers(1, 8), width=st.sampled_from([16, 48, 100]), std=st.floats(0.05, 0.3))
def test_he_product_formula_exactly(depth: int, width: int, std: float) -> None:
    model = sp.models.mlp(depth, width, bias=False)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
    graph = capture(model, input_shape=(width,), methods=("fx",))  # fx: a tenth of export's time here
    trace = predict(model, (width,), input_var=1.7, graph=graph)
    w2 = [float(m.weight.detach().double().pow(2).mean()) for m in model if isinstance(m, nn.Linear)]
    var = 1.7 * width * w2[0]
    for i, layer in enumerate(trace.weight_layers()):
        if i:
            var *= 0.5 * width * w2[i]
        assert layer.fwd.var == pytest.approx(var, rel=1e-6)


def _nets(n_nets: int, depth: int, width: int):
    model = sp.models.mlp(depth, width, bias=False)
    graph = capture(model, input_shape=(width,))
    for _ in range(n_nets):
        net = sp.models.mlp(depth, width, bias=False)
        for m in net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / width))
        yield net, graph


def test_mean_over_nets_and_band_coverage() -> None:
    """32 He-initialized ReLU MLPs of width 256: the mean over nets sits on the prediction, the band holds ~90%.

    One net's log-variance has std s = sqrt(sum_l 5 / n) (beta = 5 for ReLU); the mean of 32 nets' ratios
    then has relative standard error about s / sqrt(32); the test allows 4 of those and never more than 15%.
    Coverage: a count of Binomial(32, 0.9) is at least 23 with probability > 0.999.
    """
    n_nets, depth, width = 32, 6, 256
    measured, predicted, inside = [], [], 0
    x = torch.randn(64, width)
    for net, graph in _nets(n_nets, depth, width):
        pt = predict(net, (width,), graph=graph).weight_layers()
        mt = sp.measure(net, x, backward=False).weight_layers()
        measured.append([m.fwd.var for m in mt])
        predicted.append([p.fwd.var for p in pt])
        lo, hi = pt[-1].fwd.var_band
        inside += lo <= mt[-1].fwd.var <= hi
    for layer in range(depth + 1):
        ratio = sum(m[layer] for m in measured) / sum(p[layer] for p in predicted)
        s = math.sqrt(5.0 * layer / width)
        tol = min(0.15, 4 * s / math.sqrt(n_nets) + 0.03)
        assert abs(ratio - 1) < tol, (layer, ratio, tol)
    assert 23 <= inside <= 32


def test_band_width_matches_hanin_formula() -> None:
    net = sp.models.mlp(30, 1024, bias=False)
    t = predict(net, (1024,)).weight_layers()
    lo, hi = t[29].fwd.var_band
    s = math.log(hi / lo) / (2 * Z90)
    # Hanin & Nica's 29 * 5 / 1024 (0.376, DESIGN issue 9) plus the chi-square of the 1024 channel offsets,
    # 2 (s/v)^2 / 1024 (0.379 in all; the 32-net experiment measured 0.381)
    rho = t[29].meta["shared_var"] / t[29].fwd.var
    assert 0.3 < rho < 1
    assert s == pytest.approx(math.sqrt(29 * 5 / 1024 + 2 * rho**2 / 1024), rel=1e-6)
    assert math.sqrt(lo * hi) == pytest.approx(t[29].meta["expected_var"], rel=1e-9)
    assert t[29].meta["expected_var"] == pytest.approx(t[29].fwd.var * (1 - rho / 1024), rel=1e-9)
    assert t[0].fwd.var_band == (t[0].fwd.var, t[0].fwd.var)  # i.i.d. input: nothing shared, no spread


def _ratio_check(make, shape, n_nets: int, batch: int, allowance: float, *, fwd_skip=(), bwd_from: str | None = None):
    """Mean over nets of measured / predicted variance, forward and backward, per module call.

    Forward compares with ``meta["expected_var"]`` (what one network measures: the mean-field variance less
    the spread of its G channel offsets). Backward is divided by the output layer's ratio: sp.measure's
    cotangent is one seeded standard-normal draw whose sample variance (about 0.85 for 16 x 10 values) is
    not a prediction. Tolerance: one net's forward log-variance at a layer has standard deviation
    sigma_L = that layer's ``log_var_std`` (Hanin & Nica's band plus the channel offsets' chi-square; the
    backward one at most the largest sigma_L of the trace), so the mean of ``n_nets`` ratios lies within
    ``4 sigma / sqrt(n_nets)`` in log (floor sigma = 0.1: the batch's sampling noise and the first layer's
    weight norms, which the band leaves out);
    ``allowance`` adds what the prediction leaves out on purpose (zero padding at borders). Backward is
    checked from ``bwd_from`` on. Returns the largest |log ratio| seen, forward and backward.
    """
    graph = capture(make(), input_shape=shape)
    sums: dict[str, list[float]] = {}
    sig: dict[str, float] = {}
    for _ in range(n_nets):
        model = make()
        p = predict(model, shape, graph=graph)
        m = sp.measure(model, torch.randn(batch, *shape))
        assert p.names == m.names
        for a, b in zip(p, m):
            sig[a.name] = max(sig.get(a.name, 0.1), a.meta["log_var_std"])
            acc = sums.setdefault(a.name, [0.0, 0.0, 0.0, 0.0])
            for i, v in enumerate((b.fwd.var, a.meta["expected_var"], b.bwd.var, a.bwd.var)):
                acc[i] += v
    names = list(sums)
    out = sums[names[-1]][2] / sums[names[-1]][3]
    bwd_tol = 4 * max(sig.values()) / math.sqrt(n_nets) + allowance
    checked_bwd = bwd_from is None
    worst = [0.0, 0.0]
    for name, (mf, pf, mb, pb) in sums.items():
        checked_bwd = checked_bwd or name == bwd_from
        if name not in fwd_skip:
            tol = 4 * sig[name] / math.sqrt(n_nets) + allowance
            worst[0] = max(worst[0], abs(math.log(mf / pf)))
            assert abs(math.log(mf / pf)) < tol, ("fwd", name, mf / pf, tol)
        if checked_bwd:
            worst[1] = max(worst[1], abs(math.log(mb / pb / out)))
            assert abs(math.log(mb / pb / out)) < bwd_tol, ("bwd", name, mb / pb / out, bwd_tol)
    return worst


def test_layernorm_gelu_tanh_dropout_against_measurement() -> None:
    """Training mode (dropout active), width 128, 8 nets."""
    torch.manual_seed(1)

    def make():
        return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.GELU(), nn.Linear(128, 128), nn.Tanh(),
                             nn.Dropout(0.3), nn.Linear(128, 10)).train()

    _ratio_check(make, (64,), 8, 64, 0.05)


def _padding_allowance(size: int, convs: int) -> float:
    """log of what zero padding costs: a 3x3 'same' conv on a size x size map gives its border outputs fewer
    taps, ((size - 2 + 2 * 2/3) / size)^2 of the interior variance on average (0.918 at 16, 0.840 at 8);
    ``convs`` such layers in a row at most compound it."""
    return -convs * math.log((1 - 2 / (3 * size)) ** 2)


def test_batchnorm_resnet_train_against_measurement() -> None:
    """A BasicBlock ResNet in training mode: BatchNorm renormalizes with one network's batch statistics, which
    remove each channel's random offset (s), so its gradient gain is gamma^2 / (v - s): forward and backward
    at every layer, the global-average-pool head included (both were off 3x and 6x before s was carried).
    The gradient reaches the stem through two 8x8 convolutions: allowance for their borders."""
    make = lambda: sp.models.resnet((1, 1), 16).train()  # noqa: E731
    _ratio_check(make, (3, 16, 16), 16, 16, _padding_allowance(8, 2))


def test_plain_resnet_eval_against_measurement() -> None:
    """The same ResNet without normalization, in eval mode: the head after global pooling keeps the channel
    offsets that the shortcut and the branches pass on (was under-predicted 11x)."""
    make = lambda: sp.models.resnet((1, 1), 16, norm=False).eval()  # noqa: E731
    _ratio_check(make, (3, 16, 16), 16, 16, _padding_allowance(8, 3))


def _he(net: nn.Module) -> nn.Module:
    sp.init.he_(net)
    return net


def test_global_average_pool_head_unpadded() -> None:
    """He-initialized CNN without padding (no border effects), global average pooling and a linear head:
    the pooled variance is (v - s)/HW + s, nearly all of it the channels' shared offsets (before: 7-14x
    under-predicted). Backward from the pool on (the adjoint of an unpadded conv covers border inputs less,
    which the prediction leaves out)."""
    def make():
        return _he(nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(),
                                 nn.Conv2d(32, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(32, 10)))

    _ratio_check(make, (3, 16, 16), 16, 16, 0.0, bwd_from="5")


def test_max_and_avg_pooling_unpadded() -> None:
    """Average pooling, then max pooling of equicorrelated ReLU outputs (the maximum of k Gaussians that share
    their channel's offset), flatten and a linear layer: forward at every layer (before: max-pooling
    over-predicted 1.3x and the linear layer after it 2x). Backward from the max pool on: the ReLU before a
    max pool passes the gradient of window maxima, which are positive more often than a random element
    (left out: the prediction under-estimates that gradient about 1.5x)."""
    def make():
        return _he(nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(32, 32, 3), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 2 * 2, 10)).eval())

    _ratio_check(make, (3, 14, 14), 16, 16, 0.0, bwd_from="4")


def test_padded_pooling_net() -> None:
    """The same with zero padding (PyTorch's default init): forward everywhere within the border allowance."""
    def make():
        return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                             nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                             nn.Linear(32 * 4 * 4, 10)).eval()

    _ratio_check(make, (3, 16, 16), 8, 16, _padding_allowance(16, 1) + _padding_allowance(8, 1), bwd_from="4")


def test_names_agree_with_measure_on_reference_models() -> None:
    for model, shape in [(sp.models.mlp(3, 16), (16,)), (sp.models.plain_cnn(3, 8), (3, 8, 8)),
                         (sp.models.resnet((1, 1), 8), (3, 8, 8))]:
        p = predict(model, shape)
        m = sp.measure(model, torch.randn(2, *shape))
        assert p.names == m.names
        assert [x.kind for x in p] == [x.kind for x in m]
        assert [x.weight_layer for x in p] == [x.weight_layer for x in m]
        assert p.source == "predicted"


def test_predict_leaves_model_unchanged() -> None:
    model = sp.models.resnet((1, 1), 8).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predict(model, (3, 8, 8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training and all(p.grad is None for p in model.parameters())


class CumSum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1)


class Norms(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x, dim=1, keepdim=True)


def test_unknown_ops() -> None:
    """A module without a rule of its own is predicted from the ops inside it (nn.Softmax: its softmax); an
    op without a rule that keeps the shape is passed through with a warning naming it, one that changes the
    shape raises."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Softmax(dim=1), nn.Linear(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = predict(model, (8,))
    assert t["1"].fwd.mean == pytest.approx(1 / 8)
    model = nn.Sequential(nn.Linear(8, 8), CumSum(), nn.Linear(8, 8))
    with pytest.warns(PredictWarning, match="cumsum"):
        t = predict(model, (8,))
    assert t["1"].fwd.var == pytest.approx(t["0"].fwd.var)
    with pytest.raises(sp.SignalpropError, match="register_rule"):
        predict(nn.Sequential(nn.Linear(8, 8), Norms()), (8,))


def test_bad_arguments() -> None:
    with pytest.raises(sp.SignalpropError, match="input_var"):
        predict(sp.models.mlp(2, 4), (4,), input_var=-1.0)
    with pytest.raises(sp.SignalpropError, match="input_shape"):
        predict(sp.models.mlp(2, 4), (0,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict(sp.models.mlp(2, 4), torch.Size([4]))
