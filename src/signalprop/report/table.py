"""Terminal rendering with rich: the findings, then one row per layer.

Every number comes from the Trace (``Stats`` fields) or the Report's findings; nothing is computed here.
rich is imported inside the functions, so importing this module stays light.

Example::

    import signalprop as sp
    trace = sp.measure(sp.models.mlp(8, 64, "relu"), torch.randn(32, 64))
    sp.report.table.render(trace, console=rich.console.Console())
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..trace import Trace
from ._common import RICH_STYLE, Gap, Row, as_view, layer_table, read_findings, traces_table

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["render", "render_findings", "render_traces"]

_NUMERIC_FROM = 3  # columns from this index on are numbers (right-aligned)


def render(
    report_or_trace: Any,
    *,
    console: Console | None = None,
    predicted: Trace | None = None,
    max_rows: int | None = None,
    layers: str = "all",
) -> Table:
    """The per-layer table of a diagnose Report or a bare Trace, as a ``rich.table.Table``.

    Columns: position, layer name, kind, output shape, forward std, forward mean, absmax, zero %,
    gradient std; a non-finite column when some layer's output (or its gradient) holds inf/NaN; and,
    when a predicted trace is there (the report's, or ``predicted=``), the predicted std and its 90%
    band for one network of that width, ``sqrt(var_band)`` (Hanin & Nica 2019). ``-`` marks a number
    that was not recorded.

    Rows of layers named by a finding take the finding's severity color; with ``max_rows`` the table
    keeps the first and last layers and every flagged one, and says how many it left out.
    ``layers`` is ``"all"`` (every module call), ``"weight"`` or ``"auto"`` (weight layers when any).

    When ``console`` is given, the findings (for a Report) and then the table are printed to it.

    Args:
        report_or_trace: A diagnose Report or a Trace.
        console: A ``rich.console.Console`` to print to.
        predicted: A predicted Trace to show beside the measured one (default: the report's).
        max_rows: Shorten the table to about this many rows.
        layers: ``"all"``, ``"weight"`` or ``"auto"``.

    Returns:
        The ``rich.table.Table``.

    Examples:
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> trace = Trace([
        ...     LayerStats("fc", "Linear", Stats.from_moments(0.0, 4.0), shape=(8, 4), weight_layer=True),
        ...     LayerStats("act", "ReLU", Stats.from_moments(0.5, 1.0), shape=(8, 4)),
        ... ])
        >>> table = render(trace)
        >>> table.row_count, [column.header for column in table.columns][:5]
        (2, ['#', 'layer', 'kind', 'shape', 'fwd std'])
    """
    from rich.table import Table
    from rich.text import Text

    view = as_view(report_or_trace, predicted)
    header, rows = layer_table(view, layers=layers, max_rows=max_rows)
    source = view.trace.source
    title = f"Signal per layer ({source}, {len(view.trace)} module calls)"
    table = Table(title=title, header_style="bold", show_lines=False)
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i >= _NUMERIC_FROM or i == 0 else "left", overflow="fold")
    _add_rows(table, rows, len(header), Text)
    if view.predicted is not None:
        table.caption = "predicted: mean-field value; band: where one network of this width lands 90% of the time"
    if console is not None:
        if view.findings is not None:
            render_findings(view.findings, console)
        console.print(table)
    return table


def render_traces(
    traces: Mapping[str, Trace],
    *,
    console: Console | None = None,
    extra: Mapping[str, Trace | Mapping[str, Any]] | None = None,
    layers: str = "auto",
    grad: bool = True,
    max_rows: int | None = None,
    title: str | None = None,
) -> Table:
    """Several traces side by side: for each label a forward-std column (and a gradient-std column).

    ``traces`` maps a label (an init scheme, a checkpoint, ...) to a Trace; rows are the union of their
    layer names in execution order, ``-`` where a trace lacks a layer. ``extra`` adds columns: a Trace
    contributes its forward std (e.g. ``{"He formula": sp.predict(model, shape)}``), a mapping its value
    per layer name. ``layers="auto"`` shows weight layers when there are any (``"all"``, ``"weight"``).
    Prints to ``console`` when one is given.

    Args:
        traces: Label -> Trace.
        console: A ``rich.console.Console`` to print to.
        extra: Label -> a Trace (its forward std) or a mapping layer name -> value: more columns.
        layers: ``"auto"``, ``"all"`` or ``"weight"``.
        grad: Add each trace's gradient-std column.
        max_rows: Shorten the table to about this many rows.
        title: The table's title.

    Returns:
        The ``rich.table.Table``.

    Examples:
        >>> from signalprop.trace import LayerStats, Stats, Trace
        >>> trace = Trace([
        ...     LayerStats("fc", "Linear", Stats.from_moments(0.0, 4.0), shape=(8, 4), weight_layer=True),
        ...     LayerStats("act", "ReLU", Stats.from_moments(0.5, 1.0), shape=(8, 4)),
        ... ])
        >>> table = render_traces({"he": trace, "default": trace}, layers="all", grad=False)
        >>> table.row_count, [column.header for column in table.columns]
        (2, ['#', 'layer', 'kind', 'he fwd std', 'default fwd std'])
    """
    from rich.table import Table
    from rich.text import Text

    header, rows = traces_table(traces, extra=extra, layers=layers, grad=grad, max_rows=max_rows)
    table = Table(title=title or "Std per layer, side by side", header_style="bold")
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i >= _NUMERIC_FROM or i == 0 else "left", overflow="fold")
    _add_rows(table, rows, len(header), Text)
    if console is not None:
        console.print(table)
    return table


def render_findings(findings: Iterable[Any], console: Console) -> None:
    """Print findings worst first, each as ``SEVERITY kind @ layer: message`` and an indented fix.

    An empty list prints one line saying every rule passed.

    Args:
        findings: diagnose ``Finding`` objects (``report.findings``).
        console: The ``rich.console.Console`` to print to.

    Examples:
        >>> from rich.console import Console
        >>> from signalprop import Finding
        >>> console = Console(width=80, color_system=None)
        >>> render_findings([Finding("vanishing", "warning", "act", "std falls 4x", fix="use he_")], console)
        Findings (1 warning)
        WARNING vanishing @ act: std falls 4x
                fix: use he_
        >>> render_findings([], console)
        No findings: every rule passed.
    """
    from rich.text import Text

    views = read_findings(findings)
    if not views:
        console.print(Text("No findings: every rule passed.", style="bold green"))
        return
    counts = {s: sum(f.severity == s for f in views) for s in ("error", "warning", "info")}
    summary = ", ".join(f"{n} {s}{'s' if n != 1 else ''}" for s, n in counts.items() if n)
    console.print(Text(f"Findings ({summary})", style="bold"))
    for f in views:
        style = RICH_STYLE.get(f.severity, "white")
        line = Text()
        line.append(f"{f.severity.upper():<7}", style=style)
        line.append(f" {f.kind}", style="bold")
        if f.layer is not None:
            line.append(f" @ {f.layer}")
        line.append(f": {f.message}")
        console.print(line)
        if f.fix:
            fix = Text("        fix: ", style="dim")
            fix.append(f.fix)
            console.print(fix)


def _add_rows(table: Table, rows: list[Row | Gap], ncols: int, text_cls: Any) -> None:
    for row in rows:
        if isinstance(row, Row):
            style = RICH_STYLE.get(row.severity, "") if row.severity else ""
            cells = [text_cls(c) for c in row.cells]
            if row.nonfinite and not style:
                style = "red"
            if style:
                cells[1] = text_cls(row.cells[1], style=style)
            table.add_row(*cells)
        else:
            label = f"... {row} layer{'s' if row != 1 else ''} ..."
            table.add_row("", text_cls(label, style="dim italic"), *([""] * (ncols - 2)))
