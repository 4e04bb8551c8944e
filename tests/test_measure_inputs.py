"""How measure feeds the model: private copies of the inputs that are leaves requiring no grad (as in a training
loop), so a model may mark its own input (Wav2Vec2 in train mode does), and gradients still reach every call,
frozen layers included."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import signalprop as sp

tf = pytest.importorskip("transformers", reason="transformers is a dev extra (real architectures)")


def _wav2vec2(**kwargs: float) -> nn.Module:
    cfg = tf.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        **kwargs,
    )
    torch.manual_seed(0)
    return tf.Wav2Vec2Model(cfg)  # built in train mode, as transformers builds it


def test_wav2vec2_in_train_mode_is_measured_and_diagnosed() -> None:
    """Its feature encoder sets ``requires_grad = True`` on a view of its input in train mode, which torch allows
    on a leaf only: measure must not hand it a non-leaf."""
    model = _wav2vec2()
    assert model.training
    x = torch.randn(4, 1600)
    trace = sp.measure(model, x)
    convs = [layer for layer in trace if layer.kind == "Conv1d"]
    linears = [layer for layer in trace if layer.kind == "Linear"]
    assert len(convs) == 2 and len(linears) == 13
    # SpecAugment writes the projection's output in place through a view (hidden_states[mask] = ...); torch
    # then runs no hook registered on that view before the write, so those two calls carry no gradient
    masked = {"feature_projection.projection", "feature_projection.dropout"}
    assert {layer.name for layer in trace if layer.bwd is None} == masked
    assert all(layer.bwd is not None and math.isfinite(layer.bwd.rms) for layer in convs + linears
               if layer.name not in masked)
    # the backward starts from a standard-normal cotangent on last_hidden_state, the root's output
    root = trace["(root)"]
    assert root.bwd is not None
    n = root.bwd.numel
    assert abs(root.bwd.rms**2 - 1.0) < 4 * math.sqrt(2.0 / n)
    report = sp.diagnose(model, x)
    assert report.trace.names == trace.names


def test_wav2vec2_train_mode_measurements_repeat() -> None:
    """Layerdrop (``torch.rand``) and dropout draw from measure's own generator: the same masks every call.
    SpecAugment's time masks come from numpy's global generator, which is the model's own business, so it is
    off here."""
    model = _wav2vec2(mask_time_prob=0.0)
    x = torch.randn(2, 1600)
    assert sp.measure(model, x) == sp.measure(model, x)


def test_frozen_model_with_float_input_gets_every_gradient() -> None:
    """No parameter requires grad and the LSTM returns a tuple: the graph starts at the leaf modules that read
    the input, so every call still gets its output gradient."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), _LastStep(nn.LSTM(16, 16, batch_first=True)), nn.Linear(16, 4))
    model.requires_grad_(False)
    x = torch.randn(4, 5, 8)
    trace = sp.measure(model, x)
    assert trace.names == ["0", "1", "2.lstm", "3"]
    assert all(layer.bwd is not None for layer in trace)
    assert not x.requires_grad and x.grad is None


class _LastStep(nn.Module):
    def __init__(self, lstm: nn.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0][:, -1]


def test_model_that_marks_its_input_requires_grad() -> None:
    """The pattern of Wav2Vec2's feature encoder, in plain PyTorch."""

    class Marks(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x[:, None]
            if self.training:
                h.requires_grad = True
            return self.conv(h)

    model = Marks().train()
    x = torch.randn(2, 10)
    trace = sp.measure(model, x)
    assert trace["conv"].bwd is not None and trace["conv"].bwd.numel == 2 * 4 * 8
    assert not x.requires_grad
