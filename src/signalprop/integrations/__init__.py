"""Optional integrations with training frameworks; each submodule imports its framework when imported.

- :mod:`signalprop.integrations.tensorboard`: ``log_trace(writer, trace, step)``, ``log_record(writer,
  record)`` (scalars and histograms per layer, parameter norms and update ratios);
  ``sp.Monitor(model, tensorboard=writer)`` calls it for every record.
- :mod:`signalprop.integrations.lightning`: ``SignalpropCallback``, a PyTorch Lightning callback that runs a
  :class:`~signalprop.monitor.Monitor` over ``trainer.fit`` and logs to the trainer's TensorBoard logger.

``import signalprop`` imports neither framework; install them with ``pip install tensorboard lightning``.
"""

from __future__ import annotations

__all__ = ["lightning", "tensorboard"]
