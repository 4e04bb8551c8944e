"""Evidence across sizes: each init scheme's signal at the last layer and gradient at the first, over depth x width.

For every (scheme, depth, width) a fresh network of one family is built, initialized, and measured once on a
small batch (:func:`signalprop.measure`: one forward and one backward, statistics reduced on the fly, no
activation kept). Two numbers per cell: the last weight layer's output std (does the forward signal survive
the depth?) and the first weight layer's output-gradient std (does the backward one?). A scheme that keeps
both near their one-layer values over the whole grid is independent of depth and width, which is what He's
rule promises for plain ReLU chains and what residual scalings and normalization promise beyond them.

Families: ``mlp`` (Linear-ReLU), ``cnn`` (3x3 conv-ReLU on 8x8 inputs, circular padding), ``resnet``
(``x + W2 relu(W1 relu(x))`` blocks), ``prenorm`` (``x + W2 relu(W1 LN(x))``), ``postnorm``
(``LN(x + W2 relu(W1 x))``). Depth counts weight layers.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from ._common import Progress, ProgressLike, jsonable, out_dir

__all__ = ["FAMILIES", "SCHEMES", "Sweep", "build", "plot_sweep", "sweep"]

FAMILIES = ("mlp", "cnn", "resnet", "prenorm", "postnorm")
SCHEMES = ("default", "glorot", "lecun", "he", "orthogonal", "auto")
"""``default``: PyTorch's own init; ``glorot``/``lecun``/``he``/``orthogonal``: :mod:`signalprop.init`;
``auto``: :func:`signalprop.fix.auto_init_` (Fixup on residual branches)."""


class _Block(nn.Module):
    def __init__(self, width: int, norm: str | None) -> None:
        super().__init__()
        self.norm = norm
        self.ln = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "pre":
            return x + self.fc2(torch.relu(self.fc1(self.ln(x))))
        if self.norm == "post":
            return self.ln(x + self.fc2(torch.relu(self.fc1(x))))
        return x + self.fc2(torch.relu(self.fc1(torch.relu(x))))


def build(family: str, depth: int, width: int) -> tuple[nn.Module, torch.Size]:
    """A ``family`` network with ``depth`` weight layers of ``width`` units; returns it and one input's shape.

    Args:
        family: One of :data:`FAMILIES`.
        depth: Weight layers, at least 2.
        width: Units (channels for ``cnn``) per layer.

    Returns:
        ``(model, shape)``, ``shape`` being one input's, without the batch dimension.

    Raises:
        SignalpropError: An unknown family, or a depth below 2 or width below 1.

    Examples:
        >>> net, shape = build("cnn", 3, 4)
        >>> len(net), tuple(shape)
        (5, (4, 8, 8))
    """
    if family not in FAMILIES:
        raise SignalpropError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    if depth < 2 or width < 1:
        raise SignalpropError(f"depth must be >= 2 and width >= 1, got depth={depth}, width={width}")
    if family == "mlp":
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.ReLU()]
        return nn.Sequential(*layers[:-1]), torch.Size([width])
    if family == "cnn":
        layers = []
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1, padding_mode="circular"), nn.ReLU()]
        return nn.Sequential(*layers[:-1]), torch.Size([width, 8, 8])
    norm = {"resnet": None, "prenorm": "pre", "postnorm": "post"}[family]
    blocks = max(1, (depth - 2) // 2)
    net = nn.Sequential(nn.Linear(width, width), *[_Block(width, norm) for _ in range(blocks)],
                        nn.Linear(width, width))
    return net, torch.Size([width])


def _init(model: nn.Module, scheme: str, x: torch.Tensor) -> None:
    from .. import fix, init

    if scheme == "default":
        return
    if scheme == "auto":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sequential = all(isinstance(m, nn.Sequential) for m in model.modules() if list(m.children()))
            fix.auto_init_(model, example_inputs=None if sequential else x)
        return
    fn: dict[str, Callable[..., Any]] = {"glorot": init.glorot_, "lecun": init.lecun_, "he": init.he_,
                                         "orthogonal": init.orthogonal_}
    kwargs: dict[str, Any] = {"gain": "relu"} if scheme == "orthogonal" else {}
    fn[scheme](model, **kwargs)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear | nn.Conv2d) and m.bias is not None:
                m.bias.zero_()


@dataclass(frozen=True)
class Sweep:
    """``forward[scheme][i][j]``: last weight layer's output std at ``depths[i]``, ``widths[j]``;
    ``gradient[...]``: the first weight layer's output-gradient std; ``seconds``: the whole sweep's wall time.

    Examples:
        >>> s = sweep("mlp", depths=(2, 4), widths=(8,), schemes=("he",), batch=4)
        >>> len(s.forward["he"]), len(s.forward["he"][0]), sorted(s.to_dict())[:3]
        (2, 1, ['depths', 'family', 'forward'])
    """

    family: str
    depths: tuple[int, ...]
    widths: tuple[int, ...]
    schemes: tuple[str, ...]
    forward: dict[str, list[list[float]]]
    gradient: dict[str, list[list[float]]]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """The sweep as JSON-ready data."""
        return {"family": self.family, "depths": list(self.depths), "widths": list(self.widths),
                "schemes": list(self.schemes), "forward": self.forward, "gradient": self.gradient,
                "seconds": self.seconds}


def sweep(family: str = "mlp", *, depths: Sequence[int] = (10, 100, 1000), widths: Sequence[int] = (64, 256),
          schemes: Sequence[str] = SCHEMES, batch: int = 16, seed: int = 0, progress: ProgressLike = False,
          out: str | Path | None = None) -> Sweep:
    """Measure every scheme over ``depths`` x ``widths`` for one family; write PNG + JSON under ``out``.

    Args:
        family: one of :data:`FAMILIES`.
        depths: The grid's depths; depth counts weight layers.
        widths: The grid's widths.
        schemes: any of :data:`SCHEMES`.
        batch: samples per measurement (N(0, 1) inputs).
        seed: seeds the inputs and every draw of the weights.
        progress: print one line per cell (``True``: to stderr; or a callable).
        out: a folder for ``sweep_<family>.png`` and ``sweep_<family>.json``.

    Returns:
        A :class:`Sweep`.

    Raises:
        SignalpropError: An unknown scheme, an empty grid or a batch below 1.

    Examples:
        He et al. (2015) keep a plain ReLU chain's std at any depth. PyTorch's default Linear init,
        ``U(-1/sqrt(fan_in), +)`` (weight variance ``1/(3 fan_in)``), with ReLU's halving multiplies the
        second moment by about 1/6 per layer, until all that is left is about the bias's own std,
        ``1/sqrt(3 * 256) = 0.036``:

        >>> s = sweep("mlp", depths=(10,), widths=(256,), schemes=("he", "default"), batch=64)
        >>> s.forward["he"][0][0] > 0.5, round(s.forward["default"][0][0], 2)
        (True, 0.04)
    """
    from ..measurement import measure

    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise SignalpropError(f"unknown scheme(s) {bad or list(schemes)}; choose from {', '.join(SCHEMES)}")
    if not depths or not widths or batch < 1:
        raise SignalpropError("sweep needs at least one depth and one width, and batch >= 1")
    say = Progress(f"sweep {family}", progress)
    t0 = time.perf_counter()
    fwd = {s: [[math.nan] * len(widths) for _ in depths] for s in schemes}
    grad = {s: [[math.nan] * len(widths) for _ in depths] for s in schemes}
    for i, depth in enumerate(depths):
        for j, width in enumerate(widths):
            for s in schemes:
                torch.manual_seed(seed)
                model, shape = build(family, depth, width)
                x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
                _init(model, s, x)
                trace = measure(model, x).weight_layers()
                layers = list(trace)
                fwd[s][i][j] = layers[-1].fwd.std
                grad[s][i][j] = layers[0].bwd.std if layers[0].bwd is not None else math.nan
                say(f"depth {depth} width {width} {s}: last std {fwd[s][i][j]:.3g}, "
                    f"first gradient std {grad[s][i][j]:.3g}")
    result = Sweep(family, tuple(depths), tuple(widths), tuple(schemes), fwd, grad, time.perf_counter() - t0)
    folder = out_dir(out)
    if folder is not None:
        (folder / f"sweep_{family}.json").write_text(json.dumps(jsonable(result.to_dict()), indent=1))
        plot_sweep(result, folder / f"sweep_{family}.png")
    return result


def _clipped_log10(v: float) -> float:
    """log10 of a std for the colour scale, within +-6: 0 (underflowed) is -6, inf or nan +6."""
    if v == 0:
        return -6.0
    if not math.isfinite(v):
        return 6.0
    return max(-6.0, min(6.0, math.log10(v)))


def plot_sweep(result: Sweep, path: str | Path) -> Path:
    """One column per scheme, heat maps of log10 std over depth x width: forward above, gradient below.

    Args:
        result: A :func:`sweep` result.
        path: Where to write the PNG.

    Returns:
        The path written.

    Examples:
        >>> import os, tempfile
        >>> s = Sweep("mlp", (2,), (8,), ("he",), {"he": [[1.0]]}, {"he": [[1.0]]}, 0.0)
        >>> plot_sweep(s, os.path.join(tempfile.mkdtemp(), "sweep.png")).name
        'sweep.png'
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    from ..report.plots import _save

    n = len(result.schemes)
    fig = Figure(figsize=(2.6 * n + 1.2, 5.2), layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-6.0, vmax=6.0)
    image = None
    for col, s in enumerate(result.schemes):
        for row, (label, grid) in enumerate((("last-layer std", result.forward[s]),
                                             ("first-layer gradient std", result.gradient[s]))):
            ax = axes[row][col]
            vals = [[_clipped_log10(v) for v in r] for r in grid]
            image = ax.imshow(vals, cmap="RdBu_r", norm=norm, aspect="auto")
            for i, r in enumerate(grid):
                for j, v in enumerate(r):
                    ax.text(j, i, f"{v:.1g}" if math.isfinite(v) else "inf", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(result.widths)), [str(w) for w in result.widths], fontsize=7)
            ax.set_yticks(range(len(result.depths)), [str(d) for d in result.depths], fontsize=7)
            ax.set_title(f"{s}: {label}", fontsize=8)
            if col == 0:
                ax.set_ylabel("depth")
            if row == 1:
                ax.set_xlabel("width")
    if image is not None:
        fig.colorbar(image, ax=axes, label="log10 std", shrink=0.8)
    fig.suptitle(f"{result.family}: signal and gradient across depth and width", fontsize=10)
    return _save(fig, path)
