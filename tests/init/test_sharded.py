"""Meta-device materialization, and DTensor / FSDP2-sharded initialization on 2 gloo ranks (CPU)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from torch import nn

import signalprop as sp
from signalprop import SignalpropError
from signalprop.init import materialize_

from .test_schemes import assert_variance


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 32)
        self.attn = nn.MultiheadAttention(32, 4)
        self.norm = nn.LayerNorm(32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.bn = nn.BatchNorm1d(32)
        self.head = nn.Linear(32, 40)
        self.head.weight = self.emb.weight  # tied


def test_materialize_equals_the_eager_init_bit_for_bit() -> None:
    with torch.device("meta"):
        meta = Block()
    meta.head.weight = meta.emb.weight
    eager = Block()
    assert materialize_(meta, "he", generator=_gen(7)) is meta
    sp.init.he_(eager, generator=_gen(7))
    eager.norm.reset_parameters()
    eager.bn.reset_parameters()
    for (name, a), (_, b) in zip(meta.state_dict().items(), eager.state_dict().items()):
        assert a.device.type == "cpu"
        assert torch.equal(a, b), name
    assert meta.head.weight is meta.emb.weight
    assert float(meta.bn.running_var.min()) == 1.0 and float(meta.norm.weight.detach().min()) == 1.0


def test_materialize_other_schemes_settings_and_devices() -> None:
    with torch.device("meta"):
        net = sp.models.plain_cnn(4, 16)
    materialize_(net, "variance_scaling", scale=2.0, distribution="uniform", generator=_gen(0), device="cpu")
    for _, layer in sp.init.weight_layers(net):
        assert_variance(layer.weight, 2.0 / sp.fans(layer)[0], "uniform")
    with torch.device("meta"):
        lin = nn.Linear(64, 32)
    materialize_(lin, sp.init.orthogonal_, generator=_gen(0))
    assert torch.allclose(lin.weight @ lin.weight.T, torch.eye(32), atol=1e-5)
    with torch.device("meta"):
        keep = nn.Linear(400, 300)
    materialize_(keep, "he", zero_bias=False, generator=_gen(0))  # PyTorch's default bias, U(+-1/sqrt(fan_in))
    assert 0 < float(keep.bias.detach().abs().max()) <= 1 / 20


def test_materialize_only_writes_meta_tensors() -> None:
    net = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8, device="meta"), nn.LayerNorm(8))
    with torch.no_grad():
        net[2].weight.fill_(3.0)
    before = net[0].weight.detach().clone()
    net[2].bias = nn.Parameter(torch.empty(8, device="meta"))
    materialize_(net, "glorot")
    assert torch.equal(net[0].weight, before)
    assert not net[1].weight.is_meta and float(net[1].bias.detach().abs().max()) == 0.0
    assert float(net[2].weight.detach().min()) == 3.0  # kept through reset_parameters
    assert float(net[2].bias.detach().abs().max()) == 0.0


def test_materialize_refuses_what_nothing_can_initialize_before_allocating() -> None:
    class Rotary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("inv_freq", torch.empty(8))

    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 4), Rotary())
    with pytest.raises(SignalpropError, match=r"1\.inv_freq \(Rotary\).*reset_parameters"):
        materialize_(net)
    assert net[0].weight.is_meta
    with pytest.raises(SignalpropError, match="unknown scheme 'hee'"):
        materialize_(nn.Linear(2, 2, device="meta"), "hee")
    with pytest.raises(SignalpropError, match="real device"):
        materialize_(nn.Linear(2, 2, device="meta"), device="meta")


def test_meta_model_init_in_place_is_a_cheap_no_op() -> None:
    with torch.device("meta"):
        net = sp.models.mlp(3, 64)
    assert sp.init.he_(net, generator=_gen(0)) is net
    assert all(p.is_meta for p in net.parameters())


# ---- two gloo ranks -------------------------------------------------------------------------------
def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results: dict[str, torch.Tensor] = {}
        # 1. a DTensor parameter, sharded on rows (odd size: uneven shards) and on columns
        for key, placement in (("rows", Shard(0)), ("cols", Shard(1)), ("repl", Replicate())):
            layer = nn.Linear(24, 37)
            layer.weight = nn.Parameter(distribute_tensor(torch.empty(37, 24), mesh, [placement]))
            sp.init.he_(layer, generator=_gen(11))
            results[f"he_{key}"] = layer.weight.full_tensor().detach()
            results[f"he_{key}_local"] = layer.weight.to_local().detach().clone()
        orth = nn.Linear(24, 16)
        orth.weight = nn.Parameter(distribute_tensor(torch.empty(16, 24), mesh, [Shard(0)]))
        sp.init.orthogonal_(orth, generator=_gen(3))
        results["orth"] = orth.weight.full_tensor().detach()
        # 2. no generator: rank 0's seed is broadcast, so the shards are slices of one draw
        big = nn.Linear(256, 512)
        big.weight = nn.Parameter(distribute_tensor(torch.empty(512, 256), mesh, [Shard(0)]))
        torch.manual_seed(100 + rank)  # the ranks' default generators differ on purpose
        sp.init.he_(big)
        results["nogen"] = big.weight.full_tensor().detach()
        # 3. FSDP2 on a meta-device model, then materialize_
        torch.manual_seed(0)
        with torch.device("meta"):
            net = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.LayerNorm(33), nn.Linear(33, 8))
        fully_shard(net[0], mesh=mesh)
        fully_shard(net, mesh=mesh)
        materialize_(net, "he", generator=_gen(5))
        results["fsdp_local0"] = net[0].weight.to_local().detach().clone()
        for i in (0, 3):
            results[f"fsdp_{i}"] = net[i].weight.full_tensor().detach()
            results[f"fsdp_{i}_bias"] = net[i].bias.full_tensor().detach()
        results["fsdp_norm"] = net[2].weight.full_tensor().detach()
        net(torch.randn(4, 16)).sum().backward()  # the sharded model trains
        results["fsdp_grad_finite"] = torch.tensor(all(bool(p.grad.full_tensor().isfinite().all()) for p in net.parameters()))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.skipif(sys.platform == "win32", reason="gloo file:// rendezvous")
@pytest.mark.slow
def test_sharded_init_on_two_gloo_ranks(tmp_path: object) -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = str(tmp_path)
    mp.spawn(_worker, args=(2, os.path.join(out, "pg"), out), nprocs=2, join=True)
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt")) for r in (0, 1))

    for key in ("rows", "cols", "repl"):  # the assembled tensor is the unsharded draw, bit for bit
        eager = sp.init.he_(nn.Linear(24, 37), generator=_gen(11)).weight.detach()
        assert torch.equal(r0[f"he_{key}"], eager) and torch.equal(r1[f"he_{key}"], eager)
    assert r0["he_rows_local"].shape == (19, 24) and r1["he_rows_local"].shape == (18, 24)
    assert torch.equal(torch.cat([r0["he_rows_local"], r1["he_rows_local"]]), r0["he_rows"])
    assert torch.equal(torch.cat([r0["he_cols_local"], r1["he_cols_local"]], dim=1), r0["he_cols"])
    assert torch.equal(r0["orth"], sp.init.orthogonal_(nn.Linear(24, 16), generator=_gen(3)).weight.detach())

    assert torch.equal(r0["nogen"], r1["nogen"])
    assert_variance(r0["nogen"], 2.0 / 256, "normal")
    top, bottom = r0["nogen"][:256], r0["nogen"][256:]
    assert not torch.equal(top, bottom)  # the shards are different slices, not one draw per rank repeated

    eager_net = nn.Sequential(nn.Linear(16, 33), nn.ReLU(), nn.LayerNorm(33), nn.Linear(33, 8))
    sp.init.he_(eager_net, generator=_gen(5))
    for i in (0, 3):
        assert torch.equal(r0[f"fsdp_{i}"], eager_net[i].weight.detach())
        assert float(r0[f"fsdp_{i}_bias"].abs().max()) == 0.0
    assert torch.equal(r0["fsdp_local0"], eager_net[0].weight.detach()[:17])
    assert torch.equal(r1["fsdp_local0"], eager_net[0].weight.detach()[17:])
    assert torch.equal(r0["fsdp_norm"], torch.ones(33))
    assert bool(r0["fsdp_grad_finite"]) and bool(r1["fsdp_grad_finite"])
