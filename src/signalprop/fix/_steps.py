"""The per-layer plan as data: what :func:`signalprop.fix.auto_init_` will set on each layer, and why.

Planned first (:func:`signalprop.fix.plan`), printed or tested as data, applied last
(:func:`signalprop.fix.apply_plan`); diagnose quotes the same steps in its fix text.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["LayerPlan", "Plan"]


@dataclass(frozen=True)
class LayerPlan:
    """One action on one module.

    For a weight layer: draw the weight with entries of standard deviation ``std`` (``scheme`` says why that
    std; ``distribution``: ``normal``, or ``orthogonal``, a scaled orthogonal matrix of that root mean square
    entry) and the bias from N(0, ``bias_std``^2) (zero when 0). ``factor`` is the residual multiplier
    already included in ``std``. ``recurrent`` (RNN/LSTM/GRU): :func:`signalprop.init.recurrent_`, ``std``
    being the first input weight's. For a normalization layer (``scheme == "norm_gain"``) the gain is set to
    the constant ``gain``. ``keep`` steps leave the layer as it is; ``lsuv`` steps are only rescaled by the
    LSUV pass. ``lsuv``: an LSUV pass rescales this layer afterwards, to output std ``target_std``.

    Attributes:
        layer: Qualified name of the module.
        kind: Its class name.
        activation: The activation found after it (``none`` for a readout).
        scheme: ``he``, ``mean_field``, ``lecun``, ``gain``, ``linear``, ``recurrent``, ``norm_gain``,
            ``keep``, ``lsuv`` and the residual variants.
        std: The weight entries' standard deviation (NaN when nothing is drawn).
        bias_std: The bias entries' standard deviation (0: zeroed).
        reason: Why this scheme and std, with the formula and paper.
        fan_in: The layer's effective fan-in.
        factor: The residual multiplier included in ``std``.
        gain: A normalization layer's constant gain, else None.
        lsuv: Whether the LSUV pass rescales this layer.
        distribution: ``normal`` or ``orthogonal``.
        target_std: The output std the LSUV pass pins.

    Examples:
        A ReLU follows, so He et al. (2015): ``std = sqrt(2 / 64)``:

        >>> import signalprop as sp
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> step = sp.fix.plan(net)["2"]
        >>> step.scheme, step.activation, round(step.std, 4), step.bias_std
        ('he', 'relu', 0.1768, 0.0)
    """

    layer: str
    kind: str
    activation: str
    scheme: str
    std: float
    bias_std: float
    reason: str
    fan_in: float = math.nan
    factor: float = 1.0
    gain: float | None = None
    lsuv: bool = False
    distribution: str = "normal"
    target_std: float = math.nan


@dataclass(frozen=True)
class Plan(Sequence[LayerPlan]):
    """The ordered steps of an :func:`auto_init_`, plus how the structure was found.

    ``method``: the graph capture used (``export``, ``fx``, ``hooks`` or ``module-order``); ``residuals``:
    how many residual branches were found; ``notes``: anything the user should know (a fallback, an
    assumption about the inputs).

    A sequence of :class:`LayerPlan`; ``plan["name"]`` gives the step of one layer, ``str(plan)`` a table.

    Attributes:
        steps: The steps, in module order.
        method: How the structure was found.
        residual: The residual mode (``fixup``, ``zero`` or None).
        residuals: Residual branches found.
        notes: What the user should know.
        meta: Extra data for the fix's own passes.

    Examples:
        The readout has no activation after it: ``Var[w] = 1 / sqrt(fan_in fan_out) = 1 / sqrt(640)``:

        >>> import signalprop as sp
        >>> from torch import nn
        >>> p = sp.fix.plan(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)))
        >>> [(s.layer, s.scheme, round(s.std, 4)) for s in p]
        [('0', 'he', 0.25), ('2', 'linear', 0.1988)]
        >>> p.method, p.needs_lsuv
        ('module-order', False)
    """

    steps: tuple[LayerPlan, ...]
    method: str
    residual: str | None
    residuals: int = 0
    notes: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, str):
            for s in self.steps:
                if s.layer == i:
                    return s
            raise KeyError(f"no step for layer {i!r}; layers in this plan: {', '.join(s.layer for s in self.steps[:20])}")
        return self.steps[i]

    def __iter__(self) -> Iterator[LayerPlan]:
        return iter(self.steps)

    @property
    def needs_lsuv(self) -> bool:
        """Whether some step is rescaled by an LSUV pass (which needs example inputs)."""
        return any(s.lsuv for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data: method, residual, residuals, notes and one dict per step."""
        return {
            "method": self.method,
            "residual": self.residual,
            "residuals": self.residuals,
            "notes": list(self.notes),
            "steps": [asdict(s) for s in self.steps],
        }

    def table(self) -> str:
        """A plain-text table: one row per step (layer, activation, scheme, std, bias std, factor), then notes."""
        head = ("layer", "kind", "activation", "scheme", "std", "bias std", "factor", "lsuv")
        rows = [head] + [
            (
                s.layer,
                s.kind,
                s.activation,
                s.scheme,
                f"gain={s.gain:g}" if s.gain is not None else ("-" if math.isnan(s.std) else f"{s.std:.4g}"),
                f"{s.bias_std:.4g}" if s.scheme not in ("keep", "norm_gain") and not math.isnan(s.bias_std) else "-",
                f"{s.factor:.4g}",
                f"std {s.target_std:.3g}" if s.lsuv else "",
            )
            for s in self.steps
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"structure: {self.method}; residual: {self.residual} ({self.residuals} branches)")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
