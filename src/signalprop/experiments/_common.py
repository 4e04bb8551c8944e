"""What the paper reproductions share: the bundled digits data, denormal flushing, progress, output files.

Nothing here downloads anything: the data is scikit-learn's ``load_digits`` (1797 grey 8x8 images of the
digits 0-9, shipped inside the package). scikit-learn and matplotlib are imported inside functions only, so
``import signalprop.experiments`` stays as light as ``import signalprop``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TextIO, TypeVar

import torch

from .._errors import SignalpropError

ProgressLike = bool | Callable[[str], None] | None

PNG_LIMIT_BYTES = 300_000
"""README pictures are committed: each PNG stays below this size (the dpi is lowered until it does)."""


# ---- data ------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dev dependency here
        raise SignalpropError(
            "the paper reproductions use scikit-learn's bundled digits data, but scikit-learn is not "
            "installed; install it with `pip install scikit-learn` (nothing is downloaded at run time)"
        ) from exc
    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32)
    y = torch.as_tensor(data.target, dtype=torch.int64)
    return x, y


def digits(*, images: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, standardized with one mean and one std over all pixels (zero mean, unit variance).

    Returns ``(x, y)``: ``x`` of shape (1797, 1, 8, 8) when ``images`` else (1797, 64), float32; ``y`` the
    labels 0-9. A single global scale keeps the always-blank border pixels at a constant instead of
    dividing by their zero variance. The tensors are fresh copies: callers may change them.
    """
    x, y = _digits_arrays()
    x = (x - x.mean()) / x.std()
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return x.clone(), y.clone()


def digits_caffe() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits prepared the way Caffe's ImageNet pipeline (He et al. 2015) prepares images: pixels on the
    0-255 scale with the mean image subtracted and no division by the std (std 69 here; ImageNet's ~60).

    Returns ``(x, y)`` with ``x`` of shape (1797, 1, 8, 8). The input's scale matters in a net without
    normalization: it multiplies the output of a bias-free ReLU net, so it decides how far below the
    softmax's working range a vanishing signal ends up.
    """
    x, y = _digits_arrays()
    x = x * (255.0 / 16.0)
    x = x - x.mean(dim=0, keepdim=True)
    return x.reshape(-1, 1, 8, 8).clone(), y.clone()


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> torch.Tensor:
    """The mini-batch order of a training run: ``steps`` rows of ``batch_size`` indices into ``n`` samples.

    Reshuffled each epoch (an epoch visits each sample at most once; the last partial batch is dropped),
    drawn from :func:`generator` of ``seed``, so every scheme compared in one run sees the same batches.
    """
    g = generator(seed)
    per_epoch = n // batch_size
    epochs = -(-steps // per_epoch)
    rows = [torch.randperm(n, generator=g)[: per_epoch * batch_size].view(per_epoch, -1) for _ in range(epochs)]
    return torch.cat(rows)[:steps]


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over ``window`` points (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


# ---- numerics ---------------------------------------------------------------------------------------
def train(
    model: Any, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, opt: torch.optim.Optimizer, *,
    clip: float | None, window: int, report: Callable[[str], None], experiment: str, label: str,
) -> tuple[list[float], int]:
    """Train ``model`` with cross-entropy on the mini-batches of ``order`` (one row of indices a step).

    Args:
        model: The classifier, trained in place (in training mode).
        x: All inputs.
        y: All labels.
        order: ``(steps, batch)`` indices (:func:`batch_order`).
        opt: The optimizer over ``model``'s parameters.
        clip: Largest gradient norm per step (``clip_grad_norm_``), or None for no clipping.
        window: Steps averaged in the progress lines.
        report: Receives a progress line five times over the run.
        experiment: The experiment's name, for the error.
        label: Which run this is, for the progress lines and the error.

    Returns:
        ``(losses, clipped)``: the loss at every step, and how many steps had their gradient clipped.

    Raises:
        SignalpropError: The loss became non-finite (the message names the step and says to lower the
            learning rate).

    Examples:
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.randn(8, 4), torch.arange(8) % 3
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> losses, clipped = train(net, x, y, batch_order(8, 4, 6, seed=0), opt, clip=None, window=2,
        ...                         report=lambda line: None, experiment="demo", label="linear")
        >>> len(losses), clipped
        (6, 0)
    """
    steps = len(order)
    losses: list[float] = []
    clipped = 0
    every = max(1, steps // 5)
    model.train()
    for step, idx in enumerate(order):
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            clipped += int(bool(norm > clip))
        opt.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            lr = opt.param_groups[0]["lr"]
            raise SignalpropError(f"{experiment}: the {label} run diverged at step {step} (loss {value}); lower "
                                  f"Config.lr (now {lr:g}) and run again")
        losses.append(value)
        if (step + 1) % every == 0 or step + 1 == steps:
            recent = losses[-min(len(losses), window):]
            report(f"{label}: step {step + 1}/{steps}, loss {sum(recent) / len(recent):.3f}")
    return losses, clipped


def flush_denormal_enabled() -> bool:
    """Whether float32 subnormals are flushed to zero right now (PyTorch has no getter, so it is probed)."""
    tiny = torch.tensor([1], dtype=torch.int32).view(torch.float32)  # 1.4e-45, the smallest subnormal
    return bool((tiny * 1.0).item() == 0.0)


@contextmanager
def flushed_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero inside the block and restore the previous setting afterwards.

    When a signal vanishes (Caffe's xavier on a 30-layer ReLU net) activations reach the subnormal range,
    where a CPU step is about 6x slower (measured here: 20 steps 1.3 s against 0.2 s). Flushing changes
    nothing a figure shows: those values are below 1e-38 either way.
    """
    before = flush_denormal_enabled()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


LN10 = math.log(10.0)
"""The cross-entropy of a uniform guess over the ten digits: where a net that learns nothing stays."""


def check_positive_ints(config: Any, names: tuple[str, ...], experiment: str) -> None:
    """Raise a :class:`SignalpropError` naming the first of ``config``'s fields ``names`` that is not a
    positive integer (a bool is not one).

    Args:
        config: An experiment's Config.
        names: The fields to check.
        experiment: The experiment's name, for the message.

    Returns:
        None.

    Examples:
        >>> from types import SimpleNamespace
        >>> check_positive_ints(SimpleNamespace(steps=0), ("steps",), "he2015")
        Traceback (most recent call last):
        ...
        signalprop._errors.SignalpropError: he2015 Config.steps must be a positive integer, got 0
    """
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SignalpropError(f"{experiment} Config.{name} must be a positive integer, got {v!r}")


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``: every random draw of an experiment goes through one of these."""
    return torch.Generator().manual_seed(int(seed))


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SignalpropError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


# ---- progress ---------------------------------------------------------------------------------------
class Progress:
    """Plain progress lines (``[he2015 12.3s] depth 30 xavier: step 200/600, loss 2.303``), or silence.

    ``progress`` is False/None (silent), True (lines on stderr) or a callable that receives each line.
    Lines carry the elapsed wall time, so a user watching a 4-minute run sees it move.
    """

    def __init__(self, name: str, progress: ProgressLike, stream: TextIO | None = None) -> None:
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise SignalpropError(
                f"progress must be True, False or a callable taking one line of text, got {progress!r}"
            )
        self.name = name
        self._sink = progress
        self._stream = stream
        self.t0 = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, message: str) -> None:
        if not self._sink:
            return
        line = f"[{self.name} {self.elapsed:6.1f}s] {message}"
        if callable(self._sink):
            self._sink(line)
        else:
            stream = self._stream if self._stream is not None else sys.stderr
            print(line, file=stream, flush=True)


# ---- output files -----------------------------------------------------------------------------------
def out_dir(out: str | Path | None) -> Path | None:
    """The output folder (created), or None when nothing is to be written."""
    if out is None:
        return None
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SignalpropError(f"--out {str(path)!r} is a file; pass a folder (it is created when missing)")
    path.mkdir(parents=True, exist_ok=True)
    return path


def jsonable(obj: Any) -> Any:
    """Plain JSON types; nan -> None, +-inf -> "inf"/"-inf", tensors and numpy values -> lists / floats."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, bool) or obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(obj)
    return str(obj)


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(jsonable(data), indent=1, allow_nan=False))
    return path


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure that owns its Agg canvas (no pyplot: no global state, no GUI backend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Any, path: Path, *, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG, lowering the dpi until the file is under :data:`PNG_LIMIT_BYTES`."""
    while True:
        fig.savefig(path, dpi=dpi, format="png")
        if path.stat().st_size <= PNG_LIMIT_BYTES or dpi <= 50:
            return path
        dpi = int(dpi * 0.8)


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---- what every run() does first and last ----------------------------------------------------------
C = TypeVar("C")


def start(
    name: str,
    *,
    seed: Any,
    config: C | None,
    quick: bool,
    presets: tuple[C, C],
    out: str | Path | None,
    progress: ProgressLike,
) -> tuple[int, C, Path | None, Progress]:
    """Check the arguments every reproduction takes and return ``(seed, config, folder, progress)``.

    ``presets`` is ``(QUICK, FULL)``: ``config`` wins when given and must be of the presets' class;
    ``folder`` is :func:`out_dir` of ``out`` (None writes nothing); ``progress`` a :class:`Progress`
    named ``name`` whose clock starts here, so ``progress.elapsed`` is the run's wall time.
    """
    seed = check_seed(seed)
    quick_cfg, full_cfg = presets
    cfg = config if config is not None else (quick_cfg if quick else full_cfg)
    if not isinstance(cfg, type(full_cfg)):
        raise SignalpropError(f"config must be a signalprop.experiments.{name}.Config, got {type(cfg).__name__}")
    folder = out_dir(out)
    return seed, cfg, folder, Progress(name, progress)


class Outcome:
    """What every experiment's ``Result`` has: named ``checks`` of the paper's claims and the files written."""

    checks: dict[str, bool]
    png: Path | None
    json: Path | None

    @property
    def ok(self) -> bool:
        """True when every check of the paper's claim held."""
        return all(self.checks.values())

    def outcome_lines(self) -> list[str]:
        """The summary's last lines: one ``[ok]``/``[FAILED]`` line per check, then the files written."""
        lines = [f"  [{'ok' if v else 'FAILED'}] {k}" for k, v in self.checks.items()]
        if self.png is not None:
            lines.append(f"  wrote {self.png} and {self.json}")
        return lines


R = TypeVar("R", bound=Outcome)


def write_outputs(
    result: R, folder: Path | None, name: str, figure: Callable[[R], Any], as_dict: Callable[[R], dict[str, Any]]
) -> R:
    """Save ``figure(result)`` as ``folder/name.png`` and ``as_dict(result)`` as ``folder/name.json``
    (nothing when ``folder`` is None), record both paths on ``result`` and return it."""
    if folder is not None:
        result.png = save_png(figure(result), folder / f"{name}.png")
        result.json = write_json(folder / f"{name}.json", as_dict(result))
    return result
