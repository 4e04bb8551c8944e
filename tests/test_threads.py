"""A measurement on one thread never changes what another thread sees: two threads measuring two Dropout models
each get the single-threaded result, a third thread's random numbers are its own, and a model that one thread
trains while another measures it trains exactly as it would alone."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import signalprop as sp


def _run_threads(*targets: Callable[[], None]) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported by the test
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _dropout_net(width: int, p: float) -> nn.Module:
    return nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Dropout(p), nn.Linear(width, width), nn.Dropout(p),
                         nn.Linear(width, 4)).train()


def test_two_threads_measuring_two_dropout_models_get_the_single_threaded_results() -> None:
    torch.manual_seed(0)
    a, b = _dropout_net(64, 0.3), _dropout_net(48, 0.5)
    xa, xb = torch.randn(32, 16), torch.randn(24, 16)
    want_a, want_b = sp.measure(a, xa), sp.measure(b, xb)
    rounds = 40
    got: dict[str, list[Any]] = {"a": [], "b": []}
    drawn: list[torch.Tensor] = []

    def draw() -> None:  # a thread of the user's that draws from torch's global generator meanwhile
        torch.manual_seed(123)
        drawn.extend(torch.randn(8) for _ in range(4 * rounds))

    torch.manual_seed(5)
    state = torch.get_rng_state()
    errors = _run_threads(
        lambda: got["a"].extend(sp.measure(a, xa) for _ in range(rounds)),
        lambda: got["b"].extend(sp.measure(b, xb) for _ in range(rounds)),
        draw,
    )
    assert not errors, errors
    assert all(t == want_a for t in got["a"]) and all(t == want_b for t in got["b"])
    torch.manual_seed(123)
    assert all(torch.equal(d, torch.randn(8)) for d in drawn)  # nothing else drew from its stream
    torch.set_rng_state(state)


def _train(model: nn.Module, steps: int, measure_meanwhile: bool) -> tuple[list[torch.Tensor], int, list[str]]:
    """SGD on fixed data with dropout (the global generator); optionally another thread measures the same model
    all along. Returns the final parameters, the failed steps and each measurement's outcome."""
    data = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    target = torch.randn(16, 4, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    done = threading.Event()
    failed = [0]
    outcomes: list[str] = []

    def train() -> None:
        torch.manual_seed(7)
        for _ in range(steps):
            try:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(data), target)
                loss.backward()
                opt.step()
            except RuntimeError:
                failed[0] += 1
        done.set()

    def measure() -> None:
        while not done.is_set():
            trace = sp.measure(model, data)
            outcomes.append("ok" if all(layer.bwd is not None for layer in trace) else "no gradients")

    errors = _run_threads(train, measure) if measure_meanwhile else _run_threads(train)
    assert not errors, errors
    return [p.detach().clone() for p in model.parameters()], failed[0], outcomes


def test_measuring_a_model_another_thread_trains_changes_nothing_it_sees() -> None:
    torch.manual_seed(0)
    model = _dropout_net(64, 0.2)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    alone, failed_alone, _ = _train(model, 150, measure_meanwhile=False)
    model.load_state_dict(start)
    shared, failed, outcomes = _train(model, 150, measure_meanwhile=True)
    assert failed_alone == 0 and failed == 0
    # measured all along: a pass that met an optimizer step between its forward and backward ran again on
    # private copies of the weights
    assert outcomes and set(outcomes) == {"ok"}
    # no optimizer update undone, no gradient replaced, the trainer's dropout masks unchanged: bitwise the same
    assert all(torch.equal(p, q) for p, q in zip(alone, shared))
