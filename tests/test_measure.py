"""Tests of sp.measure: values against a hand-written reference, names and order, every kind of model,
and the promise that the model is left exactly as found."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop import SignalpropError


def _reference(model: nn.Module, x: torch.Tensor, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(output, gradient w.r.t. output) per child of a Sequential, with in-place activations made out-of-place
    and the same seeded standard-normal cotangent measure uses."""
    outs = []
    a = x.clone().requires_grad_(True)
    for m in model:
        if isinstance(m, nn.ReLU) and m.inplace:
            m = nn.ReLU()
        a = m(a)
        a.retain_grad()
        outs.append(a)
    cot = torch.randn(outs[-1].shape, generator=torch.Generator().manual_seed(seed))
    outs[-1].backward(cot)
    return [(o.detach(), o.grad) for o in outs]


def test_values_match_reference_with_inplace_relu() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 7 * 7, 5)
    )
    x = torch.randn(6, 3, 16, 16)
    trace = sp.measure(model, x)
    ref = _reference(model, x)
    assert trace.names == ["0", "1", "2", "3", "4"]
    assert [layer.weight_layer for layer in trace] == [True, False, False, False, True]
    for layer, (out, grad) in zip(trace, ref):
        assert layer.fwd.mean == pytest.approx(out.double().mean().item(), abs=1e-6)
        assert layer.fwd.std == pytest.approx(out.double().std(unbiased=False).item(), rel=1e-5)
        assert layer.fwd.absmax == pytest.approx(out.abs().max().item(), rel=1e-6)
        assert layer.fwd.zero_frac == pytest.approx((out == 0).double().mean().item())
        assert layer.bwd is not None
        assert layer.bwd.std == pytest.approx(grad.double().std(unbiased=False).item(), rel=1e-5)
        assert layer.bwd.zero_frac == pytest.approx((grad == 0).double().mean().item())
        assert layer.shape == tuple(out.shape) and layer.dtype == "float32"
    # the conv's gradient is taken before the in-place ReLU: more zeros than the ReLU's own
    assert trace["0"].bwd.zero_frac > trace["1"].bwd.zero_frac  # type: ignore[union-attr]
    assert trace.meta["passes"] == 1 and trace.meta["backward"] is True
    assert trace.meta["input_shape"] == [6, 3, 16, 16] and trace.meta["batch_size"] == 6


def test_cotangent_is_seeded() -> None:
    model = sp.models.mlp(depth=2, width=16)
    x = torch.randn(8, 16)
    a, b, c = sp.measure(model, x), sp.measure(model, x), sp.measure(model, x, seed=1)
    assert a == b
    assert a[0].bwd.std != c[0].bwd.std  # type: ignore[union-attr]


def test_loss_fn_and_backward_false() -> None:
    model = sp.models.mlp(depth=2, width=16)
    x = torch.randn(8, 16)
    trace = sp.measure(model, x, loss_fn=lambda out: out.pow(2).sum() / 2)
    out = model(x).detach()
    assert trace[-1].bwd.std == pytest.approx(out.std(unbiased=False).item(), rel=1e-5)  # type: ignore[union-attr]
    fwd_only = sp.measure(model, x, backward=False)
    assert all(layer.bwd is None for layer in fwd_only)
    assert fwd_only[0].fwd == trace[0].fwd
    with pytest.raises(SignalpropError, match="scalar"):
        sp.measure(model, x, loss_fn=lambda out: out)


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h = self.act(self.lin(x))
        h = self.act(self.lin(h))
        return {"ids": torch.zeros(3, dtype=torch.long), "hidden": h, "aux": (h * 2, 1)}


def test_reused_modules_get_call_suffix_and_dict_outputs_work() -> None:
    model = Shared()
    trace = sp.measure(model, (torch.randn(4, 8),))
    assert trace.names == ["lin", "act", "lin#1", "act#1"]
    assert [layer.meta["call"] for layer in trace] == [0, 0, 1, 1]
    assert all(layer.bwd is not None and layer.bwd.std > 0 for layer in trace)


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out) * scale


def test_tuple_outputs_kwargs_inputs_and_sequence_channels() -> None:
    trace = sp.measure(TupleOut(), {"x": torch.randn(3, 5, 4), "scale": 2.0})
    assert trace.names == ["rnn", "head"]
    assert trace["rnn"].shape == (3, 5, 6) and trace["rnn"].weight_layer
    assert trace["head"].meta["channel_dim"] == -1  # (B, T, C)
    assert trace.meta["input_shape"] == {"x": [3, 5, 4], "scale": "float"}


def test_frozen_model_and_integer_inputs_still_get_gradients() -> None:
    model = nn.Sequential(nn.Embedding(20, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    trace = sp.measure(model, torch.randint(0, 20, (4, 5)))
    assert [layer.weight_layer for layer in trace] == [True, True, False, True]
    assert all(layer.bwd is not None for layer in trace)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())


class ParamBranch(nn.Module):
    """A branch computed from a parameter alone (a learned position embedding through dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 4))
        self.drop = nn.Dropout(0.0)
        self.act = nn.Tanh()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + self.act(self.drop(self.pos)))


def test_branch_from_parameters_alone_gets_its_gradient() -> None:
    for mode in (True, False):
        trace = sp.measure(ParamBranch().train(mode), torch.randn(2, 5, 4))
        assert trace.names == ["(root)", "drop", "act", "lin"]
        for name in ("drop", "act"):
            assert trace[name].bwd is not None and trace[name].bwd.std > 0
    assert trace["(root)"].weight_layer  # owns a 2-D parameter directly


def test_module_filter() -> None:
    model = sp.models.plain_cnn(3, 4)
    x = torch.randn(2, 3, 8, 8)
    assert sp.measure(model, x, modules=[nn.Conv2d]).names == ["body.0", "body.2", "body.4"]
    assert sp.measure(model, x, modules="head").names == ["head.0", "head.1", "head.2"]
    assert sp.measure(model, x, modules=lambda n, m: n.endswith("1")).names == ["body.1", "head.1"]
    with pytest.raises(SignalpropError, match="named_modules"):
        sp.measure(model, x, modules=["body.99"])
    with pytest.raises(SignalpropError, match="modules="):
        sp.measure(model, x, modules=[3])  # type: ignore[list-item]


def test_bad_arguments() -> None:
    model = sp.models.mlp(depth=1, width=4)
    with pytest.raises(SignalpropError, match="nn.Module"):
        sp.measure(lambda x: x, torch.randn(2, 4))  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="inputs must be"):
        sp.measure(model, 3.0)  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="hist_bins"):
        sp.measure(model, torch.randn(2, 4), histograms=True, hist_bins=0)
    with torch.inference_mode(), pytest.raises(SignalpropError, match="inference_mode"):
        sp.measure(model, torch.randn(2, 4))
    with pytest.raises(SignalpropError, match="process group"):
        sp.measure(model, torch.randn(2, 4), distributed=True)


def test_nonfinite_and_huge_values() -> None:
    torch.manual_seed(1)
    model = sp.models.mlp(depth=20, width=256)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)  # N(0,1): the std grows ~sqrt(256/2) = 11x a layer
    x = torch.randn(16, 256)
    big = sp.measure(model, x)
    out = model(x).detach().double()
    assert big[-1].fwd.absmax > 1e20  # float32 squares overflow: measure re-ran in float64
    assert big.meta["passes"] == 2
    assert big[-1].fwd.std == pytest.approx(out.std(unbiased=False).item(), rel=1e-6)
    assert all(math.isfinite(layer.fwd.std) and layer.fwd.nonfinite_frac == 0 for layer in big)
    model = sp.models.mlp(depth=6, width=64)
    with torch.no_grad():
        model[4].weight[0, 0] = float("inf")  # Linear 2: one output unit becomes +-inf/nan
    trace = sp.measure(model, torch.randn(16, 64))
    assert trace.meta["passes"] == 2
    first_bad = next(i for i, layer in enumerate(trace) if layer.fwd.nonfinite_frac > 0)
    assert trace[first_bad].name == "4"
    assert trace[first_bad].fwd.nonfinite_frac >= 1 / 64
    assert math.isfinite(trace[first_bad].fwd.std) and math.isfinite(trace[first_bad].fwd.absmax)
    assert all(layer.fwd.nonfinite_frac == 0 for layer in trace[:first_bad])


def test_histograms() -> None:
    model = sp.models.mlp(depth=2, width=32, act="tanh")
    trace = sp.measure(model, torch.randn(64, 32), histograms=True, hist_bins=10)
    for layer in trace:
        assert layer.fwd.hist is not None and sum(layer.fwd.hist.counts) == layer.fwd.numel
        assert layer.bwd is not None and layer.bwd.hist is not None
        assert layer.fwd.hist.edges[-1] == pytest.approx(layer.fwd.absmax) or layer.fwd.hist.edges[0] == (
            pytest.approx(-layer.fwd.absmax)
        )
    assert trace.meta["passes"] == 2
    assert sp.Trace.from_json(trace.to_json()) == trace


def test_autocast_records_dtypes(autocast_case: tuple[str, torch.dtype]) -> None:
    device, dtype = autocast_case
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    name = str(dtype).replace("torch.", "")
    with torch.autocast(device, dtype=dtype):
        trace = sp.measure(model, torch.randn(8, 16, device=device))
    assert [layer.dtype for layer in trace] == [name] * 3
    assert trace.meta["autocast"] == name
    assert all(math.isfinite(layer.fwd.absmax) and layer.bwd is not None and layer.bwd.finite for layer in trace)
    ref = sp.measure(model, torch.randn(8, 16, device=device))
    assert ref[0].dtype == "float32"


def test_gpt2_from_config_dict_inputs_and_model_output() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2Model(cfg).eval()
    ids = torch.randint(0, 100, (2, 8))
    trace = sp.measure(model, {"input_ids": ids, "use_cache": False})
    conv1d = [layer for layer in trace if layer.kind == "Conv1D"]
    assert len(conv1d) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj per block
    assert all(layer.weight_layer and layer.bwd is not None and layer.bwd.std > 0 for layer in conv1d)
    assert trace["wte"].weight_layer and trace["wte"].meta["channel_dim"] == -1
    assert not trace["ln_f"].weight_layer
    assert all(p.grad is None for p in model.parameters())
