"""The one currency of signalprop: a Trace is an ordered list of per-layer statistics.

Measured and predicted traces share this schema, so every renderer and every diagnose rule works on both.
Unknown numbers (a predicted absmax, say) are ``nan``; JSON writes them as ``null`` and reads them back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, overload

from ._errors import SignalpropError

NAN = float("nan")


@dataclass(frozen=True)
class Histogram:
    """Counts of values in bins; ``edges`` has one more entry than ``counts``.

    Attributes:
        edges: The bin edges, increasing; bin i is [edges[i], edges[i + 1]).
        counts: The number of values in each bin.

    Examples:
        >>> h = Histogram(edges=(0.0, 0.5, 1.0), counts=(1, 2))
        >>> sum(h.counts), Histogram.from_dict(h.to_dict()) == h
        (3, True)
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """The histogram as JSON-safe lists, ``{"edges": [...], "counts": [...]}``."""
        return {"edges": list(self.edges), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        """The histogram :meth:`to_dict` wrote."""
        return cls(tuple(float(e) for e in d["edges"]), tuple(int(c) for c in d["counts"]))


@dataclass(frozen=True)
class Stats:
    """Summary statistics of one tensor (a layer's output, or the gradient with respect to it).

    ``var`` is the population variance over all elements; ``rms = sqrt(mean^2 + var)``.
    ``var_band`` is only set on predictions: the (lo, hi) interval in which one network of that finite
    width lands 90% of the time (Hanin & Nica 2019). ``chan_sq_mean`` and ``chan_var`` are the average over
    channels of each channel's squared mean and variance (Brock et al. 2021, Signal Propagation Plots).
    Unknown numbers are ``nan``.

    Attributes:
        mean: The mean of the elements.
        var: Their population variance.
        std: sqrt(var).
        rms: The root mean square, sqrt(mean^2 + var).
        absmax: The largest absolute value.
        zero_frac: The fraction of exact zeros (of a sample of the elements on large tensors).
        nonfinite_frac: The fraction of inf/nan elements; the moments cover the finite ones.
        numel: The number of elements.
        var_band: The 90% band of a finite-width network's variance (predictions only), or None.
        chan_sq_mean: The average over channels of each channel's squared mean.
        chan_var: The average over channels of each channel's variance.
        hist: A histogram of the values, when one was asked for.

    Examples:
        >>> s = Stats.from_moments(3.0, 16.0)
        >>> s.std, s.rms, s.finite
        (4.0, 5.0, True)
    """

    mean: float = NAN
    var: float = NAN
    std: float = NAN
    rms: float = NAN
    absmax: float = NAN
    zero_frac: float = NAN
    nonfinite_frac: float = NAN
    numel: int = 0
    var_band: tuple[float, float] | None = None
    chan_sq_mean: float = NAN
    chan_var: float = NAN
    hist: Histogram | None = None

    @classmethod
    def from_moments(
        cls,
        mean: float,
        var: float,
        *,
        var_band: tuple[float, float] | None = None,
        **extra: Any,
    ) -> Stats:
        """Stats known only through mean and variance (predictions): std and rms follow, the rest is nan.

        Args:
            mean: The mean.
            var: The variance (a negative one from round-off is clipped to 0).
            var_band: The 90% band of the variance, for a finite-width prediction.
            **extra: Other fields, e.g. ``numel``.

        Returns:
            The Stats.

        Examples:
            >>> Stats.from_moments(0.0, 4.0).std
            2.0
        """
        var = max(float(var), 0.0) if math.isfinite(var) else float(var)
        return cls(
            mean=float(mean),
            var=var,
            std=math.sqrt(var) if var >= 0 else NAN,
            rms=math.sqrt(mean * mean + var) if math.isfinite(var) and var >= 0 else NAN,
            var_band=var_band,
            **extra,
        )

    @property
    def finite(self) -> bool:
        """True when no element was inf or nan (unknown counts as finite)."""
        return not (self.nonfinite_frac > 0)

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-safe values: nan becomes None, inf ``"inf"`` (the trace schema)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "hist":
                out[f.name] = v.to_dict() if v is not None else None
            elif f.name == "var_band":
                out[f.name] = [_num_out(x) for x in v] if v is not None else None
            else:
                out[f.name] = _num_out(v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        """The Stats :meth:`to_dict` wrote; missing fields take their defaults."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name == "hist":
                kw[f.name] = Histogram.from_dict(v) if v is not None else None
            elif f.name == "var_band":
                kw[f.name] = (_num_in(v[0]), _num_in(v[1])) if v is not None else None
            elif f.name == "numel":
                kw[f.name] = int(v)
            else:
                kw[f.name] = _num_in(v)
        return cls(**kw)


@dataclass(frozen=True)
class LayerStats:
    """Statistics of one module call: its output (``fwd``) and the gradient w.r.t. that output (``bwd``).

    ``name`` is the qualified module name from ``named_modules()`` (``#k`` for the k-th reuse, k >= 1);
    ``kind`` the module's class name; ``weight_layer`` is True for modules with a weight of their own that
    mixes inputs (Linear, Conv, ...), the layers that initialization schemes act on.

    Attributes:
        name: The qualified module name, ``#k`` appended for the k-th reuse.
        kind: The module's class name.
        fwd: Statistics of the output.
        bwd: Statistics of the gradient with respect to the output, or None.
        shape: The output's shape.
        dtype: The output's dtype, e.g. ``"float32"``.
        weight_layer: Whether the module is a weight layer (:func:`signalprop.layers.is_weight_layer`).
        meta: Free-form context, e.g. ``{"call": 1}`` for a reused module.

    Examples:
        >>> layer = LayerStats(name="fc", kind="Linear", fwd=Stats.from_moments(0.0, 1.0), weight_layer=True)
        >>> layer.fwd.std, LayerStats.from_dict(layer.to_dict()).name
        (1.0, 'fc')
    """

    name: str
    kind: str
    fwd: Stats
    bwd: Stats | None = None
    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    weight_layer: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The layer as JSON-safe values (the trace schema's layer entry)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "fwd": self.fwd.to_dict(),
            "bwd": self.bwd.to_dict() if self.bwd is not None else None,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "weight_layer": self.weight_layer,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerStats:
        """The layer :meth:`to_dict` wrote."""
        return cls(
            name=d["name"],
            kind=d["kind"],
            fwd=Stats.from_dict(d["fwd"]),
            bwd=Stats.from_dict(d["bwd"]) if d.get("bwd") is not None else None,
            shape=tuple(int(s) for s in d.get("shape", ())),
            dtype=d.get("dtype", "float32"),
            weight_layer=bool(d.get("weight_layer", False)),
            meta=dict(d.get("meta", {})),
        )


class Trace(Sequence[LayerStats]):
    """An ordered list of :class:`LayerStats`, one per module call, in execution order.

    ``source`` is ``"measured"`` or ``"predicted"``; ``meta`` holds free-form context (input shape,
    dtype, how the graph was captured, ...). Index by position or by layer name; a slice is a Trace.
    :func:`signalprop.measure` and :func:`signalprop.predict` return one.

    Args:
        layers: The layers, in execution order.
        source: ``"measured"`` or ``"predicted"``.
        meta: Free-form context, copied.

    Examples:
        >>> t = Trace([
        ...     LayerStats("fc", "Linear", Stats.from_moments(0.0, 2.0), weight_layer=True),
        ...     LayerStats("act", "ReLU", Stats.from_moments(0.5, 0.25)),
        ... ])
        >>> t.names, t["act"].fwd.std, len(t.weight_layers())
        (['fc', 'act'], 0.5, 1)
        >>> Trace.from_json(t.to_json()) == t
        True
    """

    def __init__(
        self,
        layers: Sequence[LayerStats] = (),
        *,
        source: str = "measured",
        meta: dict[str, Any] | None = None,
    ) -> None:
        self._layers: list[LayerStats] = list(layers)
        self.source = source
        self.meta: dict[str, Any] = dict(meta or {})

    @overload
    def __getitem__(self, key: int | str) -> LayerStats: ...
    @overload
    def __getitem__(self, key: slice) -> Trace: ...
    def __getitem__(self, key: int | str | slice) -> LayerStats | Trace:
        if isinstance(key, slice):
            return Trace(self._layers[key], source=self.source, meta=self.meta)
        if isinstance(key, str):
            for layer in self._layers:
                if layer.name == key:
                    return layer
            raise KeyError(f"no layer named {key!r} in this trace; names are: {', '.join(self.names[:20])}")
        return self._layers[key]

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[LayerStats]:
        return iter(self._layers)

    def __repr__(self) -> str:
        return f"Trace({len(self)} layers, source={self.source!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    @property
    def names(self) -> list[str]:
        """The layer names, in order."""
        return [layer.name for layer in self._layers]

    def weight_layers(self) -> Trace:
        """The sub-trace of weight layers (Linear, Conv, ...)."""
        return Trace([x for x in self._layers if x.weight_layer], source=self.source, meta=self.meta)

    def with_layers(self, layers: Sequence[LayerStats]) -> Trace:
        """A Trace of ``layers`` with this one's source and meta."""
        return Trace(layers, source=self.source, meta=self.meta)

    def replace_layer(self, index: int, **changes: Any) -> Trace:
        """A copy with the layer at ``index`` changed (``dataclasses.replace`` keywords, e.g. ``fwd=...``)."""
        layers = list(self._layers)
        layers[index] = replace(layers[index], **changes)
        return self.with_layers(layers)

    # ---- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The trace as JSON-safe values, format ``"signalprop.trace/1"``."""
        return {
            "format": "signalprop.trace/1",
            "source": self.source,
            "meta": _jsonable(self.meta),
            "layers": [layer.to_dict() for layer in self._layers],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        """The trace :meth:`to_dict` wrote; raises SignalpropError for a dict of another format."""
        if d.get("format", "").split("/")[0] != "signalprop.trace":
            raise SignalpropError(
                "not a signalprop trace: expected a dict with format 'signalprop.trace/1' "
                "(as written by Trace.to_json or Report.to_json)"
            )
        return cls(
            [LayerStats.from_dict(x) for x in d["layers"]],
            source=d.get("source", "measured"),
            meta=d.get("meta", {}),
        )

    def to_json(self, path: str | Path | None = None, *, indent: int | None = 1) -> str:
        """Serialize to JSON (nan and inf become null / strings); write it to ``path`` when given."""
        return dump_json(self.to_dict(), path, indent=indent)

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Trace:
        """Read a Trace from a JSON string or a file path."""
        s = str(text_or_path)
        if not s.lstrip().startswith("{"):
            s = Path(s).read_text()
        return cls.from_dict(json.loads(s))


def dump_json(data: dict[str, Any], path: str | Path | None = None, *, indent: int | None = 1) -> str:
    """``data`` (already JSON-safe: see ``to_dict``) as strict JSON text, also written to ``path`` when given.

    ``allow_nan=False``: a stray nan or inf raises instead of writing the non-standard ``NaN`` that other
    JSON readers reject; the ``to_dict`` methods turn them into null and ``"inf"`` first.

    Args:
        data: A JSON-safe dict.
        path: A file to write the text to.
        indent: JSON indentation; None for one line.

    Returns:
        The JSON text.

    Examples:
        >>> dump_json({"std": [1.0, None, "inf"]}, indent=None)
        '{"std": [1.0, null, "inf"]}'
    """
    text = json.dumps(data, indent=indent, allow_nan=False)
    if path is not None:
        Path(path).write_text(text)
    return text


def _num_out(v: Any) -> Any:
    if isinstance(v, float):
        if math.isnan(v):
            return None
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
    return v


def _num_in(v: Any) -> float:
    if v is None:
        return NAN
    if isinstance(v, str):
        return float(v)
    return float(v)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _num_out(obj)
    if obj is None or isinstance(obj, str | int | bool):
        return obj
    return str(obj)
