"""sp.fix.residual_: each residual scaling checked by its defining property, on models built as users build them.

ReZero / SkipInit: every block is exactly the identity at init. depth-muP: a residual MLP's output variance
stays flat over L = 32..512 (without it, it doubles per block). DeepNorm: the model update after one SGD step
stays bounded as the post-norm encoder deepens (it grows without). Fixup: the factors of the one definition
in signalprop.fix.residual. Checkpoints saved before gating load with strict=True.
"""

from __future__ import annotations

import copy
import io
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import signalprop as sp
from signalprop import SignalpropError

# ---- models users write --------------------------------------------------------------------------------------


class ResMLP(nn.Module):
    """x <- x + W2 relu(W1 x), blocks in a ModuleList loop; W1 He, W2 at 1/fan_in: each branch preserves
    its input's variance, so the stream's variance doubles per block (Var ratio 1 + 1 = 2)."""

    def __init__(self, depth: int, width: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width)) for _ in range(depth)
        )
        for b in self.blocks:
            nn.init.kaiming_normal_(b[0].weight, nonlinearity="relu")
            nn.init.normal_(b[2].weight, std=width**-0.5)
            nn.init.zeros_(b[0].bias)
            nn.init.zeros_(b[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return x


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (f(x).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1) @ v
        return self.o(a.transpose(1, 2).reshape(b, t, d))


class PostNormLayer(nn.Module):
    """x <- LN(x + Attn(x)); x <- LN(x + FFN(x)) (Vaswani et al. 2017)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.attn, self.ln1 = Attention(d, heads), nn.LayerNorm(d)
        self.fc1, self.fc2, self.ln2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.fc2(F.relu(self.fc1(x))))


class PreNormLayer(PostNormLayer):
    """x <- x + Attn(LN(x)); x <- x + FFN(LN(x)) (GPT-2 style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Encoder(nn.Module):
    """N layers in a ModuleList loop, Xavier-normal weights and zero biases (the paper's vanilla setting)."""

    def __init__(self, n: int, d: int = 16, heads: int = 2, layer: type[nn.Module] = PostNormLayer) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layer(d, heads) for _ in range(n))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _gpt2(n_layer: int = 3) -> nn.Module:
    from transformers import GPT2Config, GPT2Model

    return GPT2Model(GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
                                bos_token_id=0, eos_token_id=0)).eval()


def _bert(n_layer: int = 2) -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=2,
                                intermediate_size=64, vocab_size=100, max_position_embeddings=16)).eval()


def _llama(n_layer: int = 3) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    return LlamaModel(LlamaConfig(num_hidden_layers=n_layer, hidden_size=32, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64, vocab_size=100)).eval()


IDS = {"input_ids": torch.arange(16).reshape(2, 8) % 100}


def _gates(net: nn.Module, keep_vars: bool = False) -> dict[str, torch.Tensor]:
    return {k: v for k, v in net.state_dict(keep_vars=keep_vars).items() if k.endswith("residual_gate")}


# ---- bad input --------------------------------------------------------------------------------------------------


def test_unknown_scheme_lists_the_names() -> None:
    with pytest.raises(SignalpropError) as e:
        sp.fix.residual_(ResMLP(2, 8), "rezer0", example_inputs=torch.randn(2, 8))
    for name in ("depth_mup", "rezero", "skipinit", "fixup", "deepnorm"):
        assert repr(name) in str(e.value)


def test_no_residual_branch_says_how_they_are_found() -> None:
    with pytest.raises(SignalpropError, match="found no residual branch.*addition of two same-shape tensors"):
        sp.fix.residual_(sp.models.mlp(4, 8), "rezero", example_inputs=torch.randn(2, 8))


def test_needs_inputs_to_find_branches() -> None:
    with pytest.raises(SignalpropError, match="example_inputs=.*input_shape="):
        sp.fix.residual_(ResMLP(2, 8), "depth_mup")


def test_deepnorm_refuses_pre_norm() -> None:
    x = torch.randn(2, 4, 16)
    net = Encoder(2, layer=PreNormLayer)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(SignalpropError, match="post-norm.*pre-norm.*depth_mup"):
        sp.fix.residual_(net, "deepnorm", example_inputs=x)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # refused before any change
    with pytest.raises(SignalpropError, match="post-norm"):
        sp.fix.residual_(_gpt2(2), "deepnorm", example_inputs=IDS)


# ---- ReZero / SkipInit: every block the identity ---------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["rezero", "skipinit"])
def test_gate_makes_every_block_the_identity(scheme: str) -> None:
    net, x = ResMLP(6, 16), torch.randn(4, 16)
    sp.fix.residual_(net, scheme, example_inputs=x)
    gates = _gates(net, keep_vars=True)
    assert sorted(gates) == [f"blocks.{i}.2.residual_gate" for i in range(6)]
    h = x
    for b in net.blocks:
        out = h + b(h)
        assert torch.equal(out, h)
        h = out
    net(x).square().sum().backward()
    assert all(g.grad is not None and g.grad.abs() > 0 for g in gates.values())  # the gates do learn


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("scheme", ["rezero", "skipinit"])
def test_gate_identity_on_pre_norm_transformers(make, scheme: str) -> None:  # type: ignore[no-untyped-def]
    net = make(3)
    sp.fix.residual_(net, scheme, example_inputs=IDS)
    assert len(_gates(net)) == 6  # attention and MLP branch of 3 layers
    hs = net(**IDS, output_hidden_states=True).hidden_states  # the last one has the final norm applied
    for a, b in zip(hs[:-2], hs[1:-1]):
        assert torch.equal(a, b)


def test_gate_identity_on_post_norm_bert() -> None:
    """Post-norm: LN(x + a F(x)); at a = 0 every addition's output is exactly its skip input."""
    net = _bert(2)
    sp.fix.residual_(net, "rezero", example_inputs=IDS)
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen.__setitem__(n, a[0]))
             for n, m in net.named_modules() if n.endswith("LayerNorm") or n.endswith(("layer.0", "layer.1"))]
    hooks += [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n + ":out", o))
              for n, m in net.named_modules() if n.endswith("attention.output.LayerNorm")]
    net(**IDS)
    for h in hooks:
        h.remove()
    for i in range(2):
        p = f"encoder.layer.{i}"
        assert torch.equal(seen[f"{p}.attention.output.LayerNorm"], seen[p])
        assert torch.equal(seen[f"{p}.output.LayerNorm"], seen[f"{p}.attention.output.LayerNorm:out"])


# ---- checkpoints, pickling, export, measure ---------------------------------------------------------------------


def test_old_checkpoint_loads_strict_and_computes_the_old_model() -> None:
    net, x = sp.models.resnet((2, 2), 8).eval(), torch.randn(2, 3, 8, 8)
    old = copy.deepcopy(net.state_dict())
    with torch.no_grad():
        y_old = net(x)
    sp.fix.residual_(net, "skipinit", input_shape=(3, 8, 8))
    assert set(net.state_dict()) - set(old) == {f"stages.{i}.bn2.residual_gate" for i in range(4)}
    assert set(old) <= set(net.state_dict())  # every existing key kept
    net.load_state_dict(old, strict=True)  # gates absent from the checkpoint load as 1: the old model
    assert all(float(g) == 1.0 for g in _gates(net).values())
    with torch.no_grad():
        assert torch.equal(net(x), y_old)
    sp.fix.residual_(net, "skipinit", input_shape=(3, 8, 8))  # again: the gates back at 0, one per branch
    gated = copy.deepcopy(net.state_dict())
    fresh = sp.models.resnet((2, 2), 8).eval()
    sp.fix.residual_(fresh, "skipinit", input_shape=(3, 8, 8))
    fresh.load_state_dict(gated, strict=True)
    assert all(float(g) == 0.0 for g in _gates(fresh).values())


@pytest.mark.parametrize("scheme", ["depth_mup", "fixup"])
def test_constant_schemes_keep_the_state_dict_keys(scheme: str) -> None:
    net = sp.models.resnet((2, 2), 8)
    keys = list(net.state_dict())
    sp.fix.residual_(net, scheme, input_shape=(3, 8, 8))
    assert list(net.state_dict()) == keys


def test_gated_model_pickles_exports_compiles_and_measures() -> None:
    net, x = sp.models.resnet((1, 1), 8).eval(), torch.randn(2, 3, 8, 8)
    sp.fix.residual_(net, "depth_mup", example_inputs=x)
    with torch.no_grad():
        y = net(x)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(x), y)
        assert torch.equal(copy.deepcopy(net)(x), y)
        assert torch.allclose(torch.export.export(net, (x,)).module()(x), y, atol=1e-6)
        assert torch.allclose(torch.compile(net, backend="eager")(x), y, atol=1e-6)
    assert type(net.stages[0].bn2).__name__ == "BatchNorm2d"  # same class name: reports read the same
    trace = sp.measure(net, x)
    assert "stages.0.bn2" in trace.names
    assert sp.diagnose(net, x) is not None


# ---- depth-muP -------------------------------------------------------------------------------------------------


def test_depth_mup_keeps_the_variance_flat_over_depth() -> None:
    """Var[x_L] / Var[x_0] = (1 + 1/L)^L -> e with branches x 1/sqrt(L) (mean field: each branch adds
    Var[x]/L). Measured over 6 seeds at width 128: per-seed spread about 7% (finite width), so each mean is
    within 10% of the mean field (about 3 standard errors) and the means within 25% of each other."""
    width, seeds, means = 128, 6, {}
    for L in (32, 128, 512):
        graph = sp.graph.capture(ResMLP(L, width), torch.randn(2, width), methods=("hooks",))
        ratios = []
        for s in range(seeds):
            torch.manual_seed(s)
            net, x = ResMLP(L, width), torch.randn(128, width)
            sp.fix.residual_(net, "depth_mup", graph=graph)
            assert float(net.blocks[0][2].residual_gate) == pytest.approx(L**-0.5)
            with torch.no_grad():
                ratios.append(float(net(x).var() / x.var()))
        means[L] = statistics.mean(ratios)
        assert means[L] == pytest.approx((1 + 1 / L) ** L, rel=0.10)
        assert all(abs(r / (1 + 1 / L) ** L - 1) < 0.25 for r in ratios)
    assert max(means.values()) / min(means.values()) < 1.25


def test_without_depth_mup_the_variance_doubles_per_block() -> None:
    """The same MLP unscaled: Var ratio 2 per block, so log2(Var[x_L]/Var[x_0]) / L = 1; the per-seed spread
    of that slope is about 0.04 at width 128, so the mean over 4 seeds is within 0.1 of 1 at every L."""
    for L in (8, 16, 32):
        slopes = []
        for s in range(4):
            torch.manual_seed(s)
            net, x = ResMLP(L, 128), torch.randn(128, 128)
            with torch.no_grad():
                slopes.append(math.log2(float(net(x).var() / x.var())) / L)
        assert statistics.mean(slopes) == pytest.approx(1.0, abs=0.1)


# ---- DeepNorm --------------------------------------------------------------------------------------------------


def _update(net: nn.Module, seed: int, lr: float = 0.01) -> float:
    """||F(theta') - F(theta)|| / ||F(theta)|| after one SGD step on the weight matrices (the sub-layer
    parameters theta_i of Wang et al. 2022, Theorem 4.2), MSE to a random target."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(2, 8, 16, generator=g), torch.randn(2, 8, 16, generator=g)
    opt = torch.optim.SGD([p for p in net.parameters() if p.dim() == 2], lr=lr)
    with torch.no_grad():
        f0 = net(x)
    F.mse_loss(net(x), y).backward()
    opt.step()
    with torch.no_grad():
        return float((net(x) - f0).norm() / f0.norm())


def _geomean(xs: list[float]) -> float:
    return math.exp(statistics.mean(math.log(v) for v in xs))


@pytest.mark.slow
def test_deepnorm_bounds_the_update_as_depth_grows() -> None:
    """Post-LN, one SGD step of lr 0.01 on the weight matrices, width 16, 8 seeds per depth (geometric means,
    the plain updates being heavy-tailed). Measured: plain 0.05 at N = 6, 0.3-0.6 at N = 24 and 96 (per-seed
    log spread about 0.6 at N = 24 and 1.1 at N = 96: standard errors of the log-mean 0.2 and 0.4, so 3x and
    2x are each about 3 standard errors below the growth measured); with DeepNorm 8.6e-4, 8.6e-4, 8.4e-4
    (per-seed spread about 10%, so 1.5x between depths would be the bound failing)."""
    plain, deep = {}, {}
    for n in (6, 24, 96):
        graph = sp.graph.capture(Encoder(n), torch.randn(2, 8, 16), methods=("hooks",))
        p, d = [], []
        for s in range(8):
            torch.manual_seed(s)
            p.append(_update(Encoder(n), s))
            torch.manual_seed(s)
            d.append(_update(sp.fix.residual_(Encoder(n), "deepnorm", graph=graph), s))
        plain[n], deep[n] = _geomean(p), _geomean(d)
    assert plain[24] > 3 * plain[6] and plain[96] > 2 * plain[6]
    assert max(deep.values()) < 1.5 * min(deep.values())
    assert max(deep.values()) < plain[6] / 10


def test_deepnorm_scales_value_output_and_ffn_not_query_key() -> None:
    n = 3
    net = Encoder(n)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    sp.fix.residual_(net, "deepnorm", example_inputs=torch.randn(2, 8, 16))
    alpha, beta = sp.fix.deepnorm_factors(2 * n)
    assert (alpha, beta) == pytest.approx(((2 * n) ** 0.25, (8 * n) ** -0.25))
    assert list(net.state_dict()) == list(before)  # no new key: the gate is a constant of the architecture
    sd = net.state_dict()
    for i in range(n):
        for name in ("attn.q", "attn.k"):
            assert torch.equal(sd[f"layers.{i}.{name}.weight"], before[f"layers.{i}.{name}.weight"])
        for name in ("attn.v", "attn.o", "fc1", "fc2"):
            assert torch.allclose(sd[f"layers.{i}.{name}.weight"], beta * before[f"layers.{i}.{name}.weight"])
        assert float(net.layers[i].attn.o.residual_gate) == pytest.approx(1 / alpha)
        assert float(net.layers[i].fc2.residual_gate) == pytest.approx(1 / alpha)


def test_deepnorm_on_bert_is_the_alpha_skip() -> None:
    """LN(alpha x + G(x)) computed as LN(x + G(x)/alpha): the same block, up to the norm's eps."""
    net = _bert(2)
    sp.fix.residual_(net, "deepnorm", example_inputs=IDS)
    alpha, beta = sp.fix.deepnorm_factors(4)
    ffn = net.encoder.layer[0].output
    x = torch.randn(2, 8, 32)
    h = net.encoder.layer[0].intermediate(x)
    with torch.no_grad():
        want = F.layer_norm(alpha * x + ffn.dense._residual_base.forward(ffn.dense, h), (32,),
                            ffn.LayerNorm.weight, ffn.LayerNorm.bias, ffn.LayerNorm.eps * alpha**2)
        assert torch.allclose(ffn(h, x), want, atol=1e-5)


# ---- Fixup: the one definition ---------------------------------------------------------------------------------


def test_fixup_uses_the_plan_factors() -> None:
    bare = sp.models.resnet((2, 2), 8, norm=False)
    w = {i: bare.stages[i].conv2.weight.detach().clone() for i in range(4)}
    sp.fix.residual_(bare, "fixup", input_shape=(3, 8, 8))
    for i in range(4):  # L = 4 branches of m = 2: 4^(-1/2), the factor auto_init_'s plan puts in the std
        assert torch.allclose(bare.stages[i].conv2.weight, w[i] * sp.fix.fixup_factor(4, 2))
    normed = sp.models.resnet((2,), 8)
    sp.fix.residual_(normed, "fixup", input_shape=(3, 8, 8))
    assert torch.allclose(normed.stages[0].bn2.weight, torch.full((8,), 2**-0.5))


# ---- auto_init_ and models it was not built for ----------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["rezero", "skipinit", "depth_mup"])
def test_auto_init_accepts_the_schemes(scheme: str) -> None:
    net, x = ResMLP(4, 16), torch.randn(8, 16)
    sp.fix.auto_init_(net, example_inputs=x, residual=scheme)
    g = float(net.blocks[0][2].residual_gate.detach())
    assert g == (0.0 if scheme != "depth_mup" else pytest.approx(0.5))
    with pytest.raises(SignalpropError, match="unknown residual 'half'.*'deepnorm'"):
        sp.fix.auto_init_(net, example_inputs=x, residual="half")
    with pytest.raises(SignalpropError, match="example_inputs"):
        sp.fix.auto_init_(ResMLP(2, 8), residual="rezero")


def test_auto_init_refuses_deepnorm_on_pre_norm_before_drawing() -> None:
    net, x = Encoder(2, layer=PreNormLayer), torch.randn(2, 8, 16)
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(SignalpropError, match="post-norm"):
        sp.fix.auto_init_(net, example_inputs=x, residual="deepnorm")
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("scheme", ["depth_mup", "rezero", "skipinit", "fixup"])
def test_every_scheme_on_a_hand_written_pre_norm_transformer(scheme: str) -> None:
    net, x = Encoder(4, layer=PreNormLayer), torch.randn(2, 8, 16)
    sp.fix.residual_(net, scheme, example_inputs=x)
    out = net(x)
    assert torch.isfinite(out).all()
    if scheme in ("rezero", "skipinit"):
        assert torch.equal(out, x)
    if scheme == "depth_mup":
        assert float(net.layers[0].attn.o.residual_gate) == pytest.approx(8**-0.5)


class _SharedEnd(nn.Module):
    """The branch's last layer is also the readout: a gate on it would scale the readout too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x + self.out(torch.relu(self.fc(x))))


def test_an_end_module_called_outside_its_branch_is_refused() -> None:
    net = _SharedEnd()
    with pytest.raises(SignalpropError, match="'out' ends a residual branch but is also called"):
        sp.fix.residual_(net, "rezero", example_inputs=torch.randn(2, 8))
    assert type(net.out) is nn.Linear and not _gates(net)  # refused before any change
