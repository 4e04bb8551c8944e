"""Poole et al. (2016), Schoenholz et al. (2017): the order-to-chaos phase diagram of deep tanh networks.

A wide network with weights N(0, sigma_w^2 / n) and biases N(0, sigma_b^2) carries two inputs to
pre-activations whose length q and correlation c follow deterministic maps (Poole et al. 2016, Eqs. 3-5):

    q_{l+1} = sigma_w^2 E[phi(sqrt(q_l) z)^2] + sigma_b^2
    c_{l+1} = (sigma_w^2 E[phi(u_1) phi(u_2)] + sigma_b^2) / q_{l+1},   (u_1, u_2) ~ N(0, q_l [[1, c_l], [c_l, 1]])

(:func:`signalprop.theory.qmap`, :func:`signalprop.theory.cmap`). The slope of the c-map at c = 1,
chi1 = sigma_w^2 E[phi'(sqrt(q*) z)^2], splits the plane: chi1 < 1 is the ordered phase (every pair of
inputs ends up perfectly correlated), chi1 > 1 the chaotic one (they decorrelate to c* < 1). Near the fixed
point the correlation settles like exp(-l / xi_c) with xi_c = -1 / log(chi_c) (Schoenholz et al. 2017,
Eq. 9), which diverges on the critical line chi1 = 1; a network trains when it is no deeper than about
6 xi_c. The heat map shows xi_c (:func:`signalprop.theory.depth_scales`) over (sigma_w^2, sigma_b^2) with
the line chi1 = 1 (:func:`signalprop.theory.critical_weight_var`).

The second panel checks the theory on real networks: pairs of inputs of known correlation go through one
deep, wide tanh MLP per point, and the measured correlation of each layer's pre-activations sits next to
the iterated c-map. Finite width n adds noise of order (1 - c^2) / sqrt(n) per layer, carried forward by
the c-map's slope; :func:`tolerance` turns that into the band the measurement must stay in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._errors import SignalpropError
from ._common import (
    Outcome,
    ProgressLike,
    flushed_denormals,
    fmt_seconds,
    generator,
    new_figure,
    start,
    write_outputs,
)

ACT = "tanh"


@dataclass(frozen=True)
class Config:
    """Everything that decides a run: the heat map's grid, the measured networks, their inputs and band.

    Examples:
        >>> Config().width, Config().depth, QUICK.width, QUICK.depth
        (1000, 30, 500, 20)
    """

    weight_var: tuple[float, float, int] = (0.5, 4.0, 24)
    """(lo, hi, count) of the heat map's sigma_w^2 axis."""
    bias_var: tuple[float, float, int] = (0.0, 0.3, 13)
    """(lo, hi, count) of the heat map's sigma_b^2 axis (also where the chi1 = 1 line is computed)."""
    points: tuple[tuple[float, float], ...] = ((1.3, 0.05), (-1.0, 0.05), (3.0, 0.05))
    """(sigma_w^2, sigma_b^2) of the measured networks; sigma_w^2 = -1 means "on the critical line"."""
    start_corr: tuple[float, ...] = (0.1, 0.6, 0.95)
    """Correlations of the input pairs sent through each network."""
    width: int = 1000
    depth: int = 30
    sigmas: float = 4.0
    """The measured correlation must stay within ``sigmas`` standard deviations (:func:`tolerance`)."""

    def __post_init__(self) -> None:
        for name in ("weight_var", "bias_var"):
            lo, hi, n = getattr(self, name)
            if not (0 <= lo < hi and isinstance(n, int) and n >= 2):
                raise SignalpropError(f"criticality Config.{name} must be (lo, hi, count) with 0 <= lo < hi, "
                                      f"count >= 2; got {getattr(self, name)!r}")
        if self.weight_var[0] <= 0:
            raise SignalpropError("criticality Config.weight_var must start above 0 (sigma_w^2 = 0 is no network)")
        for name in ("width", "depth"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 2:
                raise SignalpropError(f"criticality Config.{name} must be an integer >= 2, got {v!r}")
        if not self.points or any(len(p) != 2 or p[1] < 0 for p in self.points):
            raise SignalpropError(f"criticality Config.points must be (sigma_w^2, sigma_b^2 >= 0) pairs, got {self.points!r}")
        if not self.start_corr or any(not -1 < c < 1 for c in self.start_corr):
            raise SignalpropError(f"criticality Config.start_corr must lie strictly between -1 and 1, got {self.start_corr!r}")


FULL = Config()
QUICK = Config(weight_var=(0.5, 4.0, 6), bias_var=(0.0, 0.3, 3), width=500, depth=20)


@dataclass
class PointResult:
    """One measured network: its (sigma_w^2, sigma_b^2), chi1, xi_c and per-layer correlations.

    ``phase``: ordered (chi1 < 1), critical or chaotic (chi1 > 1), Poole et al. (2016); ``worst``: the
    largest deviation from the c-map in units of the band.

    Examples:
        >>> p = PointResult(1.3, 0.05, 0.88, 7.8, [[0.5, 0.4]], [[0.5, 0.45]], [[0.1, 0.1]])
        >>> p.phase, round(p.worst, 6)
        ('ordered', 0.5)
    """

    weight_var: float
    bias_var: float
    chi1: float
    xi_c: float
    measured: list[list[float]]
    """One list per input pair (``config.start_corr``): the correlation of layer 1..depth pre-activations."""
    predicted: list[list[float]]
    """The iterated c-map from the same start."""
    band: list[list[float]]
    """The tolerance at each layer (``config.sigmas`` standard deviations, :func:`tolerance`)."""

    @property
    def phase(self) -> str:
        """``critical`` within 1e-3 of chi1 = 1, else ``ordered`` (chi1 < 1) or ``chaotic``."""
        return "critical" if abs(self.chi1 - 1) < 1e-3 else ("ordered" if self.chi1 < 1 else "chaotic")

    @property
    def worst(self) -> float:
        """The largest |measured - predicted| / band over pairs and layers (<= 1 means within tolerance)."""
        return max(abs(m - p) / b for ms, ps, bs in zip(self.measured, self.predicted, self.band)
                   for m, p, b in zip(ms, ps, bs))


@dataclass
class Result(Outcome):
    """The phase diagram (xi_c over the grid, the chi1 = 1 line), the measured networks and the verdicts.

    Examples:
        Tanh with no bias is critical at ``sigma_w^2 = 1`` (Poole et al. 2016):

        >>> cfg = Config(weight_var=(0.5, 4.0, 2), bias_var=(0.0, 0.3, 2), points=((1.3, 0.05), (3.0, 0.05)),
        ...              start_corr=(0.5,), width=50, depth=3)
        >>> r = run(config=cfg)
        >>> [round(w, 3) for w in r.critical_line], [p.phase for p in r.points]
        ([1.0, 2.505], ['ordered', 'chaotic'])
    """

    config: Config
    seed: int
    weight_vars: list[float]
    bias_vars: list[float]
    xi_c: list[list[float]]
    """``xi_c[i][j]`` at ``bias_vars[i]``, ``weight_vars[j]`` (inf on the critical line)."""
    critical_line: list[float]
    """sigma_w^2 with chi1 = 1 at each of bias_vars."""
    points: list[PointResult]
    seconds: float
    checks: dict[str, bool] = field(default_factory=dict)
    png: Path | None = None
    json: Path | None = None

    def summary(self) -> str:
        """Plain text: the grid, the chi1 = 1 line, each network's correlations against the c-map, the checks."""
        c = self.config
        lines = [f"criticality: tanh phase diagram ({len(self.weight_vars)} x {len(self.bias_vars)} grid) and "
                 f"{len(self.points)} real {c.depth}-layer, width-{c.width} networks ({fmt_seconds(self.seconds)})"]
        lines.append("  chi1 = 1 at sigma_b^2 = " + ", ".join(
            f"{b:g}: sigma_w^2 {w:.3f}" for b, w in list(zip(self.bias_vars, self.critical_line))[:: max(1, len(self.bias_vars) // 4)]))
        for p in self.points:
            ends = ", ".join(f"{ms[0]:.2f}->{ms[-1]:.3f} (c-map {ps[-1]:.3f})" for ms, ps in zip(p.measured, p.predicted))
            lines.append(f"  sigma_w^2 {p.weight_var:.3f}, sigma_b^2 {p.bias_var:g} ({p.phase}, chi1 {p.chi1:.3f}, "
                         f"xi_c {p.xi_c:.1f}): layer 1->{c.depth} correlation {ends}; worst deviation "
                         f"{p.worst:.2f} of the {c.sigmas:g}-sigma band")
        lines += self.outcome_lines()
        return "\n".join(lines)


# ---- theory ----------------------------------------------------------------------------------------
def predicted_correlations(weight_var: float, bias_var: float, start_corr: float, depth: int,
                           input_var: float = 1.0) -> tuple[list[float], list[float]]:
    """(c_l, q_l) for layers 1..depth of a tanh net whose inputs have variance ``input_var``, correlation
    ``start_corr``: layer 1 is q_1 = w q_in + b, c_1 = (w q_in c_0 + b) / q_1, then qmap and cmap.

    The q-map and c-map of Poole et al. (2016), Eqs. 3 and 5 (:func:`signalprop.theory.qmap`,
    :func:`signalprop.theory.cmap`).

    Args:
        weight_var: sigma_w^2.
        bias_var: sigma_b^2.
        start_corr: The inputs' correlation c_0.
        depth: Layers.
        input_var: The inputs' second moment q_in.

    Returns:
        ``(cs, qs)``: the correlation and the pre-activation variance at layers 1..depth.

    Examples:
        >>> cs, qs = predicted_correlations(1.0, 0.0, 0.5, 3)
        >>> [round(c, 4) for c in cs], [round(q, 4) for q in qs]
        ([0.5, 0.4726, 0.4621], [1.0, 0.3943, 0.2365])
    """
    from .. import theory

    q = weight_var * input_var + bias_var
    c = (weight_var * input_var * start_corr + bias_var) / q
    cs, qs = [c], [q]
    for _ in range(depth - 1):
        c = float(theory.cmap(ACT, c, weight_var=weight_var, bias_var=bias_var, q=q))
        q = float(theory.qmap(ACT, q, weight_var=weight_var, bias_var=bias_var))
        cs.append(min(c, 1.0))
        qs.append(q)
    return cs, qs


def tolerance(weight_var: float, bias_var: float, cs: list[float], qs: list[float], width: int,
              sigmas: float = 4.0) -> list[float]:
    """How far one network of ``width`` units may stray from the c-map at each layer: ``sigmas`` standard
    deviations, plus one part in ``width`` for the map's O(1/n) bias and float noise.

    At layer l+1 the pre-activation pairs (h_1i, h_2i) are, given layer l, n independent bivariate normal
    draws, and their sample correlation has variance (1 - c^2)^2 / n (Fisher); the averages over the n
    units of phi(h_1) phi(h_2) that set the next layer's correlation add a second, similar share. So the
    per-layer variance is taken as 2 (1 - c^2)^2 / n, and earlier deviations are carried forward by the
    c-map's slope (a finite difference of :func:`signalprop.theory.cmap`):
    var_{l+1} = slope_l^2 var_l + 2 (1 - c_{l+1}^2)^2 / n.

    Checked here: over 40 seeds x 3 (sigma_w^2, sigma_b^2) points x 3 input pairs x 20 layers at width 500
    the deviations from the c-map had no mean and a std of 0.64-0.86 of this sigma (largest |z| 3.4), so
    the estimate is conservative by about a fifth and a 4-sigma band is not crossed by a correct map; a map
    with twice the weight variance is.

    Args:
        weight_var: sigma_w^2.
        bias_var: sigma_b^2.
        cs: The predicted correlations (:func:`predicted_correlations`).
        qs: The predicted variances.
        width: Units per layer.
        sigmas: Standard deviations of the band.

    Returns:
        The band's half-width at each layer.

    Examples:
        At layer 1: ``4 sqrt(2 (1 - 0.5^2)^2 / 1000) + 1/1000``:

        >>> cs, qs = predicted_correlations(1.0, 0.0, 0.5, 3)
        >>> [round(b, 4) for b in tolerance(1.0, 0.0, cs, qs, 1000)]
        [0.1352, 0.1919, 0.2366]
    """
    from .. import theory

    var = 2 * (1 - cs[0] ** 2) ** 2 / width
    out = [sigmas * math.sqrt(var) + 1.0 / width]
    for c, q, c_next in zip(cs, qs, cs[1:]):
        h = 1e-4
        lo, hi = max(c - h, -1.0), min(c + h, 1.0)
        vals = theory.cmap(ACT, np.array([lo, hi]), weight_var=weight_var, bias_var=bias_var, q=q)
        slope = float(vals[1] - vals[0]) / (hi - lo)
        var = slope**2 * var + 2 * (1 - c_next**2) ** 2 / width
        out.append(sigmas * math.sqrt(var) + 1.0 / width)
    return out


# ---- measurement -----------------------------------------------------------------------------------
def build(weight_var: float, bias_var: float, *, width: int, depth: int, seed: int) -> nn.Sequential:
    """``depth`` x (Linear(width, width) -> Tanh), weights N(0, weight_var / width), biases N(0, bias_var).

    The mean-field network of Poole et al. (2016), without a read-out layer.

    Args:
        weight_var: sigma_w^2.
        bias_var: sigma_b^2.
        width: Units per layer.
        depth: Layers.
        seed: Seeds the weights and biases.

    Returns:
        The network, ``2 * depth`` modules.

    Examples:
        >>> net = build(1.5, 0.05, width=8, depth=3, seed=0)
        >>> len(net), type(net[1]).__name__
        (6, 'Tanh')
    """
    from .. import init
    from ..models import mlp

    full = mlp(depth, width, "tanh")
    model = nn.Sequential(*list(full.children())[:-1])  # no read-out layer: only the hidden layers matter
    g = generator(seed)
    init.variance_scaling_(model, scale=weight_var, mode="fan_in", distribution="normal", generator=g)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, math.sqrt(bias_var), generator=g)
    return model


def input_pairs(start_corr: tuple[float, ...], width: int, seed: int) -> torch.Tensor:
    """Pairs of inputs with mean square exactly 1 and empirical correlation exactly ``start_corr``.

    Rows 2k and 2k+1 are pair k. Built by Gram-Schmidt from Gaussian draws, so the input itself adds no
    sampling noise to the comparison.

    Args:
        start_corr: One correlation per pair.
        width: Entries per input.
        seed: Seeds the draws.

    Returns:
        A float64 tensor ``[2 * len(start_corr), width]``.

    Examples:
        >>> x = input_pairs((0.5,), 100, seed=0)
        >>> tuple(x.shape), round(float(x[1].pow(2).mean()), 6), round(float(x[0] @ x[1] / 100), 6)
        ((2, 100), 1.0, 0.5)
    """
    g = generator(seed)
    rows = []
    for c in start_corr:
        z = torch.randn(2, width, generator=g, dtype=torch.float64)
        u = z[0] / z[0].norm()
        v = z[1] - (z[1] @ u) * u
        v = v / v.norm()
        scale = math.sqrt(width)
        rows += [scale * u, scale * (c * u + math.sqrt(1 - c * c) * v)]
    return torch.stack(rows)


def measure_correlations(model: nn.Sequential, pairs: torch.Tensor) -> list[list[float]]:
    """Correlation <h_1, h_2> / (|h_1| |h_2|) of each pair's pre-activations after every Linear, in float64.

    Args:
        model: A ``Sequential`` of Linear and activation layers (converted to float64 in place).
        pairs: Rows 2k and 2k+1 are pair k (:func:`input_pairs`).

    Returns:
        One list per pair: the correlation after each Linear.

    Examples:
        The identity keeps the correlation:

        >>> net = nn.Sequential(nn.Linear(100, 100, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.eye(100))
        >>> [[round(c, 6) for c in cs] for cs in measure_correlations(net, input_pairs((0.5,), 100, seed=0))]
        [[0.5]]
    """
    out: list[list[float]] = [[] for _ in range(pairs.shape[0] // 2)]
    h = pairs.to(torch.float64)
    model = model.to(torch.float64)
    with torch.no_grad():
        for m in model:
            h = m(h)
            if isinstance(m, nn.Linear):
                for k in range(len(out)):
                    a, b = h[2 * k], h[2 * k + 1]
                    out[k].append(float(a @ b / (a.norm() * b.norm())))
    return out


def _measure_point(cfg: Config, wv: float, bv: float, seed: int) -> PointResult:
    from .. import theory

    model = build(wv, bv, width=cfg.width, depth=cfg.depth, seed=seed)
    measured = measure_correlations(model, input_pairs(cfg.start_corr, cfg.width, seed + 1))
    predicted, band = [], []
    for c0 in cfg.start_corr:
        cs, qs = predicted_correlations(wv, bv, c0, cfg.depth)
        predicted.append(cs)
        band.append(tolerance(wv, bv, cs, qs, cfg.width, cfg.sigmas))
    chi = theory.chi1(ACT, weight_var=wv, bias_var=bv)
    xi = theory.depth_scales(ACT, weight_var=wv, bias_var=bv)[1]
    return PointResult(wv, bv, chi, xi, measured, predicted, band)


# ---- the experiment ----------------------------------------------------------------------------------
def run(
    out: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    *,
    progress: ProgressLike = False,
    config: Config | None = None,
) -> Result:
    """Compute the tanh phase diagram (xi_c heat map, chi1 = 1 line) and check the c-map on real networks.

    ``out``: folder for ``criticality.png`` / ``criticality.json`` (None writes nothing); ``quick``: a
    6 x 3 grid and width-500, 20-layer networks (seconds) instead of 24 x 13 and width 1000, 30 layers;
    ``seed`` seeds the networks and the input pairs. ``checks``: at every point, pair and layer the measured
    correlation stays within the width-derived band around the iterated c-map; the ordered point ends
    closer to c = 1 than the chaotic one.

    Poole et al. (2016); Schoenholz et al. (2017): xi_c = -1 / log chi_c is the depth over which
    correlations reach their fixed point, infinite on the critical line chi1 = 1.

    Args:
        out: Folder for ``criticality.png`` and ``criticality.json`` (created); None writes nothing.
        quick: The test-sized preset :data:`QUICK` instead of :data:`FULL`.
        seed: Seeds the networks and the input pairs.
        progress: True prints progress lines on stderr; a callable receives them.
        config: A :class:`Config` that overrides the preset ``quick`` picks.

    Returns:
        The :class:`Result`.

    Examples:
        >>> cfg = Config(weight_var=(0.5, 4.0, 2), bias_var=(0.0, 0.3, 2), points=((1.3, 0.05), (3.0, 0.05)),
        ...              start_corr=(0.5,), width=50, depth=3)
        >>> r = run(config=cfg)
        >>> len(r.xi_c), len(r.xi_c[0]), len(r.points[0].measured[0])  # 2 x 2 grid; 3 layers
        (2, 2, 3)
    """
    from .. import theory

    seed, cfg, folder, report = start(
        "criticality", seed=seed, config=config, quick=quick, presets=(QUICK, FULL), out=out, progress=progress
    )
    wvs = np.linspace(*cfg.weight_var).tolist()
    bvs = np.linspace(*cfg.bias_var).tolist()
    with flushed_denormals():
        line = [theory.critical_weight_var(ACT, bias_var=b) for b in bvs]
        report(f"chi1 = 1 line: {len(bvs)} bias variances done")
        grid: list[list[float]] = []
        for i, b in enumerate(bvs):
            grid.append([theory.depth_scales(ACT, weight_var=w, bias_var=b)[1] for w in wvs])
            if (i + 1) % max(1, len(bvs) // 4) == 0 or i + 1 == len(bvs):
                report(f"xi_c heat map: {i + 1}/{len(bvs)} rows of {len(wvs)}")
        points = []
        for k, (wv, bv) in enumerate(cfg.points):
            w = theory.critical_weight_var(ACT, bias_var=bv) if wv < 0 else wv
            points.append(_measure_point(cfg, w, bv, seed + 10 * k))
            report(f"network {k + 1}/{len(cfg.points)}: sigma_w^2 {w:.3f}, sigma_b^2 {bv:g}, "
                   f"worst deviation {points[-1].worst:.2f} of the band")
    result = Result(cfg, seed, wvs, bvs, grid, line, points, report.elapsed)
    result.checks = _checks(result)
    return write_outputs(result, folder, "criticality", _figure, _as_dict)


def _checks(r: Result) -> dict[str, bool]:
    c = r.config
    checks = {
        f"measured correlations within {c.sigmas:g} sigma (width {c.width}) of the c-map at every layer":
            all(p.worst <= 1.0 for p in r.points),
    }
    ordered = [p for p in r.points if p.phase == "ordered"]
    chaotic = [p for p in r.points if p.phase == "chaotic"]
    if ordered and chaotic:
        o = min(min(ms[-1] for ms in p.measured) for p in ordered)
        h = max(max(ms[-1] for ms in p.measured) for p in chaotic)
        checks["ordered networks end more correlated than chaotic ones"] = o > h
    return checks


def _as_dict(r: Result) -> dict[str, Any]:
    return {
        "experiment": "criticality",
        "paper": "Poole et al. 2016, Exponential expressivity in deep neural networks through transient chaos; "
                 "Schoenholz et al. 2017, Deep information propagation",
        "activation": ACT,
        "seed": r.seed,
        "config": {k: getattr(r.config, k) for k in r.config.__dataclass_fields__},
        "seconds": r.seconds,
        "weight_vars": r.weight_vars,
        "bias_vars": r.bias_vars,
        "xi_c": r.xi_c,
        "critical_line": r.critical_line,
        "points": [
            {"weight_var": p.weight_var, "bias_var": p.bias_var, "phase": p.phase, "chi1": p.chi1, "xi_c": p.xi_c,
             "start_corr": list(r.config.start_corr), "measured": p.measured, "predicted": p.predicted,
             "band": p.band, "worst": p.worst}
            for p in r.points
        ],
        "checks": r.checks,
        "ok": r.ok,
    }


def _figure(r: Result) -> Any:
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    fig = new_figure(12.0, 4.6)
    ax, ax2 = fig.subplots(1, 2, width_ratios=[1.1, 1])
    xi = np.array(r.xi_c, dtype=float)
    xi = np.where(np.isfinite(xi), xi, 1e3).clip(0.5, 1e3)
    wv, bv = np.array(r.weight_vars), np.array(r.bias_vars)
    mesh = ax.pcolormesh(wv, bv, xi, shading="nearest", cmap="magma", norm=LogNorm(vmin=0.5, vmax=200))
    fig.colorbar(mesh, ax=ax, label="correlation depth scale xi_c (layers)")
    ax.plot(r.critical_line, bv, color="white", linewidth=2, label="chi1 = 1 (critical line)")
    ax.set_xlim(wv[0], wv[-1])
    ax.set_ylim(bv[0], bv[-1])
    ax.text(wv[0] + 0.08 * (wv[-1] - wv[0]), bv[-1] * 0.9, "ordered\nchi1 < 1", color="white", fontsize=9, va="top")
    ax.text(wv[-1] - 0.05 * (wv[-1] - wv[0]), bv[-1] * 0.1 + 0.005, "chaotic\nchi1 > 1", color="white", fontsize=9,
            ha="right")
    markers = ["o", "s", "^", "D", "v", "P"]
    for k, p in enumerate(r.points):
        ax.plot(p.weight_var, p.bias_var, markers[k % len(markers)], color="cyan", markeredgecolor="black",
                markersize=8)
    ax.set_xlabel("weight variance sigma_w^2")
    ax.set_ylabel("bias variance sigma_b^2")
    ax.set_title("tanh: depth scale xi_c (Schoenholz et al. 2017)", fontsize=10)
    ax.legend(loc="upper right", fontsize=8)

    cmap = colormaps["tab10"]
    layers = list(range(1, r.config.depth + 1))
    for k, p in enumerate(r.points):
        color = cmap(k)
        for j, (ms, ps) in enumerate(zip(p.measured, p.predicted)):
            label = (f"sigma_w^2 {p.weight_var:.2f}, sigma_b^2 {p.bias_var:g} ({p.phase})") if j == 0 else None
            ax2.plot(layers, ps, "-", color=color, alpha=0.5, linewidth=2.5)
            ax2.plot(layers, ms, markers[k % len(markers)], color=color, markersize=3.5, label=label)
    ax2.set_xlabel("layer")
    ax2.set_ylabel("correlation of two inputs' pre-activations")
    ax2.set_title(f"measured (markers, one width-{r.config.width} net) vs c-map (lines)", fontsize=10)
    ax2.set_ylim(-0.02, 1.02)
    ax2.grid(alpha=0.25)
    ax2.legend(fontsize=8, loc="lower right")
    fig.suptitle("Poole et al. 2016 / Schoenholz et al. 2017: order-to-chaos transition of deep tanh networks",
                 fontsize=10)
    return fig
