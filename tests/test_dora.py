"""SHiRA-DoRA: its arithmetic (shira_hooks/train/dora.py) against a dense float64 reference, and attach(..., dora=True)
(shira_hooks/train/modes/dora.py) trained with real optimizers, a Trainer, DDP, copies and resumes."""

from __future__ import annotations

import copy
import json
import os
import pickle
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import shira_hooks
from shira_hooks import ShiraError, digest
from shira_hooks.train import dora

from conftest import assert_changes_within_masks, llama_batches, make_llama, make_mlp, mlp_batches, mlp_loss, snapshot


def _case(seed: int = 0, out: int = 6, inp: int = 9, k: int = 11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, inp, generator=g, dtype=dtype)
    flat = torch.randperm(out * inp, generator=g)[:k].sort().values
    return w0, flat, flat // inp, flat % inp


def _dense_reference(w0, flat, v_masked, magnitude):
    """W = W0 + M * (m * V / ||V||_row - W0) with V = W0 + M * S, built densely."""
    mask = torch.zeros(w0.numel(), dtype=torch.bool)
    mask[flat] = True
    mask = mask.view_as(w0)
    v = w0.clone().view(-1).index_put((flat,), v_masked).view_as(w0)
    directed = magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    return torch.where(mask, directed, w0)


def test_the_masked_entries_equal_the_dense_reference_and_their_gradients_match():
    w0, flat, rows, _ = _case()
    base = dora.row_norm_base(w0, rows, w0.view(-1)[flat])
    values = (w0.view(-1)[flat] + 0.3 * torch.randn(flat.numel(), dtype=torch.float64)).requires_grad_()
    magnitude = (w0.norm(dim=1) * 1.2).requires_grad_()

    def ours(values, magnitude):
        return dora.effective(values, magnitude, rows, dora.masked_norms(values, rows, base))

    def reference(values, magnitude):
        return _dense_reference(w0, flat, values, magnitude).view(-1)[flat]

    torch.testing.assert_close(ours(values, magnitude), reference(values, magnitude), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (values, magnitude))
    cotangent = torch.randn(flat.numel(), dtype=torch.float64)
    ours_grads = torch.autograd.grad(ours(values, magnitude), (values, magnitude), cotangent)
    reference_grads = torch.autograd.grad(reference(values, magnitude), (values, magnitude), cotangent)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_at_initialisation_the_layer_is_the_base_bit_for_bit(dtype):
    w0, flat, rows, cols = _case(seed=1, out=64, inp=48, k=300, dtype=torch.float32)
    w0 = w0.to(dtype)
    v0 = w0.view(-1)[flat]
    base = dora.row_norm_base(w0, rows, v0)
    magnitude = dora.masked_norms(v0, rows, base)  # the initial magnitude: the forward's own computation
    out = dora.effective(v0, magnitude, rows, dora.masked_norms(v0, rows, base)).to(dtype)
    assert torch.equal(out, v0)
    # the low-rank variant: B = 0 at initialisation
    b, a = torch.zeros(64, 4), torch.randn(4, 48)
    values, norms = dora.low_rank_masked(v0, w0, b, a, rows, cols)
    assert torch.equal(dora.effective(values, norms.clone(), rows, norms).to(dtype), v0)


def test_the_low_rank_variant_matches_a_dense_reference():
    w0, flat, rows, cols = _case(seed=2)
    b = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    magnitude = torch.rand(6, dtype=torch.float64, requires_grad=True)

    def ours(b, a, magnitude):
        values, norms = dora.low_rank_masked(w0.view(-1)[flat], w0, b, a, rows, cols)
        return dora.effective(values, magnitude, rows, norms)

    def reference(b, a, magnitude):
        v = w0 + b @ a
        return (magnitude[:, None] * v / v.norm(dim=1, keepdim=True)).view(-1)[flat]

    torch.testing.assert_close(ours(b, a, magnitude), reference(b, a, magnitude), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (b, a, magnitude))


# ----------------------------------------------------------------------------- attach(..., dora=True)
VARIANTS = [("compact", None), ("compact", 3), ("sparse", None), ("sparse", 3)]
VARIANT_IDS = ["compact", "compact-r3", "sparse", "sparse-r3"]
DORA_NAMES = {None: ("shira_values", "shira_magnitude"), 3: ("shira_dora_a", "shira_dora_b", "shira_magnitude")}


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _steps(model, optimizer, batches):
    for batch in batches:
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(_trainable(model), 1.0)
        optimizer.step()
        optimizer.zero_grad()


def _logits(model, seed=9):
    with torch.no_grad():
        return model(**llama_batches(1, seed=seed)[0]).logits


@pytest.mark.parametrize("mode, rank", VARIANTS, ids=VARIANT_IDS)
def test_at_attach_the_model_is_the_base_bit_for_bit(mode, rank):
    base_model, model = make_llama(), make_llama()
    shira = shira_hooks.attach(model, 0.05, "wm", mode=mode, dora=True, dora_rank=rank, seed=1)
    trained = {n.rpartition(".")[2] for n, p in model.named_parameters() if p.requires_grad}
    assert trained == set(DORA_NAMES[rank])
    batch = llama_batches(1, seed=3)[0]
    logits = model(**batch).logits  # with autograd: the forward hook computes the masked entries and taps them
    assert torch.equal(logits, base_model(**batch).logits)
    assert all(torch.equal(p, snapshot(base_model)[n]) for n, p in model.named_parameters() if n in shira.masks)
    shira.detach()


def _dense_model_gradients(model, base, shira, rank, batch):
    """The MLP's loss with every target weight built densely in float64 as W0 + M * (m * V / ||V|| - W0) from the
    base weights, and the gradients of that loss with respect to (float64 copies of) the handle's DoRA tensors."""
    modules = dict(model.named_modules())
    leaves, x = {}, batch[0].double()
    for i, layer in enumerate(model.layers):
        name = f"layers.{i}.weight"
        w0 = base[name].double()
        index = shira.masks[name].long()
        mask = torch.zeros(w0.numel(), dtype=torch.bool).index_fill_(0, index, True).view_as(w0)
        own = {n: getattr(modules[f"layers.{i}"], n).detach().double().requires_grad_() for n in DORA_NAMES[rank]}
        leaves.update({f"layers.{i}.{n}": t for n, t in own.items()})
        if rank is None:
            v = w0.reshape(-1).index_put((index,), own["shira_values"]).view_as(w0)
        else:
            v = w0 + own["shira_dora_b"] @ own["shira_dora_a"]
        w = torch.where(mask, own["shira_magnitude"][:, None] * v / v.norm(dim=1, keepdim=True), w0)
        x = nn.functional.linear(x, w, layer.bias.detach().double())
        if i < len(model.layers) - 1:
            x = torch.relu(x)
    loss = nn.functional.cross_entropy(x, batch[1])
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("mode, rank", VARIANTS, ids=VARIANT_IDS)
def test_gradients_equal_a_dense_float64_reference(mode, rank):
    model = make_mlp()
    with torch.no_grad():  # rows of norm far from 1
        for layer in model.layers:
            layer.weight.mul_(2)
    base = snapshot(model)
    shira = shira_hooks.attach(
        model, 0.1, "rand", seed=0, mode=mode, dora=True, dora_rank=rank, target_modules=[nn.Linear]
    )
    if rank is not None:
        with torch.no_grad():  # B != 0 (else A's gradient is zero) and m != ||V||
            for layer in model.layers:
                layer.shira_dora_b.normal_(0, 0.1)
                layer.shira_magnitude.mul_(1.3)
    batch = mlp_batches(1)[0]
    expected = _dense_model_gradients(model, base, shira, rank, batch)
    mlp_loss(model, batch).backward()
    params = dict(model.named_parameters())
    for name, grad in expected.items():
        torch.testing.assert_close(params[name].grad.double(), grad, rtol=2e-4, atol=1e-6, msg=name)
    assert all(layer.weight.grad is None for layer in model.layers)  # no dense dL/dW
    shira.detach()


@pytest.mark.parametrize("mode, rank", VARIANTS, ids=VARIANT_IDS)
def test_training_changes_only_masked_entries_and_the_adapter_reproduces_it(mode, rank):
    model, plain_model = make_llama(), make_llama()
    base = snapshot(model)
    shira = shira_hooks.attach(model, 0.05, "wm", mode=mode, dora=True, dora_rank=rank, seed=1)
    plain = shira_hooks.attach(plain_model, 0.05, "wm", mode=mode)
    magnitudes = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("shira_magnitude")}
    batches = llama_batches(3, seed=4)
    _steps(model, torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1), batches)
    _steps(plain_model, torch.optim.AdamW(_trainable(plain_model), lr=1e-2, weight_decay=0.1), batches)
    assert assert_changes_within_masks(shira, base, model) > 0 and shira.verify() == []
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], m) for n, m in magnitudes.items())  # the magnitude learns
    assert not torch.allclose(_logits(model), _logits(plain_model), atol=1e-4)  # DoRA trains otherwise than SHiRA
    adapter = shira.extract()
    assert set(adapter.deltas) == set(shira.masks) and all(
        torch.equal(d.indices, shira.masks[n]) for n, d in adapter.deltas.items()
    )
    trained = _logits(model)
    fresh = make_llama()
    with shira_hooks.apply(fresh, adapter):
        for name, param in fresh.named_parameters():  # W0 + (E - W0): E up to the rounding of the float32 sum
            torch.testing.assert_close(param, params[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(_logits(fresh), trained, rtol=0, atol=1e-5)
    shira.detach()
    plain.detach()
    assert not any("shira_" in n for n, _ in model.named_parameters())  # every DoRA tensor unregistered
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    assert torch.equal(_logits(model), trained)  # the weights keep the trained entries


@pytest.mark.parametrize("mode, rank", VARIANTS, ids=VARIANT_IDS)
def test_resume_from_the_handle_state_is_exact(tmp_path, mode, rank):
    batches = llama_batches(4, seed=5)
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "wm", mode=mode, dora=True, dora_rank=rank, seed=1)
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1)
    _steps(model, optimizer, batches[:2])
    shira.save_state(tmp_path / "state.safetensors")
    # the checkpoint's model weights (holding E at the masks) without the DoRA tensors: those come from the handle state
    weights = {k: v.clone() for k, v in model.state_dict().items() if "shira_" not in k}
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    _steps(model, optimizer, batches[2:])

    other = make_llama()
    resumed = shira_hooks.attach(other, 0.05, "wm", mode=mode, dora=True, dora_rank=rank, seed=7)  # other factors
    assert other.load_state_dict(weights, strict=False).unexpected_keys == []
    resumed.load_state(tmp_path / "state.safetensors")
    assert resumed.seed == 1 and resumed.verify() == []
    resumed_optimizer = torch.optim.AdamW(_trainable(other), lr=1e-2, weight_decay=0.1)
    resumed_optimizer.load_state_dict(optimizer_state)
    _steps(other, resumed_optimizer, batches[2:])
    ours, theirs = dict(model.named_parameters()), dict(other.named_parameters())
    assert ours.keys() == theirs.keys() and all(torch.equal(p, theirs[n]) for n, p in ours.items())
    shira.detach()
    resumed.detach()


def test_a_state_of_another_dora_setting_is_refused():
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True)
    state = shira.state_dict()
    assert state["dora"] == {"rank": None} and set(state["targets"]["model.layers.0.mlp.up_proj.weight"]["mode"]) == {
        "shira_values",
        "shira_magnitude",
    }
    shira.detach()
    for kwargs, saved, ours in [
        (dict(), "dora=True", "dora=False"),
        (dict(dora=True, dora_rank=4), "dora=True", r"dora=True, dora_rank=4"),
    ]:
        other = shira_hooks.attach(make_llama(), 0.05, "wm", mode="sparse", **kwargs)
        with pytest.raises(
            ShiraError,
            match=rf"the state was saved by a handle attached with {saved}, this handle was attached with {ours}; attach with dora=True, as",
        ):
            other.load_state_dict(state)
        other.detach()
    plain = shira_hooks.attach(make_llama(), 0.05, "wm", mode="sparse")
    state = plain.state_dict()
    plain.detach()
    other = shira_hooks.attach(make_llama(), 0.05, "wm", mode="sparse", dora=True)
    with pytest.raises(
        ShiraError, match=r"saved by a handle attached with dora=False, this handle was attached with dora=True"
    ):
        other.load_state_dict(state)
    other.detach()


def test_arguments_and_modes_that_cannot_train_dora_are_refused():
    with pytest.raises(
        ShiraError,
        match=r"dora=True needs the masked entries as parameters of their own, which mode='dense' does not make; use mode='compact' or mode='sparse'",
    ):
        shira_hooks.attach(make_llama(), 0.05, "wm", dora=True)
    with pytest.raises(ShiraError, match=r"dora_rank=4 sets the rank of SHiRA-DoRA's factors; pass dora=True with it"):
        shira_hooks.attach(make_llama(), 0.05, "wm", mode="sparse", dora_rank=4)
    with pytest.raises(ShiraError, match=r"dora_rank=0; it must be a positive int"):
        shira_hooks.attach(make_llama(), 0.05, "wm", mode="sparse", dora=True, dora_rank=0)
    with pytest.raises(ShiraError, match=r"dora='yes'; it must be True or False"):
        shira_hooks.attach(make_llama(), 0.05, "wm", mode="sparse", dora="yes")
    model = make_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(
        ShiraError,
        match=r"dora_rank=1000000000 exceeds the rank of weight 'model\.layers\.0\.self_attn\.q_proj\.weight' \(module "
        r"'model\.layers\.0\.self_attn\.q_proj', shape \(32, 32\)\): .* Pass dora_rank <= 32",
    ):  # the allocator's RuntimeError before, from the factors' torch.empty
        shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, dora_rank=10**9)
    assert dict(model.named_parameters()).keys() == before.keys() and not shira_hooks.attached(model)
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())


@pytest.mark.parametrize("rank", [None, 3])
def test_copies_train_like_the_original(rank):
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, dora_rank=rank, seed=1)
    _steps(model, torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1), llama_batches(1, seed=4))
    copies = [copy.deepcopy(model), pickle.loads(pickle.dumps(model))]
    for m in [model, *copies]:
        _steps(m, torch.optim.AdamW(_trainable(m), lr=1e-2, weight_decay=0.1), llama_batches(2, seed=5))
    expected = shira.extract()
    for m in copies:
        (handle,) = shira_hooks.attached(m)
        assert handle.dora and handle.dora_rank == rank and handle.verify() == []
        adapter = handle.extract()
        assert all(torch.equal(d.values, expected.deltas[n].values) for n, d in adapter.deltas.items())
        handle.detach()
    shira.detach()


@pytest.mark.parametrize("rank", [None, 3])
def test_a_load_with_assign_is_followed_and_a_stale_optimizer_is_named(rank):
    """``load_state_dict(..., assign=True)`` replaces every parameter, the DoRA tensors too: the handle
    trains the new ones, and an optimizer built before the load is refused, naming the parameter it holds."""
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, dora_rank=rank, seed=1)
    stale = torch.optim.AdamW([p for n, p in model.named_parameters() if n.endswith(".shira_magnitude")], lr=1e-2)
    _steps(model, torch.optim.AdamW(_trainable(model), lr=1e-2), llama_batches(2, seed=4))
    trained = shira.extract()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert shira.verify() == []
    assert all(torch.equal(d.values, trained.deltas[n].values) for n, d in shira.extract().deltas.items())
    model(**llama_batches(1, seed=5)[0]).loss.backward()
    with pytest.raises(
        ShiraError,
        match=r"AdamW holds the parameter '.*\.shira_magnitude' had before it was replaced .* trained for '.*weight'",
    ):
        stale.step()
    model.zero_grad()
    loaded = snapshot(model)
    _steps(model, torch.optim.AdamW(_trainable(model), lr=1e-2), llama_batches(2, seed=6))  # trains the new ones
    assert assert_changes_within_masks(shira, loaded, model) > 0 and shira.verify() == []
    shira.detach()
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mode, rank", VARIANTS, ids=VARIANT_IDS)
def test_a_row_of_zeros_trains_without_nan(mode, rank):
    """A pruned or zero-initialised row has norm 0: m / ||V|| would be 0 / 0 and one step would make every
    layer NaN (through clipping). struct masks cover every row, so its masked entries are in the mask."""
    model = make_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[5].zero_()
    base, reference = snapshot(model), copy.deepcopy(model)
    shira = shira_hooks.attach(model, 0.05, "struct", mode=mode, dora=True, dora_rank=rank, seed=1)
    assert torch.equal(_logits(model), _logits(reference))  # the base bit for bit at attach
    _steps(model, torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1), llama_batches(3, seed=4))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert assert_changes_within_masks(shira, base, model) > 0 and shira.verify() == []
    trained, adapter = _logits(model), shira.extract()
    with shira_hooks.apply(reference, adapter):
        torch.testing.assert_close(_logits(reference), trained, rtol=0, atol=1e-5)
    shira.detach()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mode, rank", VARIANTS, ids=VARIANT_IDS)
def test_a_cast_after_attach_starts_from_the_cast_base(mode, rank, dtype):
    """model.to(dtype) between attach and training: the layer is the cast base bit for bit, extract() is all
    zeros, and training changes only masked entries in the new dtype (as an attach after the cast would)."""
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "wm", mode=mode, dora=True, dora_rank=rank, seed=1)
    model.to(dtype)
    reference = make_llama().to(dtype)
    batch = llama_batches(1, seed=3)[0]
    assert torch.equal(model(**batch).logits, reference(**batch).logits)
    assert all(not d.values.any() for d in shira.extract().deltas.values())
    wide = torch.promote_types(dtype, torch.float32)
    assert {p.dtype for n, p in model.named_parameters() if "shira_" in n and "shira_values" not in n} == {wide}
    base = snapshot(model)
    _steps(model, torch.optim.AdamW(_trainable(model), lr=1e-2), llama_batches(2, seed=4))
    assert assert_changes_within_masks(shira, base, model) > 0 and shira.verify() == []
    trained = _logits(model)
    with shira_hooks.apply(reference, shira.extract()):
        torch.testing.assert_close(_logits(reference), trained, rtol=0, atol=1e-5)  # W0 + (E - W0): E up to rounding
    # after training a cast would round the trained tensors: refused at the next use, detach still works
    model.to(torch.float32 if dtype is torch.float64 else torch.float16)
    with pytest.raises(
        ShiraError, match=r"was cast from .* after attach\(dora=True\) and training.*Cast the model before attach"
    ):
        model(**batch)
    shira.detach()
    assert not any("shira_" in n for n, _ in model.named_parameters())


def test_freezing_the_magnitude_alone_trains_the_direction_and_detach_restores_the_flags():
    model = make_llama()
    base = snapshot(model)
    shira = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, seed=1)
    magnitudes = {n: p for n, p in model.named_parameters() if n.endswith(".shira_magnitude")}
    frozen = {n: p.detach().clone() for n, p in magnitudes.items()}
    for p in magnitudes.values():
        p.requires_grad_(False)  # DoRA's direction-only ablation
    _steps(model, torch.optim.AdamW(_trainable(model), lr=1e-2), llama_batches(2, seed=4))
    assert all(torch.equal(p, frozen[n]) for n, p in magnitudes.items())
    assert assert_changes_within_masks(shira, base, model) > 0
    shira.detach()
    assert all(p.requires_grad for p in model.parameters())  # not taken for peft managing the flags


def test_refusals_under_dora_do_not_suggest_the_dense_mode():
    """mode='dense' has no DoRA variant: a refusal that suggests it would send the user in a circle."""
    with pytest.raises(
        ShiraError, match=r"pass calibration=batches \(dora=True trains in the compact and sparse"
    ) as caught:
        shira_hooks.attach(make_llama(), 0.05, "snip", mode="sparse", dora=True)
    assert "mode='dense'" not in str(caught.value)
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    with pytest.raises(ShiraError, match=r"shared by 2 modules.*Leave tied weights out of target_modules") as caught:
        shira_hooks.attach(tied, 0.1, "rand", mode="sparse", dora=True)
    assert "mode='dense'" not in str(caught.value)
    with pytest.raises(ShiraError, match=r"shared by 2 modules.*Use mode='dense' for tied weights"):
        shira_hooks.attach(tied, 0.1, "rand", mode="sparse")


# ------------------------------------------------------------------------------- Trainer, DDP, FSDP2
def test_trainer_trains_and_resumes_the_low_rank_variant(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from shira_hooks.integrations import ShiraCallback

    class Tokens(torch.utils.data.Dataset):
        items = [{"input_ids": row, "labels": row} for b in llama_batches(8, seed=1) for row in b["input_ids"]]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def run(resume=None, seed=0):
        model = make_llama()
        shira = shira_hooks.attach(model, 0.02, "rand", seed=seed, mode="sparse", dora=True, dora_rank=2)
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=4,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            weight_decay=0.1,
            lr_scheduler_type="constant",
            save_strategy="steps",
            save_steps=2,
            report_to=[],
            use_cpu=True,
            seed=0,
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ShiraCallback(shira)]).train(
            resume_from_checkpoint=resume
        )
        return model, shira

    base = snapshot(make_llama())
    model, shira = run()
    assert assert_changes_within_masks(shira, base, model) > 0 and shira.verify() == []
    final = shira.extract()
    shira.detach()
    _, again = run(
        resume=str(tmp_path / "checkpoint-2"), seed=5
    )  # another seed: other factors, unless the state restores them
    for name, delta in again.extract().deltas.items():
        torch.testing.assert_close(delta.values, final.deltas[name].values, rtol=1e-5, atol=1e-7, msg=name)
    again.detach()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    report = {}
    for dora_rank in (None, 3):
        model = make_llama()
        base = snapshot(model)
        shira = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, dora_rank=dora_rank, seed=1)
        magnitude = model.model.layers[0].mlp.up_proj.shira_magnitude.detach().clone()
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1)
        for batch in llama_batches(2, seed=20 + rank):
            ddp(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        params = dict(model.named_parameters())
        report[str(dora_rank)] = {
            "everything": digest(torch.cat([p.detach().reshape(-1) for p in model.parameters()])),
            "changed": assert_changes_within_masks(shira, base, model),
            "verify": shira.verify(),
            "magnitude_moved": not torch.equal(params["model.layers.0.mlp.up_proj.shira_magnitude"], magnitude),
        }
        if rank == 0:
            torch.save(
                {n: d.values for n, d in shira.extract().deltas.items()}, os.path.join(out, f"deltas{dora_rank}.pt")
            )
        shira.detach()
    report["fsdp2"] = _fsdp2(rank, out)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def _shard(model, **kwargs) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)


def _full(model) -> dict[str, torch.Tensor]:
    """Every parameter whole (a collective under FSDP2)."""
    from shira_hooks.distributed import gather

    return {name: gather(p.detach()).clone() for name, p in model.named_parameters()}


def _fsdp2(rank: int, out: str) -> dict:
    """FSDP2: attach before fully_shard (the Trainer's order) trains, extracts and resumes on the shards; attach
    after fully_shard is refused."""
    report: dict = {}
    model = make_llama()
    _shard(model)
    try:
        shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True)
    except ShiraError as error:
        report["after"] = str(error)
    for dora_rank in (None, 3):
        model = make_llama()
        base = _full(model)
        shira = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, dora_rank=dora_rank, seed=1)
        _shard(model)
        optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1)
        for batch in llama_batches(2, seed=20 + rank):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        now = _full(model)
        outside = 0
        for name, indices in shira.masks.items():
            changed = (now[name].reshape(-1) != base[name].reshape(-1)).nonzero().reshape(-1)
            outside += int((~torch.isin(changed, indices.long())).sum())
        up = model.model.layers[0].mlp.up_proj
        part = {
            "types": sorted(
                {
                    type(getattr(up, name)).__name__
                    for name in shira.state_dict()["targets"]["model.layers.0.mlp.up_proj.weight"]["mode"]
                }
            ),
            "outside": outside,
            "verify": shira.verify(),
        }
        adapter = shira.extract()  # every rank: it gathers
        state = shira.state_dict()  # every rank: it gathers the DoRA tensors
        if rank == 0:
            torch.save({n: d.values for n, d in adapter.deltas.items()}, os.path.join(out, f"fsdp2_{dora_rank}.pt"))
            shira.save_state(os.path.join(out, f"state_{dora_rank}.safetensors"), state)
        shira.detach()
        part["left_frozen"] = sorted(
            {
                name.rpartition(".")[2]
                for name, p in model.named_parameters()
                if "shira_" in name and not p.requires_grad
            }
        )
        dist.barrier()
        # resume into another sharded model, attached with another seed (other factors unless the state restores them)
        model = make_llama()
        again = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, dora_rank=dora_rank, seed=9)
        _shard(model)
        model(**llama_batches(1, seed=30)[0])  # the first forward adopts the shards
        again.load_state(os.path.join(out, f"state_{dora_rank}.safetensors"))
        resumed = again.extract()
        part["resumed"] = all(torch.equal(d.values, adapter.deltas[n].values) for n, d in resumed.deltas.items())
        again.detach()
        report[str(dora_rank)] = part
    # bfloat16 compute (Accelerate's mixed_precision: bf16) with gradient checkpointing: still only masked entries
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model = make_llama()
    model.gradient_checkpointing_enable()
    base = _full(model)
    shira = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, seed=1)
    _shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1)
    for batch in llama_batches(2, seed=20 + rank):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    now, masks = _full(model), shira.masks
    report["bf16"] = {
        "outside": sum(
            int((~torch.isin((now[n] != base[n]).reshape(-1).nonzero().reshape(-1), i.long())).sum())
            for n, i in masks.items()
        ),
        "changed": sum(int((now[n] != base[n]).sum()) for n in masks),
        "verify": shira.verify(),
    }
    shira.detach()
    return report


def test_two_process_ddp_and_fsdp2_equal_one_process_on_the_whole_batch(tmp_path):
    """DDP, and FSDP2 attached before fully_shard: the same adapter as one process on both ranks' batches; under
    FSDP2 the DoRA tensors are sharded, only masked entries change (also in bfloat16 with gradient checkpointing),
    state resumes on the shards, detach leaves them frozen; attach after fully_shard is refused."""
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1  # replicas equal, the DoRA tensors included
    fsdp2 = r0["fsdp2"]
    assert (
        "dora=True cannot train weight 'model.layers.0.self_attn.q_proj.weight': fully_shard (FSDP2) already sharded it"
        in fsdp2["after"]
        and "Attach before fully_shard" in fsdp2["after"]
    )
    for dora_rank, names in (
        (None, ["shira_magnitude", "shira_values"]),
        (3, ["shira_dora_a", "shira_dora_b", "shira_magnitude"]),
    ):
        part = fsdp2[str(dora_rank)]
        assert part["types"] == ["DTensor"], part  # fully_shard sharded the DoRA tensors with the weight
        assert part["outside"] == 0 and part["verify"] == [] and part["resumed"], part
        assert part["left_frozen"] == names, part
    assert fsdp2["bf16"]["outside"] == 0 and fsdp2["bf16"]["verify"] == [] and fsdp2["bf16"]["changed"] > 0
    for dora_rank in (None, 3):
        assert (
            r0[str(dora_rank)]["changed"] > 0
            and r0[str(dora_rank)]["verify"] == []
            and r0[str(dora_rank)]["magnitude_moved"]
        )
        model = make_llama()  # one process on both ranks' batches: the mean of the ranks' mean losses
        shira = shira_hooks.attach(model, 0.05, "wm", mode="sparse", dora=True, dora_rank=dora_rank, seed=1)
        optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2, weight_decay=0.1)
        for a, b in zip(llama_batches(2, seed=20), llama_batches(2, seed=21)):
            model(**{k: torch.cat([a[k], b[k]]) for k in a}).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        expected = shira.extract().deltas
        for run in (f"deltas{dora_rank}.pt", f"fsdp2_{dora_rank}.pt"):  # DDP, FSDP2
            deltas = torch.load(tmp_path / run)
            assert deltas.keys() == expected.keys(), run
            for name, delta in expected.items():
                torch.testing.assert_close(deltas[name], delta.values, rtol=1e-4, atol=1e-6, msg=f"{run}: {name}")
        shira.detach()
