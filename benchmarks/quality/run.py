"""Quality benchmark: SHiRA (shira_hooks, 5 masks; PEFT SHiRA) vs PEFT LoRA on real pretrained models,
single adapters and multi-adapter fusion by naive addition (the paper's Tables 2-4, at small scale).

    python benchmarks/quality/run.py --pilot          # once: which tasks the models can learn
    python benchmarks/quality/run.py --lazy-test      # grid, seeds, test, fusion, cost, report (resumable)
    benchmarks/quality/long_run.sh                    # the same without cost, in the order of issue 25, logged
    python benchmarks/quality/run.py --quick          # tiny models and tasks, the whole pipeline (tests)
    python benchmarks/quality/run.py --stages report --switch-times benchmarks/switch_model.json   # once: block-size switch times

Stages (each skips what its cache already holds):
1. ``grid``: seed 0. Every (method, learning rate) on the first task; each method's rate is the one with
   the best validation accuracy there, and the other tasks train at that rate. On the LM the block
   variants (``shira_<mask>_b<B>``) have no grid: they train at the rate their mask chose without blocks.
2. ``seeds``: seeds 1.. at the chosen rate (``--encoder-seeds``, ``--lm-seeds``, 3 each; ``--method-seeds``
   gives single methods fewer or more, e.g. the block variants 1 seed first).
   ``test``: with ``--lazy-test`` the cells above measure validation accuracy only; this stage then
   tests every cell at the chosen rates, whatever its seed, on a fresh base model with the saved adapter applied.
3. ``fusion``: the task adapters of one method and seed summed into one backbone (``shira_hooks.fuse``
   for sparse adapters, the sum of the merged deltas for LoRA and DoRA), each task tested with its own
   head; every seed whose task adapters are all trained.
4. ``cost``: each method trains a few steps in its own process: median step time and peak RSS.
5. ``report``: ``benchmarks/quality/RESULTS.md`` and plots, from ``results.json`` only: cells with seed spread and
   bootstrap intervals, the paper's claims by paired tests, the block-size table and ``pareto.png``.

``--switch-times PATH`` copies the float32 switch times per block size of a ``benchmarks/switch_model.py
--blocks 1 4 8 16 --json PATH`` run (with its command and machine) into ``results.json`` as ``switch_times``;
later runs writing the same ``results.json`` keep that section.

Every cell records its validation and test outcome per example (``val_correct``, ``test_correct``: one
character per row in split order, "1" right, "0" wrong), its step times and wall time; fusion rows
record the outcomes per task (``correct``). ``results.json`` gathers them (per-step times summarised).

Finished cells live in ``~/.cache/shira_hooks/quality/`` (or ``--cache``), keyed by the settings.
``--restore RESULTS_JSON`` fills an empty cache from a committed results.json (a fresh machine resuming a long
run): the finished cells and fusion rows come back without their adapters, so a fusion still to run trains its
restored cells again and records whether they reproduce (``retrained`` in the cell). With ``--methods``, the
test and fusion stages too take only those methods, so that processes sharing a cache share the work.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

warnings.filterwarnings("ignore", message=".*past_key_values.*is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1])]  # this folder, then the checkout (run without installing)
import blocks  # noqa: E402

from shira_hooks.masks import CALIBRATED_KINDS  # noqa: E402
from shira_hooks.tools import atomic_write, command_line, machine  # noqa: E402

import methods as M  # noqa: E402
import tasks as T  # noqa: E402

CACHE = Path(os.environ.get("SHIRA_HOOKS_CACHE", Path.home() / ".cache" / "shira_hooks")) / "quality"
# The pilot's candidates per model (``--pilot``); the tasks kept are the three whose LoRA validation
# accuracy clears the baseline and the majority answer by the widest margin, a tie going to the wider
# margin over the majority alone (pilot.json; the table in RESULTS.md).
CANDIDATES = {
    "encoder": [
        "intent_recognition",
        "strategyqa",
        "winowhy",
        "epistemic_reasoning",
        "sports_understanding",
        "navigate",
    ],
    "lm": [
        "intent_recognition",
        "navigate",
        "winowhy",
        "epistemic_reasoning",
        "sports_understanding",
        "metaphor_boolean",
        "hyperbaton",
        "reasoning_about_colored_objects",
        "language_identification",
        "social_support",
    ],
}
DEFAULT_TASKS = {
    "encoder": ["intent_recognition", "navigate", "winowhy"],
    "lm": ["intent_recognition", "winowhy", "reasoning_about_colored_objects"],
}
QUICK_TASKS = ["intent", "sentiment", "topic"]
GRID = {"encoder": [3e-4, 1e-3, 3e-3], "lm": [3e-4, 1e-3, 3e-3]}
# The LM's block variants train at the rate of their mask without blocks (an LM grid costs 3 cells a method).
BLOCK_RATE_FROM_UNBLOCKED = {"encoder": False, "lm": True}
SETTINGS = {  # per backend: steps, warm-up share, head learning rate, test / validation / fewest training rows (tasks.split)
    "encoder": dict(steps=100, warmup=0.1, head_lr=2e-3, test=300, val=150, train=300, calibration_batches=4),
    "lm": dict(steps=48, warmup=0.1, head_lr=0.0, test=300, val=40, train=300, calibration_batches=4),
}
STAGES = ["grid", "seeds", "test", "fusion", "cost", "report"]
QUICK = dict(steps=4, warmup=0.25, head_lr=1e-2, test=12, val=8, train=24, calibration_batches=2)
QUICK_SEEDS = 2  # --quick trains at most 2 seeds


# ---------------------------------------------------------------------------------------- setup
class Run:
    """One backend with its settings, tasks and cache folder."""

    def __init__(self, kind: str, args):
        self.kind, self.quick, self.lazy_test = kind, args.quick, args.lazy_test
        self.settings = dict(QUICK if args.quick else SETTINGS[kind], sparsity=args.sparsity)
        self.backend = (M.Encoder if kind == "encoder" else M.CausalLM)(tiny=args.quick)
        self.grid = [1e-2, 3e-2] if args.quick else GRID[kind]
        self.methods = [
            m for m in args.methods or M.METHODS if m in M.METHODS
        ]  # the methods the training stages train (--methods)
        # the baseline trains unless --methods is given without it (its cells then come from --merge)
        self.train_baseline = not args.methods or baseline_of_kind(kind) in args.methods
        self.fixed_lr = dict(args.lr or [])  # --lr METHOD=RATE: no grid for that method
        self.seeds = self.seed_list(args.encoder_seeds if kind == "encoder" else args.lm_seeds)
        self.method_seeds = {m: self.seed_list(n) for m, n in (args.method_seeds or [])}  # --method-seeds METHOD=N
        names = args.tasks or (QUICK_TASKS if args.quick else DEFAULT_TASKS[kind])
        self.tasks = {n: self.load_task(n) for n in names}
        key = json.dumps(
            {
                "kind": kind,
                "quick": self.quick,
                **self.settings,
                "bs": self.backend.batch_size,
                "len": self.backend.max_length,
            },
            sort_keys=True,
        )
        self.folder = (
            Path(args.cache or CACHE)
            / f"{kind}{'-quick' if self.quick else ''}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
        )

    def seed_list(self, count: int) -> list[int]:
        return list(range(min(QUICK_SEEDS, count) if self.quick else count))

    def seeds_of(self, method: str) -> list[int]:
        """The seeds ``method`` trains at in this run (the baselines: the model's seeds)."""
        return self.method_seeds.get(method, self.seeds)

    def load_task(self, name: str) -> T.Task:
        sizes = {k: self.settings[k] for k in ("test", "val", "train")}
        if self.quick:
            return T.split(name, T.synthetic(name), **sizes)
        return T.load(name, **sizes)

    def cell_dir(self, task: str, method: str, lr: float, seed: int) -> Path:
        return self.folder / task / method / f"lr{lr:g}-seed{seed}"


def baseline_of_kind(kind: str) -> str:
    return "head" if kind == "encoder" else "zero_shot"


def baseline_of(run: Run) -> str:
    return baseline_of_kind(run.kind)


# ------------------------------------------------------------------------------------- training
def accuracy(correct: str) -> float:
    """The share of "1" in a per-example record."""
    return correct.count("1") / len(correct)


def write_json(path: Path, record) -> None:
    """One compact line of JSON, written atomically (a stopped run never leaves half a cell)."""
    atomic_write(path, json.dumps(record, separators=(",", ":")).encode())


def linear_schedule(steps: int, warmup: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (steps - step) / max(1, steps - warmup))

    return factor


def train_cell(
    run: Run, task: T.Task, method: str, lr: float, seed: int, *, evaluate: bool = True, steps: int | None = None
) -> tuple[dict, object]:
    """Train one (task, method, lr, seed); returns its record and the Prepared model."""
    backend, s = run.backend, run.settings
    steps = s["steps"] if steps is None else steps
    model = backend.model(task, seed)
    calibration = None
    if method.startswith("shira_") and M.shira_mask(method)[0] in CALIBRATED_KINDS:
        rows = T.batches(task.train, backend.batch_size, s["calibration_batches"], seed=10_000 + seed)
        calibration = [backend.batch(task, r) for r in rows]
    # Independently trained adapters: the k-th task's random masks (shira rand/struct, PEFT SHiRA) and
    # LoRA initialisation are drawn from seed + 1000 k, so different tasks do not share a random mask.
    mask_seed = seed + 1000 * list(run.tasks).index(task.name) if task.name in run.tasks else seed
    prepared = M.prepare(method, backend, model, sparsity=s["sparsity"], seed=mask_seed, calibration=calibration)
    model = prepared.model
    groups = [{"params": prepared.adapter_params, "lr": lr}] if prepared.adapter_params else []
    if prepared.head_params:
        groups.append({"params": prepared.head_params, "lr": s["head_lr"]})
    record = {"task": task.name, "method": method, "lr": lr, "seed": seed, "entries": prepared.entries, "steps": 0}
    times, losses = [], []
    if groups and steps:
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_schedule(steps, max(1, round(s["warmup"] * steps)))
        )
        model.train()
        # disable=None: a bar on a terminal, none in a log
        bar = tqdm(
            T.batches(task.train, backend.batch_size, steps, seed=seed),
            total=steps,
            desc=f"{task.name} {method} lr={lr:g} seed={seed}",
            leave=False,
            disable=True if run.quick else None,
        )
        for rows in bar:
            batch = backend.batch(task, rows)
            started = time.perf_counter()
            loss = backend.loss(model, batch)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        record.update(
            steps=steps,
            step_median_s=statistics.median(times),
            step_min_s=min(times),
            step_max_s=max(times),
            train_s=sum(times),
            step_times=[round(t, 4) for t in times],
            loss_first=statistics.fmean(losses[:10]),
            loss_last=statistics.fmean(losses[-10:]),
        )
    if prepared.handle is not None:
        record["outside_mask_changes"] = len(prepared.handle.verify())
    if evaluate:
        record["val_correct"] = backend.correct(model, task, task.val)
        record["val"] = accuracy(record["val_correct"])
        if not run.lazy_test:
            record["test_correct"] = backend.correct(model, task, task.test)
            record["test"] = accuracy(record["test_correct"])
    return record, prepared


def cell(run: Run, task: T.Task, method: str, lr: float, seed: int) -> dict:
    """The cached record of a cell, training it first if needed (adapter + head saved next to it)."""
    folder = run.cell_dir(task.name, method, lr, seed)
    done = folder / "cell.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    record = train_and_save(run, task, method, lr, seed, folder)
    record.update(
        wall_s=round(time.perf_counter() - started, 2), threads=torch.get_num_threads()
    )  # training, evaluation and saving
    write_json(done, record)
    print(
        f"  {run.kind:7} {task.name:22} {method:14} lr={lr:<7g} seed={seed}  val {record['val']:.3f}  test {record.get('test', float('nan')):.3f}  "
        f"entries {record['entries']:,}  {record.get('step_median_s', 0):.3f} s/step  {record['wall_s']:.0f} s",
        flush=True,
    )
    return record


def train_and_save(run: Run, task: T.Task, method: str, lr: float, seed: int, folder: Path) -> dict:
    """Train one cell (``train_cell``), save its adapter and head (if any) in ``folder`` and detach its handle;
    returns its record."""
    record, prepared = train_cell(run, task, method, lr, seed)
    if method not in ("head", "zero_shot"):
        M.save_adapter(prepared, method, folder / "adapter.safetensors")
    head = M.head_state(run.backend, prepared.model)
    if head:
        from safetensors.torch import save

        atomic_write(folder / "head.safetensors", save(head))
    if prepared.handle is not None:
        prepared.handle.detach()
    return record


def retrain_adapter(run: Run, task: T.Task, method: str, lr: float, seed: int) -> None:
    """A cell restored from a results.json (``--restore``) keeps its record but not its adapter: fusion trains it
    again, at the same settings and seeds. Whether the retrained adapter reproduces the restored one is checked on
    the validation outcomes per example, recorded in the cell as ``retrained`` (and printed)."""
    folder = run.cell_dir(task.name, method, lr, seed)
    if (folder / "adapter.safetensors").exists():
        return
    record = json.loads((folder / "cell.json").read_text())
    started = time.perf_counter()
    again = train_and_save(run, task, method, lr, seed, folder)
    record["retrained"] = {
        "val_correct_equal": again["val_correct"] == record["val_correct"],
        "val": again["val"],
        "wall_s": round(time.perf_counter() - started, 2),
        "threads": torch.get_num_threads(),
    }
    write_json(folder / "cell.json", record)
    print(
        f"  {run.kind:7} {task.name:22} {method:14} lr={lr:<7g} seed={seed}  adapter trained again for fusion: val "
        f"{again['val']:.3f} (restored {record['val']:.3f}; per example {'equal' if record['retrained']['val_correct_equal'] else 'DIFFERENT'})  "
        f"{record['retrained']['wall_s']:.0f} s",
        flush=True,
    )


def restore(run: Run, results: dict, source: Path) -> None:
    """Fill an empty or partial cache from a results.json of the same settings (a fresh machine resuming a
    committed run): every finished cell's record and every fusion row that the cache lacks. A cell at its
    method's chosen rate without a test result is left out, so that it trains again: its adapter, needed
    for the test, is not in results.json. Restored cells have no adapters; fusion trains the ones it needs
    again (``retrain_adapter``)."""
    saved = results["models"].get(run.kind)
    if saved is None:
        return
    if saved["cache_folder"] != run.folder.name:
        raise SystemExit(
            f"--restore {source}: its {run.kind} cells were run with other settings (cache folder {saved['cache_folder']}, "
            f"this run's {run.folder.name}); restore from a results.json of the same settings"
        )
    cells = 0
    for record in saved["cells"]:
        if record["lr"] == saved["chosen_lr"].get(record["method"]) and "test" not in record:
            continue
        done = run.cell_dir(record["task"], record["method"], record["lr"], record["seed"]) / "cell.json"
        if not done.exists():
            done.parent.mkdir(parents=True, exist_ok=True)
            write_json(done, record)
            cells += 1
    with fusion_file(run) as rows:  # what is missing is decided under the lock that adds it
        have = {(r["method"], r["seed"]) for r in rows}
        added = [row for row in saved["fusion"] if (row["method"], row["seed"]) not in have]
        rows.extend(added)
    print(f"restored from {source}: {cells} {run.kind} cells, {len(added)} fusion rows", flush=True)


def ran_on(machine: dict) -> list[str]:
    """The machines that the cells of a results.json with this ``machine`` record ran on, each once, oldest first:
    the ones its own restored cells ran on (``--restore`` chains), then its own. One line per machine however often
    a run is restored and rendered again."""
    own = ", ".join(f"{k} {machine[k]}" for k in ("cpu", "torch", "transformers", "peft") if k in machine)
    if "restored cells ran on" in machine:
        earlier = machine["restored cells ran on"].split("; ")
    else:  # a results.json from before this record: its note nested each restore inside the last, newest outermost
        earlier = re.findall(r"run with (.*?peft \S+?)(?=[;)])", machine.get("cells restored from", ""))[::-1]
    return list(dict.fromkeys([*earlier, own]))


def stage_grid(run: Run) -> None:
    """Seed 0: the baseline on every task; the learning-rate grid on the first task; the chosen rate elsewhere."""
    names = list(run.tasks)
    for name in names if run.train_baseline else []:
        cell(run, run.tasks[name], baseline_of(run), run.settings["head_lr"], 0)
    for method in run.methods:
        for lr in grid_of(run, method):
            cell(run, run.tasks[names[0]], method, lr, 0)
    for name in names[1:]:
        for method in run.methods:
            cell(run, run.tasks[name], method, chosen_lr(run, method), 0)


def rate_source(run: Run, method: str) -> str | None:
    """The method whose chosen rate ``method`` takes (an LM block variant: its mask without blocks), else None."""
    if method in run.fixed_lr or not BLOCK_RATE_FROM_UNBLOCKED[run.kind]:
        return None
    return M.unblocked(method)


def grid_of(run: Run, method: str) -> list[float]:
    """The rates ``method`` trains at on the first task at seed 0."""
    if method in run.fixed_lr:
        return [run.fixed_lr[method]]
    source = rate_source(run, method)
    if source is None:
        return run.grid
    lr = chosen_lr(run, source)
    if lr is None:
        raise SystemExit(
            f"{method} trains at the learning rate {source} chose on the grid (on the {run.kind}, block variants have no grid "
            f"of their own), and the grid of {source} on {next(iter(run.tasks))} is not finished: train {source} first "
            f"(--methods {source} {method}), or give the rate with --lr {method}=RATE"
        )
    return [lr]


def chosen_lr(run: Run, method: str) -> float | None:
    """The grid rate with the best validation accuracy on the first task at seed 0 (ties: the smaller
    rate); None while the grid is unfinished. A rate given with --lr is used as it is; an LM block
    variant takes the rate of its mask without blocks."""
    if method in run.fixed_lr:
        return run.fixed_lr[method]
    if (source := rate_source(run, method)) is not None:
        return chosen_lr(run, source)
    first = next(iter(run.tasks))
    paths = [run.cell_dir(first, method, lr, 0) / "cell.json" for lr in run.grid]
    if not all(p.exists() for p in paths):
        return None
    return -max((json.loads(p.read_text())["val"], -lr) for p, lr in zip(paths, run.grid))[1]


def stage_seeds(run: Run) -> None:
    """Seeds 1.. at the chosen rates, one seed after the other (a stopped run leaves whole seeds). The LM's
    baseline (zero-shot) has no seed."""
    for seed in range(1, max(len(run.seeds_of(m)) for m in [*run.methods, baseline_of(run)])):
        for task in run.tasks.values():
            if run.kind == "encoder" and run.train_baseline and seed in run.seeds:
                cell(run, task, baseline_of(run), run.settings["head_lr"], seed)
            for method in run.methods:
                if seed in run.seeds_of(method):
                    cell(run, task, method, chosen_lr(run, method), seed)


def trained_seeds(run: Run, task: str, method: str, lr: float | None) -> list[int]:
    """The seeds of the finished cells of (task, method) at rate ``lr``, whatever this run's seed settings."""
    if lr is None:
        return []
    prefix = run.cell_dir(task, method, lr, 0).name.removesuffix("0")  # "lr<rate>-seed"
    folders = (run.folder / task / method).glob(prefix + "*")
    return sorted(
        int(f.name.removeprefix(prefix))
        for f in folders
        if f.name.removeprefix(prefix).isdigit() and (f / "cell.json").exists()
    )


# --------------------------------------------------------------------------------------- fusion
@torch.no_grad()
def with_adapters(run: Run, method: str, folders: list[Path], seed: int):
    """A fresh base model holding the sum of the adapters saved in ``folders`` (LoRA and DoRA: the sum of
    their merged deltas, ``M.LowRank.delta``; sparse adapters: ``shira_hooks.fuse`` + ``apply``); returns
    (model, adapters, {weight: (now, base)})."""
    import shira_hooks

    adapters = [M.load_adapter(f / "adapter.safetensors") for f in folders]
    model = run.backend.model(next(iter(run.tasks.values())), seed)
    root = run.backend.root(model)
    targets = {n + ".weight": m.weight for n, m in M.target_linears(root, run.backend.targets).items()}
    weights = {n: (w, w.detach().clone()) for n, w in targets.items()}
    if method in ("lora", "dora"):
        for n, (w, base) in weights.items():
            w.add_(sum(a[n].delta(base) for a in adapters))
    else:
        shira_hooks.apply(root, shira_hooks.fuse(adapters, base=root) if len(adapters) > 1 else adapters[0])
    return model, adapters, weights


def evaluate(run: Run, model, task: T.Task, folder: Path) -> str:
    """Per-example test outcomes of ``model`` on ``task`` (``Backend.correct``), with the task's own head
    (encoder) from ``folder``."""
    from safetensors.torch import load_file

    if run.backend.kind == "encoder":
        model.head = torch.nn.Linear(model.head.in_features, len(task.labels) if task.labels else 1)
        model.head.load_state_dict(load_file(folder / "head.safetensors"))
    return run.backend.correct(model, task, task.test)


def stage_test(run: Run) -> None:
    """Test accuracy of the cells at the chosen rates that lack it (``--lazy-test`` grid cells), measured on
    a fresh base model with the saved adapter applied: what a user who loads the adapter gets. Every
    finished seed is tested, whatever this run's seed settings; with ``--methods``, of those methods only."""
    for name, task in run.tasks.items():
        for method in [baseline_of(run)] * run.train_baseline + run.methods:
            lr = run.settings["head_lr"] if method == baseline_of(run) else chosen_lr(run, method)
            for seed in trained_seeds(run, name, method, lr):
                folder = run.cell_dir(name, method, lr, seed)
                record = json.loads((folder / "cell.json").read_text())
                if "test" in record:
                    continue
                started = time.perf_counter()
                if method == baseline_of(run):
                    model = run.backend.model(task, seed)  # the head, if any, comes from the folder
                else:
                    model, _, _ = with_adapters(run, method, [folder], seed)
                record["test_correct"] = evaluate(run, model, task, folder)
                record["test"] = accuracy(record["test_correct"])
                record["test_from"] = "fresh base model" + (
                    "" if method == baseline_of(run) else " with the saved adapter applied"
                )
                record["test_wall_s"] = round(time.perf_counter() - started, 2)
                write_json(folder / "cell.json", record)
                print(
                    f"  {run.kind:7} {name:22} {method:14} lr={lr:<7g} seed={seed}  test {record['test']:.3f} ({record['test_from']})  "
                    f"{record['test_wall_s']:.0f} s",
                    flush=True,
                )


@torch.no_grad()
def fused_accuracy(run: Run, method: str, seed: int) -> dict:
    """Accuracy and per-example outcomes of every task on one backbone holding the sum of the task adapters of ``method``."""
    started = time.perf_counter()
    folders = {n: run.cell_dir(n, method, chosen_lr(run, method), seed) for n in run.tasks}
    model, adapters, weights = with_adapters(run, method, list(folders.values()), seed)
    if method in ("lora", "dora"):
        overlaps = low_rank_overlap(adapters, {n: base for n, (_, base) in weights.items()})
        entries = {t: sum(part.numel for part in adapter.values()) for t, adapter in zip(run.tasks, adapters)}
    else:
        overlaps = sparse_overlap(adapters)
        entries = {t: adapter.num_entries for t, adapter in zip(run.tasks, adapters)}
    changed = sum(int((now != base).sum()) for now, base in weights.values())
    total = sum(now.numel() for now, _ in weights.values())
    correct = {n: evaluate(run, model, task, folders[n]) for n, task in run.tasks.items()}
    all_params = sum(p.numel() for p in run.backend.root(model).parameters())
    return {
        "method": method,
        "seed": seed,
        "accuracy": {n: accuracy(c) for n, c in correct.items()},
        "correct": correct,
        "changed": changed,
        "target_weights": total,
        "all_weights": all_params,
        "entries": entries,
        **overlaps,
        "wall_s": round(time.perf_counter() - started, 2),
    }


def sparse_overlap(adapters) -> dict:
    import shira_hooks

    shared, cosines = [], []
    for i in range(len(adapters)):
        for j in range(i + 1, len(adapters)):
            o = shira_hooks.overlap(adapters[i], adapters[j])
            shared.append(o.shared_fraction)
            cosines.append(statistics.fmean(m.product_cosine for m in o.modules.values()))
    return {"shared_fraction": statistics.fmean(shared), "product_cosine": statistics.fmean(cosines)}


def low_rank_overlap(adapters: list[dict], bases: dict[str, torch.Tensor]) -> dict:
    """LoRA and DoRA deltas are dense (every entry shared); the paper's ||dW1^T dW2|| / (||dW1|| ||dW2||) per weight."""
    cosines = []
    for i in range(len(adapters)):
        for j in range(i + 1, len(adapters)):
            per = []
            for n, part in adapters[i].items():
                d1, d2 = part.delta(bases[n]), adapters[j][n].delta(bases[n])
                per.append(float((d1.T @ d2).norm() / (d1.norm() * d2.norm()).clamp_min(1e-30)))
            cosines.append(statistics.fmean(per))
    return {"shared_fraction": 1.0, "product_cosine": statistics.fmean(cosines)}


@contextlib.contextmanager
def fusion_file(run: Run):
    """fusion.json's rows, read under its lock and written back (if changed) before the lock is released, so that
    processes sharing the cache (``--methods``, ``--restore``) never drop or duplicate each other's rows."""
    path = run.folder / "fusion.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(run.folder / "fusion.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text()) if path.exists() else []
        before = list(rows)
        yield rows
        if rows != before:
            write_json(path, rows)


def fusion_rows(run: Run, add: list[dict] | None = None) -> list[dict]:
    """The fusion rows in the cache, with the rows ``add`` (each replacing any of its method and seed) when given."""
    with fusion_file(run) as rows:
        if add:
            keys = {(r["method"], r["seed"]) for r in add}
            rows[:] = [r for r in rows if (r["method"], r["seed"]) not in keys] + add
        return list(rows)


def stage_fusion(run: Run) -> list[dict]:
    """One fusion row per (method, seed) whose task adapters are all trained, whatever this run's seed settings;
    with ``--methods``, of those methods only. A cell restored from a results.json (``--restore``) has no saved
    adapter: it is trained again first (``retrain_adapter``)."""
    have = {(r["method"], r["seed"]) for r in fusion_rows(run)}
    for method in run.methods:
        lr = chosen_lr(run, method)
        seeds = set.intersection(*(set(trained_seeds(run, n, method, lr)) for n in run.tasks))
        for seed in sorted(seeds - {s for m, s in have if m == method}):
            for task in run.tasks.values():
                retrain_adapter(run, task, method, lr, seed)
            row = fused_accuracy(run, method, seed)
            fusion_rows(run, add=[row])
            print(
                f"  {run.kind:7} fused {method:14} seed={seed}  "
                + "  ".join(f"{t} {a:.3f}" for t, a in row["accuracy"].items())
                + f"  changed {100 * row['changed'] / row['target_weights']:.2f}% of target weights  {row['wall_s']:.0f} s",
                flush=True,
            )
    return fusion_rows(run)


# ----------------------------------------------------------------------------------------- cost
def stage_cost(run: Run, args) -> list[dict]:
    """Each method trains ``cost_steps`` steps on the first task in its own process (peak RSS is per process)."""
    path = run.folder / "cost.json"
    if path.exists():
        return json.loads(path.read_text())
    rows = []
    for method in ["shira_rand"] if run.quick else M.METHODS:  # --quick: one, to keep it short
        command = [
            sys.executable,
            __file__,
            "--cost-worker",
            method,
            "--models",
            run.kind,
            "--sparsity",
            str(args.sparsity),
            "--cache",
            str(args.cache or CACHE),
        ]
        command += ["--quick"] if run.quick else []
        command += ["--tasks", *run.tasks]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"cost of {method} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"  {run.kind:7} cost {method:12} {rows[-1]['step_median_s']:.3f} s/step  peak RSS {rows[-1]['peak_rss_mb']:,.0f} MB",
            flush=True,
        )
    atomic_write(path, json.dumps(rows, indent=1).encode())
    return rows


def cost_worker(run: Run, method: str) -> dict:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    task = next(iter(run.tasks.values()))
    warmup, steps = (1, 3) if run.quick else (3, 12)
    record, _ = train_cell(run, task, method, run.grid[0], 0, evaluate=False, steps=warmup + steps)
    record["step_median_s"] = statistics.median(record["step_times"][warmup:])  # the first steps build caches
    record["steps"] = steps
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    record["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return record


# ---------------------------------------------------------------------------------------- pilot
def stage_pilot(run: Run, names: list[str]) -> dict:
    """Which candidate tasks does the model learn? The baseline and LoRA at the middle rate, seed 0:
    {"lr": that rate, "rows": one row per task}."""
    rows = []
    run.folder = run.folder / "pilot"  # its own cells: the pilot draws no per-task mask seeds
    lr = run.grid[len(run.grid) // 2]
    for name in names:
        task = run.load_task(name)
        row = {"task": name, "sizes": task.sizes, "majority": task.majority()}
        for method in [baseline_of(run), "lora"]:
            record = cell(run, task, method, run.settings["head_lr"] if method == baseline_of(run) else lr, 0)
            row[method] = record["val"]
        rows.append(row)
    return {"lr": lr, "rows": rows}


# -------------------------------------------------------------------------------------- collect
def collect(run: Run) -> dict:
    """Everything the report needs, from the cache: every finished cell (its per-step times summarised by
    median, min and max), the fusion and cost rows, the rates, the split of each task."""
    cells = []
    for name in run.tasks:
        for method in [baseline_of(run)] + M.METHODS:
            for path in sorted((run.folder / name / method).glob("*/cell.json")):
                cells.append({k: v for k, v in json.loads(path.read_text()).items() if k != "step_times"})
    chosen = {m: lr for m in M.METHODS if (lr := chosen_lr(run, m)) is not None}
    return {
        "model": run.backend.name,
        "settings": run.settings,
        "batch_size": run.backend.batch_size,
        "max_length": run.backend.max_length,
        "targets": run.backend.targets,
        "grid": run.grid,
        "seeds": run.seeds,
        "method_seeds": run.method_seeds,
        "chosen_lr": chosen,
        "fixed_lr": run.fixed_lr,
        "lr_from": {m: source for m in chosen if (source := rate_source(run, m)) is not None},
        "tasks": {
            n: {"sizes": t.sizes, "majority": t.majority(), "labels": t.labels, "test_digest": t.test_digest()}
            for n, t in run.tasks.items()
        },
        "cells": cells,
        "fusion": fusion_rows(run),
        "cost": json.loads((run.folder / "cost.json").read_text()) if (run.folder / "cost.json").exists() else [],
        "cache_folder": run.folder.name,  # under --cache: <model>-<hash of the settings>
    }


def merge(fresh: dict, earlier: dict, trained: set[str]) -> dict:
    """``fresh`` with everything of ``earlier`` (an older results.json) that this run did not train: the cells,
    fusion and cost rows and chosen rates of the other methods (and the baseline, unless trained), and whole
    models this run left out. Used with ``--methods`` to add methods to a finished benchmark without retraining it."""
    for kind, old in earlier["models"].items():
        new = fresh["models"].get(kind)
        if new is None:
            fresh["models"][kind] = old
            continue
        for key in ("cells", "fusion", "cost"):
            new[key] = [row for row in old[key] if row["method"] not in trained] + [
                row for row in new[key] if row["method"] in trained
            ]
        new["chosen_lr"] = {
            **{m: lr for m, lr in old["chosen_lr"].items() if m not in trained},
            **{m: lr for m, lr in new["chosen_lr"].items() if m in trained},
        }
        new["fixed_lr"] = {m: lr for m, lr in new.get("fixed_lr", {}).items() if m in trained}
    if "switch_times" in earlier:
        fresh.setdefault("switch_times", earlier["switch_times"])
    fresh["command"] = f"{earlier['command']}`, then `{fresh['command']}"
    old = earlier["machine"]
    fresh["machine"] = {
        **fresh["machine"],
        "rows merged from the earlier run": f"cpu {old.get('cpu')}, torch_threads {old.get('torch_threads')}",
    }
    return fresh


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["encoder", "lm"], choices=["encoder", "lm"])
    parser.add_argument(
        "--tasks",
        nargs="+",
        help=f"BIG-bench tasks, the first one for the learning-rate grid (default {DEFAULT_TASKS}); "
        "with --pilot, the candidates",
    )
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--pilot", action="store_true", help="run the task pilot instead (writes pilot.json)")
    parser.add_argument(
        "--lazy-test",
        action="store_true",
        help="test only the cells at the chosen rates, from their saved adapters (saves time on the LM)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=M.METHODS + ["head", "zero_shot"],
        help="train only these methods in the grid and "
        "seeds stages (to share the work between processes; default all); the baseline (head, zero_shot) only if listed",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        help="an earlier results.json: keep its cells, fusion and cost rows of the methods this "
        "run does not train (with --methods; the cost stage then runs only if asked for in --stages)",
    )
    parser.add_argument(
        "--lr",
        nargs="+",
        type=lambda text: (text.split("=")[0], float(text.split("=")[1])),
        metavar="METHOD=RATE",
        help="train METHOD at RATE instead of choosing its rate on the grid (e.g. a block variant at its unstructured mask's rate)",
    )
    parser.add_argument("--encoder-seeds", type=int, default=3)
    parser.add_argument("--lm-seeds", type=int, default=3)
    parser.add_argument(
        "--method-seeds",
        nargs="+",
        type=lambda text: (text.split("=")[0], int(text.split("=")[1])),
        metavar="METHOD=N",
        help="train METHOD at N seeds instead of --encoder-seeds / --lm-seeds (e.g. the block variants at 1 seed first); "
        "the test and fusion stages take every seed already trained",
    )
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache", type=Path, help=f"cell cache (default {CACHE})")
    parser.add_argument(
        "--out",
        type=Path,
        help="where results.json, RESULTS.md and the plots go (default: this folder; with --quick, the cache)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny models and synthetic tasks: the whole pipeline in seconds"
    )
    parser.add_argument(
        "--switch-times",
        type=Path,
        metavar="SWITCH_MODEL_JSON",
        help="copy the float32 switch time per block size of "
        "`benchmarks/switch_model.py --blocks 1 4 8 16 --json PATH` into results.json (kept by later runs) for the block-size "
        "table and pareto.png",
    )
    parser.add_argument(
        "--restore",
        type=Path,
        metavar="RESULTS_JSON",
        help="first fill the cache from this results.json (same settings): its finished cells and fusion rows, so that "
        "a fresh machine resumes a committed run; a fusion that needs a restored cell's adapter trains it again",
    )
    parser.add_argument("--cost-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for method in dict(args.lr or []) | dict(args.method_seeds or []):
        if method not in M.METHODS:
            parser.error(f"--lr / --method-seeds: unknown method {method!r}; choose from {', '.join(M.METHODS)}")
    if args.threads or args.quick:
        # --quick: one thread; the tiny models gain nothing from more, and on a loaded machine threads
        # waiting for each other made the quick pipeline 10x slower
        torch.set_num_threads(args.threads or 1)
    if args.cost_worker:
        print(json.dumps(cost_worker(Run(args.models[0], args), args.cost_worker)))
        return 0
    import peft  # noqa: F401  (its version goes into the machine line)
    import transformers  # noqa: F401

    switch_times = (
        blocks.read_switch_times(args.switch_times) if args.switch_times else None
    )  # a bad file stops the run before any work

    out = args.out or ((args.cache or CACHE) / "quick-report" if args.quick else HERE)
    out.mkdir(parents=True, exist_ok=True)
    if args.pilot:  # pilot.json keeps the other model's pilot
        path = out / "pilot.json"
        pilot = json.loads(path.read_text()) if path.exists() else {}
        for kind in args.models:
            pilot[kind] = {
                "command": command_line("python benchmarks/quality/run.py", argv),
                **stage_pilot(Run(kind, args), args.tasks or CANDIDATES[kind]),
            }
            atomic_write(path, json.dumps(pilot, indent=1).encode())
        return 0
    results = {"command": command_line("python benchmarks/quality/run.py", argv), "machine": machine(), "models": {}}
    restored = json.loads(args.restore.read_text()) if args.restore else None
    for kind in args.models:
        run = Run(kind, args)
        print(
            f"== {run.backend.name}: tasks {', '.join(f'{n} {t.sizes}' for n, t in run.tasks.items())}; cache {run.folder}",
            flush=True,
        )
        if restored is not None:
            restore(run, restored, args.restore)
        if "grid" in args.stages:
            stage_grid(run)
        if "seeds" in args.stages:
            stage_seeds(run)
        if "test" in args.stages:
            stage_test(run)
        if "fusion" in args.stages:
            stage_fusion(run)
        if "cost" in args.stages:
            stage_cost(run, args)
        results["models"][kind] = collect(run)
    if restored is not None:  # the restored cells ran elsewhere: say where, with the versions that ran them
        results["machine"]["cells restored from"] = str(args.restore)
        results["machine"]["restored cells ran on"] = "; ".join(ran_on(restored["machine"]))
    if args.merge:
        results = merge(
            results, json.loads(args.merge.read_text()), set(args.methods or M.METHODS + ["head", "zero_shot"])
        )
    earlier = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    if switch_times or "switch_times" in earlier:  # given now, else kept from the results.json this run replaces
        results["switch_times"] = switch_times or earlier["switch_times"]
        print(
            f"switch times per block size from {results['switch_times']['source']}"
            + ("" if switch_times else " (kept from the earlier results.json)")
        )
    atomic_write(out / "results.json", json.dumps(results, indent=1).encode())
    if "report" in args.stages:
        import report

        report.write(
            results, out, pilot=json.loads((out / "pilot.json").read_text()) if (out / "pilot.json").exists() else None
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
