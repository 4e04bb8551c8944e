"""Fans per layer type: the rules, PyTorch's where it is right, ours where it is not, and the errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop import SignalpropError
from signalprop.init import fans, register_fans, weight_blocks, weight_layers


def _torch_fans(layer: nn.Module) -> tuple[int, int]:
    return torch.nn.init._calculate_fan_in_and_fan_out(layer.weight)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Linear(7, 5),
        nn.Conv1d(6, 4, 3),
        nn.Conv2d(6, 4, (3, 5)),
        nn.Conv3d(6, 4, 3),
        nn.Conv2d(6, 4, 3, dilation=2, padding=3),
    ],
    ids=lambda m: type(m).__name__,
)
def test_stride_one_layers_agree_with_pytorch(layer: nn.Module) -> None:
    assert fans(layer) == _torch_fans(layer)


def test_grouped_and_depthwise_divide_by_groups() -> None:
    assert fans(nn.Conv2d(64, 128, 3, groups=4)) == (16 * 9, 32 * 9)
    assert fans(nn.Conv2d(32, 32, 3, groups=32)) == (9, 9)
    assert fans(nn.Conv1d(8, 16, 5, groups=8)) == (5, 10)


def test_transposed_conv_with_stride_counts_interior_inputs() -> None:
    # The example: every interior output of ConvTranspose2d(256, 128, 4, stride=2) sees 1024 inputs.
    layer = nn.ConvTranspose2d(256, 128, 4, stride=2)
    assert _torch_fans(layer)[0] == 2048
    assert fans(layer) == (256 * 16 // 4, 128 * 16)
    assert fans(nn.ConvTranspose1d(16, 8, 4, stride=2)) == (32, 32)
    assert fans(nn.ConvTranspose3d(4, 6, 4, stride=2)) == (4 * 64 // 8, 6 * 64)
    assert fans(nn.ConvTranspose2d(16, 16, 4, stride=2, groups=4)) == (4 * 4, 4 * 16)
    # stride not dividing the kernel: the mean over output phases, a float
    assert fans(nn.ConvTranspose1d(10, 10, 3, stride=2)) == (15.0, 30)


def test_strided_conv_fan_out_counts_the_outputs_an_input_feeds() -> None:
    assert fans(nn.Conv2d(3, 96, 11, stride=4)) == (363, 96 * 121 / 16)
    assert fans(nn.Conv2d(8, 16, 4, stride=2)) == (128, 64)


def test_fans_count_connections_in_a_real_transposed_conv() -> None:
    # Count, with a real layer, how many inputs reach one interior output: the gradient of one output
    # element with respect to the input is non-zero exactly at the inputs that feed it.
    layer = nn.ConvTranspose2d(3, 2, 4, stride=2)
    nn.init.constant_(layer.weight, 1.0)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    y = layer(x)
    y[0, 0, 7, 7].backward()
    assert int((x.grad != 0).sum()) == fans(layer)[0]
    # and the number of outputs one interior input feeds, from a forward pass
    x2 = torch.zeros(1, 3, 6, 6)
    x2[0, 0, 3, 3] = 1.0
    assert int((layer(x2).detach() != layer.bias.detach()[None, :, None, None]).sum()) == fans(layer)[1]


def test_fans_count_connections_in_a_real_strided_conv() -> None:
    layer = nn.Conv2d(2, 3, 4, stride=2)
    nn.init.constant_(layer.weight, 1.0)
    x = torch.randn(1, 2, 12, 12, requires_grad=True)
    layer(x)[0, 0, 2, 2].backward()
    assert int((x.grad != 0).sum()) == fans(layer)[0]
    x2 = torch.zeros(1, 2, 12, 12)
    x2[0, 0, 6, 6] = 1.0
    assert int((layer(x2).detach() != layer.bias.detach()[None, :, None, None]).sum()) == fans(layer)[1]


def test_multihead_attention_blocks() -> None:
    mha = nn.MultiheadAttention(32, 4)
    assert fans(mha) == (32, 32)
    blocks = weight_blocks(mha)
    assert [b.rows for b in blocks] == [(0, 32), (32, 64), (64, 96)]
    assert fans(mha.out_proj) == (32, 32)
    separate = nn.MultiheadAttention(32, 4, kdim=16, vdim=8)
    assert [(b.param, b.fan_in, b.fan_out) for b in weight_blocks(separate)] == [
        ("q_proj_weight", 32, 32),
        ("k_proj_weight", 16, 32),
        ("v_proj_weight", 8, 32),
    ]


def test_embedding_is_a_one_hot_linear_map() -> None:
    assert fans(nn.Embedding(1000, 64)) == (1, 64)
    assert fans(nn.EmbeddingBag(10, 8)) == (1, 8)


def test_transformers_conv1d_is_duck_typed_with_swapped_fans() -> None:
    class Conv1D(nn.Module):  # the shape convention of transformers.pytorch_utils.Conv1D
        def __init__(self, nf: int, nx: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(nx, nf))
            self.bias = nn.Parameter(torch.zeros(nf))

    assert fans(Conv1D(nf=48, nx=16)) == (16, 48)


def test_real_transformers_conv1d() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    assert fans(Conv1D(48, 16)) == (16, 48)


def test_subclasses_inherit_rules_and_top_level_alias() -> None:
    class MyConv(nn.Conv2d):
        pass

    assert fans(MyConv(4, 8, 3, stride=1)) == (36, 72)
    assert sp.fans is fans


def test_unknown_layer_says_how_to_pass_fans() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(3, 4, 5))

    with pytest.raises(SignalpropError, match=r"Odd \(weight shape \(3, 4, 5\)\).*fans=\(fan_in, fan_out\).*register_fans"):
        fans(Odd())
    with pytest.raises(SignalpropError, match="register_fans"):
        list(weight_layers(nn.Sequential(nn.Linear(2, 2), Odd()), strict=True))
    assert [n for n, _ in weight_layers(nn.Sequential(nn.Linear(2, 2), Odd()))] == ["0"]


def test_register_fans_by_type_and_by_name() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(8, 4))

    class Named(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(8, 4))

    register_fans(Scale, lambda m: (4, 8))
    register_fans("Named", lambda m: (2, 3))
    assert fans(Scale()) == (4, 8)
    assert fans(Named()) == (2, 3)
    with pytest.raises(SignalpropError, match="callable"):
        register_fans(Scale, (4, 8))  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="nn.Module subclass"):
        register_fans(int, lambda m: (1, 1))

    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(2, 2))

    register_fans(Broken, lambda m: "no")  # type: ignore[arg-type,return-value]
    with pytest.raises(SignalpropError, match="pair"):
        fans(Broken())


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.empty(3, 4), "tensor of shape"),
        ("linear", "nn.Module layer"),
        (nn.ReLU(), "cannot find fans for ReLU"),
        (nn.LayerNorm(4), "cannot find fans for LayerNorm"),
    ],
)
def test_bad_input_is_named(bad: object, match: str) -> None:
    with pytest.raises(SignalpropError, match=match):
        fans(bad)  # type: ignore[arg-type]


def test_zero_sized_layer() -> None:
    layer = nn.Linear(2, 3)
    layer.in_features = 0
    with pytest.raises(SignalpropError, match="must be positive"):
        fans(layer)


def test_lazy_layer_says_to_run_a_forward_first() -> None:
    with pytest.raises(SignalpropError, match="lazy layer.*forward pass"):
        fans(nn.LazyLinear(4))
    with pytest.raises(SignalpropError, match="lazy layer"):
        sp.init.he_(nn.Sequential(nn.LazyConv2d(4, 3)))


def test_layer_without_weight() -> None:
    mha = nn.MultiheadAttention(8, 2)
    mha.in_proj_weight = None  # type: ignore[assignment]
    with pytest.raises(SignalpropError, match="no weight"):
        fans(mha)


def test_weight_layers_walks_models_in_order() -> None:
    net = sp.models.plain_cnn(3, 8)
    assert [n for n, _ in weight_layers(net)] == ["body.0", "body.2", "body.4", "head.2"]
    assert [n for n, _ in weight_layers(nn.Linear(2, 3))] == [""]
    seq = nn.Sequential(nn.Embedding(10, 8), nn.LayerNorm(8), nn.MultiheadAttention(8, 2))
    assert [n for n, _ in weight_layers(seq)] == ["0", "2", "2.out_proj"]


def test_fans_of_dtensor_like_layers_read_attributes_not_local_shapes() -> None:
    # Linear/Conv fans come from in_features / channels, i.e. the global shape, never a shard's.
    layer = nn.Linear(6, 4)
    layer.weight = nn.Parameter(torch.empty(2, 6))  # as if only a shard were held locally
    assert fans(layer) == (6, 4)


def test_register_fans_names_the_tensor_a_custom_layer_calls_its_weight() -> None:
    from signalprop.init.fans import _TYPE_RULES, UnplannedLayerWarning, unplanned

    class Proj(nn.Module):  # a custom layer whose weight is not called `weight`, used through F.linear
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.full((8, 4), 3.0))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(x, self.w)

    net = nn.Sequential(nn.Linear(4, 4), Proj())
    text = unplanned("1", net[1])
    assert text == ("1 (Proj: w (8, 4)) left as it is: no fan rule for Proj; sp.init.register_fans(Proj, "
                    'lambda m: (m.w.shape[1], m.w.shape[0]), param="w") to draw it (rows of w = output units)')
    with pytest.warns(UnplannedLayerWarning, match='param="w"'):
        sp.init.he_(net)
    assert bool((net[1].w == 3.0).all())
    try:
        register_fans(Proj, lambda m: (m.w.shape[1], m.w.shape[0]), param="w")  # the call the message gives
        assert weight_blocks(Proj())[0].param == "w" and fans(Proj()) == (4, 8)
        sp.init.he_(net)
        assert net[1].w.std().item() == pytest.approx((2 / 4) ** 0.5, rel=0.5)  # 32 draws of std 0.71
        with pytest.raises(SignalpropError, match="param must name"):
            register_fans(Proj, lambda m: (4, 8), param="not a name")
    finally:
        _TYPE_RULES.pop(Proj, None)


def test_unknown_conv_like_weight_gets_a_shape_reading_rule() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kernel = nn.Parameter(torch.empty(6, 3, 5, 5))

    from signalprop.init.fans import register_call

    call = register_call(Odd())
    assert call == ('sp.init.register_fans(Odd, lambda m: (m.kernel[0].numel(), m.kernel.shape[0] * '
                    'm.kernel[0, 0].numel()), param="kernel")')
    rule = eval(call.split(", ", 1)[1].rsplit(", param", 1)[0])  # the lambda exactly as printed
    assert rule(Odd()) == (75, 150)  # PyTorch's fans of a [6, 3, 5, 5] conv weight
