"""`python -m shira_hooks`, the README's main job, runs end to end and checks itself."""

import subprocess
import sys

import pytest

import shira_hooks
from shira_hooks.__main__ import main

from conftest import make_mlp


def test_demo_runs_and_reproduces(tmp_path, capsys):
    assert main(["--steps", "40", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "entries changed outside the masks: none" in out
    assert (tmp_path / "adapter.safetensors").stat().st_size > 0


@pytest.mark.parametrize("mask", ["struct", "rand", "wm", "grad"])  # snip, the default, runs above
def test_demo_runs_with_every_listed_mask(tmp_path, capsys, mask):
    """--mask rand, struct and wm used to end in "calibration= is only used by mask='grad' or 'snip'"."""
    assert main(["--mask", mask, "--steps", "20", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "entries changed outside the masks: none" in out and "removed again, the base is bit-exact" in out


def test_package_import_does_not_import_transformers():
    code = "import sys, shira_hooks; print('transformers' in sys.modules, sorted(shira_hooks.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False")


def test_the_public_queries_name_what_is_attached_and_applied():
    model = make_mlp()
    assert shira_hooks.attached(model) == [] and shira_hooks.applied(model) == []
    shira = shira_hooks.attach(model, 0.05, "rand", seed=0)
    assert shira_hooks.attached(model) == [shira] and shira_hooks.handles is shira_hooks.attached  # the README's name
    adapter = shira.extract()
    shira.detach()
    assert shira_hooks.attached(model) == []
    with shira_hooks.apply(model, adapter) as applied:
        assert shira_hooks.applied(model) == [applied]
    assert shira_hooks.applied(model) == []
    delta = adapter.deltas["layers.0.weight"]  # the fingerprint is the digest of the base at the entries
    assert shira_hooks.digest(model.layers[0].weight.detach().reshape(-1)[delta.indices.long()]) == delta.fingerprint
