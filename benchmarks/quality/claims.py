"""The paper's claims, judged on one model's results by paired tests over test examples and seeds.

Every line compares two methods on the same test examples and the same seeds (``evidence.compare``): the
difference, its 95% bootstrap interval and the p-value of the paired sign-flip test (``stats``). A line with
one seed, or without per-example outcomes, gives what there is and says why it is not judged.
"""

from __future__ import annotations

import statistics

import evidence as E
import stats

from methods import LABELS, METHODS

ALPHA = 0.05
SHIRA = [m for m in METHODS if m.startswith("shira_")]
VS_LORA = ["peft_shira"] + [m for m in SHIRA if not m.endswith("_dora")]  # SHiRA + DoRA is compared with DoRA
VS_DORA = [m for m in SHIRA if m.endswith("_dora")]


def p_text(p: float) -> str:
    return f"p = {p:.2f}" if p >= 0.01 else f"p = {p:.3f}" if p >= 0.001 else f"p = {p:.1e}"


def points(value: float) -> str:
    return f"{100 * value:+.1f}"


def judge(comparison: E.Comparison | None, why: str, above: str, below: str) -> tuple[str, str]:
    """(text, category) for a comparison: the difference, its interval, the test, and the verdict.
    Categories: "above", "below", "level" (no significant difference), "not judged"."""
    if comparison is None:
        return f"not tested: {why}", "not judged"
    paired = comparison.paired
    interval = paired.interval
    text = (
        f"difference {points(interval.mean)} [{points(interval.low)}, {points(interval.high)}] points, {p_text(paired.p)} "
        f"({paired.seeds} seed{'s' if paired.seeds > 1 else ''} x {paired.examples} test examples)"
    )
    if paired.seeds < 2:
        return (
            text + ": not judged, one seed (the test covers the test examples, not the spread of training runs)",
            "not judged",
        )
    if paired.p >= ALPHA:
        return text + ": no significant difference", "level"
    return text + ": " + (above if interval.mean > 0 else below), "above" if interval.mean > 0 else "below"


def mean_or_dash(values: list[float]) -> str:
    return f"{100 * statistics.fmean(values):.1f}" if values else "-"


def summary(claim: str, categories: list[str], above: str, below: str) -> str:
    n = len(categories)
    counts = {c: categories.count(c) for c in ("above", "below", "level", "not judged")}
    return (
        f"- **{claim}**: of {n} line{'s' if n != 1 else ''}, {counts['above']} {above}, {counts['below']} {below}, "
        f"{counts['level']} without a significant difference, {counts['not judged']} not judged"
        + (f" (Bonferroni over these {n} lines: p < {ALPHA / n:.2g})." if n > 1 else ".")
    )


def against(r: dict, methods: list[str], reference: str, claim: str) -> list[str]:
    """Single-task accuracy of each method against ``reference`` (paired over examples and seeds)."""
    lines, categories = [], []
    for method in methods:
        if not E.per_seed_average(r, method) or not E.per_seed_average(r, reference):
            continue
        comparison, why = E.compare(r, method, reference, "single")
        text, category = judge(comparison, why, f"above {LABELS[reference]}", f"below {LABELS[reference]}")
        a, b = (
            (f"{100 * comparison.first:.1f}", f"{100 * comparison.second:.1f}")
            if comparison
            else (mean_or_dash(E.per_seed_average(r, method)), mean_or_dash(E.per_seed_average(r, reference)))
        )
        lines.append(f"- Single tasks, {LABELS[method]} vs {LABELS[reference]}: {a}% vs {b}%; {text}.")
        categories.append(category)
    return lines + (
        [summary(claim, categories, f"significantly above {LABELS[reference]}", "significantly below")] if lines else []
    )


def fusion_drop(r: dict) -> list[str]:
    """Each SHiRA method's fusion drop against LoRA's: LoRA's drop minus the method's, per example and seed."""
    lines, categories = [], []
    for method in VS_LORA:
        if not E.drops(r, method) or not E.drops(r, "lora"):
            continue
        comparison, why = E.compare(r, "lora", method, "drop")
        text, category = judge(comparison, why, "a smaller drop than LoRA's", "a larger drop than LoRA's")
        a, b = (
            (f"{100 * comparison.second:.1f}", f"{100 * comparison.first:.1f}")
            if comparison
            else (mean_or_dash(E.drops(r, method)), mean_or_dash(E.drops(r, "lora")))
        )
        lines.append(
            f"- Fusion drop, {LABELS[method]} vs PEFT LoRA: {a} vs {b} points (single-adapter average minus fused "
            f"average); LoRA's drop minus this one's, {text}."
        )
        categories.append(category)
    if not lines:
        return []
    return lines + [
        summary(
            "SHiRA's fusion drop < LoRA's (paper, LLaMA2-7B: SHiRA-WM 4.4 vs LoRA 11.1 points)",
            categories,
            "with a significantly smaller drop",
            "with a significantly larger one",
        )
    ]


def changed_weights(r: dict) -> list[str]:
    """Share of the target weights that fusion changed: exact counts per fused model, so no sampling test."""
    lora = [f["changed"] / f["target_weights"] for f in E.fused(r, "lora")]
    if not lora:
        return []
    lines = []
    for method in VS_LORA:
        rows = E.fused(r, method)
        if not rows:
            continue
        mine = [f["changed"] / f["target_weights"] for f in rows]
        by_seed = {f["seed"]: f["changed"] / f["target_weights"] for f in E.fused(r, "lora")}
        diffs = [by_seed[f["seed"]] - f["changed"] / f["target_weights"] for f in rows if f["seed"] in by_seed]
        spread = (
            f"LoRA minus this one {100 * statistics.fmean(diffs):.2f} points (min {100 * min(diffs):.2f}, max {100 * max(diffs):.2f} "
            f"over {len(diffs)} seed{'s' if len(diffs) > 1 else ''})"
            if diffs
            else "no seed in common with LoRA"
        )
        lines.append(
            f"- Weights changed by fusion, {LABELS[method]} vs PEFT LoRA: {100 * statistics.fmean(mine):.2f}% vs "
            f"{100 * statistics.fmean(lora):.2f}% of the target weights; {spread}."
        )
    if lines:
        lines.append(
            f"- **Changed weights, SHiRA 1-2% per adapter vs LoRA ~100%** (paper: ~66% for LoRA, 1% for one SHiRA adapter): "
            f"these are exact counts of each fused model's weights, not a sample of test examples, so no test applies; "
            f"{len(r['tasks'])} adapters were fused, so SHiRA's share is up to {len(r['tasks'])} times one adapter's."
        )
    return lines


def claims(r: dict) -> list[str]:
    """The claim lines of one model's section."""
    lines = [
        f"Each line: first method minus second, in accuracy points, with its {stats.BOOTSTRAP_TEXT}, and the p-value of a "
        f"{stats.SIGN_FLIP_TEXT}. Significant: p < {ALPHA:g}; the p-values are not corrected for the number of lines "
        "(each claim's summary gives the Bonferroni threshold). Only seeds both methods have are compared.",
        "",
    ]
    lines += against(
        r, VS_LORA, "lora", "SHiRA >= LoRA on single tasks (paper, LLaMA-7B: LoRA 74.7, SHiRA-WM 77.0, SHiRA-SNIP 77.4)"
    )
    lines += fusion_drop(r)
    lines += changed_weights(r)
    if VS_DORA and any(E.per_seed_average(r, m) for m in VS_DORA):
        lines += against(r, VS_DORA, "dora", "SHiRA-DoRA >= DoRA on single tasks")
        lines += dora_over_plain(r)
    else:
        lines.append(
            "- **SHiRA-DoRA vs DoRA**: no `shira_<mask>_dora` test results for this model in results.json yet: not tested."
        )
    return lines


def dora_over_plain(r: dict) -> list[str]:
    """Each SHiRA-DoRA method against the same mask trained without DoRA (issue 24's target: at or above it)."""
    lines, categories = [], []
    for method in VS_DORA:
        plain = method.removesuffix("_dora")
        if not E.per_seed_average(r, method) or not E.per_seed_average(r, plain):
            continue
        comparison, why = E.compare(r, method, plain, "single")
        text, category = judge(comparison, why, f"above {LABELS[plain]}", f"below {LABELS[plain]}")
        a, b = (
            (f"{100 * comparison.first:.1f}", f"{100 * comparison.second:.1f}")
            if comparison
            else (mean_or_dash(E.per_seed_average(r, method)), mean_or_dash(E.per_seed_average(r, plain)))
        )
        lines.append(f"- Single tasks, {LABELS[method]} vs {LABELS[plain]}: {a}% vs {b}%; {text}.")
        categories.append(category)
    if not lines:
        return []
    return lines + [
        summary(
            "SHiRA-DoRA >= the same mask without DoRA (paper, LLaMA-7B: SHiRA-WM-DoRA 77.8 vs SHiRA-WM 77.0)",
            categories,
            "significantly above",
            "significantly below",
        )
    ]
