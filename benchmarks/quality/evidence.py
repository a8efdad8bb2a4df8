"""What the quality report reads out of one model's part of ``results.json``: the cells and fusion rows at
the chosen rates, their accuracies per seed, and their per-example test outcomes as arrays for ``stats``.

Outcome tables map seed -> one int8 array per task (in ``r["tasks"]`` order), and hold only the seeds with
outcomes for every task; ``kind`` is "single" (each task's own adapter), "fused" (the task adapters summed
into one backbone) or "drop" (single minus fused, example by example: -1, 0 or 1).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np
import stats

KINDS = ("single", "fused", "drop")


def tested_cells(r: dict, method: str, task: str) -> list[dict]:
    """The tested cells of (method, task) at the chosen learning rate (baselines: all), one per seed."""
    if method in ("head", "zero_shot"):
        return [c for c in r["cells"] if c["method"] == method and c["task"] == task and "test" in c]
    lr = r["chosen_lr"].get(method)
    return [c for c in r["cells"] if c["method"] == method and c["task"] == task and c["lr"] == lr and "test" in c]


def whole_seeds(r: dict, method: str) -> set[int]:
    """The seeds of ``method`` tested on every task. A run stopped (or still going) in the middle of a seed
    leaves some tasks tested at that seed; the report shows whole seeds only, so that each row's task columns
    and its average cover the same seeds."""
    return set.intersection(*({c["seed"] for c in tested_cells(r, method, t)} for t in r["tasks"]))


def final_cells(r: dict, method: str, task: str) -> list[dict]:
    """The tested cells of (method, task) at the chosen learning rate, one per whole seed (baselines: all)."""
    cells = tested_cells(r, method, task)
    if method in ("head", "zero_shot"):
        return cells
    seeds = whole_seeds(r, method)
    return [c for c in cells if c["seed"] in seeds]


def per_seed_average(r: dict, method: str, seeds: set[int] | None = None) -> list[float]:
    """Test accuracy averaged over tasks, per seed that has every task (of ``seeds`` only, if given)."""
    by_seed: dict[int, list[float]] = {}
    for t in r["tasks"]:
        for c in final_cells(r, method, t):
            if seeds is None or c["seed"] in seeds:
                by_seed.setdefault(c["seed"], []).append(c["test"])
    return [statistics.fmean(v) for v in by_seed.values() if len(v) == len(r["tasks"])]


def fused(r: dict, method: str) -> list[dict]:
    return [f for f in r["fusion"] if f["method"] == method]


def fused_average(r: dict, method: str, seeds: set[int] | None = None) -> list[float]:
    """Fused accuracy averaged over tasks, per fused seed (of ``seeds`` only, if given)."""
    return [statistics.fmean(f["accuracy"].values()) for f in fused(r, method) if seeds is None or f["seed"] in seeds]


def drops(r: dict, method: str) -> list[float]:
    """Per seed: single-adapter average minus fused average."""
    out = []
    for f in fused(r, method):
        singles = [c["test"] for t in r["tasks"] for c in final_cells(r, method, t) if c["seed"] == f["seed"]]
        if len(singles) == len(r["tasks"]):
            out.append(statistics.fmean(singles) - statistics.fmean(f["accuracy"].values()))
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(values: list[float]) -> str:
    """Mean ± seed standard deviation in percent (the mean alone for one seed); "-" for none."""
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def with_interval(values: list[float], groups: list[np.ndarray] | None) -> str:
    """``pct`` followed by the 95% bootstrap interval of the same mean when per-example outcomes back it:
    "61.3 ± 2.1 [57.9, 64.6]"."""
    if not values or not groups:
        return pct(values)
    interval = stats.bootstrap(groups)
    return f"{pct(values)} [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def outcome_table(r: dict, method: str, kind: str) -> dict[int, list[np.ndarray]]:
    """seed -> per-task outcome arrays, for the seeds with outcomes on every task (see the module docstring)."""
    tasks = list(r["tasks"])
    if kind == "drop":
        single, fusion = outcome_table(r, method, "single"), outcome_table(r, method, "fused")
        return {s: [a - b for a, b in zip(single[s], fusion[s])] for s in single if s in fusion}
    by_seed: dict[int, dict[str, np.ndarray]] = {}
    if kind == "single":
        for t in tasks:
            for c in final_cells(r, method, t):
                if "test_correct" in c:
                    by_seed.setdefault(c["seed"], {})[t] = stats.outcomes(c["test_correct"])
    elif kind == "fused":
        for f in fused(r, method):
            if "correct" in f:
                by_seed[f["seed"]] = {t: stats.outcomes(f["correct"][t]) for t in tasks if t in f["correct"]}
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return {s: [per_task[t] for t in tasks] for s, per_task in sorted(by_seed.items()) if len(per_task) == len(tasks)}


def stacked(table: dict[int, list[np.ndarray]], seeds: list[int]) -> list[np.ndarray]:
    """Per task, the (seeds, examples) array of ``seeds`` from an outcome table."""
    return [np.stack([table[s][i] for s in seeds]) for i in range(len(next(iter(table.values()))))]


def task_groups(r: dict, method: str, task: str) -> list[np.ndarray] | None:
    """The outcomes behind one task's single-adapter cell (every seed shown), or None if a seed lacks them."""
    cells = final_cells(r, method, task)
    if not cells or not all("test_correct" in c for c in cells):
        return None
    return [np.stack([stats.outcomes(c["test_correct"]) for c in cells])]


def fused_task_groups(r: dict, method: str, task: str) -> list[np.ndarray] | None:
    """The outcomes behind one task's fused cell (every seed shown), or None if a seed lacks them."""
    rows = fused(r, method)
    if not rows or not all(task in f.get("correct", {}) for f in rows):
        return None
    return [np.stack([stats.outcomes(f["correct"][task]) for f in rows])]


def average_groups(r: dict, method: str, kind: str, seeds: set[int] | None = None) -> list[np.ndarray] | None:
    """The outcomes behind a task-averaged value (single, fused or drop) over every seed it is shown for
    (single and fused: of ``seeds`` only, if given), or None if one of those seeds lacks them."""
    shown = len(
        per_seed_average(r, method, seeds)
        if kind == "single"
        else fused_average(r, method, seeds)
        if kind == "fused"
        else drops(r, method)
    )
    table = outcome_table(r, method, kind)
    if kind in ("single", "fused") and seeds is not None:
        table = {s: arrays for s, arrays in table.items() if s in seeds}
    if not shown or len(table) != shown:
        return None
    return stacked(table, list(table))


@dataclass(frozen=True)
class Comparison:
    """Two methods on the seeds both have: each one's task-averaged value there, and their paired difference."""

    first: float
    second: float
    paired: stats.Paired


def compare(r: dict, first: str, second: str, kind: str) -> tuple[Comparison | None, str]:
    """First minus second on the seeds both have (task-averaged ``kind``), by ``stats.paired``; (None, why)
    when per-example outcomes or common seeds are missing."""
    a, b = outcome_table(r, first, kind), outcome_table(r, second, kind)
    for method, table in ((first, a), (second, b)):
        if not table:
            return None, f"no per-example test outcomes for {method} in results.json"
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None, f"no seed with outcomes for both ({first}: seeds {sorted(a)}, {second}: seeds {sorted(b)})"
    first_groups, second_groups = stacked(a, seeds), stacked(b, seeds)
    return Comparison(
        stats.statistic(first_groups), stats.statistic(second_groups), stats.paired(first_groups, second_groups)
    ), ""
