"""``RESULTS.md`` and the plots of the quality benchmark, generated from ``results.json`` (and ``pilot.json``).

Every number in the report comes from those files; ``discussion.md`` (hand-written, no numbers) is
appended as the discussion. The statistics are in ``stats`` (bootstrap intervals, the paired sign-flip test),
what is read out of results.json in ``evidence``, the claim lines in ``claims``, the block-size table and
``pareto.png`` in ``blocks``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import blocks
import stats
from claims import claims
from evidence import (
    average_groups,
    drops,
    final_cells,
    fused,
    fused_average,
    fused_task_groups,
    mean_std,
    pct,
    per_seed_average,
    task_groups,
    with_interval,
)

from shira_hooks.tools import atomic_write, report_header

from methods import LABELS, METHODS

HERE = Path(__file__).resolve().parent


def seed_counts(r: dict) -> str:
    """ "3", or "3; 1 for X, Y" when some methods have fewer (or more) seeds with every task tested."""
    counts: dict[int, list[str]] = {}
    for method in METHODS:
        if n := len(per_seed_average(r, method)):
            counts.setdefault(n, []).append(LABELS[method])
    if not counts:
        return str(len(r["seeds"]))
    main = max(counts, key=lambda n: len(counts[n]))
    return f"{main}" + "".join(f"; {n} for {', '.join(names)}" for n, names in sorted(counts.items()) if n != main)


def duration(seconds: float) -> str:
    """A wall time for the compute line: seconds, minutes or hours."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def compute_line(r: dict) -> str:
    """What the model's cells cost, summed from the wall times results.json keeps (training with validation,
    tests, fusion rows, adapters trained again after ``--restore``)."""
    cells, tests, fusion = r["cells"], [c for c in r["cells"] if "test_wall_s" in c], r["fusion"]
    again = [c["retrained"] for c in r["cells"] if "retrained" in c]
    threads = sorted({c.get("threads") for c in cells if c.get("threads")})
    line = (
        f"- Compute ({' or '.join(map(str, threads)) or '?'} thread{'s' if threads != [1] else ''} per process, the sum of the "
        "wall times in results.json): "
        f"{len(cells)} cells trained and validated in {duration(sum(c['wall_s'] for c in cells))}, "
        f"{len(tests)} tested in {duration(sum(c['test_wall_s'] for c in tests))}, "
        f"{len(fusion)} fusion rows in {duration(sum(f['wall_s'] for f in fusion))}"
    )
    if again:
        line += (
            f"; {len(again)} restored cells' adapters trained again for fusion in {duration(sum(a['wall_s'] for a in again))}, "
            f"{sum(a['val_correct_equal'] for a in again)} of them equal to the first training on every validation example"
        )
    return line + "."


def model_section(kind: str, r: dict, switch: dict | None = None) -> list[str]:
    tasks = list(r["tasks"])
    baseline = "head" if kind == "encoder" else "zero_shot"
    s = r["settings"]
    lines = [
        f"## {r['model']}",
        "",
        f"- Targets: every Linear layer of the transformer blocks (`{'`, `'.join(r['targets'])}`); sparsity {s['sparsity']:g} per target weight for shira_hooks.",
        f"- Training: AdamW (no weight decay), {s['steps']} steps, batch {r['batch_size']}, at most {r['max_length']} tokens, linear schedule "
        f"with {100 * s['warmup']:.0f}% warm-up"
        + (f"; the task head trains at {s['head_lr']:g} in every method" if kind == "encoder" else "")
        + (f"; grad/snip masks scored on {s['calibration_batches']} training batches."),
        f"- Learning-rate grid {', '.join(f'{lr:g}' for lr in r['grid'])} on `{tasks[0]}` (seed 0, best validation accuracy); chosen: "
        + ", ".join(
            f"{LABELS[m]} {lr:g}"
            for m, lr in r["chosen_lr"].items()
            if m not in r.get("fixed_lr", {}) and m not in r.get("lr_from", {})
        )
        + "."
        + (
            " Not on the grid (`--lr`, the rate of the same mask without blocks): "
            + ", ".join(f"{LABELS[m]} {lr:g}" for m, lr in r["fixed_lr"].items())
            + "."
            if r.get("fixed_lr")
            else ""
        )
        + (
            " Not on the grid (the rate the same mask chose without blocks): "
            + ", ".join(f"{LABELS[m]} {r['chosen_lr'][m]:g}" for m in r["lr_from"])
            + "."
            if r.get("lr_from")
            else ""
        ),
        f"- Seeds: {seed_counts(r)} (the seed sets the head, LoRA's A, the random masks, and the data order; the k-th task's masks "
        "and LoRA initialisation are drawn from seed + 1000 k, so independently trained adapters do not share a random mask).",
        "- Test accuracy: "
        + (
            "measured on a fresh base model with the saved adapter applied (LoRA: B @ A added to the weights; DoRA: its merged weights), "
            "after the learning rate was chosen (`--lazy-test`)."
            if any(c.get("test_from") for c in r["cells"])
            else "measured on the trained model at the end of training."
        ),
        compute_line(r),
        "",
        "| task | train | validation | test | options | majority / chance |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for t, info in r["tasks"].items():
        options = ", ".join(info["labels"]) if info["labels"] else "per example"
        lines.append(
            f"| {t} | {info['sizes']['train']} | {info['sizes']['val']} | {info['sizes']['test']} | {options} | {100 * info['majority']:.1f} |"
        )
    # 1. single adapters
    seeds_text = seed_counts(r)
    spread_text = (
        f", mean ± std over {seeds_text} seeds" if seeds_text.isdigit() else f", mean ± std over seeds ({seeds_text})"
    )
    lines += [
        "",
        "### 1. Single adapters: test accuracy (%)" + (spread_text if len(r["seeds"]) > 1 else "") + " [95% interval]",
        "",
        f"Intervals: {stats.BOOTSTRAP_TEXT}; they cover the choice of test examples, the ± the spread of training runs. "
        "A cell without an interval has no per-example outcomes in results.json.",
        "",
        "| method | trainable entries | " + " | ".join(tasks) + " | average |",
        "|---|---:|" + "---:|" * (len(tasks) + 1),
    ]
    lines.append(
        "| majority / chance | - | "
        + " | ".join(f"{100 * r['tasks'][t]['majority']:.1f}" for t in tasks)
        + " | "
        + f"{100 * statistics.fmean(r['tasks'][t]['majority'] for t in tasks):.1f} |"
    )
    for method in [baseline] + METHODS:
        entries = sorted({c["entries"] for t in tasks for c in final_cells(r, method, t)})
        if (
            not entries and method != baseline
        ):  # a method this model was not run with (e.g. the block variants on the LM)
            continue
        lines.append(
            f"| {LABELS[method]} | {'/'.join(f'{e:,}' for e in entries)} | "
            + " | ".join(
                with_interval([c["test"] for c in final_cells(r, method, t)], task_groups(r, method, t)) for t in tasks
            )
            + f" | {with_interval(per_seed_average(r, method), average_groups(r, method, 'single'))} |"
        )
    counts = {m: c["entries"] for m in ("lora", "shira_rand") for c in final_cells(r, m, tasks[0])[:1]}
    if len(counts) == 2:
        lines += [
            "",
            f"PEFT LoRA and PEFT SHiRA train {counts['lora']:,} entries, {100 * (counts['lora'] / counts['shira_rand'] - 1):+.1f}% "
            f"against shira_hooks' {counts['shira_rand']:,} (1% of every target weight; the LoRA rank is the integer closest to that budget).",
        ]
    # 2. fusion
    if r["fusion"]:
        lines += [
            "",
            "### 2. Multi-adapter fusion by naive addition (the paper's Table 4 layout): test accuracy (%)",
            "",
            f"The {len(tasks)} task adapters summed into one backbone (shira_hooks and PEFT SHiRA: `shira_hooks.fuse`; LoRA: the sum of the "
            f"{len(tasks)} B @ A products; DoRA: the sum of the {len(tasks)} merged weights' differences from the base)"
            + (", each task evaluated with its own head" if kind == "encoder" else "")
            + ". Drop = single-adapter average minus fused average, in accuracy points, averaged over seeds (its interval: the same "
            "bootstrap on the per-example single-minus-fused differences). Cells: mean ± seed std [95% interval].",
            "",
            "| method | single avg | " + " | ".join(f"fused {t}" for t in tasks) + " | fused avg | drop (points) |",
            "|---|---:|" + "---:|" * (len(tasks) + 2),
        ]
        for method in METHODS:
            rows = fused(r, method)
            if not rows:
                continue
            seeds = {f["seed"] for f in rows}  # single avg: the seeds fused so far, as the drop
            lines.append(
                f"| {LABELS[method]} | "
                f"{with_interval(per_seed_average(r, method, seeds), average_groups(r, method, 'single', seeds))} | "
                + " | ".join(
                    with_interval([f["accuracy"][t] for f in rows], fused_task_groups(r, method, t)) for t in tasks
                )
                + f" | {with_interval(fused_average(r, method), average_groups(r, method, 'fused'))} | "
                f"{with_interval(drops(r, method), average_groups(r, method, 'drop'))} |"
            )
        # 3. weights changed, overlap
        lines += [
            "",
            "### 3. Weights changed in fused mode, and overlap between the task adapters",
            "",
            "Changed: entries of the target weights that differ from the base after fusion (bit comparison). Shared: entries adapted "
            "by both of a pair of adapters, over the smaller one (`shira_hooks.overlap`; LoRA deltas are dense, so 100%). "
            "A1ᵀA2 cosine: ||ΔW1ᵀ ΔW2||_F / (||ΔW1||_F ||ΔW2||_F), the paper's interference measure, averaged over weights and pairs.",
            "",
            "| method | changed, % of target weights | changed, % of backbone parameters | shared entries, % | A1ᵀA2 cosine |",
            "|---|---:|---:|---:|---:|",
        ]
        for method in METHODS:
            rows = fused(r, method)
            if rows:
                changed = [f["changed"] / f["target_weights"] for f in rows]
                whole = [f["changed"] / f["all_weights"] for f in rows]
                lines.append(
                    f"| {LABELS[method]} | {pct(changed)} | {pct(whole)} | {pct([f['shared_fraction'] for f in rows])} | "
                    f"{statistics.fmean(f['product_cosine'] for f in rows):.4f} |"
                )
    # 4. cost
    if r["cost"]:
        lora = next((c for c in r["cost"] if c["method"] == "lora"), None)
        lines += [
            "",
            f"### 4. Training cost on `{tasks[0]}` (each method in its own process, {r['cost'][0]['steps']} steps; median step time, peak RSS)",
            "",
            "| method | trainable entries | median step s | peak RSS MB | step / LoRA | RSS / LoRA |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c in r["cost"]:
            vs_t = f"{c['step_median_s'] / lora['step_median_s']:.2f}" if lora else "-"
            vs_m = f"{c['peak_rss_mb'] / lora['peak_rss_mb']:.2f}" if lora else "-"
            lines.append(
                f"| {LABELS[c['method']]} | {c['entries']:,} | {c['step_median_s']:.3f} | {c['peak_rss_mb']:,.0f} | {vs_t} | {vs_m} |"
            )
    lines += ["", "### 5. The paper's claims, checked on this model", ""] + claims(r)
    lines += blocks.section(r, switch) + [""]
    return lines


def pilot_section(pilot: dict, results: dict) -> list[str]:
    lines = [
        "## Pilot: which tasks the models learn",
        "",
        "The baseline and PEFT LoRA at the grid's middle learning rate, seed 0, validation accuracy (%). Margin: LoRA's "
        "accuracy over the better of the baseline and the majority answer (chance for multiple choice). The three tasks with "
        "the widest margin are kept; a tie goes to the wider margin over the majority answer alone.",
        "",
    ]
    for kind, p in pilot.items():
        baseline = "head" if kind == "encoder" else "zero_shot"
        used = results["models"].get(kind, {}).get("tasks", {})
        lines += [
            f"**{kind}** (`{p['command']}`, LoRA learning rate {p['lr']:g})",
            "",
            f"| task | train/val/test | majority | {LABELS[baseline]} | PEFT LoRA | margin | used |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for row in p["rows"]:
            sizes = "/".join(str(row["sizes"][k]) for k in ("train", "val", "test"))
            margin = row["lora"] - max(row[baseline], row["majority"])
            lines.append(
                f"| {row['task']} | {sizes} | {100 * row['majority']:.1f} | {100 * row[baseline]:.1f} | {100 * row['lora']:.1f} | "
                f"{100 * margin:+.1f} | {'yes' if row['task'] in used else ''} |"
            )
        lines.append("")
    return lines


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results["models"].items())
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.2), squeeze=False)
    for ax, (_, r) in zip(axes[0], models):
        names = [m for m in METHODS if per_seed_average(r, m)]
        ax.set_title(r["model"])
        if not names:  # a model whose cells are not tested yet
            continue
        xs = range(len(names))
        singles = [[100 * v for v in per_seed_average(r, m)] for m in names]
        fuseds = [[100 * v for v in fused_average(r, m)] or [0.0] for m in names]
        for offset, values, label in (
            (-0.2, singles, "single adapter (average over tasks)"),
            (0.2, fuseds, f"{len(r['tasks'])} task adapters fused by addition"),
        ):
            ax.bar(
                [x + offset for x in xs],
                [mean_std(v)[0] for v in values],
                0.4,
                yerr=[mean_std(v)[1] for v in values],
                capsize=3,
                label=label,
            )
        low = min(min(v) for v in singles + fuseds if v != [0.0])
        ax.set_ylim(max(0, 10 * int(low // 10) - 10), 100)
        ax.set_xticks(list(xs), [LABELS[m].replace("shira_hooks ", "shira ") for m in names], rotation=30, ha="right")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out: Path, pilot: dict | None = None) -> Path:
    """RESULTS.md, quality.png and (with switch times and block variants) pareto.png in ``out``, from ``results`` only."""
    switch = results.get("switch_times")
    lines = report_header(
        "Quality: SHiRA vs LoRA on real pretrained models, single adapters and fusion",
        results["command"],
        results["machine"],
    )
    lines += [
        "Generated by `benchmarks/quality/run.py` from `results.json`; plots: `quality.png`, `pareto.png` (block size against "
        "switch time).",
        "",
    ]
    for kind, r in results["models"].items():
        lines += model_section(kind, r, switch)
    if pilot:
        lines += pilot_section(pilot, results)
    discussion = HERE / "discussion.md"
    if discussion.exists() and out.resolve() == HERE:
        lines += ["## Discussion", "", discussion.read_text().strip(), ""]
    plot(results, out / "quality.png")
    figures = [out / "quality.png"] + ([out / "pareto.png"] if blocks.pareto(results, out / "pareto.png") else [])
    path = out / "RESULTS.md"
    atomic_write(path, "\n".join(lines).encode())
    print(f"wrote {path} and {', '.join(str(f) for f in figures)}")
    return path
