"""Reference models: shapes, layer counts, names, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop import SignalpropError


def test_alexnet_is_five_conv_three_fc_on_224() -> None:
    m = sp.models.alexnet().eval()
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    fcs = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [c.out_channels for c in convs] == [96, 256, 384, 384, 256]
    assert [f.out_features for f in fcs] == [4096, 4096, 1000]
    with torch.no_grad():
        assert m(torch.zeros(1, 3, 224, 224)).shape == (1, 1000)
    names = [n for n, _ in m.named_modules()]
    assert "features.0" in names and "classifier.6" in names


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", nn.LeakyReLU(0.2)])
def test_plain_cnn_and_mlp_depths(act) -> None:
    cnn = sp.models.plain_cnn(7, 8, act)
    assert sum(isinstance(x, nn.Conv2d) for x in cnn.modules()) == 7
    assert cnn(torch.randn(2, 3, 10, 10)).shape == (2, 10)
    net = sp.models.mlp(5, 16, act, in_features=4, out_features=3)
    assert sum(isinstance(x, nn.Linear) for x in net.modules()) == 6
    assert net(torch.randn(2, 4)).shape == (2, 3)
    if isinstance(act, nn.LeakyReLU):
        assert all(x.negative_slope == 0.2 for x in net.modules() if isinstance(x, nn.LeakyReLU))


def test_resnet_runs_with_and_without_norm() -> None:
    for norm in (True, False):
        m = sp.models.resnet((1, 1), 8, norm=norm)
        assert m(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_bad_arguments_are_clear() -> None:
    with pytest.raises(SignalpropError, match="depth must be a positive integer"):
        sp.models.plain_cnn(0)
    with pytest.raises(SignalpropError, match="cannot build an activation"):
        sp.models.mlp(3, 8, "nope")
    with pytest.raises(SignalpropError, match="blocks"):
        sp.models.resnet(())


@pytest.mark.parametrize("name", ["leaky_relu(0.2)", "elu(0.5)", "celu(2)", "softplus(2, 5)", "hardtanh(-2, 3)",
                                  "gelu_tanh", "relu6", "tanh"])
def test_make_activation_reads_the_names_theory_writes(name: str) -> None:
    m = sp.models.make_activation(name)
    assert sp.theory.activation_name(m) == sp.theory.activation_name(name)
    x = torch.linspace(-4, 4, 41, dtype=torch.float64)
    assert torch.allclose(m(x), sp.theory.resolve(name)(x), rtol=1e-12, atol=1e-12)
