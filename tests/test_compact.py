"""mode="compact" and mode="sparse": k-length parameters, sampled gradients, same training as the dense mode."""

import pytest
import torch
from torch import nn

import shira_hooks
from shira_hooks import ShiraError

from conftest import FunctionalUse, assert_changes_within_masks, llama_batches, make_convnet, make_llama, snapshot

MODES = ["compact", "sparse"]


def _train(model, steps=4, weight_decay=0.0, accumulate=2):
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=weight_decay
    )
    for i, batch in enumerate(llama_batches(steps * accumulate, seed=4)):
        (model(**batch).loss / accumulate).backward()
        if (i + 1) % accumulate == 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("mode", MODES)
def test_sampled_gradient_equals_masked_dense_gradient(mode):
    dense_model, model = make_llama(), make_llama()
    dense = shira_hooks.attach(dense_model, 0.03, "rand", seed=0)
    shira = shira_hooks.attach(model, 0.03, "rand", seed=0, mode=mode)
    batch = llama_batches(1, seed=2)[0]
    dense_model(**batch).loss.backward()
    model(**batch).loss.backward()
    modules = dict(model.named_modules())
    for name, param in dense_model.named_parameters():
        if name in dense.masks:
            values = modules[name.removesuffix(".weight")].shira_values
            expected = param.grad.reshape(-1)[dense.masks[name].long()]
            torch.testing.assert_close(values.grad, expected, rtol=1e-4, atol=1e-6)
            assert dict(model.named_parameters())[name].grad is None  # no dense dL/dW at all
    dense.detach()
    shira.detach()


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("mode", MODES)
def test_training_equals_the_dense_mode(mode, weight_decay):
    dense_model, model = make_llama(), make_llama()
    base = snapshot(model)
    dense = shira_hooks.attach(dense_model, 0.03, "wm")
    shira = shira_hooks.attach(model, 0.03, "wm", mode=mode)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 14 and all(n.endswith("shira_values") for n in names)
    _train(dense_model, weight_decay=weight_decay)
    optimizer = _train(model, weight_decay=weight_decay)
    assert {s["exp_avg"].numel() for s in optimizer.state.values()} <= {m.numel() for m in shira.masks.values()}
    assert sum(s["exp_avg"].numel() for s in optimizer.state.values()) == shira.num_trainable  # state for k entries
    reference = dict(dense_model.named_parameters())
    for name, param in model.named_parameters():
        if name in reference:
            torch.testing.assert_close(param, reference[name], rtol=1e-5, atol=1e-6, msg=name)
    assert assert_changes_within_masks(shira, base, model) > 0 and shira.verify() == []
    adapter = shira.extract()
    shira.detach()
    dense.detach()
    assert not any("shira_values" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters())  # flags restored
    fresh = make_llama()
    with shira_hooks.apply(fresh, adapter):
        for name, param in fresh.named_parameters():
            torch.testing.assert_close(param, dict(model.named_parameters())[name], rtol=0, atol=1e-6)


def test_modes_reject_what_they_cannot_do():
    with pytest.raises(ShiraError, match=r"mode='sparse' supports nn.Linear targets only; 'conv1d' is a Conv1d"):
        shira_hooks.attach(make_convnet(), 0.05, "rand", target_modules=[nn.Conv1d], mode="sparse")
    with pytest.raises(ShiraError, match=r"mode='compact' needs the masks at attach time.*pass calibration=batches"):
        shira_hooks.attach(make_llama(), 0.05, "snip", mode="compact")
    with pytest.raises(ShiraError, match=r"unknown mode='fast'"):
        shira_hooks.attach(make_llama(), 0.05, "rand", mode="fast")


def test_snip_calibrated_sparse_mode_and_state_round_trip(tmp_path):
    model = make_llama()
    shira = shira_hooks.attach(model, 0.03, "snip", calibration=llama_batches(2), progress=False, mode="sparse")
    _train(model, steps=2)
    path = shira.save_state(tmp_path / "state.safetensors")
    masks, trained = shira.masks, snapshot(model)
    shira.detach()
    resumed = make_llama()
    resumed.load_state_dict({n: v for n, v in trained.items() if "shira_values" not in n})
    again = shira_hooks.attach(resumed, 0.03, "rand", mode="sparse")  # other masks until the state is loaded
    again.load_state(path)
    assert all(torch.equal(again.masks[n], i) for n, i in masks.items())
    values = dict(resumed.named_parameters())
    for name, idx in masks.items():
        key = name.removesuffix("weight") + "shira_values"
        assert torch.equal(values[key].detach(), trained[name].reshape(-1)[idx.long()])
    assert again.verify() == []
    again.detach()


def test_shared_weights_are_refused_and_keyword_inputs_work():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    model[2].weight = model[0].weight  # one weight, two layers
    with pytest.raises(ShiraError, match=r"weight '0.weight' is shared by 2 modules; mode='sparse'"):
        shira_hooks.attach(model, 0.2, "rand", mode="sparse")
    layer = nn.Linear(8, 4)
    with shira_hooks.attach(layer, 0.25, "rand", mode="sparse") as shira:
        layer(input=torch.randn(3, 8)).sum().backward()  # called with a keyword argument
        assert layer.shira_values.grad is not None and layer.shira_values.grad.numel() == shira.num_trainable


class _TwoReaders(nn.Module):
    """Layers a and b both read the output h of another layer, like q/k/v; how b gets it is ``change``."""

    def __init__(self, change: str):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(16, 12)
        self.change = change  # "none": b reads h itself; "copy": b reads 2 * h; "inplace": h.mul_(2) after a read it

    def forward(self, x):
        h = self.first(x) + 1.0  # not a view (a Linear's 3-D output is one), and its producer keeps nothing
        y = self.a(h)
        if self.change == "inplace":
            h.mul_(2.0)
        elif self.change == "copy":
            h = h * 2.0
        return (y * self.b(h)).sum()


def _sparse_run(change: str):
    """Forward and backward of ``_TwoReaders`` in mode="sparse": the storages of the saved (in, T) inputs, the two gradients."""
    model = _TwoReaders(change)
    handle = shira_hooks.attach(
        model, 0.25, "rand", seed=0, target_modules=["a", "b"], mode="sparse", freeze_others=True
    )
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = model(torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1)))
    loss.backward()
    storages = [t.untyped_storage().data_ptr() for t in saved if t.shape == (16, 15)]  # h^T: in=16, T=3*5
    grads = [model.a.shira_values.grad.clone(), model.b.shira_values.grad.clone()]
    handle.detach()
    return storages, grads


def test_sparse_mode_saves_one_transposed_input_for_layers_that_share_it():
    storages, _ = _sparse_run("none")
    assert len(storages) == 2 and len(set(storages)) == 1  # a and b save the same h^T
    storages, _ = _sparse_run("copy")
    assert len(storages) == 2 and len(set(storages)) == 2


@pytest.mark.parametrize("make", [lambda h: h.view(3, 5, 16), torch.tanh], ids=["view", "tanh"])
def test_sparse_mode_saves_an_input_the_backward_keeps_anyway_as_it_is(make):
    """Inputs whose storage the backward keeps (a view, a tanh result) are not copied a second time."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 12))
    handle = shira_hooks.attach(model, 0.25, "rand", target_modules=["1"], mode="sparse", freeze_others=True)
    model[0].register_forward_hook(lambda mod, args, out: make(out.reshape(15, 16)))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(torch.randn(3, 5, 8, requires_grad=True)).sum().backward()  # so that tanh keeps its result
    assert not [t for t in saved if t.shape == (16, 15)]  # no transposed copy
    assert model[1].shira_values.grad.abs().sum() > 0
    handle.detach()


def test_sparse_mode_gradient_uses_the_input_as_it_was_in_the_forward():
    """h changed in place after a read it: b gets a fresh transpose, and a's gradient uses the old h."""
    storages, changed_in_place = _sparse_run("inplace")
    assert len(set(storages)) == 2
    _, same_math = _sparse_run("copy")
    for got, expected in zip(changed_in_place, same_math):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_gradients_are_the_same_under_gradient_checkpointing(mode, reentrant):
    """Checkpointing reruns the forward hooks in the backward; the k-entry gradients must not change."""
    grads = []
    for checkpointing in (False, True):
        model = make_llama()
        handle = shira_hooks.attach(model, 0.03, "rand", seed=0, mode=mode)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        model(**llama_batches(1, seed=2)[0]).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        handle.detach()
    assert list(grads[0]) == list(grads[1]) and len(grads[0]) == 14
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


# --------------------------------------------------------------------- layers used in unusual ways
def _inplace_relu_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4), nn.ReLU(inplace=True))


@pytest.mark.parametrize("shape", [(5, 8), (2, 5, 8)], ids=["2-D input", "3-D input: F.linear returns a view"])
@pytest.mark.parametrize("mode", MODES)
def test_an_in_place_op_after_a_target_trains_as_in_the_dense_mode(mode, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    dense_model, model = _inplace_relu_model(), _inplace_relu_model()
    dense = shira_hooks.attach(dense_model, 0.25, "rand", seed=0, target_modules=[nn.Linear])
    shira = shira_hooks.attach(model, 0.25, "rand", seed=0, target_modules=[nn.Linear], mode=mode)
    dense_model(x).pow(2).sum().backward()
    model(x).pow(2).sum().backward()
    for index in (0, 2):
        name = f"{index}.weight"
        expected = dense_model[index].weight.grad.reshape(-1)[dense.masks[name].long()]
        torch.testing.assert_close(model[index].shira_values.grad, expected, rtol=1e-5, atol=1e-6)
    shira.detach()
    dense.detach()


@pytest.mark.parametrize("mode", MODES)
def test_a_weight_read_without_calling_its_module_is_refused(mode):
    """nn.MultiheadAttention reads out_proj.weight directly: refused at attach. Any other functional
    use is found in the model's first forward pass with gradients, before anything trains."""
    attention = nn.MultiheadAttention(16, 2)
    with pytest.raises(
        ShiraError, match=rf"'out_proj' is the out_proj of an nn.MultiheadAttention.*mode='{mode}'.*Use mode='dense'"
    ):
        shira_hooks.attach(attention, 0.1, "rand", target_modules=[nn.Linear], mode=mode)
    assert all(p.requires_grad for p in attention.parameters()) and not hasattr(attention.out_proj, "shira_values")

    model = FunctionalUse()
    before = snapshot(model)
    shira = shira_hooks.attach(model, 0.25, "rand", mode=mode)
    with torch.no_grad():
        model(torch.randn(3, 8))  # inference is not checked, and not refused
    with pytest.raises(
        ShiraError, match=rf"the weight of 'proj' is read without calling its module.*mode='{mode}'.*Use mode='dense'"
    ):
        model(torch.randn(3, 8))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    shira.detach()
    with shira_hooks.attach(model, 0.25, "rand", mode="dense") as dense:  # the dense mode trains it
        model(torch.randn(3, 8)).sum().backward()
        assert model.proj.weight.grad is not None and dense.verify() == []


@pytest.mark.parametrize("mode", MODES)
def test_a_target_without_gradient_is_named_at_the_first_step(mode):
    model = FunctionalUse()
    model.forward = lambda x: model.proj(torch.relu(x))  # model.first is never called
    shira = shira_hooks.attach(model, 0.25, "rand", mode=mode)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(3, 8)).sum().backward()  # the first forward: nothing is read from outside its layer
    with pytest.warns(UserWarning, match=r"1 of 2 target weights received no gradient.*'first.weight'.*mode='dense'"):
        optimizer.step()
    shira.detach()


def test_dense_mode_trains_a_multihead_attention_out_proj():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 2)
    shira = shira_hooks.attach(attention, 0.1, "rand", target_modules=["out_proj"])
    before = snapshot(attention)
    optimizer = torch.optim.AdamW([p for p in attention.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randn(5, 2, 16)
    attention(x, x, x)[0].pow(2).mean().backward()
    optimizer.step()
    assert assert_changes_within_masks(shira, before, attention) == shira.num_trainable and shira.verify() == []
    shira.detach()


def test_optimizer_built_before_attach_is_refused_in_compact_mode():
    model = make_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # holds the weights, not the shira_values
    shira = shira_hooks.attach(model, 0.03, "rand", mode="sparse")
    model(**llama_batches(1)[0]).loss.backward()
    with pytest.raises(
        ShiraError,
        match=r"AdamW holds target weight '.*' but not its 'shira_values'.*Build the optimizer after attach\(\)",
    ):
        optimizer.step()
    shira.detach()


def test_a_step_that_leaves_the_values_writes_nothing():
    """The Trainer resuming under FSDP2 loads another mask's values, then torch.distributed.checkpoint steps at
    lr 0 before ShiraCallback loads that mask: the weights must not take the values at the handle's mask."""
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, mode="sparse")
    values = [m.shira_values for m in model.modules() if "shira_values" in m._parameters]
    optimizer = torch.optim.AdamW(values, lr=0.0, weight_decay=0.1)
    before = snapshot(model)
    with torch.no_grad():
        for v in values:
            v.copy_(torch.randn_like(v))  # values loaded for other masks
            v.grad = torch.zeros_like(v)
    optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if not n.endswith("shira_values"))
    optimizer.param_groups[0]["lr"] = 1e-2  # a real step writes what it changed
    for v in values:
        v.grad = torch.ones_like(v)
    optimizer.step()
    assert shira.verify() == [] and all(
        torch.equal(m.weight.view(-1)[shira.masks[f"{n}.weight"].long()], m.shira_values.detach())
        for n, m in model.named_modules()
        if "shira_values" in m._parameters
    )
    shira.detach()
