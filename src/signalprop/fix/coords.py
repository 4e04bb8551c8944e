"""Coordinate check: does each layer's output size stay put as the width grows, over the first training steps?

Yang et al. (2022, Tensor Programs V, Fig. 5): train the same model at several widths for a few steps and
plot each layer's coordinate size (the mean absolute value of its output) against the width. Under muP the
curves are flat: every layer moves by Theta(1) per step at every width. Under the standard parametrization
with one learning rate they drift, growing with the width, which is why its best learning rate shifts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._errors import SignalpropError
from .._hooks import HookSet
from ..layers import is_weight_layer
from .mup import OPTIMIZERS, mup_

__all__ = ["CoordCheck", "coord_check", "plot_coord_check"]

PARAMETRIZATIONS = ("mup", "sp")


@dataclass(frozen=True)
class CoordCheck:
    """``sizes[layer][s][w][t]``: mean |output| of weight layer ``layer`` for seed ``s``, width ``widths[w]``.

    ``t`` counts optimizer steps (``t = 0``: at init). ``spread(step)`` is the max/min over widths per layer:
    near 1 under muP (Yang et al. 2022, Fig. 5), growing with the width under the standard parametrization.

    Attributes:
        parametrization: ``mup`` or ``sp``.
        widths: The widths compared.
        steps: Optimizer steps taken.
        layers: The weight layers' names.
        sizes: Layer -> seed -> width -> step -> mean |output|.

    Examples:
        >>> c = CoordCheck("sp", (64, 128), 1, ("0",), {"0": [[[1.0, 2.0], [1.0, 3.0]]]})
        >>> c.spread(0), c.spread()
        ({'0': 1.0}, {'0': 1.5})
    """

    parametrization: str
    widths: tuple[int, ...]
    steps: int
    layers: tuple[str, ...]
    sizes: dict[str, list[list[list[float]]]]

    def spread(self, step: int = -1, seed: int | None = None) -> dict[str, float]:
        """Per layer: max/min over widths of the coordinate size after ``step`` steps (a seed, or their mean)."""
        out: dict[str, float] = {}
        for layer, per_seed in self.sizes.items():
            seeds = per_seed if seed is None else [per_seed[seed]]
            vals = [sum(s[w][step] for s in seeds) / len(seeds) for w in range(len(self.widths))]
            out[layer] = max(vals) / min(vals) if min(vals) > 0 else math.inf
        return out

    def to_dict(self) -> dict[str, Any]:
        """The check as JSON-ready data, with the final spread."""
        return {"parametrization": self.parametrization, "widths": list(self.widths), "steps": self.steps,
                "layers": list(self.layers), "sizes": self.sizes, "spread": self.spread()}


def coord_check(make_model: Callable[[int], nn.Module], inputs: torch.Tensor, *,
                widths: Sequence[int] = (64, 128, 256, 512, 1024), steps: int = 5, lr: float = 1e-2,
                optimizer: str = "adam", parametrization: str = "mup", base_width: int = 64,
                seeds: Sequence[int] = (0,)) -> CoordCheck:
    """Train ``make_model(width)`` for ``steps`` steps at each width and record each weight layer's output size.

    Args:
        make_model: builds the model at a width; its weight layers must have the same names at every width.
        inputs: one fixed batch; the targets are N(0, 1) of the output's shape, drawn per seed (MSE loss).
        widths: the widths to compare (the issue's range is 2^6..2^12).
        steps: optimizer steps; sizes are recorded at init and after each step.
        lr: the learning rate (tuned at ``base_width`` under muP; used as it is under ``"sp"``).
        optimizer: ``"adam"`` or ``"sgd"``.
        parametrization: ``"mup"`` (:func:`signalprop.fix.mup_`) or ``"sp"`` (the model's own init, one lr).
        seeds: each seed draws its own init and targets.

    Returns:
        A :class:`CoordCheck`; ``spread()`` gives max/min over widths per layer.

    Raises:
        SignalpropError: An unknown parametrization or optimizer, fewer than two widths, no steps or seeds,
            or models whose weight layers differ across widths.

    Examples:
        Two Adam steps at widths 64 and 256: under muP every layer's coordinate size stays within a few
        percent across widths (Yang et al. 2022, Fig. 5):

        >>> import torch
        >>> def make(w):
        ...     return nn.Sequential(nn.Linear(8, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 1))
        >>> x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0))
        >>> c = coord_check(make, x, widths=(64, 256), steps=2)
        >>> c.layers, max(c.spread().values()) < 1.5
        (('0', '2', '4'), True)
    """
    if parametrization not in PARAMETRIZATIONS:
        raise SignalpropError(f"parametrization must be one of {', '.join(PARAMETRIZATIONS)}, got {parametrization!r}")
    if optimizer not in OPTIMIZERS:
        raise SignalpropError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if len(widths) < 2 or any(not isinstance(w, int) or w < 1 for w in widths):
        raise SignalpropError(f"widths must be two or more positive ints, got {list(widths)!r}")
    if steps < 1 or not seeds:
        raise SignalpropError("coord_check needs steps >= 1 and at least one seed")
    sizes: dict[str, list[list[list[float]]]] = {}
    names: tuple[str, ...] = ()
    for si, seed in enumerate(seeds):
        for wi, width in enumerate(widths):
            torch.manual_seed(seed)
            model = make_model(width)
            layers = [(n, m) for n, m in model.named_modules() if is_weight_layer(m)]
            if wi == 0 and si == 0:
                names = tuple(n for n, _ in layers)
                sizes = {n: [[[] for _ in widths] for _ in seeds] for n in names}
            elif tuple(n for n, _ in layers) != names:
                raise SignalpropError(f"make_model({width}) has other weight layers than make_model({widths[0]}); "
                                      "coord_check compares the same layers across widths")
            run = _train(model, layers, inputs, steps, lr, optimizer, parametrization, base_width, seed)
            for n in names:
                sizes[n][si][wi] = run[n]
    return CoordCheck(parametrization, tuple(widths), steps, names, sizes)


def _train(model: nn.Module, layers: list[tuple[str, nn.Module]], inputs: torch.Tensor, steps: int, lr: float,
           optimizer: str, parametrization: str, base_width: int, seed: int) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(seed)
    if parametrization == "mup":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups: Any = mup_(model, inputs, lr=lr, base_width=base_width, optimizer=optimizer, generator=gen)
    else:
        groups = [{"params": list(model.parameters()), "lr": lr}]
    opt = torch.optim.Adam(groups) if optimizer == "adam" else torch.optim.SGD(groups)
    record: dict[str, list[float]] = {n: [] for n, _ in layers}
    current: dict[str, float] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor):
                current[name] = float(out.detach().abs().mean())

        return hook

    target: torch.Tensor | None = None
    with HookSet() as hooks:
        for name, m in layers:
            hooks.add(m.register_forward_hook(hook_for(name)))
        for t in range(steps + 1):
            out = model(inputs)
            for name in record:
                record[name].append(current.get(name, math.nan))
            if t == steps:
                break
            if target is None:
                target = torch.randn(out.shape, generator=gen)
            loss = torch.nn.functional.mse_loss(out, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return record


def plot_coord_check(checks: Sequence[CoordCheck], path: str | Path) -> Path:
    """One row per parametrization, at init and after the last step: coordinate size against width.

    Args:
        checks: :func:`coord_check` results, one row each (e.g. ``mup`` and ``sp`` of the same model).
        path: Where to write the PNG.

    Returns:
        The path written.

    Examples:
        >>> import os, tempfile
        >>> c = CoordCheck("sp", (64, 128), 1, ("0",), {"0": [[[1.0, 2.0], [1.0, 3.0]]]})
        >>> plot_coord_check([c], os.path.join(tempfile.mkdtemp(), "coords.png")).name
        'coords.png'
    """
    from matplotlib.figure import Figure

    from ..report.plots import _save

    fig = Figure(figsize=(11, 3.6 * len(checks)), layout="constrained")
    axes = fig.subplots(len(checks), 2, squeeze=False)
    for row, check in zip(axes, checks):
        for ax, step in zip(row, (0, check.steps)):
            for layer in check.layers:
                per_seed = check.sizes[layer]
                ys = [sum(s[w][step] for s in per_seed) / len(per_seed) for w in range(len(check.widths))]
                ax.plot(check.widths, ys, marker="o", label=layer)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("width")
            ax.set_ylabel("mean |output|")
            ax.grid(True, alpha=0.3)
            worst = max(check.spread(step).values())
            ax.set_title(f"{check.parametrization}: step {step} (max/min over widths {worst:.2f}x)", fontsize=10)
        row[0].legend(fontsize=7)
    return _save(fig, path)
