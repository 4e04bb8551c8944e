"""Graph capture: call lists, the activation after each weight layer, residual joins, fallbacks, no side effects."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.graph import CaptureWarning, capture
from signalprop.theory import activation_name


def _acts(g):
    return {k: (None if v is None else activation_name(v)) for k, v in g.activations.items()}


@pytest.mark.parametrize("method", ["export", "fx", "hooks"])
def test_reference_models_same_calls_every_method(method: str) -> None:
    for model, shape in [(sp.models.mlp(3, 16), (16,)), (sp.models.plain_cnn(3, 8), (3, 8, 8)),
                         (sp.models.resnet((1, 1), 8), (3, 8, 8))]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptureWarning)
            g = capture(model, input_shape=shape, methods=[method])
        assert g.method == method
        assert g.names == [n for n, m in model.named_modules() if next(m.children(), None) is None]
        assert all(a == "relu" for k, a in _acts(g).items() if not k.startswith("head") and k != "6")


def test_alexnet_export() -> None:
    g = capture(sp.models.alexnet(), input_shape=(3, 224, 224))
    assert g.method == "export" and g.failures == {}
    assert _acts(g) == {"features.0": "relu", "features.3": "relu", "features.6": "relu", "features.8": "relu",
                        "features.10": "relu", "classifier.1": "relu", "classifier.4": "relu",
                        "classifier.6": None}


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d, self.e = (nn.Linear(8, 8) for _ in range(5))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        x = F.leaky_relu(self.drop(self.b(x)).flatten(1), 0.2)
        x = F.gelu(self.c(x), approximate="tanh")
        x = torch.tanh(self.d(x) * 2.0)
        return self.e(x)


@pytest.mark.parametrize("method", ["export", "fx", "hooks"])
def test_functional_activations(method: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureWarning)
        g = capture(Functional(), torch.randn(2, 8), methods=[method])
    assert _acts(g) == {"a": "relu", "b": "leaky_relu(0.2)", "c": "gelu_tanh", "d": "tanh", "e": None}
    assert isinstance(g.activations["b"], nn.LeakyReLU) and g.activations["b"].negative_slope == 0.2


class ShapeBranch(nn.Module):
    """fx cannot branch on a traced shape; export specializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.size(1) > 4:
            return torch.relu(self.fc(x))
        return self.fc(x)


class ValueBranch(nn.Module):
    """Python control flow on a tensor's value: neither export nor fx can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if float(h.sum()) > -1e9:
            h = torch.sigmoid(h)
        return self.fc2(h)


def test_fx_fails_export_works() -> None:
    with pytest.raises(Exception):  # noqa: B017 - documents that fx really fails here
        torch.fx.symbolic_trace(ShapeBranch())
    g = capture(ShapeBranch(), torch.randn(2, 8))
    assert g.method == "export" and _acts(g) == {"fc": "relu"}


def test_hooks_fallback_warns_with_reasons() -> None:
    with pytest.warns(CaptureWarning, match="hooks because export failed.*fx failed"):
        g = capture(ValueBranch(), torch.randn(2, 8))
    assert g.method == "hooks" and set(g.failures) == {"export", "fx"}
    assert _acts(g) == {"fc1": "sigmoid", "fc2": None}


def test_residuals_of_resnet() -> None:
    g = capture(sp.models.resnet((1, 1), 8), input_shape=(3, 8, 8))
    r0, r1 = g.residuals
    assert r0.branch == ("stages.0.conv1", "stages.0.conv2") and r0.skip == ()
    assert r0.last_weight == "stages.0.conv2" and r0.last_norm == "stages.0.bn2"
    assert r1.skip == ("stages.1.shortcut",) and r1.last_norm == "stages.1.bn2"
    assert g.to_dict()["residuals"][1]["last_weight"] == "stages.1.conv2"


def test_reuse_gets_hash_suffix() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(4, 4), nn.Tanh()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(self.fc(self.act(self.fc(x))))

    g = capture(Twice(), torch.randn(2, 4))
    assert g.names == ["fc", "act", "fc#1", "act#1"]
    assert _acts(g) == {"fc": "tanh", "fc#1": "tanh"}


def _state(model: nn.Module):
    return ({k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()],
            [p.requires_grad for p in model.parameters()],
            [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()], torch.get_rng_state())


@pytest.mark.parametrize("method", ["export", "fx", "hooks"])
def test_capture_leaves_model_unchanged(method: str) -> None:
    model = sp.models.resnet((1, 1), 8).train()
    model.head[2].weight.requires_grad_(False)
    model.stem[0].register_forward_hook(lambda *a: None)
    before = _state(model)
    capture(model, input_shape=(3, 8, 8), methods=[method])
    after = _state(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:4] == after[1:4] and torch.equal(before[4], after[4])
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("bad", [(0, 3), "3,4", (2.5,), None])
def test_bad_input_shape(bad) -> None:
    with pytest.raises(sp.SignalpropError, match="input_shape|example inputs"):
        capture(sp.models.mlp(2, 4), input_shape=bad)


def test_bad_method_and_model() -> None:
    with pytest.raises(sp.SignalpropError, match="choose from"):
        capture(sp.models.mlp(2, 4), input_shape=(4,), methods=["jit"])
    with pytest.raises(sp.SignalpropError, match="nn.Module"):
        capture(lambda x: x, input_shape=(4,))  # type: ignore[arg-type]
    with pytest.raises(sp.SignalpropError, match="could not capture"):
        capture(sp.models.mlp(2, 4), input_shape=(5,))


def _hf_cases():
    tr = pytest.importorskip("transformers")
    return [
        ("gpt2", lambda: tr.GPT2Model(tr.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100,
                                                     bos_token_id=0, eos_token_id=0, use_cache=False)),
         lambda: {"input_ids": torch.randint(0, 100, (2, 6))}, {"mlp.c_fc": "gelu_tanh"}),
        ("bert", lambda: tr.BertModel(tr.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                     intermediate_size=64, vocab_size=100)),
         lambda: {"input_ids": torch.randint(0, 100, (2, 6))}, {"intermediate.dense": "gelu"}),
        ("vit", lambda: tr.ViTModel(tr.ViTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                                  intermediate_size=64, image_size=16, patch_size=8)),
         lambda: {"pixel_values": torch.randn(2, 3, 16, 16)}, {"mlp.fc1": "gelu"}),
        ("resnet", lambda: tr.ResNetModel(tr.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                          layer_type="bottleneck")),
         lambda: {"pixel_values": torch.randn(2, 3, 32, 32)}, {"layer.0.convolution": "relu"}),
    ]


@pytest.mark.parametrize("case", range(4), ids=["gpt2", "bert", "vit", "resnet"])
def test_transformers_architectures(case: int) -> None:
    _, build, inputs, expect = _hf_cases()[case]
    model = build().eval()
    g = capture(model, inputs())
    assert g.method == "export", g.failures
    weight = {n for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D", "Conv2d", "Embedding")}
    assert weight <= {c.module for c in g.calls}
    acts = _acts(g)
    for suffix, act in expect.items():
        hits = [a for k, a in acts.items() if k.endswith(suffix)]
        assert hits and all(a == act for a in hits), (suffix, acts)
    assert len(g.residuals) >= 2
    assert all(r.branch for r in g.residuals)


class FusedQKV(nn.Module):
    """GPT-2's attention: one projection split into q, k and v, then scaled dot-product attention."""

    def __init__(self, d: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.qkv, self.out, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


@pytest.mark.parametrize("method", ["export", "fx", "hooks"])
def test_split_pieces_are_read_through_getitem(method: str) -> None:
    """Every piece of a split is data, not a constant: the recorded forward gives each its ``getitem`` node,
    as export does, so predict sees k and v from the projection (the hooks capture once read the first
    piece as the whole projection and the others as constants, and failed on GPT-2)."""
    torch.manual_seed(0)
    net = FusedQKV()
    x = torch.randn(2, 6, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureWarning)
        g = capture(net, x, methods=[method])
    split = [n for n in g.nodes if n.op == "fn" and n.name == "split"]
    assert len(split) == 1
    items = [n for n in g.nodes if n.op == "fn" and n.name == "getitem" and split[0].index in n.inputs]
    assert [n.args[1] for n in items] == [0, 1, 2]
    assert not [n for n in g.nodes if n.op == "const" and n.shape == (2, 6, 16)]
    ref = sp.predict(net, inputs=x, graph=capture(net, x, methods=["export"]))
    got = sp.predict(net, inputs=x, graph=g)
    for a, b in zip(ref, got):
        assert a.name == b.name
        assert b.fwd.var == pytest.approx(a.fwd.var, rel=1e-9)
        assert b.bwd is not None and a.bwd is not None and b.bwd.var == pytest.approx(a.bwd.var, rel=1e-9)


class _Cache:
    """A decoder's cache: not a tensor, not a pytree torch.export knows."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class CachingDecoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, use_cache: bool = True) -> tuple[torch.Tensor, _Cache | None]:
        y = torch.relu(self.fc(x))
        return y, (_Cache(y) if use_cache else None)


def test_capture_asks_a_caching_forward_not_to_cache() -> None:
    """A forward with ``use_cache`` (transformers' decoders) is captured with ``use_cache=False`` unless the
    caller set it: the cache object in its output made torch.export refuse Llama."""
    net = CachingDecoder()
    g = capture(net, torch.randn(2, 8))
    assert g.method == "export" and not g.failures
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CaptureWarning)
        given = capture(net, {"x": torch.randn(2, 8), "use_cache": True})
    assert given.method != "export" and "export" in given.failures
