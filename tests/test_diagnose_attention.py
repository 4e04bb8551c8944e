"""Attention saturation: N(0, 1) query/key weights make the softmax one-hot (no gradient through attention)
while LayerNorm keeps every output std in range; diagnose sees it, names the projections, and the fixes clear it."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop.diagnosis._attention import watch_attention

tf = pytest.importorskip("transformers", reason="transformers is a dev extra (real architectures)")


def _distilbert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64, pad_token_id=2)
    ids = torch.randint(3, 100, (4, 12))
    return tf.DistilBertModel(cfg).eval(), {"input_ids": ids}


def _normal_(model: nn.Module) -> nn.Module:
    """N(0, 1) for every weight of two or more dimensions but the embedding tables (their default already)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and id(p) not in tables:
                p.normal_()
    return model


def test_distilbert_sound_init_keeps_attention_soft() -> None:
    model, x = _distilbert()
    report = sp.diagnose(model, x, predicted=False)
    att = report.trace.meta["attention"]
    assert set(att) == {"transformer.layer.0.attention", "transformer.layer.1.attention"}
    for f in att.values():
        assert f["rows"] == 4 * 2 * 12 and f["one_hot"] == 0  # batch x heads x queries, none one-hot
        # transformers draws q_lin/k_lin at std 0.02 on unit LayerNorm outputs: each q, k component has
        # variance 32 * 0.02^2 = 0.0128, so the logits q.k/sqrt(16) have std 16 * 0.0128 / 4 = 0.0512 / 4
        assert f["std_sum"] / f["rows"] == pytest.approx(0.0128, rel=0.5)
    assert not report.by_kind("saturation") and report.ok


def test_distilbert_normal_weights_saturate_attention_and_the_fixes_clear_it() -> None:
    model, x = _distilbert()
    report = sp.diagnose(_normal_(model), x, predicted=False)
    (f,) = report.by_kind("saturation")
    assert not report.ok and f.severity in ("warning", "error")
    assert f.layer.startswith("transformer.layer.") and f.layer.endswith(".attention")
    assert f.data["sat_frac"] >= 0.25
    # N(0, 1) weights on unit inputs: q and k components have variance 32, so for a fixed query the logits
    # over keys have std sqrt(16 * 32 * 32 / 16) = 32; a sound init gives about 1 or less
    assert 8 < f.data["logit_std"] < 64
    assert [n.rsplit(".", 1)[-1] for n in f.data["qk_layers"]] == ["q_lin", "k_lin"]
    assert "q_lin" in f.message and "std = sqrt(1/32)" in f.fix
    for fix in ("auto_init_", "lsuv_"):
        fixed, x = _distilbert()
        _normal_(fixed)
        if fix == "auto_init_":
            sp.fix.auto_init_(fixed, example_inputs=x)
        else:
            sp.fix.lsuv_(fixed, x)
        after = sp.diagnose(fixed, x, predicted=False)
        assert after.ok, (fix, after.summary())
        assert all(a["one_hot"] / a["rows"] < 0.05 for a in after.trace.meta["attention"].values())


def test_multihead_attention_module_is_watched_and_named() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(4, 12, 32)
    sound = sp.diagnose(model, x, predicted=False)
    assert not sound.by_kind("saturation")
    assert all(a["rows"] == 4 * 2 * 12 and a["one_hot"] == 0 for a in sound.trace.meta["attention"].values())
    report = sp.diagnose(_normal_(model), x, predicted=False)
    (f,) = report.by_kind("saturation")
    assert f.layer.endswith("self_attn") and f.data["qk_layers"] == [f.layer]  # the in_proj_weight holder
    sp.fix.auto_init_(model, example_inputs=x)
    assert not sp.diagnose(model, x, predicted=False).by_kind("saturation")


class CausalAttention(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (m(x).unsqueeze(1) for m in (self.q, self.k, self.v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)


def test_rows_with_one_key_are_not_counted_and_the_logits_are_rebuilt() -> None:
    torch.manual_seed(0)
    m = CausalAttention()
    x = torch.randn(3, 5, 16)
    with torch.no_grad(), watch_attention(m) as seen:
        m(x)
    (facts,) = seen.values()
    assert facts["rows"] == 3 * 4  # the first query of each causal sequence sees one key: nothing to judge
    with torch.no_grad():
        z = (m.q(x) @ m.k(x).transpose(-2, -1)) / 4.0  # q.k / sqrt(16), one head
    stds = [z[b, i, : i + 1].std(unbiased=False) for b in range(3) for i in range(1, 5)]
    assert facts["std_sum"] == pytest.approx(float(sum(stds)), rel=1e-4)
    with torch.no_grad():
        m.q.weight.mul_(100.0)  # logits std x100: most rows one-hot
    with torch.no_grad(), watch_attention(m) as seen:
        m(x)
    (big,) = seen.values()
    assert big["one_hot"] / big["rows"] > 0.5
    assert big["std_sum"] / big["rows"] == pytest.approx(100 * facts["std_sum"] / facts["rows"], rel=0.3)
    assert math.isfinite(big["std_sum"])
