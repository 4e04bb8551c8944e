"""The rich table: columns, numbers straight from the Trace, findings first and worst first, escaping."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from rich.table import Table

from signalprop import SignalpropError
from signalprop.diagnosis import Report
from signalprop.diagnosis._findings import Finding
from signalprop.report import table
from signalprop.report._common import as_view, fmt, fmt_pct, layer_table, pick_rows, union_names
from signalprop.trace import LayerStats, Stats, Trace

from .conftest import FakeReport, findings_for, make_trace, nonfinite_trace


def _console() -> Console:
    return Console(record=True, width=220, color_system=None)


def _column(t: Table, header: str) -> list[str]:
    col = next(c for c in t.columns if c.header == header)
    return [str(c) for c in col.cells]


def test_report_table_has_every_layer_and_prints_findings_worst_first(report: FakeReport) -> None:
    console = _console()
    t = table.render(report, console=console)
    headers = [c.header for c in t.columns]
    assert headers[:9] == ["#", "layer", "kind", "shape", "fwd std", "fwd mean", "absmax", "zero %", "grad std"]
    assert headers[-2:] == ["predicted std", "90% band (one net)"]
    assert t.row_count == len(report.trace)
    assert _column(t, "layer") == report.trace.names
    text = console.export_text()
    assert text.index("ERROR") < text.index("WARNING") < text.index("INFO") < text.index("fwd std")
    for f in report.findings:
        assert f.message in text
        if f.fix:
            assert f.fix in text


def test_numbers_come_from_the_trace(report: FakeReport) -> None:
    t = table.render(report)
    stds = _column(t, "fwd std")
    grads = _column(t, "grad std")
    for layer, s, g in zip(report.trace, stds, grads):
        assert float(s) == pytest.approx(layer.fwd.std, rel=5e-3)
        assert float(g) == pytest.approx(layer.bwd.std, rel=5e-3)
    assert _column(t, "zero %")[1] == "50%"


def test_predicted_band_is_the_square_root_of_the_variance_band(report: FakeReport) -> None:
    t = table.render(report)
    assert report.predicted is not None
    for layer, band in zip(report.predicted, _column(t, "90% band (one net)")):
        if layer.fwd.var_band is None:
            assert band == "-"
            continue
        lo, hi = (float(x) for x in band.split(" - "))
        assert lo == pytest.approx(math.sqrt(layer.fwd.var_band[0]), rel=5e-3)
        assert hi == pytest.approx(math.sqrt(layer.fwd.var_band[1]), rel=5e-3)


def test_predicted_argument_and_bare_trace(trace: Trace) -> None:
    console = _console()
    t = table.render(trace, console=console, predicted=make_trace(source="predicted", band=True))
    assert t.columns[-1].header == "90% band (one net)"
    text = console.export_text()
    assert "Findings" not in text and "No findings" not in text  # a bare trace was not diagnosed
    assert "features.8" in text


def test_real_report_class_and_json_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = make_trace(hist=True, band=True)
    rep = Report(findings_for(t), t, predicted=make_trace(source="predicted", band=True), meta={"batch": 8})
    back = Report.from_json(rep.to_json())
    a, b = _console(), _console()
    table.render(rep, console=a)
    table.render(back, console=b)
    assert a.export_text() == b.export_text()


def test_nonfinite_values_show_as_inf_and_dash_with_a_nonfinite_column() -> None:
    t = table.render(nonfinite_trace())
    assert t.columns[-1].header == "non-finite fwd / grad"
    stds = _column(t, "fwd std")
    assert stds[4] == "inf" and stds[6] == "-"
    assert _column(t, "non-finite fwd / grad")[6].startswith("100%")
    assert _column(t, "grad std")[6] == "0"


def test_max_rows_keeps_flagged_layers_and_says_how_many_it_left_out() -> None:
    t = make_trace(10)
    rep = FakeReport([Finding("exploding", "error", "features.9", "boom", "he_")], t)
    header, rows = layer_table(as_view(rep), max_rows=4)
    names = [r.name for r in rows if not isinstance(r, int)]
    gaps = [r for r in rows if isinstance(r, int)]
    assert names[:2] == ["features.0", "features.1"] and names[-2:] == ["flatten", "classifier.0"]
    assert "features.9" in names
    assert len(names) + sum(gaps) == len(t)
    console = _console()
    table.render(rep, console=console, max_rows=4)
    assert "layers ..." in console.export_text()


def test_layer_names_with_markup_are_printed_literally() -> None:
    names = ["[bold]evil[/bold]", "<script>x</script>", "a.b", "c", "d"]
    t = make_trace(5, names=names)
    console = _console()
    table.render(FakeReport([Finding("vanishing", "warning", names[0], "m [red]x[/red]", "f")], t), console=console)
    text = console.export_text()
    assert "[bold]evil[/bold]" in text and "m [red]x[/red]" in text and "<script>x</script>" in text


def test_render_findings_empty_and_whole_network() -> None:
    console = _console()
    table.render_findings([], console)
    table.render_findings([Finding("mean_drift", "info", "", "the mean drifts", "")], console)
    text = console.export_text()
    assert "No findings: every rule passed." in text
    assert "INFO    mean_drift: the mean drifts" in text  # no "@ layer" for a whole-network finding


def test_render_traces_columns_missing_layers_and_extra_columns() -> None:
    a = make_trace(5)
    b = make_trace(3, factor=0.1)  # lacks features.6 and features.8
    pred = make_trace(5, source="predicted")
    console = _console()
    t = table.render_traces({"he": a, "default": b}, console=console,
                            extra={"He formula": pred, "note": {"features.0": "first", "classifier.0": 2.5}})
    headers = [c.header for c in t.columns]
    assert headers == ["#", "layer", "kind", "he fwd std", "he grad std", "default fwd std", "default grad std",
                       "He formula", "note"]
    assert _column(t, "layer") == [x.name for x in a.weight_layers()]
    default = dict(zip(_column(t, "layer"), _column(t, "default fwd std")))
    assert default["features.6"] == "-" and default["features.2"] == "0.1"
    note = _column(t, "note")
    assert note[0] == "first" and note[-1] == "2.5" and note[1] == "-"
    t_all = table.render_traces({"he": a}, layers="all", grad=False)
    assert t_all.row_count == len(a) and len(t_all.columns) == 4


@pytest.mark.parametrize(
    "bad",
    [{}, {"x": 3}, [make_trace()]],
)
def test_render_traces_rejects_bad_input(bad: object) -> None:
    with pytest.raises(SignalpropError, match="Trace"):
        table.render_traces(bad)  # type: ignore[arg-type]


def test_bad_inputs_raise_with_a_fix(trace: Trace) -> None:
    with pytest.raises(SignalpropError, match="sp.diagnose"):
        table.render(42)
    with pytest.raises(SignalpropError, match="sp.predict"):
        table.render(trace, predicted="nope")  # type: ignore[arg-type]
    with pytest.raises(SignalpropError, match="'auto'"):
        table.render(trace, layers="convs")
    with pytest.raises(SignalpropError, match="max_rows"):
        table.render(trace, max_rows=1)
    with pytest.raises(SignalpropError, match="lacks 'kind'"):
        table.render(FakeReport([object()], trace))


def test_weight_layer_selection() -> None:
    only = Trace([LayerStats("r", "ReLU", Stats.from_moments(0, 1))])
    assert table.render(only, layers="auto").row_count == 1  # no weight layers: auto shows all
    assert table.render(only, layers="weight").row_count == 0


@given(st.floats(min_value=1e-30, max_value=1e30))
def test_fmt_keeps_three_significant_digits(x: float) -> None:
    assert float(fmt(x)) == pytest.approx(x, rel=5e-3)
    assert float(fmt(-x)) == pytest.approx(-x, rel=5e-3)


def test_fmt_special_values() -> None:
    assert [fmt(float("nan")), fmt(None), fmt(float("inf")), fmt(-float("inf")), fmt(0.0)] == ["-", "-", "inf",
                                                                                            "-inf", "0"]
    assert [fmt_pct(0.0), fmt_pct(0.5), fmt_pct(1e-5), fmt_pct(0.0123), fmt_pct(float("nan"))] == [
        "0%", "50%", "0.001%", "1.2%", "-"]


@given(st.permutations(list("abcdefghij")), st.lists(st.lists(st.booleans(), min_size=10, max_size=10),
                                                     min_size=1, max_size=4))
def test_union_names_keeps_every_lists_order(base: list[str], masks: list[list[bool]]) -> None:
    lists = [[n for n, keep in zip(base, m) if keep] for m in masks]
    merged = union_names(lists)
    assert sorted(merged) == sorted({n for ls in lists for n in ls})
    pos = {n: i for i, n in enumerate(merged)}
    for ls in lists:
        assert [pos[n] for n in ls] == sorted(pos[n] for n in ls)


@given(st.integers(2, 60), st.integers(2, 30), st.sets(st.integers(0, 59), max_size=5))
def test_pick_rows_covers_every_row_once(n: int, max_rows: int, keep: set[int]) -> None:
    picked = pick_rows(n, keep, max_rows)
    shown = [i for i in picked if i is not None]
    assert shown == sorted(set(shown))
    assert {k for k in keep if k < n} <= set(shown)
    assert len(shown) <= max(max_rows, 0) + len(keep) or n <= max_rows
    assert None not in (picked[0], picked[-1])


def test_report_module_imports_stay_light() -> None:
    code = ("import sys, signalprop.report, signalprop.report.table, signalprop.report.plots, "
            "signalprop.report.html; print([m for m in ('matplotlib', 'rich') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
