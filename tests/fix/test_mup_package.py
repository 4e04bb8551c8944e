"""sp.fix.mup_ against Microsoft's ``mup`` package (Yang et al. 2022) on the kind of models its README uses.

The two differ in bookkeeping, not in the parametrization: ``mup`` keeps the standard init and multiplies the
readout's input by ``1/m`` in the forward (``MuReadout``), signalprop folds that multiplier into the weight
(init variance 1/fan_in^2, learning rate / m). A weight ``W`` used as ``c * W`` trains like a weight
``W' = c * W`` whose Adam learning rate is ``c * lr`` and whose SGD learning rate is ``c^2 * lr``, so the
comparison is made on those effective numbers, per parameter, as functions of the width (each relative to
the base width: muP fixes them up to width-independent constants).

``mup`` declares torchvision, pandas and seaborn for its plotting helpers; the parametrization needs none of
them: ``pip install --no-deps mup`` (what ``make setup`` does).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import signalprop as sp

mup = pytest.importorskip("mup")

BASE = 64
D_IN, D_OUT, VOCAB = 32, 10, 50


class _MLP(nn.Module):
    """The README's MLP: an input layer, hidden layers, and a readout (``MuReadout`` in mup's version)."""

    def __init__(self, width: int, *, readout: type[nn.Linear]) -> None:
        super().__init__()
        self.fc_in = nn.Linear(D_IN, width)
        self.fc_1 = nn.Linear(width, width)
        self.fc_2 = nn.Linear(width, width)
        self.out = readout(width, D_OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc_in(x))
        x = torch.relu(self.fc_1(x))
        return self.out(torch.relu(self.fc_2(x)))


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d_head = heads, width // heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.scaling = 1.0 / math.sqrt(self.d_head)  # mup's examples use 1/d: what both must end with

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.heads, self.d_head).transpose(1, 2) for f in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) * self.scaling, dim=-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, -1))


class _Transformer(nn.Module):
    """A one-block pre-norm transformer like mup's Transformer example: embedding, attention, FFN, readout."""

    def __init__(self, width: int, *, readout: type[nn.Linear]) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, width)
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _Attention(width, heads=4)
        self.ff_in, self.ff_out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.out = readout(width, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        x = x + self.attn(self.ln1(x))
        x = x + self.ff_out(torch.relu(self.ff_in(self.ln2(x))))
        return self.out(x)


def _mup_numbers(model: nn.Module, width_of: dict[str, float]) -> dict[str, tuple[float, float, float]]:
    """Per parameter (by name): mup's effective (Adam lr multiplier, SGD lr multiplier, init-std multiplier).

    The init-std multiplier is the width scaling of the standard init mup keeps (1/sqrt(fan_in)), times the
    forward multiplier 1/m and the sqrt(m) rescale ``set_base_shapes`` applies to a ``MuReadout``.
    """
    adam = {id(p): g["lr"] for g in mup.MuAdam(model.parameters(), lr=1.0).param_groups for p in g["params"]}
    sgd = {id(p): g["lr"] for g in mup.MuSGD(model.parameters(), lr=1.0).param_groups for p in g["params"]}
    out = {}
    modules = dict(model.named_modules())
    for name, p in model.named_parameters():
        owner = modules[name.rpartition(".")[0]]
        c = 1.0 / owner.width_mult() if isinstance(owner, mup.MuReadout) and name.endswith("weight") else 1.0
        std = 0.0
        if p.dim() >= 2 and not isinstance(owner, nn.Embedding):
            fan_in = p.shape[1]
            std = c / math.sqrt(fan_in) * (math.sqrt(owner.width_mult()) if c != 1.0 else 1.0)
        elif isinstance(owner, nn.Embedding):
            std = 1.0
        out[name] = (c * adam[id(p)], c * c * sgd[id(p)], std)
    del width_of
    return out


def _signalprop_numbers(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[float, float, float]]:
    """Per parameter: signalprop's (Adam lr multiplier, SGD lr multiplier, init std), from its plan."""
    lrs = {}
    for opt in ("adam", "sgd"):
        groups = sp.fix.mup_(model, example, lr=1.0, base_width=BASE, optimizer=opt)
        lrs[opt] = {id(p): g["lr"] for g in groups for p in g["params"]}
    plan = sp.fix.mup_plan(model, example, base_width=BASE)
    std = {f"{layer.name}.weight": layer.std for layer in plan.layers}
    return {n: (lrs["adam"][id(p)], lrs["sgd"][id(p)], std.get(n, 0.0)) for n, p in model.named_parameters()}


def _built(make, width: int):  # type: ignore[no-untyped-def]
    model = make(width, readout=mup.MuReadout)
    mup.set_base_shapes(model, make(BASE, readout=mup.MuReadout), delta=make(2 * BASE, readout=mup.MuReadout))
    return model


@pytest.mark.parametrize("family", ["mlp", "transformer"])
def test_same_multipliers_as_the_mup_package(family: str) -> None:
    import warnings

    make = _MLP if family == "mlp" else _Transformer
    example = torch.randn(4, D_IN) if family == "mlp" else torch.randint(0, VOCAB, (2, 6))
    ours, theirs = {}, {}
    for width in (BASE, 256, 1024):
        theirs[width] = _mup_numbers(_built(make, width), {})
        plain = make(width, readout=nn.Linear)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # LayerNorm gains: "other", as in mup
            ours[width] = _signalprop_numbers(plain, example)
    names = sorted(theirs[BASE])
    assert names == sorted(ours[BASE])
    checked = 0
    for width in (256, 1024):
        for name in names:
            for k, what in enumerate(("Adam lr", "SGD lr", "init std")):
                t0, t = theirs[BASE][name][k], theirs[width][name][k]
                o0, o = ours[BASE][name][k], ours[width][name][k]
                if t0 == 0.0 or o0 == 0.0:  # biases and norm gains: no init scaling compared
                    continue
                assert o / o0 == pytest.approx(t / t0, rel=1e-9), (family, width, name, what, o / o0, t / t0)
                checked += 1
    assert checked >= (20 if family == "mlp" else 40)


def test_attention_logits_end_at_one_over_d_like_mup() -> None:
    model = _Transformer(256, readout=nn.Linear)
    sp.fix.mup_(model, torch.randint(0, VOCAB, (2, 6)), lr=1e-3, base_width=BASE)
    assert model.attn.scaling == pytest.approx(1.0 / model.attn.d_head, rel=1e-12)
