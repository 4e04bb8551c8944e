"""One diagnosis: :class:`Finding` (kind, severity, layer, message, fix), shared by rules and reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .._errors import SignalpropError

KINDS: tuple[str, ...] = (
    "exploding",
    "vanishing",
    "grad_exploding",
    "grad_vanishing",
    "dead_units",
    "saturation",
    "nonfinite",
    "overflow_risk",
    "mean_drift",
    "subnormal",
)
"""The kinds of finding (docs/diagnose.md lists each with its threshold); ``subnormal`` is the CPU-speed note."""

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")
"""Severities in increasing order; ``Report.ok`` is False as soon as one finding is a warning or an error."""


@dataclass(frozen=True)
class Finding:
    """One thing a rule found in a trace.

    ``layer`` is the qualified module name (``"features.10"``), ``"input"`` for the model's input, or
    ``""`` for findings about the whole network. ``message`` says what is wrong with the numbers;
    ``fix`` says what to do, naming the scheme and the exact std it would set. ``data`` holds the numbers
    behind the message (ratios, stds, fractions) for programs and plots.

    Attributes:
        kind: One of :data:`KINDS` (``exploding``, ``vanishing``, ``dead_units``, ...).
        severity: ``info``, ``warning`` or ``error``.
        layer: Where, as above.
        message: What is wrong, with the numbers.
        fix: What to do.
        data: The numbers behind the message.

    Raises:
        SignalpropError: An unknown kind or severity.

    Examples:
        >>> f = Finding("vanishing", "warning", "features.3", "forward std 0.004, 0.02x the first layer's",
        ...             fix="sp.init.he_(model)", data={"ratio": 0.02})
        >>> print(f)
        [warning] vanishing features.3: forward std 0.004, 0.02x the first layer's
          fix: sp.init.he_(model)
        >>> f.rank, Finding.from_dict(f.to_dict()) == f
        (1, True)
    """

    kind: str
    severity: str
    layer: str
    message: str
    fix: str = ""
    data: dict[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SignalpropError(
                f"unknown finding kind {self.kind!r}; the kinds are: {', '.join(KINDS)}. "
                "Add a new kind to signalprop.diagnosis._findings.KINDS together with the rule that emits it."
            )
        if self.severity not in SEVERITIES:
            raise SignalpropError(
                f"unknown severity {self.severity!r} for a {self.kind} finding; use one of "
                f"{', '.join(SEVERITIES)}"
            )

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for error (sort key)."""
        return SEVERITIES.index(self.severity)

    def __str__(self) -> str:
        where = f" {self.layer}" if self.layer else ""
        text = f"[{self.severity}] {self.kind}{where}: {self.message}"
        return f"{text}\n  fix: {self.fix}" if self.fix else text

    def to_dict(self) -> dict[str, Any]:
        """The finding as JSON-ready data (inf as a string, NaN as null inside ``data``)."""
        from ..trace import _jsonable

        return {
            "kind": self.kind,
            "severity": self.severity,
            "layer": self.layer,
            "message": self.message,
            "fix": self.fix,
            "data": _jsonable(self.data),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """The finding :meth:`to_dict` wrote, inf and NaN restored."""
        return cls(
            kind=d["kind"],
            severity=d["severity"],
            layer=d.get("layer", ""),
            message=d.get("message", ""),
            fix=d.get("fix", ""),
            data=_restore_numbers(dict(d.get("data") or {})),
        )


def _restore_numbers(obj: Any) -> Any:
    """Undo trace._jsonable's encoding of inf / -inf as strings and nan as null inside ``data``."""
    if isinstance(obj, dict):
        return {k: _restore_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_restore_numbers(v) for v in obj]
    if obj in ("inf", "-inf"):
        return float(obj)
    return obj
