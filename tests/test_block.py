"""Block masks (``attach(..., block=B)``): aligned runs of B entries of a row, from the mask to the file,
``apply``/``remove``, fusion, resume, the compact modes, the Trainer callback and PEFT export."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import shira_hooks
from shira_hooks import AdapterBank, ShiraError, SparseAdapter, SparseDelta, apply, fuse, masks, overlap
from shira_hooks.serve.state import model_state

from conftest import (
    assert_changes_within_masks,
    llama_batches,
    make_llama,
    make_mlp,
    mlp_batches,
    mlp_loss,
    mlp_steps,
    snapshot,
)


def _aligned(indices: torch.Tensor, block: int) -> bool:
    return masks.block_starts(indices, block) is not None


def _trained(mask="rand", block=16, sparsity=0.05, seed=3, **kwargs):
    """A tiny Llama, a handle on it and the adapter of 3 AdamW steps."""
    model = make_llama()
    calibration = llama_batches(2) if mask in masks.CALIBRATED_KINDS else None
    shira = shira_hooks.attach(
        model, sparsity, mask, seed=seed, block=block, calibration=calibration, progress=False, **kwargs
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for batch in llama_batches(3, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, shira


# ------------------------------------------------------------------------------------- budget
def test_budget_rounds_to_the_nearest_whole_block_and_keeps_one():
    assert masks.budget(576 * 576, 0.01) == 3318
    assert masks.budget(576 * 576, 0.01, 16) == 3312  # 3317.76 / 16 = 207.36 -> 207 blocks
    assert masks.budget(576 * 1536, 0.01, 16) == 8848  # 552.96 -> 553 blocks
    assert masks.budget(160, 0.25, 16) == 48  # 2.5 blocks: half up
    assert masks.budget(64 * 32, 0.001, 16) == 16  # 0.128 blocks: at least one
    assert masks.budget(32 * 16, 1.0, 16) == 512  # never more than the weight


@pytest.mark.parametrize("mask", ["struct", "rand", "wm", "grad", "snip"])
def test_every_kind_gives_aligned_runs_of_the_budget(mask):
    model = make_llama()
    before = snapshot(model)
    calibration = llama_batches(2) if mask in masks.CALIBRATED_KINDS else None
    with shira_hooks.attach(model, 0.05, mask, seed=0, block=16, calibration=calibration, progress=False) as shira:
        for name, indices in shira.masks.items():
            shape = before[name].shape
            assert indices.numel() == masks.budget(shape.numel(), 0.05, 16), name
            assert _aligned(indices, 16), name
            assert shira.block == 16


def test_struct_blocks_hold_the_diagonal_then_whole_rows():
    indices = masks.struct_mask((8, 64), 16 * 12, masks.generator_for(0, "w"), block=16).long()
    rows = indices // 64
    for row in range(8):  # the block holding entry (r, r) of each diagonal row
        assert row * 64 + row in indices.tolist()
    counts = torch.bincount(rows, minlength=8)
    # 8 diagonal blocks, then 3 fill a random row and 1 starts the next
    assert sorted(counts.tolist()) == [16] * 6 + [32, 64]


def test_wm_and_snip_rank_blocks_by_the_sum_of_their_scores():
    weight = torch.full((4, 64), 0.01)
    weight[2, 32:48] = 0.5  # one block with a large sum; a single larger entry elsewhere
    weight[0, 5] = 3.0
    assert torch.equal(masks.topk_mask(weight.reshape(-1).abs(), 16, 16).long(), torch.arange(2 * 64 + 32, 2 * 64 + 48))
    scores = torch.rand(4 * 64, generator=torch.Generator().manual_seed(0))
    picked = masks.topk_mask(scores, 32, 16).long()
    sums = scores.view(-1, 16).sum(1)
    assert set((picked[::16] // 16).tolist()) == set(torch.topk(sums, 2).indices.tolist())


def test_snip_block_mask_is_the_top_blocks_of_the_entry_scores():
    model = make_mlp()
    batches = mlp_batches(2)
    weight = model.layers[1].weight  # (32, 48)
    grads = torch.zeros_like(weight)
    for batch in batches:
        model.zero_grad()
        mlp_loss(model, batch).backward()
        grads += weight.grad.abs()
    model.zero_grad()
    expected = masks.topk_mask((weight.detach() * grads).abs().reshape(-1), masks.budget(weight.numel(), 0.1, 16), 16)
    with shira_hooks.attach(
        model, 0.1, "snip", target_modules=["layers.1"], block=16, calibration=batches, loss_fn=mlp_loss, progress=False
    ) as shira:
        assert torch.equal(shira.masks["layers.1.weight"], expected)


# -------------------------------------------------------------------------------------- refusals
def test_a_block_that_does_not_divide_a_row_names_the_weight_and_the_valid_blocks():
    model = make_mlp()  # rows of 16, 48, 32
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(
        ShiraError,
        match=r"block=32 does not divide the row length 16 of weight 'layers\.0\.weight' \(shape \(48, 16\).*Valid blocks for it: \[1, 2, 4, 8, 16\]",
    ):
        shira_hooks.attach(model, 0.1, "rand", seed=0, block=32)
    for bad in (0, -16, True, 2.0, "16"):
        with pytest.raises(ShiraError, match=r"block=.*it must be a positive int"):
            shira_hooks.attach(model, 0.1, "rand", seed=0, block=bad)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert not any(p._post_accumulate_grad_hooks for p in model.parameters())


def test_a_mask_function_must_return_whole_aligned_runs():
    model = make_mlp()

    def whole(name, weight):
        return masks.expand_blocks(torch.tensor([0, 3]), 16)

    def shifted(name, weight):
        return torch.arange(1, 17)

    with shira_hooks.attach(model, 0.1, whole, target_modules=["layers.1"], block=16) as shira:
        assert shira.masks["layers.1.weight"].tolist() == list(range(16)) + list(range(48, 64))
    with pytest.raises(
        ShiraError,
        match=r"mask function for 'layers\.1\.weight' \(shape \(32, 48\)\) selected 16 entries that are not whole aligned runs of block=16",
    ):
        shira_hooks.attach(model, 0.1, shifted, target_modules=["layers.1"], block=16)


# ------------------------------------------------------------------------------- training modes
@pytest.mark.parametrize("mode", ["compact", "sparse"])
def test_compact_modes_train_block_masks_as_the_dense_mode_does(mode):
    results = {}
    for run in ("dense", mode):
        model = make_mlp()
        base = snapshot(model)
        shira = shira_hooks.attach(
            model, 0.1, "rand", seed=2, block=16, mode=run, target_modules=["layers.0", "layers.1"]
        )
        mlp_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), mlp_batches(3))
        assert assert_changes_within_masks(shira, base, model) > 0
        results[run] = (shira.extract(), snapshot(model))
        shira.detach()
    (dense, dense_weights), (other, other_weights) = results["dense"], results[mode]
    for name, delta in dense.deltas.items():
        assert other.deltas[name].block == 16 and torch.equal(other.deltas[name].indices, delta.indices)
        torch.testing.assert_close(other.deltas[name].values, delta.values, rtol=1e-5, atol=1e-6)
    for name, weight in dense_weights.items():
        torch.testing.assert_close(other_weights[name], weight, rtol=1e-5, atol=1e-6)


def test_resume_keeps_the_block_and_refuses_another(tmp_path):
    model, shira = _trained()
    path = shira.save_state(tmp_path / "state.safetensors")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["block"]) == 16
    masks_before = shira.masks
    shira.detach()
    with shira_hooks.attach(model, 0.05, "rand", seed=99, block=16) as again:  # another seed: other masks until loaded
        again.load_state(path)
        assert all(torch.equal(again.masks[n], i) for n, i in masks_before.items())
        assert again.verify() == []
    with shira_hooks.attach(model, 0.05, "rand", seed=3) as unstructured:
        with pytest.raises(
            ShiraError, match=r"runs of block=16 entries, the handle was attached with block=1; attach with block=16"
        ):
            unstructured.load_state(path)
        state = unstructured.state_dict()
        del state["block"]  # a state from before block masks loads as block 1
        unstructured.load_state_dict(state)


# ---------------------------------------------------------------------------------- the file
def test_the_file_stores_one_index_per_block_and_reads_back_exactly(tmp_path):
    model, shira = _trained()
    adapter = shira.extract()
    shira.detach()
    assert adapter.block == 16 and "block=16" in repr(adapter)
    path = adapter.save(tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert meta["format_version"] == "2"
        modules = json.loads(meta["modules"])
        for name, delta in adapter.deltas.items():
            stored = f.get_tensor(f"{name}.indices")
            assert modules[name]["block"] == 16
            assert stored.dtype == torch.int32 and stored.numel() == delta.indices.numel() // 16
            assert torch.equal(stored.long() * 16, delta.indices.long()[::16])
    k = adapter.num_entries
    unstructured = SparseAdapter({n: replace(d, block=1) for n, d in adapter.deltas.items()}, adapter.metadata)
    old = unstructured.save(tmp_path / "old.safetensors")
    with safe_open(str(old), "pt") as f:
        assert (
            f.metadata()["format_version"] == "1"
            and "block" not in json.loads(f.metadata()["modules"])["model.layers.0.self_attn.q_proj.weight"]
        )

    def tensor_bytes(p):
        with safe_open(str(p), "pt") as f:
            names = list(f.keys())  # noqa: SIM118 (safe_open is not iterable)
            return sum(f.get_tensor(name).numel() * f.get_tensor(name).element_size() for name in names)

    assert tensor_bytes(path) == k * 4 + k // 16 * 4 and tensor_bytes(old) == k * 8  # 4.25 vs 8 bytes per entry
    back, old_back = SparseAdapter.load(path), SparseAdapter.load(old)
    assert old_back.block == 1
    for name, delta in adapter.deltas.items():
        for other in (back.deltas[name], old_back.deltas[name]):
            assert torch.equal(other.indices, delta.indices) and torch.equal(other.values, delta.values)
            assert other.fingerprint == delta.fingerprint
        assert back.deltas[name].block == 16 and back.deltas[name].indices.dtype == torch.int32


def test_bad_block_files_and_deltas_are_refused(tmp_path):
    shape = (4, 32)
    with pytest.raises(
        ShiraError,
        match=r"'w\.indices': block=16, but the 16 indices are not aligned runs of 16 entries within the rows of a \[4, 32\] weight",
    ):
        SparseDelta(shape, torch.float32, torch.arange(8, 24, dtype=torch.int32), torch.zeros(16), "", 16).validate("w")
    with pytest.raises(
        ShiraError, match=r"'w\.indices': block=16, but the 16 indices are not aligned runs"
    ):  # straddles rows of 24
        SparseDelta((4, 24), torch.float32, torch.arange(0, 16, dtype=torch.int32), torch.zeros(16), "", 16).validate(
            "w"
        )
    good = SparseAdapter(
        {"w": SparseDelta(shape, torch.float32, torch.arange(16, 48, dtype=torch.int32), torch.ones(32), "", 16)}
    )
    path = good.save(tmp_path / "a.safetensors")
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta, values = f.metadata(), f.get_tensor("w.values")
    save_file(
        {"w.indices": torch.tensor([1, 8], dtype=torch.int32), "w.values": values},
        tmp_path / "bad.safetensors",
        metadata=meta,
    )
    with pytest.raises(
        ShiraError,
        match=r"bad\.safetensors: tensor 'w\.indices' \(block numbers, block=16\): indices out of range \[1, 8\]; a weight of 8 entries",
    ):
        SparseAdapter.load(tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------ apply / remove
def _on(model, name):
    return dict(model.named_parameters())[name]


def test_whole_run_writes_equal_the_single_entry_path_bit_for_bit():
    model, shira = _trained()
    adapter = shira.extract()
    shira.detach()
    unstructured = SparseAdapter({n: replace(d, block=1) for n, d in adapter.deltas.items()}, adapter.metadata)
    other = SparseAdapter(
        {n: replace(d, values=torch.randn(d.values.shape) * 1e-2) for n, d in adapter.deltas.items()}
    )  # same entries
    blocks, singles = make_llama(), make_llama()
    base = snapshot(blocks)
    for alpha in (1.0, 0.37):
        a = apply(blocks, adapter, alpha)
        b = apply(singles, unstructured, alpha)
        cache = model_state(blocks).cache(adapter)
        assert all(p.runs is not None for p in cache.prepared.values())  # the whole-run path was taken
        for name, value in snapshot(blocks).items():
            assert torch.equal(value, _on(singles, name)), name
        stacked = apply(blocks, other, 0.5)  # stacked on the first one; removed out of order
        apply_b = apply(singles, other, 0.5)
        a.remove()
        b.remove()
        for name, value in snapshot(blocks).items():
            assert torch.equal(value, _on(singles, name)), name
        stacked.remove()
        apply_b.remove()
        for name, value in snapshot(blocks).items():
            assert torch.equal(value.view(torch.int32), base[name].view(torch.int32)), name
    transposed = make_llama()  # a weight that is not row-major takes the single-entry path, also exactly
    weight = _on(transposed, "model.layers.0.mlp.down_proj.weight")
    weight.data = weight.data.t().contiguous().t()
    with apply(transposed, adapter):
        assert model_state(transposed).cache(adapter).prepared["model.layers.0.mlp.down_proj.weight"].runs is None
        for name, value in snapshot(transposed).items():
            torch.testing.assert_close(
                value, _on(model, name), rtol=0, atol=1e-6
            )  # the trained model (W + S in float32)
    assert all(torch.equal(v, base[n]) for n, v in snapshot(transposed).items())
    fresh = make_llama(seed=1)
    with pytest.raises(ShiraError, match="do not match the adapter's fingerprint"):
        apply(fresh, adapter)


def test_fusion_keeps_a_common_block_and_falls_back_to_the_gcd():
    models = {}
    for seed, block in ((3, 16), (4, 16), (5, 32), (6, 1)):
        _, shira = _trained(block=block, seed=seed)
        models[seed] = shira.extract()
        shira.detach()
    base = make_llama()
    assert fuse([models[3], models[4]], base=base).block == 16
    assert fuse([models[3], models[5]], base=base).block == 16  # a 32-run is two 16-runs
    mixed = fuse([models[3], models[6]], base=base)
    assert mixed.block == 1 and all(d.block == 1 for d in mixed.deltas.values())
    fused = fuse([models[3], models[5]], [1.0, 0.5], base=base)
    stacked = make_llama()
    with apply(stacked, models[3]), apply(stacked, models[5], 0.5), apply(base, fused):
        for name, value in snapshot(base).items():
            torch.testing.assert_close(value, _on(stacked, name), rtol=0, atol=1e-6)
    assert overlap(models[3], models[4]).shared % 16 == 0  # shared entries come in whole runs


def test_adapter_bank_switches_block_adapters_and_restores_the_base(tmp_path):
    adapters = []
    for seed in (3, 4):
        trained, shira = _trained(seed=seed)
        adapters.append((shira.extract(), snapshot(trained)))
        shira.detach()
    model = make_llama()
    base = snapshot(model)
    bank = AdapterBank(model, {"a": adapters[0][0], "b": adapters[1][0].save(tmp_path / "b.safetensors")})
    for name in ("a", "b", "a"):
        bank.activate(name)
        want = adapters[0][1] if name == "a" else adapters[1][1]
        for n, v in snapshot(model).items():
            torch.testing.assert_close(v, want[n], rtol=0, atol=1e-6)
    bank.deactivate()
    assert all(torch.equal(v, base[n]) for n, v in snapshot(model).items())


# ----------------------------------------------------------------------- PEFT, Hub folder, Trainer
def test_peft_export_writes_block_adapters_as_ordinary_entries(tmp_path):
    peft = pytest.importorskip("peft")
    model, shira = _trained(block=16, sparsity=0.1)
    adapter = shira.extract()
    shira.detach()
    back = SparseAdapter.from_peft(adapter.to_peft(tmp_path / "peft"), base=make_llama())
    assert back.block == 1
    for name, delta in adapter.deltas.items():
        assert torch.equal(back.deltas[name].indices, delta.indices) and torch.equal(
            back.deltas[name].values, delta.values
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that the Llama config has no task_type
        merged = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "peft").merge_and_unload()
    for name, value in snapshot(model).items():
        torch.testing.assert_close(_on(merged, name), value, rtol=0, atol=1e-6)


def test_hub_folder_and_inspect_record_the_block(tmp_path, capsys):
    _, shira = _trained()
    adapter = shira.extract()
    shira.detach()
    folder = adapter.save_pretrained(tmp_path / "hub")
    assert json.loads((folder / "shira_config.json").read_text())["block"] == 16
    assert SparseAdapter.from_pretrained(folder).block == 16
    from shira_hooks.tools.cli import main

    assert main(["inspect", str(folder / "shira_adapter.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "block 16 (one index per run of 16 entries in the file)" in out


def test_trainer_callback_attaches_with_a_block_and_writes_a_block_adapter(tmp_path):
    pytest.importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    from shira_hooks.integrations import ADAPTER_FILE, ShiraCallback

    class Tokens(torch.utils.data.Dataset):
        items = [{"input_ids": row, "labels": row} for b in llama_batches(4) for row in b["input_ids"]]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    model = make_llama()
    callback = ShiraCallback(sparsity=0.05, mask="snip", block=16, calibration_batches=2, progress=False)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[callback]).train()
    adapter = SparseAdapter.load(tmp_path / ADAPTER_FILE)
    assert adapter.block == 16 and all(_aligned(d.indices, 16) for d in adapter.deltas.values())
    assert callback.report["changed_outside_masks"] == []
    fresh = make_llama()
    with apply(fresh, adapter):
        for name, value in snapshot(model).items():
            torch.testing.assert_close(_on(fresh, name), value, rtol=0, atol=1e-6)
    callback.handle.detach()
