"""The AlexNet story, as data: what `signalprop demo` computes (rendering lives in ``_cli/demo.py``).

Every function here returns plain numbers or Traces, so the story is testable without a terminal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import init as spinit
from ..diagnosis import Report, diagnose, diagnose_trace
from ..init.fans import fans
from ..measurement import measure
from ..trace import Trace

# ---- (a) the question's toy arithmetic --------------------------------------------------------------


@dataclass(frozen=True)
class Toy:
    """One output unit y = sum_i w_i * relu(x_i): the arithmetic behind He's factor 1/2."""

    weights: tuple[float, ...]
    inputs: tuple[float, ...]
    activated: tuple[float, ...]
    products: tuple[float, ...]
    output: float
    active: int


def toy(weights: tuple[float, ...] = (-1.0, -2.0, 3.0, 4.0), inputs: tuple[float, ...] = (4.0, 5.0, -2.0, -3.0)) -> Toy:
    """y = w . relu(x): with w = [-1, -2, 3, 4] and x = [4, 5, -2, -3], relu(x) = [4, 5, 0, 0] and y = -14.

    Only the inputs that survive the ReLU contribute: on average half of them, which is where the 1/2 in
    He's Var[y_l] = 1/2 * n_l * Var[w_l] * Var[y_{l-1}] comes from (He et al. 2015, Eq. 7-10).
    """
    act = tuple(max(0.0, x) for x in inputs)
    prods = tuple(w * a for w, a in zip(weights, act))
    return Toy(tuple(weights), tuple(inputs), act, prods, sum(prods), sum(a > 0 for a in act))


# ---- (b) four inits on AlexNet and a 30-layer plain CNN ------------------------------------------------


def _normal_(std: float) -> Callable[[nn.Module, torch.Generator], None]:
    def apply(model: nn.Module, gen: torch.Generator) -> None:
        with torch.no_grad():
            for _, layer in spinit.weight_layers(model):
                weight, bias = layer.weight, getattr(layer, "bias", None)
                assert isinstance(weight, torch.Tensor)
                weight.normal_(0.0, std, generator=gen)
                if isinstance(bias, torch.Tensor):
                    bias.zero_()

    return apply


def _glorot(model: nn.Module, gen: torch.Generator) -> None:
    spinit.glorot_(model, generator=gen)


def _he(model: nn.Module, gen: torch.Generator) -> None:
    spinit.he_(model, generator=gen)


INITS: dict[str, tuple[str, Callable[[nn.Module, torch.Generator], None]]] = {
    "naive": ("N(0, 1)", _normal_(1.0)),
    "alexnet": ("N(0, 0.01^2) (AlexNet's original)", _normal_(0.01)),
    "glorot": ("Glorot uniform", _glorot),
    "he": ("He normal (fan_in, relu)", _he),
}
"""Label -> (description, function that initializes a model in place)."""


def initialized(factory: Callable[[], nn.Module], init: str, seed: int = 0) -> nn.Module:
    """A fresh model from ``factory`` with init ``init`` (a key of :data:`INITS`), seeded."""
    torch.manual_seed(seed)
    model = factory().eval()
    gen = torch.Generator().manual_seed(seed)
    INITS[init][1](model, gen)
    return model


def he_formula(model: nn.Module, trace: Trace) -> dict[str, tuple[float, float]]:
    """He's product formula per weight layer, anchored at the measured first (forward) and last (backward) layer.

    Forward: Var[y_l] = Var[y_1] * prod_{k=2..l} (1/2 * n_k * Var[w_k]), n_k = fan_in (He et al. 2015, Eq. 10).
    Backward: Var[g_l] = Var[g_L] * prod_{k=l+1..L} (1/2 * n^_k * Var[w_k]), n^_k = fan_out (Eq. 14).
    Var[w_k] is the layer's actual mean of w^2. Returns name -> (predicted fwd std, predicted grad std).
    Pooling is ignored, as in the paper, so max-pooling layers make the formula approximate.
    """
    mods = dict(model.named_modules())
    rows = [layer for layer in trace if layer.weight_layer]
    if not rows:
        return {}
    factors_in, factors_out = [], []
    for layer in rows:
        m = mods[layer.name.split("#")[0]]
        fi, fo = fans(m)
        wv = float(m.weight.detach().double().pow(2).mean())
        factors_in.append(0.5 * fi * wv)
        factors_out.append(0.5 * fo * wv)
    out: dict[str, tuple[float, float]] = {}
    log_f = math.log(max(rows[0].fwd.var, 1e-300))
    logs_f = [log_f]
    for f in factors_in[1:]:
        log_f += math.log(f)
        logs_f.append(log_f)
    last_bwd = rows[-1].bwd
    log_b = math.log(max(last_bwd.var, 1e-300)) if last_bwd is not None else float("nan")
    logs_b = [0.0] * len(rows)
    logs_b[-1] = log_b
    for i in range(len(rows) - 2, -1, -1):
        log_b += math.log(factors_out[i + 1])
        logs_b[i] = log_b
    for layer, lf, lb in zip(rows, logs_f, logs_b):
        out[layer.name] = (_exp_half(lf), _exp_half(lb))
    return out


def _exp_half(log_var: float) -> float:
    if math.isnan(log_var):
        return float("nan")
    return math.exp(min(log_var / 2, 700.0))


@dataclass
class ModelRun:
    """One model under the four inits: the traces, He's formula beside them, and a verdict each."""

    title: str
    traces: dict[str, Trace]
    formula: dict[str, dict[str, tuple[float, float]]]
    reports: dict[str, Report]


def run_inits(title: str, factory: Callable[[], nn.Module], inputs: torch.Tensor, seed: int = 0,
              on_step: Callable[[str], None] | None = None) -> ModelRun:
    """Measure ``factory()`` under every init of :data:`INITS`, forward and backward on ``inputs``."""
    traces, formula, reports = {}, {}, {}
    for key in INITS:
        if on_step is not None:
            on_step(f"{title}: {INITS[key][0]}")
        model = initialized(factory, key, seed)
        trace = measure(model, inputs)
        traces[key] = trace
        formula[key] = he_formula(model, trace)
        reports[key] = diagnose_trace(trace, model=model)
    return ModelRun(title, traces, formula, reports)


def verdict(report: Report) -> str:
    """One plain-words sentence for a report: the worst finding, or that the signal stays in range."""
    worst = [f for f in report.findings if f.severity == "error"] or [
        f for f in report.findings if f.severity == "warning"
    ]
    if not worst:
        return "the signal stays in range, forward and backward."
    return worst[0].message


# ---- predicted band beside measured nets ------------------------------------------------------------------


@dataclass
class BandCheck:
    """Predicted std and its 90% finite-width band per layer, beside the std of several single nets."""

    predicted: Trace
    measured: list[Trace] = field(default_factory=list)

    def inside_fraction(self) -> float:
        """Fraction of (net, weight layer) pairs whose measured variance lies inside the predicted band."""
        hits = total = 0
        for trace in self.measured:
            for p, m in zip(self.predicted, trace):
                if p.weight_layer and p.fwd.var_band is not None:
                    lo, hi = p.fwd.var_band
                    hits += lo <= m.fwd.var <= hi
                    total += 1
        return hits / total if total else float("nan")


def band_check(depth: int = 30, width: int = 128, nets: int = 8, batch: int = 64, seed: int = 0) -> BandCheck:
    """He-initialized ReLU MLPs: sp.predict's band against ``nets`` single networks measured on N(0,1) data."""
    from ..prediction import predict

    factory = lambda: _mlp(depth, width)  # noqa: E731
    model = initialized(factory, "he", seed)
    check = BandCheck(predict(model, (width,)))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=gen)
    for i in range(nets):
        net = initialized(factory, "he", seed + 1 + i)
        check.measured.append(measure(net, x, backward=False))
    return check


def _mlp(depth: int, width: int) -> nn.Module:
    from ..models import mlp

    return mlp(depth, width, "relu")


# ---- the fix --------------------------------------------------------------------------------------------------


def fix_story(inputs: torch.Tensor, seed: int = 0, on_step: Callable[[str], None] | None = None) -> dict[str, Report]:
    """The naive (N(0,1)) AlexNet, then auto_init_, then lsuv_: each diagnosed on ``inputs``."""
    from .. import fix
    from ..models import alexnet

    out: dict[str, Report] = {}
    model = initialized(alexnet, "naive", seed)
    if on_step is not None:
        on_step("fix: diagnose naive AlexNet")
    out["naive N(0, 1)"] = diagnose(model, inputs)
    if on_step is not None:
        on_step("fix: auto_init_")
    fix.auto_init_(model, example_inputs=inputs)
    out["after auto_init_"] = diagnose(model, inputs)
    if on_step is not None:
        on_step("fix: lsuv_")
    fix.lsuv_(model, inputs, orthogonal=False)  # a QR of the 4096x9216 FC weight costs more than LSUV itself
    out["after lsuv_"] = diagnose(model, inputs)
    return out
