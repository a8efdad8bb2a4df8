"""Two real torch.distributed processes (gloo, loopback): identical masks, identical replicas, exact changes."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import shira_hooks
from shira_hooks import digest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, lazy: bool, mode: str = "dense") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from conftest import llama_batches, make_llama, snapshot

    model = make_llama()  # same seed on every rank
    base = snapshot(model)
    shard = llama_batches(2, seed=10 + rank)  # each rank scores its own data
    if lazy:
        shira = shira_hooks.attach(model, 0.02, "snip", calibration_steps=2)
    else:  # rank 0 has one batch more: every rank uses as many as all have
        extra = llama_batches(1, seed=99) if rank == 0 else []
        shira = shira_hooks.attach(model, 0.02, "snip", calibration=shard + extra, progress=False, mode=mode)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in (shard if lazy else []) + llama_batches(3, seed=20 + rank):
        ddp(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    shira._sync()  # compact modes: the weights hold the trained values
    changed_outside = []
    params = dict(model.named_parameters())
    for name, idx in shira.masks.items():
        diff = (params[name].detach().reshape(-1) != base[name].reshape(-1)).nonzero().reshape(-1)
        if not bool(torch.isin(diff, idx.long()).all()):
            changed_outside.append(name)
    if rank == 0:
        shira.extract().save(os.path.join(out, "adapter.safetensors"))
    report = {
        "masks": {n: digest(i) for n, i in shira.masks.items()},
        "weights": digest(torch.cat([p.detach().reshape(-1) for p in model.parameters()])),
        "changed_outside": changed_outside,
        "verify": shira.verify(),
        "trained": int(sum((params[n] != base[n]).sum() for n in shira.masks)),
    }
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    shira.detach()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    "lazy, mode",
    [(False, "dense"), (True, "dense"), (False, "sparse"), (False, "compact")],
    ids=["eager", "lazy", "sparse", "compact"],
)
def test_two_process_ddp(tmp_path, lazy, mode):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), lazy, mode), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["masks"] == r1["masks"]  # scores summed across ranks before top-k
    if not lazy:  # eager: each pass's gradient averaged over the ranks, so the masks one process chooses
        from conftest import llama_batches, make_llama

        model = make_llama()
        both = [
            {k: torch.cat([a[k], b[k]]) for k in a}
            for a, b in zip(llama_batches(2, seed=10), llama_batches(2, seed=11))
        ]
        one = shira_hooks.attach(model, 0.02, "snip", calibration=both, progress=False)
        assert r0["masks"] == {n: digest(i) for n, i in one.masks.items()}
        one.detach()
    assert r0["weights"] == r1["weights"]  # replicas equal
    assert r0["changed_outside"] == r1["changed_outside"] == []
    assert r0["verify"] == r1["verify"] == [] and r0["trained"] > 0
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["adapter.safetensors"]


def _late_writer_worker(rank: int, world: int, port: int, out: str) -> None:
    """Variants where the gradient reaching the optimizer is not the one the hook masked."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powerSGD

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from conftest import llama_batches, make_llama

    report = {}
    for variant in ("powersgd", "bucket_view", "no_sync"):
        model = make_llama()
        shira = shira_hooks.attach(model, 0.02, "rand")  # default seed: drawn on rank 0, broadcast
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=variant != "no_sync")
        if variant == "powersgd":  # writes a dense low-rank approximation back after the hooks ran
            state = powerSGD.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
            ddp.register_comm_hook(state, powerSGD.powerSGD_hook)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        batches = llama_batches(8, seed=20 + rank)
        for step in range(4):
            pair = batches[2 * step : 2 * step + 2]
            if variant == "no_sync":  # accumulate locally, communicate on the last micro-batch
                with ddp.no_sync():
                    ddp(**pair[0]).loss.backward()
                ddp(**pair[1]).loss.backward()
            else:
                for batch in pair:
                    ddp(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
        report[variant] = {
            "seed": shira.seed,
            "masks": {n: digest(i) for n, i in shira.masks.items()},
            "weights": digest(torch.cat([p.detach().reshape(-1) for p in model.parameters()])),
            "verify": shira.verify(),
            "trained": shira.extract().num_entries,
        }
        shira.detach()
    with open(os.path.join(out, f"late{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_ddp_comm_hooks_bucket_views_and_no_sync_stay_exact(tmp_path):
    mp.spawn(_late_writer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"late{r}.json").read_text()) for r in (0, 1))
    for variant in ("powersgd", "bucket_view", "no_sync"):
        assert r0[variant]["seed"] == r1[variant]["seed"] and r0[variant]["masks"] == r1[variant]["masks"], variant
        assert r0[variant]["weights"] == r1[variant]["weights"], variant
        assert r0[variant]["verify"] == r1[variant]["verify"] == [], variant
    assert len({r0[v]["seed"] for v in r0}) == 3  # a fresh seed per attach


class _TwoExperts(nn.Module):
    """Two same-shape experts; each batch picks which run (routing), so ranks get gradients of different layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)

    def forward(self, x, route):
        return sum(getattr(self, name)(x) for name in route).pow(2).sum()


def _routed_batches(rank: int) -> list:
    g = torch.Generator().manual_seed(100 + rank)
    xs = [torch.randn(4, 8, generator=g) for _ in range(2)]
    routes = [["a"], ["b"]] if rank == 0 else [["b", "a"], ["a"]]  # other orders, and no b in rank 1's second pass
    return list(zip(xs, routes))


def _routing_and_zero_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    shira = shira_hooks.attach(
        _TwoExperts(), 0.25, "grad", calibration=_routed_batches(rank), loss_fn=lambda m, b: m(*b), progress=False
    )
    report = {"routed_masks": {n: i.tolist() for n, i in shira.masks.items()}}
    shira.detach()
    # compact values stepped by ZeroRedundancyOptimizer, whose step runs an inner optimizer's step
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    shira = shira_hooks.attach(model, 0.25, "rand", seed=1, mode="compact")
    optimizer = ZeroRedundancyOptimizer(
        [p for p in model.parameters() if p.requires_grad], optimizer_class=torch.optim.SGD, lr=0.1
    )
    model(torch.randn(4, 8)).pow(2).sum().backward()
    optimizer.step()
    report["zero_stale"] = [
        float((layer.weight.detach().reshape(-1)[t.indices] - layer.shira_values.detach()).abs().max())
        for layer, t in zip(model, shira._targets)
    ]
    shira.detach()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_eager_calibration_with_routing_and_zero_redundancy_optimizer(tmp_path):
    """Layers that get gradients on some ranks only, in other orders: the same masks as one process on the
    global batches (each pass's gradient averaged over the ranks); ZeRO's nested step writes the values."""
    mp.spawn(_routing_and_zero_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["routed_masks"] == r1["routed_masks"]
    passes = list(zip(_routed_batches(0), _routed_batches(1)))  # one process: pass p's loss is the ranks' mean
    one = shira_hooks.attach(
        _TwoExperts(),
        0.25,
        "grad",
        calibration=passes,
        progress=False,
        loss_fn=lambda m, pair: (m(*pair[0]) + m(*pair[1])) / 2,
    )
    assert r0["routed_masks"] == {n: i.tolist() for n, i in one.masks.items()}
    one.detach()
    assert r0["zero_stale"] == r1["zero_stale"] == [0.0, 0.0]
