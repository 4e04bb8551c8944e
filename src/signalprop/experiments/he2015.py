"""He et al. (2015), Figs. 2-3 in small: Caffe's "xavier" against He init on plain deep ReLU conv nets.

He, Zhang, Ren and Sun, "Delving Deep into Rectifiers", ICCV 2015, Sec. 2.2: with zero biases and ReLU,

    Var[y_L] = Var[y_1] * prod_{l=2..L} ( 1/2 * n_l * Var[w_l] ),     n_l = k^2 c_{l-1} (the fan_in),

so Caffe's "xavier" filler (Var[w] = 1/n_l, uniform) halves the signal's variance at every layer,
2^-29 ~ 2e-9 over 30 layers, while He's Gaussian init (Var[w] = 2/n_l) keeps it. The paper trained a 22-layer
and a 30-layer plain net on ImageNet: at 22 layers both converge, He's sooner (Fig. 2); at 30 layers the
xavier net does not learn at all while He's does (Fig. 3).

Here the same experiment runs on scikit-learn's bundled digits (8x8 grey images, 10 classes) in minutes:
plain ``Conv(3x3, same) -> ReLU`` stacks of 22 and 30 layers (16 channels), global average pooling and a
Linear head, every layer initialized by the scheme under test with zero biases (Caffe's default), the same
mini-batch order, the same SGD with momentum, the same learning rate and the same gradient-norm clipping
for every run. The images are prepared as Caffe prepared ImageNet: 0-255 pixel scale, mean image
subtracted, no division by the std (:func:`~signalprop.experiments._common.digits_caffe`). The training
loss per step is the picture; ln 10 = 2.303 is the loss of a net that has learnt nothing.

Why 16 channels and clipping (measured here, 3000 steps, lr 0.003, seeds 0-4): at 8 channels a 22-layer
xavier net leaves the plateau or not by chance (seeds 1-3 left it at steps 670-1780, seed 0 never, seed 4
left it and then died back to ln 10 with every ReLU off): so narrow a net's per-layer gains and dead
channels vary a lot from draw to draw. At 16 channels the raw-scale inputs (std 69) put He's initial
logits in the tens (initial loss up to 75) and one 22-layer He net of four (seed 1), unclipped, was killed
by a first step whose gradient norm was 1400, and sat at ln 10 for good. Clipping the gradient's norm at 10
(``Config.clip``, the same for both schemes) bounds those first steps. It never touches a xavier net on
its plateau, whose gradient norm is 0.15-0.3 (the 30-layer xavier run of seed 0 has no clipped step in
3000); once a net learns, its gradient norm passes 10 now and then and those steps are clipped whatever
the init (seed 0: 423 steps of the 22-layer xavier run, 478 and 661 of He's at 22 and 30 layers;
:attr:`Result.clipped` counts them). With both, seeds 0-3
all showed the paper's outcome: at 22 layers He below loss 2 at steps 145-409 and xavier at 372-1242,
He first in every seed; at 30 layers every xavier net at ln 10 after 3000 steps and every He net below 2
by step 436.

Why xavier stalls, and why the input scale matters: without biases a ReLU net is positively homogeneous,
so the xavier net computes 2^{-L/2} times what a He net with the same weight directions computes, and
while its logits are that small every weight's relative update |dw|/|w| is about 2^{-(L-2)/2} times He's
(1e-3 at 22 layers, 6e-5 at 30), times the input's scale. All layers' scales then grow together, slowly
at first and faster as they grow, so the plateau ends after a time that is about 16x longer at 30 layers
than at 22. With inputs standardized to std 1 even the 22-layer xavier net did not leave ln 10 within
3000 steps here (width 16, lr 0.01, seed 0); with Caffe's raw-scale inputs (std 69, as on ImageNet) it
leaves it after 370-1240 steps (seeds 0-3), which is what the paper saw at 22 layers, while the 30-layer
one stays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from ..models import plain_cnn
from ._common import (
    LN10,
    Outcome,
    ProgressLike,
    batch_order,
    check_positive_ints,
    digits_caffe,
    flushed_denormals,
    fmt_seconds,
    generator,
    new_figure,
    smooth,
    start,
    train,
    write_outputs,
)

SCHEMES = ("xavier", "he")
"""Caffe's "xavier" filler (Var[w] = 1/fan_in, uniform) and He's init (Var[w] = 2/fan_in, Gaussian)."""


@dataclass(frozen=True)
class Config:
    """Everything that decides a run. Both schemes at one depth share all of it, seed included.

    :data:`FULL` is the default run, :data:`QUICK` the test-sized one.

    Examples:
        >>> Config().depths, QUICK.depths, QUICK.steps
        ((22, 30), (30,), 400)
    """

    depths: tuple[int, ...] = (22, 30)
    width: int = 16
    batch_size: int = 32
    steps: int = 3000
    lr: float = 0.003
    momentum: float = 0.9
    clip: float | None = 10.0
    """Largest gradient norm per step (``torch.nn.utils.clip_grad_norm_``), the same for every run; None: off."""
    window: int = 100
    """Steps averaged for the "final loss" (the last ``window`` steps) and for smoothing the curves."""
    learnt_below: float = 2.0
    """A run has started to learn once its smoothed loss is below this (ln 10 = 2.303 is chance)."""
    margin: float = 0.5
    """At the deepest depth He's final loss must be at least this far below ln 10 (xavier's stays within
    0.1 of it; its loss barely moves, so even 0.25 is hundreds of times the noise of a 50-step mean)."""

    def __post_init__(self) -> None:
        check_positive_ints(self, ("width", "batch_size", "steps", "window"), "he2015")
        if not self.depths or any(not isinstance(d, int) or d < 2 for d in self.depths):
            raise SignalpropError(f"he2015 Config.depths must be integers >= 2, got {self.depths!r}")
        if not (self.lr > 0 and 0 <= self.momentum < 1):
            raise SignalpropError(
                f"he2015 needs lr > 0 and 0 <= momentum < 1, got lr={self.lr!r}, momentum={self.momentum!r}"
            )
        if self.clip is not None and not self.clip > 0:
            raise SignalpropError(f"he2015 Config.clip must be a positive number or None, got {self.clip!r}")
        if self.window > self.steps:
            raise SignalpropError(f"he2015 Config.window ({self.window}) must not exceed steps ({self.steps})")


FULL = Config()
QUICK = Config(depths=(30,), steps=400, lr=0.005, window=50, margin=0.25)


@dataclass
class Result(Outcome):
    """Loss curves and the verdicts; ``png`` and ``json`` are None when ``out`` was None.

    ``checks`` holds the paper's claims as booleans, ``ok`` is True when all hold, ``summary()`` says it
    in plain text.

    Examples:
        >>> r = run(config=Config(depths=(3,), steps=4, window=2, batch_size=8))
        >>> sorted(r.final_loss[3]), r.png is None
        (['he', 'xavier'], True)
    """

    config: Config
    seed: int
    losses: dict[int, dict[str, list[float]]]
    """depth -> scheme -> training loss at every step."""
    final_loss: dict[int, dict[str, float]]
    """depth -> scheme -> mean loss over the last ``config.window`` steps."""
    learnt_at: dict[int, dict[str, int | None]]
    """depth -> scheme -> first step whose smoothed loss is below ``config.learnt_below`` (None: never)."""
    output_std: dict[int, dict[str, float]]
    """depth -> scheme -> std of the last conv layer's output at initialization (measured)."""
    clipped: dict[int, dict[str, int]]
    """depth -> scheme -> steps whose gradient norm was above ``config.clip`` (and so was scaled down)."""
    seconds: float
    checks: dict[str, bool] = field(default_factory=dict)
    png: Path | None = None
    json: Path | None = None

    def summary(self) -> str:
        """Plain text: the setup, each depth's final losses and learning steps, then each check."""
        clip = "no clipping" if self.config.clip is None else f"grad norm clipped at {self.config.clip:g}"
        lines = [f"he2015: Caffe xavier (Var[w]=1/fan_in) vs He (Var[w]=2/fan_in), plain ReLU CNNs of width "
                 f"{self.config.width} on digits, {self.config.steps} SGD steps, lr {self.config.lr:g}, {clip} "
                 f"({fmt_seconds(self.seconds)})"]
        for d in self.config.depths:
            parts = []
            for s in SCHEMES:
                at = self.learnt_at[d][s]
                parts.append(f"{s} final loss {self.final_loss[d][s]:.3f} "
                             f"(loss<{self.config.learnt_below:g} at step {at if at is not None else 'never'}, "
                             f"init output std {self.output_std[d][s]:.2g}, {self.clipped[d][s]} steps clipped)")
            lines.append(f"  {d} layers: " + "; ".join(parts))
        lines += self.outcome_lines()
        return "\n".join(lines)


def build(depth: int, scheme: str, *, width: int, seed: int) -> nn.Sequential:
    """The plain ReLU CNN of ``depth`` conv layers on 1-channel 8x8 digits, initialized by ``scheme``.

    ``scheme``: ``"xavier"`` is Caffe's filler, U[-sqrt(3/fan_in), +sqrt(3/fan_in)] (Var = 1/fan_in);
    ``"he"`` is He et al.'s N(0, 2/fan_in). Every layer, the head included, gets the scheme, biases zero.

    Args:
        depth: Conv layers in the body.
        scheme: ``"xavier"`` or ``"he"``.
        width: Channels of every conv layer.
        seed: Seeds the weights.

    Returns:
        The network: ``body`` (the conv-ReLU stack) and ``head`` (pooling, flatten, Linear to 10 classes).

    Raises:
        SignalpropError: An unknown scheme.

    Examples:
        Caffe's xavier draws from ``U[-sqrt(3 / fan_in), +]``, fan_in = 4 channels x 3 x 3:

        >>> net = build(3, "xavier", width=4, seed=0)
        >>> w, b = net.body[2].weight.detach(), net.body[2].bias.detach()
        >>> bool(w.abs().max() <= (3 / 36) ** 0.5), float(b.abs().max())
        (True, 0.0)
    """
    from .. import init

    if scheme not in SCHEMES:
        raise SignalpropError(f"unknown he2015 scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    model = plain_cnn(depth, width, "relu", in_channels=1, num_classes=10)
    g = generator(seed)
    if scheme == "xavier":
        init.lecun_(model, distribution="uniform", generator=g)
    else:
        init.he_(model, nonlinearity="relu", distribution="normal", generator=g)
    return model


def _batches(n: int, cfg: Config, seed: int) -> torch.Tensor:
    """The mini-batch order of :func:`~signalprop.experiments._common.batch_order`, shared by all runs."""
    return batch_order(n, cfg.batch_size, cfg.steps, seed)


def _output_std(model: nn.Sequential, x: torch.Tensor) -> float:
    """Std of the body's output (the last ReLU) at initialization, on the first 256 digits."""
    body = model.get_submodule("body")
    with torch.no_grad():
        return float(body(x[:256]).std())


def run(
    out: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    *,
    progress: ProgressLike = False,
    config: Config | None = None,
) -> Result:
    """Train xavier- and He-initialized plain ReLU CNNs of each depth on digits; plot the loss curves.

    He et al. (2015), Sec. 2.2: ``Var[y_L] = Var[y_1] prod_l (1/2 n_l Var[w_l])``, so Caffe's xavier
    (``Var[w] = 1/n_l``) halves the variance at every layer and He's (``2/n_l``) keeps it.

    Args:
        out: Folder for ``he2015.png`` and ``he2015.json`` (created); None writes nothing.
        quick: The test-sized run (:data:`QUICK`: 30 layers only, 400 steps at lr 0.005, about 16 s of
            CPU); otherwise :data:`FULL` (22 and 30 layers, width 16, 3000 steps at lr 0.003, gradient
            norm clipped at 10, about 3-4 min of CPU).
        seed: Seeds the weights (the same for both schemes at a depth) and the mini-batch order.
        progress: True prints progress lines on stderr; a callable receives them.
        config: Overrides the preset that ``quick`` picks.

    Returns:
        The :class:`Result`. Its ``checks`` hold the paper's claims: at the deepest depth xavier's final
        loss stays within 0.1 of ln 10 while He's is at least ``margin`` below it; at every shallower depth
        both learn (final loss below ``learnt_below``) and He starts learning first.

    Examples:
        A run far too short to learn anything, to show the shape of the result (the paper's checks need
        :data:`QUICK` at least):

        >>> r = run(config=Config(depths=(3,), steps=4, window=2, batch_size=8))
        >>> list(r.losses[3]), len(r.losses[3]["he"])
        (['xavier', 'he'], 4)
    """
    seed, cfg, folder, report = start(
        "he2015", seed=seed, config=config, quick=quick, presets=(QUICK, FULL), out=out, progress=progress
    )
    x, y = digits_caffe()
    order = _batches(len(x), cfg, seed)
    losses: dict[int, dict[str, list[float]]] = {}
    stds: dict[int, dict[str, float]] = {}
    clipped: dict[int, dict[str, int]] = {}
    with flushed_denormals():
        for depth in cfg.depths:
            losses[depth], stds[depth], clipped[depth] = {}, {}, {}
            for scheme in SCHEMES:
                torch.manual_seed(seed)  # nothing random should read it, but pin it anyway
                model = build(depth, scheme, width=cfg.width, seed=seed + depth)
                stds[depth][scheme] = _output_std(model, x)
                opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
                losses[depth][scheme], clipped[depth][scheme] = train(
                    model, x, y, order, opt, clip=cfg.clip, window=cfg.window, report=report,
                    experiment="he2015", label=f"{depth} layers, {scheme}",
                )
    final = {d: {s: sum(v[-cfg.window:]) / cfg.window for s, v in per.items()} for d, per in losses.items()}
    learnt: dict[int, dict[str, int | None]] = {}
    for d, per in losses.items():
        learnt[d] = {}
        for s, v in per.items():
            below = [i for i, m in enumerate(smooth(v, cfg.window)) if i + 1 >= cfg.window and m < cfg.learnt_below]
            learnt[d][s] = below[0] if below else None
    result = Result(cfg, seed, losses, final, learnt, stds, clipped, report.elapsed, _checks(cfg, final, learnt))
    return write_outputs(result, folder, "he2015", _figure, _as_dict)


def _checks(cfg: Config, final: dict[int, dict[str, float]], learnt: dict[int, dict[str, int | None]]
            ) -> dict[str, bool]:
    deepest = max(cfg.depths)
    checks = {
        f"{deepest} layers: xavier stalls near ln 10 (final loss > {LN10 - 0.1:.2f})": final[deepest]["xavier"] > LN10 - 0.1,
        f"{deepest} layers: He learns (final loss < {LN10 - cfg.margin:.2f})": final[deepest]["he"] < LN10 - cfg.margin,
    }
    for d in cfg.depths:
        if d == deepest:
            continue
        he_at, xa_at = learnt[d]["he"], learnt[d]["xavier"]
        checks[f"{d} layers: both learn (final loss < {cfg.learnt_below:g})"] = (
            final[d]["he"] < cfg.learnt_below and final[d]["xavier"] < cfg.learnt_below
        )
        checks[f"{d} layers: He learns sooner"] = he_at is not None and (xa_at is None or he_at < xa_at)
    return checks


def _as_dict(r: Result) -> dict[str, Any]:
    return {
        "experiment": "he2015",
        "paper": "He, Zhang, Ren, Sun. Delving Deep into Rectifiers. ICCV 2015, Figs. 2-3",
        "seed": r.seed,
        "config": {k: getattr(r.config, k) for k in r.config.__dataclass_fields__},
        "seconds": r.seconds,
        "final_loss": r.final_loss,
        "learnt_at_step": r.learnt_at,
        "init_output_std": r.output_std,
        "clipped_steps": r.clipped,
        "checks": r.checks,
        "ok": r.ok,
        "losses": r.losses,
    }


def _figure(r: Result) -> Any:
    cfg = r.config
    fig = new_figure(4.2 * len(cfg.depths), 3.4)
    axes = fig.subplots(1, len(cfg.depths), squeeze=False)[0]
    colors = {"xavier": "#1f77b4", "he": "#d62728"}
    labels = {"xavier": "Caffe xavier, Var[w]=1/fan_in", "he": "He, Var[w]=2/fan_in"}
    for ax, depth in zip(axes, cfg.depths):
        for s in SCHEMES:
            raw = r.losses[depth][s]
            ax.plot(raw, color=colors[s], alpha=0.18, linewidth=0.6)
            ax.plot(smooth(raw, cfg.window), color=colors[s], linewidth=1.8, label=labels[s])
        ax.axhline(LN10, color="0.4", linestyle=":", linewidth=1)
        ax.text(cfg.steps * 0.98, LN10 + 0.04, "ln 10", ha="right", va="bottom", fontsize=8, color="0.3")
        ax.set_title(f"{depth}-layer plain ReLU CNN")
        ax.set_xlabel("SGD step")
        ax.set_ylim(0, 2.6)
        ax.set_xlim(0, cfg.steps)
        ax.grid(alpha=0.25)
    axes[0].set_ylabel("training loss (cross-entropy)")
    axes[0].legend(loc="lower left", fontsize=8)
    clip = "" if cfg.clip is None else f", grad norm clip {cfg.clip:g}"
    fig.suptitle(f"He et al. 2015 on digits: same data order, SGD lr {cfg.lr:g}, momentum {cfg.momentum:g}{clip}, "
                 f"width {cfg.width}, batch {cfg.batch_size}", fontsize=9)
    return fig
