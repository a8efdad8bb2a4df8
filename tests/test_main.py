"""`python -m shira_hooks`, the README's main job, runs end to end and checks itself."""

import subprocess
import sys

import pytest

from shira_hooks.__main__ import main


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
