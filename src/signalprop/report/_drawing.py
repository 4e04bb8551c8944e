"""Drawing helpers of :mod:`signalprop.report.plots`: log-scale lines with off-scale marks, panels, ticks,
legends, the predicted band, the histogram layers, saving a figure."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import SignalpropError
from ..trace import LayerStats, Trace
from ._common import check_figure_path as _check_path
from ._common import short_name, std_band

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_PRED_COLOR = "#222222"
_DPI = 110


_ACTIVATION_KINDS = frozenset({
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "RReLU", "ELU", "CELU", "SELU", "GELU", "SiLU", "Mish", "Tanh",
    "Sigmoid", "Hardtanh", "Hardsigmoid", "Hardswish", "Softplus", "Softsign", "Tanhshrink", "LogSigmoid",
})


def _is_activation(kind: str) -> bool:
    """Activation modules by class name: torch's, and transformers' ``*Activation`` classes."""
    return kind in _ACTIVATION_KINDS or kind.endswith("Activation")


def _log_hist(yscale: str, spiky: bool) -> bool:
    return yscale == "log" or (yscale == "auto" and spiky)


def _as_trace_dict(obj: Mapping[str, Trace] | Trace, what: str) -> dict[str, Trace]:
    if isinstance(obj, Trace):
        return {"measured" if obj.source != "predicted" else "predicted": obj}
    if not isinstance(obj, Mapping) or not obj:
        raise SignalpropError(
            f"{what} must be a Trace or a non-empty dict of label -> Trace, got {type(obj).__name__}"
        )
    for label, t in obj.items():
        if not isinstance(t, Trace):
            raise SignalpropError(f"{what}[{label!r}] is a {type(t).__name__}, not a Trace (from sp.measure)")
    return {str(k): v for k, v in obj.items()}


def _series(
    layers: Sequence[LayerStats], names: list[str], getter: Callable[[Any], float], direction: str
) -> list[float | None]:
    """Values at each x position (``None`` where the trace lacks the layer or the direction)."""
    by_name = {x.name: x for x in layers}
    out: list[float | None] = []
    for name in names:
        x = by_name.get(name)
        stats = None if x is None else (x.fwd if direction == "fwd" else x.bwd)
        out.append(None if stats is None else float(getter(stats)))
    return out


def _log_line(ax: Axes, ys: list[float | None], *, label: str, color: str, values_seen: list[float],
              linestyle: str = "-") -> list[Any]:
    """A line through the positive finite values; 0, inf and nan marked at the panel's edge."""
    # positions where the trace has the layer: a layer missing from one trace is stepped over, not a break
    xs = [i for i, y in enumerate(ys) if y is not None]
    clean = [y if y is not None and math.isfinite(y) and y > 0 else math.nan for y in ys if y is not None]
    values_seen.extend(v for v in clean if not math.isnan(v))
    ax.plot(xs, clean, linestyle=linestyle, marker="o", ms=3.5, lw=1.6, color=color, label=label)
    edge = ax.get_xaxis_transform()  # x in data, y in axes fraction
    handles = []
    marks = {
        "inf": ([i for i, y in enumerate(ys) if y is not None and math.isinf(y) and y > 0], 0.97, "^"),
        "zero": ([i for i, y in enumerate(ys) if y is not None and y <= 0], 0.03, "v"),
        "nan": ([i for i, y in enumerate(ys) if y is not None and math.isnan(y)], 0.03, "x"),
    }
    for kind, (idx, level, marker) in marks.items():
        if idx:
            handles += ax.plot(idx, [level] * len(idx), linestyle="none", marker=marker, ms=8, mew=2,
                               color=color, transform=edge, clip_on=False, label=f"{label}: {_MARK_LABEL[kind]}")
    return handles


_MARK_LABEL = {"inf": "inf (off scale)", "zero": "0 (off log scale)", "nan": "nan (not a number)"}


def _draw_predicted(ax: Axes, layers: list[LayerStats], names: list[str], direction: str,
                    values_seen: list[float], marks: list[Any]) -> bool:
    ys = _series(layers, names, lambda s: s.std, direction)
    if all(y is None or math.isnan(y) for y in ys):
        return False
    bands = [std_band(_stats(x, direction)) for x in _aligned(layers, names)]
    lo = [b[0] if b and math.isfinite(b[0]) and b[0] > 0 else math.nan for b in bands]
    hi = [b[1] if b and math.isfinite(b[1]) and b[1] > 0 else math.nan for b in bands]
    if any(not math.isnan(v) for v in lo + hi):
        import numpy as np

        xs = np.arange(len(names))
        lo_a, hi_a = np.asarray(lo), np.asarray(hi)
        ok = ~(np.isnan(lo_a) | np.isnan(hi_a))
        ax.fill_between(xs, np.where(ok, lo_a, 1.0), np.where(ok, hi_a, 1.0), where=ok, color=_PRED_COLOR,
                        alpha=0.13, lw=0, label="predicted: 90% band, one net")
        values_seen.extend(v for v in lo + hi if not math.isnan(v))
    marks += _log_line(ax, ys, label="predicted (mean field)", color=_PRED_COLOR, values_seen=values_seen,
                       linestyle="--")
    return True


def _aligned(layers: list[LayerStats], names: list[str]) -> list[LayerStats | None]:
    by_name = {x.name: x for x in layers}
    return [by_name.get(n) for n in names]


def _stats(x: LayerStats | None, direction: str) -> Any:
    if x is None:
        return None
    return x.fwd if direction == "fwd" else x.bwd


def _finish_log_axis(ax: Axes, values: list[float]) -> None:
    """Log y axis with limits set from the drawn values (so no autoscale warning on empty panels)."""
    ax.set_yscale("log")
    if values:
        lo, hi = min(values), max(values)
        pad = max(math.log10(hi / lo) * 0.12, 0.25)
        ax.set_ylim(10 ** (math.log10(lo) - pad), 10 ** (math.log10(hi) + pad))
    else:
        ax.set_ylim(0.1, 10.0)
    ax.grid(True, which="major", alpha=0.3)


def _two_panels(n: int) -> tuple[Figure, Sequence[Axes]]:
    from matplotlib.figure import Figure

    width = min(max(7.5, 3.0 + 0.28 * n), 22.0)
    fig = Figure(figsize=(width, 7.2), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    return fig, axes


def _label_panels(
    fig: Figure,
    axes: Sequence[Axes],
    names: list[str],
    *,
    titles: tuple[str, str],
    ylabels: tuple[str, str],
    lower_marks: list[Any],
    suptitle: str,
) -> Figure:
    """Title and label the two panels of :func:`_two_panels`: layer names under the lower one, a legend on
    the upper one and, on the lower one, only ``lower_marks`` (its off-scale markers); return ``fig``."""
    upper, lower = axes
    for ax, panel_title, ylabel in zip((upper, lower), titles, ylabels):
        ax.set_title(panel_title, fontsize=10, loc="left")
        ax.set_ylabel(ylabel)
    _layer_ticks(lower, names)
    _legend(upper)
    _legend(lower, only=lower_marks)
    fig.suptitle(suptitle, fontsize=12, fontweight="bold")
    return fig


def _layer_ticks(ax: Axes, names: list[str]) -> None:
    n = len(names)
    step = max(1, math.ceil(n / 70))
    ticks = list(range(0, n, step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([short_name(names[i], 28) for i in ticks], rotation=60, ha="right",
                       rotation_mode="anchor", fontsize=8 if n <= 40 else 6)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_xlabel("layer (execution order)" + (f", every {step}th labelled" if step > 1 else ""))


def _legend(ax: Axes, only: list[Any] | None = None) -> None:
    """The panel's legend; with ``only``, just those handles (the lower panel's off-scale markers)."""
    if only is not None:
        if only:
            ax.legend(handles=only, fontsize=8, loc="best", framealpha=0.85)
        return
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


def _empty_note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#777777")


def _has_channel_stats(trace: Trace) -> bool:
    return any(_finite_or_inf(x.fwd.chan_var) or _finite_or_inf(x.fwd.chan_sq_mean) for x in trace)


def _finite_or_inf(v: float) -> bool:
    return not math.isnan(v)


def _layer_hist(x: LayerStats, direction: str) -> tuple[list[float], list[int]] | None:
    """The layer's histogram as (edges, counts) when it has one with finite edges, else None."""
    stats = x.fwd if direction == "fwd" else x.bwd
    if stats is None or stats.hist is None:
        return None
    edges, counts = list(stats.hist.edges), list(stats.hist.counts)
    if len(edges) != len(counts) + 1 or not counts or not all(math.isfinite(e) for e in edges):
        return None
    return edges, counts


def _spread(items: list[LayerStats], k: int) -> list[LayerStats]:
    """``k`` evenly spaced items, first and last included (all when there are at most ``k``)."""
    if len(items) <= k:
        return items
    if k == 1:
        return [items[-1]]
    idx = sorted({round(i * (len(items) - 1) / (k - 1)) for i in range(k)})
    return [items[i] for i in idx]




def _save(fig: Figure, path: str | Path) -> Path:
    p = _check_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=_DPI)
    return p
