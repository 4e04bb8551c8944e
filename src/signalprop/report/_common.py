"""What every renderer shares: reading a Report or a Trace, formatting numbers, choosing and naming rows.

Nothing here computes a statistic: every number shown comes from a :class:`~signalprop.trace.Stats`
field, and the only arithmetic is presentation (a variance band shown as a std band, a fraction as a
percentage). This module imports neither rich nor matplotlib.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import SignalpropError
from ..trace import LayerStats, Stats, Trace

SEVERITIES: tuple[str, ...] = ("error", "warning", "info")
"""Severities from worst to mildest, as diagnose writes them."""

RICH_STYLE: dict[str, str] = {"error": "bold red", "warning": "bold yellow", "info": "cyan"}
HTML_COLOR: dict[str, str] = {"error": "#b71c1c", "warning": "#e65100", "info": "#0d47a1"}
HTML_BACKGROUND: dict[str, str] = {"error": "#fdecea", "warning": "#fff4e5", "info": "#e8f1fb"}

LAYER_CHOICES: tuple[str, ...] = ("auto", "all", "weight")


@dataclass(frozen=True)
class FindingView:
    """The fields of one diagnose ``Finding`` that renderers read, as plain strings."""

    kind: str
    severity: str
    layer: str | None
    message: str
    fix: str

    @property
    def rank(self) -> int:
        return severity_rank(self.severity)


def severity_rank(severity: str) -> int:
    """0 for error, 1 for warning, 2 for info, 3 for anything else (sorted last)."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else len(SEVERITIES)


@dataclass
class View:
    """A Report or a bare Trace, read once into what the renderers need."""

    trace: Trace
    findings: list[FindingView] | None = None
    predicted: Trace | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def is_report(self) -> bool:
        return self.findings is not None

    def worst_by_layer(self) -> dict[str, str]:
        """Layer name -> the worst severity among the findings that name it."""
        out: dict[str, str] = {}
        for f in self.findings or []:
            if f.layer is None:
                continue
            current = out.get(f.layer)
            if current is None or f.rank < severity_rank(current):
                out[f.layer] = f.severity
        return out


def as_view(obj: Any, predicted: Trace | None = None) -> View:
    """Read a diagnose ``Report`` (anything with ``.trace`` and ``.findings``) or a :class:`Trace`.

    ``predicted`` overrides the report's own predicted trace when given.
    """
    if predicted is not None and not isinstance(predicted, Trace):
        raise SignalpropError(
            f"predicted must be a signalprop Trace (from sp.predict), got {type(predicted).__name__}; "
            "pass predicted=sp.predict(model, input_shape) or leave it out"
        )
    if isinstance(obj, Trace):
        return View(trace=obj, predicted=predicted, meta=dict(obj.meta))
    trace = getattr(obj, "trace", None)
    findings = getattr(obj, "findings", None)
    if not isinstance(trace, Trace) or findings is None:
        raise SignalpropError(
            f"cannot render a {type(obj).__name__}: expected a signalprop Report (from sp.diagnose) or a "
            "Trace (from sp.measure or sp.predict); read a saved one back with sp.Trace.from_json(path)"
        )
    report_predicted = getattr(obj, "predicted", None)
    if report_predicted is not None and not isinstance(report_predicted, Trace):
        raise SignalpropError(
            f"the report's predicted field holds a {type(report_predicted).__name__}, not a Trace; "
            "build the report with predicted=sp.predict(...) or None"
        )
    meta = dict(trace.meta)
    meta.update(dict(getattr(obj, "meta", None) or {}))
    return View(
        trace=trace,
        findings=read_findings(findings),
        predicted=predicted if predicted is not None else report_predicted,
        meta=meta,
    )


def read_findings(findings: Iterable[Any]) -> list[FindingView]:
    """Findings as :class:`FindingView`, worst severity first (stable within a severity)."""
    out: list[FindingView] = []
    for i, f in enumerate(findings):
        try:
            kind, severity, message = f.kind, f.severity, f.message
        except AttributeError as exc:
            raise SignalpropError(
                f"finding #{i} ({type(f).__name__}) lacks {exc.name!r}: a finding needs kind, severity, "
                "layer, message and fix, as sp.Finding has"
            ) from None
        layer = getattr(f, "layer", None)
        fix = getattr(f, "fix", None)
        out.append(
            FindingView(
                kind=str(kind),
                severity=str(severity).lower(),
                layer=None if layer is None or str(layer) == "" else str(layer),
                message=str(message),
                fix="" if fix is None else str(fix),
            )
        )
    return sorted(out, key=lambda f: f.rank)


def check_layers_choice(layers: str) -> None:
    if layers not in LAYER_CHOICES:
        raise SignalpropError(
            f"layers={layers!r} is not a choice; use 'auto' (weight layers when the trace has any, else "
            "all), 'all' (every module call) or 'weight' (Linear, Conv, ... only)"
        )


def select_layers(trace: Trace, layers: str) -> list[LayerStats]:
    """The layers to draw: every call (``"all"``), weight layers (``"weight"``), or ``"auto"``.

    ``"auto"`` picks the weight layers when there are any: their outputs are what He's formula and the
    initialization schemes speak about, and an activation after every one of them would draw a zigzag.
    """
    check_layers_choice(layers)
    if layers == "all":
        return list(trace)
    chosen = [x for x in trace if x.weight_layer]
    if layers == "weight" or chosen:
        return chosen
    return list(trace)


def union_names(name_lists: Sequence[Sequence[str]]) -> list[str]:
    """Every name once, in an order that keeps each list's own order wherever the lists agree.

    A stable topological merge: name ``a`` goes before ``b`` when some list has ``a`` right before ``b``;
    among names free to go next, the one seen first wins. Lists that contradict each other (a cycle)
    fall back to first-seen order for the names involved.
    """
    first_seen: dict[str, int] = {}
    after: dict[str, set[str]] = {}
    for names in name_lists:
        for name in names:
            first_seen.setdefault(name, len(first_seen))
            after.setdefault(name, set())
        for a, b in zip(names[:-1], names[1:]):
            if a != b:
                after[a].add(b)
    indegree = {name: 0 for name in first_seen}
    for succ in after.values():
        for b in succ:
            indegree[b] += 1
    ready = [(first_seen[n], n) for n, d in indegree.items() if d == 0]
    heapq.heapify(ready)
    unplaced = iter(first_seen)  # for cycles: the earliest-seen name not placed yet
    order: list[str] = []
    placed: set[str] = set()
    while len(order) < len(first_seen):
        if ready:
            _, name = heapq.heappop(ready)
            if name in placed:
                continue
        else:
            name = next(n for n in unplaced if n not in placed)
        order.append(name)
        placed.add(name)
        for b in after[name]:
            indegree[b] -= 1
            if indegree[b] == 0 and b not in placed:
                heapq.heappush(ready, (first_seen[b], b))
    return order


def fmt(x: float | None) -> str:
    """A number in 3 significant digits; ``-`` for unknown (nan or missing), ``inf``/``-inf`` as such."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.3g}"


def fmt_pct(frac: float | None) -> str:
    """A fraction as a percentage (``0.5`` -> ``50%``), keeping small nonzero values visible."""
    if frac is None or math.isnan(frac):
        return "-"
    pct = 100.0 * frac
    if pct == 0:
        return "0%"
    if pct < 0.1:
        return f"{pct:.1g}%"
    if pct < 10:
        return f"{pct:.2g}%"
    return f"{pct:.0f}%"


def fmt_meta(value: Any) -> str:
    """A meta value for display: numbers via :func:`fmt`, dicts as ``key: value`` pairs, lists in brackets."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return str(value)
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}: {fmt_meta(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt_meta(v) for v in value) + "]"
    return str(value)


def fmt_shape(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape) if shape else "-"


def std_band(stats: Stats | None) -> tuple[float, float] | None:
    """The 90% band on the std: the square root of ``var_band`` (the band is on the variance)."""
    if stats is None or stats.var_band is None:
        return None
    lo, hi = stats.var_band
    return (_sqrt(lo), _sqrt(hi))


def fmt_band(band: tuple[float, float] | None) -> str:
    if band is None:
        return "-"
    return f"{fmt(band[0])} - {fmt(band[1])}"


def short_name(name: str, width: int = 32) -> str:
    """A layer name cut in the middle to ``width`` characters, keeping its start and its end."""
    if len(name) <= width:
        return name
    keep = width - 1
    head = keep // 2
    return name[:head] + "\u2026" + name[len(name) - (keep - head) :]


def pick_rows(n: int, keep: Iterable[int], max_rows: int | None) -> list[int | None]:
    """Row indices to show when at most ``max_rows`` fit: head, tail and every index in ``keep``.

    ``None`` entries mark gaps ("... k rows ..."). Rows named by a finding are always kept, even past
    ``max_rows``: hiding the layer a finding is about would hide the point.
    """
    if max_rows is None or n <= max_rows:
        return list(range(n))
    if max_rows < 2:
        raise SignalpropError(f"max_rows must be at least 2 (or None for every row), got {max_rows}")
    head = (max_rows + 1) // 2
    tail = max_rows - head
    shown = sorted(set(range(head)) | set(range(n - tail, n)) | {i for i in keep if 0 <= i < n})
    out: list[int | None] = []
    prev = -1
    for i in shown:
        if i > prev + 1:
            out.append(None)
        out.append(i)
        prev = i
    return out


def stats_value(stats: Stats | None, name: str) -> float:
    """A field of a Stats, nan when the Stats is missing (no backward pass)."""
    if stats is None:
        return float("nan")
    return float(getattr(stats, name))


def layer_map(trace: Trace | None) -> Mapping[str, LayerStats]:
    if trace is None:
        return {}
    return {x.name: x for x in trace}


def _sqrt(v: float) -> float:
    if math.isnan(v) or v < 0:
        return float("nan")
    return math.sqrt(v)


# ---- the per-layer table, as data (rich and HTML both render this) -------------------------------------


@dataclass(frozen=True)
class Row:
    """One table row: the layer's position in the trace, its cells, and how to highlight it."""

    index: int
    name: str
    cells: tuple[str, ...]
    severity: str | None = None
    nonfinite: bool = False


Gap = int
"""A run of rows left out (its length), drawn as one "... k layers ..." line."""


def layer_table(view: View, *, layers: str = "all", max_rows: int | None = None) -> tuple[list[str], list[Row | Gap]]:
    """Header and rows of the per-layer table of a Report or Trace.

    Columns: position, name, kind, shape, forward std, mean, absmax, zero %, gradient std; a non-finite
    column when some layer holds inf/nan; the predicted std and its 90% band (``sqrt(var_band)``) when a
    predicted trace is there, matched by layer name.
    """
    chosen = select_layers(view.trace, layers)
    any_nonfinite = any(
        stats_value(x.fwd, "nonfinite_frac") > 0 or stats_value(x.bwd, "nonfinite_frac") > 0 for x in chosen
    )
    predicted = layer_map(view.predicted)
    header = ["#", "layer", "kind", "shape", "fwd std", "fwd mean", "absmax", "zero %", "grad std"]
    if any_nonfinite:
        header.append("non-finite fwd / grad")
    if predicted:
        header += ["predicted std", "90% band (one net)"]
    worst = view.worst_by_layer()
    position = {x.name: i for i, x in enumerate(view.trace)}
    rows: list[Row] = []
    for x in chosen:
        cells = [
            str(position[x.name]),
            x.name,
            x.kind,
            fmt_shape(x.shape),
            fmt(x.fwd.std),
            fmt(x.fwd.mean),
            fmt(x.fwd.absmax),
            fmt_pct(x.fwd.zero_frac),
            fmt(stats_value(x.bwd, "std")),
        ]
        nonfinite = stats_value(x.fwd, "nonfinite_frac") > 0 or stats_value(x.bwd, "nonfinite_frac") > 0
        if any_nonfinite:
            cells.append(f"{fmt_pct(x.fwd.nonfinite_frac)} / {fmt_pct(stats_value(x.bwd, 'nonfinite_frac'))}")
        if predicted:
            p = predicted.get(x.name)
            cells += [fmt(p.fwd.std) if p else "-", fmt_band(std_band(p.fwd)) if p else "-"]
        rows.append(Row(position[x.name], x.name, tuple(cells), worst.get(x.name), nonfinite))
    keep = [i for i, r in enumerate(rows) if r.severity is not None or r.nonfinite]
    return header, _with_gaps(rows, keep, max_rows)


def traces_table(
    traces: Mapping[str, Trace],
    *,
    extra: Mapping[str, Trace | Mapping[str, Any]] | None = None,
    layers: str = "auto",
    grad: bool = True,
    max_rows: int | None = None,
) -> tuple[list[str], list[Row | Gap]]:
    """Header and rows comparing several traces side by side: per label a fwd std (and grad std) column.

    Rows are the union of the traces' layer names (:func:`union_names`); a layer missing from a trace
    shows ``-``. ``extra`` adds one column per entry: a Trace contributes its forward std, a mapping
    its value per layer name (numbers are formatted, strings shown as they are).
    """
    if not isinstance(traces, Mapping) or not traces:
        raise SignalpropError(
            "traces must be a non-empty dict of label -> Trace, e.g. {'he': sp.measure(m1, x), "
            f"'glorot': sp.measure(m2, x)}}; got {type(traces).__name__}"
        )
    for label, t in list(traces.items()) + list((extra or {}).items()):
        if not isinstance(t, Trace | Mapping):
            raise SignalpropError(
                f"entry {label!r} is a {type(t).__name__}; a column takes a Trace or a mapping of layer "
                "name -> value"
            )
    chosen = {label: select_layers(t, layers) for label, t in traces.items()}
    names = union_names([[x.name for x in ls] for ls in chosen.values()])
    maps = {label: {x.name: x for x in ls} for label, ls in chosen.items()}
    header = ["#", "layer", "kind"]
    for label in traces:
        header.append(f"{label} fwd std")
        if grad:
            header.append(f"{label} grad std")
    extra = dict(extra or {})
    header += list(extra)
    rows: list[Row] = []
    for i, name in enumerate(names):
        first = next(m[name] for m in maps.values() if name in m)
        cells = [str(i), name, first.kind]
        nonfinite = False
        for label in traces:
            x = maps[label].get(name)
            cells.append(fmt(x.fwd.std) if x else "-")
            if grad:
                cells.append(fmt(stats_value(x.bwd, "std")) if x else "-")
            if x is not None:
                nonfinite = nonfinite or x.fwd.nonfinite_frac > 0 or stats_value(x.bwd, "nonfinite_frac") > 0
        for column in extra.values():
            if isinstance(column, Trace):
                layer = layer_map(column).get(name)
                cells.append(fmt(layer.fwd.std) if layer else "-")
            else:
                v = column.get(name)
                cells.append(v if isinstance(v, str) else fmt(None if v is None else float(v)))
        rows.append(Row(i, name, tuple(cells), None, nonfinite))
    return header, _with_gaps(rows, [i for i, r in enumerate(rows) if r.nonfinite], max_rows)


def _with_gaps(rows: list[Row], keep: list[int], max_rows: int | None) -> list[Row | Gap]:
    picked = pick_rows(len(rows), keep, max_rows)
    out: list[Row | Gap] = []
    for j, i in enumerate(picked):
        if i is None:
            before, after = picked[j - 1], picked[j + 1]
            assert before is not None and after is not None
            out.append(after - before - 1)
        else:
            out.append(rows[i])
    return out


def check_figure_path(path: str | Path) -> Path:
    """The path a figure is written to: ``.png`` added when there is no suffix; an unknown format is an error."""
    if not isinstance(path, str | Path):
        raise SignalpropError(f"path must be a str or pathlib.Path, got {type(path).__name__}")
    p = Path(path)
    if not p.suffix:
        p = p.with_suffix(".png")
    supported = {"png", "pdf", "svg", "jpg", "jpeg", "webp", "eps", "ps", "tif", "tiff"}
    if p.suffix.lstrip(".").lower() not in supported:
        raise SignalpropError(
            f"cannot write a figure as {p.suffix!r} ({p}); use one of "
            f"{', '.join('.' + s for s in sorted(supported))}"
        )
    return p
