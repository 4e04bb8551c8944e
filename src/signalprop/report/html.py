"""One self-contained HTML page for a Report (or a Trace): findings first, then the table, then the plots.

Self-contained means one file that opens anywhere, offline, and can be mailed or attached to a CI run:
styles are inline, figures are embedded as base64 PNG (``data:`` URIs), and a Content-Security-Policy
forbids the page from loading anything else. Every user-provided string (layer names, messages, meta)
is HTML-escaped, so a module named ``<script>`` shows as text. Numbers come from the Trace and the
findings; nothing is computed here.

Example::

    import signalprop as sp
    report = sp.diagnose(model, x)
    sp.report.html.write_html(report, "report.html")
"""

from __future__ import annotations

import base64
import html as _html
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import SignalpropError
from .._version import __version__
from ._common import HTML_BACKGROUND, HTML_COLOR, FindingView, Row, View, as_view, fmt_meta, layer_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["html_page", "write_html"]

_CAPTIONS = {
    "std": "Forward std and gradient std per layer (the weight layers, when the model has any), log scale. Dashed: the mean-field prediction; "
    "shaded: where one network of this width lands 90% of the time.",
    "spp": "Signal Propagation Plot (Brock et al. 2021): average channel squared mean and average channel "
    "variance per layer.",
    "hist": "Per-layer histograms of layer outputs and their gradients (Glorot & Bengio 2010, Fig. 6 style).",
}

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif;margin:0;background:#f6f7f9;
color:#1d2127;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:20px 28px 40px}
h1{font-size:1.55rem;margin:0 0 4px}h2{font-size:1.15rem;margin:28px 0 10px;border-bottom:1px solid #d5d9e0;
padding-bottom:4px}
.sub{color:#555;margin:0 0 10px}
.status{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;font-size:.9rem}
.status.ok{background:#e6f4ea;color:#1b5e20}.status.bad{background:#fdecea;color:#b71c1c}
.status.none{background:#eceff1;color:#455a64}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:.88rem;margin:8px 0 0}
dl.meta dt{color:#666}dl.meta dd{margin:0;font-family:ui-monospace,Menlo,Consolas,monospace}
.finding{border-left:5px solid;border-radius:4px;padding:8px 12px;margin:8px 0}
.finding .head{font-weight:600}.finding .sev{text-transform:uppercase;font-size:.78rem;letter-spacing:.04em;
margin-right:8px}
.finding .layer{font-family:ui-monospace,Menlo,Consolas,monospace;font-weight:400}
.finding .fix{margin-top:4px;font-size:.92rem}.finding .fix b{color:#333}
.empty{color:#1b5e20;font-weight:600}
.tablewrap{max-height:640px;overflow:auto;border:1px solid #d5d9e0;border-radius:4px;background:#fff}
table{border-collapse:collapse;font-size:.84rem;width:100%}
th{position:sticky;top:0;background:#eef1f5;text-align:right;padding:5px 8px;border-bottom:1px solid #cfd5dd;
white-space:nowrap}
td{padding:3px 8px;text-align:right;border-bottom:1px solid #eef0f3;font-variant-numeric:tabular-nums;
white-space:nowrap}
th.l,td.l{text-align:left}td.name{font-family:ui-monospace,Menlo,Consolas,monospace}
tr.gap td{color:#888;font-style:italic;text-align:center}
tr.nonfinite td.name{color:#b71c1c}
figure{margin:14px 0 22px;background:#fff;border:1px solid #d5d9e0;border-radius:4px;padding:10px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:.86rem;color:#444;margin-top:6px}
footer{color:#888;font-size:.8rem;margin-top:30px}
"""


def write_html(report: Any, path: str | Path, *, title: str = "signalprop report",
               max_rows: int | None = None) -> Path:
    """Write one self-contained HTML page for a diagnose Report (or a bare Trace) and return its path.

    The page holds, in this order: a header with the verdict (``report.ok``) and the meta data, the
    findings (worst first, colored by severity, each with its message and its fix), the per-layer table
    (the same rows as :func:`signalprop.report.table.render`), and the figures of
    :func:`signalprop.report.plots.report_figures` embedded as base64 PNG. ``max_rows`` shortens the
    table as in the terminal (flagged layers always stay).

    Args:
        report: A diagnose Report or a Trace.
        path: The file to write; no suffix: ``.html``.
        title: The page title.
        max_rows: Shorten the table to about this many rows.

    Returns:
        The path written.

    Examples:
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> trace = Trace([LayerStats("fc", "Linear", Stats.from_moments(0.0, 1.0), weight_layer=True)])
        >>> import pathlib, tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     out = write_html(trace, pathlib.Path(tmp) / "report.html")
        ...     out.name, out.read_text().startswith("<!DOCTYPE html>")
        ('report.html', True)
    """
    if not isinstance(path, str | Path):
        raise SignalpropError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    p = Path(path)
    if p.suffix.lower() not in (".html", ".htm"):
        raise SignalpropError(f"write_html writes an .html file; got {str(p)!r}: give a path ending in .html")
    text = html_page(report, title=title, max_rows=max_rows)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")
    return p


def html_page(report: Any, *, title: str = "signalprop report", max_rows: int | None = None) -> str:
    """The HTML text that :func:`write_html` writes.

    Args:
        report: A diagnose Report or a Trace.
        title: The page title.
        max_rows: Shorten the table to about this many rows.

    Returns:
        One self-contained HTML page (figures embedded as base64 PNG).

    Examples:
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> page = html_page(Trace([LayerStats("fc", "Linear", Stats.from_moments(0.0, 1.0), weight_layer=True)]))
        >>> page.startswith("<!DOCTYPE html>"), "<table" in page, "data:image/png;base64," in page
        (True, True, True)
    """
    from .plots import report_figures

    view = as_view(report)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body><main>",
        _header(view, report, title),
        _findings(view),
        '<section id="table"><h2>Per-layer statistics</h2>',
        _table(view, max_rows),
        "</section>",
        '<section id="plots"><h2>Plots</h2>',
    ]
    for key, fig in report_figures(report):
        parts.append(_figure(fig, key))
    parts.append("</section>")
    parts.append(f"<footer>Written by signalprop {_e(__version__)}. "
                 "Numbers: std, mean and absmax over every element of a layer's output (forward) or of the "
                 "gradient with respect to it (backward); - means not recorded.</footer>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _e(s: Any) -> str:
    return _html.escape(str(s), quote=True)


def _header(view: View, report: Any, title: str) -> str:
    trace = view.trace
    if view.findings is None:
        status = '<span class="status none">trace only (not diagnosed)</span>'
    else:
        ok = getattr(report, "ok", None)
        if ok is None:
            ok = not any(f.severity in ("warning", "error") for f in view.findings)
        status = ('<span class="status ok">OK: no warnings or errors</span>' if ok
                  else '<span class="status bad">needs attention</span>')
    sub = (f"{_e(trace.source)} trace, {len(trace)} module calls, "
           f"{sum(x.weight_layer for x in trace)} weight layers"
           + (", with a prediction" if view.predicted is not None else ""))
    meta = "".join(f"<dt>{_e(k)}</dt><dd>{_e(fmt_meta(v))}</dd>" for k, v in view.meta.items())
    return (f"<header><h1>{_e(title)}</h1><p class=\"sub\">{sub} &nbsp; {status}</p>"
            + (f'<dl class="meta">{meta}</dl>' if meta else "") + "</header>")


def _findings(view: View) -> str:
    out = ['<section id="findings"><h2>Findings</h2>']
    if view.findings is None:
        out.append("<p>This page shows a bare trace; run <code>sp.diagnose</code> for findings.</p>")
    elif not view.findings:
        out.append('<p class="empty">No findings: every rule passed.</p>')
    else:
        for f in view.findings:
            out.append(_finding(f))
    out.append("</section>")
    return "\n".join(out)


def _finding(f: FindingView) -> str:
    color = HTML_COLOR.get(f.severity, "#455a64")
    bg = HTML_BACKGROUND.get(f.severity, "#eceff1")
    layer = f' <span class="layer">@ {_e(f.layer)}</span>' if f.layer is not None else ""
    fix = f'<div class="fix"><b>Fix:</b> {_e(f.fix)}</div>' if f.fix else ""
    return (f'<div class="finding {_e(f.severity)}" style="border-color:{color};background:{bg}">'
            f'<div class="head"><span class="sev" style="color:{color}">{_e(f.severity)}</span>'
            f"{_e(f.kind)}{layer}</div><div>{_e(f.message)}</div>{fix}</div>")


def _table(view: View, max_rows: int | None) -> str:
    header, rows = layer_table(view, layers="all", max_rows=max_rows)
    left = {1, 2, 3}
    out = ['<div class="tablewrap"><table><thead><tr>']
    out += [f'<th class="{"l" if i in left else ""}">{_e(h)}</th>' for i, h in enumerate(header)]
    out.append("</tr></thead><tbody>")
    for row in rows:
        if not isinstance(row, Row):
            out.append(f'<tr class="gap"><td colspan="{len(header)}">... {row} '
                       f"layer{'s' if row != 1 else ''} not shown ...</td></tr>")
            continue
        cls = "nonfinite" if row.nonfinite else ""
        style = f' style="background:{HTML_BACKGROUND[row.severity]}"' if row.severity in HTML_BACKGROUND else ""
        cells = []
        for i, c in enumerate(row.cells):
            klass = ("l name" if i == 1 else "l") if i in left else ""
            cell_style = (f' style="color:{HTML_COLOR[row.severity]};font-weight:600"'
                          if i == 1 and row.severity in HTML_COLOR else "")
            cells.append(f'<td class="{klass}"{cell_style}>{_e(c)}</td>')
        out.append(f'<tr class="{cls}"{style}>' + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def _figure(fig: Figure, key: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    caption = _CAPTIONS.get(key, "")
    return (f'<figure id="fig-{_e(key)}"><img alt="{_e(caption or key)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")
