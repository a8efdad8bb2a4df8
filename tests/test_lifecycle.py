"""The model's whole life around one attach: copies and pickles, replaced parameters, other optimizers, PEFT."""

import copy
import io
import pickle
import sys
import warnings

import pytest
import torch
from torch import nn

import shira_hooks
import shira_hooks._testing
from shira_hooks import ShiraError

from conftest import FunctionalUse, assert_changes_within_masks, llama_batches, make_llama, snapshot

MODES = ["dense", "compact", "sparse"]
Q = "model.layers.0.self_attn.q_proj.weight"


def _train(model, steps, seed):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in llama_batches(steps, seed=seed):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def _copy(model, how):
    if how == "deepcopy":
        return copy.deepcopy(model)
    if how == "pickle":
        return pickle.loads(pickle.dumps(model))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _is_plain(model, flags):
    """No shira_hooks hook, parameter or flag left: what the model was before attach."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    grad_hooks = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())
    return hooks == 0 and grad_hooks == 0 and {n: p.requires_grad for n, p in model.named_parameters()} == flags


# ------------------------------------------------------------------------------ copies and pickles
@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "pickle"])
@pytest.mark.parametrize("mode", MODES)
def test_a_copy_is_an_independent_working_shira_model(mode, how):
    model, twin = make_llama(), make_llama()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, mode=mode)
    twin_shira = shira_hooks.attach(twin, 0.05, "rand", seed=0, mode=mode)
    _train(model, 1, seed=3)
    _train(twin, 1, seed=3)

    copied = _copy(model, how)
    (copy_shira,) = shira_hooks.handles(copied)
    assert copy_shira is not shira and shira_hooks.handles(model) == [shira]
    assert all(torch.equal(copy_shira.masks[n], i) for n, i in shira.masks.items())
    ours, theirs = shira.extract(), copy_shira.extract()  # the same trained state, measured from the same base
    assert all(torch.equal(ours.deltas[n].values, theirs.deltas[n].values) for n in ours.deltas)

    original = snapshot(model)
    copy_base = snapshot(copied)
    _train(copied, 2, seed=5)  # the copy trains with an optimizer of its own
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())  # nothing of the original moved
    assert assert_changes_within_masks(copy_shira, copy_base, copied) > 0 and copy_shira.verify() == []

    # the original keeps working after the copy ran, bit for bit as a twin that was never copied
    _train(model, 2, seed=7)
    _train(twin, 2, seed=7)
    twin_params = dict(twin.named_parameters())
    assert all(torch.equal(p, twin_params[n]) for n, p in model.named_parameters())
    assert shira.verify() == [] and twin_shira.verify() == []

    shira.detach()  # the copy's handle is its own: still attached
    assert copy_shira.attached and shira_hooks.handles(copied) == [copy_shira]
    copy_shira.detach()
    assert _is_plain(copied, flags) and _is_plain(model, flags)
    with shira_hooks.attach(copied, 0.05, "rand", seed=1, mode=mode):  # a copy attaches like any model
        pass
    twin_shira.detach()


@pytest.mark.parametrize("mode", ["compact", "sparse"])
def test_a_copy_taken_at_attach_checks_its_own_first_forward(mode):
    """The copy's first forward used to run the original's check, on the original's weights, and remove it."""
    model = FunctionalUse()
    shira = shira_hooks.attach(model, 0.25, "rand", seed=0, mode=mode)
    copied = copy.deepcopy(model)
    with pytest.raises(ShiraError, match=r"the weight of 'proj' is read without calling its module"):
        copied(torch.randn(3, 8))
    with pytest.raises(ShiraError, match=r"the weight of 'proj' is read without calling its module"):
        model(torch.randn(3, 8))  # the original's own check is still in place
    llama = make_llama()
    with shira_hooks.attach(llama, 0.05, "rand", seed=0, mode=mode):
        fresh_copy = copy.deepcopy(llama)
        fresh_copy(**llama_batches(1)[0]).loss.backward()  # a plain Llama reads no weight functionally
    shira_hooks.handles(fresh_copy)[0].detach()
    shira_hooks.handles(copied)[0].detach()
    shira.detach()


def test_a_dropped_copy_is_freed_with_its_handle():
    import gc
    import weakref

    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, mode="sparse")
    copies = [copy.deepcopy(model), _copy(model, "pickle")]
    copies[0](**llama_batches(1)[0]).loss.backward()
    alive = [weakref.ref(c) for c in copies] + [weakref.ref(shira_hooks.handles(c)[0]) for c in copies]
    del copies
    gc.collect()
    assert all(ref() is None for ref in alive) and shira_hooks._testing.attached_handles() == [shira]
    shira.detach()


def test_a_copy_of_the_handle_or_of_a_part_is_refused():
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, mode="sparse")
    for part in (shira, model.model.layers[0]):
        with pytest.raises(
            ShiraError, match=r"copy.deepcopy reached a shira_hooks handle .* without copying the model"
        ):
            copy.deepcopy(part)
    assert [h is shira for h in shira_hooks.handles(model)] == [True]
    shira.detach()


def test_ema_and_reference_model_copies():
    """torch's AveragedModel zips parameters() of the original and the copy; TRL's reference model is a frozen copy."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    pytest.importorskip("trl")
    with warnings.catch_warnings():  # "importing from trl.experimental"
        warnings.simplefilter("ignore")
        from trl.experimental.utils import create_reference_model
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, mode="sparse")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
    reference = create_reference_model(model)
    ids = llama_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    _train(model, 2, seed=3)
    ema.update_parameters(model)  # the first update copies
    first = snapshot(ema.module)
    _train(model, 1, seed=4)
    ema.update_parameters(model)  # then p_ema = p_ema + 0.5 (p - p_ema)
    current = dict(model.named_parameters())
    for name, param in ema.module.named_parameters():
        torch.testing.assert_close(param, first[name].lerp(current[name].detach(), 0.5), msg=name)
    (ema_shira,) = shira_hooks.handles(ema.module)
    with torch.no_grad():
        ema(ids)  # the copy's forward writes the copy's values into the copy's weights
    assert ema_shira.verify() == []
    for name, module in ema.module.named_modules():
        if "shira_values" in module._parameters:
            assert torch.equal(
                module.weight.view(-1)[ema_shira.masks[f"{name}.weight"].long()], module.shira_values.detach()
            )
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, before)  # frozen at the copy, while the original trained
    assert not any(p.requires_grad for p in reference.parameters())
    for handle in shira_hooks.handles(reference) + [ema_shira, shira]:
        handle.detach()


# ------------------------------------------------------------------------------ replaced parameters
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_a_replaced_target_is_refused_by_every_verb(mode, tmp_path):
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, mode=mode)
    optimizer = _train(model, 1, seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state[Q] += 1.0  # every entry of one target changed
    model.load_state_dict(state, assign=True)
    verbs = {
        "verify": shira.verify,
        "extract an adapter": shira.extract,
        "save the handle's state": shira.state_dict,
        "summarise the handle": shira.summary,
        "check the optimizer": lambda: shira.check_optimizer(optimizer),
        "load a handle state": lambda: shira.load_state_dict({}),
    }
    for verb, call in verbs.items():
        with pytest.raises(
            ShiraError,
            match=rf"cannot {verb}: target weight '{Q}' is no longer the parameter shira_hooks attached to.*entries outside the mask differ from the base.*load_state_dict without assign=True",
        ):
            call()
    with pytest.raises(ShiraError, match=rf"cannot save the handle's state: target weight '{Q}'"):
        shira.save_state(tmp_path / "state.safetensors")
    assert not (tmp_path / "state.safetensors").exists()
    model.to("meta")
    with pytest.raises(
        ShiraError,
        match=rf"cannot verify: target weight '{Q}' is no longer the parameter.*a meta tensor has no values to train",
    ):
        shira.verify()
    shira.detach()  # the way out still works
    assert all(p.requires_grad for p in model.parameters())  # restored on the parameters now in the model
    assert not any("shira_values" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("mode", MODES)
def test_a_replacement_holding_the_same_weight_is_followed(mode):
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, mode=mode)
    old_optimizer = _train(model, 2, seed=3)
    adapter = shira.extract()
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)  # every parameter is new
    assert shira.verify() == []  # follows the new parameters: they hold the base outside the masks
    followed = shira.extract()
    assert all(torch.equal(followed.deltas[n].values, adapter.deltas[n].values) for n in adapter.deltas)
    model(**llama_batches(1, seed=4)[0]).loss.backward()
    held = "weight" if mode == "dense" else "shira_values"  # what the optimizer trains: the weight or the values
    with pytest.raises(
        ShiraError,
        match=rf"AdamW holds the parameter '.*\.{held}' had before it was replaced .* trained for '.*weight'",
    ):
        old_optimizer.step()  # it holds objects no longer in the model: it would train nothing
    old_optimizer.zero_grad()
    model.zero_grad()
    loaded = snapshot(model)
    _train(model, 2, seed=5)  # an optimizer built after the load trains the new parameters, exactly
    assert assert_changes_within_masks(shira, loaded, model) > 0 and shira.verify() == []
    shira.detach()
    assert all(p.requires_grad for p in model.parameters()) and not any(
        "shira_values" in n for n, _ in model.named_parameters()
    )


# ------------------------------------------------------------------------------ other optimizers
def _shira_functions_run_by(call):
    seen = set()

    def profile(frame, event, arg):
        if event == "call" and "shira_hooks" in frame.f_code.co_filename:
            seen.add(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_code.co_name}")

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return seen


def test_a_stale_handle_leaves_other_optimizers_alone():
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0)
    model.model.layers[0].self_attn.q_proj.weight = nn.Parameter(torch.randn(32, 32))  # the handle is stale now
    other = nn.Linear(4, 4)
    unrelated = torch.optim.SGD(other.parameters(), lr=0.1)
    for step in range(2):
        other(torch.randn(2, 4)).sum().backward()
        before = other.weight.detach().clone()
        run = _shira_functions_run_by(unrelated.step)
        assert not torch.equal(other.weight, before)  # the step ran, and nothing raised
        named = {f for f in run if not f.split(":")[1].startswith("<")}  # comprehensions aside
        if step == 0:  # the optimizer's first step: is it one over an attached model? (one pass over its ids)
            assert named <= {
                "optim.py:_before_step",
                "optim.py:related",
                "optim.py:_guards",
                "optim.py:bound",
                "steps.py:holds_any",
                "dense.py:held_by",
                "target.py:held",  # tensors retired by an earlier detach()?
                "optim.py:_after_step",
            }, run
        else:  # then the cached verdict, and nothing else
            assert named == {"optim.py:_before_step", "optim.py:related", "optim.py:_after_step"}, run
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # an optimizer over the stale model is still refused
    with pytest.raises(ShiraError, match=rf"target weight '{Q}' is no longer the parameter shira_hooks attached to"):
        model(**llama_batches(1)[0]).loss.backward()
        optimizer.step()
    shira.detach()


@pytest.mark.parametrize("mode,dora", [("compact", False), ("sparse", False), ("sparse", True)])
def test_an_optimizer_built_before_detach_is_refused_after_a_new_attach(mode, dora):
    """detach() unregisters the trained tensors of the compact modes; a new attach() registers new ones. An
    optimizer built before still holds the old ones, so its steps would train nothing: the new handle refuses
    them before anything moves. One holding the new ones too (add_param_group) trains them. Copies of the
    model carry nothing retired."""
    from shira_hooks.train.target import RETIRED

    model = make_llama()
    first = shira_hooks.attach(model, 0.05, "rand", seed=0, mode=mode, dora=dora)
    optimizer = _train(model, 1, seed=1)
    old = {id(p) for group in optimizer.param_groups for p in group["params"]}
    first.detach()
    second = shira_hooks.attach(model, 0.05, "rand", seed=1, mode=mode, dora=dora)
    before = snapshot(model)
    model(**llama_batches(1, seed=2)[0]).loss.backward()
    with pytest.raises(ShiraError) as refused:
        optimizer.step()
    message = str(refused.value)
    held = message.split("'")[1]
    assert message.startswith(
        f"AdamW holds '{held}', which an earlier handle trained and detach() removed from the model"
    )
    assert held.startswith(Q.rpartition(".")[0]) and message.endswith("Build the optimizer after attach()")
    assert f"trains '{Q}' through " in message and not any(id(p) in old for p in model.parameters() if p.requires_grad)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # nothing moved
    optimizer.add_param_group({"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-2})
    optimizer.step()
    assert not torch.equal(before[Q], model.get_parameter(Q))
    assert_changes_within_masks(second, before, model)
    for how in ("deepcopy", "pickle", "torch.save"):
        copied = _copy(model, how)
        assert not getattr(copied.model.layers[0].self_attn.q_proj, RETIRED).refs
        for handle in shira_hooks.handles(copied):
            handle.detach()
    second.detach()


# ------------------------------------------------------------------------------ flags and PEFT
def test_detach_restores_only_the_flags_it_set():
    model = make_llama()
    model.lm_head.requires_grad_(False)  # a user's choice before attach
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0)
    model.lm_head.requires_grad_(True)  # ... and after: other code's flags are left as they are
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    shira.detach()
    assert model.lm_head.weight.requires_grad and not model.model.layers[0].self_attn.q_proj.weight.requires_grad
    others = [p for n, p in model.named_parameters() if n not in ("lm_head.weight", Q)]
    assert all(p.requires_grad for p in others)  # the ones it set, and that still hold its value, are restored


@pytest.mark.parametrize("mode", MODES)
def test_peft_on_top_of_an_attached_model_is_reported_and_keeps_its_flags(mode):
    peft = pytest.importorskip("peft")
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, mode=mode)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters() if "shira_values" not in n}
    assert {n for n, trains in flags.items() if trains} == {n for n in flags if "lora_" in n}  # PEFT froze the targets
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model(**llama_batches(1)[0]).loss.backward()
    with pytest.warns(
        UserWarning,
        match=r"14 of 14 target weights cannot train: .*requires_grad=False, set after attach\(\) by other code \(peft.get_peft_model.*No SHiRA entry trains",
    ):
        optimizer.step()
    shira.detach()
    assert {
        n: p.requires_grad for n, p in peft_model.named_parameters()
    } == flags  # PEFT's flags, not the pre-attach ones


def test_targets_the_loss_never_reaches_are_reported():
    model = make_llama()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0, freeze_others=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.model.embed_tokens(llama_batches(1)[0]["input_ids"]).pow(2).mean().backward()  # no target takes part
    with pytest.warns(
        UserWarning,
        match=r"none of the 14 target weights of the handle attached to LlamaForCausalLM has received a gradient, while other parameters of SGD have",
    ):
        optimizer.step()
    shira.detach()


@pytest.mark.parametrize("mode", MODES)
def test_attach_refuses_a_peft_model(mode):
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    for model in (peft_model, peft_model.base_model.model):
        with pytest.raises(
            ShiraError,
            match=rf"attach\(\) got a PEFT model \({type(model).__name__}, whose '.*q_proj' is a PEFT Linear\).*merge_and_unload\(\)",
        ):
            shira_hooks.attach(model, 0.05, "rand", seed=0, mode=mode)
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags
    assert not shira_hooks.handles(peft_model)
