"""Shared test set-up: fixed seeds, a hypothesis profile that fits CI (2 cores, 10 minutes for all)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

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
