"""``RESULTS.md`` and the plots of the quality benchmark, generated from ``results.json`` (and ``pilot.json``).

Every number in the report comes from those files; ``discussion.md`` (hand-written, no numbers) is
appended as the discussion.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from shira_hooks.tools import atomic_write, report_header

from methods import LABELS, METHODS

HERE = Path(__file__).resolve().parent
SHIRA = [m for m in METHODS if m.startswith("shira_")]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pct(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"


def final_cells(r: dict, method: str, task: str) -> list[dict]:
    """The tested cells of (method, task) at the chosen learning rate (baselines: all), one per seed."""
    if method in ("head", "zero_shot"):
        return [c for c in r["cells"] if c["method"] == method and c["task"] == task and "test" in c]
    lr = r["chosen_lr"].get(method)
    return [c for c in r["cells"] if c["method"] == method and c["task"] == task and c["lr"] == lr and "test" in c]


def seed_counts(r: dict) -> str:
    """"3", or "3; 1 for X, Y" when some methods have fewer (or more) seeds with every task tested."""
    counts: dict[int, list[str]] = {}
    for method in METHODS:
        if n := len(per_seed_average(r, method)):
            counts.setdefault(n, []).append(LABELS[method])
    if not counts:
        return str(len(r["seeds"]))
    main = max(counts, key=lambda n: len(counts[n]))
    return f"{main}" + "".join(f"; {n} for {', '.join(names)}" for n, names in sorted(counts.items()) if n != main)


def single(r: dict, method: str) -> dict[str, list[float]]:
    return {t: [c["test"] for c in final_cells(r, method, t)] for t in r["tasks"]}


def per_seed_average(r: dict, method: str) -> list[float]:
    """Average over tasks, per seed that has every task."""
    by_seed: dict[int, list[float]] = {}
    for t in r["tasks"]:
        for c in final_cells(r, method, t):
            by_seed.setdefault(c["seed"], []).append(c["test"])
    return [statistics.fmean(v) for v in by_seed.values() if len(v) == len(r["tasks"])]


def fused(r: dict, method: str) -> list[dict]:
    return [f for f in r["fusion"] if f["method"] == method]


def fused_average(r: dict, method: str) -> list[float]:
    return [statistics.fmean(f["accuracy"].values()) for f in fused(r, method)]


def drop(r: dict, method: str) -> float | None:
    """Mean over seeds of (single-adapter average - fused average), in accuracy points."""
    d = drops(r, method)
    return statistics.fmean(d) if d else None


def model_section(kind: str, r: dict) -> list[str]:
    tasks = list(r["tasks"])
    baseline = "head" if kind == "encoder" else "zero_shot"
    s = r["settings"]
    lines = [
        f"## {r['model']}",
        "",
        f"- Targets: every Linear layer of the transformer blocks (`{'`, `'.join(r['targets'])}`); sparsity {s['sparsity']:g} per target weight for shira_hooks.",
        f"- Training: AdamW (no weight decay), {s['steps']} steps, batch {r['batch_size']}, at most {r['max_length']} tokens, linear schedule "
        f"with {100 * s['warmup']:.0f}% warm-up" + (f"; the task head trains at {s['head_lr']:g} in every method" if kind == "encoder" else "")
        + (f"; grad/snip masks scored on {s['calibration_batches']} training batches."),
        f"- Learning-rate grid {', '.join(f'{lr:g}' for lr in r['grid'])} on `{tasks[0]}` (seed 0, best validation accuracy); chosen: "
        + ", ".join(f"{LABELS[m]} {lr:g}" for m, lr in r["chosen_lr"].items() if m not in r.get("fixed_lr", {}) and m not in r.get("lr_from", {})) + "."
        + (" Not on the grid (`--lr`, the rate of the same mask without blocks): " + ", ".join(f"{LABELS[m]} {lr:g}" for m, lr in r["fixed_lr"].items()) + "."
           if r.get("fixed_lr") else "")
        + (" Not on the grid (the rate the same mask chose without blocks): " + ", ".join(f"{LABELS[m]} {r['chosen_lr'][m]:g}" for m in r["lr_from"]) + "."
           if r.get("lr_from") else ""),
        f"- Seeds: {seed_counts(r)} (the seed sets the head, LoRA's A, the random masks, and the data order; the k-th task's masks "
        "and LoRA initialisation are drawn from seed + 1000 k, so independently trained adapters do not share a random mask).",
        "- Test accuracy: " + ("measured on a fresh base model with the saved adapter applied (LoRA: B @ A added to the weights; DoRA: its merged weights), "
                               "after the learning rate was chosen (`--lazy-test`)." if any(c.get("test_from") for c in r["cells"])
                               else "measured on the trained model at the end of training."),
        "",
        "| task | train | validation | test | options | majority / chance |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for t, info in r["tasks"].items():
        options = ", ".join(info["labels"]) if info["labels"] else "per example"
        lines.append(f"| {t} | {info['sizes']['train']} | {info['sizes']['val']} | {info['sizes']['test']} | {options} | {100 * info['majority']:.1f} |")
    # 1. single adapters
    seeds_text = seed_counts(r)
    spread_text = f", mean ± std over {seeds_text} seeds" if seeds_text.isdigit() else f", mean ± std over seeds ({seeds_text})"
    lines += ["", "### 1. Single adapters: test accuracy (%)" + (spread_text if len(r["seeds"]) > 1 else ""), "",
              "| method | trainable entries | " + " | ".join(tasks) + " | average |", "|---|---:|" + "---:|" * (len(tasks) + 1)]
    lines.append("| majority / chance | - | " + " | ".join(f"{100 * r['tasks'][t]['majority']:.1f}" for t in tasks) + " | "
                 + f"{100 * statistics.fmean(r['tasks'][t]['majority'] for t in tasks):.1f} |")
    for method in [baseline] + METHODS:
        acc = single(r, method)
        entries = sorted({c["entries"] for t in tasks for c in final_cells(r, method, t)})
        if not entries and method != baseline:  # a method this model was not run with (e.g. the block variants on the LM)
            continue
        lines.append(f"| {LABELS[method]} | {'/'.join(f'{e:,}' for e in entries)} | " + " | ".join(pct(acc[t]) for t in tasks)
                     + f" | {pct(per_seed_average(r, method))} |")
    counts = {m: c["entries"] for m in ("lora", "shira_rand") for c in final_cells(r, m, tasks[0])[:1]}
    if len(counts) == 2:
        lines += ["", f"PEFT LoRA and PEFT SHiRA train {counts['lora']:,} entries, {100 * (counts['lora'] / counts['shira_rand'] - 1):+.1f}% "
                      f"against shira_hooks' {counts['shira_rand']:,} (1% of every target weight; the LoRA rank is the integer closest to that budget)."]
    # 2. fusion
    if r["fusion"]:
        lines += ["", "### 2. Multi-adapter fusion by naive addition (the paper's Table 4 layout): test accuracy (%)", "",
                  f"The {len(tasks)} task adapters summed into one backbone (shira_hooks and PEFT SHiRA: `shira_hooks.fuse`; LoRA: the sum of the "
                  f"{len(tasks)} B @ A products; DoRA: the sum of the {len(tasks)} merged weights' differences from the base)"
                  + (", each task evaluated with its own head" if kind == "encoder" else "")
                  + ". Drop = single-adapter average minus fused average, in accuracy points, averaged over seeds.", "",
                  "| method | single avg | " + " | ".join(f"fused {t}" for t in tasks) + " | fused avg | drop (points) |", "|---|---:|" + "---:|" * (len(tasks) + 2)]
        for method in METHODS:
            rows = fused(r, method)
            if not rows:
                continue
            d = drop(r, method)
            lines.append(f"| {LABELS[method]} | {pct(per_seed_average(r, method))} | " + " | ".join(pct([f['accuracy'][t] for f in rows]) for t in tasks)
                         + f" | {pct(fused_average(r, method))} | {'-' if d is None else f'{100 * d:.1f}'} |")
        # 3. weights changed, overlap
        lines += ["", "### 3. Weights changed in fused mode, and overlap between the task adapters", "",
                  "Changed: entries of the target weights that differ from the base after fusion (bit comparison). Shared: entries adapted "
                  "by both of a pair of adapters, over the smaller one (`shira_hooks.overlap`; LoRA deltas are dense, so 100%). "
                  "A1ᵀA2 cosine: ||ΔW1ᵀ ΔW2||_F / (||ΔW1||_F ||ΔW2||_F), the paper's interference measure, averaged over weights and pairs.", "",
                  "| method | changed, % of target weights | changed, % of backbone parameters | shared entries, % | A1ᵀA2 cosine |", "|---|---:|---:|---:|---:|"]
        for method in METHODS:
            rows = fused(r, method)
            if rows:
                changed = [f["changed"] / f["target_weights"] for f in rows]
                whole = [f["changed"] / f["all_weights"] for f in rows]
                lines.append(f"| {LABELS[method]} | {pct(changed)} | {pct(whole)} | {pct([f['shared_fraction'] for f in rows])} | "
                             f"{statistics.fmean(f['product_cosine'] for f in rows):.4f} |")
    # 4. cost
    if r["cost"]:
        lora = next((c for c in r["cost"] if c["method"] == "lora"), None)
        lines += ["", f"### 4. Training cost on `{tasks[0]}` (each method in its own process, {r['cost'][0]['steps']} steps; median step time, peak RSS)", "",
                  "| method | trainable entries | median step s | peak RSS MB | step / LoRA | RSS / LoRA |", "|---|---:|---:|---:|---:|---:|"]
        for c in r["cost"]:
            vs_t = f"{c['step_median_s'] / lora['step_median_s']:.2f}" if lora else "-"
            vs_m = f"{c['peak_rss_mb'] / lora['peak_rss_mb']:.2f}" if lora else "-"
            lines.append(f"| {LABELS[c['method']]} | {c['entries']:,} | {c['step_median_s']:.3f} | {c['peak_rss_mb']:,.0f} | {vs_t} | {vs_m} |")
    lines += ["", "### 5. The paper's claims, checked on this model", ""] + claims(r) + [""]
    return lines


def verdict(diff: float, noise: float, better: str, worse: str) -> str:
    """Wording for a difference of means against the seed-to-seed spread of both (0 with one seed)."""
    if noise and abs(diff) <= noise:
        return f"within seed noise (±{100 * noise:.1f})"
    if abs(diff) < 0.0005:
        return "level"
    return (better if diff > 0 else worse) + ("" if noise else " (one seed: no noise estimate)")


def spread(a: list[float], b: list[float]) -> float:
    """sqrt(std_a^2 + std_b^2): the seed-to-seed spread of a difference of two per-seed means."""
    return (mean_std(a)[1] ** 2 + mean_std(b)[1] ** 2) ** 0.5 if len(a) > 1 and len(b) > 1 else 0.0


def drops(r: dict, method: str) -> list[float]:
    """Per seed: single-adapter average minus fused average."""
    out = []
    for f in fused(r, method):
        singles = [c["test"] for t in r["tasks"] for c in final_cells(r, method, t) if c["seed"] == f["seed"]]
        if len(singles) == len(r["tasks"]):
            out.append(statistics.fmean(singles) - statistics.fmean(f["accuracy"].values()))
    return out


def against_lora(r: dict, series) -> list[tuple[str, float, float, float]]:
    """For every SHiRA method with per-seed values ``series(r, method)``: (method, its mean, LoRA's mean,
    the seed spread of the difference). Empty when LoRA has no values."""
    lora = series(r, "lora")
    if not lora:
        return []
    return [(m, statistics.fmean(v), statistics.fmean(lora), spread(v, lora)) for m in ["peft_shira"] + SHIRA if (v := series(r, m))]


def claims(r: dict) -> list[str]:
    """Sentences generated from the numbers: does each claim of the paper hold here?"""
    out = []
    for method, a, lo, noise in against_lora(r, per_seed_average):
        v = verdict(a - lo, noise, "above LoRA", "below LoRA")
        out.append(f"- Single tasks: {LABELS[method]} averages {100 * a:.1f}% vs LoRA {100 * lo:.1f}% ({100 * (a - lo):+.1f} points): {v}.")
    for method, d, dl, noise in against_lora(r, drops):
        v = verdict(dl - d, noise, "a smaller drop than LoRA's", "a larger drop than LoRA's")
        out.append(f"- Fusion: {LABELS[method]} drops {100 * d:.1f} points vs LoRA {100 * dl:.1f}: {v} (paper, LLaMA2-7B: SHiRA-WM 4.4 vs LoRA 11.1).")
    for method in [m for m in SHIRA if "_b" in m]:  # block masks against the same mask without blocks (issue: within 1 point)
        plain = method.rsplit("_b", 1)[0]
        for what, series in (("single-task average", per_seed_average), ("fused average", fused_average)):
            a, b = series(r, method), series(r, plain)
            if a and b:
                diff = statistics.fmean(a) - statistics.fmean(b)
                v = verdict(diff, spread(a, b), "above the unstructured mask", "below the unstructured mask")
                out.append(f"- Blocks: {LABELS[method]} {what} {100 * statistics.fmean(a):.1f}% vs {LABELS[plain]} "
                           f"{100 * statistics.fmean(b):.1f}% ({100 * diff:+.1f} points): {v}.")
    changed = {m: statistics.fmean(f["changed"] / f["target_weights"] for f in fused(r, m)) for m in METHODS if fused(r, m)}
    shira = [changed[m] for m in SHIRA if m in changed]
    if drops(r, "lora") and "lora" in changed and shira:
        out.append(f"- Fused LoRA changes {100 * changed['lora']:.1f}% of the target weights; fused shira_hooks adapters "
                   f"{100 * min(shira):.2f}-{100 * max(shira):.2f}% (paper: ~66% for LoRA, 1% for one SHiRA adapter).")
    return out


def pilot_section(pilot: dict, results: dict) -> list[str]:
    lines = ["## Pilot: which tasks the models learn", "",
             "The baseline and PEFT LoRA at the grid's middle learning rate, seed 0, validation accuracy (%). Margin: LoRA's "
             "accuracy over the better of the baseline and the majority answer (chance for multiple choice). The three tasks with "
             "the widest margin are kept; a tie goes to the wider margin over the majority answer alone.", ""]
    for kind, p in pilot.items():
        baseline = "head" if kind == "encoder" else "zero_shot"
        used = results["models"].get(kind, {}).get("tasks", {})
        lines += [f"**{kind}** (`{p['command']}`, LoRA learning rate {p['lr']:g})", "",
                  f"| task | train/val/test | majority | {LABELS[baseline]} | PEFT LoRA | margin | used |", "|---|---|---:|---:|---:|---:|---|"]
        for row in p["rows"]:
            sizes = "/".join(str(row["sizes"][k]) for k in ("train", "val", "test"))
            margin = row["lora"] - max(row[baseline], row["majority"])
            lines.append(f"| {row['task']} | {sizes} | {100 * row['majority']:.1f} | {100 * row[baseline]:.1f} | {100 * row['lora']:.1f} | "
                         f"{100 * margin:+.1f} | {'yes' if row['task'] in used else ''} |")
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
        for offset, values, label in ((-0.2, singles, "single adapter (average over tasks)"),
                                      (0.2, fuseds, f"{len(r['tasks'])} task adapters fused by addition")):
            ax.bar([x + offset for x in xs], [mean_std(v)[0] for v in values], 0.4, yerr=[mean_std(v)[1] for v in values], capsize=3, label=label)
        low = min(min(v) for v in singles + fuseds if v != [0.0])
        ax.set_ylim(max(0, 10 * int(low // 10) - 10), 100)
        ax.set_xticks(list(xs), [LABELS[m].replace("shira_hooks ", "shira ") for m in names], rotation=30, ha="right")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict, out: Path, pilot: dict | None = None) -> Path:
    lines = report_header("Quality: SHiRA vs LoRA on real pretrained models, single adapters and fusion", results["command"], results["machine"])
    lines += ["Generated by `benchmarks/quality/run.py` from `results.json`; plot: `quality.png`.", ""]
    for kind, r in results["models"].items():
        lines += model_section(kind, r)
    if pilot:
        lines += pilot_section(pilot, results)
    discussion = HERE / "discussion.md"
    if discussion.exists() and out.resolve() == HERE:
        lines += ["## Discussion", "", discussion.read_text().strip(), ""]
    plot(results, out / "quality.png")
    path = out / "RESULTS.md"
    atomic_write(path, "\n".join(lines).encode())
    print(f"wrote {path} and {out / 'quality.png'}")
    return path
