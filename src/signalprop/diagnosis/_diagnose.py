"""Diagnose: rules over a Trace -> Findings -> a Report you can print, plot, save and read back.

``sp.diagnose(model, inputs)`` measures the model (``sp.measure``), predicts it from its weights where it
can (``sp.predict``, whose Stats carry the finite-width band of Hanin & Nica 2019), takes a few facts a
trace cannot hold in one extra no-grad forward pass (units dead for the whole batch, saturated fractions,
subnormal fractions) and runs the rules of :data:`RULES` over the result. ``diagnose_trace`` runs the same
rules on a saved or predicted trace. The model is left exactly as found.

Default rule for exploding/vanishing (docs/diagnose.md): judged on the network's body, the weight layers before the
global pooling or flatten that ends the feature extractor; some body weight layer's output std more than
``factor`` x above (or below) the first one's, and for gradients the same against the last body weight
layer. He et al. (2015, Eq. 10) show why it compounds: for ReLU nets
``Var[y_L] = Var[y_1] prod_{l=2..L} (1/2 n_l Var[w_l])``, so a per-layer factor c becomes c^L.

Example::

    import torch, signalprop as sp
    model = sp.models.plain_cnn(depth=20, width=16)
    torch.nn.init.normal_(model.body[0].weight, std=1.0)
    report = sp.diagnose(model, torch.randn(8, 3, 16, 16))
    report.ok            # False
    print(report.summary())
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .._errors import SignalpropError
from .._inputs import first_tensor
from .._state import preserving
from ..trace import Trace, _jsonable, dump_json
from ._findings import KINDS, SEVERITIES, Finding
from ._rules import RULES, THRESHOLDS, Rule, RuleContext, run_rules

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

__all__ = ["KINDS", "RULES", "SEVERITIES", "THRESHOLDS", "Finding", "Report", "diagnose", "diagnose_trace"]

_FORMAT = "signalprop.report/1"


@dataclass
class Report:
    """The findings of one diagnosis, the trace they were read from, and the prediction if any.

    ``ok`` is False when any finding is a warning or an error. Rendering delegates to
    :mod:`signalprop.report` (rich table, matplotlib plots, one self-contained HTML file); ``to_json`` and
    :meth:`from_json` round-trip findings, trace, prediction and meta.

    Attributes:
        findings: What the rules found, worst first.
        trace: The trace judged (measured, saved or predicted), annotated.
        predicted: The prediction from the weights, when there is one.
        meta: The verdict's settings and notes (``meta["notes"]``: what could not be judged, and why).

    Examples:
        >>> import torch, signalprop as sp
        >>> net = sp.init.he_(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)))
        >>> report = sp.diagnose_trace(sp.measure(net, torch.randn(32, 16)))
        >>> report.ok, Report.from_json(report.to_json()).ok
        (True, True)
    """

    findings: list[Finding]
    trace: Trace
    predicted: Trace | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no finding is a warning or an error (info findings are fine)."""
        return not any(f.severity in ("warning", "error") for f in self.findings)

    def by_kind(self, kind: str) -> list[Finding]:
        """The findings of one kind (``"exploding"``, ``"dead_units"``, ...)."""
        if kind not in KINDS:
            raise SignalpropError(f"unknown finding kind {kind!r}; the kinds are: {', '.join(KINDS)}")
        return [f for f in self.findings if f.kind == kind]

    @property
    def kinds(self) -> set[str]:
        """The kinds of the findings."""
        return {f.kind for f in self.findings}

    def summary(self) -> str:
        """Plain text: one line for the verdict, then each finding with its fix (no rich needed)."""
        n = len(self.trace)
        head = (
            f"signalprop: {n} module calls, no problems found"
            if not self.findings
            else f"signalprop: {n} module calls, {len(self.findings)} finding(s)"
            + ("" if not self.ok else " (info only)")
        )
        return "\n".join([head, *(str(f) for f in self.findings)])

    def __str__(self) -> str:
        return self.summary()

    def table(self, console: Console | None = None, **kwargs: Any) -> Table:
        """Print the findings and the per-layer table (rich) to ``console`` (a new one when None); return
        the ``rich.table.Table``. Keyword arguments go to :func:`signalprop.report.table.render`."""
        from rich.console import Console

        from ..report.table import render

        return render(self, console=console if console is not None else Console(), **kwargs)

    def plot(self, path: str | Path) -> Path:
        """Draw forward and gradient std per layer (measured and predicted, the band shaded) to ``path``."""
        from ..report.plots import plot_report

        plot_report(self, path)
        return Path(path)

    def to_html(self, path: str | Path) -> Path:
        """Write one self-contained HTML file: findings first, the table, the plots (images embedded)."""
        from ..report.html import write_html

        write_html(self, path)
        return Path(path)

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data (format ``signalprop.report/1``)."""
        return {
            "format": _FORMAT,
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
            "trace": self.trace.to_dict(),
            "predicted": self.predicted.to_dict() if self.predicted is not None else None,
            "meta": _jsonable(self.meta),
        }

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 1) -> str:
        """Serialize to JSON (nan as null, inf as a string); write it to ``path`` when given."""
        return dump_json(self.to_dict(), path, indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Report:
        """The report :meth:`to_dict` wrote."""
        if str(d.get("format", "")).split("/")[0] != "signalprop.report":
            raise SignalpropError(
                "not a signalprop report: expected a dict with format 'signalprop.report/1' (as written by "
                "Report.to_json); for a bare trace use sp.Trace.from_json"
            )
        pred = d.get("predicted")
        return cls(
            findings=[Finding.from_dict(f) for f in d.get("findings", [])],
            trace=Trace.from_dict(d["trace"]),
            predicted=Trace.from_dict(pred) if pred is not None else None,
            meta=dict(d.get("meta") or {}),
        )

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Report:
        """Read a Report from a JSON string or a file path written by :meth:`to_json`."""
        s = str(text_or_path)
        if not s.lstrip().startswith("{"):
            p = Path(s)
            if not p.is_file():
                raise SignalpropError(f"no such report file: {s}; pass a path written by Report.to_json")
            s = p.read_text()
        try:
            d = json.loads(s)
        except json.JSONDecodeError as exc:
            raise SignalpropError(f"the report is not valid JSON ({exc}); was it written by Report.to_json?") from None
        return cls.from_dict(d)


def _check_factor(factor: float) -> float:
    if not isinstance(factor, int | float) or not math.isfinite(factor) or factor <= 1:
        raise SignalpropError(
            f"factor must be a finite number above 1 (how many times above or below the reference layer's std "
            f"a layer may drift), got {factor!r}; the default is 10"
        )
    return float(factor)


def _thresholds(overrides: Mapping[str, float] | None) -> dict[str, float]:
    th = dict(THRESHOLDS)
    for k, v in (overrides or {}).items():
        if k not in th:
            raise SignalpropError(f"unknown threshold {k!r}; the thresholds are: {', '.join(sorted(th))}")
        th[k] = float(v)
    return th


def diagnose_trace(
    trace: Trace,
    *,
    model: nn.Module | None = None,
    predicted: Trace | None = None,
    factor: float = 10.0,
    input_stats: Mapping[str, float] | None = None,
    thresholds: Mapping[str, float] | None = None,
    rules: Mapping[str, Rule] | None = None,
) -> Report:
    """Run the rules over a trace (measured, saved or predicted) and return the Report.

    ``model`` (optional) supplies what the trace lacks: each weight layer's fans, the activation modules,
    the normalization gains, and the plan ``sp.fix.auto_init_(model)`` would apply (module order, no
    inputs), which the fix texts quote; ``predicted`` the finite-width band; ``rules`` replaces
    :data:`RULES`. Never raises on non-finite or huge statistics; raises :class:`SignalpropError` for a
    trace measured on an empty batch (it holds no values to judge).

    Args:
        trace: The trace to judge.
        model: The model it was measured on, for fans, activations, norm gains and the fix plan.
        predicted: A prediction (:func:`signalprop.predict`) for the finite-width band.
        factor: How many times a layer's std may drift from the reference layer's before it is a finding
            (beyond ``factor**2``: an error).
        input_stats: Statistics of the inputs (``mean``, ``std``, ...), when known.
        thresholds: Overrides of :data:`THRESHOLDS` by name.
        rules: Rules to run instead of :data:`RULES`.

    Returns:
        The :class:`Report`.

    Raises:
        SignalpropError: ``trace`` is not a Trace, is empty, or a setting is out of range.

    Examples:
        Weights of std 1 in a 64-wide ReLU net multiply the std by about ``sqrt(64 / 2) = 5.7`` per layer
        (He et al. 2015, Eq. 10):

        >>> import torch, signalprop as sp
        >>> net = sp.models.mlp(6, 64, "relu")
        >>> with torch.no_grad():
        ...     _ = [m.weight.normal_(0, 1) for m in net if isinstance(m, nn.Linear)]
        >>> report = diagnose_trace(sp.measure(net, torch.randn(64, 64)), model=net)
        >>> report.ok, "exploding" in report.kinds
        (False, True)
    """
    if not isinstance(trace, Trace):
        raise SignalpropError(
            f"diagnose_trace needs a signalprop Trace (from sp.measure, sp.predict or Trace.from_json), got "
            f"{type(trace).__name__}"
        )
    if predicted is not None and not isinstance(predicted, Trace):
        raise SignalpropError(
            f"predicted must be a Trace from sp.predict, got {type(predicted).__name__}; or leave it out"
        )
    _check_not_empty(trace)
    from ._probe import annotate

    notes: list[str] = []
    plan = None
    if model is not None:
        trace = annotate(trace, model, {})
        plan = fix_plan(model, None, None, notes)
    return _judge(trace, factor, predicted, dict(input_stats or {}), thresholds, rules, plan,
                  "sp.fix.auto_init_(model)", notes)


def _judge(
    trace: Trace,
    factor: float,
    predicted: Trace | None,
    in_stats: dict[str, float],
    thresholds: Mapping[str, float] | None,
    rules: Mapping[str, Rule] | None,
    plan: dict[str, Any] | None,
    fix_call: str,
    notes: list[str],
) -> Report:
    ctx = RuleContext(
        factor=_check_factor(factor),
        predicted=predicted,
        input=in_stats,
        thresholds=_thresholds(thresholds),
        plan=plan,
        fix_call=fix_call,
    )
    findings = run_rules(trace, ctx, dict(rules) if rules is not None else None)
    meta: dict[str, Any] = {"factor": ctx.factor, "source": trace.source}
    if ctx.input:
        meta["input"] = ctx.input
    if notes or ctx.notes:
        meta["notes"] = notes + ctx.notes
    return Report(findings, trace, predicted, meta)


def _check_not_empty(trace: Trace) -> None:
    """An empty batch leaves nothing to judge (every statistic NaN): say so instead of reporting 'ok'."""
    batch = trace.meta.get("batch_size")
    nothing = all(x.fwd.numel == 0 and not math.isfinite(x.fwd.std) for x in trace)
    empty = batch == 0 or (trace.source == "measured" and len(trace) > 0 and nothing)
    if empty:
        raise SignalpropError(
            "this trace was measured on an empty batch (no values in any layer's output), so there is nothing "
            "to judge; measure a batch of 2 or more samples (16 or more to judge dead units)"
        )


@preserving  # one snapshot for measure, probe, annotate's weight reads and predict's capture
def diagnose(
    model: nn.Module,
    inputs: Any,
    *,
    factor: float = 10.0,
    predicted: bool | Trace = True,
    thresholds: Mapping[str, float] | None = None,
    rules: Mapping[str, Rule] | None = None,
    graph: Any = None,
    **measure_kwargs: Any,
) -> Report:
    """Measure ``model`` on ``inputs``, compare with the prediction, and report what is out of range.

    ``inputs`` is a tensor, a tuple (positional) or a dict (keyword arguments), as for ``sp.measure``;
    ``measure_kwargs`` go to ``sp.measure`` (``backward``, ``loss_fn``, ``modules``, ...). ``predicted``:
    True predicts from the weights with ``sp.predict`` when the input is one floating tensor (a failure is
    noted in ``report.meta["notes"]``, never raised), False skips it, a Trace is used as given.
    ``graph``: a ``signalprop.graph.capture`` result to reuse (it reads weights live), saving the capture.
    ``factor``: how far (times) a layer's std may drift from the reference layer's before it is a finding;
    beyond ``factor**2`` it is an error.

    The fix texts quote :func:`signalprop.fix.plan` for ``sp.fix.auto_init_(model, example_inputs=inputs)``,
    computed once per call from the same captured graph that ``sp.predict`` uses; each exploding/vanishing
    finding's ``data`` carries that layer's ``fix_scheme`` and ``fix_std``. Real forward passes: the
    measured one (a second, in float64, when some value is not finite), the probe's, and one more for the
    plan when a tanh-like chain needs its input's second moment; the capture itself traces symbolically.

    The model is left as found (parameters, buffers, grads, modes, hooks, RNG), and the very models this
    exists to explain (inf, NaN, 1e30 activations) give a Report, not an exception. An empty batch raises
    :class:`SignalpropError`; a batch of one sample judges what it can and says what it cannot.

    Args:
        model: The model to diagnose.
        inputs: One batch: a tensor, a tuple (positional) or a dict (keyword arguments).
        factor: How many times a layer's std may drift from the reference layer's (default 10).
        predicted: True predicts from the weights, False skips it, a Trace is used as given.
        thresholds: Overrides of :data:`THRESHOLDS` by name.
        rules: Rules to run instead of :data:`RULES`.
        graph: A ``signalprop.graph.capture`` result to reuse.
        **measure_kwargs: Passed to :func:`signalprop.measure`.

    Returns:
        The :class:`Report`: ``ok``, the findings with their fixes, the measured and predicted traces.

    Raises:
        SignalpropError: ``model`` is not a module, the batch is empty, or a setting is out of range.

    Examples:
        Weights of std 1 in a 64-wide ReLU net: the forward std grows about ``sqrt(64 / 2) = 5.7`` per
        layer (He et al. 2015, Eq. 10); the fix quotes the readout's std, ``sqrt(1 / 64)``:

        >>> import torch, signalprop as sp
        >>> net = sp.models.mlp(10, 64, "relu")
        >>> with torch.no_grad():
        ...     _ = [m.weight.normal_(0, 1) for m in net if isinstance(m, nn.Linear)]
        >>> report = diagnose(net, torch.randn(64, 64, generator=torch.Generator().manual_seed(0)))
        >>> report.ok, sorted(f.kind for f in report.findings if f.severity == "error")
        (False, ['exploding', 'grad_exploding'])
        >>> report.by_kind("exploding")[0].data["fix_std"]
        0.125
    """
    if not isinstance(model, nn.Module):
        raise SignalpropError(f"diagnose needs an nn.Module, got {type(model).__name__}")
    factor = _check_factor(factor)
    from ..measurement._measure import measure
    from ._probe import annotate, input_stats, probe, untrained_norms_in_eval

    x = first_tensor(inputs)
    if x is not None and x.numel() == 0:
        raise SignalpropError(
            f"diagnose got an empty batch (input shape {tuple(x.shape)}): there are no values to judge; pass a "
            "batch of 2 or more samples (16 or more to judge dead units)"
        )
    trace = measure(model, inputs, **measure_kwargs)
    _check_not_empty(trace)
    notes: list[str] = []
    facts: dict[str, dict[str, Any]] = {}
    attention: dict[str, dict[str, float]] = {}
    try:
        facts = probe(model, inputs, trace, attention)
    except Exception as exc:  # the extra facts are optional; the note says why they are missing
        notes.append(f"probe pass failed ({type(exc).__name__}: {exc}); dead units judged from zero fractions")
    stale = untrained_norms_in_eval(model)
    if stale:
        notes.append(
            f"{len(stale)} BatchNorm layers ({stale[0]}, ...) are in eval mode with running statistics never "
            "updated (mean 0, var 1): they do not normalize, so this is not the network training sees; "
            "call model.train() before diagnosing an untrained model"
        )
    in_stats = input_stats(inputs)
    g = graph if graph is not None else _capture(model, inputs, notes)
    pred: Trace | None = predicted if isinstance(predicted, Trace) else None
    if predicted is True and g is not None:
        pred = _predict(model, inputs, notes, g)
    activations = _activation_names(g)
    for name in _pooled_calls(g):
        facts.setdefault(name, {})["pooled"] = True
    trace = annotate(trace, model, facts, activations)
    if attention:
        trace = Trace(list(trace), source=trace.source, meta={**trace.meta, "attention": attention})
    plan = fix_plan(model, inputs, g, notes)
    return _judge(trace, factor, pred, in_stats, thresholds, rules, plan,
                  "sp.fix.auto_init_(model, example_inputs=inputs)", notes)


def _capture(model: nn.Module, inputs: Any, notes: list[str]) -> Any:
    """One capture, from the inputs themselves, for the prediction and the plan; a failure becomes a note."""
    from ..graph import CaptureWarning, capture

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CaptureWarning)
        try:
            g = capture(model, inputs)
        except Exception as exc:  # diagnose goes on without the graph: no prediction, no plan
            notes.append(f"no graph capture ({type(exc).__name__}: {exc}): no prediction and no fix plan")
            g = None
    notes.extend(f"capture: {w.message}" for w in caught if issubclass(w.category, CaptureWarning))
    return g


def _activation_names(graph: Any) -> dict[str, str] | None:
    """Weight-layer call -> the activation after it, by name ("relu", "leaky_relu(0.2)", "linear")."""
    if graph is None:
        return None
    from .. import theory

    return {k: theory.activation_name(v) for k, v in graph.activations.items()}


_POOLS = ("mean", "amax", "max", "sum", "adaptive_avg_pool", "adaptive_max_pool", "avg_pool", "max_pool")


def _pooled_calls(graph: Any) -> list[str]:
    """Module calls whose output a function outside any module pools over all its positions (``x.mean((2,
    3))``, ``F.adaptive_avg_pool2d(x, 1)``, ``x.amax(1)`` over tokens): the batch and one dimension kept, the
    per-sample size cut at least 4x. Named by the last module call before the pooling."""
    if graph is None:
        return []
    out = []
    nodes = graph.nodes
    for n in nodes:
        if n.op != "fn" or not n.name.startswith(_POOLS) or not n.inputs or n.shape is None:
            continue
        src = nodes[n.inputs[0]].shape if n.inputs[0] is not None else None
        if src is None or len(src) < 3 or not n.shape or n.shape[0] != src[0]:
            continue
        kept = math.prod(n.shape[1:]) if len(n.shape) > 1 else 1
        if len(n.shape) > 2 and any(d != 1 for d in n.shape[2:]):
            continue
        if kept * 4 > math.prod(src[1:]):
            continue
        before = [c for c in graph.calls if c.node < n.index and nodes[c.node].op == "call"]
        if before:
            out.append(before[-1].name)
    return out


def fix_plan(model: nn.Module, inputs: Any, graph: Any, notes: list[str]) -> dict[str, Any] | None:
    """Layer name -> the :class:`signalprop.fix.LayerPlan` that ``sp.fix.auto_init_`` applies with these
    ``inputs`` as its ``example_inputs`` (module order when None), read from ``graph`` when given: the one
    plan both diagnose's fix texts and the fix itself use. A failure becomes a note and None."""
    from ..fix.plan import plan

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            p = plan(model, example_inputs=inputs, graph=graph)
        except Exception as exc:  # the fix texts then name the formula instead of the plan
            notes.append(f"no fix plan ({type(exc).__name__}: {exc}); the fixes name the textbook formula")
            return None
    notes.extend(f"fix plan: {w.message}" for w in caught)
    return {step.layer: step for step in p}


def _predict(model: nn.Module, inputs: Any, notes: list[str], graph: Any = None) -> Trace | None:
    """sp.predict on the same inputs (integer ones as given, floating ones with their own mean square, the
    band for this batch); warnings and failures become notes."""
    try:
        from ..prediction import predict
    except ImportError as exc:
        notes.append(f"no prediction: {exc}")
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pred = predict(model, inputs=inputs, graph=graph)
        except Exception as exc:  # a model predict cannot capture: diagnose goes on without the band
            notes.append(f"no prediction: {type(exc).__name__}: {exc}")
            pred = None
    notes.extend(f"predict: {w.message}" for w in caught)
    return pred
