"""benchmarks/quality: the whole pipeline on tiny sizes (--quick), its resumability, the LM scoring shortcut, and the
report's statistics (bootstrap intervals, the paired sign-flip test) on data whose answer is known."""

import argparse
import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "benchmarks" / "quality"


def run_quick(tmp_path, *extra):
    return subprocess.run(
        [
            sys.executable,
            str(QUALITY / "run.py"),
            "--quick",
            "--cache",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


METHODS = [
    "lora",
    "dora",
    "peft_shira",
    "shira_struct",
    "shira_rand",
    "shira_wm",
    "shira_grad",
    "shira_snip",
    "shira_rand_b4",
    "shira_rand_b8",
    "shira_rand_b16",
    "shira_snip_b4",
    "shira_snip_b8",
    "shira_snip_b16",
    "shira_wm_dora",
    "shira_snip_dora",
]
FEWER = {"shira_rand_b4": 1, "shira_snip_b8": 1}  # --method-seeds: these train one seed, the others two


def check_outcomes(correct: str, accuracy: float, rows: int) -> None:
    """A per-example record: one "0"/"1" per row, agreeing with the accuracy stored beside it."""
    assert len(correct) == rows and set(correct) <= {"0", "1"} and correct.count("1") / rows == accuracy


def switch_times_json(path: Path) -> dict:
    """A ``switch_model.py`` JSON from real switches: its own workers time the float32 shira_hooks switch, packed
    and per weight, at blocks 1, 4, 8 and 16 on 2 layers, in this process (``switch_model.py --quick`` leaves
    block 1 out and starts a dozen processes)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from shira_hooks.tools import machine

    import switch_model

    args = argparse.Namespace(threads=1, layers=2, sparsity=0.01, llama=False, warmup=1, repeats=3, budget=0.2)
    threads = torch.get_num_threads()
    try:
        cases = [
            c
            for c in switch_model.cases(False, False, [1, 4, 8, 16])
            if c["dtype"] == "float32" and c["method"] in ("shira", "shira_packed")
        ]
        results = {c["key"]: switch_model.summarize([switch_model.worker(c, args)["samples"]]) for c in cases}
    finally:
        torch.set_num_threads(threads)  # the worker sets the thread count of this process
    saved = {
        "command": "switch_model.worker at 2 layers (tests/test_quality.py)",
        "machine": machine(),
        "layers": 2,
        "targets": 2 * 7,
        "sparsity": 0.01,
        "llama": False,
        "load_before": "-",
        "load_after": "-",
        "cases": cases,
        "results": results,
    }
    path.write_text(json.dumps(saved))
    return saved


# "61.3 ± 2.1 [57.9, 64.6]", "61.3 [55.8, 66.8]" (one seed), "+1.6 [-2.1, +5.3]" (a paired difference): mean and interval
INTERVAL = re.compile(r"([-+]?\d+\.\d)(?: ± \d+\.\d)? \[([-+]?\d+\.\d), ([-+]?\d+\.\d)\]")


@dataclass
class QuickRun:
    """The first --quick run of the whole pipeline: its results and report, read before the reruns change them."""

    folder: Path  # --cache and --out live under it
    results: dict
    report: str  # RESULTS.md
    plot: bytes  # quality.png
    switch: dict  # the switch_model JSON given to --switch-times


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> QuickRun:
    pytest.importorskip("matplotlib")
    folder = tmp_path_factory.mktemp("quality")
    switch = switch_times_json(folder / "switch_model.json")
    run_quick(
        folder,
        "--lazy-test",
        "--method-seeds",
        *(f"{m}={n}" for m, n in FEWER.items()),
        "--switch-times",
        str(folder / "switch_model.json"),
    )
    out = folder / "out"
    return QuickRun(
        folder,
        json.loads((out / "results.json").read_text()),
        (out / "RESULTS.md").read_text(),
        (out / "quality.png").read_bytes(),
        switch,
    )


@pytest.fixture(scope="module")
def rerun(quick) -> tuple[str, dict]:
    """A rerun on the same cache, one method's seed limit lifted: (its output, the results it leaves)."""
    again = run_quick(
        quick.folder, "--lazy-test", "--method-seeds", "shira_snip_b8=1", "--stages", "grid", "seeds", "test", "fusion"
    )
    return again, json.loads((quick.folder / "out" / "results.json").read_text())


KINDS = ("encoder", "lm")


def _seeds_of(r: dict) -> dict[str, list[int]]:
    return {m: r["seeds"][: FEWER.get(m, len(r["seeds"]))] for m in METHODS}


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_trains_its_seeds_on_every_task_at_its_chosen_rate(quick, kind):
    r = quick.results["models"][kind]
    assert len(r["seeds"]) == 2 and {m: len(s) for m, s in r["method_seeds"].items()} == FEWER
    assert sorted(r["chosen_lr"]) == sorted(METHODS) and all(lr in r["grid"] for lr in r["chosen_lr"].values())
    trained = {(c["task"], c["method"], c["seed"]) for c in r["cells"] if c["lr"] == r["chosen_lr"].get(c["method"])}
    assert trained == {(t, m, s) for t in r["tasks"] for m in METHODS for s in _seeds_of(r)[m]}


@pytest.mark.parametrize("kind", KINDS)
def test_lm_block_variants_take_the_rate_of_their_mask_without_blocks(quick, kind):
    """The LM's block variants have no grid: their mask's rate without blocks; the encoder's search the grid."""
    r = quick.results["models"][kind]
    first = next(iter(r["tasks"]))
    for method in ("shira_rand_b4", "shira_snip_b16"):
        rates = {c["lr"] for c in r["cells"] if c["method"] == method and c["task"] == first and c["seed"] == 0}
        base = method.rsplit("_b", 1)[0]
        if kind == "lm":
            assert r["lr_from"][method] == base and rates == {r["chosen_lr"][base]} == {r["chosen_lr"][method]}
        else:
            assert method not in r["lr_from"] and rates == set(r["grid"])


@pytest.mark.parametrize("kind", KINDS)
def test_no_cell_changes_weights_outside_its_masks(quick, kind):
    assert all(c.get("outside_mask_changes", 0) == 0 for c in quick.results["models"][kind]["cells"])


@pytest.mark.parametrize("kind", KINDS)
def test_every_cell_keeps_its_outcome_per_example_and_its_wall_time(quick, kind):
    """Baselines included; --lazy-test: the final cells are tested from the saved adapter."""
    r = quick.results["models"][kind]
    final = [c for c in r["cells"] if c["method"] in ("head", "zero_shot") or c["lr"] == r["chosen_lr"][c["method"]]]
    assert any(c.get("test_from") for c in final)
    for c in r["cells"]:
        sizes = r["tasks"][c["task"]]["sizes"]
        check_outcomes(c["val_correct"], c["val"], sizes["val"])
        if c in final:
            check_outcomes(c["test_correct"], c["test"], sizes["test"])
        assert "wall_s" in c and "step_times" not in c


@pytest.mark.parametrize("kind", KINDS)
def test_fusion_covers_every_method_and_seed_and_changes_at_most_the_union(quick, kind):
    r = quick.results["models"][kind]
    assert {(f["method"], f["seed"]) for f in r["fusion"]} == {(m, s) for m in METHODS for s in _seeds_of(r)[m]}
    for f in r["fusion"]:
        assert set(f["accuracy"]) == set(f["correct"]) == set(r["tasks"])
        for t in r["tasks"]:
            check_outcomes(f["correct"][t], f["accuracy"][t], r["tasks"][t]["sizes"]["test"])
        if f["method"].startswith("shira_"):  # fused sparse adapters change at most the union of their entries
            assert 0 < f["changed"] <= sum(f["entries"].values())


@pytest.mark.parametrize("kind", KINDS)
def test_training_cost_is_measured(quick, kind):
    r = quick.results["models"][kind]
    assert (
        [c["method"] for c in r["cost"]] == ["shira_rand"]
        and r["cost"][0]["peak_rss_mb"] > 0
        and r["cost"][0]["steps"] == 3
    )


def test_report_has_every_section_per_model_and_the_plot(quick):
    for heading in (
        "### 1. Single adapters",
        "### 2. Multi-adapter fusion",
        "### 3. Weights changed",
        "### 4. Training cost",
        "### 5. The paper's claims",
    ):
        assert quick.report.count(heading) == 2
    assert quick.plot[:4] == b"\x89PNG"
    assert "| PEFT DoRA |" in quick.report
    assert quick.report.count("- Seeds: 2; 1 for shira_hooks rand block=4, shira_hooks snip block=8 (") == 2
    sys.path[:0] = [str(QUALITY)]
    import report

    for r in quick.results["models"].values():  # the compute line: counts and summed wall times of results.json
        trained = sum(c["wall_s"] for c in r["cells"])
        assert report.duration(trained) in report.compute_line(r) and report.compute_line(r) in quick.report
        assert f"{len(r['cells'])} cells trained and validated in " in report.compute_line(r)
    assert report.duration(59.6) == "60 s" and report.duration(600) == "10 min" and report.duration(9000) == "2.5 h"


def test_switch_times_travel_into_results_json(quick):
    """With the run's command and machine: the report and the figure read no other file."""
    copied, switch = quick.results["switch_times"], quick.switch
    assert copied["command"] == switch["command"] and copied["machine"] == switch["machine"] and copied["layers"] == 2
    assert sorted(copied["blocks"], key=int) == ["1", "4", "8", "16"]
    for block, times in copied["blocks"].items():
        for which, method in (("packed", "shira_packed"), ("per_weight", "shira")):
            assert times[which] == {
                k: switch["results"][f"float32/{method}/b{block}/unset"][k] for k in ("median", "min", "max", "n")
            }


def test_every_interval_of_the_report_contains_its_mean(quick):
    shown = INTERVAL.findall(quick.report)  # cells, drops, paired differences
    assert len(shown) > 200 and all(float(low) <= float(mean) <= float(high) for mean, low, high in shown)


def test_claims_are_judged_by_the_paired_test_or_marked_not_judged(quick):
    """Over 2 seeds x 3 tasks x 12 test examples; a method with one seed is not judged."""
    text = quick.report
    for method in ("shira_hooks wm", "PEFT SHiRA (rand)", "shira_hooks snip block=16"):
        line = next(x for x in text.splitlines() if x.startswith(f"- Single tasks, {method} vs PEFT LoRA: "))
        assert INTERVAL.search(line) and re.search(
            r"p = [\d.e-]+ \(2 seeds x 36 test examples\): (no significant difference|above|below)", line
        )
    line = next(x for x in text.splitlines() if x.startswith("- Single tasks, shira_hooks rand block=4 vs PEFT LoRA: "))
    assert "(1 seed x 36 test examples): not judged, one seed" in line
    assert (
        text.count("- Fusion drop, shira_hooks wm vs PEFT LoRA: ") == 2
        and text.count("- Weights changed by fusion, shira_hooks rand vs PEFT LoRA: ") == 2
    )
    # the quick run trains shira_wm_dora and shira_snip_dora: each is judged against PEFT DoRA like the others against LoRA
    dora = [x for x in text.splitlines() if x.startswith("- Single tasks, ") and " vs PEFT DoRA: " in x]
    assert len(dora) == 2 * 2 and "- **SHiRA-DoRA vs DoRA**: no `shira_<mask>_dora` rows" not in text
    assert all(
        INTERVAL.search(x)
        and re.search(r"p = [\d.e-]+ \(2 seeds x 36 test examples\): (no significant difference|above|below)", x)
        for x in dora
    )


def test_block_size_table_and_pareto_figure(quick):
    text, copied = quick.report, quick.results["switch_times"]
    assert (quick.folder / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert text.count("### 6. Block size: accuracy against switch time") == 2
    for mask in ("rand", "snip"):
        for block in (1, 4, 8, 16):
            packed = copied["blocks"][str(block)]["packed"]
            assert (
                text.count(f"| {mask} | {block} | ") == 2
                and text.count(f"| {1e3 * packed['median']:.1f} ({1e3 * packed['min']:.1f}-") >= 2
            )


@pytest.mark.parametrize("kind", KINDS)
def test_pareto_lines_use_the_seeds_every_block_size_shares(quick, kind):
    """shira_rand_b4 and shira_snip_b8 have one seed, the other block sizes two: each mask's line in pareto.png is
    drawn on seed 0 alone, block 1 included, so that its points differ by block size only."""
    sys.path[:0] = [str(QUALITY)]
    import blocks
    import evidence as E

    r, switch = quick.results["models"][kind], quick.results["switch_times"]
    for mask in ("rand", "snip"):
        for what in ("single", "fused"):
            assert blocks.shared_seeds(r, mask, what) == {0}
            points = {block: y for _, y, _, _, block in blocks.pareto_points(r, mask, what, switch)}
            assert sorted(points) == [1, 4, 8, 16]
            series = E.per_seed_average if what == "single" else E.fused_average
            assert points[1] == pytest.approx(100 * series(r, f"shira_{mask}", {0})[0])
            assert len(series(r, f"shira_{mask}")) == 2  # the table's mean is over both seeds


def test_a_rerun_trains_only_what_is_not_cached(quick, rerun):
    """Here only shira_rand_b4's second seed (no longer limited to one), and the test and fusion stages take it up."""
    again, results = rerun
    trained = [line.split()[:4] for line in again.splitlines() if " val " in line]
    assert sorted(trained) == sorted(
        [kind, t, "shira_rand_b4", "lr=" + f"{quick.results['models'][kind]['chosen_lr']['shira_rand_b4']:g}"]
        for kind in KINDS
        for t in quick.results["models"][kind]["tasks"]
    )
    tested = [line.split()[2:5] for line in again.splitlines() if "(fresh base model" in line]
    assert tested == [["shira_rand_b4", line[3], "seed=1"] for line in trained]
    assert [line.split()[1:4] for line in again.splitlines() if " fused " in line] == [
        ["fused", "shira_rand_b4", "seed=1"]
    ] * 2
    assert {f["seed"] for f in results["models"]["lm"]["fusion"] if f["method"] == "shira_rand_b4"} == {0, 1}
    assert results["switch_times"] == quick.results["switch_times"]  # kept by a run without --switch-times


def test_merge_adds_one_method_at_a_given_rate_and_retrains_nothing_else(quick, rerun):
    """One method added to the finished results (--merge), at a given rate (--lr), in a fresh cache."""
    results = rerun[1]
    folder = quick.folder
    added = subprocess.run(
        [
            sys.executable,
            str(QUALITY / "run.py"),
            "--quick",
            "--models",
            "encoder",
            "--methods",
            "shira_rand_b16",
            "--lr",
            "shira_rand_b16=0.03",
            "--stages",
            "grid",
            "seeds",
            "fusion",
            "report",
            "--merge",
            str(folder / "out" / "results.json"),
            "--cache",
            str(folder / "cache2"),
            "--out",
            str(folder / "out2"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    quick_encoder = results["models"]["encoder"]
    assert (
        " head " not in added
        and " lora " not in added
        and added.count(" val ") == len(quick_encoder["seeds"]) * len(quick_encoder["tasks"])
    )
    merged = json.loads((folder / "out2" / "results.json").read_text())
    assert merged["models"]["lm"] == results["models"]["lm"]
    assert merged["switch_times"] == quick.results["switch_times"]
    encoder, before = merged["models"]["encoder"], results["models"]["encoder"]
    assert encoder["chosen_lr"] == {**before["chosen_lr"], "shira_rand_b16": 0.03} and encoder["fixed_lr"] == {
        "shira_rand_b16": 0.03
    }
    assert [c for c in encoder["cells"] if c["method"] != "shira_rand_b16"] == [
        c for c in before["cells"] if c["method"] != "shira_rand_b16"
    ]
    assert {c["lr"] for c in encoder["cells"] if c["method"] == "shira_rand_b16"} == {0.03}
    assert (
        "Not on the grid (`--lr`, the rate of the same mask without blocks): shira_hooks rand block=16 0.03."
        in (folder / "out2" / "RESULTS.md").read_text()
    )


def test_restore_resumes_a_committed_run_on_a_fresh_cache(quick, rerun):
    """A fresh machine resumes from results.json alone (--restore): only what results.json lacks runs. Here the LM's
    shira_rand lacks seed 1's fusion row and one of its seed-1 cells lacks its test (a cell trained but not yet tested
    when the run stopped): that cell trains and tests again, the fusion trains the other tasks' adapters again (their
    records restored without adapters), and all of it reproduces the first run per example."""
    before = rerun[1]["models"]["lm"]
    lr, first = before["chosen_lr"]["shira_rand"], next(iter(before["tasks"]))
    edited = json.loads(json.dumps(rerun[1]))
    lm = edited["models"]["lm"]
    untested = next(
        c for c in lm["cells"] if (c["method"], c["lr"], c["seed"], c["task"]) == ("shira_rand", lr, 1, first)
    )
    del untested["test"], untested["test_correct"]
    lm["fusion"] = [f for f in lm["fusion"] if (f["method"], f["seed"]) != ("shira_rand", 1)]
    edited["machine"]["cpu"] = "Other CPU"  # as if the committed run came from another machine
    source = quick.folder / "restore.json"
    source.write_text(json.dumps(edited))
    cache = quick.folder / "cache3"
    out = subprocess.run(
        [sys.executable, str(QUALITY / "run.py"), "--quick", "--lazy-test", "--models", "lm"]
        + ["--methods", "shira_rand", "--stages", "grid", "seeds", "test", "fusion"]
        + ["--restore", str(source), "--cache", str(cache), "--out", str(quick.folder / "out3")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"restored from {source}: {len(lm['cells']) - 1} lm cells, {len(lm['fusion'])} fusion rows" in out
    again = [line.split()[1:5] for line in out.splitlines() if "adapter trained again for fusion" in line]
    trained = [line.split()[1:5] for line in out.splitlines() if " val " in line and "trained again" not in line]
    tested = [line.split()[1:5] for line in out.splitlines() if "(fresh base model" in line]
    assert trained == tested == [[first, "shira_rand", f"lr={lr:g}", "seed=1"]]
    assert sorted(again) == sorted([t, "shira_rand", f"lr={lr:g}", "seed=1"] for t in before["tasks"] if t != first)
    assert all("per example equal" in line for line in out.splitlines() if "trained again" in line)
    assert [line.split()[1:4] for line in out.splitlines() if " fused " in line] == [["fused", "shira_rand", "seed=1"]]
    after = json.loads((quick.folder / "out3" / "results.json").read_text())["models"]["lm"]

    def key(row):
        return row["method"], row["seed"], row.get("task"), row.get("lr")

    old = {key(c): c for c in before["cells"]}
    for c in after["cells"]:
        assert c["test_correct"] == old[key(c)]["test_correct"] if "test" in c else "test" not in old[key(c)]
        assert ("retrained" in c) == (key(c) in {("shira_rand", 1, t, lr) for t in before["tasks"] if t != first})
    assert {key(c) for c in after["cells"]} == set(old)
    fused = {key(f): f for f in before["fusion"]}
    assert {key(f): f["correct"] for f in after["fusion"]} == {k: f["correct"] for k, f in fused.items()}
    sys.path[:0] = [str(QUALITY)]
    import report

    assert "; 2 restored cells' adapters trained again for fusion in " in report.compute_line(after)
    machine = json.loads((quick.folder / "out3" / "results.json").read_text())["machine"]
    assert machine["cells restored from"] == str(source)
    assert machine["restored cells ran on"].startswith("cpu Other CPU, torch ")
    chained = quick.folder / "out3" / "results.json"  # restored again: both machines are named, each once
    subprocess.run(
        [sys.executable, str(QUALITY / "run.py"), "--quick", "--models", "lm", "--methods", "shira_rand"]
        + ["--stages", "test", "--restore", str(chained), "--cache", str(quick.folder / "cache5")]
        + ["--out", str(quick.folder / "out5")],
        capture_output=True,
        text=True,
        check=True,
    )
    again_machine = json.loads((quick.folder / "out5" / "results.json").read_text())["machine"]
    assert again_machine["cells restored from"] == str(chained)
    ran = again_machine["restored cells ran on"].split("; ")
    assert [m.split(", torch")[0] for m in ran] == ["cpu Other CPU", f"cpu {machine['cpu']}"]
    assert report.compute_line(after).endswith(", 2 of them equal to the first training on every validation example.")
    other = json.loads(source.read_text())
    other["models"]["lm"]["cache_folder"] = "lm-quick-00000000"
    source.write_text(json.dumps(other))
    refused = subprocess.run(
        [sys.executable, str(QUALITY / "run.py"), "--quick", "--models", "lm", "--stages", "report"]
        + ["--restore", str(source), "--cache", str(quick.folder / "cache4"), "--out", str(quick.folder / "out4")],
        capture_output=True,
        text=True,
    )
    assert refused.returncode != 0 and "were run with other settings (cache folder lm-quick-00000000" in refused.stderr
    assert not (quick.folder / "cache4").exists() or not any((quick.folder / "cache4").rglob("cell.json"))


def quality_modules():
    sys.path[:0] = [str(QUALITY), str(ROOT)]
    import methods
    import tasks

    return methods, tasks


def test_split_keeps_the_training_rows_and_the_same_test_rows():
    _, tasks = quality_modules()
    rows = [
        {"input": f"row {i}", "options": ["a", "b"], "answer": i % 2} for i in range(693)
    ]  # intent_recognition's size
    encoder = tasks.split("t", rows, test=300, val=150, train=300)
    lm = tasks.split("t", rows, test=300, val=40, train=300)
    assert encoder.sizes == {"train": 300, "val": 150, "test": 243} and lm.sizes == {
        "train": 353,
        "val": 40,
        "test": 300,
    }
    assert lm.test[:243] == encoder.test and {r["input"] for r in lm.train + lm.val + lm.test} == {
        r["input"] for r in rows
    }
    assert (
        tasks.split("t", rows, test=300, val=40, train=300).test_digest() == lm.test_digest() != encoder.test_digest()
    )
    with pytest.raises(
        ValueError, match="task 't' has 693 rows: too few for 150 validation rows, at least 543 training rows"
    ):
        tasks.split("t", rows, test=300, val=150, train=543)


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_saved_low_rank_adapter_is_the_trained_peft_model(method, tmp_path):
    """What the benchmark tests and fuses for LoRA and DoRA (a fresh base plus ``LowRank.delta``) is the PEFT model it trained."""
    methods, tasks = quality_modules()
    backend = methods.CausalLM(tiny=True)
    task = tasks.split("intent", tasks.synthetic("intent"), test=8, val=4, train=24)
    prepared = methods.prepare(method, backend, backend.model(task, 0), sparsity=0.05, seed=0, calibration=None)
    optimizer = torch.optim.AdamW(prepared.adapter_params, lr=3e-2, weight_decay=0.0)
    for rows in tasks.batches(task.train, 8, 3, seed=0):
        backend.loss(prepared.model, backend.batch(task, rows)).backward()
        optimizer.step()
        optimizer.zero_grad()
    methods.save_adapter(prepared, method, tmp_path / "adapter.safetensors")
    adapter = methods.load_adapter(tmp_path / "adapter.safetensors")
    assert all((part.magnitude is not None) == (method == "dora") for part in adapter.values())
    base, untouched = backend.model(task, 0), backend.model(task, 0)
    with torch.no_grad():
        for name, module in methods.target_linears(base, backend.targets).items():
            module.weight.add_(adapter[name + ".weight"].delta(module.weight.clone()))
        batch = tasks.lm_inputs(backend.tokenizer, task.test, backend.max_length, every_option=True)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        trained, loaded, before = (m.eval()(**inputs).logits for m in (prepared.model, base, untouched))
    assert (trained - before).abs().max() > 1e-2  # training moved the model
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=1e-5)


def test_lm_option_scores_equal_full_sequence_scoring():
    methods, tasks = quality_modules()
    backend = methods.CausalLM(tiny=True)
    model = backend.model(None, 0).eval()
    task = tasks.split("intent", tasks.synthetic("intent"), test=8, val=4, train=24)
    for row in task.test:
        batch = tasks.lm_inputs(backend.tokenizer, [row], backend.max_length, every_option=True)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        full = (logp * (targets != -100)).sum(1)
        torch.testing.assert_close(backend.option_scores(model, row), full, atol=1e-5, rtol=0)


def quality_stats():
    sys.path[:0] = [str(QUALITY)]
    import stats

    return stats


def test_bootstrap_interval_on_known_data():
    stats = quality_stats()
    rng = np.random.default_rng(0)
    coin = rng.permutation(np.repeat([0, 1], 200))[None]  # one seed, 400 examples, 50% right
    interval = stats.bootstrap([coin])
    # the binomial standard error sqrt(0.25 / 400) = 0.025: a 95% interval of about +-0.049 around 0.5
    assert interval.mean == 0.5 and interval.contains(0.5) and 0.04 < (interval.high - interval.low) / 2 < 0.06
    # seeds share the test examples: 3 seeds that agree on every example are as uncertain as one
    assert stats.bootstrap([np.repeat(coin, 3, axis=0)]) == interval
    # tasks weigh equally whatever their size; each task's examples are resampled on their own
    both = stats.bootstrap([coin, np.ones((1, 50))])
    assert both.mean == 0.75 and both.high - both.low == pytest.approx((interval.high - interval.low) / 2, rel=0.2)
    with pytest.raises(ValueError, match=r"\(seeds, examples\) array .* got shape \(3,\)"):
        stats.bootstrap([np.ones(3)])


def test_paired_sign_flip_test_on_known_answers():
    stats = quality_stats()
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, size=(3, 300))
    same = stats.paired([a], [a.copy()])  # identical methods: no difference, p = 1
    assert same.p == 1.0 and same.interval.contains(0.0) and (same.seeds, same.examples) == (3, 300)
    always = stats.paired([np.ones((3, 300))], [np.zeros((3, 300))])  # right wherever the other is wrong
    assert always.p == 1 / (stats.FLIPS + 1) and always.interval.low == always.interval.high == 1.0
    # exact: 3 examples differ, all one way: 2 of the 2^3 sign patterns are as extreme; 2 one way and 1 the other: all 8
    b = a.copy()
    a[:, :3] = 1
    b[:, :3] = 0
    assert stats.paired([a], [b]).p == 0.25
    b[:, 2] = 1
    a[:, 2] = 0
    assert stats.paired([a], [b]).p == 1.0
    # 30 examples one way, 20 the other (equal weights): the two-sided binomial test, P(|X - 25| >= 5) for X ~ Bin(50, 1/2)
    first, second = np.zeros((2, 300)), np.zeros((2, 300))
    first[:, :30] = 1
    second[:, 30:50] = 1
    exact = sum(math.comb(50, k) for k in range(51) if abs(k - 25) >= 5) / 2**50
    assert abs(stats.paired([first], [second]).p - exact) < 0.02
    # the difference of seeds that disagree is their average: one seed +1, the other 0 on 60 examples -> +0.1
    first, second = np.zeros((2, 300)), np.zeros((2, 300))
    first[0, :60] = 1
    result = stats.paired([first], [second])
    assert result.interval.mean == pytest.approx(0.1) and result.interval.low > 0 and result.p < 0.01
    with pytest.raises(ValueError, match="paired data need the same tasks, seeds and examples"):
        stats.paired([first], [second[:1]])


def test_switch_times_refuses_a_file_without_them(tmp_path):
    sys.path[:0] = [str(QUALITY), str(ROOT)]
    import blocks

    (tmp_path / "bench.json").write_text(
        json.dumps({"results": {"float32/addmm/b1/unset": {"median": 0.1, "min": 0.1, "max": 0.1, "n": 3}}})
    )
    with pytest.raises(
        SystemExit, match=r"bench.json: no float32 shira_hooks switch times in it .* --blocks 1 4 8 16 --json PATH"
    ):
        blocks.read_switch_times(tmp_path / "bench.json")
    with pytest.raises(SystemExit, match=r"missing.json: cannot read it as JSON"):
        blocks.read_switch_times(tmp_path / "missing.json")


def test_report_shows_whole_seeds_only():
    """A run stopped (or still going) in the middle of a seed has tested some tasks at that seed: the rows
    show the seeds tested on every task, and the fused table's single average the seeds fused so far."""
    sys.path[:0] = [str(QUALITY)]
    import evidence as E

    def cell(task, seed, test):
        return {"method": "lora", "task": task, "lr": 0.1, "seed": seed, "test": test, "test_correct": "1"}

    r = {
        "tasks": {"a": {}, "b": {}},
        "chosen_lr": {"lora": 0.1},
        "cells": [cell("a", 0, 0.5), cell("b", 0, 0.7), cell("a", 1, 0.9), cell("b", 2, 0.1), cell("a", 2, 0.3)],
        "fusion": [{"method": "lora", "seed": 0, "accuracy": {"a": 0.4, "b": 0.6}}],
    }
    assert E.whole_seeds(r, "lora") == {0, 2}
    assert [c["seed"] for c in E.final_cells(r, "lora", "a")] == [0, 2]  # seed 1 lacks task b
    assert E.per_seed_average(r, "lora") == pytest.approx([0.6, 0.2])
    assert E.per_seed_average(r, "lora", seeds={0}) == pytest.approx([0.6])
    assert E.drops(r, "lora") == pytest.approx([0.1])
