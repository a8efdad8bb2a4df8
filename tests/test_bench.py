"""`python -m shira_hooks.bench --quick` and `benchmarks/switch_model.py --quick` run; only structure is checked."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick(script: str, json_path: Path) -> str:
    """stdout of ``benchmarks/<script>.py --quick --json <json_path>``."""
    command = [sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--quick", "--json", str(json_path)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def test_bench_quick_prints_the_table_and_writes_json(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "shira_hooks.bench",
            "--quick",
            "--json",
            str(tmp_path / "b.json"),
            "--results",
            str(tmp_path / "R.md"),
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    lines = out.splitlines()
    assert (
        lines[0].startswith("cpu: ")
        and any(line.startswith("torch: ") for line in lines)
        and any(line.startswith("torch_threads: 2") for line in lines)
    )
    header = next(i for i, line in enumerate(lines) if line.split()[:4] == ["dim", "dtype", "r", "k"])
    assert (
        "spread: the slowest round over the median round" in lines[header - 1]
        and "'!' when 3x or more" in lines[header - 1]
    )  # the legend
    rows = [line.split() for line in lines[header + 1 :]]
    assert [(r[0], r[1]) for r in rows] == [
        ("256", "float32"),
        ("512", "float32"),
        ("256", "bfloat16"),
        ("512", "bfloat16"),
    ]
    # 15 columns, the last (spread) followed by "!" where a method's slowest round was >= 3x its median
    assert all(
        len(r) in (15, 16) and all(re.fullmatch(r"[\d.,]+", c) for c in r[2:15]) and r[15:] in ([], ["!"]) for r in rows
    )
    payload = json.loads((tmp_path / "b.json").read_text())
    assert payload["machine"]["torch_threads"] == "2" and len(payload["rows"]) == 4
    row = payload["rows"][0]
    assert row["entries"] == round(0.01 * 256 * 256) and row["rank"] == 1
    methods = ("lora_addmm", "lora_peft", "shira", "raw_bound", "raw_scatter", "naive")
    for method in methods:
        stats = row[method]["pair"]
        assert stats["min"] <= stats["median"] <= stats["max"] and stats["n"] >= 3
        assert row["spread"][method] == pytest.approx(stats["max"] / stats["median"])
    assert len({row[method]["pair"]["n"] for method in methods}) == 1  # round-robin: every method timed in every round
    assert row["scatter_over_index_copy"] == pytest.approx(
        row["raw_scatter"]["pair"]["median"] / row["raw_bound"]["pair"]["median"]
    )
    assert "<!-- bench:start -->" in (tmp_path / "R.md").read_text()


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "shira_hooks.bench",
            "--quick",
            "--dtypes",
            "float32",
            "--plot",
            str(tmp_path / "p.png"),
        ],
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_switch_model_quick(tmp_path):
    pytest.importorskip("peft")
    out = _quick("switch_model", tmp_path / "s.json")
    for method in (
        "shira_hooks switch, block=16",
        "shira_hooks switch on packed weights, block=16",
        "raw bound: 2 index_copy_ per weight, block=16",
        "packed raw bound: 2 index_copy_ for all weights",
        "in-place LoRA bound: addmm_",
        "PEFT LoRA merge + unmerge, cold pages",
    ):
        assert f"| {method}" in out
    result = json.loads((tmp_path / "s.json").read_text())
    assert result["targets"] == 14 and result["rank"] >= 1 and result["rounds"] == 1
    for stats in result["results"].values():  # each method in its own process, at least 3 timed switches
        assert stats["n"] >= 3 and stats["min"] <= stats["median"] <= stats["max"]
    moved = result["bytes"]["float32"]
    # block=16 float32 runs are whole 64-byte lines: the lines touched are the entries' own bytes
    assert moved["lines_b16"] == moved["entries_b16"] < moved["lines_b1"] < moved["dense"]
    memory = result["pack_memory"]  # measured in a process of its own: the peak is at least the start
    assert memory["phases"]["pack"]["peak_mb"] >= memory["phases"]["pack"]["start_mb"] > 0 and memory["target_mb"] > 0


def test_train_cost_quick(tmp_path):
    pytest.importorskip("peft")
    out = _quick("train_cost", tmp_path / "t.json")
    rows = json.loads((tmp_path / "t.json").read_text())["groups"]["tiny"]
    assert [r["method"] for r in rows] == [
        "full",
        "shira_dense",
        "shira_compact",
        "shira_sparse",
        "shira_sparse_dora",
        "shira_sparse_dora_r",
        "peft_lora",
        "peft_lora_dropout",
        "peft_shira",
        "peft_dora",
    ]
    shira = [r["trainable"] for r in rows if r["method"].startswith("shira_") and "dora" not in r["method"]]
    assert len(set(shira)) == 1  # the three modes train the same entries
    for r in rows:
        assert (
            r["step_min_s"] <= r["step_median_s"] <= r["step_max_s"] and r["peak_rss_mb"] >= r["rss_after_model_mb"] > 0
        )
        assert (
            r["steps"] == 2 * r["rounds"] and r["peak_live_rss_mb"] > 0
        )  # --quick: one round of two timed steps, the live peaks in the same process
        assert set(r["live_peak_by_length"]) == {"16", "32"} and r["live_peak_by_length"]["32"] >= r["peak_live_rss_mb"]
    by = {r["method"]: r for r in rows}
    # compact/sparse keep optimizer state for the k entries only; dense hooks for whole target weights
    assert (
        by["full"]["optimizer_state_mb"]
        > by["shira_dense"]["optimizer_state_mb"]
        > 10 * by["shira_sparse"]["optimizer_state_mb"]
        > 0
    )
    assert by["shira_compact"]["optimizer_state_mb"] == by["shira_sparse"]["optimizer_state_mb"]
    assert all(r["saved_activations_mb"] > 0 for r in rows)
    assert "| shira_hooks mode='sparse' |" in out
    # LoRA with dropout keeps a dropped-out copy of every target's input for the backward of A
    assert by["peft_lora_dropout"]["saved_activations_mb"] > by["peft_lora"]["saved_activations_mb"]
    assert "- shira_hooks mode='sparse':" in out and "the live peak of PEFT LoRA, dropout 0.05" in out
    # SHiRA-DoRA: the magnitudes train too (one per output row), and its rows are compared with the sparse mode and PEFT DoRA
    assert (
        by["shira_sparse"]["trainable"] < by["shira_sparse_dora"]["trainable"] < by["shira_sparse_dora_r"]["trainable"]
    )
    assert "- shira_hooks mode='sparse', dora=True: " in out and "the live peak of shira_hooks mode='sparse'; " in out
    assert "| method | 2 x 16 | 2 x 32 |" in out


def test_mixed_batch_quick(tmp_path):
    pytest.importorskip("peft")
    out = _quick("mixed_batch", tmp_path / "m.json")
    for method in (
        "MixedAdapters mixed forward",
        "PEFT LoRA adapter_names= mixed forward",
        "MixedAdapters mixed generate",
        "chosen: CSR sparse.mm",
    ):
        assert f"| {method}" in out
    result = json.loads((tmp_path / "m.json").read_text())["result"]
    assert result["targets"] == 14 and result["rows"] == 4
    assert result["max_abs_logit_diff_vs_apply"] <= 1e-4  # every mixed row equals apply of its adapter
    assert 0.8 <= result["lora_params_per_adapter"] / result["entries_per_adapter"] <= 1.2  # the same budget within 20%
