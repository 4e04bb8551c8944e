"""Plots over training: layer x step heat maps of a :class:`~signalprop.monitor.Monitor`'s history.

Three panels, one column per recorded step:

1. ``log10 std`` of each layer's output (forward), on a diverging scale centred on std = 1 (0 in log10),
   where He / Glorot initialization puts a healthy network: red rows explode, blue rows vanish;
2. ``log10 std`` of the gradient with respect to each layer's output (backward);
3. ``log10`` of each parameter's update ratio ``||w_t - w_{t-1}|| / ||w_{t-1}||`` (around -3 is the usual
   healthy value for SGD; much lower means the layer does not learn, much higher that it is being rewritten).

Cells whose value is inf or nan (a non-finite tensor, or 0 where a log is taken) are drawn in magenta, so a
blow-up shows where and when it started. Everything drawn is a field of the records; nothing is recomputed.
matplotlib is imported inside the function and figures are drawn on ``matplotlib.figure.Figure`` (Agg, no
window, no pyplot state).

Example::

    with sp.Monitor(model) as mon:
        ...
    from signalprop.report.training import plot_history
    plot_history(mon.history, "training.png")   # same as mon.plot("training.png")
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import SignalpropError
from ._common import check_figure_path as _check_path
from ._common import check_layers_choice, select_layers, short_name, union_names

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..monitor._record import Record

__all__ = ["heatmap_data", "plot_history"]

_BAD_COLOR = "magenta"


def _log10(x: float) -> float:
    if x > 0 and math.isfinite(x):
        return math.log10(x)
    return math.nan


def heatmap_data(
    history: Sequence[Record], what: str, *, layers: str = "auto", params: str = "weights"
) -> tuple[list[str], list[int], list[list[float]]]:
    """(row names, steps, values[row][column]) of one panel: ``what`` is ``"fwd"``, ``"bwd"`` or
    ``"update"``; values are log10 of std (or of the update ratio), nan where unknown or not positive.

    A tensor that held inf/nan anywhere counts as nan, even when the Monitor's sample of it was finite.
    ``layers`` picks trace rows as the report plots do (``"auto"``: weight layers when there are any;
    ``"all"``; ``"weight"``); ``params`` picks parameters: ``"weights"``, the ``<layer>.weight`` of each weight
    layer in the traces (Linear, Conv, ...; every parameter when there is none), or ``"all"``.

    Args:
        history: Monitor records (``mon.history``).
        what: ``"fwd"``, ``"bwd"`` or ``"update"``.
        layers: ``"auto"``, ``"all"`` or ``"weight"`` (for ``"fwd"`` and ``"bwd"``).
        params: ``"weights"`` or ``"all"`` (for ``"update"``).

    Returns:
        ``(row names, steps, values)``, ``values[row][column]`` the log10 of each row's value at each step.

    Examples:
        >>> from signalprop.monitor import ParamStats, Record
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> def record(step, std, ratio):
        ...     trace = Trace([LayerStats("fc", "Linear", Stats.from_moments(0.0, std**2), weight_layer=True)])
        ...     return Record(step, trace, {"fc.weight": ParamStats(norm=1.0, grad_norm=0.1, update_ratio=ratio)})
        >>> history = [record(0, 1.0, 1.0), record(10, 10.0, 0.1)]
        >>> heatmap_data(history, "fwd"), heatmap_data(history, "update")
        ((['fc'], [0, 10], [[0.0, 1.0]]), (['fc.weight'], [0, 10], [[0.0, -1.0]]))
    """
    _check_history(history)
    check_layers_choice(layers)
    steps = [r.step for r in history]
    if what in ("fwd", "bwd"):
        names = union_names([[x.name for x in select_layers(r.trace, layers)] for r in history])
        grid: list[list[float]] = []
        for name in names:
            row = []
            for r in history:
                try:
                    st = getattr(r.trace[name], what)
                except KeyError:
                    st = None
                row.append(_log10(st.std) if st is not None and st.finite else math.nan)
            grid.append(row)
        return names, steps, grid
    if what == "update":
        if params not in ("weights", "all"):
            raise SignalpropError(f"params must be 'weights' or 'all', got {params!r}")
        weight_prefixes = {x.name for r in history for x in r.trace if x.weight_layer}
        names = union_names([list(r.params) for r in history])
        if params == "weights":
            chosen = [n for n in names if n.rsplit(".", 1)[0] in weight_prefixes and n.endswith("weight")]
            names = chosen or names
        grid = [[_log10(r.params[n].update_ratio) if n in r.params else math.nan for r in history] for n in names]
        return names, steps, grid
    raise SignalpropError(f"what must be 'fwd', 'bwd' or 'update', got {what!r}")


def _check_history(history: Any) -> None:
    from ..monitor._record import Record

    if not isinstance(history, Sequence) or not all(isinstance(r, Record) for r in history):
        raise SignalpropError(
            "plot_history needs a Monitor's history (a list of Record), e.g. mon.history; got "
            f"{type(history).__name__}"
        )
    if not history:
        raise SignalpropError(
            "the history is empty: nothing was recorded. Call mon.step() once per training step inside "
            "`with sp.Monitor(model) as mon:`, with gradients enabled"
        )


def plot_history(
    history: Sequence[Record],
    path: str | Path,
    *,
    layers: str = "auto",
    params: str = "weights",
    title: str | None = None,
) -> Path:
    """Write the three heat maps (forward std, backward std, update ratio; layer x step) to ``path``.

    Args:
        history: Monitor records (``mon.history``).
        path: The file to write; without a suffix it gets ``.png``.
        layers: Which trace rows, as in :func:`heatmap_data`.
        params: Which parameters, as in :func:`heatmap_data`.
        title: The figure's title.

    Returns:
        The path written.

    Examples:
        >>> from signalprop.monitor import ParamStats, Record
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> def record(step, std, ratio):
        ...     trace = Trace([LayerStats("fc", "Linear", Stats.from_moments(0.0, std**2), weight_layer=True)])
        ...     return Record(step, trace, {"fc.weight": ParamStats(norm=1.0, grad_norm=0.1, update_ratio=ratio)})
        >>> history = [record(0, 1.0, 1.0), record(10, 10.0, 0.1)]
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_history(history, pathlib.Path(tmp) / "training").name
        'training.png'
    """
    _check_history(history)
    p = _check_path(path)
    from matplotlib.figure import Figure

    panels = [
        ("fwd", "forward: log10 std of each layer's output"),
        ("bwd", "backward: log10 std of the gradient w.r.t. each output"),
        ("update", "log10 update ratio ||dw|| / ||w||"),
    ]
    data = [heatmap_data(history, what, layers=layers, params=params) for what, _ in panels]
    rows = max(len(d[0]) for d in data)
    fig: Figure = Figure(figsize=(6.0 * 3 + 1.0, min(2.0 + 0.22 * rows, 14.0)), layout="constrained")
    axes = fig.subplots(1, 3, squeeze=False)[0]
    for ax, (what, label), (names, steps, grid) in zip(axes, panels, data):
        _heatmap(fig, ax, names, steps, grid, diverging=what == "fwd")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
    any_bad = any(not math.isfinite(v) for _, _, grid in data for row in grid for v in row)
    heading = title or f"signalprop Monitor: {len(history)} recorded steps ({history[0].step}..{history[-1].step})"
    if any_bad:
        heading += f"   ({_BAD_COLOR}: inf, nan or 0)"
    fig.suptitle(heading, fontsize=11)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=100)
    return p


def _heatmap(fig: Figure, ax: Axes, names: list[str], steps: list[int], grid: list[list[float]], *, diverging: bool) -> None:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, TwoSlopeNorm

    if not names:
        ax.text(0.5, 0.5, "nothing recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    arr = np.ma.masked_invalid(np.array(grid, dtype=float))
    finite = arr.compressed()
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    cmap = colormaps["RdBu_r" if diverging else "viridis"].with_extremes(bad=_BAD_COLOR)
    norm: Normalize
    if diverging:
        span = max(abs(lo), abs(hi), 0.5)
        norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    else:
        norm = Normalize(vmin=lo, vmax=hi)
    im = ax.imshow(arr, aspect="auto", interpolation="nearest", cmap=cmap, norm=norm)
    fig.colorbar(im, ax=ax, shrink=0.9)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([short_name(n, 28) for n in names], fontsize=7 if len(names) > 20 else 8)
    ticks = sorted({round(i * (len(steps) - 1) / 7) for i in range(8)}) if len(steps) > 8 else list(range(len(steps)))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(steps[i]) for i in ticks], fontsize=8)


