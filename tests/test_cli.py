"""`python -m shira_hooks <verb>` and the `shira-hooks` console script, run as a user would."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shira_hooks
from shira_hooks import SparseAdapter
from shira_hooks.tools.cli import main

from conftest import make_mlp, mlp_batches, mlp_steps


def _run(*args):
    return subprocess.run([sys.executable, "-m", "shira_hooks", *args], capture_output=True, text=True)


def _adapter(tmp_path, seed, name):
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=seed)
    mlp_steps(
        model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), mlp_batches(2, seed=seed)
    )
    adapter = shira.extract()
    shira.detach()
    return adapter, adapter.save(tmp_path / name)


def test_help_lists_the_verbs_with_examples_and_the_demo_shows_its_defaults():
    top = _run("--help")
    assert top.returncode == 0 and top.stdout.startswith("usage: python -m shira_hooks")
    for verb in ("inspect", "fuse", "convert", "merge", "bench", "demo"):
        assert f"\n    {verb}" in top.stdout
    assert "examples:" in top.stdout
    demo = _run("demo", "--help")
    text = " ".join(demo.stdout.split())  # argparse wraps lines
    assert demo.stdout.startswith("usage: python -m shira_hooks demo")
    assert "(default: 0.02)" in text and "(default: snip)" in text and "(default: 300)" in text and "``" not in text
    merge = " ".join(_run("merge", "--help").stdout.split())
    assert "strength (default: 1.0)" in merge and "(default: None)" not in merge


def test_inspect_prints_every_weight_and_the_metadata(tmp_path, capsys):
    adapter, path = _adapter(tmp_path, 3, "a.safetensors")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert (
        f"{len(adapter.deltas)} weights, {adapter.num_entries:,} entries, {path.stat().st_size:,} bytes on disk" in out
    )
    assert "seed: 3" in out and "mask: rand" in out
    for name, delta in adapter.deltas.items():
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        k = delta.indices.numel()
        assert row.split() == [
            name,
            "x".join(map(str, delta.shape)),
            "float32",
            "float32",
            f"{k:,}",
            f"{100 * k / delta.numel:.2f}",
            f"{8 * k:,}",
            "yes",
        ]


def test_fuse_writes_the_weighted_sum(tmp_path, capsys):
    a, path_a = _adapter(tmp_path, 1, "a.safetensors")
    b, path_b = _adapter(tmp_path, 2, "b.safetensors")
    assert main(["fuse", str(path_a), str(path_b), "--weights", "1", "0.5", "-o", str(tmp_path / "f.safetensors")]) == 0
    fused, expected = SparseAdapter.load(tmp_path / "f.safetensors"), shira_hooks.fuse([a, b], [1.0, 0.5])
    for name, delta in expected.deltas.items():
        assert torch.equal(fused.deltas[name].indices, delta.indices) and torch.equal(
            fused.deltas[name].values, delta.values
        )


@pytest.mark.parametrize(
    "args", [["inspect", "{bad}"], ["inspect", "{missing}"], ["fuse", "{bad}", "{bad}", "-o", "{out}"]]
)
def test_bad_input_prints_the_error_without_a_traceback_and_exits_2(tmp_path, args):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    values = {"bad": str(bad), "missing": str(tmp_path / "missing.safetensors"), "out": str(tmp_path / "o.safetensors")}
    done = _run(*(a.format(**values) for a in args))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"python -m shira_hooks {args[0]}: error: ")
    assert not (tmp_path / "o.safetensors").exists()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "shira-hooks"
    if not script.exists():
        pytest.skip("the package was installed without its console scripts")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "inspect" in done.stdout


def _llama_folder_and_adapter(tmp_path):
    from conftest import llama_batches, make_llama

    model = make_llama()
    model.save_pretrained(tmp_path / "base")
    shira = shira_hooks.attach(model, 0.05, "rand", seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in llama_batches(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = shira.extract()
    shira.detach()
    return model, adapter, adapter.save(tmp_path / "adapter.safetensors")


def test_merge_saves_a_model_equal_to_apply(tmp_path, capsys):
    from transformers import LlamaForCausalLM

    trained, adapter, path = _llama_folder_and_adapter(tmp_path)
    assert (
        main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(path), "-o", str(tmp_path / "merged")]) == 0
    )
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged")
    expected = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    shira_hooks.apply(expected, adapter)
    for name, param in merged.named_parameters():
        assert torch.equal(param, dict(expected.named_parameters())[name]), name
    other = _run(
        "merge", "--model", str(tmp_path / "base"), "--adapter", str(path), "-o", str(tmp_path / "m2"), "--alpha", "nan"
    )
    assert other.returncode == 2 and "alpha=nan" in other.stderr and not (tmp_path / "m2").exists()


def test_convert_to_peft_and_back(tmp_path, capsys):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    _, adapter, path = _llama_folder_and_adapter(tmp_path)
    assert main(["convert", "--to-peft", str(path), "-o", str(tmp_path / "peft")]) == 0
    peft_model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft"
    ).merge_and_unload()
    expected = LlamaForCausalLM.from_pretrained(tmp_path / "base")
    shira_hooks.apply(expected, adapter)
    for name, param in peft_model.named_parameters():
        assert torch.equal(param, dict(expected.named_parameters())[name]), name
    assert main(["convert", "--from-peft", str(tmp_path / "peft"), "-o", str(tmp_path / "back.safetensors")]) == 0
    back = SparseAdapter.load(tmp_path / "back.safetensors")
    for name, delta in adapter.deltas.items():
        assert torch.equal(back.deltas[name].indices, delta.indices) and torch.equal(
            back.deltas[name].values, delta.values
        )
    assert main(["inspect", str(tmp_path / "peft")]) == 0 and "weights" in capsys.readouterr().out


def test_a_mistyped_verb_is_an_error_not_demo_arguments(capsys):
    assert main(["inpsect", "f.safetensors"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # the demo did not start
    assert err.startswith(
        "python -m shira_hooks: error: unknown verb 'inpsect'; did you mean 'inspect'? the verbs are inspect, fuse,"
    )


def test_fuse_needs_two_adapters(tmp_path, capsys):
    _, path = _adapter(tmp_path, 1, "a.safetensors")
    assert main(["fuse", str(path), "-o", str(tmp_path / "f.safetensors")]) == 2
    assert "fuse needs two or more adapters, got 1" in capsys.readouterr().err
    assert not (tmp_path / "f.safetensors").exists()


def test_inspect_into_a_pipe_that_closes_early_ends_quietly(tmp_path):
    """`inspect f | head -2` used to end in a BrokenPipeError traceback."""
    delta = lambda: shira_hooks.SparseDelta(
        (4, 4), torch.float32, torch.tensor([0, 5], dtype=torch.int32), torch.ones(2), ""
    )
    path = SparseAdapter({f"block.{i}.weight": delta() for i in range(3000)}).save(
        tmp_path / "many.safetensors"
    )  # ~300 KB of rows
    reader = subprocess.Popen(
        [sys.executable, "-m", "shira_hooks", "inspect", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    head = [reader.stdout.readline() for _ in range(2)]
    reader.stdout.close()  # as `head -2` exits
    error = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141 and error == "", error
    assert head[0].startswith(str(path).encode())


def test_every_bench_and_demo_option_has_help_and_its_default(capsys):
    for verb, defaults in (
        ("bench", ["[512, 1024, 2048, 4096, 8192]", "0.01", "2", "3", "20", "10.0"]),
        ("demo", ["0.02", "snip", "300"]),
    ):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        options = re.findall(
            r"(--[a-z-]+)(?: [A-Z.]+(?: \[[A-Z.]+ \.\.\.\])?| \{[^}]*\}(?: \[\{[^}]*\} \.\.\.\])?)? ([a-z(])",
            text.split("options:")[1],
        )
        assert len(options) >= 3 and all(first.isalpha() or first == "(" for _, first in options), (verb, options)
        assert all(f"(default: {value})" in text for value in defaults), (verb, text)
        assert "``" not in text
