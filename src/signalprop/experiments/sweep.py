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

**Predicted or measured, per cell.** Measuring a 1,000-layer network costs a forward and a backward through
2,000 hooked modules (half a minute a cell on 2 busy cores); :func:`signalprop.predict` gives the same two
numbers from the weights alone in about a second, on one graph captured per (depth, width) and shared by the
schemes. With ``method="auto"`` a cell is measured when its depth is at most ``measure_depth`` and predicted
beyond it where the theory covers the family as a plain chain (:data:`PREDICTED_FAMILIES`: Linear or
circularly padded conv, ReLU, zero or known bias); residual and normalized families are always measured.
``Sweep.source`` says which, per cell, and the heat map marks predicted cells with a ``p``. The two
numbers differ in kind: a prediction is the mean-field expectation over the weights' directions given
each layer's actual mean(w^2) (He's product), a measurement is one network on one batch, which at depth
``L`` and width ``n`` lands within predict's band, a log-variance spread of about ``sqrt(5 L / n)``
(Hanin & Nica 2019), mostly below the expectation.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from ._common import Progress, ProgressLike, jsonable, out_dir

__all__ = ["FAMILIES", "METHODS", "PREDICTED_FAMILIES", "SCHEMES", "Sweep", "build", "plot_sweep", "sweep"]

FAMILIES = ("mlp", "cnn", "resnet", "prenorm", "postnorm")
PREDICTED_FAMILIES = ("mlp", "cnn")
"""Families that ``method="auto"`` predicts beyond ``measure_depth``: plain chains of weight layers and ReLUs."""
METHODS = ("auto", "predict", "measure")
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
    ``gradient[...]``: the first weight layer's output-gradient std; ``source[...]``: ``"predicted"`` or
    ``"measured"``, how that cell's two numbers were obtained; ``seconds``: the whole sweep's wall time.

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
    source: dict[str, list[list[str]]] = field(default_factory=dict)
    method: str = "measure"

    def to_dict(self) -> dict[str, Any]:
        """The sweep as JSON-ready data."""
        return {"family": self.family, "depths": list(self.depths), "widths": list(self.widths),
                "schemes": list(self.schemes), "forward": self.forward, "gradient": self.gradient,
                "source": self.source, "method": self.method, "seconds": self.seconds}


def cell_source(family: str, depth: int, method: str = "auto", measure_depth: int = 300) -> str:
    """How :func:`sweep` gets one cell's numbers: ``"predicted"`` or ``"measured"``.

    Args:
        family: one of :data:`FAMILIES`.
        depth: the cell's weight layers.
        method: ``"predict"`` or ``"measure"`` for every cell; ``"auto"``: measured up to ``measure_depth``,
            predicted beyond it for :data:`PREDICTED_FAMILIES`, measured otherwise.
        measure_depth: the deepest cell ``"auto"`` measures.

    Returns:
        ``"predicted"`` or ``"measured"``.

    Example:
        >>> cell_source("mlp", 1000), cell_source("mlp", 100), cell_source("resnet", 1000)
        ('predicted', 'measured', 'measured')
    """
    if method not in METHODS:
        raise SignalpropError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "predict" or (method == "auto" and family in PREDICTED_FAMILIES and depth > measure_depth):
        return "predicted"
    return "measured"


def _predicted_cell(model: nn.Module, shape: torch.Size, graph: Any, batch: int) -> tuple[float, float]:
    """The last weight layer's predicted output std and the first one's predicted output-gradient std."""
    from ..prediction import predict

    layers = list(predict(model, tuple(shape), graph=graph, batch=batch).weight_layers())
    return layers[-1].fwd.std, (layers[0].bwd.std if layers[0].bwd is not None else math.nan)


def _measured_cell(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """The same two numbers measured on one batch (statistics reduced on the fly, no activation kept)."""
    from ..measurement import measure

    layers = list(measure(model, x).weight_layers())
    return layers[-1].fwd.std, (layers[0].bwd.std if layers[0].bwd is not None else math.nan)


def _bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def sweep(family: str = "mlp", *, depths: Sequence[int] = (10, 100, 1000), widths: Sequence[int] = (64, 256),
          schemes: Sequence[str] = SCHEMES, batch: int = 16, seed: int = 0, progress: ProgressLike = False,
          out: str | Path | None = None, method: str = "auto", measure_depth: int = 300) -> Sweep:
    """Each scheme's last-layer std and first-layer gradient std over ``depths`` x ``widths``; PNG + JSON.

    Args:
        family: one of :data:`FAMILIES`.
        depths: The grid's depths; depth counts weight layers.
        widths: The grid's widths.
        schemes: any of :data:`SCHEMES`.
        batch: samples per measurement (N(0, 1) inputs); a predicted cell's band is this batch's.
        seed: seeds the inputs and every draw of the weights.
        progress: a progress line per cell with a bar (``True``: to stderr; or a callable).
        out: a folder for ``sweep_<family>.png`` and ``sweep_<family>.json``.
        method: ``"auto"``, ``"predict"`` or ``"measure"`` (:func:`cell_source`).
        measure_depth: with ``"auto"``, the deepest cell measured; deeper plain chains are predicted.

    Returns:
        A :class:`Sweep`; ``source`` says per cell whether it was predicted or measured.

    Raises:
        SignalpropError: An unknown scheme or method, an empty grid or a batch below 1.

    Examples:
        He et al. (2015) keep a plain ReLU chain's std at any depth. PyTorch's default Linear init,
        ``U(-1/sqrt(fan_in), +)`` (weight variance ``1/(3 fan_in)``), with ReLU's halving multiplies the
        second moment by about 1/6 per layer, until all that is left is about the bias's own std,
        ``1/sqrt(3 * 256) = 0.036``:

        >>> s = sweep("mlp", depths=(10,), widths=(256,), schemes=("he", "default"), batch=64)
        >>> s.forward["he"][0][0] > 0.5, round(s.forward["default"][0][0], 2)
        (True, 0.04)

        Predicted instead of measured (what ``method="auto"`` does beyond ``measure_depth``):

        >>> r = sweep("mlp", depths=(3,), widths=(64,), schemes=("he",), method="predict")
        >>> r.source["he"], 1.0 < r.forward["he"][0][0] < 2.0  # He keeps Var = 2 at every layer
        ([['predicted']], True)
    """
    from ..graph import capture

    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise SignalpropError(f"unknown scheme(s) {bad or list(schemes)}; choose from {', '.join(SCHEMES)}")
    if not depths or not widths or batch < 1:
        raise SignalpropError("sweep needs at least one depth and one width, and batch >= 1")
    cell_source(family, 2, method, measure_depth)  # checks the method
    say = Progress(f"sweep {family}", progress)
    t0 = time.perf_counter()
    fwd = {s: [[math.nan] * len(widths) for _ in depths] for s in schemes}
    grad = {s: [[math.nan] * len(widths) for _ in depths] for s in schemes}
    src = {s: [["measured"] * len(widths) for _ in depths] for s in schemes}
    total, done = len(depths) * len(widths) * len(schemes), 0
    for i, depth in enumerate(depths):
        how = cell_source(family, depth, method, measure_depth)
        for j, width in enumerate(widths):
            graph = None
            for s in schemes:
                torch.manual_seed(seed)
                model, shape = build(family, depth, width)
                x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))
                _init(model, s, x)
                if how == "predicted":
                    if graph is None:  # one graph per architecture: the schemes change weights only
                        graph = capture(model, input_shape=tuple(shape), methods=("fx", "export"))
                    fwd[s][i][j], grad[s][i][j] = _predicted_cell(model, shape, graph, batch)
                else:
                    fwd[s][i][j], grad[s][i][j] = _measured_cell(model, x)
                src[s][i][j] = how
                done += 1
                say(f"{_bar(done, total)} depth {depth} width {width} {s} ({how}): last std "
                    f"{fwd[s][i][j]:.3g}, first gradient std {grad[s][i][j]:.3g}")
    result = Sweep(family, tuple(depths), tuple(widths), tuple(schemes), fwd, grad, time.perf_counter() - t0,
                   src, method)
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
                    mark = " p" if result.source.get(s, grid)[i][j] == "predicted" else ""
                    ax.text(j, i, (f"{v:.1g}" if math.isfinite(v) else "inf") + mark, ha="center", va="center",
                            fontsize=7)
            ax.set_xticks(range(len(result.widths)), [str(w) for w in result.widths], fontsize=7)
            ax.set_yticks(range(len(result.depths)), [str(d) for d in result.depths], fontsize=7)
            ax.set_title(f"{s}: {label}", fontsize=8)
            if col == 0:
                ax.set_ylabel("depth")
            if row == 1:
                ax.set_xlabel("width")
    if image is not None:
        fig.colorbar(image, ax=axes, label="log10 std", shrink=0.8)
    title = f"{result.family}: signal and gradient across depth and width"
    if any(v == "predicted" for g in result.source.values() for r in g for v in r):
        title += " (p: predicted by sp.predict; others measured)"
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
