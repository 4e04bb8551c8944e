"""`signalprop demo`: the AlexNet story end to end, in under a minute on 2 CPU cores."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

HELP = "tell the AlexNet story: why deep ReLU nets explode or vanish, where, and how to fix it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="signalprop-demo", help="folder for the PNGs and the HTML report")
    p.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    p.add_argument("--depth", type=int, default=30, help="depth of the plain ReLU CNN (default 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-fix", action="store_true", help="skip the fix part (auto_init_, lsuv_)")


def _fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.2g}" if 0.01 <= abs(v) < 100 else f"{v:.1e}"


def _story_table(r: Any, table_cls: Any, max_rows: int = 12) -> Any:
    """Per weight layer and init: measured forward std, He's formula beside it, and the gradient std."""
    from rich.markup import escape

    from . import _story as _demo

    table = table_cls(
        title=f"(b) {r.title}: per weight layer, forward std measured / by He's formula, gradient std",
        title_justify="left", show_lines=True,
    )
    table.add_column("layer")
    for key in _demo.INITS:
        table.add_column(_demo.INITS[key][0].split(" (")[0], justify="right")
    rows = [layer for layer in r.traces["he"] if layer.weight_layer]
    if len(rows) > max_rows:  # keep the first and last layers, and evenly spaced ones between
        step = (len(rows) - 1) / (max_rows - 1)
        rows = [rows[round(i * step)] for i in range(max_rows)]
    for layer in rows:
        cells = [f"{escape(layer.name)}\n[dim]{escape(layer.kind)}[/dim]"]
        for key, trace in r.traces.items():
            m = trace[layer.name]
            f_std, _ = r.formula[key].get(layer.name, (math.nan, math.nan))
            g = m.bwd.std if m.bwd is not None else math.nan
            cells.append(f"fwd {_fmt(m.fwd.std)}\n[dim]He {_fmt(f_std)}[/dim]\ngrad {_fmt(g)}")
        table.add_row(*cells)
    return table


def run(args: argparse.Namespace) -> int:
    from ..experiments._common import flushed_denormals

    with flushed_denormals():  # vanishing signals reach subnormal floats, which make CPU steps ~6x slower
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from .._errors import SignalpropError
    from ..models import alexnet, plain_cnn
    from ..report.plots import plot_std
    from . import _story as _demo
    from ._mean_subtraction import VARIANTS, mean_subtraction

    if args.batch < 1 or args.depth < 1:
        raise SignalpropError("--batch and --depth must be positive integers")
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    def step(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - t0:5.1f}s[/dim]  {msg}", highlight=False)

    # (a) toy arithmetic
    t = _demo.toy()
    terms = " + ".join(f"({w:g})({a:g})" for w, a in zip(t.weights, t.activated))
    console.print(Panel.fit(Text(
        f"One output unit: y = sum_i w_i * relu(x_i)\n"
        f"w = {list(t.weights)}, x = {list(t.inputs)}  ->  relu(x) = {list(t.activated)}\n"
        f"y = {terms} = {t.output:g}\n"
        f"Only {t.active} of {len(t.inputs)} inputs pass the ReLU. On average half do, so each layer multiplies\n"
        "the variance by 1/2 * n * Var[w] (n inputs per unit). He et al. 2015 (Eq. 10):\n"
        "    Var[y_L] = Var[y_1] * prod_l ( 1/2 * n_l * Var[w_l] )\n"
        "A factor above 1 explodes with depth, below 1 vanishes. He's init sets 1/2 * n_l * Var[w_l] = 1."),
        title="(a) where the numbers come from",
    ))

    # (b) four inits, two models
    gen = torch.Generator().manual_seed(args.seed)
    x_alex = torch.randn(args.batch, 3, 224, 224, generator=gen)
    x_cnn = torch.randn(args.batch, 3, 32, 32, generator=gen)
    runs = [
        _demo.run_inits("AlexNet", alexnet, x_alex, args.seed, step),
        _demo.run_inits(f"{args.depth}-layer plain ReLU CNN", lambda: plain_cnn(args.depth, 32, "relu"),
                        x_cnn, args.seed, step),
    ]
    pngs = []
    for i, r in enumerate(runs):
        console.print(_story_table(r, Table))
        if i == 0:
            console.print(
                "He's formula ignores pooling (as the paper does): AlexNet's max-pooling keeps the largest of 9 "
                "values, which raises the second moment, so the measured std runs above the formula after each "
                "pool. The 30-layer CNN has no pooling in its body, and there the formula holds.",
                highlight=False,
            )
        path = out / f"{'alexnet' if i == 0 else 'plain_cnn'}_std.png"
        plot_std({_demo.INITS[k][0]: tr for k, tr in r.traces.items()}, path,
                 title=f"{r.title}: std per layer under four inits")
        pngs.append(path)

    # (d) verdicts
    verdicts = Table(title="(d) verdicts", title_justify="left", show_lines=True)
    verdicts.add_column("model")
    verdicts.add_column("init")
    verdicts.add_column("verdict")
    for r in runs:
        for key, rep in r.reports.items():
            style = "green" if rep.ok else "red"
            verdicts.add_row(r.title, _demo.INITS[key][0], Text(_demo.verdict(rep), style=style))
    console.print(verdicts)

    # the asker's idea: subtract the mean at the end of each layer
    step(f"mean subtraction, BatchNorm, LayerNorm, He, LSUV on a {args.depth}-layer ReLU CNN")
    ms = mean_subtraction(depth=args.depth, seed=args.seed)
    ms_png = out / "mean_subtraction.png"
    plot_std({VARIANTS[k]: tr for k, tr in ms.traces.items()}, ms_png,
             title=f"{args.depth}-layer ReLU CNN, N(0, 1) weights: does subtracting the mean help?")
    pngs.append(ms_png)
    console.print(Panel.fit(Text("\n".join(ms.sentences().values())),
                            title="(e) subtract the mean at the end of each layer?"), highlight=False)

    # predicted band beside measured nets
    step("predict: He-initialized 30-layer ReLU MLPs, band vs single nets")
    check = _demo.band_check(depth=30, width=128, nets=8, seed=args.seed)
    band_png = out / "predicted_band.png"
    plot_std({f"net {i + 1}": tr for i, tr in enumerate(check.measured)}, band_png, predicted=check.predicted,
             title="He init, 30-layer ReLU MLP (width 128): predicted 90% band vs 8 single nets")
    pngs.append(band_png)
    console.print(
        f"sp.predict: {100 * check.inside_fraction():.0f}% of (net, layer) variances fall inside the predicted "
        "90% finite-width band (Hanin & Nica 2019): the mean is right, single nets scatter around it."
    )

    # the fix
    extra: dict[str, Any] = {}
    if not args.no_fix:
        stories = _demo.fix_story(x_alex, args.seed, step)
        fix_table = Table(title="the fix: naive AlexNet, then sp.fix.auto_init_, then sp.fix.lsuv_",
                          title_justify="left", show_lines=True)
        fix_table.add_column("state")
        fix_table.add_column("ok")
        fix_table.add_column("findings")
        for label, rep in stories.items():
            kinds = ", ".join(sorted({f.kind for f in rep.findings if f.severity != "info"})) or "none"
            fix_table.add_row(label, "[green]yes[/green]" if rep.ok else "[red]no[/red]", kinds)
        console.print(fix_table)
        html = out / "alexnet_naive_report.html"
        stories["naive N(0, 1)"].to_html(html)
        extra["html"] = html

    step("done")
    console.print("Pictures: " + ", ".join(str(p) for p in pngs))
    if "html" in extra:
        console.print(f"Report of the naive AlexNet: {extra['html']}")
    return 0
