"""A new user's trial of signalprop on ~35 models it was not built for (issue 18).

What it checks, and why. signalprop's promise is: if the signal is out of range, ``sp.diagnose`` says where and
why, and ``sp.fix`` makes it right. A false "ok" is the worst answer (CI passes a broken model), so this
harness builds many small models the way their users build them and, for each, two variants:

* ``sound``: the model's own default init (transformers' ``_init_weights``; PyTorch's defaults for RNNs and
  embeddings) or the textbook init a person would write for a hand-written net (``kaiming_normal_`` for
  ReLU/GELU layers, ``xavier_normal_`` for tanh layers, biases zero). It SHOULD be judged clean: an
  error-severity finding is a *false alarm* (unless the independent check below shows the signal really
  drifts more than 100x, e.g. a default init that is itself bad).
* ``naive``: every weight (every parameter with 2 or more dimensions; through ``weight_norm`` the effective
  weight) drawn from N(0, 1). It MUST be flagged: ``report.ok`` False with an exploding, vanishing,
  saturation, non-finite or overflow finding. ``ok`` True is a *false ok*; flagged only for other reasons
  (mean drift, dead units) is a *wrong kind*.

For every variant it then applies ``sp.fix.auto_init_(model, example_inputs=...)`` and, on a fresh copy,
``sp.fix.lsuv_(model, inputs)``, and diagnoses again: the result should be clean (``ok`` True), and never
worse than before (more error findings, a new non-finite finding, or a crash). It also lists weights the fix
left bitwise unchanged (a silent no-op on the naive variant leaves N(0, 1) weights in place) and whether a
meta-device model is still on meta afterwards. ``sp.predict(model, inputs=inputs)`` is called once per
model (the example inputs, so token ids stay integers); predict coverage is the share of models that get a
prediction.

Each diagnosis is compared with an independent measurement made here with plain forward hooks (output std
of every weight layer in call order, the gradient at those outputs from a seeded N(0, 1) cotangent), so a
verdict in the wrong direction (vanishing called exploding) is caught too.

Only the public API is used (``sp.diagnose``, ``sp.predict``, ``sp.fix.auto_init_``, ``sp.fix.lsuv_``,
``sp.SignalpropError``). Nothing is downloaded: transformers models come from small configs with random
weights. Every step runs under try/except and a time limit, so one crash does not stop the trial.

Run (3.5 minutes on 2 quiet CPU cores, 13 under a load average of 8; ``--quick``: 6 models, 20 s)::

    .venv/bin/python bench/trial.py [--quick] [--only NAME ...] [--json results.json] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import time
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import signalprop as sp

SIGNAL_KINDS = {"exploding", "vanishing", "grad_exploding", "grad_vanishing", "saturation", "nonfinite",
                "overflow_risk"}
"""Finding kinds that say the signal is out of range (what the naive variant must get)."""

FACTOR = 10.0  # diagnose's default drift factor; the independent check uses the same
BROKEN = 100.0  # an independent drift beyond this means the sound variant's own init really is bad


# --------------------------------------------------------------------------------------------- the cases

@dataclass
class Case:
    name: str
    group: str  # "transformers" or "torch"
    build: Callable[[], tuple[nn.Module, Any]]  # (model in its sound init, inputs); seeded by the caller
    quick: bool = False  # in the --quick subset
    degenerate: bool = False  # a batch nobody can judge: a clear refusal or a not-ok "cannot judge" is right
    meta: bool = False  # built on the meta device; the fixes get the un-materialized model
    note: str = ""


def _wn_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The norm weight_norm divides v by: over every dim where g has size 1 (dim 0 by default; wav2vec2 uses 2)."""
    return v.norm(dim=[d for d in range(v.dim()) if g.shape[d] == 1], keepdim=True)


def _fill_(model: nn.Module, draw: Callable[[torch.Tensor], Any], skip_embeddings: bool = True,
           only: Callable[[nn.Module], bool] | None = None) -> nn.Module:
    """Draw every weight (>=2-D parameter) of ``model`` with ``draw``, biases zeroed, ties drawn once.

    A ``weight_norm`` parametrization gets its direction v drawn and its magnitude g set to v's row norms,
    so the effective weight is the drawn tensor. Embeddings (and weights tied to them) keep their own init
    when ``skip_embeddings``; RNN weights are drawn only when ``only`` says so.
    """
    seen: set[int] = set()
    if skip_embeddings:
        seen |= {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    with torch.no_grad():
        for mod in model.modules():
            if only is not None and not only(mod):
                continue
            if parametrize.is_parametrized(mod, "weight"):
                plist = mod.parametrizations["weight"]
                g, v = plist.original0, plist.original1
                if id(v) not in seen:
                    seen.add(id(v))
                    draw(v)
                    g.copy_(_wn_norm(v, g))
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in seen or p.dim() < 2:
                    if p.dim() < 2 and pname.startswith("bias") and not isinstance(mod, nn.RNNBase):
                        p.zero_()
                    continue
                seen.add(id(p))
                draw(p)
    return model


def he_(model: nn.Module) -> nn.Module:
    """``kaiming_normal_(nonlinearity="relu")`` on every weight but embeddings and RNNs, zero biases."""
    return _fill_(model, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
                  only=lambda m: not isinstance(m, nn.RNNBase))


def glorot_(model: nn.Module) -> nn.Module:
    """``xavier_normal_`` (Glorot & Bengio 2010, made for tanh) on every weight, zero biases."""
    return _fill_(model, nn.init.xavier_normal_, only=lambda m: not isinstance(m, nn.RNNBase))


def naive_(model: nn.Module) -> nn.Module:
    """Every >=2-D parameter (embeddings, RNN and custom weights too) from N(0, 1); biases left alone."""
    seen: set[int] = set()
    with torch.no_grad():
        for mod in model.modules():
            if parametrize.is_parametrized(mod, "weight"):
                plist = mod.parametrizations["weight"]
                v, g = plist.original1, plist.original0
                seen |= {id(v), id(g)}
                v.normal_()
                g.copy_(_wn_norm(v, g))
        for p in model.parameters():
            if id(p) not in seen and p.dim() >= 2:
                seen.add(id(p))
                p.normal_()
    return model


def _mlp(depth: int, width: int, act: Callable[[], nn.Module], bias: bool = True, d_in: int = 32) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width, bias=bias), act()]
    layers.append(nn.Linear(width, 10, bias=bias))
    return nn.Sequential(*layers)


def _relu_cnn(depth: int = 10, width: int = 16) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    return nn.Sequential(*layers)


def _stage(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU())


def stages_odict() -> tuple[nn.Module, Any]:
    """Issue 18's example: identical named stages in an OrderedDict Sequential."""
    net = nn.Sequential(OrderedDict(s1=_stage(3, 16), s2=_stage(16, 16), s3=_stage(16, 16), s4=_stage(16, 16),
                                    pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(16, 10)))
    return he_(net), torch.randn(8, 3, 16, 16)


def stages_flat() -> tuple[nn.Module, Any]:
    """The same layers as stages_odict in one flat Sequential (the control)."""
    net = nn.Sequential(*[m for i in range(4) for m in _stage(3 if i == 0 else 16, 16)],
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return he_(net), torch.randn(8, 3, 16, 16)


class LoopMLP(nn.Module):
    def __init__(self, depth: int = 12, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.inp(x))
        for blk in self.blocks:
            x = F.relu(blk(x))
        return self.out(x)


class ResidualMLP(nn.Module):
    """x + W2 relu(W1 x), no normalization."""

    def __init__(self, blocks: int = 6, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.fc1 = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.fc2 = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.out = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for a, b in zip(self.fc1, self.fc2):
            x = x + b(F.relu(a(x)))
        return self.out(F.relu(x))


class UNet(nn.Module):
    """Two-level UNet with concatenated skips and transposed-convolution upsampling."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU())

        self.enc1, self.enc2, self.mid = block(3, c), block(c, 2 * c), block(2 * c, 4 * c)
        self.up2, self.dec2 = nn.ConvTranspose2d(4 * c, 2 * c, 2, stride=2), block(4 * c, 2 * c)
        self.up1, self.dec1 = nn.ConvTranspose2d(2 * c, c, 2, stride=2), block(2 * c, c)
        self.head = nn.Conv2d(c, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(m), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.head(d1)


class MyLinear(nn.Module):
    """A custom layer holding its own parameters (not named ``weight``), used through F.linear."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(o, i))
        self.b = nn.Parameter(torch.zeros(o))
        nn.init.kaiming_uniform_(self.w, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.b)


class MyConv(nn.Module):
    """A custom convolution whose parameter is called ``kernel``, used through F.conv2d."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.empty(o, i, 3, 3))
        nn.init.kaiming_uniform_(self.kernel, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel, padding=1)


class CustomNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = MyConv(3, 16), MyConv(16, 16), MyConv(16, 16)
        self.l1, self.l2, self.l3 = MyLinear(16, 64), MyLinear(64, 64), MyLinear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c3(F.relu(self.c2(F.relu(self.c1(x))))))
        x = x.mean(dim=(2, 3))
        return self.l3(F.relu(self.l2(F.relu(self.l1(x)))))


class RNNNet(nn.Module):
    def __init__(self, cell: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = cell(16, 32, num_layers=2, batch_first=True)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """Embedding, ReLU MLP body, output head sharing the embedding's weight."""

    def __init__(self, vocab: int = 100, dim: int = 32, depth: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.body = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(dim, dim), nn.ReLU())])
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.emb(ids)))


def weight_norm_mlp() -> tuple[nn.Module, Any]:
    from torch.nn.utils.parametrizations import weight_norm

    layers: list[nn.Module] = []
    for i in range(8):
        layers += [weight_norm(nn.Linear(32 if i == 0 else 64, 64)), nn.ReLU()]
    layers.append(weight_norm(nn.Linear(64, 10)))
    return he_(nn.Sequential(*layers)), torch.randn(16, 32)


def meta_mlp() -> tuple[nn.Module, Any]:
    """Built on the meta device (as for a big model); the sound/naive variants materialize it first."""
    with torch.device("meta"):
        net = _mlp(10, 64, nn.ReLU)
    return net, torch.randn(16, 32)


def _ids(batch: int = 2, seq: int = 12, vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def _hf(name: str, **cfg: Any) -> nn.Module:
    """transformers' ``name`` from its config class with ``cfg``: random weights, eval mode, no download."""
    import transformers

    config_cls = {"GPT2LMHeadModel": "GPT2Config", "LlamaForCausalLM": "LlamaConfig", "Dinov2Model": "Dinov2Config",
                  "SegformerForSemanticSegmentation": "SegformerConfig", "CLIPVisionModel": "CLIPVisionConfig",
                  "ViTMAEModel": "ViTMAEConfig", "MobileViTModel": "MobileViTConfig"}.get(name)
    config_cls = config_cls or name.replace("Model", "Config")
    return getattr(transformers, name)(getattr(transformers, config_cls)(**cfg)).eval()


_LM = dict(vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=2)
_TX = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def hf_cases() -> list[Case]:
    img = lambda: torch.randn(2, 3, 32, 32)  # noqa: E731
    vit = dict(_TX, image_size=32, patch_size=8)
    whisper = dict(_LM, num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2,
                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                   max_source_positions=16, max_target_positions=16, decoder_start_token_id=0)
    w2v = dict(_TX, conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
               num_conv_pos_embedding_groups=2, vocab_size=20)

    def wav2vec2(train: bool) -> tuple[nn.Module, Any]:
        model = _hf("Wav2Vec2Model", **w2v)
        return model.train(train), torch.randn(2, 1600)

    return [
        Case("gpt2", "transformers", lambda: (_hf("GPT2LMHeadModel", n_layer=2, n_embd=32, n_head=2,
                                                  n_positions=64, **_LM), {"input_ids": _ids()}), quick=True),
        Case("llama", "transformers", lambda: (_hf("LlamaForCausalLM", num_key_value_heads=1, **_TX, **_LM),
                                               {"input_ids": _ids()})),
        Case("bert", "transformers", lambda: (_hf("BertModel", **_TX, **_LM), {"input_ids": _ids()})),
        Case("distilbert", "transformers", lambda: (_hf("DistilBertModel", dim=32, n_layers=2, n_heads=2,
                                                        hidden_dim=64, **_LM), {"input_ids": _ids()})),
        Case("t5", "transformers", lambda: (_hf("T5Model", d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                                                decoder_start_token_id=0, **_LM),
                                            {"input_ids": _ids(), "decoder_input_ids": _ids(seq=6)})),
        Case("mamba", "transformers", lambda: (_hf("MambaModel", hidden_size=32, state_size=4, num_hidden_layers=2,
                                                   **_LM), {"input_ids": _ids()})),
        Case("vit", "transformers", lambda: (_hf("ViTModel", **vit), img()), quick=True),
        Case("vit_mae", "transformers", lambda: (_hf("ViTMAEModel", **vit), img())),
        Case("dinov2", "transformers", lambda: (_hf("Dinov2Model", **vit), img())),
        Case("clip_vision", "transformers", lambda: (_hf("CLIPVisionModel", **vit), img())),
        Case("segformer", "transformers", lambda: (_hf(
            "SegformerForSemanticSegmentation", num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
            hidden_sizes=[8, 16], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
            mlp_ratios=[2, 2], decoder_hidden_size=16, num_labels=3), img())),
        Case("mobilevit", "transformers", lambda: (_hf(
            "MobileViTModel", image_size=32, hidden_sizes=[16, 24, 32],
            neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 48], num_attention_heads=2), img())),
        Case("resnet_hf", "transformers", lambda: (_hf("ResNetModel", embedding_size=8, hidden_sizes=[8, 16],
                                                       depths=[1, 1]), img())),
        Case("convnext", "transformers", lambda: (_hf("ConvNextModel", hidden_sizes=[8, 16], depths=[1, 1],
                                                      num_stages=2), img())),
        Case("whisper", "transformers", lambda: (_hf("WhisperModel", **whisper), {
            "input_features": torch.randn(2, 16, 32), "decoder_input_ids": _ids(seq=6)})),
        Case("whisper_encoder", "transformers", lambda: (_hf("WhisperModel", **whisper).get_encoder(),
                                                         torch.randn(2, 16, 32))),
        Case("wav2vec2_train", "transformers", lambda: wav2vec2(True),
             note="train mode, as transformers builds it"),
        Case("wav2vec2_eval", "transformers", lambda: wav2vec2(False)),
    ]


def torch_cases() -> list[Case]:
    return [
        Case("stages_odict", "torch", stages_odict, quick=True, note="issue 18 item 1"),
        Case("stages_flat", "torch", stages_flat),
        Case("modulelist_mlp", "torch", lambda: (he_(LoopMLP()), torch.randn(16, 32))),
        Case("residual_mlp", "torch", lambda: (he_(ResidualMLP()), torch.randn(16, 32))),
        Case("unet", "torch", lambda: (he_(UNet()), torch.randn(4, 3, 16, 16))),
        Case("custom_params", "torch", lambda: (he_(CustomNet()), torch.randn(8, 3, 8, 8)), quick=True),
        Case("lstm", "torch", lambda: (RNNNet(nn.LSTM), torch.randn(8, 10, 16)), quick=True),
        Case("gru", "torch", lambda: (RNNNet(nn.GRU), torch.randn(8, 10, 16))),
        Case("weight_norm_mlp", "torch", weight_norm_mlp),
        Case("tied_emb_head", "torch", lambda: (he_(TiedLM()), _ids(8))),
        Case("meta_mlp", "torch", meta_mlp, meta=True),
        Case("relu_cnn_batch1", "torch", lambda: (he_(_relu_cnn()), torch.randn(1, 3, 16, 16)), degenerate=True),
        Case("mlp_empty_batch", "torch", lambda: (he_(_mlp(6, 64, nn.ReLU)), torch.randn(0, 32)), degenerate=True),
        Case("tanh_mlp_50", "torch", lambda: (glorot_(_mlp(50, 64, nn.Tanh)), torch.randn(32, 32)), quick=True),
        Case("tanh_mlp_nobias_100", "torch", lambda: (glorot_(_mlp(100, 64, nn.Tanh, bias=False)),
                                                      torch.randn(32, 32))),
        Case("gelu_mlp", "torch", lambda: (he_(_mlp(20, 64, nn.GELU)), torch.randn(32, 32))),
        Case("relu_cnn", "torch", lambda: (he_(_relu_cnn()), torch.randn(8, 3, 16, 16))),
    ]


# ------------------------------------------------------------------------------------------- machinery

class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def handler(signum: int, frame: Any) -> None:
        raise StepTimeout(f"step took longer than {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _short(exc: BaseException, n: int = 160) -> str:
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"


def _first_float(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() else None
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list | tuple) else []
    for v in values:
        t = _first_float(v)
        if t is not None:
            return t
    return None


def _first_tensor(inputs: Any) -> torch.Tensor | None:
    if isinstance(inputs, torch.Tensor):
        return inputs
    for v in inputs.values() if isinstance(inputs, dict) else inputs:
        if isinstance(v, torch.Tensor):
            return v
    return None


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, list | tuple):
        return model(*inputs)
    return model(inputs)


def _weight_modules(model: nn.Module) -> list[nn.Module]:
    out = []
    for mod in model.modules():
        if isinstance(mod, nn.Embedding | nn.EmbeddingBag):
            continue
        own = any(p.dim() >= 2 for p in mod.parameters(recurse=False))
        if own or parametrize.is_parametrized(mod, "weight"):
            out.append(mod)
    return out


def _std(t: torch.Tensor) -> float:
    t = t.detach().double()
    return float(t.std()) if t.numel() > 1 else float("nan")


def independent_check(model: nn.Module, inputs: Any) -> dict[str, Any]:
    """Output std and output-gradient std of every weight layer, in call order, with plain hooks.

    Ratios are to the first weight layer (forward) and to the last one (backward: the gradient flows from
    there), so ``fwd_max``/``fwd_min`` > 100 or < 0.01 means the signal really drifted that far.
    """
    fwd: list[float] = []
    grads: list[torch.Tensor] = []
    handles = []

    def hook(mod: nn.Module, args: Any, out: Any) -> None:
        t = _first_float(out)
        if t is None:
            return
        fwd.append(_std(t))
        if t.requires_grad:
            holder = torch.zeros(0)
            grads.append(holder)
            idx = len(grads) - 1
            t.register_hook(lambda g, i=idx: grads.__setitem__(i, g.detach()))

    for mod in _weight_modules(model):
        handles.append(mod.register_forward_hook(hook))
    try:
        out = _first_float(_call(model, inputs))
        if out is not None and out.requires_grad:
            gen = torch.Generator().manual_seed(0)
            (out * torch.randn(out.shape, generator=gen)).sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    bwd = [_std(g) if g.numel() else float("nan") for g in grads]

    def ratios(vals: list[float], ref: float) -> tuple[float, float]:
        r = [v / ref for v in vals if math.isfinite(v) and ref > 0 and math.isfinite(ref)]
        return (max(r), min(r)) if r else (float("nan"), float("nan"))

    fref = next((v for v in fwd if math.isfinite(v) and v > 0), float("nan"))
    bref = next((v for v in reversed(bwd) if math.isfinite(v) and v > 0), float("nan"))  # last layer reached
    fmax, fmin = ratios(fwd, fref)
    bmax, bmin = ratios(bwd, bref)
    nonfinite = any(not math.isfinite(v) for v in fwd + bwd if not math.isnan(v)) or (
        out is not None and not bool(torch.isfinite(out).all()))
    return {"layers": len(fwd), "out_std": _std(out) if out is not None else None,
            "fwd_first": fwd[0] if fwd else None, "fwd_last": fwd[-1] if fwd else None,
            "fwd_max": fmax, "fwd_min": fmin, "grad_max": bmax, "grad_min": bmin, "nonfinite": nonfinite}


def _direction(vmax: float, vmin: float) -> str:
    up = math.isfinite(vmax) and vmax >= FACTOR
    down = math.isfinite(vmin) and vmin <= 1 / FACTOR
    return "both" if up and down else "up" if up else "down" if down else "none"


def run_diagnose(model: nn.Module, inputs: Any, limit: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"status": "crash", "ok": None, "findings": [], "error": None}
    t0 = time.perf_counter()
    try:
        with time_limit(limit), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = sp.diagnose(model, inputs)
        rec["ok"] = bool(report.ok)
        rec["findings"] = [{"severity": f.severity, "kind": f.kind, "layer": f.layer, "message": f.message[:300]}
                           for f in report.findings]
        rec["predicted"] = report.predicted is not None
        rec["notes"] = [str(n)[:200] for n in (report.meta.get("notes") or [])]
        rec["status"] = "ok" if report.ok else "flagged"
    except StepTimeout as exc:
        rec.update(status="timeout", error=str(exc))
    except sp.SignalpropError as exc:
        rec.update(status="refused", error=_short(exc))
    except Exception as exc:  # noqa: BLE001 - the trial records every crash
        rec.update(status="crash", error=_short(exc), where=traceback.format_exc().splitlines()[-3][:200])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def judge(case: Case, variant: str, diag: dict[str, Any], truth: dict[str, Any] | None) -> str:
    """One word for how the diagnosis went (upper case: a failure)."""
    if diag["status"] in ("crash", "timeout"):
        return "CRASH"
    if diag["status"] == "refused":
        return "refused" if case.degenerate else "CRASH"
    bad = [f for f in diag["findings"] if f["severity"] in ("warning", "error")]
    kinds = {f["kind"] for f in bad}
    if case.degenerate and case.name.endswith("empty_batch"):
        return "cannot-judge" if not diag["ok"] else "FALSE-OK"
    if truth is not None:
        for up_kind, down_kind, d in (("exploding", "vanishing", _direction(truth["fwd_max"], truth["fwd_min"])),
                                      ("grad_exploding", "grad_vanishing",
                                       _direction(truth["grad_max"], truth["grad_min"]))):
            if (up_kind in kinds and down_kind not in kinds and d == "down") or (
                    down_kind in kinds and up_kind not in kinds and d == "up"):
                return "WRONG-DIRECTION"
    if variant == "naive":
        if diag["ok"]:
            return "FALSE-OK"
        if not kinds & SIGNAL_KINDS:
            return "WRONG-KIND"
        drift = truth is not None and not (1 / BROKEN < truth["fwd_min"] and truth["fwd_max"] < BROKEN)
        if drift and not any(f["severity"] == "error" for f in bad if f["kind"] in SIGNAL_KINDS):
            return "UNDERSTATED"  # the forward signal drifts > 100x (independent check), only a warning
        return "flagged"
    errors = [f for f in bad if f["severity"] == "error"]
    if not errors:
        return "clean" if diag["ok"] else "warned"
    if truth is not None and (not (1 / BROKEN < truth["fwd_min"] and truth["fwd_max"] < BROKEN)
                              or truth["nonfinite"]):
        return "true-alarm"  # the default init itself drifts more than 100x
    return "FALSE-ALARM"


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every >=2-D parameter but embeddings (N(0, 1) is their PyTorch default; tokens and position tables
    alike), to see what a fix changed."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if p.dim() >= 2 and not p.is_meta and id(p) not in emb
            and not any(k in n.rsplit(".", 1)[-1] for k in ("embed", "token"))}


def run_fix(case: Case, variant: str, fix: str, make: Callable[[], tuple[nn.Module, Any]],
            before: dict[str, Any], limit: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"fix": fix, "status": "crash", "error": None}
    try:
        model, inputs = make()
    except Exception as exc:  # noqa: BLE001
        rec.update(status="harness-error", error=_short(exc), verdict="HARNESS-ERROR")
        return rec
    old = _weights(model)
    t0 = time.perf_counter()
    try:
        with time_limit(limit), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if fix == "auto_init_":
                sp.fix.auto_init_(model, example_inputs=inputs)
            else:
                sp.fix.lsuv_(model, inputs)
        msgs = [str(w.message) for w in caught if "signalprop" in (w.filename or "") or "signalprop" in str(
            w.category.__module__)]
        rec["warnings"] = [" ".join(m.split())[:200] for m in msgs[:3]]
        rec["status"] = "done"
    except StepTimeout as exc:
        rec.update(status="timeout", error=str(exc))
    except sp.SignalpropError as exc:
        rec.update(status="refused", error=_short(exc))
    except Exception as exc:  # noqa: BLE001
        rec.update(status="crash", error=_short(exc), where=traceback.format_exc().splitlines()[-3][:200])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["still_meta"] = any(p.is_meta for p in model.parameters())
    new = _weights(model)
    rec["unchanged"] = [n for n, w in old.items() if n in new and torch.equal(w, new[n])] if (
        rec["status"] == "done") else []
    rec["nonfinite_weights"] = [n for n, w in new.items() if not bool(torch.isfinite(w).all())]
    if rec["status"] != "done":
        rec["verdict"] = "refused" if rec["status"] == "refused" else "FIX-CRASH"
        return rec
    after = run_diagnose(model, inputs, limit)
    rec["after"] = after
    n_err = lambda d: sum(f["severity"] == "error" for f in d["findings"])  # noqa: E731
    has_nf = lambda d: any(f["kind"] == "nonfinite" for f in d["findings"])  # noqa: E731
    crashed = lambda d: d["status"] in ("crash", "timeout")  # noqa: E731
    worse = (crashed(after) and not crashed(before)) or n_err(after) > n_err(before) or (
        has_nf(after) and not has_nf(before))
    rec["clean"] = after["status"] == "ok"
    rec["worse"] = bool(worse)
    rec["verdict"] = "WORSE" if worse else "clean" if rec["clean"] else "NOT-CLEAN"
    if rec["nonfinite_weights"]:
        rec["verdict"] = "WORSE"
    if case.degenerate and after["status"] == "refused":
        rec["verdict"] = "refused"
    elif case.name.endswith("empty_batch") and after["ok"]:
        rec["verdict"] = "FALSE-OK"  # nothing to judge on an empty batch, yet ok
    return rec


def run_predict(model: nn.Module, inputs: Any, limit: float) -> dict[str, Any]:
    rec: dict[str, Any] = {"ok": False, "error": None, "warnings": []}
    first = _first_tensor(inputs)
    if first is None:
        rec["error"] = "no tensor input"
        return rec
    rec["shape"] = list(first.shape[1:])
    t0 = time.perf_counter()
    try:
        with time_limit(limit), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trace = sp.predict(model, inputs=inputs)  # token ids are data: a shape alone would make floats
        rec["ok"] = len(trace) > 0
        rec["layers"] = len(trace)
        rec["warnings"] = [" ".join(str(w.message).split())[:200] for w in caught
                           if "Predict" in w.category.__name__][:3]
    except StepTimeout as exc:
        rec["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001
        rec["error"] = _short(exc)
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def variant_maker(case: Case, variant: str, seed: int, for_fix: bool = False
                  ) -> Callable[[], tuple[nn.Module, Any]]:
    def make() -> tuple[nn.Module, Any]:
        torch.manual_seed(seed)
        model, inputs = case.build()
        if case.meta and not for_fix:
            model = model.to_empty(device="cpu")
            he_(model)
        if variant == "naive" and not (case.meta and for_fix):
            naive_(model)
        return model, inputs

    return make


def run_case(case: Case, seed: int, limit: float) -> dict[str, Any]:
    out: dict[str, Any] = {"model": case.name, "group": case.group, "note": case.note, "variants": {}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, inputs = variant_maker(case, "sound", seed)()
        out["predict"] = run_predict(model, inputs, limit)
    except Exception as exc:  # noqa: BLE001
        out["build_error"] = _short(exc)
        out["predict"] = {"ok": False, "error": "build failed"}
        return out
    for variant in ("sound", "naive"):
        make = variant_maker(case, variant, seed)
        rec: dict[str, Any] = {}
        out["variants"][variant] = rec
        try:
            with warnings.catch_warnings(), time_limit(limit):
                warnings.simplefilter("ignore")
                m, x = make()
                rec["truth"] = independent_check(m, x)
        except Exception as exc:  # noqa: BLE001
            rec["truth"] = None
            rec["truth_error"] = _short(exc)
        try:
            m, x = make()
        except Exception as exc:  # noqa: BLE001 - a bug of this harness, not of signalprop: shown apart
            rec.update(verdict="HARNESS-ERROR", error=_short(exc), fixes={})
            rec["diagnose"] = {"status": "crash", "error": _short(exc), "findings": [], "ok": None}
            continue
        rec["diagnose"] = run_diagnose(m, x, limit)
        rec["verdict"] = judge(case, variant, rec["diagnose"], rec["truth"])
        rec["fixes"] = {fix: run_fix(case, variant, fix, variant_maker(case, variant, seed, for_fix=True),
                                     rec["diagnose"], limit) for fix in ("auto_init_", "lsuv_")}
    return out


# ------------------------------------------------------------------------------------------- reporting

def _findings_text(diag: dict[str, Any], n: int = 3) -> str:
    if diag["status"] in ("crash", "timeout", "refused"):
        return diag["error"] or diag["status"]
    bad = [f for f in diag["findings"] if f["severity"] != "info"]
    if not bad:
        return "ok" if diag["ok"] else "not ok, no warning"
    parts = [f"{f['severity'][0]}:{f['kind']}@{f['layer'] or '-'}" for f in bad[:n]]
    return " ".join(parts) + (f" +{len(bad) - n}" if len(bad) > n else "")


def _fix_text(rec: dict[str, Any]) -> str:
    text = rec["verdict"]
    if rec["status"] != "done":
        return f"{text} ({rec['error']})"
    if not rec["clean"]:
        text += f" [{_findings_text(rec['after'], 2)}]"
    if rec.get("unchanged"):
        text += f" unchanged:{len(rec['unchanged'])}"
    if rec.get("nonfinite_weights"):
        text += f" NONFINITE-WEIGHTS:{len(rec['nonfinite_weights'])}"
    if rec.get("still_meta"):
        text += " STILL-META"
    return text


def _g(x: Any) -> str:
    return f"{x:.2g}" if isinstance(x, float) and math.isfinite(x) else "-"


def print_table(results: list[dict[str, Any]]) -> None:
    print(f"{'model':<20} {'variant':<6} {'verdict':<15} {'indep fwd max/min':<17} {'grad max/min':<13} "
          f"{'diagnose':<60} | auto_init_ | lsuv_")
    for r in results:
        if "build_error" in r:
            print(f"{r['model']:<20} {'-':<6} {'BUILD-ERROR':<15} {r['build_error']}")
            continue
        for variant, v in r["variants"].items():
            t = v.get("truth") or {}
            fwd = f"{_g(t.get('fwd_max'))}/{_g(t.get('fwd_min'))}"
            grad = f"{_g(t.get('grad_max'))}/{_g(t.get('grad_min'))}"
            fixes = " | ".join(_fix_text(fx) for fx in v["fixes"].values())
            print(f"{r['model']:<20} {variant:<6} {v['verdict']:<15} {fwd:<17} {grad:<13} "
                  f"{_findings_text(v['diagnose'])[:60]:<60} | {fixes}")
    print()
    print("predict:")
    for r in results:
        p = r.get("predict", {})
        what = f"ok ({p.get('layers')} calls)" if p.get("ok") else f"FAILED: {p.get('error')}"
        if p.get("warnings"):
            what += f"; warns: {p['warnings'][0][:100]}"
        print(f"  {r['model']:<20} {what}")


def _fix_crashed(fx: dict[str, Any]) -> bool:
    """The fix itself raised something other than SignalpropError (a crash of the diagnosis after it, as on a
    model diagnose cannot run on at all, counts as not clean)."""
    return fx["verdict"] == "FIX-CRASH"


def totals(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts the issue asks for; fix counts are over (model, variant, fix) runs."""
    t: dict[str, Any] = {"models": len(results), "false_ok": 0, "understated": 0, "wrong_kind": 0,
                         "wrong_direction": 0, "false_alarm": 0, "diagnose_crash": 0, "fix_runs": 0,
                         "fix_crash": 0, "fix_refused": 0, "fix_not_clean": 0, "fix_worse": 0,
                         "fix_left_weights_unchanged": 0, "predict_ok": 0, "build_error": 0, "harness_error": 0}
    clean_naive: dict[str, list[int]] = {}
    for r in results:
        t["predict_ok"] += bool(r.get("predict", {}).get("ok"))
        if "build_error" in r:
            t["build_error"] += 1
            continue
        for variant, v in r["variants"].items():
            verdict = v["verdict"]
            for key, word in (("false_ok", "FALSE-OK"), ("understated", "UNDERSTATED"), ("wrong_kind", "WRONG-KIND"),
                              ("wrong_direction", "WRONG-DIRECTION"), ("false_alarm", "FALSE-ALARM"),
                              ("diagnose_crash", "CRASH"), ("harness_error", "HARNESS-ERROR")):
                t[key] += verdict == word
            for name, fx in v["fixes"].items():
                if fx["verdict"] == "HARNESS-ERROR":
                    t["harness_error"] += 1
                    continue
                t["fix_runs"] += 1
                t["fix_crash"] += _fix_crashed(fx)
                t["fix_refused"] += fx["status"] == "refused"
                t["fix_not_clean"] += fx["status"] == "done" and not fx.get("clean")
                t["fix_worse"] += fx["verdict"] == "WORSE"
                t["fix_left_weights_unchanged"] += variant == "naive" and bool(fx.get("unchanged"))
                if variant == "naive":
                    c = clean_naive.setdefault(name, [0, 0])
                    c[0] += fx["verdict"] == "clean"
                    c[1] += 1
    for name, (ok, n) in clean_naive.items():
        t[f"naive_clean_after_{name}"] = f"{ok}/{n}"
    t["predict_coverage"] = f"{t['predict_ok']}/{len(results)}"
    return t


def failures(results: list[dict[str, Any]]) -> list[str]:
    """One line per thing that went wrong: (model, variant, what)."""
    lines = []
    for r in results:
        if "build_error" in r:
            lines.append(f"{r['model']}: build: {r['build_error']}")
            continue
        for variant, v in r["variants"].items():
            t = v.get("truth") or {}
            indep = f"(independent: fwd x{_g(t.get('fwd_max'))}/x{_g(t.get('fwd_min'))}, " \
                    f"grad x{_g(t.get('grad_max'))}/x{_g(t.get('grad_min'))})"
            if v["verdict"].isupper():
                lines.append(f"{r['model']} {variant}: diagnose {v['verdict']}: {_findings_text(v['diagnose'])} "
                             f"{indep}")
            for name, fx in v["fixes"].items():
                bad_verdict = fx["verdict"].isupper() or (variant == "naive" and fx["verdict"] == "refused")
                if bad_verdict:
                    what = fx["error"] if fx["status"] != "done" else _findings_text(fx["after"])
                    lines.append(f"{r['model']} {variant}: {name} {fx['verdict']}: {what}")
                if variant == "naive" and fx.get("unchanged"):
                    lines.append(f"{r['model']} {variant}: {name} left N(0,1) weights unchanged: "
                                 f"{', '.join(fx['unchanged'][:4])}{' ...' if len(fx['unchanged']) > 4 else ''}")
                if fx.get("still_meta"):
                    lines.append(f"{r['model']} {variant}: {name} left parameters on the meta device")
                if fx.get("nonfinite_weights"):
                    lines.append(f"{r['model']} {variant}: {name} made non-finite weights: "
                                 f"{', '.join(fx['nonfinite_weights'][:4])}")
        p = r.get("predict", {})
        if not p.get("ok"):
            lines.append(f"{r['model']}: predict failed: {p.get('error')}")
    return lines


def _code_version() -> str:
    """The commit of the signalprop checkout imported, and whether its src/ has uncommitted changes."""
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(sp.__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "."], capture_output=True,
                               text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001 - not a checkout
        return "not a git checkout"
    return f"commit {head}{', src modified' if dirty else ''}" if head else "not a git checkout"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the fast subset")
    ap.add_argument("--only", nargs="*", default=None, help="only these model names")
    ap.add_argument("--json", default=None, help="write the results as JSON to this path")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=float, default=120.0, help="seconds per step (diagnose, fix, predict)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
    cases = hf_cases() + torch_cases()
    if args.quick:
        cases = [c for c in cases if c.quick]
    if args.only:
        cases = [c for c in cases if c.name in args.only]
    t0 = time.perf_counter()
    results = []
    for case in cases:
        start = time.perf_counter()
        try:
            results.append(run_case(case, args.seed, args.limit))
        except Exception as exc:  # noqa: BLE001 - never lose the other models' results
            results.append({"model": case.name, "group": case.group, "build_error": f"harness: {_short(exc)}"})
        print(f"# {case.name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    print(f"signalprop {getattr(sp, '__version__', '?')} ({_code_version()}), torch {torch.__version__}, "
          f"{len(cases)} models, seed {args.seed}, {time.perf_counter() - t0:.0f} s\n")
    print_table(results)
    print("\nfailures:")
    for line in failures(results):
        print(f"  {line}")
    tot = totals(results)
    print("\ntotals:")
    for k, v in tot.items():
        print(f"  {k}: {v}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"code": _code_version(), "torch": torch.__version__, "totals": tot, "results": results,
                       "argv": sys.argv[1:]}, fh, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
