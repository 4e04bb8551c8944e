"""Xiao et al. (2018) in small: a deep vanilla tanh CNN trains with delta-orthogonal weights at the
critical point, and not with Gaussian weights at the same point.

Xiao, Bahri, Sohl-Dickstein, Schoenholz and Pennington, "Dynamical Isometry and a Mean Field Theory of CNNs:
How to Train 10,000-Layer Vanilla Convolutional Neural Networks", ICML 2018. A deep tanh network whose
weights have variance sigma_w^2 / fan_in and biases variance sigma_b^2 keeps a fixed point q* of the
pre-activation variance; on the order-to-chaos line chi1 = sigma_w^2 E[tanh'(sqrt(q*) z)^2] = 1 its
correlation depth scale diverges (Poole et al. 2016; Schoenholz et al. 2017). Criticality fixes the mean
squared singular value of the input-output Jacobian, not their spread: with Gaussian convolution kernels the
spread grows with depth, and the spatial structure of the signal (every Fourier mode but the uniform one)
decays layer after layer (the paper's Sec. 3-4). The delta-orthogonal kernel (an orthogonal matrix at the
kernel's centre, zeros elsewhere; Algorithm 2) makes every layer norm-preserving at every spatial
frequency, so at the critical point with small sigma_b^2 (tanh almost linear at q*) all singular values
stay near 1: dynamical isometry. The paper trains 10,000-layer CNNs that way; a Gaussian init at the same
critical point trains ever more slowly with depth (its Figs. 1 and 5).

Here: plain ``Conv(3x3, same) -> tanh`` stacks (16 channels, no normalization, no skips, global average
pooling and a Linear head) on scikit-learn's bundled digits, standardized. Both schemes sit at the same
critical point, sigma_b^2 = 2e-5 and sigma_w^2 = ``theory.critical_weight_var("tanh", bias_var=2e-5)`` =
1.05 (chi1 = 1, q* = 0.026), biases N(0, sigma_b^2) in both; they differ only in the weights:
``delta_orthogonal`` (``init.delta_orthogonal_`` with gain sqrt(sigma_w^2)) against ``gaussian``
(N(0, sigma_w^2 / fan_in), ``init.variance_scaling_``). Both get the same mini-batch order and the same
Adam steps with the gradient norm clipped at 1. The per-layer forward std and gradient std of each net at
initialization come from :func:`signalprop.measure`.

Why this contrast and these settings (measured here, seed 0): a He-style Gaussian (sigma_w^2 = 2, chaotic,
correlation depth xi_c = 22) still trains at 100 layers, less than the 6 xi_c = 130 Schoenholz et al. allow,
so off-critical Gaussian inits only fail far deeper; the Gaussian at the critical point is the paper's
sharper contrast and already fails at 100 layers. SGD with momentum at lr 0.01 showed the same contrast,
more slowly (100 layers, 300 steps: train accuracy 0.34 against 0.15); larger steps (SGD lr 0.05, unclipped
Adam at 1e-3) threw the delta-orthogonal net back to chance. A deep net's update adds up over its layers,
so the learning rate falls with depth, about as 1/L: 5e-4 at 100 layers, 2.5e-4 at 200 (:data:`DEPTH200`:
loss 1.29 against 1.84, train accuracy 0.56 against 0.20 after 400 steps). At 1,000 layers that rule gives
5e-5, and with it for every layer the delta-orthogonal net stayed at ln 10 (2.31 after 240 steps): Adam moves
each weight by about its rate a step, so the 16-input Linear head barely moved. The 1/L belongs to the
1,000 blocks whose updates add up, not to the one readout (the point of depth-muP): :data:`FULL` gives the
head its own rate, 1e-3, and trains 1,600 steps (loss 1.89 against 2.30, train accuracy 0.30 against 0.10).
Tried at 1,000 layers (delta-orthogonal, 400 steps, seed 0): conv rate 1e-4 or 2e-4 with head 1e-2 stayed at
ln 10; 5e-5 with head 1e-2 reached 2.04, with head 1e-3 1.83, which is :data:`FULL` with more steps. At
init a delta-orthogonal kernel has only its centre tap, so every layer acts on each pixel alone and the
net can only read the pixels' intensities; the spatial taps grow from zero during training, which is why
a 1,000-layer net at a 1/L rate needs many steps.

Padding: with PyTorch's default zero padding an 8x8 image has 28 border positions out of 64, where a 3x3
Gaussian kernel reaches fewer inputs, so the Gaussian net's signal also shrinks layer after layer (its
tanh output std falls from 0.6 to 0.026 over 100 layers, where q* gives 0.16); the delta-orthogonal kernel
reads only its centre and loses nothing. ``Config.padding = "circular"``, the periodic boundary of the
paper's theory, removes that border loss: at 100 layers the Gaussian net then stayed at ln 10 (loss 2.302
after 200 steps) while the delta-orthogonal one reached 1.84.
"""

from __future__ import annotations

import math
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
    digits,
    flushed_denormals,
    fmt_seconds,
    generator,
    new_figure,
    smooth,
    start,
    train,
    write_outputs,
)

SCHEMES = ("delta_orthogonal", "gaussian")
"""Both at the critical point: delta-orthogonal kernels (Xiao et al., Algorithm 2) and N(0, sigma_w^2/fan_in)."""
PADDINGS = ("zeros", "circular")


@dataclass(frozen=True)
class Config:
    """Everything that decides a run; both schemes share all of it, seed included.

    Example:
        >>> from signalprop.experiments import xiao2018
        >>> cfg = xiao2018.FULL
        >>> cfg.depth, cfg.width, round(cfg.weight_var, 3), cfg.bias_var
        (1000, 16, 1.05, 2e-05)
    """

    depth: int = 1000
    width: int = 16
    batch_size: int = 32
    steps: int = 1600
    lr: float = 5e-5
    """Adam's learning rate for the conv layers."""
    head_lr: float | None = 1e-3
    """Adam's learning rate for the Linear head (the readout); None: ``lr``. Adam moves every weight by
    about its learning rate a step, so the 1/depth rate a deep body needs would leave a 16-input head
    almost where it started (16 x 0.02 x 0.16: logits move by 0.05 in 400 steps at lr 5e-5)."""
    clip: float = 1.0
    """Largest gradient norm per step (``torch.nn.utils.clip_grad_norm_``), the same for both schemes."""
    bias_var: float = 2e-5
    """sigma_b^2; sigma_w^2 is the critical weight variance that goes with it (:attr:`weight_var`)."""
    padding: str = "zeros"
    """The convolutions' ``padding_mode``: ``"zeros"`` (PyTorch's default) or ``"circular"`` (the periodic
    boundary of the paper's mean-field theory, where a Gaussian kernel loses no signal at the border)."""
    window: int = 50
    """Steps averaged for the final loss, and for smoothing the curves."""
    loss_margin: float = 0.2
    """Delta-orthogonal's final loss must be at least this far below the Gaussian's."""
    acc_margin: float = 0.15
    """Delta-orthogonal's train accuracy must be at least this far above the Gaussian's."""

    def __post_init__(self) -> None:
        check_positive_ints(self, ("depth", "width", "batch_size", "steps", "window"), "xiao2018")
        if not (self.lr > 0 and self.clip > 0 and self.bias_var > 0) or (
                self.head_lr is not None and not self.head_lr > 0):
            raise SignalpropError(f"xiao2018 needs lr, head_lr (or None), clip and bias_var > 0, got "
                                  f"lr={self.lr!r}, head_lr={self.head_lr!r}, clip={self.clip!r}, "
                                  f"bias_var={self.bias_var!r}")
        if self.padding not in PADDINGS:
            raise SignalpropError(f"xiao2018 Config.padding must be one of {', '.join(PADDINGS)}, got {self.padding!r}")
        if self.window > self.steps:
            raise SignalpropError(f"xiao2018 Config.window ({self.window}) must not exceed steps ({self.steps})")

    @property
    def rates(self) -> str:
        """The learning rates as the summary and the picture print them: ``lr 5e-05 (head 0.001)``."""
        return f"lr {self.lr:g}" + ("" if self.head_lr is None else f" (head {self.head_lr:g})")

    @property
    def weight_var(self) -> float:
        """sigma_w^2 on the tanh order-to-chaos line at ``bias_var`` (chi1 = 1; Schoenholz et al. 2017)."""
        from ..theory import critical_weight_var

        return critical_weight_var("tanh", bias_var=self.bias_var)


FULL = Config()
"""The full run: 1,000 layers, 1,600 steps, lr 5e-5 for the convolutions and 1e-3 for the head (23 minutes
on one CPU thread)."""
DEPTH200 = Config(depth=200, steps=400, lr=2.5e-4, head_lr=None)
"""200 layers, 400 steps, one learning rate for every layer (about a minute on 2 CPU cores)."""
QUICK = Config(depth=100, steps=200, lr=5e-4, head_lr=None, window=20, loss_margin=0.3, acc_margin=0.2)


@dataclass
class Result(Outcome):
    """Loss curves, accuracies, the per-layer statistics at init and the verdicts.

    Examples:
        >>> r = run(config=Config(depth=3, width=4, steps=3, window=2, batch_size=8))
        >>> sorted(r.losses), [len(v) for v in r.losses.values()], r.png is None
        (['delta_orthogonal', 'gaussian'], [3, 3], True)
    """

    config: Config
    seed: int
    losses: dict[str, list[float]]
    """scheme -> training loss at every step."""
    final_loss: dict[str, float]
    """scheme -> mean loss over the last ``config.window`` steps."""
    accuracy: dict[str, float]
    """scheme -> accuracy on all 1797 digits (the training set) after the last step."""
    init_fwd_std: dict[str, list[float]]
    """scheme -> std of each tanh layer's output at initialization (``signalprop.measure``)."""
    init_grad_std: dict[str, list[float]]
    """scheme -> std of the loss gradient at each conv layer's output at initialization."""
    seconds: dict[str, float]
    """scheme -> wall time of its training, in seconds."""
    total_seconds: float
    checks: dict[str, bool] = field(default_factory=dict)
    png: Path | None = None
    json: Path | None = None

    def summary(self) -> str:
        c = self.config
        lines = [f"xiao2018: {c.depth}-layer vanilla tanh CNN (width {c.width}) on digits at the critical point "
                 f"sigma_w^2 = {c.weight_var:.4f}, sigma_b^2 = {c.bias_var:g}, {c.padding} padding; {c.steps} Adam steps, {c.rates}, "
                 f"grad norm clip {c.clip:g} ({fmt_seconds(self.total_seconds)})"]
        for s in SCHEMES:
            g = self.init_grad_std[s]
            lines.append(f"  {s}: final loss {self.final_loss[s]:.3f}, train accuracy {self.accuracy[s]:.3f}; "
                         f"at init last tanh std {self.init_fwd_std[s][-1]:.3g}, gradient std max/min over layers "
                         f"{_spread(g):.3g} ({fmt_seconds(self.seconds[s])})")
        lines += self.outcome_lines()
        return "\n".join(lines)


def _spread(values: list[float]) -> float:
    positive = [v for v in values if v > 0]
    return max(positive) / min(positive) if positive else math.nan


def build(depth: int, scheme: str, *, width: int, weight_var: float, bias_var: float, seed: int,
          padding: str = "zeros") -> nn.Sequential:
    """The vanilla tanh CNN of ``depth`` conv layers on 1-channel 8x8 digits, initialized by ``scheme``.

    Args:
        depth: conv layers (3x3, same padding), each followed by tanh; then average pooling and a Linear head.
        scheme: ``"delta_orthogonal"`` (orthogonal centre tap with gain sqrt(weight_var)) or ``"gaussian"``
            (N(0, weight_var / fan_in)); the head gets the same scheme (orthogonal / Gaussian).
        width: channels of every conv layer.
        weight_var: sigma_w^2; bias_var: sigma_b^2, every bias drawn from N(0, bias_var) in both schemes.
        seed: seeds the weights and biases.
        padding: every conv's ``padding_mode``, ``"zeros"`` or ``"circular"``.

    Returns:
        The ``nn.Sequential`` of :func:`signalprop.models.plain_cnn`, initialized.

    Example:
        >>> from signalprop.experiments import xiao2018
        >>> net = xiao2018.build(4, "delta_orthogonal", width=8, weight_var=1.05, bias_var=2e-5, seed=0)
        >>> w = net.body[2].weight.detach()  # the 2nd conv: zero except the centre tap
        >>> float(w[:, :, 0, 0].abs().max()), round(float((w[:, :, 1, 1].T @ w[:, :, 1, 1])[0, 0]), 3)
        (0.0, 1.05)
    """
    from .. import init

    if scheme not in SCHEMES:
        raise SignalpropError(f"unknown xiao2018 scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if padding not in PADDINGS:
        raise SignalpropError(f"unknown xiao2018 padding {padding!r}; use one of {', '.join(PADDINGS)}")
    model = plain_cnn(depth, width, "tanh", in_channels=1, num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.padding_mode = "circular" if padding == "circular" else "zeros"  # Conv2d.forward reads it
    g = generator(seed)
    if scheme == "delta_orthogonal":
        init.delta_orthogonal_(model, gain=math.sqrt(weight_var), generator=g)
    else:
        init.variance_scaling_(model, scale=weight_var, mode="fan_in", distribution="normal", generator=g)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, math.sqrt(bias_var), generator=g)
    return model


def _init_stats(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """(std of each tanh output, std of the loss gradient at each conv output) of one measured pass."""
    from ..measurement import measure

    trace = measure(model, x, loss_fn=lambda out: nn.functional.cross_entropy(out, y))
    fwd = [s.fwd.std for s in trace if s.kind == "Tanh"]
    grad = [s.bwd.std for s in trace if s.kind == "Conv2d" and s.bwd is not None]
    return fwd, grad


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        right = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(256), y.split(256)))
    model.train()
    return right / len(y)


def run(
    out: str | Path | None = None,
    quick: bool = False,
    seed: int = 0,
    *,
    progress: ProgressLike = False,
    config: Config | None = None,
) -> Result:
    """Train delta-orthogonal and Gaussian vanilla tanh CNNs at the critical point on digits; plot both.

    Args:
        out: folder for ``xiao2018.png`` and ``xiao2018.json`` (created); None writes nothing.
        quick: the test-sized run (:data:`QUICK`: 100 layers, 200 steps at lr 5e-4, about a minute of CPU);
            otherwise :data:`FULL` (1,000 layers, 1,600 steps: 23 minutes on one CPU thread).
        seed: seeds the weights (the same seed for both schemes) and the mini-batch order.
        progress: True prints progress lines on stderr; a callable receives them.
        config: overrides the preset that ``quick`` picks.

    Returns:
        :class:`Result`. Its ``checks`` hold the paper's claim: the delta-orthogonal net's final loss is at
        least ``loss_margin`` below the Gaussian net's and its train accuracy at least ``acc_margin`` above.

    Examples:
        A run far too short to learn anything, to show the shape of the result (the paper's claim needs
        :data:`QUICK` at least):

        >>> r = run(config=Config(depth=3, width=4, steps=3, window=2, batch_size=8))
        >>> sorted(r.final_loss), len(r.init_fwd_std["gaussian"])
        (['delta_orthogonal', 'gaussian'], 3)
    """
    seed, cfg, folder, report = start(
        "xiao2018", seed=seed, config=config, quick=quick, presets=(QUICK, FULL), out=out, progress=progress
    )
    x, y = digits(images=True)
    order = batch_order(len(x), cfg.batch_size, cfg.steps, seed)
    wv = cfg.weight_var
    losses: dict[str, list[float]] = {}
    acc: dict[str, float] = {}
    fwd: dict[str, list[float]] = {}
    grad: dict[str, list[float]] = {}
    secs: dict[str, float] = {}
    with flushed_denormals():
        for scheme in SCHEMES:
            model = build(cfg.depth, scheme, width=cfg.width, weight_var=wv, bias_var=cfg.bias_var,
                          seed=seed + cfg.depth, padding=cfg.padding)
            fwd[scheme], grad[scheme] = _init_stats(model, x[:256], y[:256])
            t0 = report.elapsed
            opt = torch.optim.Adam(_param_groups(model, cfg), lr=cfg.lr)
            losses[scheme], _ = train(model, x, y, order, opt, clip=cfg.clip, window=cfg.window, report=report,
                                      experiment="xiao2018", label=f"{cfg.depth} layers, {scheme}")
            acc[scheme] = _accuracy(model, x, y)
            secs[scheme] = report.elapsed - t0
            report(f"{scheme}: train accuracy {acc[scheme]:.3f}")
    final = {s: sum(v[-cfg.window:]) / cfg.window for s, v in losses.items()}
    result = Result(cfg, seed, losses, final, acc, fwd, grad, secs, report.elapsed, _checks(cfg, final, acc))
    return write_outputs(result, folder, "xiao2018", _figure, _as_dict)


def _param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """The conv layers at ``lr``, the head (the last Linear) at ``head_lr``."""
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    ids = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": body, "lr": cfg.lr},
            {"params": list(head.parameters()), "lr": cfg.lr if cfg.head_lr is None else cfg.head_lr}]


def _checks(cfg: Config, final: dict[str, float], acc: dict[str, float]) -> dict[str, bool]:
    d, g = "delta_orthogonal", "gaussian"
    return {
        f"{cfg.depth} layers: delta-orthogonal's final loss at least {cfg.loss_margin:g} below the Gaussian's":
            final[d] < final[g] - cfg.loss_margin,
        f"{cfg.depth} layers: delta-orthogonal's train accuracy at least {cfg.acc_margin:g} above the Gaussian's":
            acc[d] > acc[g] + cfg.acc_margin,
    }


def _as_dict(r: Result) -> dict[str, Any]:
    return {
        "experiment": "xiao2018",
        "paper": "Xiao, Bahri, Sohl-Dickstein, Schoenholz, Pennington. Dynamical Isometry and a Mean Field "
                 "Theory of CNNs: How to Train 10,000-Layer Vanilla Convolutional Neural Networks. ICML 2018",
        "seed": r.seed,
        "config": {**{k: getattr(r.config, k) for k in r.config.__dataclass_fields__},
                   "weight_var": r.config.weight_var},
        "seconds": r.seconds,
        "total_seconds": r.total_seconds,
        "final_loss": r.final_loss,
        "train_accuracy": r.accuracy,
        "init_fwd_std": r.init_fwd_std,
        "init_grad_std": r.init_grad_std,
        "checks": r.checks,
        "ok": r.ok,
        "losses": r.losses,
    }


def _figure(r: Result) -> Any:
    cfg = r.config
    fig = new_figure(12.0, 3.4)
    ax_loss, ax_fwd, ax_grad = fig.subplots(1, 3)
    colors = {"delta_orthogonal": "#d62728", "gaussian": "#1f77b4"}
    labels = {"delta_orthogonal": "delta-orthogonal", "gaussian": "Gaussian"}
    for s in SCHEMES:
        raw = r.losses[s]
        ax_loss.plot(raw, color=colors[s], alpha=0.18, linewidth=0.6)
        ax_loss.plot(smooth(raw, cfg.window), color=colors[s], linewidth=1.8,
                     label=f"{labels[s]} (train acc {r.accuracy[s]:.2f})")
        ax_fwd.plot(range(1, len(r.init_fwd_std[s]) + 1), r.init_fwd_std[s], color=colors[s], label=labels[s])
        ax_grad.plot(range(1, len(r.init_grad_std[s]) + 1), r.init_grad_std[s], color=colors[s], label=labels[s])
    ax_loss.axhline(LN10, color="0.4", linestyle=":", linewidth=1)
    ax_loss.text(cfg.steps * 0.98, LN10 + 0.04, "ln 10", ha="right", va="bottom", fontsize=8, color="0.3")
    ax_loss.set(title=f"training loss, {cfg.depth}-layer tanh CNN", xlabel="Adam step",
                ylabel="cross-entropy", xlim=(0, cfg.steps), ylim=(0, 2.8))
    ax_fwd.set(title="tanh output std at init", xlabel="layer", yscale="log")
    ax_grad.set(title="gradient std at each conv output, at init", xlabel="layer", yscale="log")
    for ax in (ax_loss, ax_fwd, ax_grad):
        ax.grid(alpha=0.25)
    ax_loss.legend(loc="lower left", fontsize=8)
    ax_grad.legend(fontsize=8)
    fig.suptitle(f"Xiao et al. 2018 on digits: both at the critical point sigma_w^2 = {cfg.weight_var:.3f}, "
                 f"sigma_b^2 = {cfg.bias_var:g}; {cfg.padding} padding, width {cfg.width}, batch {cfg.batch_size}, Adam {cfg.rates}, "
                 f"clip {cfg.clip:g}", fontsize=9)
    return fig
