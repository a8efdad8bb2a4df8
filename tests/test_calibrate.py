"""Eager calibration: resource errors pass through unchanged, bad batches become a ShiraError."""

import pytest
import torch
from torch.optim.optimizer import _global_optimizer_pre_hooks

import shira_hooks
from shira_hooks import ShiraError

from conftest import make_mlp, mlp_batches, mlp_loss, snapshot


def _hook_counts(model):
    return {n: len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for n, p in model.named_parameters()}


def _state(model):
    """What attach may change: requires_grad flags, gradient hooks, train/eval modes, global optimizer hooks."""
    return (
        {n: p.requires_grad for n, p in model.named_parameters()},
        _hook_counts(model),
        [m.training for m in model.modules()],
        len(_global_optimizer_pre_hooks),
    )


_ERRORS = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError("cannot allocate 20 GiB"),
    KeyboardInterrupt(),
]
if hasattr(torch, "AcceleratorError"):  # recent torch: a device fault (e.g. an illegal memory access)
    _ERRORS.append(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))


@pytest.mark.parametrize("error", _ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("where", ["loss_fn", "forward"])
def test_resource_errors_propagate_unchanged_and_leave_the_model_untouched(error, where):
    model = make_mlp()
    model.layers[2].bias.requires_grad_(False)  # a user's own flag must come back as it was
    model.layers[1].eval()
    before, state = snapshot(model), _state(model)
    batch = mlp_batches(1)[0]

    def loss_fn(model, batch):
        loss = mlp_loss(model, batch)  # the graph exists when the error strikes
        if where == "loss_fn":
            raise error
        return loss

    def failing_forward(x):
        raise error

    if where == "forward":
        model.forward = failing_forward
    with pytest.raises(type(error)) as raised:
        shira_hooks.attach(model, 0.05, "snip", calibration=[batch], loss_fn=loss_fn, progress=False)
    assert raised.value is error  # the very object raised, not a ShiraError wrapping it
    assert not isinstance(raised.value, ShiraError)
    assert _state(model) == state
    assert all(p.grad is None for p in model.parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name])
    with shira_hooks.attach(model, 0.05, "rand") as shira:  # no handle was left on the weights
        assert len(shira.target_names) == 3


def test_a_batch_the_model_cannot_take_still_raises_shira_error():
    model = make_mlp()
    state = _state(model)

    def loss_fn(model, batch):
        return mlp_loss(model, batch["missing"])  # KeyError

    with pytest.raises(
        ShiraError,
        match=r"could not compute a loss from calibration batch 0 \(KeyError: 'missing'\)\. Fix: pass loss_fn=",
    ) as raised:
        shira_hooks.attach(
            model, 0.05, "snip", calibration=[{"x": torch.randn(2, 16)}], loss_fn=loss_fn, progress=False
        )
    assert isinstance(raised.value.__cause__, KeyError)
    with pytest.raises(ShiraError, match=r"could not compute a loss from calibration batch 1 \(TypeError"):
        shira_hooks.attach(
            model, 0.05, "grad", calibration=[mlp_batches(1)[0], ("text", None)], loss_fn=mlp_loss, progress=False
        )
    assert _state(model) == state


def test_a_loader_over_an_iterable_dataset_calibrates_like_a_list():
    """A DataLoader over an IterableDataset has ``__len__`` but raises TypeError from it (the dataset has no
    length): calibration takes it as a stream and chooses the masks the same batches in a list give."""
    batches = mlp_batches(3)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(batches)

    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    with pytest.raises(TypeError):
        len(loader)
    with shira_hooks.attach(
        make_mlp(), 0.05, "snip", calibration=batches, loss_fn=mlp_loss, progress=False
    ) as expected:
        with shira_hooks.attach(
            make_mlp(), 0.05, "snip", calibration=loader, loss_fn=mlp_loss, progress=False
        ) as streamed:
            assert list(streamed.masks) == list(expected.masks) == streamed.target_names
            for name, indices in expected.masks.items():
                assert torch.equal(streamed.masks[name], indices)
