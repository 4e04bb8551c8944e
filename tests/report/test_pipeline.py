"""The renderers on real measurements and diagnoses of the reference models (not hand-built traces)."""

from __future__ import annotations

from pathlib import Path

import torch
from rich.console import Console

from signalprop import models
from signalprop.diagnosis import diagnose
from signalprop.measurement import measure
from signalprop.report import html, plots, table


def test_measured_tanh_mlp_renders_everywhere(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.mlp(6, 64, "tanh")
    trace = measure(model, torch.randn(32, 64), histograms=True)
    console = Console(record=True, width=200, color_system=None)
    t = table.render(trace, console=console)
    assert t.row_count == len(trace)
    paths = plots.plot_report(trace, tmp_path / "mlp.png")
    assert [p.name for p in paths] == ["mlp.png", "mlp_spp.png", "mlp_hist.png"]
    fig = plots.histogram_figure(trace)
    labels = [x.get_text() for x in fig.axes[-1].get_legend().get_texts()]
    assert labels and all("(Tanh)" in label for label in labels)


def test_diagnosed_plain_cnn_renders_findings_table_and_plots(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.plain_cnn(12, 8, "relu")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.mul_(0.5)  # a vanishing signal, so that there is something to find
    report = diagnose(model, torch.randn(4, 3, 16, 16))
    assert not report.ok
    console = Console(record=True, width=250, color_system=None)
    table.render(report, console=console, max_rows=10)
    text = console.export_text()
    for f in report.findings:
        assert f.message.split("\n")[0][:40] in text
    page = html.write_html(report, tmp_path / "cnn.html").read_text()
    assert page.index("Findings") < page.index("<table") < page.index("<img")
    assert page.count("<img") >= 1
