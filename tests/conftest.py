"""Shared test set-up: fixed seeds, a hypothesis profile that fits CI (2 cores, 10 minutes for all)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from torch.utils._python_dispatch import TorchDispatchMode

settings.register_profile(
    "signalprop",
    deadline=None,
    max_examples=int(os.environ.get("SIGNALPROP_HYPOTHESIS_EXAMPLES", "25")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("signalprop")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)  # noqa: NPY002 -- code under test may use the legacy global generator
    torch.manual_seed(0)


class CountOps(TorchDispatchMode):
    """Records (op, elements of its first tensor argument) for the aten ops that compute something (views and
    detach left out): what the overhead tests count."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if not func.is_view and func.overloadpacket is not torch.ops.aten.detach:
            first = next((a for a in args if isinstance(a, torch.Tensor)), None)
            self.ops.append((str(func.overloadpacket), -1 if first is None else first.numel()))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def count_ops() -> type[CountOps]:
    """The :class:`CountOps` dispatch mode: ``with count_ops() as mode: ...; mode.ops``."""
    return CountOps


@pytest.fixture(params=[
    pytest.param(("cpu", torch.bfloat16), id="cpu-bfloat16"),
    pytest.param(("cpu", torch.float16), id="cpu-float16"),
    pytest.param(("cuda", torch.float16), id="cuda-float16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")),
])
def autocast_case(request: pytest.FixtureRequest) -> tuple[str, torch.dtype]:
    """(device, dtype) of the autocast cases the tests cover: bfloat16 and float16 on the CPU, float16 on a
    GPU where one is present."""
    return request.param  # type: ignore[no-any-return]
