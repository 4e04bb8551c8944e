"""TensorBoard logging and the Lightning callback (skipped where the framework is not installed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.monitor import Monitor


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _histogram_tags(logdir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"histograms": 0})
    acc.Reload()
    return list(acc.Tags()["histograms"])


def test_monitor_writes_scalars_and_histograms_per_layer(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    model = sp.models.mlp(depth=2, width=16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = SummaryWriter(str(tmp_path))
    with Monitor(model, every=2, tensorboard=writer) as mon:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 16)).pow(2).mean().backward()
            opt.step()
            mon.step()
    writer.close()
    scalars = _scalars(tmp_path)
    rec = mon.history[1]
    fwd = scalars["signalprop/fwd_std/0"]
    assert [s for s, _ in fwd] == [0, 2]
    assert fwd[1][1] == pytest.approx(rec.trace["0"].fwd.std, rel=1e-6)
    assert scalars["signalprop/bwd_std/2"][1][1] == pytest.approx(rec.trace["2"].bwd.std, rel=1e-6)  # type: ignore[union-attr]
    assert scalars["signalprop/update_ratio/0.weight"][1][1] == pytest.approx(rec.params["0.weight"].update_ratio, rel=1e-6)
    assert "signalprop/grad_norm/4.bias" in scalars and "signalprop/param_norm/4.bias" in scalars
    hist = _histogram_tags(tmp_path)
    assert "signalprop/fwd_hist/0" in hist and "signalprop/bwd_hist/4" in hist


def test_log_trace_takes_a_measured_trace_and_rejects_other_things(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from signalprop.integrations.tensorboard import log_trace
    from signalprop.measurement import measure

    trace = measure(sp.models.mlp(depth=2, width=8), torch.randn(4, 8))
    writer = SummaryWriter(str(tmp_path))
    log_trace(writer, trace, 7)
    writer.close()
    scalars = _scalars(tmp_path)
    assert scalars["signalprop/fwd_std/0"] == [(7, pytest.approx(trace["0"].fwd.std, rel=1e-6))]
    assert all(math.isfinite(v) for series in scalars.values() for _, v in series)
    with pytest.raises(sp.SignalpropError, match="SummaryWriter"):
        log_trace(object(), trace, 0)
    with pytest.raises(sp.SignalpropError, match="non-negative integer"):
        log_trace(SummaryWriter(str(tmp_path / "b")), trace, -1)
    with pytest.raises(sp.SignalpropError, match="Trace"):
        log_trace(SummaryWriter(str(tmp_path / "c")), [1, 2], 0)  # type: ignore[arg-type]


@pytest.mark.filterwarnings("ignore::UserWarning:lightning.*")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning:torch.*")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # lightning 2.6's pytree use vs torch 2.13
def test_lightning_callback_records_training_and_logs_at_global_steps(tmp_path: Path) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("tensorboard")
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from signalprop.integrations.lightning import SignalpropCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = sp.models.mlp(depth=2, width=8, out_features=1)

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], idx: int) -> None:
            x, y = batch
            self.log("val", nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = torch.utils.data.TensorDataset(torch.randn(48, 8), torch.randn(48, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = Net()
    before = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    cb = SignalpropCallback(every=2, plot_path=tmp_path / "train.png")
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = pl.Trainer(
        max_steps=6, callbacks=[cb], logger=logger, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, limit_val_batches=2, num_sanity_val_steps=1,
        val_check_interval=3,
    )
    trainer.fit(model, loader, loader)
    assert cb.monitor is not None
    hist = cb.monitor.history
    assert [r.step for r in hist] == [0, 2, 4]
    assert hist[0].trace.names == ["net.0", "net.1", "net.2", "net.3", "net.4"]  # no validation calls
    assert cb.global_steps == {0: 1, 2: 3, 4: 5}  # recorded steps -> optimizer steps taken, Lightning's count
    assert all(r.loss is not None and math.isfinite(r.loss) and r.loss > 0 for r in hist)  # training_step's loss
    assert (tmp_path / "train.png").exists()
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == before
    logger.experiment.flush()
    scalars = _scalars(tmp_path / "tb" / "version_0")
    assert [s for s, _ in scalars["signalprop/fwd_std/net.0"]] == [1, 3, 5]


def test_lightning_callback_checks_its_arguments_early() -> None:
    pytest.importorskip("lightning")
    from signalprop.integrations.lightning import SignalpropCallback

    with pytest.raises(sp.SignalpropError, match="every must be a positive integer"):
        SignalpropCallback(every=0)
    with pytest.raises(sp.SignalpropError, match="sets tensorboard= itself"):
        SignalpropCallback(tensorboard=object())


@pytest.mark.filterwarnings("ignore::UserWarning:lightning.*")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning:torch.*")
@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")
@pytest.mark.slow
def test_lightning_callback_memory_stays_bounded_and_names_a_nonfinite_loss() -> None:
    """400 steps with keep=8: the step map holds at most 2 x 64 entries, each kept record's step among them;
    a loss that turns infinite at one batch is named with its step."""
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from signalprop.integrations.lightning import SignalpropCallback
    from signalprop.monitor import NonFiniteWarning

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 1)

        def training_step(self, batch: tuple[torch.Tensor], idx: int) -> dict[str, torch.Tensor]:
            loss = self.net(batch[0]).square().mean()
            return {"loss": loss * (float("inf") if self.global_step == 300 else 1.0)}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.0)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    cb = SignalpropCallback(every=1, keep=8, log=False)
    trainer = pl.Trainer(max_steps=400, callbacks=[cb], logger=False, accelerator="cpu", devices=1,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with pytest.warns(NonFiniteWarning, match="step 300"):
        trainer.fit(Net(), loader)
    assert cb.monitor is not None and cb.monitor.recorded == 400
    assert len(cb.global_steps) <= 2 * 64 + 1
    assert {r.step for r in cb.monitor.history} <= set(cb.global_steps)
    assert cb.global_steps[399] == 400
