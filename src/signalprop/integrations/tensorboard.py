"""TensorBoard logging of signalprop traces and Monitor records: scalars and histograms per layer.

Tags (``prefix`` defaults to ``"signalprop"``)::

    {prefix}/fwd_std/{layer}     std of the layer's output          (also fwd_mean, fwd_absmax, fwd_zero_frac)
    {prefix}/bwd_std/{layer}     std of the gradient w.r.t. it      (also bwd_mean, bwd_absmax, bwd_zero_frac)
    {prefix}/fwd_hist/{layer}    histogram of the output, when Stats.hist is set (bwd_hist likewise)
    {prefix}/param_norm/{name}   ||w||        {prefix}/grad_norm/{name}   ||g||
    {prefix}/update_ratio/{name} ||w_t - w_{t-1}|| / ||w_{t-1}||

Any object with TensorBoard's ``SummaryWriter`` methods works (``torch.utils.tensorboard.SummaryWriter``,
or Lightning's ``TensorBoardLogger.experiment``). Unknown numbers (nan) are left out; inf is written, so a
blow-up shows. Histograms come from ``Stats.hist`` (``sp.measure(..., histograms=True)`` or
``sp.Monitor(..., histograms=True)``) and are written with ``add_histogram_raw``: no tensor is needed.

Example::

    from torch.utils.tensorboard import SummaryWriter
    from signalprop.integrations.tensorboard import log_trace
    writer = SummaryWriter("runs/x")
    log_trace(writer, sp.measure(model, x, histograms=True), step=0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .._errors import SignalpropError
from ..trace import Stats, Trace

if TYPE_CHECKING:
    from ..monitor._record import ParamStats, Record

__all__ = ["log_params", "log_record", "log_trace"]

_SCALARS = ("std", "mean", "absmax", "zero_frac")


def _check_writer(writer: Any) -> None:
    if not callable(getattr(writer, "add_scalar", None)):
        raise SignalpropError(
            f"writer must be a TensorBoard SummaryWriter (torch.utils.tensorboard.SummaryWriter), got "
            f"{type(writer).__name__}"
        )


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise SignalpropError(f"step must be a non-negative integer (the global step), got {step!r}")
    return step


def log_trace(
    writer: Any, trace: Trace, step: int, *, prefix: str = "signalprop", histograms: bool = True
) -> None:
    """Write each layer's forward and backward std, mean, absmax and zero fraction (and histograms) at ``step``."""
    _check_writer(writer)
    step = _check_step(step)
    if not isinstance(trace, Trace):
        raise SignalpropError(f"log_trace needs a signalprop Trace (sp.measure, Monitor.history[i].trace), got {type(trace).__name__}")
    for layer in trace:
        for part, st in (("fwd", layer.fwd), ("bwd", layer.bwd)):
            if st is None:
                continue
            for name in _SCALARS:
                v = float(getattr(st, name))
                if not math.isnan(v):
                    writer.add_scalar(f"{prefix}/{part}_{name}/{layer.name}", v, step)
            if histograms and st.hist is not None:
                _histogram(writer, f"{prefix}/{part}_hist/{layer.name}", st, step)


def _histogram(writer: Any, tag: str, st: Stats, step: int) -> None:
    hist = st.hist
    assert hist is not None
    num = float(sum(hist.counts))
    if num <= 0 or not all(math.isfinite(e) for e in hist.edges):
        return
    mean = st.mean if math.isfinite(st.mean) else 0.0
    ms = st.var + st.mean * st.mean if math.isfinite(st.var) else 0.0
    writer.add_histogram_raw(
        tag,
        min=hist.edges[0],
        max=hist.edges[-1],
        num=num,
        sum=mean * num,
        sum_squares=ms * num,
        bucket_limits=list(hist.edges[1:]),
        bucket_counts=[float(c) for c in hist.counts],
        global_step=step,
    )


def log_params(writer: Any, params: Mapping[str, ParamStats], step: int, *, prefix: str = "signalprop") -> None:
    """Write each parameter's norm, gradient norm and update ratio (a Monitor record's ``params``)."""
    _check_writer(writer)
    step = _check_step(step)
    for name, ps in params.items():
        for tag, v in (("param_norm", ps.norm), ("grad_norm", ps.grad_norm), ("update_ratio", ps.update_ratio)):
            if not math.isnan(v):
                writer.add_scalar(f"{prefix}/{tag}/{name}", float(v), step)


def log_record(writer: Any, record: Record, *, step: int | None = None, prefix: str = "signalprop") -> None:
    """Write one Monitor record (its trace and its parameters) at ``step`` (default: the record's step)."""
    s = record.step if step is None else step
    log_trace(writer, record.trace, s, prefix=prefix)
    log_params(writer, record.params, s, prefix=prefix)
