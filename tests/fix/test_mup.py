"""muP: roles from the graph, the Tensor Programs V table, and flat coordinates over widths."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop.fix.mup import roles
from signalprop.graph import capture


def _mlp(width: int) -> nn.Sequential:
    return sp.models.mlp(3, width, in_features=32, out_features=16)


def test_roles_come_from_the_graph_not_the_names() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(8, 8)  # named like a readout, used first: the input layer
            self.body = nn.Linear(8, 8)
            self.stem = nn.Linear(8, 3)  # named like an input layer, used last: the readout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.stem(torch.relu(self.body(torch.relu(self.head(x)))))

    assert roles(capture(Net(), torch.randn(2, 8))) == {"head": "input", "body": "hidden", "stem": "readout"}


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_init_and_learning_rates_follow_the_table(optimizer: str) -> None:
    net = _mlp(256)
    groups = sp.fix.mup_(net, torch.randn(4, 32), lr=0.1, base_width=64, optimizer=optimizer,
                         generator=torch.Generator().manual_seed(0))
    lr = {g["mup_role"]: g["lr"] for g in groups}
    m = 256 / 64
    if optimizer == "adam":
        assert lr == pytest.approx({"input": 0.1, "input bias": 0.1, "hidden": 0.1 / m, "hidden bias": 0.1,
                                    "readout": 0.1 / m, "readout bias": 0.1})
    else:
        assert lr == pytest.approx({"input": 0.1 * m, "input bias": 0.1 * m, "hidden": 0.1, "hidden bias": 0.1 * m,
                                    "readout": 0.1 / m, "readout bias": 0.1})
    # init: 65,536 draws per hidden matrix, so the std is within 1% (4 sigma of sqrt(1/(2N)))
    assert net[0].weight.std().item() == pytest.approx(1 / math.sqrt(32), rel=0.03)
    assert net[2].weight.std().item() == pytest.approx(1 / 16, rel=0.01)
    assert net[6].weight.std().item() == pytest.approx(1 / 256, rel=0.03)
    assert all(float(net[i].bias.detach().abs().max()) == 0.0 for i in (0, 2, 4, 6))
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))


def test_attention_logits_scale_one_over_d() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(16, 16)
            self.scaling = 16**-0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)
            return torch.softmax(q @ q.transpose(-1, -2) * self.scaling, -1) @ q

    net = nn.Sequential(nn.Linear(8, 16), Attn(), nn.Linear(16, 2))
    sp.fix.mup_(net, torch.randn(2, 5, 8), lr=1e-3)
    assert net[1].scaling == pytest.approx(1 / 16)


def test_bad_input_says_what_to_pass() -> None:
    with pytest.raises(sp.SignalpropError, match="example_inputs"):
        sp.fix.mup_(_mlp(64), lr=1e-3)
    with pytest.raises(sp.SignalpropError, match="optimizer"):
        sp.fix.mup_(_mlp(64), torch.randn(2, 32), lr=1e-3, optimizer="lamb")
    with pytest.raises(sp.SignalpropError, match="lr"):
        sp.fix.mup_(_mlp(64), torch.randn(2, 32), lr=-1.0)


def test_coordinates_stay_flat_under_mup_and_drift_under_sp(tmp_path: Path) -> None:
    # Measured over 5 seeds with this setting: muP's seed-mean max/min over widths 64..1024 after 5 Adam steps
    # 1.01-1.15 per layer, a single seed up to 1.41 (a 64-wide net's own scatter: its readout sums 64
    # features); the standard parametrization 13-15x at the first hidden layer.
    x = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    widths = (64, 128, 256, 512, 1024)
    mup = sp.fix.coord_check(_mlp, x, widths=widths, steps=5, lr=1e-2, seeds=(0, 1, 2, 3, 4))
    std = sp.fix.coord_check(_mlp, x, widths=widths, steps=5, lr=1e-2, seeds=(0, 1, 2, 3, 4),
                             parametrization="sp")
    assert max(mup.spread().values()) <= 1.3
    assert all(max(mup.spread(seed=s).values()) <= 1.6 for s in range(5))
    assert max(std.spread().values()) >= 8.0
    png = sp.fix.plot_coord_check([std, mup], tmp_path / "coord.png")
    assert png.stat().st_size > 10_000


def test_coord_check_command_writes_png_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from signalprop.cli import main

    rc = main(["coord-check", "--widths", "64", "256", "--steps", "2", "--seeds", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc in (0, 1) and "mup: after 2 steps" in out and "sp: after 2 steps" in out
    data = json.loads((tmp_path / "coord_check.json").read_text())
    assert [d["parametrization"] for d in data] == ["sp", "mup"] and data[1]["widths"] == [64, 256]
    assert (tmp_path / "coord_check.png").stat().st_size > 10_000
    assert main(["coord-check", "--steps", "0", "--out", str(tmp_path)]) == 2
