"""benchmarks/quality: the whole pipeline on tiny sizes (--quick), its resumability, and the LM scoring shortcut."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
QUALITY = ROOT / "benchmarks" / "quality"


def run_quick(tmp_path, *extra):
    return subprocess.run(
        [sys.executable, str(QUALITY / "run.py"), "--quick", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), *extra],
        capture_output=True, text=True, check=True,
    ).stdout


def test_quality_quick_runs_the_whole_pipeline_and_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    run_quick(tmp_path, "--lazy-test")
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    methods = ["lora", "peft_shira", "shira_struct", "shira_rand", "shira_wm", "shira_grad", "shira_snip", "shira_rand_b16", "shira_snip_b16"]
    for kind in ("encoder", "lm"):
        r = results["models"][kind]
        assert sorted(r["chosen_lr"]) == sorted(methods) and all(lr in r["grid"] for lr in r["chosen_lr"].values())
        trained = {(c["task"], c["method"], c["seed"]) for c in r["cells"] if c["lr"] == r["chosen_lr"].get(c["method"])}
        assert trained == {(t, m, s) for t in r["tasks"] for m in methods for s in r["seeds"]}
        assert all(c.get("outside_mask_changes", 0) == 0 for c in r["cells"])
        final = [c for c in r["cells"] if c["method"] in ("head", "zero_shot") or c["lr"] == r["chosen_lr"][c["method"]]]
        assert all(0 <= c["test"] <= 1 for c in final)  # --lazy-test: tested from the saved adapter
        assert any(c.get("test_from") for c in final)
        assert {(f["method"], f["seed"]) for f in r["fusion"]} == {(m, s) for m in methods for s in r["seeds"]}
        for f in r["fusion"]:
            assert set(f["accuracy"]) == set(r["tasks"])
            if f["method"].startswith("shira_"):  # fused sparse adapters change at most the union of their entries
                assert 0 < f["changed"] <= sum(f["entries"].values())
        assert [c["method"] for c in r["cost"]] == ["shira_rand"] and r["cost"][0]["peak_rss_mb"] > 0 and r["cost"][0]["steps"] == 3
    text = (tmp_path / "out" / "RESULTS.md").read_text()
    for heading in ("### 1. Single adapters", "### 2. Multi-adapter fusion", "### 3. Weights changed", "### 4. Training cost", "### 5. The paper's claims"):
        assert text.count(heading) == 2
    assert (tmp_path / "out" / "quality.png").read_bytes()[:4] == b"\x89PNG"
    assert "- Blocks: shira_hooks rand block=16 single-task average" in text
    # a rerun trains nothing: every cell comes from the cache
    again = run_quick(tmp_path, "--stages", "grid", "seeds", "fusion")
    assert " val " not in again and " fused " not in again
    # one method added to the finished results (--merge), at a given rate (--lr), in a fresh cache: nothing else retrained
    added = subprocess.run(
        [sys.executable, str(QUALITY / "run.py"), "--quick", "--models", "encoder", "--methods", "shira_rand_b16", "--lr", "shira_rand_b16=0.03",
         "--stages", "grid", "seeds", "fusion", "report", "--merge", str(tmp_path / "out" / "results.json"),
         "--cache", str(tmp_path / "cache2"), "--out", str(tmp_path / "out2")], capture_output=True, text=True, check=True).stdout
    quick_encoder = results["models"]["encoder"]
    assert " head " not in added and " lora " not in added and added.count(" val ") == len(quick_encoder["seeds"]) * len(quick_encoder["tasks"])
    merged = json.loads((tmp_path / "out2" / "results.json").read_text())
    assert merged["models"]["lm"] == results["models"]["lm"]
    encoder, before = merged["models"]["encoder"], results["models"]["encoder"]
    assert encoder["chosen_lr"] == {**before["chosen_lr"], "shira_rand_b16": 0.03} and encoder["fixed_lr"] == {"shira_rand_b16": 0.03}
    assert [c for c in encoder["cells"] if c["method"] != "shira_rand_b16"] == [c for c in before["cells"] if c["method"] != "shira_rand_b16"]
    assert {c["lr"] for c in encoder["cells"] if c["method"] == "shira_rand_b16"} == {0.03}
    assert "Not on the grid (`--lr`, the rate of the same mask without blocks): shira_hooks rand block=16 0.03." in (tmp_path / "out2" / "RESULTS.md").read_text()


def test_lm_option_scores_equal_full_sequence_scoring():
    sys.path[:0] = [str(QUALITY), str(ROOT)]
    import methods
    import tasks

    backend = methods.CausalLM(tiny=True)
    model = backend.model(None, 0).eval()
    task = tasks.split("intent", tasks.synthetic("intent"), test=8, val=4)
    for row in task.test:
        batch = tasks.lm_inputs(backend.tokenizer, [row], backend.max_length, every_option=True)
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        targets = batch["labels"][:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        full = (logp * (targets != -100)).sum(1)
        torch.testing.assert_close(backend.option_scores(model, row), full, atol=1e-5, rtol=0)
