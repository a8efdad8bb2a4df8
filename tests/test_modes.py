"""The training modes behind one protocol: a mode is one class in ``shira_hooks.train.MODES``, and what it keeps
of its own travels through the handle's state."""

import pytest
import torch

import shira_hooks
from shira_hooks import ShiraError
from shira_hooks.train import MODES
from shira_hooks.train.modes import Dense

from conftest import make_mlp, mlp_batches, mlp_steps


class Scaled(Dense):
    """A test mode: the dense mode plus one tensor of its own per target (a per-row scale, as a DoRA variant's
    magnitude would be), kept in the handle's resumable state."""

    name = "scaled"

    def __init__(self) -> None:
        self.scale: torch.Tensor | None = None

    def state(self, target):
        if self.scale is None:
            self.scale = torch.arange(target.param.shape[0], dtype=torch.float32)
        return {"scale": self.scale}

    def check_state(self, target, entry):
        scale = entry.get("mode", {}).get("scale")
        if scale is None or scale.shape != (target.param.shape[0],):
            raise ShiraError(f"state for '{target.name}' has no per-row scale")

    def load(self, target, entry):
        self.scale = entry["mode"]["scale"].clone()


def test_a_mode_is_one_class_in_the_registry(monkeypatch, tmp_path):
    monkeypatch.setitem(MODES, "scaled", Scaled)
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.1, "rand", seed=0, mode="scaled", progress=False)
    mlp_steps(model, torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2), mlp_batches(2))
    state = shira.state_dict()
    for name, entry in state["targets"].items():
        rows = dict(model.named_parameters())[name].shape[0]
        assert torch.equal(entry["mode"]["scale"], torch.arange(rows, dtype=torch.float32))
    path = shira.save_state(tmp_path / "state.safetensors")
    adapter = shira.extract()
    shira.detach()

    other = make_mlp()
    resumed = shira_hooks.attach(other, 0.1, "rand", seed=5, mode="scaled", progress=False)
    resumed.load_state(path)  # the mode's tensors come back from the file, through the mode
    assert resumed.state_dict()["targets"].keys() == state["targets"].keys()
    for name, entry in resumed.state_dict()["targets"].items():
        assert torch.equal(entry["mode"]["scale"], state["targets"][name]["mode"]["scale"])
        assert torch.equal(entry["indices"], adapter.deltas[name].indices)
    resumed.detach()


def test_a_state_without_the_mode_tensors_is_refused_before_anything_changes(monkeypatch):
    monkeypatch.setitem(MODES, "scaled", Scaled)
    dense = shira_hooks.attach(make_mlp(), 0.1, "rand", seed=0, progress=False)
    state = dense.state_dict()
    dense.detach()
    assert all(
        "mode" not in entry for entry in state["targets"].values()
    )  # the built-in modes keep nothing: states as before
    scaled = shira_hooks.attach(make_mlp(), 0.1, "rand", seed=3, mode="scaled", progress=False)
    masks = {name: indices.clone() for name, indices in scaled.masks.items()}
    with pytest.raises(ShiraError, match=r"has no per-row scale"):
        scaled.load_state_dict(state)
    assert all(torch.equal(scaled.masks[name], indices) for name, indices in masks.items())
    scaled.detach()


def test_unknown_mode_lists_the_registry(monkeypatch):
    monkeypatch.setitem(MODES, "scaled", Scaled)
    with pytest.raises(ShiraError, match=r"unknown mode='fast'; use 'dense', 'compact', 'sparse' or 'scaled'"):
        shira_hooks.attach(make_mlp(), 0.1, "rand", seed=0, mode="fast")
