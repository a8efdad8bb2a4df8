"""FSDP2 (``fully_shard``) in two real gloo processes, checked against one process on the same global batches.

One spawned run (the module fixture ``fsdp2``: process start-up dominates) does every multi-process part:
dense training with attach before and after ``fully_shard``, grad/snip calibration on the shards (eager
and lazy), compact/sparse mode attached before and after ``fully_shard``, bfloat16 compute with gradient
checkpointing, resume from a saved state (also into split compact values), and the refusals (Shard(1)).
Each rank reports what it saw as JSON and rank 0 saves the adapters; each test below checks one promise
against that report, and the parent process trains the single-process references it compares with.
"""

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import shira_hooks
from shira_hooks import digest

from conftest import llama_batches, make_llama

SPARSITY, SEED, STEPS, ACCUMULATE, LR, CLIP = 0.05, 3, 2, 2, 1e-2, 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches(n: int, seed: int) -> list[dict]:
    """n global micro-batches of 4 rows; rank r of 2 takes rows [2r, 2r + 2) of each."""
    return llama_batches(n, seed=seed, batch=4)


def _rows(batch: dict, rank: int, world: int) -> dict:
    size = batch["input_ids"].shape[0] // world
    return {k: v[rank * size : (rank + 1) * size] for k, v in batch.items()}


def _train(model, batches: list[dict]) -> None:
    """AdamW(wd=0.1), ACCUMULATE micro-batches per step, clip_grad_norm_ over every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.1)
    for step in range(len(batches) // ACCUMULATE):
        for batch in batches[step * ACCUMULATE : (step + 1) * ACCUMULATE]:
            model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad()


def _shard(model, **kwargs) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def _full_weights(model) -> dict[str, torch.Tensor]:
    from shira_hooks.distributed import gather

    return {n: gather(p.detach()).clone() for n, p in model.named_parameters()}


def _changed_outside(shira, base: dict, model) -> int:
    now = _full_weights(model)
    total = 0
    for name, indices in shira.masks.items():
        changed = (now[name].reshape(-1) != base[name].reshape(-1)).nonzero().reshape(-1)
        total += int((~torch.isin(changed, indices.long())).sum())
    return total


def _error(fn) -> dict | None:
    """What ``fn()`` raised, as JSON for the parent process: {"type", "message"}; None when it raised nothing."""
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the parent checks the type: anything but a ShiraError fails there
        return {"type": type(error).__name__, "message": str(error)}
    return None


def _attach_and_shard(model, order: str, *args, state: str | None = None, shard: dict | None = None, **kwargs):
    """``attach(model, SPARSITY, *args, **kwargs)`` before or after ``fully_shard`` (``order``), loading ``state``
    right after attach. Returns the handle and weak references to the parameters that fully_shard replaced
    (attached before: the full weights, which nothing may keep alive; attached after: none)."""
    if order == "after":
        _shard(model, **(shard or {}))
    shira = shira_hooks.attach(model, SPARSITY, *args, **kwargs)
    if state is not None:
        shira.load_state(state)
    if order == "after":
        return shira, []
    unsharded = [weakref.ref(p) for p in model.parameters()]
    _shard(model, **(shard or {}))
    return shira, unsharded


def _train_and_save(shira, model, base: dict, train: list[dict], path: str, rank: int):
    """Train, extract (every rank: it gathers), rank 0 saves; returns the adapter and the exactness checks."""
    _train(model, train)
    gc.collect()
    adapter = shira.extract()
    if rank == 0:
        adapter.save(path)
    return adapter, {"verify": shira.verify(), "outside": _changed_outside(shira, base, model)}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from torch.distributed.tensor import Shard

    report: dict = {}
    train = [_rows(b, rank, world) for b in _global_batches(STEPS * ACCUMULATE, seed=7)]
    for order in ("before", "after"):  # attach before / after fully_shard
        model = make_llama()
        base = _full_weights(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        shira, unsharded = _attach_and_shard(model, order, "rand", seed=SEED)
        adapter, report[order] = _train_and_save(
            shira, model, base, train, os.path.join(out, f"{order}.safetensors"), rank
        )
        report[order].update(
            {
                "adapter": digest(torch.cat([d.values for d in adapter.deltas.values()])),
                "sharded": type(model.model.layers[0].self_attn.q_proj.weight).__name__,
                "unsharded_alive": sum(r() is not None for r in unsharded),
            }
        )
        shira.detach()
        report[order]["flags_restored"] = flags == {n: p.requires_grad for n, p in model.named_parameters()}

    for mode, order in (
        ("compact", "after"),
        ("sparse", "after"),
        ("sparse", "before"),
    ):  # the k values split across the ranks
        model = make_llama()
        base = _full_weights(model)
        # attached before: fully_shard shards shira_values with the weight; the handle follows both
        shira, unsharded = _attach_and_shard(model, order, "rand", seed=SEED, mode=mode)
        _, report[f"{mode}_{order}"] = _train_and_save(
            shira, model, base, train, os.path.join(out, f"{mode}_{order}.safetensors"), rank
        )
        values = [m.shira_values for m in model.modules() if "shira_values" in m._parameters]
        report[f"{mode}_{order}"].update(
            {
                "k": shira.num_trainable,
                "values": type(values[0]).__name__,
                "local": sum(v.to_local().numel() for v in values),
                "layers": len(values),
                "unsharded_alive": sum(r() is not None for r in unsharded),  # the full weights before fully_shard
            }
        )
        shira.detach()
        left = [p.requires_grad for n, p in model.named_parameters() if n.endswith("shira_values")]
        report[f"{mode}_{order}"]["left"] = [len(left), any(left)]  # shira_values still registered, trainable

    # bfloat16 compute (MixedPrecisionPolicy, as Accelerate's mixed_precision: bf16) and gradient checkpointing
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for mode in ("dense", "sparse"):
        model = make_llama()
        model.gradient_checkpointing_enable()
        base = _full_weights(model)
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shira, _ = _attach_and_shard(model, "before", "rand", seed=SEED, mode=mode, shard={"mp_policy": policy})
        _, report[f"bf16_{mode}"] = _train_and_save(
            shira, model, base, train, os.path.join(out, f"bf16_{mode}.safetensors"), rank
        )
        shira.detach()

    # grad/snip scored on the shards: eager (attach after fully_shard) and lazy (the first backward passes)
    calibration = [_rows(b, rank, world) for b in _global_batches(2, seed=11)]
    model = make_llama()
    _shard(model)
    shira = shira_hooks.attach(model, SPARSITY, "snip", calibration=calibration, progress=False)
    if rank == 0:
        shira.save_state(os.path.join(out, "snip_state.safetensors"))
    report["snip_masks"] = {n: i.tolist() for n, i in shira.masks.items()}
    shira.detach()
    model = make_llama()  # scored before fully_shard (the Trainer's order), each pass averaged over the ranks
    shira = shira_hooks.attach(model, SPARSITY, "snip", calibration=calibration, progress=False)
    _shard(model)
    report["snip_before_masks"] = {n: i.tolist() for n, i in shira.masks.items()}
    shira.detach()
    model = make_llama()
    _shard(model)
    shira = shira_hooks.attach(model, SPARSITY, "grad", calibration_steps=2)
    _train(model, calibration + train)  # the first step's two passes calibrate, then train
    report["lazy"] = {"masks": {n: i.tolist() for n, i in shira.masks.items()}, "verify": shira.verify()}
    adapter = shira.extract()
    if rank == 0:
        adapter.save(os.path.join(out, "lazy.safetensors"))
    shira.detach()

    # resume: another handle on another sharded model takes the saved masks
    dist.barrier()
    model = make_llama()
    _shard(model)
    shira = shira_hooks.attach(model, SPARSITY, "rand", seed=SEED + 1)
    shira.load_state(os.path.join(out, "snip_state.safetensors"))
    report["resumed_masks"] = {n: i.tolist() for n, i in shira.masks.items()}
    shira.detach()
    for order in ("before", "after"):  # resume into k values split across the ranks, then train
        model = make_llama()
        base = _full_weights(model)
        state = os.path.join(out, "snip_state.safetensors")
        shira, _ = _attach_and_shard(model, order, "rand", seed=SEED + 1, mode="sparse", state=state)
        _, report[f"resumed_{order}"] = _train_and_save(
            shira, model, base, train, os.path.join(out, f"resumed_{order}.safetensors"), rank
        )
        shira.detach()

    # refusals
    model = make_llama()
    _shard(model, shard_placement_fn=lambda param: Shard(1) if param.dim() > 1 else Shard(0))
    report["shard1_attach"] = _error(lambda: shira_hooks.attach(model, SPARSITY, "rand", seed=0))
    model = make_llama()
    shira = shira_hooks.attach(model, SPARSITY, "rand", seed=0)
    _shard(model, shard_placement_fn=lambda param: Shard(1) if param.dim() > 1 else Shard(0))
    report["shard1_forward"] = _error(lambda: model(**train[0]))
    shira.detach()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def _reference(mask: str, batches: list[dict], **kwargs):
    """One process on the global batches; returns (model, handle)."""
    model = make_llama()
    shira = shira_hooks.attach(model, SPARSITY, mask, progress=False, **kwargs)
    _train(model, batches)
    return model, shira


def _logits_after(adapter: shira_hooks.SparseAdapter, batch: dict) -> torch.Tensor:
    model = make_llama()
    with shira_hooks.apply(model, adapter), torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def _masks(shira: shira_hooks.ShiraHandle) -> dict[str, list[int]]:
    """The handle's masks as the workers report them."""
    return {n: i.tolist() for n, i in shira.masks.items()}


@dataclass
class Fsdp2Run:
    """What the two-process run left: each rank's report, and the folder where rank 0 saved its files."""

    ranks: tuple[dict, dict]
    folder: Path

    @property
    def report(self) -> dict:
        """Rank 0's report (test_every_rank_reports_the_same holds rank 1 to it)."""
        return self.ranks[0]

    def adapter(self, case: str) -> shira_hooks.SparseAdapter:
        return shira_hooks.SparseAdapter.load(self.folder / f"{case}.safetensors")


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> Fsdp2Run:
    """The module's one spawn of two gloo processes (``_worker``); every FSDP2 test below reads its part."""
    folder = tmp_path_factory.mktemp("fsdp2")
    mp.spawn(_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    ranks = tuple(json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1))
    return Fsdp2Run(ranks, folder)


TRAIN = (STEPS * ACCUMULATE, 7)  # (micro-batches, seed) of the workers' training batches
DENSE = ("before", "after")  # dense mode, attached before / after fully_shard
SPLIT = ("compact_after", "sparse_after", "sparse_before")  # the k values split across the ranks
EXACT = (
    *DENSE,
    *SPLIT,
    "bf16_dense",
    "bf16_sparse",
    "resumed_before",
    "resumed_after",
)  # reports with verify + outside


@pytest.fixture(scope="module")
def probe() -> dict:
    """The batch whose logits compare a trained model with the single-process one."""
    return _global_batches(1, seed=99)[0]


@pytest.fixture(scope="module")
def rand_reference(probe) -> tuple[shira_hooks.SparseAdapter, torch.Tensor]:
    """One process, dense mode, rand masks, on the global batches: (its adapter, its logits on ``probe``)."""
    _, shira = _reference("rand", _global_batches(*TRAIN), seed=SEED)
    reference = shira.extract()
    shira.detach()
    return reference, _logits_after(reference, probe)


def _without_local(report: dict) -> dict:
    """The report less each rank's own share of the split values (the one part that differs by rank)."""
    return {
        case: {k: v for k, v in part.items() if k != "local"} if case in SPLIT else part
        for case, part in report.items()
    }


def test_every_rank_reports_the_same(fsdp2):
    """The same masks, adapters and checks on every rank."""
    assert _without_local(fsdp2.ranks[0]) == _without_local(fsdp2.ranks[1])


@pytest.mark.parametrize("case", SPLIT)
def test_split_values_are_dtensors_shared_out_across_the_ranks(fsdp2, case):
    """compact/sparse: each rank holds its chunk of a layer's k values, at most one entry more than the next rank."""
    r0, r1 = (report[case] for report in fsdp2.ranks)
    assert r0["values"] == "DTensor"
    assert r0["local"] + r1["local"] == r0["k"] and 0 <= r0["local"] - r1["local"] <= r0["layers"], r0


@pytest.mark.parametrize("order", DENSE)
def test_weights_are_dtensors_when_attached_before_or_after(fsdp2, order):
    assert fsdp2.report[order]["sharded"] == "DTensor"


@pytest.mark.parametrize("case", (*DENSE, *SPLIT))
def test_no_full_weight_is_kept_alive(fsdp2, case):
    """Attached before fully_shard, the handle lets go of the full weights it replaced: the memory FSDP2 saves."""
    assert fsdp2.report[case]["unsharded_alive"] == 0


@pytest.mark.parametrize("case", EXACT)
def test_only_masked_entries_change(fsdp2, case):
    """verify() is empty on the shards, and the gathered weights changed only inside the masks."""
    assert fsdp2.report[case]["verify"] == [] and fsdp2.report[case]["outside"] == 0, fsdp2.report[case]


def test_lazy_calibration_changes_only_masked_entries(fsdp2):
    assert fsdp2.report["lazy"]["verify"] == []


@pytest.mark.parametrize("order", DENSE)
def test_detach_restores_every_requires_grad_flag(fsdp2, order):
    assert fsdp2.report[order]["flags_restored"] is True


@pytest.mark.parametrize("case", SPLIT)
def test_detach_leaves_sharded_shira_values_registered_and_frozen(fsdp2, rand_reference, case):
    """Attached after fully_shard, detach removes shira_values; attached before, fully_shard sharded them with the
    layer, so they stay registered, frozen: one per target."""
    layers = len(rand_reference[0].deltas)
    assert fsdp2.report[case]["left"] == ([0, False] if case.endswith("after") else [layers, False])


@pytest.mark.parametrize("order", DENSE)
def test_dense_training_matches_one_process(fsdp2, rand_reference, probe, order):
    """The same masks and values as one process on the global batches, and the same logits."""
    reference, expected = rand_reference
    adapter = fsdp2.adapter(order)
    assert adapter.deltas.keys() == reference.deltas.keys()
    for name, delta in adapter.deltas.items():
        assert torch.equal(delta.indices, reference.deltas[name].indices), name
        assert torch.allclose(delta.values, reference.deltas[name].values, atol=1e-6), name
    assert (_logits_after(adapter, probe) - expected).abs().max() < 1e-5


@pytest.mark.parametrize("case", SPLIT)
def test_split_training_matches_one_process(fsdp2, rand_reference, probe, case):
    """compact/sparse mode under FSDP2 trains as the dense mode does in one process."""
    reference, expected = rand_reference
    adapter = fsdp2.adapter(case)
    for name, delta in adapter.deltas.items():
        assert torch.equal(delta.indices, reference.deltas[name].indices), name
        gap = (delta.values - reference.deltas[name].values).abs().max()
        assert torch.allclose(delta.values, reference.deltas[name].values, atol=1e-5), (name, gap)
    assert (_logits_after(adapter, probe) - expected).abs().max() < 1e-5


def test_bf16_with_checkpointing_trains_dense_and_sparse_alike(fsdp2, rand_reference):
    """MixedPrecisionPolicy(bfloat16) and gradient checkpointing: both modes reach the same adapter, and bf16 did
    compute (the adapter is not the float32 one)."""
    dense, sparse = fsdp2.adapter("bf16_dense"), fsdp2.adapter("bf16_sparse")
    for name, delta in dense.deltas.items():
        assert torch.equal(delta.indices, sparse.deltas[name].indices), name
        assert torch.allclose(delta.values, sparse.deltas[name].values, atol=1e-5), name
    reference = rand_reference[0].deltas
    assert not all(torch.allclose(d.values, reference[n].values, atol=1e-6) for n, d in dense.deltas.items())


@pytest.fixture(scope="module")
def snip_masks() -> dict[str, list[int]]:
    """The snip masks one process chooses on the global calibration batches."""
    model = make_llama()
    snip = shira_hooks.attach(model, SPARSITY, "snip", calibration=_global_batches(2, seed=11), progress=False)
    masks = _masks(snip)
    snip.detach()
    return masks


@pytest.mark.parametrize("case", ["snip_masks", "snip_before_masks"])
def test_snip_on_the_shards_chooses_the_masks_of_one_process(fsdp2, snip_masks, case):
    """Scored after fully_shard (on the shards) or before it (each pass averaged over the ranks)."""
    assert fsdp2.report[case] == snip_masks


def test_load_state_on_the_shards_takes_the_saved_masks(fsdp2):
    """A handle attached with other masks on another sharded model takes the masks of the saved state."""
    assert fsdp2.report["resumed_masks"] == fsdp2.report["snip_masks"]


@pytest.fixture(scope="module")
def resumed_reference(fsdp2) -> shira_hooks.SparseAdapter:
    """One process loads the run's saved snip state into dense mode (over other masks) and trains."""
    model = make_llama()
    resumed = shira_hooks.attach(model, SPARSITY, "rand", seed=SEED + 1)
    resumed.load_state(fsdp2.folder / "snip_state.safetensors")
    _train(model, _global_batches(*TRAIN))
    reference = resumed.extract()
    resumed.detach()
    return reference


@pytest.mark.parametrize("order", DENSE)
def test_resume_into_split_values_matches_one_process(fsdp2, resumed_reference, order):
    """The saved state loaded into sparse mode (values split across the ranks), then trained: the adapter of one
    process that loads the same state into dense mode and trains."""
    adapter = fsdp2.adapter(f"resumed_{order}")
    for name, delta in adapter.deltas.items():
        assert torch.equal(delta.indices, resumed_reference.deltas[name].indices), name
        assert torch.allclose(delta.values, resumed_reference.deltas[name].values, atol=1e-5), name


def test_lazy_grad_calibration_matches_one_process(fsdp2, probe):
    """grad masks scored by the first training passes on the shards: the masks and the model of one process."""
    _, lazy = _reference("grad", _global_batches(2, seed=11) + _global_batches(*TRAIN), calibration_steps=2)
    masks, reference = _masks(lazy), lazy.extract()
    lazy.detach()
    assert fsdp2.report["lazy"]["masks"] == masks
    assert (_logits_after(fsdp2.adapter("lazy"), probe) - _logits_after(reference, probe)).abs().max() < 1e-5


def test_shard1_is_refused_at_attach(fsdp2):
    """Weights sharded by columns (Shard(1)) cannot hold a row-sharded mask: attach says to use Shard(0)."""
    error = fsdp2.report["shard1_attach"]
    assert error is not None and error["type"] == "ShiraError" and re.search(r"Shard\(0\)", error["message"]), error


def test_shard1_is_refused_at_the_first_forward(fsdp2):
    """Attached, then sharded by columns: the first forward refuses the placements."""
    error = fsdp2.report["shard1_forward"]
    assert (
        error is not None
        and error["type"] == "ShiraError"
        and re.search(r"placements \(Shard\(dim=1\),\)", error["message"])
    ), error


FSDP2_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: SHARDED_STATE_DICT
  fsdp_cpu_ram_efficient_loading: false
"""


@pytest.mark.parametrize("mode", ["dense", "sparse", "dora"])
def test_hf_trainer_under_accelerate_fsdp2(tmp_path, mode):
    """attach, then the Trainer shards the model (Accelerate's fsdp2_prepare_model) and trains with ShiraCallback."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("accelerate is not installed")
    (tmp_path / "fsdp2.yaml").write_text(FSDP2_CONFIG)
    script = Path(__file__).parent / "fsdp_trainer_run.py"
    command = [
        accelerate,
        "launch",
        "--config_file",
        str(tmp_path / "fsdp2.yaml"),
        "--main_process_port",
        str(_free_port()),
        str(script),
        str(tmp_path / "run"),
        mode,
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / "run" / f"rank{r}.json").read_text()) for r in (0, 1))
    for report in (r0, r1):
        assert report["fsdp"] and report["weight_type"] == "DTensor"  # really sharded, not DDP
        assert report["values_type"] == ("DTensor" if mode in ("sparse", "dora") else "NoneType")
        assert report["verify"] == [] and report["outside"] == 0
        assert report["changed"] == report["budget"] > 0  # rand masks of a tiny model: every masked entry moves
    assert r0["masks"] == r1["masks"]
    assert r0["logits_error"] < 1e-5  # the saved adapter on a fresh base reproduces the trained model
    assert r0["checkpoint_masks_equal"] and r0["checkpoint_adapter"]
    # trainer.train(resume_from_checkpoint=checkpoint-2) with a handle attached with other masks: the same run
    assert (
        r0["resumed_masks_equal"] and r1["resumed_masks_equal"] and r0["resumed_verify"] == r1["resumed_verify"] == []
    )
    assert r0["resumed_adapter_error"] < 1e-6, r0["resumed_adapter_error"]


class _FakeEngine(nn.Module):
    """Stands in for deepspeed.DeepSpeedEngine (not installed): refused by its class and module name."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


_FakeEngine.__name__ = _FakeEngine.__qualname__ = "DeepSpeedEngine"
_FakeEngine.__module__ = "deepspeed.runtime.engine"


def test_deepspeed_engine_is_refused():
    from conftest import make_mlp

    model = make_mlp()
    with pytest.raises(shira_hooks.ShiraError, match="DeepSpeed engine .*FSDP2"):
        shira_hooks.attach(_FakeEngine(model), 0.1, "rand", seed=0)
    shira = shira_hooks.attach(model, 0.1, "rand", seed=0)  # attached, then wrapped: refused at its first forward
    with pytest.raises(shira_hooks.ShiraError, match="was wrapped in a DeepSpeed engine"):
        _FakeEngine(model)(torch.randn(2, 16))
    shira.detach()


def _fsdp1_stand_in(model: nn.Module) -> nn.Module:
    """A FullyShardedDataParallel instance around ``model`` without its __init__ (which needs a GPU here)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(wrapper)
    wrapper._fsdp_wrapped_module = model  # what FullyShardedDataParallel.module returns
    return wrapper


def test_fsdp1_is_refused():
    from conftest import make_mlp

    model = make_mlp()
    with pytest.raises(shira_hooks.ShiraError, match="FSDP1 FullyShardedDataParallel wrapper.*fully_shard"):
        shira_hooks.attach(_fsdp1_stand_in(model), 0.1, "rand", seed=0)
    shira = shira_hooks.attach(model, 0.1, "rand", seed=0)
    with pytest.raises(shira_hooks.ShiraError, match="was wrapped in an FSDP1"):
        _fsdp1_stand_in(model)(torch.randn(2, 16))
    shira.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (FSDP1 does not run on CPU)")
def test_real_fsdp1_is_refused(tmp_path):
    from torch.distributed.fsdp import FullyShardedDataParallel

    from conftest import make_mlp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = make_mlp().cuda()
        shira = shira_hooks.attach(model, 0.1, "rand", seed=0)
        wrapped = FullyShardedDataParallel(model, device_id=0)
        with pytest.raises(shira_hooks.ShiraError, match="was wrapped in an FSDP1"):
            wrapped(torch.randn(2, 16, device="cuda"))
        shira.detach()
        with pytest.raises(shira_hooks.ShiraError, match="FSDP1"):
            shira_hooks.attach(wrapped, 0.1, "rand", seed=0)
    finally:
        dist.destroy_process_group()


def test_replaced_weight_is_refused_at_the_step():
    """Replaced once training runs (forward passes are no longer watched): the new weight's gradient was not
    masked in the backward pass, so the step refuses it. (Replaced before, it is followed: test_lifecycle.)"""
    from conftest import make_mlp

    model = make_mlp()
    shira = shira_hooks.attach(model, 0.1, "rand", seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()
    model.layers[0].weight = nn.Parameter(model.layers[0].weight.detach().clone())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 16)).sum().backward()
    with pytest.raises(
        shira_hooks.ShiraError,
        match="'layers.0.weight' is no longer the parameter.*received a gradient without the mask",
    ):
        optimizer.step()
    shira.detach()


def test_fsdp_recipe_with_torchrun(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "fsdp.py"
    command = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        str(recipe),
        "--tiny",
        "--attach",
        "before",
        "--mode",
        "sparse",
        "--output-dir",
        str(tmp_path / "run"),
    ]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 ranks; q_proj.weight (64, 64) is a DTensor, (32, 64) on each rank" in done.stdout
    assert "mode='sparse', attached before fully_shard" in done.stdout
    assert done.stdout.count("entries changed outside the masks: none") == 1  # rank 0 reports
    assert "accuracy after (fresh base + adapter): " in done.stdout
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["adapter.safetensors"]


def test_fsdp_cost_quick(tmp_path):
    """The benchmark's smoke run, with SHiRA attached before fully_shard (the Trainer's order)."""
    pytest.importorskip("peft")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_cost.py"
    command = [sys.executable, str(script), "--quick", "--attach", "before", "--json", str(tmp_path / "f.json")]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rows = {(r["method"], r["wrapper"]): r for r in json.loads((tmp_path / "f.json").read_text())["rows"]}
    assert set(rows) == {(m, w) for m in ("full", "shira_dense", "shira_sparse", "peft_lora") for w in ("fsdp2", "ddp")}
    for r in rows.values():
        assert (
            r["step_min_s"] <= r["step_median_s"] <= r["step_max_s"]
            and r["peak_mb"] >= max(r["peak_mb_by_rank"].values()) > 0
        )
        assert r["peak_above_process_mb"] < r["peak_mb"] and r["process_mb"] > 0
    # FSDP2 holds half of every weight and of the optimizer state on each rank (the sparse mode's k values too)
    for method in ("full", "shira_dense", "shira_sparse"):
        assert rows[method, "fsdp2"]["parameters_mb"] < 0.6 * rows[method, "ddp"]["parameters_mb"]
        assert rows[method, "fsdp2"]["optimizer_state_mb"] < 0.6 * rows[method, "ddp"]["optimizer_state_mb"], method
    assert len({rows[m, w]["trainable"] for m in ("shira_dense", "shira_sparse") for w in ("fsdp2", "ddp")}) == 1
    assert (
        "- shira_hooks mode='sparse' under FSDP2: per-rank peak" in out and "(target for mode='sparse': <= 0.6x" in out
    )
    assert "SHiRA attached before sharding" in out


def test_the_watch_hook_goes_with_detach_and_with_the_model():
    """The global forward pre-hook that follows fully_shard lives only while a handle watches a model."""
    import gc

    from torch.nn.modules.module import _global_forward_pre_hooks

    from conftest import make_mlp

    model = make_mlp()
    shira = shira_hooks.attach(model, 0.1, "rand", seed=0)
    assert len(_global_forward_pre_hooks) == 1
    shira.detach()
    assert len(_global_forward_pre_hooks) == 0
    shira = shira_hooks.attach(model, 0.1, "rand", seed=0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(2, 16)).sum().backward()
    optimizer.step()  # training started: from now on each step checks the weights instead
    assert len(_global_forward_pre_hooks) == 0
    shira.detach()
    shira = shira_hooks.attach(model, 0.1, "rand", seed=0)
    del model, shira, optimizer
    gc.collect()
    make_mlp()(torch.randn(2, 16))  # the next forward of any module removes the orphaned hook
    assert len(_global_forward_pre_hooks) == 0
