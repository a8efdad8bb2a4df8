"""Exactness under real optimizers: only masked entries change, and weight decay acts as configured."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

import shira_hooks
from shira_hooks.train import optim

from conftest import assert_changes_within_masks, make_llama, make_mlp, mlp_batches, mlp_loss, mlp_steps, snapshot

OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "adam_l2": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=0.01),
    "sgd_momentum_l2": lambda params: torch.optim.SGD(params, lr=1e-2, momentum=0.9, weight_decay=0.01),
    "sgd_maximize": lambda params: torch.optim.SGD(params, lr=1e-2, weight_decay=0.05, maximize=True),
    "nadam_decoupled": lambda params: torch.optim.NAdam(params, lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True),
    "rmsprop_l2": lambda params: torch.optim.RMSprop(params, lr=1e-3, weight_decay=0.01, momentum=0.5),
    "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, foreach=True),
}


def _train(model, optimizer, batches, accumulate=2, clip=1.0):
    for i, batch in enumerate(batches):
        (mlp_loss(model, batch) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()


class Reference(nn.Module):
    """The same MLP with each target weight rebuilt as base + (masked entries as a k-vector parameter).

    A stock optimizer on the k-vectors (and on the biases) is what "weight decay applies to the
    masked entries and to the other trainable parameters as configured" means; nothing else moves.
    """

    def __init__(self, model, masks):
        super().__init__()
        self.model = model
        self.masks = {name: idx.long() for name, idx in masks.items()}
        self.base = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.values = nn.ParameterDict(
            {
                name.replace(".", "_"): nn.Parameter(self.base[name].reshape(-1)[idx].clone())
                for name, idx in self.masks.items()
            }
        )
        self.others = nn.ParameterDict(
            {
                name.replace(".", "_"): nn.Parameter(self.base[name].clone())
                for name in self.base
                if name not in self.masks
            }
        )

    def weights(self):
        out = {}
        for name, base in self.base.items():
            key = name.replace(".", "_")
            if name in self.masks:
                out[name] = base.reshape(-1).index_put((self.masks[name],), self.values[key]).view_as(base)
            else:
                out[name] = self.others[key]
        return out

    def forward(self, x):
        return functional_call(self.model, self.weights(), (x,))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_only_masked_entries_change_and_decay_matches_reference(name):
    model = make_mlp()
    batches = mlp_batches(8)
    shira = shira_hooks.attach(model, 0.05, "rand", freeze_others=False)  # biases train too, with decay
    reference = Reference(make_mlp(), shira.masks)
    before = snapshot(model)

    optimizer = OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad])
    _train(model, optimizer, batches)
    ref_optimizer = OPTIMIZERS[name](list(reference.parameters()))
    _train(reference, ref_optimizer, batches)

    changed = assert_changes_within_masks(shira, before, model)
    assert changed > 0.9 * shira.num_trainable  # the masked entries really trained
    assert shira.verify() == []
    expected = reference.weights()
    for pname, param in model.named_parameters():
        torch.testing.assert_close(param, expected[pname], rtol=1e-5, atol=1e-6, msg=pname)
    shira.detach()


def test_stock_optimizer_would_leak_without_the_guard():
    """The failure the guard prevents: masking gradients alone lets AdamW decay every entry."""
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand")
    before = snapshot(model)
    optim.untrack(shira)  # gradient hooks only, no step guard
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    _train(model, optimizer, mlp_batches(4))
    with pytest.raises(AssertionError, match="outside the mask"):
        assert_changes_within_masks(shira, before, model)
    assert shira.verify() == shira.target_names
    shira.detach()


def test_param_groups_are_restored_after_each_step():
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand", freeze_others=False)
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-2
    )
    groups = [(id(g), [id(p) for p in g["params"]], g["weight_decay"]) for g in optimizer.param_groups]
    _train(model, optimizer, mlp_batches(4))
    assert [(id(g), [id(p) for p in g["params"]], g["weight_decay"]) for g in optimizer.param_groups] == groups
    state = optimizer.state_dict()  # still a valid optimizer
    optimizer.load_state_dict(state)
    shira.detach()


def test_unknown_optimizer_with_decay_raises_at_first_step():
    class Lion(torch.optim.Optimizer):  # a decay rule shira_hooks does not know
        def __init__(self, params, lr=1e-3, weight_decay=0.0):
            super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(1 - group["lr"] * group["weight_decay"]).add_(p.grad.sign(), alpha=-group["lr"])

    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand")
    before = snapshot(model)
    optimizer = Lion([p for p in model.parameters() if p.requires_grad], weight_decay=0.1)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    with pytest.raises(
        shira_hooks.ShiraError, match=r"Lion has weight_decay=0.1 on target weight 'layers.0.weight'.*weight_decay=0"
    ):
        optimizer.step()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
    # without decay the same optimizer is fine: sign(0) == 0 outside the mask
    optimizer.param_groups[0]["weight_decay"] = 0.0
    optimizer.step()
    assert_changes_within_masks(shira, before, model)
    shira.detach()


def test_gradient_is_zero_outside_mask_and_inf_does_not_become_nan():
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand")
    mlp_loss(model, mlp_batches(1)[0]).backward()
    for name, param in model.named_parameters():
        if name in shira.masks:
            outside = torch.ones(param.numel(), dtype=torch.bool)
            outside[shira.masks[name].long()] = False
            assert bool((param.grad.reshape(-1)[outside] == 0).all())
            assert bool((param.grad.reshape(-1)[~outside] != 0).any())
        else:
            assert param.grad is None  # frozen
    model.zero_grad()
    weight = model.layers[0].weight
    (weight * torch.full_like(weight, float("inf"))).sum().backward()  # an overflow everywhere
    flat = weight.grad.reshape(-1)
    mask = shira.masks["layers.0.weight"].long()
    assert not bool(flat.isnan().any())
    assert bool(torch.isinf(flat[mask]).all())
    assert int((flat != 0).sum()) == mask.numel()
    shira.detach()


def test_bf16_llama_adamw_changes_only_masked_entries():
    from conftest import llama_batches

    model = make_llama(dtype=torch.bfloat16)
    shira = shira_hooks.attach(model, 0.02, "wm")
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in llama_batches(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert assert_changes_within_masks(shira, before, model) > 0
    assert shira.verify() == []
    for name, param in model.named_parameters():
        if name not in shira.masks:
            assert torch.equal(param, before[name])
    shira.detach()


def test_conv_and_embedding_weights_train_exactly():
    from conftest import make_convnet

    model = make_convnet()
    targets = [nn.Conv1d, nn.Conv2d, nn.Embedding]
    shira = shira_hooks.attach(model, 0.05, "wm", target_modules=targets, freeze_others=False)
    assert shira.target_names == ["embed.weight", "conv1d.weight", "conv2d.weight"]
    before = snapshot(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tokens, image = torch.randint(0, 20, (4, 10), generator=g), torch.randn(4, 1, 6, 6, generator=g)
        model(tokens, image).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert assert_changes_within_masks(shira, before, model) > 0
    assert not torch.equal(model.head.weight, before["head.weight"])  # a non-target trains in full
    shira.detach()


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum_l2"])
def test_step_with_closure_is_guarded(name):
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand")
    before = snapshot(model)
    optimizer = OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad])
    for batch in mlp_batches(3):

        def closure(batch=batch):  # step() calls it at once, with this batch
            optimizer.zero_grad()
            loss = mlp_loss(model, batch)
            loss.backward()
            return loss

        optimizer.step(closure)
    assert assert_changes_within_masks(shira, before, model) > 0 and shira.verify() == []
    shira.detach()


def test_asgd_is_refused_because_it_decays_every_entry():
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand")
    before = snapshot(model)
    optimizer = torch.optim.ASGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    with pytest.raises(
        shira_hooks.ShiraError, match=r"ASGD multiplies every parameter .*lambd=0.0001.*Fix: ASGD\(\.\.\., lambd=0\)"
    ):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    shira.detach()


def test_two_handles_on_one_model_share_the_guard():
    model = make_mlp()
    first = shira_hooks.attach(model, 0.05, "rand", target_modules=["layers.0"])
    second = shira_hooks.attach(model, 0.05, "wm", target_modules=["layers.1"])
    assert model.layers[0].weight.requires_grad  # the second attach did not freeze the first's target
    before = snapshot(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    groups = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    for batch in mlp_batches(3):
        mlp_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [[id(p) for p in g["params"]] for g in optimizer.param_groups] == groups
    assert assert_changes_within_masks(first, before, model) > 0
    assert assert_changes_within_masks(second, before, model) > 0
    assert first.verify() == [] and second.verify() == []
    second.detach()
    first.detach()


# ----------------------------------------------------------------------------- GradScaler + fused kernels
def _scaler_run(kind: str, scaler: bool, inf_at: int | None = None, skip: int | None = None):
    """5 batches of a fused Adam/AdamW with weight_decay=1.0; with a GradScaler, optionally an inf at step ``inf_at``."""
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam  # decoupled / L2 decay
    optimizer = optim(params, lr=1e-2, weight_decay=1.0, fused=True)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16) if scaler else None
    for i, batch in enumerate(mlp_batches(5)):
        if i == skip:
            continue
        loss = mlp_loss(model, batch)
        if grad_scaler is None:
            loss.backward()
            optimizer.step()
        else:
            grad_scaler.scale(loss).backward()
            if i == inf_at:
                model.layers[0].weight.grad[0, 0] = float("inf")  # the scaler must skip this step
            grad_scaler.step(optimizer)
            grad_scaler.update()
        optimizer.zero_grad()
    assert shira.verify() == []
    weights = snapshot(model)
    shira.detach()
    return weights


@pytest.mark.parametrize("kind", ["adamw", "adam"])
def test_grad_scaler_with_a_fused_optimizer_equals_the_run_without_it(kind):
    """torch hands fused optimizers grad_scale/found_inf as attributes: L2 decay must be scaled like the
    gradient, and a step the scaler skips must not decay anything."""
    plain, scaled = _scaler_run(kind, scaler=False), _scaler_run(kind, scaler=True)
    for name in plain:
        assert torch.equal(scaled[name], plain[name]), name
    skipped, overflowed = _scaler_run(kind, scaler=False, skip=2), _scaler_run(kind, scaler=True, inf_at=2)
    for name in skipped:
        assert torch.equal(overflowed[name], skipped[name]), name


# ------------------------------------------------------------------------ gradients written after the hook
def test_a_gradient_written_after_the_hook_is_masked_before_the_step():
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand")
    before = snapshot(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for batch in mlp_batches(2):
        mlp_loss(model, batch).backward()
        model.layers[1].weight.grad = torch.ones_like(model.layers[1].weight)  # e.g. a communication hook
        model.layers[2].weight.grad.data.fill_(0.5)  # a write that bypasses the version counter
        optimizer.step()
        optimizer.zero_grad()
    assert assert_changes_within_masks(shira, before, model) > 0
    assert shira.verify() == []
    shira.detach()


# --------------------------------------------------------------------- optimizer state from before attach
def test_optimizer_state_from_before_attach_is_refused():
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mlp_loss(model, mlp_batches(1)[0]).backward()
    optimizer.step()  # momentum buffers, dense
    optimizer.zero_grad()
    shira = shira_hooks.attach(model, 0.05, "rand")
    before = snapshot(model)
    mlp_loss(model, mlp_batches(1, seed=2)[0]).backward()
    with pytest.raises(
        shira_hooks.ShiraError,
        match=r"SGD has state 'momentum_buffer' for target weight 'layers.0.weight' that is nonzero at \d+ entries outside the mask.*Build the optimizer after attach\(\)",
    ):
        optimizer.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    optimizer.state.clear()  # the documented fix
    optimizer.step()
    assert assert_changes_within_masks(shira, before, model) > 0 and shira.verify() == []
    shira.detach()


def test_optimizer_state_from_a_masked_run_resumes():
    """A checkpoint's optimizer state (built under the hooks, zero outside the masks) is accepted."""
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand")
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mlp_steps(model, optimizer, mlp_batches(2))
    saved = optimizer.state_dict()
    before = snapshot(model)
    resumed = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    resumed.load_state_dict(saved)
    shira.check_optimizer(resumed)
    mlp_loss(model, mlp_batches(1, seed=3)[0]).backward()
    resumed.step()
    assert assert_changes_within_masks(shira, before, model) > 0 and shira.verify() == []
    shira.detach()


# --------------------------------------------------------------------------------------- maximize
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_maximize_keeps_the_sign_of_zero_weights_outside_the_mask(momentum):
    """A maximizing optimizer negates the gradient: -0.0 + (-lr * -0.0) would turn pruned -0.0 weights into +0.0."""
    model = make_mlp()
    with torch.no_grad():
        model.layers[0].weight[:, :8] = -0.0  # pruned entries
    shira = shira_hooks.attach(model, 0.05, "rand")
    before = snapshot(model)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=momentum, maximize=True
    )
    mlp_steps(model, optimizer, mlp_batches(2))
    assert assert_changes_within_masks(shira, before, model) > 0  # bit for bit: the sign of zero too
    assert shira.verify() == []
    shira.detach()
