"""Real architectures from transformers configs (random weights, nothing downloaded): every Linear, Conv and
HF Conv1D call appears in the Trace, and diagnose's findings are the ones a person would write."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.diagnosis import diagnose

tf = pytest.importorskip("transformers", reason="transformers is a dev extra (real architectures)")

WEIGHT_KINDS = {"Linear", "Conv1d", "Conv2d", "Conv1D"}


def _weight_calls(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if type(m).__name__ in WEIGHT_KINDS]


def _covered(model: nn.Module, report: Any) -> None:
    names = {layer.name.split("#")[0] for layer in report.trace}
    expected = _weight_calls(model)
    assert expected, "the model should have weight layers"
    missing = [n for n in expected if n not in names]
    assert not missing, missing


def _quiet(report: Any) -> None:
    assert report.ok, report.summary()
    assert "notes" not in report.meta or not any("rule" in n for n in report.meta["notes"])


def gpt2() -> tuple[nn.Module, dict[str, Any]]:
    # GPT2Config warns that its default bos/eos id 50256 lies outside a 1000-token vocabulary: harmless here
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)
    return tf.GPT2Model(cfg).eval(), {"input_ids": torch.randint(0, 1000, (4, 16)), "use_cache": False}


def bert(act: str = "gelu") -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        vocab_size=1000, max_position_embeddings=64, hidden_act=act)
    return tf.BertModel(cfg).eval(), {"input_ids": torch.randint(0, 1000, (4, 16))}


def resnet() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[3, 4, 6, 3], layer_type="bottleneck")
    return tf.ResNetModel(cfg), {"pixel_values": torch.randn(4, 3, 32, 32)}


def vit(initializer_range: float = 0.02) -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=128, initializer_range=initializer_range)
    return tf.ViTModel(cfg).eval(), {"pixel_values": torch.randn(4, 3, 32, 32)}


def test_gpt2_covered_clean_and_nan_located() -> None:
    model, inputs = gpt2()
    report = diagnose(model, inputs, predicted=False)
    _covered(model, report)
    assert sum(layer.kind == "Conv1D" for layer in report.trace) == 8  # c_attn, c_proj, c_fc, c_proj per block
    _quiet(report)  # a pre-LN transformer at its own init: each role keeps its scale from block to block
    with torch.no_grad():
        model.h[1].mlp.c_fc.weight[0, 0] = float("nan")
    report = diagnose(model, inputs, predicted=False)
    first = report.by_kind("nonfinite")[0]
    assert first.layer == "h.1.mlp.c_fc" and "first layer whose output holds inf/NaN" in first.message
    assert "h.1.ln_2" in first.message  # the finite layer before it is named with its peak


def test_bert_covered_clean_and_dead_relu_units() -> None:
    model, inputs = bert()
    report = diagnose(model, inputs, predicted=False)
    _covered(model, report)
    _quiet(report)
    model, inputs = bert("relu")
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.bias.fill_(-50.0)
    report = diagnose(model, inputs, predicted=False)
    dead = report.by_kind("dead_units")[0]
    assert dead.layer == "encoder.layer.0.intermediate.intermediate_act_fn" and dead.severity == "error"
    assert "100.0% of its 128 units" in dead.message and "mean -50" in dead.message
    assert "re-initialize encoder.layer.0.intermediate.dense with zero bias" in dead.fix


def test_resnet_bottleneck_covered_and_normalized_layers_not_blamed() -> None:
    model, inputs = resnet()
    # stem, 3 shortcuts (stage 0 keeps 8 channels at stride 1: none there), 3 convs per bottleneck
    assert len(_weight_calls(model)) == 1 + 3 + 3 * (3 + 4 + 6 + 3)
    report = diagnose(model.train(), inputs, predicted=False)
    _covered(model, report)
    # every conv feeds a BatchNorm, which divides its scale out: no drift is blamed on a conv
    assert not report.kinds & {"exploding", "vanishing", "grad_exploding", "grad_vanishing"}, report.summary()
    report = diagnose(model.eval(), inputs, predicted=False)
    assert any("BatchNorm layers" in n and "model.train()" in n for n in report.meta["notes"])


def test_vit_covered_clean_and_large_init_saturates_the_pooler() -> None:
    model, inputs = vit()
    report = diagnose(model, inputs, predicted=False)
    _covered(model, report)
    _quiet(report)
    model, inputs = vit(initializer_range=1.0)
    report = diagnose(model, inputs, predicted=False)
    sats = {f.layer: f for f in report.by_kind("saturation")}
    sat = sats["pooler.activation"]
    assert sat.data["sat_frac"] > 0.5
    # queries and keys at std 1.0 (fan_in 64: 8x the 1/sqrt(fan_in) scale) make the attention one-hot too
    assert any(f.data.get("attention") for f in sats.values())
    # the fix quotes the plan auto_init_ applies: the pooler's dense layer starts a tanh chain (mean field)
    step = sp.fix.plan(model, example_inputs=inputs)["pooler.dense"]
    assert sat.data["fix_scheme"] == step.scheme == "mean_field_input"
    assert sat.data["fix_std"] == pytest.approx(step.std, rel=1e-6)
    assert "sets pooler.dense to mean-field critical (first layer of the chain) for tanh: std = sqrt(" in sat.fix


def _llama() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)
    return tf.LlamaModel(cfg).eval(), {"input_ids": torch.randint(0, 1000, (2, 16)), "use_cache": False}


def _distilbert() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=1000, max_position_embeddings=64)
    return tf.DistilBertModel(cfg).eval(), {"input_ids": torch.randint(0, 1000, (2, 16))}


def _convnext() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], num_channels=3)
    return tf.ConvNextModel(cfg).eval(), {"pixel_values": torch.randn(2, 3, 64, 64)}


def _t5() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, vocab_size=1000)
    ids = torch.randint(0, 1000, (2, 12))
    return tf.T5Model(cfg).eval(), {"input_ids": ids, "decoder_input_ids": ids, "use_cache": False}


@pytest.mark.parametrize("build", [_llama, _distilbert, _convnext, _t5], ids=["llama", "distilbert", "convnext", "t5"])
def test_other_architectures_run_and_are_covered(build: Any) -> None:
    model, inputs = build()
    report = diagnose(model, inputs, predicted=False)
    _covered(model, report)
    assert not report.by_kind("nonfinite")
    assert "notes" not in report.meta or not any("rule" in n or "probe" in n for n in report.meta["notes"])


DRIFT = {"exploding", "vanishing", "grad_exploding", "grad_vanishing"}


@pytest.mark.slow
def test_mobilevit_collapse_is_vanishing_from_its_normalization_gains() -> None:
    # transformers draws MobileViT's BatchNorm gains around 0.02: the signal collapses to ~1e-8 through the
    # convolutions (all normalized, so not judged one by one) and LayerNorm's eps lets it climb back later
    cfg = tf.MobileViTConfig(image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 48, 64, 160],
                             num_attention_heads=2)
    model, x = tf.MobileViTModel(cfg), torch.randn(2, 3, 64, 64)
    report = diagnose(model, x, predicted=False)
    assert not report.by_kind("exploding"), report.summary()
    f = report.by_kind("vanishing")[0]
    assert f.severity == "error" and f.data["basis"] == "unit" and f.data["ratio"] < 1e-4
    assert f.data["cause"] == "normalization_gain" and "BatchNorm2d" in f.fix and "ones_" in f.fix
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    assert not diagnose(model, x, predicted=False).kinds & DRIFT


def test_vit_mae_zero_class_token_gradient_is_flagged() -> None:
    # ViT-MAE leaves cls_token and the position table at zero: the class-token row reaches each LayerNorm with
    # no variance, and the norm's backward multiplies its gradient by up to 1/sqrt(eps) = 316
    cfg = tf.ViTMAEConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                          intermediate_size=128)
    model, x = tf.ViTMAEModel(cfg), torch.randn(2, 3, 32, 32)
    report = diagnose(model, x, predicted=False)
    f = report.by_kind("grad_exploding")[0]
    # real but confined to the class-token row and the parameters behind it: a warning that says so
    assert f.layer == "embeddings" and f.severity == "warning" and f.data["ratio"] > 1e3
    assert f.data["cause"] == "zero_tensors"
    assert "cls_token" in f.message and "trunc_normal_" in f.fix
    with torch.no_grad():
        nn.init.trunc_normal_(model.embeddings.cls_token, std=0.02)
    assert not diagnose(model, x, predicted=False).kinds & DRIFT
