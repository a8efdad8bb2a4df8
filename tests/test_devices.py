"""Weights that move after attach: another device, another dtype, another memory layout, new storage.

Every tensor a handle keeps (indices, base values, compact plans, CSR patterns) follows the weight at
use time. The CUDA tests run where a GPU is available and are skipped otherwise.
"""

import pytest
import torch
from torch import nn

import shira_hooks

from conftest import assert_changes_within_masks, llama_batches, make_llama, make_mlp, mlp_batches, mlp_steps, snapshot

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
MODES = ["dense", "compact", "sparse"]


def _train_llama(model, steps=2, device="cpu"):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in llama_batches(steps):
        model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def _conv_stack(seed=0):
    """Two 3x3 convolutions with several input channels (so channels_last differs from row-major)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1))


def _conv_steps(model, steps=3, memory_format=torch.contiguous_format):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        image = torch.randn(2, 3, 6, 6, generator=g).contiguous(memory_format=memory_format)  # (B, C, H, W)
        model(image).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


# ------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("when", ["before attach", "after attach"])
def test_channels_last_conv_weights_train_exactly(when):
    """diffusers UNets keep conv weights channels_last; masks stay logical row-major indices."""
    model, twin = _conv_stack(), _conv_stack()
    targets = [nn.Conv2d]
    if when == "before attach":
        model.to(memory_format=torch.channels_last)
    shira = shira_hooks.attach(model, 0.1, "wm", target_modules=targets)
    if when == "after attach":
        model.to(memory_format=torch.channels_last)
    assert not model[0].weight.is_contiguous() and not model[2].weight.is_contiguous()
    before = snapshot(model)
    _conv_steps(model, memory_format=torch.channels_last)
    assert assert_changes_within_masks(shira, before, model) > 0 and shira.verify() == []
    adapter = shira.extract()
    shira.detach()

    reference = shira_hooks.attach(twin, 0.1, "wm", target_modules=targets)  # the same run, contiguous
    _conv_steps(twin)
    expected = reference.extract()
    reference.detach()
    for name, delta in expected.deltas.items():
        assert torch.equal(adapter.deltas[name].indices, delta.indices)
        torch.testing.assert_close(adapter.deltas[name].values, delta.values, rtol=1e-4, atol=1e-6)
    fresh = _conv_stack()
    with shira_hooks.apply(fresh, adapter):
        for index in (0, 2):
            torch.testing.assert_close(fresh[index].weight, model[index].weight, rtol=0, atol=1e-6)


def test_a_layout_with_gaps_is_refused_by_name():
    model = make_mlp()
    model.layers[1].weight.data = torch.randn(96, 48)[::2]  # every other row of a bigger tensor
    with pytest.raises(
        shira_hooks.ShiraError, match=r"weight 'layers.1.weight' \(module 'layers.1'\) has a layout with gaps"
    ):
        shira_hooks.attach(model, 0.05, "rand")


# ------------------------------------------------------------------------------ dtypes and storage
@pytest.mark.parametrize("mode", MODES)
def test_a_dtype_cast_after_attach_is_followed(mode):
    """``model.to(torch.bfloat16)`` after attach: the base becomes the cast base, the adapter a bfloat16 one."""
    model = make_llama()
    shira = shira_hooks.attach(model, 0.03, "rand", mode=mode)
    model.to(torch.bfloat16)
    before = snapshot(model)
    _train_llama(model)
    shira._sync()
    assert assert_changes_within_masks(shira, before, model) > 0 and shira.verify() == []
    adapter = shira.extract()
    assert {d.dtype for d in adapter.deltas.values()} == {torch.bfloat16}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if n in shira.masks}
    shira.detach()
    fresh = make_llama().to(torch.bfloat16)
    with shira_hooks.apply(fresh, adapter):
        for name, param in fresh.named_parameters():
            if name in trained:
                assert torch.equal(param, trained[name]), name


def test_parameter_storage_replaced_after_attach():
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand")
    for param in model.parameters():
        param.data = param.data.clone()  # new storage, same parameter objects
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    mlp_steps(model, optimizer, mlp_batches(2))
    assert assert_changes_within_masks(shira, before, model) > 0 and shira.verify() == []
    shira.detach()


# ------------------------------------------------------------------------------------------ CUDA
class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32):
        self.items = [{"input_ids": row, "labels": row} for b in llama_batches(n // 4) for row in b["input_ids"]]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_model_moved_by_the_trainer_after_attach(tmp_path, mode):
    """Attach on the CPU; the Trainer moves the model to the GPU, trains with fused AdamW and fp16
    (a GradScaler), saves checkpoints; extract, apply and remove work on the GPU."""
    from transformers import Trainer, TrainingArguments

    from shira_hooks.integrations import ADAPTER_FILE, STATE_FILE, ShiraCallback

    model = make_llama()
    base = snapshot(model)
    shira = shira_hooks.attach(model, 0.03, "rand", mode=mode)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        fp16=True,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[ShiraCallback(shira)])
    trainer.train()
    assert next(model.parameters()).is_cuda
    assert shira.verify() == []
    assert (tmp_path / "checkpoint-2" / STATE_FILE).exists() and (tmp_path / ADAPTER_FILE).exists()
    adapter = shira.extract()
    shira.detach()
    cpu_model = model.cpu()
    assert assert_changes_within_masks(shira, base, cpu_model) > 0
    fresh = make_llama().cuda()
    ids = llama_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        expected = cpu_model(ids).logits
        fresh_base = snapshot(fresh)
        with shira_hooks.apply(fresh, adapter):
            torch.testing.assert_close(fresh(ids.cuda()).logits.cpu(), expected, rtol=1e-4, atol=1e-4)
        for name, param in fresh.named_parameters():
            assert torch.equal(param, fresh_base[name]), name


@needs_cuda
def test_cuda_grad_scaler_with_fused_adamw_equals_the_run_without_it():
    def run(scaled, inf_at=None, skip=None):
        model = make_mlp()
        shira = shira_hooks.attach(model, 0.05, "rand", seed=0)
        model.cuda()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=1.0, fused=True
        )
        scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16) if scaled else None
        for i, (x, y) in enumerate(mlp_batches(5)):
            if i == skip:
                continue
            loss = nn.functional.cross_entropy(model(x.cuda()), y.cuda())
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                if i == inf_at:
                    model.layers[0].weight.grad[0, 0] = float("inf")
                scaler.step(optimizer)
                scaler.update()
            optimizer.zero_grad()
        assert shira.verify() == []
        shira.detach()
        return {n: p.detach().cpu() for n, p in model.named_parameters()}

    for plain, scaled in ((run(False), run(True)), (run(False, skip=2), run(True, inf_at=2))):
        for name in plain:
            torch.testing.assert_close(scaled[name], plain[name], rtol=0, atol=1e-7, msg=name)


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
def test_cuda_plain_loop_after_moving_the_model(mode):
    model = make_llama()
    shira = shira_hooks.attach(model, 0.03, "rand", mode=mode)
    model.cuda()
    base = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    _train_llama(model, device="cuda")
    assert shira.verify() == []
    state = shira.state_dict()
    assert all(entry["indices"].device.type == "cpu" for entry in state["targets"].values())
    adapter = shira.extract()
    shira.detach()
    trained = {n: p.detach().cpu() for n, p in model.named_parameters()}
    fresh = make_llama().cuda()
    with shira_hooks.apply(fresh, adapter):
        for name in adapter.deltas:
            torch.testing.assert_close(dict(fresh.named_parameters())[name].cpu(), trained[name], rtol=0, atol=1e-6)
    changed = sum(int((trained[n] != base[n]).sum()) for n in adapter.deltas)
    assert 0 < changed <= adapter.num_entries
