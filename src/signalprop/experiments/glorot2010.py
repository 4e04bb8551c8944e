"""Glorot & Bengio (2010), Figs. 6-7: activations and back-propagated gradients, layer by layer, at init.

Glorot and Bengio, "Understanding the difficulty of training deep feedforward neural networks", AISTATS
2010, Sec. 4.2. In the linear regime of tanh a layer multiplies the variance of the forward signal by
``n_in Var[W]`` and that of the back-propagated gradient by ``n_out Var[W]`` (their Eqs. 10-11). The
"standard" init U[-1/sqrt(n_in), 1/sqrt(n_in)] has Var[W] = 1/(3 n_in): both factors are 1/3 on square
layers, so activations shrink going up and gradients shrink going down. The "normalized" init
U[-sqrt(6/(n_in+n_out)), +sqrt(6/(n_in+n_out))] (their Eq. 16) has Var[W] = 2/(n_in+n_out): both factors
are 1 on square layers, and histograms look alike at every layer.

Here: a 5-hidden-layer tanh MLP on scikit-learn's digits (64 inputs -> 5 x ``width`` -> 10), biases zero,
one :func:`signalprop.measure` call with ``histograms=True`` and the cross-entropy of the true labels over
the whole data set. "Activations" are each Tanh's output; "back-propagated gradients" are d loss / d s,
s the pre-activation (each Linear's output), as in the paper. Beside the measurements, the mean-field
prediction: q_{l+1} = n_l Var[W] E[tanh(sqrt(q_l) z)^2] (:func:`signalprop.theory.qmap`) forwards, and the
gradient factor n_{l+1} Var[W_{l+1}] E[tanh'(sqrt(q_l) z)^2] (:func:`signalprop.theory.deriv_second_moment`)
backwards from the top hidden layer's measured gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from ..trace import Histogram, Trace
from ._common import (
    Outcome,
    ProgressLike,
    check_positive_ints,
    digits,
    flushed_denormals,
    fmt_seconds,
    generator,
    new_figure,
    start,
    write_outputs,
)

SCHEMES = ("standard", "normalized")
"""Glorot & Bengio's "standard" U[-1/sqrt(n_in), +] and "normalized" U[-sqrt(6/(n_in+n_out)), +] inits."""


@dataclass(frozen=True)
class Config:
    """Everything that decides a run: the MLP's shape, how many networks, how many digits, histogram bins.

    Examples:
        >>> Config().hidden, Config().width, QUICK.nets, QUICK.samples
        (5, 256, 3, 1024)
    """

    hidden: int = 5
    width: int = 256
    nets: int = 10
    """Independent networks per scheme; the variances are their mean, the histograms are from the first."""
    samples: int = 1797
    """How many digits go through the net (the first ``samples``; 1797 is all of them)."""
    bins: int = 60

    def __post_init__(self) -> None:
        check_positive_ints(self, ("hidden", "width", "nets", "samples", "bins"), "glorot2010")
        if self.hidden < 2:
            raise SignalpropError(f"glorot2010 needs at least 2 hidden layers to compare, got {self.hidden}")


FULL = Config()
QUICK = Config(nets=3, samples=1024)


@dataclass
class Result(Outcome):
    """Per-layer variances (mean over ``config.nets`` networks), histograms, predictions and verdicts.

    Examples:
        >>> r = run(config=Config(hidden=2, width=16, nets=1, samples=64, bins=10))
        >>> sorted(r.act_var), [len(v) for v in r.grad_var.values()], r.ratio("act", "standard") >= 1
        (['normalized', 'standard'], [2, 2], True)
    """

    config: Config
    seed: int
    act_var: dict[str, list[float]]
    """scheme -> variance of each hidden layer's tanh output, layer 1 first."""
    grad_var: dict[str, list[float]]
    """scheme -> variance of d loss / d pre-activation at each hidden layer, layer 1 first."""
    act_var_predicted: dict[str, list[float]]
    grad_var_predicted: dict[str, list[float]]
    act_hist: dict[str, list[Histogram]]
    grad_hist: dict[str, list[Histogram]]
    seconds: float
    checks: dict[str, bool] = field(default_factory=dict)
    png: Path | None = None
    json: Path | None = None

    def ratio(self, what: str, scheme: str) -> float:
        """max / min over hidden layers of the activation (``"act"``) or gradient (``"grad"``) variance."""
        v = (self.act_var if what == "act" else self.grad_var)[scheme]
        return max(v) / min(v)

    def summary(self) -> str:
        """Plain text: per scheme, each hidden layer's activation and gradient variance, then each check."""
        c = self.config
        lines = [f"glorot2010: {c.hidden}-hidden-layer tanh MLP (64 -> {c.hidden} x {c.width} -> 10) on digits, "
                 f"{c.nets} nets per init ({fmt_seconds(self.seconds)})"]
        for s in SCHEMES:
            acts = ", ".join(f"{v:.2g}" for v in self.act_var[s])
            grads = ", ".join(f"{v:.2g}" for v in self.grad_var[s])
            lines.append(f"  {s:10s} Var[tanh out] by layer: {acts}  (max/min {self.ratio('act', s):.1f})")
            lines.append(f"  {'':10s} Var[d loss/d s] by layer: {grads}  (max/min {self.ratio('grad', s):.1f})")
        lines += self.outcome_lines()
        return "\n".join(lines)


def build(scheme: str, *, hidden: int = 5, width: int = 256, seed: int = 0) -> nn.Sequential:
    """64 -> ``hidden`` x (Linear(width) -> Tanh) -> Linear(10), initialized by ``scheme``, biases zero.

    ``"standard"``: U[-1/sqrt(n_in), 1/sqrt(n_in)] = Keras variance scaling with scale 1/3, fan_in, uniform.
    ``"normalized"``: Glorot's U[-sqrt(6/(n_in+n_out)), +], :func:`signalprop.init.glorot_` uniform.

    Glorot & Bengio (2010), Eqs. 1 and 16.

    Args:
        scheme: ``"standard"`` or ``"normalized"``.
        hidden: Hidden tanh layers.
        width: Units per hidden layer.
        seed: Seeds the weights.

    Returns:
        The MLP, 64 inputs (8x8 digits) to 10 classes.

    Raises:
        SignalpropError: An unknown scheme.

    Examples:
        The first layer's bound: ``1/sqrt(64)`` (standard) and ``sqrt(6 / (64 + 16))`` (normalized):

        >>> std, nrm = build("standard", hidden=2, width=16), build("normalized", hidden=2, width=16)
        >>> bool(std[0].weight.detach().abs().max() <= 1 / 8)
        True
        >>> bool(nrm[0].weight.detach().abs().max() <= (6 / 80) ** 0.5)
        True
    """
    from .. import init
    from ..models import mlp

    if scheme not in SCHEMES:
        raise SignalpropError(f"unknown glorot2010 scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    model = mlp(hidden, width, "tanh", in_features=64, out_features=10)
    g = generator(seed)
    if scheme == "standard":
        init.variance_scaling_(model, scale=1.0 / 3.0, mode="fan_in", distribution="uniform", generator=g)
    else:
        init.glorot_(model, distribution="uniform", generator=g)
    return model


def _layer_stats(trace: Trace, hidden: int) -> tuple[list[Any], list[Any]]:
    """(tanh outputs, pre-activation gradients) per hidden layer, from a measured trace of an mlp."""
    linears = [x for x in trace if x.kind == "Linear"]
    tanhs = [x for x in trace if x.kind == "Tanh"]
    if len(linears) != hidden + 1 or len(tanhs) != hidden:
        raise SignalpropError(f"glorot2010: expected {hidden + 1} Linear and {hidden} Tanh calls in the trace, "
                              f"got {len(linears)} and {len(tanhs)}")
    return [t.fwd for t in tanhs], [lin.bwd for lin in linears[:hidden]]


def _predict(model: nn.Sequential, x: torch.Tensor, top_grad_var: float, hidden: int) -> tuple[list[float], list[float]]:
    """Mean-field activation and gradient variances of each hidden layer (see the module docstring)."""
    from .. import theory

    linears = [m for m in model if isinstance(m, nn.Linear)]
    wvar = [float(m.weight.detach().double().var(unbiased=False)) for m in linears]
    fan_in = [m.in_features for m in linears]
    fan_out = [m.out_features for m in linears]
    q = fan_in[0] * wvar[0] * float((x.double() ** 2).mean())
    qs: list[float] = []
    acts: list[float] = []
    for layer in range(hidden):
        if layer > 0:
            q = float(theory.qmap("tanh", qs[-1], weight_var=fan_in[layer] * wvar[layer]))
        qs.append(q)
        acts.append(float(theory.second_moment("tanh", q) - theory.mean_act("tanh", q) ** 2))
    grads = [0.0] * hidden
    grads[-1] = top_grad_var
    for layer in range(hidden - 2, -1, -1):
        factor = fan_out[layer + 1] * wvar[layer + 1] * float(theory.deriv_second_moment("tanh", qs[layer]))
        grads[layer] = grads[layer + 1] * factor
    return acts, grads


def run(
    out: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    *,
    progress: ProgressLike = False,
    config: Config | None = None,
) -> Result:
    """Measure activation and gradient histograms and variances of every hidden layer under both inits.

    ``out``: folder for ``glorot2010.png`` / ``glorot2010.json`` (None writes nothing); ``quick``: 3 nets
    on 1024 digits instead of 10 on all 1797 (both take seconds); ``seed``: the networks are seeded
    ``seed, seed+1, ...``, the same seeds for both inits. ``checks`` in the result: with the standard init
    the activation variance falls layer after layer (top/bottom < 1/10), the normalized init keeps the
    gradient variance within a ratio at least 5x narrower than the standard one, and within 4x overall.

    Args:
        out: Folder for ``glorot2010.png`` and ``glorot2010.json`` (created); None writes nothing.
        quick: The test-sized preset :data:`QUICK` instead of :data:`FULL`.
        seed: The networks are seeded ``seed, seed+1, ...``, the same seeds for both inits.
        progress: True prints progress lines on stderr; a callable receives them.
        config: A :class:`Config` that overrides the preset ``quick`` picks.

    Returns:
        The :class:`Result` with the per-layer variances, histograms, predictions and ``checks``.

    Examples:
        >>> r = run(config=Config(hidden=2, width=16, nets=1, samples=64, bins=10))
        >>> len(r.checks), len(r.act_hist["standard"]), r.png is None  # four claims; a histogram per layer
        (4, 2, True)
    """
    from ..measurement import measure

    seed, cfg, folder, report = start(
        "glorot2010", seed=seed, config=config, quick=quick, presets=(QUICK, FULL), out=out, progress=progress
    )
    x, y = digits(images=False)
    x, y = x[: cfg.samples], y[: cfg.samples]

    def loss_fn(out: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out, y, reduction="sum")

    act_var: dict[str, list[float]] = {}
    grad_var: dict[str, list[float]] = {}
    act_pred: dict[str, list[float]] = {}
    grad_pred: dict[str, list[float]] = {}
    act_hist: dict[str, list[Histogram]] = {}
    grad_hist: dict[str, list[Histogram]] = {}
    with flushed_denormals():
        for scheme in SCHEMES:
            a_sum = [0.0] * cfg.hidden
            g_sum = [0.0] * cfg.hidden
            pa_sum = [0.0] * cfg.hidden
            pg_sum = [0.0] * cfg.hidden
            for k in range(cfg.nets):
                model = build(scheme, hidden=cfg.hidden, width=cfg.width, seed=seed + k)
                trace = measure(model, x, loss_fn=loss_fn, histograms=k == 0, hist_bins=cfg.bins)
                acts, grads = _layer_stats(trace, cfg.hidden)
                pa, pg = _predict(model, x, grads[-1].var, cfg.hidden)
                for i in range(cfg.hidden):
                    a_sum[i] += acts[i].var / cfg.nets
                    g_sum[i] += grads[i].var / cfg.nets
                    pa_sum[i] += pa[i] / cfg.nets
                    pg_sum[i] += pg[i] / cfg.nets
                if k == 0:
                    act_hist[scheme] = [_need_hist(s) for s in acts]
                    grad_hist[scheme] = [_need_hist(s) for s in grads]
            act_var[scheme], grad_var[scheme] = a_sum, g_sum
            act_pred[scheme], grad_pred[scheme] = pa_sum, pg_sum
            report(f"{scheme}: Var[tanh out] {', '.join(f'{v:.2g}' for v in a_sum)}; "
                   f"Var[grad] {', '.join(f'{v:.2g}' for v in g_sum)}")
    result = Result(cfg, seed, act_var, grad_var, act_pred, grad_pred, act_hist, grad_hist, report.elapsed)
    result.checks = _checks(result)
    return write_outputs(result, folder, "glorot2010", _figure, _as_dict)


def _need_hist(s: Any) -> Histogram:
    if s is None or s.hist is None:
        raise SignalpropError("glorot2010: signalprop.measure returned no histogram; it needs histograms=True support")
    return s.hist


def _checks(r: Result) -> dict[str, bool]:
    std_act = r.act_var["standard"]
    return {
        "standard init: activation variance falls layer after layer": all(b < a for a, b in zip(std_act, std_act[1:])),
        "standard init: top/bottom activation variance < 1/10": std_act[-1] / std_act[0] < 0.1,
        "normalized init: gradient variance ratio (max/min over layers) at least 5x narrower than standard's":
            r.ratio("grad", "normalized") * 5 < r.ratio("grad", "standard"),
        "normalized init: gradient variance within 4x across layers": r.ratio("grad", "normalized") < 4,
    }


def _as_dict(r: Result) -> dict[str, Any]:
    return {
        "experiment": "glorot2010",
        "paper": "Glorot, Bengio. Understanding the difficulty of training deep feedforward neural networks. "
                 "AISTATS 2010, Figs. 6-7",
        "seed": r.seed,
        "config": {k: getattr(r.config, k) for k in r.config.__dataclass_fields__},
        "seconds": r.seconds,
        "act_var": r.act_var,
        "grad_var": r.grad_var,
        "act_var_predicted": r.act_var_predicted,
        "grad_var_predicted": r.grad_var_predicted,
        "ratios": {s: {"act": r.ratio("act", s), "grad": r.ratio("grad", s)} for s in SCHEMES},
        "act_hist": {s: [h.to_dict() for h in v] for s, v in r.act_hist.items()},
        "grad_hist": {s: [h.to_dict() for h in v] for s, v in r.grad_hist.items()},
        "checks": r.checks,
        "ok": r.ok,
    }


def _density(h: Histogram) -> tuple[list[float], list[float]]:
    total = sum(h.counts)
    centres, dens = [], []
    for lo, hi, c in zip(h.edges, h.edges[1:], h.counts):
        width = hi - lo
        centres.append((lo + hi) / 2)
        dens.append(c / (total * width) if total and width > 0 else 0.0)
    return centres, dens


def _figure(r: Result) -> Any:
    from matplotlib import colormaps

    hidden = r.config.hidden
    fig = new_figure(12.5, 6.2)
    axes = fig.subplots(2, 3)
    cmap = colormaps["viridis"]
    colors = [cmap(i / max(hidden - 1, 1) * 0.9) for i in range(hidden)]
    g_lim = 4 * math.sqrt(max(max(v) for v in r.grad_var.values()))
    for row, s in enumerate(SCHEMES):
        for col, (hists, title, lim) in enumerate(
            ((r.act_hist[s], "activation values (tanh output)", 1.0),
             (r.grad_hist[s], "back-propagated gradients d loss / d s", g_lim))
        ):
            ax = axes[row, col]
            for i, h in enumerate(hists):
                xs, ds = _density(h)
                ax.plot(xs, ds, color=colors[i], linewidth=1.3, label=f"layer {i + 1}")
            ax.set_xlim(-lim, lim)
            ax.set_yscale("log")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-2, 2))
            ax.set_title(f"{s} init: {title}", fontsize=9)
            ax.grid(alpha=0.25)
            if col == 0:
                ax.set_ylabel("density (log)")
        axes[row, 0].legend(fontsize=7, loc="upper right")
    for row, (what, meas, pred) in enumerate(
        (("Var[tanh output]", r.act_var, r.act_var_predicted), ("Var[d loss / d s]", r.grad_var, r.grad_var_predicted))
    ):
        ax = axes[row, 2]
        layers = list(range(1, hidden + 1))
        for s, color in zip(SCHEMES, ("#1f77b4", "#d62728")):
            ax.semilogy(layers, pred[s], "-", color=color, alpha=0.45, linewidth=3, label=f"{s}, mean-field")
            ax.semilogy(layers, meas[s], "o", color=color, label=f"{s}, measured")
        ax.set_xticks(layers)
        ax.set_xlabel("hidden layer")
        ax.set_title(f"{what} by layer (mean of {r.config.nets} nets)", fontsize=9)
        ax.grid(alpha=0.25, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Glorot & Bengio 2010, Figs. 6-7 on digits: standard U[-1/sqrt(n), 1/sqrt(n)] vs normalized "
                 "U[-sqrt(6/(n_in+n_out)), +], at initialization", fontsize=10)
    return fig
