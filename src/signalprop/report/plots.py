"""Figures with matplotlib (Agg, no window ever opens): std per layer, Signal Propagation Plots, histograms.

Every number drawn is a field of a Trace's ``Stats``; the only arithmetic is presentation (a variance
band drawn as a std band, histogram counts drawn as densities). Figures are built on
``matplotlib.figure.Figure`` directly (no pyplot state, no backend switch) and matplotlib is imported
inside the functions, so importing this module stays light.

Log scales cannot show 0, inf or nan. Such values are left out of the line (it breaks there) and marked
at the panel's edge instead: a red ``^`` at the top for inf, a ``v`` at the bottom for 0, an ``x`` at the
bottom for nan; the legend says which is which.

Example::

    import signalprop as sp
    traces = {"he": sp.measure(net_he, x), "default": sp.measure(net_default, x)}
    sp.report.plots.plot_std(traces, "std.png", predicted=sp.predict(net_he, x.shape[1:]))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import SignalpropError
from ..trace import Trace
from ._common import as_view, check_layers_choice, select_layers, short_name, union_names
from ._common import check_figure_path as _check_path
from ._drawing import (
    _as_trace_dict,
    _draw_predicted,
    _empty_note,
    _finish_log_axis,
    _finite_or_inf,
    _has_channel_stats,
    _is_activation,
    _label_panels,
    _layer_hist,
    _log_hist,
    _log_line,
    _save,
    _series,
    _spread,
    _two_panels,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_histograms", "plot_report", "plot_spp", "plot_std", "report_figures"]

_PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


# ---- public API -----------------------------------------------------------------------------------------


def plot_std(
    traces: Mapping[str, Trace] | Trace,
    path: str | Path,
    *,
    predicted: Trace | None = None,
    title: str = "Signal std per layer",
    layers: str = "auto",
) -> Path:
    """Forward std and gradient std per layer, log scale, two panels, one line per trace.

    ``traces`` maps a label to a Trace (a single Trace is labelled "measured"). ``predicted`` (from
    ``sp.predict``) is drawn dashed with its 90% band for one network shaded: the std band is the
    square root of ``Stats.var_band``, where one net of finite width lands (Hanin & Nica 2019; one net's
    log-variance has standard deviation ``sqrt(sum_l beta_l / n_l)``). ``layers`` is ``"auto"`` (weight
    layers when there are any: the outputs He's formula ``Var[y_L] = Var[y_1] prod 1/2 n_l Var[w_l]``
    speaks about), ``"weight"`` or ``"all"``.

    Args:
        traces: Label -> Trace, or one Trace.
        path: The PNG (or other matplotlib format, by suffix) to write; no suffix: ``.png``.
        predicted: A predicted Trace (``sp.predict``) to draw dashed, with its band.
        title: The figure's title.
        layers: ``"auto"``, ``"weight"`` or ``"all"``.

    Returns:
        The path written.

    Examples:
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> trace = Trace([
        ...     LayerStats("fc", "Linear", Stats.from_moments(0.0, 4.0), shape=(8, 4), weight_layer=True),
        ...     LayerStats("act", "ReLU", Stats.from_moments(0.5, 1.0), shape=(8, 4)),
        ... ])
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = plot_std(trace, pathlib.Path(tmp) / "std.png")
        ...     out.name, out.stat().st_size > 0
        ('std.png', True)
    """
    fig = std_figure(traces, predicted=predicted, title=title, layers=layers)
    return _save(fig, path)


def plot_spp(
    trace: Trace | Mapping[str, Trace],
    path: str | Path,
    *,
    title: str = "Signal Propagation Plot",
    layers: str = "auto",
) -> Path:
    """Signal Propagation Plot (Brock, De & Smith 2021, Sec. 3): per layer, the average over channels of
    each channel's squared mean (``Stats.chan_sq_mean``) and of each channel's variance (``Stats.chan_var``).

    A healthy network keeps both flat with depth; a squared mean that grows relative to the variance is
    the mean shift Brock et al. show for unnormalized ReLU ResNets. Pass a dict to compare traces.

    Args:
        trace: A Trace, or label -> Trace to compare.
        path: The file to write (suffix as in :func:`plot_std`).
        title: The figure's title.
        layers: ``"auto"``, ``"weight"`` or ``"all"``.

    Returns:
        The path written.

    Raises:
        SignalpropError: No layer carries channel statistics.

    Examples:
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> trace = Trace([LayerStats(f"conv{i}", "Conv2d", Stats.from_moments(0.0, 1.0, chan_sq_mean=0.1 * i,
        ...                                                                   chan_var=1.0), weight_layer=True)
        ...                for i in range(3)])
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_spp(trace, pathlib.Path(tmp) / "spp.png").name
        'spp.png'
    """
    fig = spp_figure(trace, title=title, layers=layers)
    return _save(fig, path)


def plot_histograms(
    trace: Trace,
    path: str | Path,
    *,
    layers: str = "auto",
    max_layers: int = 10,
    yscale: str = "auto",
    title: str = "Per-layer histograms",
) -> Path:
    """Per-layer histograms of activation values and, when recorded, of back-propagated gradients, one
    curve per layer colored by depth (Glorot & Bengio 2010, Fig. 6 and 7 style), from ``Stats.hist``.

    ``layers="auto"`` shows the outputs of activation modules (ReLU, Tanh, GELU, ...) when the trace has
    histograms of any, as Glorot & Bengio do (saturation shows there), else the weight layers, else all;
    ``"weight"`` and ``"all"`` choose directly.
    Counts are drawn as densities (count / (total * bin width)) so layers with different bins compare.
    With more than ``max_layers`` layers holding histograms, evenly spaced ones are shown (first and last
    always) and the title says how many. ``yscale`` is ``"linear"``, ``"log"`` or ``"auto"`` (log when
    some histogram has a single bin with over a quarter of its counts, such as the zeros after a ReLU).

    Args:
        trace: The Trace, measured with ``histograms=True``.
        path: The file to write (suffix as in :func:`plot_std`).
        layers: ``"auto"``, ``"weight"`` or ``"all"``.
        max_layers: The most layers drawn.
        yscale: ``"linear"``, ``"log"`` or ``"auto"``.
        title: The figure's title.

    Returns:
        The path written.

    Raises:
        SignalpropError: No layer carries a histogram (measure with ``histograms=True``).

    Examples:
        >>> from signalprop.trace import Histogram, LayerStats, Stats, Trace
        >>> hist = Histogram(edges=(0.0, 1.0, 2.0), counts=(6, 2))
        >>> trace = Trace([LayerStats(f"act{i}", "ReLU", Stats.from_moments(0.5, 1.0, hist=hist)) for i in range(2)])
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_histograms(trace, pathlib.Path(tmp) / "hist.png").name
        'hist.png'
    """
    fig = histogram_figure(trace, layers=layers, max_layers=max_layers, yscale=yscale, title=title)
    return _save(fig, path)


def plot_report(report: Any, path: str | Path) -> list[Path]:
    """The figures of a diagnose Report (or a Trace), written next to each other; returns their paths.

    ``path`` gets the std plot (measured, with the report's prediction and band when it has one);
    ``<stem>_spp<suffix>`` the Signal Propagation Plot when the trace carries channel statistics;
    ``<stem>_hist<suffix>`` the histograms when it carries histograms. E.g. ``out/report.png`` gives
    ``out/report.png``, ``out/report_spp.png``, ``out/report_hist.png``.

    Args:
        report: A diagnose Report or a Trace.
        path: The std plot's file; the others are named after it.

    Returns:
        The paths written, the std plot first.

    Examples:
        >>> from signalprop.trace import Histogram, LayerStats, Stats, Trace
        >>> hist = Histogram(edges=(0.0, 1.0, 2.0), counts=(6, 2))
        >>> trace = Trace([LayerStats("act", "ReLU", Stats.from_moments(0.5, 1.0, hist=hist))])
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     [p.name for p in plot_report(trace, pathlib.Path(tmp) / "report.png")]
        ['report.png', 'report_hist.png']
    """
    path = _check_path(path)
    written = []
    for key, fig in report_figures(report):
        target = path if key == "std" else path.with_name(f"{path.stem}_{key}{path.suffix}")
        written.append(_save(fig, target))
    return written


def report_figures(report: Any) -> list[tuple[str, Figure]]:
    """``(key, Figure)`` for each figure a Report or Trace supports, not saved.

    ``std`` always, ``spp`` and ``hist`` when the trace has channel statistics or histograms. Used by
    :func:`plot_report` and the HTML page.

    Args:
        report: A diagnose Report or a Trace.

    Returns:
        ``(key, matplotlib.figure.Figure)`` pairs, ``std`` first.

    Examples:
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> trace = Trace([LayerStats("fc", "Linear", Stats.from_moments(0.0, 1.0), weight_layer=True)])
        >>> [key for key, figure in report_figures(trace)]
        ['std']
    """
    view = as_view(report)
    label = "measured" if view.trace.source != "predicted" else "predicted"
    figs: list[tuple[str, Figure]] = [
        ("std", std_figure({label: view.trace}, predicted=view.predicted, title="Signal std per layer"))
    ]
    if _has_channel_stats(view.trace):
        figs.append(("spp", spp_figure(view.trace, title="Signal Propagation Plot")))
    if any(_layer_hist(x, "fwd") or _layer_hist(x, "bwd") for x in view.trace):
        figs.append(("hist", histogram_figure(view.trace, title="Per-layer histograms")))
    return figs


# ---- figures --------------------------------------------------------------------------------------------


def std_figure(
    traces: Mapping[str, Trace] | Trace,
    *,
    predicted: Trace | None = None,
    title: str = "Signal std per layer",
    layers: str = "auto",
) -> Figure:
    """The Figure drawn by :func:`plot_std` (not saved)."""
    traces = _as_trace_dict(traces, "traces")
    if predicted is not None and not isinstance(predicted, Trace):
        raise SignalpropError(
            f"predicted must be a Trace (from sp.predict), got {type(predicted).__name__}; or leave it out"
        )
    check_layers_choice(layers)
    chosen = {label: select_layers(t, layers) for label, t in traces.items()}
    pred_layers = select_layers(predicted, layers) if predicted is not None else []
    names = union_names([[x.name for x in ls] for ls in chosen.values()] + [[x.name for x in pred_layers]])
    if not names:
        raise SignalpropError(f"nothing to plot: the traces have no {'weight ' if layers == 'weight' else ''}layers")
    fig, (ax_f, ax_b) = _two_panels(len(names))
    marks: dict[str, list[Any]] = {}
    for ax, direction in ((ax_f, "fwd"), (ax_b, "bwd")):
        drawn = False
        values_seen: list[float] = []
        marks[direction] = []
        if pred_layers:
            drawn |= _draw_predicted(ax, pred_layers, names, direction, values_seen, marks[direction])
        for k, (label, ls) in enumerate(chosen.items()):
            ys = _series(ls, names, lambda s: s.std, direction)
            if all(y is None for y in ys):
                continue
            drawn = True
            marks[direction] += _log_line(ax, ys, label=label, color=_PALETTE[k % len(_PALETTE)],
                                          values_seen=values_seen)
        _finish_log_axis(ax, values_seen)
        if not drawn:
            _empty_note(ax, "no backward pass recorded" if direction == "bwd" else "no values recorded")
    return _label_panels(
        fig, (ax_f, ax_b), names,
        titles=("forward: std of each layer's output", "backward: std of the gradient w.r.t. each layer's output"),
        ylabels=("std (log scale)", "std (log scale)"),
        lower_marks=marks["bwd"], suptitle=title,
    )


def spp_figure(
    trace: Trace | Mapping[str, Trace],
    *,
    title: str = "Signal Propagation Plot",
    layers: str = "auto",
) -> Figure:
    """The Figure drawn by :func:`plot_spp` (not saved)."""
    traces = _as_trace_dict(trace, "trace")
    check_layers_choice(layers)
    if not any(_has_channel_stats(t) for t in traces.values()):
        raise SignalpropError(
            "no layer carries channel statistics (Stats.chan_sq_mean and chan_var are nan everywhere), so "
            "there is no Signal Propagation Plot to draw; record them with sp.measure, which fills them "
            "for outputs that have a channel dimension"
        )
    chosen = {label: [x for x in select_layers(t, layers) if _finite_or_inf(x.fwd.chan_var)]
              for label, t in traces.items()}
    names = union_names([[x.name for x in ls] for ls in chosen.values()])
    if not names:
        chosen = {label: [x for x in t if _finite_or_inf(x.fwd.chan_var)] for label, t in traces.items()}
        names = union_names([[x.name for x in ls] for ls in chosen.values()])
    fig, (ax_m, ax_v) = _two_panels(len(names))
    lower_marks: list[Any] = []
    for ax, getter in ((ax_m, lambda s: s.chan_sq_mean), (ax_v, lambda s: s.chan_var)):
        values_seen: list[float] = []
        for k, (label, ls) in enumerate(chosen.items()):
            handles = _log_line(ax, _series(ls, names, getter, "fwd"), label=label,
                                color=_PALETTE[k % len(_PALETTE)], values_seen=values_seen)
            if ax is ax_v:
                lower_marks += handles
        _finish_log_axis(ax, values_seen)
    return _label_panels(
        fig, (ax_m, ax_v), names,
        titles=("average channel squared mean", "average channel variance"),
        ylabels=("mean over channels of E[x_c]^2", "mean over channels of Var[x_c]"),
        lower_marks=lower_marks, suptitle=f"{title} (Brock et al. 2021)",
    )


def histogram_figure(
    trace: Trace,
    *,
    layers: str = "auto",
    max_layers: int = 10,
    yscale: str = "auto",
    title: str = "Per-layer histograms",
) -> Figure:
    """The Figure drawn by :func:`plot_histograms` (not saved)."""
    from matplotlib import colormaps

    if not isinstance(trace, Trace):
        raise SignalpropError(f"plot_histograms takes one Trace, got {type(trace).__name__}")
    check_layers_choice(layers)
    if yscale not in ("auto", "linear", "log"):
        raise SignalpropError(f"yscale={yscale!r} is not a choice; use 'auto', 'linear' or 'log'")
    if not isinstance(max_layers, int) or max_layers < 1:
        raise SignalpropError(f"max_layers must be a positive integer, got {max_layers!r}")
    with_hist = [x for x in trace if _layer_hist(x, "fwd") or _layer_hist(x, "bwd")]
    acts = [x for x in with_hist if _is_activation(x.kind)]
    if layers == "auto" and acts:
        pool = acts
    else:
        pool = [x for x in select_layers(trace, layers) if _layer_hist(x, "fwd") or _layer_hist(x, "bwd")]
    if not with_hist:
        raise SignalpropError(
            "no layer carries a histogram (Stats.hist is None everywhere); measure with "
            "sp.measure(model, inputs, histograms=True)"
        )
    if not pool:
        raise SignalpropError(
            f"no {'weight ' if layers == 'weight' else ''}layer carries a histogram; "
            f"{len(with_hist)} other layers do: pass layers='all'"
        )
    shown = _spread(pool, max_layers)
    directions = [d for d in ("fwd", "bwd") if any(_layer_hist(x, d) for x in shown)]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.2 * len(directions) + 1.6, 4.8), layout="constrained")
    axes = fig.subplots(1, len(directions), squeeze=False)[0]
    cmap = colormaps["viridis"]
    for ax, direction in zip(axes, directions):
        spiky = False
        for j, x in enumerate(shown):
            hist = _layer_hist(x, direction)
            if hist is None:
                continue
            edges, counts = hist
            total = sum(counts)
            centers = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            dens = [c / (total * (b - a)) if total > 0 and b > a else float("nan")
                    for c, a, b in zip(counts, edges[:-1], edges[1:])]
            spiky |= total > 0 and max(counts) > 0.25 * total
            color = cmap(j / max(len(shown) - 1, 1))
            ax.plot(centers, [d if d > 0 else float("nan") for d in dens] if _log_hist(yscale, spiky) else dens,
                    color=color, lw=1.4, label=short_name(f"{x.name} ({x.kind})", 36))
        ax.set_yscale("log" if _log_hist(yscale, spiky) else "linear")
        ax.set_xlabel("activation value" if direction == "fwd" else "gradient value")
        ax.set_ylabel("density" + (" (log scale)" if _log_hist(yscale, spiky) else ""))
        ax.set_title("forward: layer outputs" if direction == "fwd" else "backward: output gradients",
                     fontsize=10, loc="left")
        ax.grid(True, alpha=0.3)
    by_label: dict[str, Any] = {}
    for ax in axes:  # one entry per layer, whichever panel drew it
        for handle, label in zip(*ax.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    order = [short_name(f"{x.name} ({x.kind})", 36) for x in shown]
    handles = [by_label[label] for label in order if label in by_label]
    axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                    title="layer (dark = early)", title_fontsize=7, frameon=False)
    note = f" ({len(shown)} of {len(pool)} layers)" if len(shown) < len(pool) else ""
    fig.suptitle(f"{title}{note}, Glorot & Bengio 2010 style", fontsize=12, fontweight="bold")
    return fig


# ---- helpers --------------------------------------------------------------------------------------------
