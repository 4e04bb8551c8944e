"""Figures: what is drawn is the Trace's numbers; 0, inf and nan never crash a log axis; files and names."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from signalprop import SignalpropError
from signalprop.diagnosis import Report
from signalprop.report import plots
from signalprop.trace import Histogram, LayerStats, Stats, Trace

from .conftest import FakeReport, findings_for, make_trace, nonfinite_trace

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def _line(ax: matplotlib.axes.Axes, label: str) -> matplotlib.lines.Line2D:
    return next(line for line in ax.get_lines() if line.get_label() == label)


def test_plot_std_writes_a_png_and_draws_the_trace_numbers(tmp_path: Path) -> None:
    a, b = make_trace(), make_trace(factor=0.3)
    out = plots.plot_std({"he": a, "default": b}, tmp_path / "std.png")
    assert out == tmp_path / "std.png" and _is_png(out)
    fig = plots.std_figure({"he": a, "default": b})
    ax_f, ax_b = fig.axes
    assert ax_f.get_yscale() == "log" and ax_b.get_yscale() == "log"
    weights = a.weight_layers()
    np.testing.assert_allclose(_line(ax_f, "he").get_ydata(), [x.fwd.std for x in weights])
    np.testing.assert_allclose(_line(ax_b, "default").get_ydata(), [x.bwd.std for x in b.weight_layers()])
    labels = [t.get_text() for t in ax_b.get_xticklabels()]
    assert labels == weights.names
    assert fig.axes[0].get_legend() is not None


def test_predicted_is_dashed_with_the_std_band_shaded() -> None:
    pred = make_trace(source="predicted", band=True)
    fig = plots.std_figure({"measured": make_trace(factor=0.6)}, predicted=pred)
    ax = fig.axes[0]
    line = _line(ax, "predicted (mean field)")
    assert line.get_linestyle() == "--"
    band = next(c for c in ax.collections if c.get_label() == "predicted: 90% band, one net")
    ys = band.get_paths()[0].vertices[:, 1]
    lo = [math.sqrt(x.fwd.var_band[0]) for x in pred.weight_layers()]
    hi = [math.sqrt(x.fwd.var_band[1]) for x in pred.weight_layers()]
    assert ys.min() == pytest.approx(min(lo)) and ys.max() == pytest.approx(max(hi))
    assert ax.get_ylim()[0] < min(lo) and ax.get_ylim()[1] > max(hi)  # the band is inside the view


def test_zero_inf_and_nan_are_marked_not_drawn(tmp_path: Path) -> None:
    t = nonfinite_trace()
    fig = plots.std_figure(t, layers="all")
    ax_f, ax_b = fig.axes
    main = _line(ax_f, "measured").get_ydata()
    assert math.isnan(main[4]) and math.isnan(main[6])  # inf and nan leave the line
    assert list(_line(ax_f, "measured: inf (off scale)").get_xdata()) == [4]
    assert list(_line(ax_f, "measured: nan (not a number)").get_xdata()) == [6]
    assert list(_line(ax_b, "measured: 0 (off log scale)").get_xdata()) == [6]
    assert ax_b.get_legend() is not None  # the lower panel explains its own marker
    lo, hi = ax_f.get_ylim()
    assert 0 < lo and math.isfinite(hi)
    assert _is_png(plots.plot_std(t, tmp_path / "nonfinite.png", layers="all"))


def test_a_trace_with_nothing_finite_still_plots(tmp_path: Path) -> None:
    inf, nan = float("inf"), float("nan")
    t = Trace([LayerStats(f"l{i}", "Linear", Stats(std=v, var=v), None, weight_layer=True)
               for i, v in enumerate([inf, nan, 0.0])])
    fig = plots.std_figure({"x": t})
    assert fig.axes[0].get_ylim() == pytest.approx((0.1, 10.0))
    assert "no backward pass recorded" in [txt.get_text() for txt in fig.axes[1].texts]
    assert _is_png(plots.plot_std({"x": t}, tmp_path / "x.png"))


def test_traces_with_different_layers_share_one_axis() -> None:
    a, b = make_trace(5), make_trace(3)
    fig = plots.std_figure({"a": a, "b": b})
    ax = fig.axes[0]
    assert list(_line(ax, "b").get_xdata()) == [0, 1, 2, 5]  # missing layers are stepped over
    assert len(ax.get_xticks()) == 6


def test_long_traces_thin_their_labels() -> None:
    names = [f"encoder.layer.{i}.attention.output.dense" for i in range(150)]
    t = make_trace(150, names=names, factor=0.99)
    fig = plots.std_figure(t)
    labels = [x.get_text() for x in fig.axes[1].get_xticklabels()]
    assert 40 <= len(labels) <= 80
    assert all(len(label) <= 28 for label in labels)
    assert "every 3th labelled" in fig.axes[1].get_xlabel() or "every 2th labelled" in fig.axes[1].get_xlabel()


def test_spp_draws_channel_statistics_and_refuses_without_them(tmp_path: Path) -> None:
    t = make_trace()
    fig = plots.spp_figure({"a": t, "b": make_trace(factor=0.8)})
    ax_m, ax_v = fig.axes
    with_chan = [x for x in t.weight_layers() if not math.isnan(x.fwd.chan_var)]
    np.testing.assert_allclose(_line(ax_m, "a").get_ydata(), [x.fwd.chan_sq_mean for x in with_chan])
    np.testing.assert_allclose(_line(ax_v, "a").get_ydata(), [x.fwd.chan_var for x in with_chan])
    assert "Brock" in fig._suptitle.get_text()
    assert _is_png(plots.plot_spp(t, tmp_path / "spp.png"))
    bare = Trace([LayerStats("l", "Linear", Stats.from_moments(0, 1), weight_layer=True)])
    with pytest.raises(SignalpropError, match="channel statistics"):
        plots.plot_spp(bare, tmp_path / "none.png")


def test_histograms_are_densities_that_integrate_to_one(tmp_path: Path) -> None:
    t = make_trace(hist=True)
    fig = plots.histogram_figure(t, layers="weight", yscale="linear")
    ax_f, ax_b = fig.axes[:2]
    for x, line in zip(t.weight_layers(), ax_f.get_lines()):
        assert x.fwd.hist is not None
        width = np.diff(x.fwd.hist.edges)
        assert float(np.sum(line.get_ydata() * width)) == pytest.approx(1.0)
    assert ax_b.get_xlabel() == "gradient value"
    assert _is_png(plots.plot_histograms(t, tmp_path / "h.png"))


def test_histograms_pick_evenly_spaced_layers_and_log_scale_for_spikes() -> None:
    t = make_trace(hist=True)
    fig = plots.histogram_figure(t, max_layers=3)
    labels = [x.get_text() for x in fig.axes[0].get_legend().get_texts()] if fig.axes[0].get_legend() else \
        [x.get_text() for x in fig.axes[-1].get_legend().get_texts()]
    relus = [x for x in t if x.kind == "ReLU"]  # auto: activation outputs, as in Glorot & Bengio's Fig. 6
    assert labels[0].startswith(relus[0].name) and labels[-1].startswith(relus[-1].name)
    assert len(labels) == 3 and f"(3 of {len(relus)} layers)" in fig._suptitle.get_text()
    assert fig.axes[0].get_yscale() == "log"  # ReLU outputs: half of the counts in the zero bin
    assert plots.histogram_figure(t, layers="weight").axes[0].get_yscale() == "linear"


def test_histograms_skip_nonfinite_edges_and_refuse_without_any() -> None:
    bad = Stats(std=1.0, hist=Histogram((-float("inf"), 0.0, 1.0), (1, 2)))
    good = Stats(std=1.0, hist=Histogram((-1.0, 0.0, 1.0), (1, 3)))
    t = Trace([LayerStats("bad", "Linear", bad), LayerStats("good", "Linear", good)])
    fig = plots.histogram_figure(t)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["good (Linear)"]
    with pytest.raises(SignalpropError, match="histograms=True"):
        plots.histogram_figure(make_trace())
    with pytest.raises(SignalpropError, match="layers='all'"):
        plots.histogram_figure(t, layers="weight")
    with pytest.raises(SignalpropError, match="yscale"):
        plots.histogram_figure(t, yscale="symlog")
    with pytest.raises(SignalpropError, match="max_layers"):
        plots.histogram_figure(t, max_layers=0)


def test_plot_report_names_its_files(tmp_path: Path, report: FakeReport) -> None:
    paths = plots.plot_report(report, tmp_path / "sub" / "report.png")
    assert [p.name for p in paths] == ["report.png", "report_spp.png", "report_hist.png"]
    assert all(_is_png(p) for p in paths)
    only = plots.plot_report(Trace([LayerStats("l", "Linear", Stats.from_moments(0, 1), weight_layer=True)]),
                             tmp_path / "bare")
    assert only == [tmp_path / "bare.png"]


def test_real_report_and_a_trace_with_hist_band_nan_inf_round_trip_through_json_and_render(
    tmp_path: Path,
) -> None:
    t = make_trace(hist=True, band=True)
    t = t.replace_layer(2, fwd=Stats(mean=float("nan"), var=float("inf"), std=float("inf"), numel=10,
                                     var_band=(0.5, float("inf")), hist=t[2].fwd.hist))
    back = Trace.from_json(t.to_json())
    assert back.to_dict() == t.to_dict()
    assert back[2].fwd.var_band == (0.5, float("inf")) and back[2].fwd.hist == t[2].fwd.hist
    assert math.isnan(back[2].fwd.mean) and math.isinf(back[2].fwd.std)
    rep = Report(findings_for(t), back, predicted=make_trace(source="predicted", band=True))
    rep_back = Report.from_json(rep.to_json())
    assert rep_back.trace == t
    assert rep_back.plot(tmp_path / "rt.png") == tmp_path / "rt.png"  # Report.plot delegates to plot_report
    assert all(_is_png(tmp_path / name) for name in ("rt.png", "rt_spp.png", "rt_hist.png"))
    fig = plots.std_figure(back, layers="all")
    assert list(_line(fig.axes[0], "measured: inf (off scale)").get_xdata()) == [2]


def test_bad_paths_and_inputs(tmp_path: Path, trace: Trace) -> None:
    with pytest.raises(SignalpropError, match=r"\.png"):
        plots.plot_std(trace, tmp_path / "x.docx")
    with pytest.raises(SignalpropError, match="str or pathlib.Path"):
        plots.plot_std(trace, 3)  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="Trace"):
        plots.plot_std({"a": "b"}, tmp_path / "x.png")  # type: ignore[dict-item]
    with pytest.raises(SignalpropError, match="Trace"):
        plots.plot_std({}, tmp_path / "x.png")
    with pytest.raises(SignalpropError, match="predicted"):
        plots.plot_std(trace, tmp_path / "x.png", predicted=[1])  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="nothing to plot"):
        plots.plot_std(Trace([LayerStats("r", "ReLU", Stats.from_moments(0, 1))]), tmp_path / "x.png",
                       layers="weight")
    assert plots._check_path(tmp_path / "noext") == tmp_path / "noext.png"
    assert plots._check_path(tmp_path / "v.SVG") == tmp_path / "v.SVG"


def test_no_pyplot_state_is_touched() -> None:
    """Figures are built with matplotlib's object API: pyplot's figure list stays as the user left it."""
    import matplotlib.pyplot as plt

    mine = plt.figure()
    try:
        before = plt.get_fignums()
        figs = plots.report_figures(FakeReport(findings_for(make_trace()), make_trace(hist=True)))
        assert figs, "report_figures drew nothing, so the check below would prove nothing"
        assert plt.get_fignums() == before
        assert plt.gcf() is mine
    finally:
        plt.close(mine)
