"""A PyTorch Lightning callback that runs a :class:`~signalprop.monitor.Monitor` over ``trainer.fit``.

The Monitor starts when training starts, records every ``every``-th training batch (``on_train_batch_end``
runs after the optimizer step and before the next ``zero_grad``, so gradient norms and update ratios are
those of that batch), and stops when training ends or raises. Validation and the sanity check run without
gradients and are not recorded. When the trainer's logger is a ``TensorBoardLogger`` (or any logger whose
``experiment`` is a SummaryWriter), each record is written there at the trainer's ``global_step``
(:mod:`signalprop.integrations.tensorboard`). Under DDP every rank records whole-batch statistics (the
Monitor combines ranks); only global rank 0 logs and plots.

Example::

    from lightning.pytorch import Trainer
    from signalprop.integrations.lightning import SignalpropCallback
    cb = SignalpropCallback(every=50, plot_path="signal.png")
    Trainer(callbacks=[cb], max_epochs=3).fit(model, loader)
    cb.monitor.history[-1].trace   # the last recorded step
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from .._errors import SignalpropError
from ..monitor import Monitor, Record

__all__ = ["SignalpropCallback"]


class SignalpropCallback(Callback):
    """Run a Monitor over training.

    Parameters
    ----------
    every:
        Record every ``every``-th training batch.
    log:
        Write records to the trainer's TensorBoard logger, if it has one.
    plot_path:
        When given, write :meth:`Monitor.plot` there at the end of training.
    **monitor_kwargs:
        Passed to :class:`~signalprop.monitor.Monitor` (``sample``, ``modules``, ``histograms``,
        ``on_nonfinite``, ...).

    After ``fit``, ``callback.monitor`` holds the Monitor and its ``history``; ``callback.global_steps``
    maps each recorded Monitor step (training batches seen, from 0) still in the history to the trainer's
    ``global_step`` after that batch's optimizer step (optimizer steps taken, Lightning's count), the step
    TensorBoard gets. The loss ``training_step`` returns goes to ``Monitor.step(loss=...)``: a non-finite one
    is named in a warning and kept in ``Record.loss``.
    """

    def __init__(
        self, *, every: int = 1, log: bool = True, plot_path: str | Path | None = None, **monitor_kwargs: Any
    ) -> None:
        super().__init__()
        for bad in ("tensorboard", "on_record"):
            if bad in monitor_kwargs:
                raise SignalpropError(
                    f"SignalpropCallback sets {bad}= itself (from the trainer's logger); pass log=False to "
                    "turn logging off, or run a Monitor directly for your own writer"
                )
        self.every = every
        self.log = log
        self.plot_path = Path(plot_path) if plot_path is not None else None
        self.monitor_kwargs = monitor_kwargs
        self.monitor: Monitor | None = None
        self.global_steps: dict[int, int] = {}
        self._prune_at = 128
        self._writer: Any = None
        # check the arguments now, not at fit time (module names can only be checked against the real model)
        Monitor(_Probe(), every=every, **{k: v for k, v in monitor_kwargs.items() if k != "modules"})

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._writer = _writer_of(trainer) if self.log and trainer.is_global_zero else None
        self.global_steps = {}
        self._prune_at = 128
        self.monitor = Monitor(pl_module, every=self.every, on_record=self._on_record, **self.monitor_kwargs)
        self.monitor.start()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        mon = self.monitor
        if mon is None:
            return
        if mon.current_step % mon.every == 0:  # a recorded step
            self.global_steps[mon.current_step] = int(trainer.global_step)
        mon.step(loss=_loss_of(outputs))
        if mon.keep is not None and len(self.global_steps) > self._prune_at:
            kept = {r.step for r in mon.history}  # the steps a record still refers to
            self.global_steps = {k: v for k, v in self.global_steps.items() if k in kept}
            self._prune_at = 2 * max(len(self.global_steps), 64)  # amortized: the map doubles between prunes

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is None:
            return
        self.monitor.close()
        if self.plot_path is not None and trainer.is_global_zero and self.monitor.history:
            self.monitor.plot(self.plot_path)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close(flush=False)

    def _on_record(self, record: Record) -> None:
        if self._writer is None:
            return
        from .tensorboard import log_record

        log_record(self._writer, record, step=self.global_steps.get(record.step, record.step))


def _loss_of(outputs: Any) -> Any:
    """The loss in what ``training_step`` returned (a tensor, or a dict with ``"loss"``), or None."""
    if isinstance(outputs, dict):
        outputs = outputs.get("loss")
    return outputs if isinstance(outputs, torch.Tensor) and outputs.numel() == 1 else None


class _Probe(nn.Module):
    """An empty module to check Monitor arguments against before the real model is known."""


def _writer_of(trainer: Trainer) -> Any:
    for logger in trainer.loggers:
        exp = getattr(logger, "experiment", None)
        if callable(getattr(exp, "add_histogram_raw", None)) and callable(getattr(exp, "add_scalar", None)):
            return exp
    return None
