"""predict on transformers models built from small configs (random weights, nothing downloaded): language
models from token ids (Llama also as people call it, without ``use_cache``), Mamba's selective scan, a vision
transformer, Segformer's bilinear decoder, Whisper's two inputs; diagnose shows the prediction beside the
measurement."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from signalprop.diagnosis import diagnose
from signalprop.prediction import predict

tf = pytest.importorskip("transformers", reason="transformers is a dev extra (real architectures)")


def gpt2() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=64, bos_token_id=0,
                        eos_token_id=0)
    return tf.GPT2Model(cfg).eval(), {"input_ids": torch.randint(0, 1000, (4, 16)), "use_cache": False}


def llama() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1000, max_position_embeddings=64)
    return tf.LlamaModel(cfg).eval(), {"input_ids": torch.randint(0, 1000, (4, 16)), "use_cache": False}


def bert() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                        vocab_size=1000, max_position_embeddings=64)
    ids = torch.randint(0, 1000, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[:2, 12:] = 0  # two padded sequences: the mask enters the attention as a known value
    return tf.BertModel(cfg).eval(), {"input_ids": ids, "attention_mask": mask}


def vit() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128)
    return tf.ViTModel(cfg).eval(), {"pixel_values": torch.randn(4, 3, 32, 32)}


def segformer() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                             num_attention_heads=[1, 2], decoder_hidden_size=32, num_labels=4, patch_sizes=[7, 3],
                             strides=[4, 2], mlp_ratios=[2, 2])
    return tf.SegformerForSemanticSegmentation(cfg).eval(), {"pixel_values": torch.randn(4, 3, 32, 32)}


def whisper() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                           max_source_positions=16, max_target_positions=32, vocab_size=1000, pad_token_id=0,
                           bos_token_id=0, eos_token_id=0, decoder_start_token_id=0)
    return tf.WhisperModel(cfg).eval(), {"input_features": torch.randn(4, 16, 32),
                                         "decoder_input_ids": torch.randint(0, 1000, (4, 8)), "use_cache": False}


def llama_as_called() -> tuple[nn.Module, dict[str, Any]]:
    """Llama called as people call it, token ids alone: capture asks for ``use_cache=False`` itself."""
    model, inputs = llama()
    return model, {"input_ids": inputs["input_ids"]}


def mamba() -> tuple[nn.Module, dict[str, Any]]:
    cfg = tf.MambaConfig(hidden_size=64, state_size=8, num_hidden_layers=2, vocab_size=1000)
    return tf.MambaModel(cfg).eval(), {"input_ids": torch.randint(0, 1000, (4, 16))}


MODELS: dict[str, Callable[[], tuple[nn.Module, dict[str, Any]]]] = {
    "gpt2": gpt2, "llama": llama, "llama_as_called": llama_as_called, "bert": bert, "vit": vit,
    "segformer": segformer, "whisper": whisper, "mamba": mamba}


def ratios(report: Any) -> list[float]:
    """predicted / measured forward std per module call whose prediction is random (not a known value)."""
    out = []
    for layer in report.trace:
        p = report.predicted[layer.name].fwd
        if not (layer.fwd.std > 0 and p.std > 0 and math.isfinite(p.std)) or p.var_band[0] == p.var_band[1]:
            continue
        out.append(p.std / layer.fwd.std)
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_diagnose_predicts_transformers(name: str) -> None:
    """Every one of these got no prediction before (token ids, two inputs, gather, bilinear upsampling,
    attention passed through). Now diagnose attaches one with no warning, and its forward std sits on the
    measurement: the median over module calls of predicted / measured within 5% (seen: 0.99-1.03 over seeds
    0-2 on the first six; Llama called with ids alone 1.00 and Mamba 1.00, extremes 0.96-1.25), none off by
    more than 2x (the largest seen, 1.6x, is one Segformer attention of 16
    channels whose values happened to correlate across positions), and the band holds the measurement at
    80% of the calls or more (seen 95-100%; each band is a 90% one)."""
    model, inputs = MODELS[name]()
    report = diagnose(model, inputs)
    notes = report.meta.get("notes", [])
    assert report.predicted is not None, notes
    assert not [n for n in notes if n.startswith(("no prediction", "predict:"))], notes
    r = ratios(report)
    assert len(r) >= 10
    assert abs(math.log(statistics.median(r))) < math.log(1.05), sorted(r)
    assert all(abs(math.log(x)) < math.log(2.0) for x in r), sorted(r)
    inside = [report.predicted[la.name].fwd.var_band[0] <= la.fwd.var <= report.predicted[la.name].fwd.var_band[1]
              for la in report.trace if report.predicted[la.name].fwd.var_band is not None]
    assert sum(inside) >= 0.8 * len(inside)


def test_predict_leaves_a_fresh_transformers_model_working() -> None:
    """A model that installs hooks on its first forward and marks itself done (transformers' output
    capture) still works after predict captured it first: same output as an untouched copy."""
    torch.manual_seed(0)
    model, inputs = segformer()
    twin = tf.SegformerForSemanticSegmentation(model.config).eval()
    twin.load_state_dict(model.state_dict())
    predict(model, inputs=inputs)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, twin(**inputs).logits)
