"""The handle: symmetric attach/detach, bad input, calibration hygiene, and resumable state."""

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

import shira_hooks
from shira_hooks import ShiraError
from conftest import llama_batches, make_llama, make_mlp, mlp_batches, mlp_loss, snapshot


def _hook_counts(model):
    return {n: len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for n, p in model.named_parameters()}


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_detach_restores_everything():
    model = make_mlp()
    model.layers[2].bias.requires_grad_(False)  # a user's own choice must survive
    flags, hooks = _flags(model), _hook_counts(model)
    optimizer_hooks = (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks))
    params = {n: p for n, p in model.named_parameters()}
    shira = shira_hooks.attach(model, 0.05, "rand")
    assert _flags(model) == {n: n.endswith("weight") for n in flags}
    assert sum(_hook_counts(model).values()) == 3
    assert len(_global_optimizer_pre_hooks) == optimizer_hooks[0] + 1
    shira.detach()
    shira.detach()  # idempotent
    assert _flags(model) == flags and _hook_counts(model) == hooks
    assert (len(_global_optimizer_pre_hooks), len(_global_optimizer_post_hooks)) == optimizer_hooks
    assert all(p is params[n] for n, p in model.named_parameters())  # same parameter objects
    assert shira.extract().num_entries == shira.num_trainable  # still extractable after detach
    mlp_loss(model, mlp_batches(1)[0]).backward()  # an ordinary model again: dense gradients
    assert int((model.layers[0].weight.grad != 0).sum()) > 0.5 * model.layers[0].weight.numel()
    # and a second attach on the same model works
    with shira_hooks.attach(model, 0.05, "wm") as again:
        assert again.attached
    assert not again.attached and _flags(model) == flags


def test_freeze_others_false_keeps_flags():
    model = make_mlp()
    with shira_hooks.attach(model, 0.05, "rand", freeze_others=False):
        assert all(_flags(model).values())


def test_summary_names_every_target():
    model = make_mlp()
    with shira_hooks.attach(model, 0.05, "rand") as shira:
        text = shira.summary()
    assert "mask='rand'" in text and "calibrated" in text
    for name in ("layers.0.weight", "layers.1.weight", "layers.2.weight"):
        assert name in text
    assert f"{shira.num_trainable:,}" in text.splitlines()[-1]


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(sparsity=0), r"sparsity=0 is outside \(0, 1\]"),
        (dict(sparsity=1.5), r"sparsity=1.5 is outside \(0, 1\]"),
        (dict(sparsity="1%"), r"sparsity='1%' is outside \(0, 1\]"),
        (dict(mask="magnitude"), r"unknown mask='magnitude'; use one of struct, rand, wm, grad, snip"),
        (dict(mask="wm", calibration=[1]), r"calibration= is only used by mask='grad' or 'snip', not mask='wm'"),
        (dict(target_modules=["attention"]), r"target_modules=\['attention'\] matched no module with a weight; modules with weights include: layers.0, layers.1, layers.2"),
        (dict(target_modules=[3]), r"target_modules contains 3 \(int\)"),
        (dict(mask="snip", calibration=[torch.randn(2, 16)], loss_fn=lambda m, b: m(b)), r"the loss of calibration batch 0 is a tensor of shape \(2, 6\); it must be a floating-point scalar"),
        (dict(mask="grad", calibration=[[1, 2]]), r"calibration batch 0 is a list; without loss_fn a batch must be a dict"),
        (dict(mask="grad", calibration=[{"inputs": torch.randn(2, 16)}]), r"could not compute a loss from calibration batch 0 \(TypeError"),
        (dict(mask="grad", calibration=[{"x": torch.randn(2, 16)}]), r"model\(\*\*batch\) returned no loss for calibration batch 0"),
        (dict(mask="grad", calibration=[]), r"calibration= yielded no batches"),
        (dict(mask="grad", calibration=[torch.randn(2, 16)], loss_fn=lambda m, b: torch.tensor(1.0)), r"does not depend on any target weight"),
        (dict(mask=lambda name, w: [10**6]), r"mask function for 'layers.0.weight' \(shape \(48, 16\)\) returned indices in \[1000000, 1000000\]"),
        (dict(calibration_steps=0), r"calibration_steps=0; it must be a positive int"),
    ],
)
def test_bad_input_raises_and_changes_nothing(kwargs, pattern):
    model = make_mlp()
    before, flags, hooks = snapshot(model), _flags(model), _hook_counts(model)
    optimizer_hooks = len(_global_optimizer_pre_hooks)
    args = dict(sparsity=0.05, mask="rand")
    args.update(kwargs)
    with pytest.raises(ShiraError, match=pattern):
        shira_hooks.attach(model, args.pop("sparsity"), args.pop("mask"), progress=False, **args)
    assert _flags(model) == flags and _hook_counts(model) == hooks
    assert len(_global_optimizer_pre_hooks) == optimizer_hooks
    assert all(p.grad is None for p in model.parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])


def test_attaching_twice_to_a_weight_raises():
    model = make_mlp()
    with shira_hooks.attach(model, 0.05, "rand", target_modules=["layers.1"]):
        flags = _flags(model)
        with pytest.raises(ShiraError, match=r"weight 'layers.1.weight' \(module 'layers.1'\) already has a shira_hooks handle attached; call detach\(\)"):
            shira_hooks.attach(model, 0.05, "wm")
        assert _flags(model) == flags
        with shira_hooks.attach(model, 0.05, "wm", target_modules=["layers.0"], freeze_others=False) as other:
            assert other.target_names == ["layers.0.weight"]


def test_eager_calibration_leaves_the_model_as_found():
    model = make_llama()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    with shira_hooks.attach(model, 0.02, "snip", calibration=llama_batches(2), progress=False, freeze_others=False) as shira:
        assert shira.calibrated
        assert {n: m.training for n, m in model.named_modules()} == modes
        assert all(p.grad is None for p in model.parameters())
        assert all(p.requires_grad for p in model.parameters())


def test_lazy_calibration_under_a_real_training_loop():
    model = make_llama()
    before = snapshot(model)
    shira = shira_hooks.attach(model, 0.02, "snip")  # the literal one-liner, before any trainer
    assert not shira.calibrated and "calibrating: 0/14 masks fixed" in shira.summary()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    batches = llama_batches(shira.calibration_steps + 3)
    for step, batch in enumerate(batches):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step < shira.calibration_steps - 1:
            assert not shira.calibrated and len(optimizer.state) == 0
            assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert shira.calibrated
    assert shira.verify() == []
    assert len(optimizer.state) == len(shira.masks)
    # the lazy masks equal eager masks scored on the same batches
    eager_model = make_llama()
    eager = shira_hooks.attach(eager_model, 0.02, "snip", calibration=batches[: shira.calibration_steps], progress=False)
    for name, indices in shira.masks.items():
        assert torch.equal(indices, eager.masks[name]), name
    eager.detach()
    shira.detach()


def test_state_dict_resumes_identical_masks(tmp_path):
    model = make_llama()
    shira = shira_hooks.attach(model, 0.02, "grad", calibration=llama_batches(2), progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in llama_batches(2, seed=5):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = shira.state_dict()
    path = shira.save_state(tmp_path / "state.safetensors")
    adapter = shira.extract()
    trained = snapshot(model)
    shira.detach()

    # resume: the trained weights, a fresh attach (different calibration data, so different masks)
    for loader in (lambda h: h.load_state_dict(state), lambda h: h.load_state(path)):
        resumed = make_llama()
        resumed.load_state_dict(trained)
        fresh = shira_hooks.attach(resumed, 0.02, "grad", calibration=llama_batches(2, seed=7), progress=False)
        assert any(not torch.equal(fresh.masks[n], i) for n, i in shira.masks.items())
        loader(fresh)
        for name, indices in shira.masks.items():
            assert torch.equal(fresh.masks[name], indices)
        resumed_adapter = fresh.extract()  # deltas still measured from the original base
        for name, delta in adapter.deltas.items():
            assert torch.equal(resumed_adapter.deltas[name].values, delta.values)
        assert fresh.verify() == []
        fresh.detach()


def test_load_state_rejects_other_models():
    model = make_llama()
    with shira_hooks.attach(model, 0.02, "rand") as shira:
        state = shira.state_dict()
    mlp = make_mlp()
    with shira_hooks.attach(mlp, 0.02, "rand") as other:
        masks = {n: i.clone() for n, i in other.masks.items()}
        with pytest.raises(ShiraError, match=r"the state is for other target weights: missing \['layers.0.weight'"):
            other.load_state_dict(state)
        assert all(torch.equal(other.masks[n], i) for n, i in masks.items())
        with pytest.raises(ShiraError, match=r"not a shira_hooks handle state"):
            other.load_state_dict({"targets": {}})
