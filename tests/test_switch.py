"""apply / remove / fuse / overlap / AdapterBank: bit-exact switching, validation before writing."""

import copy
import gc
import pickle
import random
import weakref

import pytest
import torch
from torch import nn

import shira_hooks
import shira_hooks._testing
from shira_hooks import AdapterBank, ShiraError, SparseAdapter, SparseDelta, apply, digest, fuse, overlap

from conftest import changed_entries, llama_batches, make_llama, make_mlp, snapshot


def _bits_equal(a: dict, b: dict) -> bool:
    return all(changed_entries(a[n], b[n]).numel() == 0 for n in a)


def _train_adapter(model, mask="rand", seed=1, steps=2, sparsity=0.03):
    shira = shira_hooks.attach(model, sparsity, mask, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    if next(model.parameters()).dtype == torch.float16:  # Adam's eps=1e-8 is 0 in float16: 0/0 = NaN
        optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for batch in llama_batches(steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = shira.extract()
    shira.detach()
    return adapter


def _random_adapter(model, seed, sparsity=0.05, scale=0.1):
    """A valid adapter for `model` with random entries and deltas (fast to make in bulk)."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, param in model.named_parameters():
        if not name.endswith("weight") or param.dim() < 2:
            continue
        k = max(1, int(sparsity * param.numel()))
        index = torch.randperm(param.numel(), generator=g)[:k].sort().values
        base = param.detach().reshape(-1)[index]
        deltas[name] = SparseDelta(
            tuple(param.shape), param.dtype, index.int(), torch.randn(k, generator=g) * scale, digest(base)
        )
    return SparseAdapter(deltas, {"mask": "rand"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_apply_reproduces_training_and_remove_restores_bits(dtype):
    trained = make_llama(dtype=dtype)
    adapter = _train_adapter(trained)
    model = make_llama(dtype=dtype)
    base = snapshot(model)
    params = {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}
    handle = apply(model, adapter)
    for name, param in model.named_parameters():
        assert (id(param), param.data_ptr()) == params[name]  # same objects, same storage
        if dtype == torch.float32:
            torch.testing.assert_close(param, dict(trained.named_parameters())[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(param, dict(trained.named_parameters())[name]), name
    if dtype == torch.float32:
        ids = llama_batches(1, seed=3)[0]["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, trained(ids).logits, rtol=0, atol=1e-5)
    handle.remove()
    handle.remove()  # idempotent
    assert _bits_equal(base, snapshot(model))
    with apply(model, adapter, alpha=0.0):  # alpha=0 is a no-op, bit for bit
        assert _bits_equal(base, snapshot(model))
    with apply(model, adapter, alpha=0.5) as half:
        assert half.active and not _bits_equal(base, snapshot(model))
    assert not half.active and _bits_equal(base, snapshot(model))


def test_stacked_adapters_remove_in_any_order():
    model = make_llama()
    base = snapshot(model)
    a, b, c = (_random_adapter(model, seed) for seed in (1, 2, 3))
    assert overlap(a, b).shared > 0  # the case exercises overlapping entries
    ha, hb, hc = apply(model, a), apply(model, b, alpha=0.7), apply(model, c, alpha=-1.3)
    assert shira_hooks.applied(model) == [ha, hb, hc]
    hb.remove()  # from the middle: equals applying a then c
    reference = make_llama()
    apply(reference, a), apply(reference, c, alpha=-1.3)
    assert _bits_equal(snapshot(reference), snapshot(model))
    ha.remove()
    hc.remove()
    assert _bits_equal(base, snapshot(model))


def test_fuse_equals_sequential_application():
    model = make_llama()
    a, b = _random_adapter(model, 1), _random_adapter(model, 2)
    fused = fuse([a, b], weights=[1.0, 0.5], base=model)
    for name, delta in fused.deltas.items():
        union = torch.unique(torch.cat([a.deltas[name].indices, b.deltas[name].indices]).long())
        assert torch.equal(delta.indices.long(), union)
    with apply(model, fused):
        one_go = snapshot(model)
    with apply(model, a), apply(model, b, alpha=0.5):
        sequential = snapshot(model)
    for name in one_go:
        torch.testing.assert_close(one_go[name], sequential[name], rtol=1e-6, atol=1e-7)
    # without a base, modules whose entries differ cannot carry a fingerprint; apply still works
    unverified = fuse([a, b], weights=[1.0, 0.5])
    assert all(d.fingerprint == "" for d in unverified.deltas.values())
    with apply(model, unverified):
        assert _bits_equal(one_go, snapshot(model))
    # fusing an adapter with itself keeps its (verifiable) fingerprint
    doubled = fuse([a, a])
    assert all(d.fingerprint == a.deltas[n].fingerprint for n, d in doubled.deltas.items())
    assert all(torch.equal(d.values, 2 * a.deltas[n].values) for n, d in doubled.deltas.items())


def test_overlap_known_answer():
    def adapter(entries):  # entries: {(row, col): value} in a 3x4 weight
        index = torch.tensor([r * 4 + c for r, c in sorted(entries)], dtype=torch.int32)
        values = torch.tensor([entries[rc] for rc in sorted(entries)])
        return SparseAdapter({"w": SparseDelta((3, 4), torch.float32, index, values, "")})

    a = adapter({(0, 0): 1.0, (1, 1): 2.0})
    b = adapter({(0, 0): 3.0, (2, 1): 1.0})
    result = overlap(a, b)
    m = result.modules["w"]
    assert (m.shared, m.entries_a, m.entries_b, result.shared) == (1, 2, 2, 1)
    assert result.shared_fraction == 0.5
    # A1^T A2 = sum over rows of a_r^T b_r: only row 0 pairs up, giving one entry (0, 0) = 1 * 3
    assert m.product_density == 1 / 16
    assert m.product_cosine == pytest.approx(3.0 / (5**0.5 * 10**0.5))
    disjoint = overlap(a, adapter({(2, 3): 1.0}))
    assert disjoint.shared == 0 and disjoint.modules["w"].product_density == 0.0
    dense = adapter({(r, c): 1.0 for r in range(3) for c in range(4)})
    assert overlap(dense, dense).modules["w"].product_density == 1.0
    assert "A1^T A2" in str(result)


def _mutations(adapter, name):
    delta = adapter.deltas[name]
    return {
        "missing module": (
            {"nope." + name: delta},
            r"adapter module 'nope\..*' is not a parameter of the model.*strict=False",
        ),
        "shape": (
            {
                name: SparseDelta(
                    (2 * delta.shape[0], delta.shape[1]), delta.dtype, delta.indices, delta.values, delta.fingerprint
                )
            },
            r"has shape \[\d+, \d+\], the model's weight is",
        ),
        "dtype": (
            {name: SparseDelta(delta.shape, torch.bfloat16, delta.indices, delta.values, delta.fingerprint)},
            r"was trained on a bfloat16 weight, the model's is float32",
        ),
        "fingerprint": (
            {name: SparseDelta(delta.shape, delta.dtype, delta.indices, delta.values, "0" * 16)},
            r"do not match the adapter's fingerprint",
        ),
    }


@pytest.mark.parametrize("case", ["missing module", "shape", "dtype", "fingerprint"])
def test_mismatched_adapter_raises_and_leaves_model_untouched(case):
    model = make_llama()
    good = _random_adapter(model, 1)
    names = list(good.deltas)
    deltas, pattern = _mutations(good, names[-1])[case]
    bad = SparseAdapter({**{n: good.deltas[n] for n in names[:-1]}, **deltas})  # the last module is the bad one
    before = snapshot(model)
    with pytest.raises(ShiraError, match=pattern):
        apply(model, bad)
    assert _bits_equal(before, snapshot(model))  # every weight, including the valid modules before it
    assert shira_hooks.applied(model) == []


def test_strict_false_skips_missing_modules():
    model = make_llama()
    good = _random_adapter(model, 1)
    extra = {"lm_head.extra.weight": next(iter(good.deltas.values()))}
    handle = apply(model, SparseAdapter({**good.deltas, **extra}), strict=False)
    assert handle.skipped == ["lm_head.extra.weight"]
    handle.remove()


def test_a_target_parameter_set_to_none_after_a_planned_switch_is_missing():
    """A switch plan cached by an earlier apply does not hide a target parameter set to None (and freed)."""
    model = make_mlp()
    adapter = _random_adapter(model, 1)
    apply(model, adapter).remove()  # the whole-model switch plan is cached
    name = next(iter(adapter.deltas))
    model.get_submodule(name.rpartition(".")[0]).weight = None  # the old Parameter is freed
    gc.collect()
    with pytest.raises(ShiraError, match=f"adapter module '{name}' is not a parameter of the model"):
        apply(model, adapter)
    handle = apply(model, adapter, strict=False)
    assert handle.skipped == [name]
    handle.remove()


def test_base_changed_by_someone_else_is_detected():
    model = make_llama()
    adapter = _random_adapter(model, 1)
    apply(model, adapter).remove()  # verified and cached
    name, delta = next(iter(adapter.deltas.items()))
    weight = dict(model.named_parameters())[name]
    first = delta.indices[0].long()
    saved = weight.detach().view(-1)[first].clone()
    with torch.no_grad():
        weight.view(-1)[first] += 1.0  # an in-place write bumps the version counter
    with pytest.raises(ShiraError, match=f"adapter module '{name}': the model's base values"):
        apply(model, adapter)
    with torch.no_grad():
        weight.view(-1)[first] = saved
    apply(model, adapter).remove()
    weight.data.view(-1)[delta.indices[1].long()] += 1.0  # .data bypasses the counter ...
    with pytest.raises(ShiraError, match="fingerprint"):
        apply(model, adapter, check_base="always")  # ... so "always" re-hashes


def test_adapter_bank_switches_and_recovers():
    model = make_llama()
    base = snapshot(model)
    a, b = _random_adapter(model, 1), _random_adapter(model, 2)
    bank = AdapterBank(model, {"a": a, "b": b})
    bank.activate("a")
    with apply(make_llama(), a):
        pass
    only_a = snapshot(model)
    bank.activate("b")
    bank.activate(["a", "b"], alpha=[1.0, 0.5])
    assert bank.active == ["a", "b"]
    bank.activate("a")
    assert _bits_equal(only_a, snapshot(model))
    with pytest.raises(ShiraError, match=r"unknown adapter name\(s\) \['c'\]"):
        bank.activate("c")
    other = make_llama(seed=5)
    bank.add("foreign", _random_adapter(other, 3))
    with pytest.raises(ShiraError, match="fingerprint"):
        bank.activate(["b", "foreign"])
    assert bank.active == ["a"] and _bits_equal(only_a, snapshot(model))  # the previous state is back
    bank.deactivate()
    assert bank.active == [] and _bits_equal(base, snapshot(model))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ten_thousand_random_operations_keep_the_base_exact(dtype):
    model = make_mlp().to(dtype)
    base = snapshot(model)
    adapters = [_random_adapter(model, seed, sparsity=0.2, scale=0.5) for seed in range(4)]
    bank = AdapterBank(model, {str(i): a for i, a in enumerate(adapters)})
    rng = random.Random(0)
    handles = []
    for step in range(10_000):
        op = rng.random()
        if op < 0.35 and len(handles) < 4:
            handles.append(apply(model, rng.choice(adapters), alpha=rng.choice([1.0, 0.5, -2.0, 0.0])))
        elif op < 0.7 and handles:
            handles.pop(rng.randrange(len(handles))).remove()  # any order
        elif op < 0.8 and handles:  # switch: remove everything, apply one
            while handles:
                handles.pop().remove()
            handles.append(apply(model, rng.choice(adapters)))
        elif op < 0.85 and not handles:
            bank.activate(rng.sample(list(bank.adapters), 2), alpha=[1.0, rng.choice([0.3, 1.0])])
            bank.deactivate()
        if step % 2000 == 0 and handles:  # the stack equals applying its adapters from scratch
            reference = make_mlp().to(dtype)
            reference.load_state_dict(base)
            for handle in shira_hooks.applied(model):
                apply(reference, handle.adapter, alpha=handle.alpha)
            assert _bits_equal(snapshot(reference), snapshot(model))
    while handles:
        handles.pop(rng.randrange(len(handles))).remove()
    assert _bits_equal(base, snapshot(model))


def test_remove_after_the_storage_was_replaced():
    model = make_llama()
    base = snapshot(model)
    a, b = _random_adapter(model, 1), _random_adapter(model, 2)
    handle = apply(model, a)

    def new_storage():  # e.g. a .to() round trip: new storage, same Parameter objects
        for param in model.parameters():
            param.data = param.data.clone()

    new_storage()
    handle.remove()
    assert not handle.active and _bits_equal(base, snapshot(model))
    new_storage()  # between applies, and under a stack whose bottom is then removed
    ha, hb = apply(model, a), apply(model, b, alpha=0.5)
    new_storage()
    ha.remove()
    assert _bits_equal(_by_hand(base, b, 0.5), snapshot(model))
    hb.remove()
    assert _bits_equal(base, snapshot(model))


def test_alpha_zero_and_float64_are_bit_exact():
    model = make_mlp().double()
    with torch.no_grad():
        model.layers[0].weight.view(-1)[:50] = -0.0
    base = snapshot(model)
    adapter = _random_adapter(model, 1, sparsity=0.5)
    with apply(model, adapter, alpha=0.0):
        assert _bits_equal(base, snapshot(model))  # -0.0 stays -0.0, float64 is not rounded to float32
    with apply(model, adapter, alpha=1.0):
        name, delta = next(iter(adapter.deltas.items()))
        flat = dict(model.named_parameters())[name].detach().reshape(-1)
        expected = base[name].reshape(-1)[delta.indices.long()] + delta.values.double()
        assert torch.equal(flat[delta.indices.long()], expected)  # computed in float64
    with pytest.raises(ShiraError, match=r"alpha=inf; it must be a finite number"):
        apply(model, adapter, alpha=float("inf"))


def _by_hand(base: dict, adapter: SparseAdapter, alpha: float = 1.0) -> dict:
    """The weights after applying ``adapter`` to ``base``, computed here: float32 sum, then cast."""
    weights = {}
    for name, tensor in base.items():
        flat = tensor.contiguous().view(-1).clone()  # row-major, whatever the layout of `base`
        if name in adapter.deltas:
            index = adapter.deltas[name].indices.long()
            flat[index] = (flat[index].float() + alpha * adapter.deltas[name].values.float()).to(flat.dtype)
        weights[name] = flat.view(tensor.shape)
    return weights


def test_dropped_models_and_adapters_are_freed():
    model = make_mlp()
    handle = apply(model, _random_adapter(model, 1))  # still applied when the model is dropped
    assert handle.model is model
    copied = copy.deepcopy(model)  # has the adapter's values but no applied adapter of its own
    loaded = pickle.loads(pickle.dumps(model))
    assert shira_hooks.applied(copied) == [] == shira_hooks.applied(loaded)
    assert _bits_equal(snapshot(model), snapshot(copied)) and _bits_equal(snapshot(model), snapshot(loaded))
    model_ref = weakref.ref(model)
    del model, copied, loaded
    gc.collect()
    assert model_ref() is None
    assert handle.model is None
    handle.remove()  # nothing left to restore
    assert not handle.active

    model = make_mlp()  # applied, then removed: the model and the adapter are freed
    adapter = _random_adapter(model, 2)
    apply(model, adapter).remove()
    refs = weakref.ref(model), weakref.ref(adapter)
    del model, adapter
    gc.collect()
    assert [ref() for ref in refs] == [None, None]

    model = make_mlp()  # an adapter dropped after remove() while the model lives: freed, with its cache
    adapter = _random_adapter(model, 3)
    with apply(model, adapter):
        pass
    adapter_ref = weakref.ref(adapter)
    del adapter
    gc.collect()
    assert adapter_ref() is None
    assert shira_hooks._testing.cached_bytes(model) == 0


def test_cache_is_bounded_and_clear_cache_drops_it(monkeypatch):
    model = make_mlp()
    base = snapshot(model)
    adapters = [_random_adapter(model, seed, sparsity=0.2) for seed in range(10)]
    hashed = []
    monkeypatch.setattr(
        shira_hooks.serve.switch, "digest", lambda values: hashed.append(values.numel()) or digest(values)
    )
    for adapter in adapters:
        with apply(model, adapter):
            pass
    assert all("_prepared" not in vars(adapter) for adapter in adapters)  # nothing is kept on the adapters
    assert len(hashed) == 10 * 3  # each adapter's 3 weights verified once
    # int64 index + float32 base + float32 written per entry, for the KEEP_RECENT most recent adapters
    # only; S is float32 already and is not copied
    assert shira_hooks._testing.cached_bytes(model) == shira_hooks.serve.KEEP_RECENT * 16 * adapters[0].num_entries
    with apply(model, adapters[0], alpha=0.5):  # evicted: the base is read again, not hashed again
        assert _bits_equal(_by_hand(base, adapters[0], 0.5), snapshot(model))
    assert len(hashed) == 30 and _bits_equal(base, snapshot(model))
    shira_hooks.clear_cache(model)
    assert shira_hooks._testing.cached_bytes(model) == 0
    with apply(model, adapters[1], alpha=-1.0):  # verified again after clear_cache, and exact
        assert _bits_equal(_by_hand(base, adapters[1], -1.0), snapshot(model))
    assert len(hashed) == 33 and _bits_equal(base, snapshot(model))
    held = apply(model, adapters[2])
    shira_hooks.clear_cache()  # every model; an applied adapter keeps what its remove() needs
    held.remove()
    assert _bits_equal(base, snapshot(model))


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 6, 3), nn.Linear(6, 5))


def test_channels_last_weights_switch_like_contiguous_ones():
    model, reference = _conv_model(), _conv_model()
    base = snapshot(model)
    a, b = _random_adapter(model, 1, sparsity=0.3), _random_adapter(model, 2, sparsity=0.3)
    model.to(memory_format=torch.channels_last)  # what diffusers UNets do to their conv weights
    conv = model[0].weight
    assert not conv.is_contiguous() and conv.is_contiguous(memory_format=torch.channels_last)
    ha, hb = apply(model, a), apply(model, b, alpha=0.5)
    hc = apply(model, a, alpha=-1.0, check_base="always")  # re-verified under two overlapping adapters
    apply(reference, a), apply(reference, b, alpha=0.5), apply(reference, a, alpha=-1.0)
    assert _bits_equal(snapshot(reference), snapshot(model))
    ha.remove()  # from the bottom: b and the second a are applied again
    reference.load_state_dict(base)
    apply(reference, b, alpha=0.5), apply(reference, a, alpha=-1.0)
    assert _bits_equal(snapshot(reference), snapshot(model))
    hb.remove(), hc.remove()
    assert _bits_equal(base, snapshot(model)) and conv.is_contiguous(memory_format=torch.channels_last)

    handle = apply(model, b)  # the layout changes between apply and remove ...
    for param in model.parameters():
        param.data = param.data.contiguous()
    handle.remove()
    assert _bits_equal(base, snapshot(model))
    handle = apply(model, b)  # ... and between applies (the storage positions are made again)
    model.to(memory_format=torch.channels_last)
    handle.remove()
    assert _bits_equal(base, snapshot(model))
    with apply(model, b, alpha=2.0):
        assert _bits_equal(_by_hand(base, b, 2.0), snapshot(model))
    assert _bits_equal(base, snapshot(model))


def test_weights_with_gaps_are_refused_by_name():
    model = make_mlp()
    base = snapshot(model)
    adapter = _random_adapter(model, 1)
    weight = model.layers[1].weight
    contiguous = weight.data

    def with_gaps(values: torch.Tensor) -> torch.Tensor:  # every other row of a larger block
        block = torch.zeros(2 * values.shape[0], values.shape[1])
        block[::2] = values
        return block[::2]

    weight.data = with_gaps(contiguous)
    with pytest.raises(ShiraError, match=r"model weight 'layers\.1\.weight' has a layout with gaps"):
        apply(model, adapter)
    assert _bits_equal(base, snapshot(model)) and shira_hooks.applied(model) == []
    weight.data = contiguous
    handle = apply(model, adapter)
    applied_weights = snapshot(model)
    weight.data = with_gaps(weight.data)
    with pytest.raises(ShiraError, match=r"model weight 'layers\.1\.weight' has a layout with gaps"):
        handle.remove()
    assert handle.active and _bits_equal(applied_weights, snapshot(model))  # nothing was restored
    weight.data = weight.data.contiguous()
    handle.remove()
    assert _bits_equal(base, snapshot(model))


def test_dtype_change_between_apply_and_remove_and_between_applies():
    model = make_mlp()
    base = snapshot(model)
    a, b = _random_adapter(model, 1), _random_adapter(model, 2)
    ha, hb = apply(model, a), apply(model, b, alpha=0.5)
    model.to(torch.bfloat16)
    ha.remove()  # b is applied again on the bfloat16 weights
    in_bf16 = {name: t.to(torch.bfloat16) for name, t in base.items()}
    assert _bits_equal(_by_hand(in_bf16, b, 0.5), snapshot(model))
    hb.remove()
    assert _bits_equal(in_bf16, snapshot(model))  # the base as the conversion made it, bit for bit
    with pytest.raises(ShiraError, match=r"was trained on a float32 weight, the model's is bfloat16"):
        apply(model, a)
    with apply(model, a, check_base=False, alpha=-2.0):
        assert _bits_equal(_by_hand(in_bf16, a, -2.0), snapshot(model))
    assert _bits_equal(in_bf16, snapshot(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_model_moved_to_cuda_between_apply_and_remove():
    model = make_mlp()
    base = snapshot(model)
    a, b = _random_adapter(model, 1), _random_adapter(model, 2)
    ha, hb = apply(model, a), apply(model, b, alpha=0.5)  # on the CPU
    model.to("cuda")
    ha.remove()  # b is applied again, on the GPU
    assert _bits_equal(_by_hand(base, b, 0.5), {n: t.cpu() for n, t in snapshot(model).items()})
    hb.remove()
    assert _bits_equal(base, {n: t.cpu() for n, t in snapshot(model).items()})
    state = shira_hooks.serve.state.model_state(model)  # every tensor kept for the model is on its device now
    kept = [t for _, cache in state.caches.items() for prep in cache.prepared.values() for t in prep.tensors()]
    assert kept and all(t.device.type == "cuda" for t in kept)
    with apply(model, a, alpha=-1.0):  # apply again on the GPU (verified against the moved base)
        assert _bits_equal(_by_hand(base, a, -1.0), {n: t.cpu() for n, t in snapshot(model).items()})
    assert _bits_equal(base, {n: t.cpu() for n, t in snapshot(model).items()})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_adapter_prepared_on_cpu_applies_to_a_cuda_model():
    cpu_model, cuda_model = make_mlp(), make_mlp().to("cuda")
    base = snapshot(cpu_model)
    adapter = _random_adapter(cpu_model, 1)
    with apply(cpu_model, adapter, alpha=0.5):  # precomputed for the CPU model first
        on_cpu = snapshot(cpu_model)
    with apply(cuda_model, adapter, alpha=0.5):
        assert _bits_equal(on_cpu, {n: t.cpu() for n, t in snapshot(cuda_model).items()})
    assert _bits_equal(base, {n: t.cpu() for n, t in snapshot(cuda_model).items()})
    handle = apply(cuda_model, adapter)
    cuda_model.to("cpu")  # and back: remove on the CPU
    handle.remove()
    assert _bits_equal(base, snapshot(cuda_model))


def test_remove_after_a_weight_was_re_strided_in_place_restores_its_storage():
    """``w.data = w.data.t()`` keeps the storage the adapter was written into: remove restores it there."""
    model = make_llama()
    base = snapshot(model)
    handle = shira_hooks.apply(model, _random_adapter(model, 3))
    weight = model.model.layers[0].mlp.up_proj.weight
    weight.data = weight.data.t()
    handle.remove()
    weight.data = weight.data.t()
    assert _bits_equal(base, snapshot(model))


def test_an_adapter_naming_one_tied_weight_twice_is_refused_and_changes_nothing():
    model = make_llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    base = snapshot(model)
    adapter = _random_adapter(model, 3)  # names the tied weight once (named_parameters)
    twice = SparseAdapter({**adapter.deltas, "lm_head.weight": adapter.deltas["model.embed_tokens.weight"]})
    with pytest.raises(
        ShiraError,
        match=r"adapter modules 'model.embed_tokens.weight' and 'lm_head.weight' are one parameter of the model \(tied",
    ):
        shira_hooks.apply(model, twice)
    assert _bits_equal(base, snapshot(model)) and shira_hooks.applied(model) == []
    with shira_hooks.apply(model, adapter):  # once is fine
        pass
    assert _bits_equal(base, snapshot(model))
