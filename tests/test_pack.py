"""pack / PackedWeights: weights re-homed into arenas, switching with one write per arena, everything else unchanged."""

import copy
import gc
import random
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import shira_hooks
from shira_hooks import AdapterBank, ShiraError, apply

from conftest import assert_changes_within_masks, changed_entries, llama_batches, make_llama, make_mlp, snapshot
from test_switch import _bits_equal, _by_hand, _random_adapter


def _storages(params) -> set:
    return {(p.device, p.untyped_storage().data_ptr()) for p in params}


def _targets(model) -> list[nn.Parameter]:
    return [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def _block_adapter(model, seed: int, block: int, sparsity: float = 0.05):
    """A block adapter (aligned runs of ``block`` within rows) for every Linear weight but the head."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    for name, param in model.named_parameters():
        if name not in linears or param.shape[1] % block:
            continue
        runs = param.numel() // block
        chosen = torch.randperm(runs, generator=g)[: max(1, int(sparsity * runs))].sort().values
        index = (chosen[:, None] * block + torch.arange(block)).reshape(-1)
        base = param.detach().reshape(-1)[index]
        deltas[name] = shira_hooks.SparseDelta(
            tuple(param.shape),
            param.dtype,
            index.int(),
            torch.randn(index.numel(), generator=g) * 0.1,
            shira_hooks.digest(base),
            block,
        )
    return shira_hooks.SparseAdapter(deltas, {"mask": "rand"})


class _CountWrites:
    """Counts ``index_copy_`` calls (the switch's only writes) while it is active."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = torch.Tensor.index_copy_

        def counted(tensor, *args, **kwargs):
            self.calls += 1
            return original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "index_copy_", counted)


def test_pack_keeps_parameters_values_and_layouts_and_unpack_gives_them_back():
    model = nn.Sequential(nn.Linear(16, 32), nn.Conv2d(4, 8, 3), nn.Linear(32, 32, bias=False))
    model[1].to(memory_format=torch.channels_last)
    model[0].weight.requires_grad_(False)
    model.tied = nn.Linear(32, 32, bias=False)
    model.tied.weight = model[2].weight  # one Parameter under two names: packed once
    before = snapshot(model)
    objects = {n: (p, p.requires_grad, p.stride(), p.dtype) for n, p in model.named_parameters()}
    packed = shira_hooks.pack(model, [nn.Linear, nn.Conv2d])
    assert packed.names == ["0.weight", "1.weight", "2.weight"]  # the tie once, biases are not targets
    assert [row["weights"] for row in packed.arenas()] == [3] and packed.packed
    for name, param in model.named_parameters():
        assert (param, param.requires_grad, param.stride(), param.dtype) == objects[name]
    assert model[1].weight.is_contiguous(memory_format=torch.channels_last)
    weights = [model[0].weight, model[1].weight, model[2].weight]
    starts = [p.data_ptr() - weights[0].data_ptr() for p in weights]
    assert starts == sorted(starts) and all(start % 4096 == 0 for start in starts)  # one arena, 4096-byte steps
    assert starts[-1] < 3 * 4096 and all(p.data_ptr() % 64 == 0 for p in weights)
    # each weight a storage of its own over the arena (safetensors' save_model needs that)
    assert all(
        p.untyped_storage().data_ptr() == p.data_ptr() and p.untyped_storage().nbytes() == p.numel() * 4
        for p in weights
    )
    assert _bits_equal(before, snapshot(model))
    x = torch.randn(2, 16)
    packed_ptrs = [p.data_ptr() for p in weights]
    packed.unpack()
    assert not packed.packed and packed.closed
    assert all(
        p.data_ptr() != old for p, old in zip(weights, packed_ptrs)
    )  # new storage, allocated while the arena lived
    for name, param in model.named_parameters():
        assert (param, param.requires_grad, param.stride(), param.dtype) == objects[name]
    assert _bits_equal(before, snapshot(model)) and model.tied.weight is model[2].weight
    packed.unpack()  # twice is fine
    with shira_hooks.pack(model, [nn.Linear]) as again:  # a context manager; packing again after unpack
        assert again.packed and model[0](x).shape == (2, 32)
    assert not again.packed


def test_chunks_hold_at_most_chunk_mb_and_group_by_dtype():
    model = nn.Sequential(*[nn.Linear(256, 256, bias=False) for _ in range(6)])  # 256 KiB each in float32
    model[5].to(torch.bfloat16)
    packed = shira_hooks.pack(model, chunk_mb=0.6)  # two float32 weights per arena
    rows = packed.arenas()
    assert [(r["dtype"], r["weights"]) for r in rows] == [
        ("float32", 2),
        ("float32", 2),
        ("float32", 1),
        ("bfloat16", 1),
    ]
    assert all(r["mb"] <= 0.6 for r in rows)
    packed.unpack()
    with pytest.raises(ShiraError, match=r"chunk_mb=0; it must be a positive number of MiB"):
        shira_hooks.pack(model, chunk_mb=0)


def test_pack_refuses_what_it_cannot_pack_soundly_and_changes_nothing():
    model = make_mlp()
    packed = shira_hooks.pack(model)
    with pytest.raises(ShiraError, match=r"model weight 'layers.0.weight' is already packed .*unpack\(\) first"):
        shira_hooks.pack(model)
    packed.unpack()

    shared = make_mlp()
    shared.layers[1].weight = nn.Parameter(torch.randn(48, 32))
    shared.extra = nn.Linear(32, 48, bias=False)
    shared.extra.weight = nn.Parameter(shared.layers[1].weight.data)  # tied by storage, not by Parameter
    ptrs = [p.data_ptr() for p in shared.parameters()]
    with pytest.raises(
        ShiraError,
        match=r"'layers.1.weight' shares its storage with 'extra.weight', which overlaps it.*b.weight = a.weight",
    ):
        shira_hooks.pack(shared)
    with pytest.raises(
        ShiraError, match=r"'layers.1.weight' shares its storage with 'extra.weight', which is not packed with it"
    ):
        shira_hooks.pack(shared, ["layers.0", "layers.1"])
    assert ptrs == [p.data_ptr() for p in shared.parameters()]  # nothing was re-homed

    with torch.device("meta"):
        meta = make_mlp()
    with pytest.raises(ShiraError, match=r"model weight 'layers.0.weight' is on the meta device"):
        shira_hooks.pack(meta)

    gappy = make_mlp()
    gappy.layers[0].weight.data = torch.randn(48, 32)[:, ::2]
    with pytest.raises(ShiraError, match=r"model weight 'layers.0.weight' has a layout with gaps"):
        shira_hooks.pack(gappy)


@pytest.mark.parametrize("block", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_switching_packed_weights_is_one_write_per_arena_and_bit_exact(monkeypatch, block, dtype):
    model, reference = make_llama(dtype=dtype), make_llama(dtype=dtype)
    base = snapshot(model)
    a, b = _block_adapter(model, 1, block), _block_adapter(model, 2, block)
    packed = shira_hooks.pack(model)
    assert len(packed.arenas()) == 1
    writes = _CountWrites(monkeypatch)
    for alpha in (1.0, 0.5, 1.0):
        handle = apply(model, a, alpha=alpha)
        writes.calls = 0
        handle.remove()
        with apply(model, b, alpha=alpha):
            assert writes.calls == 2  # remove a, apply b: one write each for the whole model
            assert _bits_equal(_by_hand(base, b, alpha), snapshot(model))
        assert _bits_equal(base, snapshot(model))
    with apply(reference, b):  # the unpacked model writes each weight on its own, to the same bits
        with apply(model, b):
            assert _bits_equal(snapshot(reference), snapshot(model))
    packed.unpack()
    writes.calls = 0
    with apply(model, a):
        assert writes.calls == len(a.deltas)
    assert _bits_equal(base, snapshot(model))


def test_stacking_and_out_of_order_removal_on_packed_weights():
    model = make_llama()
    base = snapshot(model)
    shira_hooks.pack(model)
    adapters = [_block_adapter(model, seed, 4, sparsity=0.2) for seed in range(3)] + [
        _random_adapter(model, 9, sparsity=0.1)
    ]
    rng = random.Random(0)
    handles = []
    for step in range(1500):
        if rng.random() < 0.5 and len(handles) < 3:
            handles.append(apply(model, rng.choice(adapters), alpha=rng.choice([1.0, 0.5, 0.0])))
        elif handles:
            handles.pop(rng.randrange(len(handles))).remove()
        if step % 300 == 0:
            reference = make_llama()
            for handle in shira_hooks.applied(model):
                apply(reference, handle.adapter, alpha=handle.alpha)
            assert _bits_equal(snapshot(reference), snapshot(model))
    while handles:
        handles.pop(0).remove()
    assert _bits_equal(base, snapshot(model))


def test_a_moved_or_cast_packed_model_is_packed_again_at_the_next_apply():
    model = make_llama()
    adapter = _block_adapter(model, 1, 8)
    packed = shira_hooks.pack(model)
    with apply(model, adapter):
        pass
    model.to(torch.bfloat16)  # new storage for every weight: all leave the arena, which is freed
    assert not packed.packed
    base = snapshot(model)
    with apply(model, adapter, check_base=False):
        assert packed.packed and len(packed.arenas()) == 1 and packed.arenas()[0]["dtype"] == "bfloat16"
        assert _bits_equal(_by_hand(base, adapter), snapshot(model))
    assert _bits_equal(base, snapshot(model))

    weight = model.model.layers[0].mlp.up_proj.weight
    weight.data = weight.data.clone()  # one weight leaves: its whole arena is packed again
    assert packed.repack() == len(packed.names) and packed.packed
    assert packed.repack() == 0

    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new Parameter objects in the modules
    assert not packed.packed
    with apply(model, adapter, check_base=False):
        assert packed.packed and model.model.layers[0].mlp.up_proj.weight is not weight
    assert _bits_equal(base, snapshot(model))
    packed.unpack()
    with pytest.raises(ShiraError, match=r"this PackedWeights was unpacked; call shira_hooks.pack\(model\)"):
        packed.repack()


def test_adapter_bank_packs_by_default_and_close_unpacks(monkeypatch):
    model = make_llama()
    base = snapshot(model)
    a, b = _block_adapter(model, 1, 8), _block_adapter(model, 2, 8)
    with AdapterBank(model, {"a": a}) as bank:
        bank.add("b", b)  # the same weights: nothing more to pack
        assert len(bank.packed) == 1 and bank.packed[0].packed
        packed_ptrs = [p.data_ptr() for p in _targets(model)]
        writes = _CountWrites(monkeypatch)
        bank.activate("a")
        writes.calls = 0
        bank.activate("b")
        assert writes.calls == 2 and _bits_equal(_by_hand(base, b), snapshot(model))
    assert bank.active == [] and bank.packed == [] and _bits_equal(base, snapshot(model))
    assert all(p.data_ptr() != old for p, old in zip(_targets(model), packed_ptrs))  # each its own storage again
    assert shira_hooks.serve.packing.owner_of(model.model.layers[0].mlp.up_proj) is None
    unpacked = AdapterBank(model, {"a": a}, pack=False)
    assert unpacked.packed == [] and shira_hooks.serve.packing.owner_of(model.model.layers[0].mlp.up_proj) is None

    shared = make_llama()
    shared.lm_head.weight = nn.Parameter(shared.model.layers[0].mlp.up_proj.weight.data[:, :32])  # tied by storage
    with pytest.warns(UserWarning, match=r"AdapterBank: the weights were not packed .*shares its storage"):
        fallback = AdapterBank(shared, {"a": _block_adapter(shared, 1, 8)})
    fallback.activate("a")  # still switches, weight by weight
    fallback.close()


def test_packed_model_forward_training_and_extract_work_in_every_mode():
    batches = llama_batches(3)
    reference = make_llama()
    expected = reference(**batches[0]).logits
    for mode in ("dense", "compact", "sparse"):
        model = make_llama()
        packed = shira_hooks.pack(model)
        assert torch.equal(model(**batches[0]).logits, expected)  # bit-identical forward
        before = snapshot(model)
        shira = shira_hooks.attach(model, 0.05, "rand", seed=3, mode=mode, progress=False)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert shira.verify() == [] and assert_changes_within_masks(shira, before, model) > 0
        trained = model(**batches[0]).logits
        adapter = shira.extract()
        shira.detach()
        assert packed.packed  # training wrote in place, into the arenas
        fresh = make_llama()
        shira_hooks.pack(fresh)
        with apply(fresh, adapter):
            assert torch.allclose(fresh(**batches[0]).logits, trained, atol=1e-6)
        packed.unpack()


def test_packed_model_saves_loads_copies_and_compiles(tmp_path):
    from safetensors.torch import load_model, save_model
    from transformers import LlamaForCausalLM

    model = make_llama()
    adapter = _block_adapter(model, 1, 8)
    shira_hooks.pack(model)
    batch = llama_batches(1)[0]
    apply(model, adapter)
    logits = model(**batch).logits
    model.save_pretrained(tmp_path / "hf")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    assert _bits_equal(snapshot(model), snapshot(loaded))
    save_model(model, str(tmp_path / "model.safetensors"))
    other = make_llama(seed=5)
    load_model(other, str(tmp_path / "model.safetensors"))
    assert _bits_equal(snapshot(model), snapshot(other))
    state = model.state_dict()
    fresh = make_llama(seed=6)
    packed = shira_hooks.pack(fresh)
    fresh.load_state_dict(state)  # copies into the arenas: still packed
    assert packed.packed and _bits_equal(snapshot(model), snapshot(fresh))
    assert _bits_equal(snapshot(model), snapshot(copy.deepcopy(model)))
    compiled = torch.compile(model, backend="aot_eager")
    assert torch.equal(compiled(**batch).logits, logits)
    shira_hooks.applied(model)[0].remove()  # written in place: the compiled model sees the base
    assert torch.equal(compiled(**batch).logits, model(**batch).logits)
    assert not torch.equal(compiled(**batch).logits, logits)


def test_packed_switching_from_threads_stays_exact():
    model = make_llama()
    base = snapshot(model)
    shira_hooks.pack(model)
    adapters = [_block_adapter(model, seed, 8) for seed in range(3)]
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        try:
            for _ in range(150):
                handle = apply(model, rng.choice(adapters))
                if rng.random() < 0.5:
                    handle.remove()
                else:
                    with apply(model, rng.choice(adapters), alpha=0.5):
                        pass
                    handle.remove()
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and _bits_equal(base, snapshot(model))


def test_dropping_a_packed_model_frees_it():
    model = make_llama()
    packed = shira_hooks.pack(model)
    with apply(model, _block_adapter(model, 1, 8)):
        pass
    ref = __import__("weakref").ref(model)
    del model
    gc.collect()
    assert ref() is None and not packed.packed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make_mlp()
    packed = shira_hooks.pack(model)
    before = snapshot(model)
    shira = shira_hooks.attach(model, 0.2, "rand", seed=1, progress=False)
    wrapped = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(rank)
    for _ in range(3):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 6, (8,), generator=g)
        nn.functional.cross_entropy(wrapped(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert shira.verify() == [] and assert_changes_within_masks(shira, before, model) > 0 and packed.packed
    torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, f"{out}/rank{rank}.pt")
    shira.detach()
    dist.destroy_process_group()


def test_ddp_trains_a_packed_model(tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert _bits_equal(ranks[0], ranks[1])  # replicas stayed equal
    assert any(changed_entries(ranks[0][n], snapshot(make_mlp())[n]).numel() for n in ranks[0])


@pytest.mark.parametrize("packed", [False, True])
def test_the_cached_switch_plan_notices_every_change_to_the_model(packed):
    """A switch runs from a plan built once; each way the model can change under it is noticed."""
    import numpy as np

    model = make_llama()
    adapter = _block_adapter(model, 1, 8)
    if packed:
        shira_hooks.pack(model)
    apply(model, adapter).remove()  # the plan is built
    base = snapshot(model)

    # a module replaced in the tree (the old one kept alive elsewhere): the new module gets the adapter
    old = model.model.layers[0].mlp
    new = copy.deepcopy(old)
    model.model.layers[0].mlp = new
    with apply(model, adapter):
        assert _bits_equal(_by_hand(base, adapter), snapshot(model))
        assert torch.equal(old.up_proj.weight, base["model.layers.0.mlp.up_proj.weight"])  # the old one untouched
    # a Parameter replaced in its module
    weight = new.down_proj.weight
    new.down_proj.weight = nn.Parameter(weight.detach().clone())
    with apply(model, adapter):
        assert _bits_equal(_by_hand(base, adapter), snapshot(model)) and torch.equal(
            weight, base["model.layers.0.mlp.down_proj.weight"]
        )
    # a delta of the adapter replaced by another object
    name = "model.layers.1.self_attn.q_proj.weight"
    delta = adapter.deltas[name]
    adapter.deltas[name] = shira_hooks.SparseDelta(
        delta.shape, delta.dtype, delta.indices, delta.values * 3, delta.fingerprint, delta.block
    )
    with apply(model, adapter):
        assert _bits_equal(_by_hand(base, adapter), snapshot(model))
    # the same storage viewed transposed (same data_ptr, other strides): the adapter follows the new layout
    square = model.model.layers[1].self_attn.q_proj.weight
    square.data = square.data.t()
    transposed = snapshot(model)
    with apply(model, adapter, check_base=False):
        assert _bits_equal(_by_hand(transposed, adapter), snapshot(model))
    assert _bits_equal(transposed, snapshot(model))

    # a new storage at the address of the old one (the old one freed), other dtype, same version counter
    plain = make_mlp()
    mlp_adapter = _random_adapter(plain, 1)
    buffer = np.zeros(48 * 32 * 2, dtype=np.float32)
    weight = plain.layers[1].weight
    buffer[: weight.numel()] = weight.detach().numpy().reshape(-1)
    weight.data = torch.from_numpy(buffer[: weight.numel()]).view(weight.shape)
    apply(plain, mlp_adapter).remove()
    halves = buffer.view(np.float16)
    halves[: weight.numel()] = weight.detach().numpy().reshape(-1).astype(np.float16)
    weight.data = torch.from_numpy(halves[: weight.numel()]).view(weight.shape)  # same data_ptr, a new storage
    with pytest.raises(ShiraError, match=r"was trained on a float32 weight, the model's is float16"):
        apply(plain, mlp_adapter)


def test_mixed_adapters_and_generate_on_a_packed_model_equal_the_unpacked_model():
    from shira_hooks import MixedAdapters

    plain, packed_model = make_llama().eval(), make_llama().eval()
    shira_hooks.pack(packed_model)
    adapters = {"a": _block_adapter(plain, 1, 8), "b": _block_adapter(plain, 2, 1)}
    ids = torch.randint(0, 96, (3, 10), generator=torch.Generator().manual_seed(7))
    outputs = []
    for model in (plain, packed_model):
        with torch.no_grad(), MixedAdapters(model, adapters) as mixed, mixed.route(["a", None, "b"]):
            mixed_logits = model(input_ids=ids).logits
        with torch.no_grad(), apply(model, adapters["a"]):
            generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        outputs.append((mixed_logits, generated))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])


def test_a_module_taken_out_of_the_model_is_freed_at_the_next_apply():
    """Switch plans hold the children dicts of the model's modules, never for longer than the next apply."""
    import weakref

    model = make_llama()
    a, b = _block_adapter(model, 1, 8), _block_adapter(model, 2, 8)
    for adapter in (a, b):
        apply(model, adapter).remove()  # two plans, built on the same module tree
    old = model.model.layers[0].mlp
    ref = weakref.ref(old)
    model.model.layers[0].mlp = copy.deepcopy(old)
    del old
    with apply(model, a):  # notices the new module: every plan of the model is dropped
        pass
    gc.collect()
    assert ref() is None


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = make_mlp()
    fully_shard(model)
    try:
        shira_hooks.pack(model)
    except ShiraError as error:
        (Path(out) / "error.txt").write_text(str(error))
    dist.destroy_process_group()


def test_sharded_weights_are_refused(tmp_path):
    mp.spawn(_sharded_worker, args=(1, _free_port(), str(tmp_path)), nprocs=1, join=True)
    assert "model weight 'layers.0.weight' is sharded (a DTensor" in (tmp_path / "error.txt").read_text()


def test_pack_and_unpack_inside_inference_mode_give_ordinary_tensors():
    """A request handler runs under torch.inference_mode(): an apply there may pack moved weights again. The
    arenas and unpacked storages must still switch and train outside it."""
    model = make_llama()
    adapter = _block_adapter(model, 1, 8)
    base = snapshot(model)
    with torch.inference_mode():
        packed = shira_hooks.pack(model)
    assert packed.packed and not any(p.is_inference() for p in model.parameters())
    model.to(torch.float64).to(torch.float32)  # every weight leaves its arena (same values)
    with torch.inference_mode():
        handle = apply(model, adapter)  # packs them again, inside inference mode
    assert packed.packed and not any(p.is_inference() for p in model.parameters())
    assert _bits_equal(_by_hand(base, adapter), snapshot(model))
    handle.remove()  # outside inference mode
    assert _bits_equal(base, snapshot(model))
    with torch.inference_mode():
        packed.unpack()
    assert not any(p.is_inference() for p in model.parameters())
    model(**llama_batches(1, seed=2)[0]).loss.backward()  # trains


def test_a_tied_weight_is_packed_once_whichever_name_asks():
    model = make_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    packed = shira_hooks.pack(model, ["lm_head"])
    with pytest.raises(ShiraError, match=r"model weight 'model.embed_tokens.weight' is already packed"):
        shira_hooks.pack(model, [nn.Embedding])
    assert packed.packed and packed.names == ["lm_head.weight"]


def test_without_dlpack_a_weight_alone_in_its_arena_stays_packed(monkeypatch):
    """Where DLPack is missing (some accelerators) the weights are views of the arena's own storage, which does
    not keep the arena tensor alive: the packing keeps it, also for a weight alone in its arena (offset 0)."""

    def no_dlpack(*args, **kwargs):
        raise RuntimeError("no DLPack on this device")

    monkeypatch.setattr(torch, "from_dlpack", no_dlpack)
    model = make_llama()
    base = snapshot(model)
    packed = shira_hooks.pack(model, chunk_mb=0.001)  # every weight larger than an arena: one arena each
    gc.collect()
    assert packed.packed and len(packed.arenas()) == len(packed.names)
    adapter = _block_adapter(model, 1, 8)
    with apply(model, adapter):
        assert packed.packed and _bits_equal(_by_hand(base, adapter), snapshot(model))
    assert _bits_equal(base, snapshot(model))


def test_pack_unpack_and_repack_wait_for_a_switch_in_progress():
    """They take the model's switching lock, as apply and remove do: AdapterBank.close() in one thread cannot
    move weights under an apply in another."""
    from shira_hooks.serve.state import model_state

    model = make_llama()
    packed = shira_hooks.pack(model)
    lock = model_state(model).lock
    for work in (packed.repack, packed.unpack, lambda: shira_hooks.pack(model)):
        with lock:  # a switch in progress
            thread = threading.Thread(target=work)
            thread.start()
            thread.join(0.5)
            assert thread.is_alive()  # waiting for the lock
        thread.join()
    assert packed.closed


def test_weights_in_shared_memory_are_refused_at_pack_and_at_the_next_apply():
    """Packing gives a weight new private storage: a weight in shared memory would silently stop being seen by
    the processes sharing it (and they by it). pack() refuses such a weight, and so does the repack of the next
    apply after a share_memory() of a packed model; nothing is changed, and unpacked switching stays shared."""
    model = make_llama()
    model.share_memory()
    adapter = _block_adapter(model, 1, 8)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ShiraError, match=r"model weight '.*' is in shared memory .*unpack\(\) it before share_memory"):
        shira_hooks.pack(model)
    with pytest.warns(UserWarning, match=r"the weights were not packed .*in shared memory"):
        bank = AdapterBank(model, {"a": adapter})
    assert not bank.packed
    assert ptrs == [p.data_ptr() for p in model.parameters()] and all(p.is_shared() for p in model.parameters())

    model = make_llama()
    packed = shira_hooks.pack(model)
    model.share_memory()  # moves every packed weight out of its arena, into shared memory
    base = snapshot(model)
    with pytest.raises(ShiraError, match=r"is in shared memory"):
        apply(model, adapter)
    assert not packed.packed and all(p.is_shared() for p in model.parameters())
    assert _bits_equal(base, snapshot(model))
    packed.unpack()
    with apply(model, adapter):  # unpacked: written in the shared storage itself
        assert all(p.is_shared() for p in model.parameters())
        assert _bits_equal(_by_hand(base, adapter), snapshot(model))
    assert _bits_equal(base, snapshot(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA GPU")
def test_pinned_weights_get_a_pinned_arena_and_pinned_storage_back():
    model = make_llama()
    pinned = {id(p) for p in _targets(model)[::2]}
    for param in _targets(model)[::2]:
        param.data = param.data.pin_memory()
    base = snapshot(model)
    packed = shira_hooks.pack(model)
    assert packed.packed and len(packed.arenas()) == 2  # the pinned weights and the others apart
    assert all(p.is_pinned() == (id(p) in pinned) for p in _targets(model))
    adapter = _block_adapter(model, 1, 8)
    with apply(model, adapter):
        assert _bits_equal(_by_hand(base, adapter), snapshot(model))
    packed.unpack()
    assert all(p.is_pinned() == (id(p) in pinned) for p in _targets(model))
    assert _bits_equal(base, snapshot(model))
