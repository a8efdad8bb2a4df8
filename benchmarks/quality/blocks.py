"""The block-size trade-off: accuracy of the block masks against the whole-model switch time of each block size.

Switch times come from ``benchmarks/switch_model.py --blocks 1 4 8 16 --json PATH`` and are copied into the
quality ``results.json`` once (``run.py --switch-times PATH``: ``read_switch_times``), so that the table and
``pareto.png`` are generated from ``results.json`` only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import evidence as E
import stats
from claims import judge, p_text, points

from methods import BLOCK_MASKS

KEY = re.compile(r"float32/(shira|shira_packed)/b(\d+)/unset")
SWITCHES = {"shira_packed": "packed", "shira": "per_weight"}  # switch_model's method -> the name stored here


def read_switch_times(path: Path) -> dict:
    """The float32 shira_hooks switch times per block size of a ``switch_model.py`` JSON, with its command and machine.

    Args:
        path: the file ``switch_model.py --json`` wrote.

    Returns:
        The ``switch_times`` section of the quality ``results.json``: where it came from, the run's command,
        machine and model size, and ``blocks``: {block size: {"packed" / "per_weight": median, min, max, n
        (seconds)}}.

    Raises:
        SystemExit: the file is missing, is not JSON, or holds no float32 shira_hooks switch times.
    """
    fix = "give the JSON of `python benchmarks/switch_model.py --blocks 1 4 8 16 --json PATH`"
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"--switch-times {path}: cannot read it as JSON ({error}); {fix}") from None
    results = saved.get("results") if isinstance(saved, dict) else None
    blocks: dict[str, dict] = {}
    for key, summary in (results or {}).items():
        if match := KEY.fullmatch(key):
            blocks.setdefault(match[2], {})[SWITCHES[match[1]]] = {k: summary[k] for k in ("median", "min", "max", "n")}
    if not blocks:
        raise SystemExit(
            f"--switch-times {path}: no float32 shira_hooks switch times in it (keys like float32/shira_packed/b16/unset "
            f"under 'results'); {fix}"
        )
    return {
        "source": str(path),
        "command": saved.get("command"),
        "machine": saved.get("machine"),
        "layers": saved.get("layers"),
        "targets": saved.get("targets"),
        "sparsity": saved.get("sparsity"),
        "llama": saved.get("llama"),
        "dtype": "float32",
        "load_before": saved.get("load_before"),
        "load_after": saved.get("load_after"),
        "blocks": {b: blocks[b] for b in sorted(blocks, key=int)},
    }


def variants(r: dict) -> list[tuple[str, int, str]]:
    """(mask, block, method) for every block size of rand and snip this model has cells for (block 1 = the plain mask)."""
    out = []
    for mask, sizes in BLOCK_MASKS.items():
        for block in [1, *sizes]:
            method = f"shira_{mask}" if block == 1 else f"shira_{mask}_b{block}"
            if any(c["method"] == method for c in r["cells"]):
                out.append((mask, block, method))
    return out


def switch_ms(switch: dict | None, block: int, which: str) -> str:
    """Median (min-max) of one switch, in ms; "-" if the switch run has no such time."""
    s = (switch or {}).get("blocks", {}).get(str(block), {}).get(which)
    return f"{1e3 * s['median']:.1f} ({1e3 * s['min']:.1f}-{1e3 * s['max']:.1f})" if s else "-"


def versus_block_1(r: dict, method: str, plain: str, kind: str) -> str:
    """The paired difference of a block variant from its mask without blocks: "-2.1 [-4.0, -0.3], p = 0.03 (lower)"."""
    if method == plain:
        return "-"
    comparison, why = E.compare(r, method, plain, kind)
    if comparison is None:
        return f"not tested ({why})"
    _, category = judge(comparison, why, "above", "below")
    interval = comparison.paired.interval
    mark = {
        "above": "higher",
        "below": "lower",
        "level": "no significant difference",
        "not judged": "one seed: not judged",
    }[category]
    return f"{points(interval.mean)} [{points(interval.low)}, {points(interval.high)}], {p_text(comparison.paired.p)} ({mark})"


def section(r: dict, switch: dict | None) -> list[str]:
    """The block-size part of one model's section: the table (and a pointer to the figure)."""
    rows = variants(r)
    if not any(block > 1 for _, block, _ in rows):
        return []
    lines = [
        "",
        "### 6. Block size: accuracy against switch time",
        "",
        "rand and snip masks at block 1 (unstructured), 4, 8 and 16 (aligned runs of that many entries of a row; float32). "
        "Accuracy: test accuracy averaged over tasks, mean ± seed std [95% bootstrap interval]; vs block 1: the paired "
        "difference from the same mask without blocks on the same examples and seeds, [interval], p of the sign-flip test "
        "(see the claims above). `pareto.png` draws each mask on the seeds all its block sizes share (its legend names them), "
        "so a point there can differ from this table's mean over more seeds.",
    ]
    if switch:
        machine = switch.get("machine") or {}
        lines += [
            "",
            f"Switch time: one whole-model adapter switch (`remove()` one adapter, `apply()` another; rand masks at "
            f"{switch.get('sparsity')} of each weight) on the {switch.get('targets')} target weights of SmolLM2-135M's config "
            f"({switch.get('layers')} layers), float32, median (min-max) ms; packed: after `shira_hooks.pack` (one write per "
            f"arena), per weight: one write per weight. From `{switch.get('command')}` on {machine.get('cpu', '?')} "
            f"(torch threads {machine.get('torch_threads', '?')}, load average {switch.get('load_before')} before), copied into "
            f"results.json by `run.py --switch-times`. Figure: `pareto.png`.",
        ]
    else:
        lines += [
            "",
            "No switch times in results.json: add them with `run.py --stages report --switch-times SWITCH_MODEL.json`.",
        ]
    lines += [
        "",
        "| mask | block | seeds | single-task avg % | vs block 1 | fused avg % | vs block 1 | switch ms, packed | switch ms, per weight |",
        "|---|---:|---:|---:|---|---:|---|---:|---:|",
    ]
    for mask, block, method in rows:
        plain = f"shira_{mask}"
        single, fused = E.per_seed_average(r, method), E.fused_average(r, method)
        lines.append(
            f"| {mask} | {block} | {len(single)} | {E.with_interval(single, E.average_groups(r, method, 'single'))} | "
            f"{versus_block_1(r, method, plain, 'single')} | {E.with_interval(fused, E.average_groups(r, method, 'fused'))} | "
            f"{versus_block_1(r, method, plain, 'fused')} | {switch_ms(switch, block, 'packed')} | {switch_ms(switch, block, 'per_weight')} |"
        )
    return lines


def shared_seeds(r: dict, mask: str, kind: str) -> set[int]:
    """The seeds that every block size of ``mask`` has, tested on every task (single) or fused (fused): the
    figure draws each line on these, so that its points differ by block size only, not by the seeds behind them."""
    methods = [method for m, _, method in variants(r) if m == mask]
    if not methods:
        return set()
    if kind == "single":
        return set.intersection(*(E.whole_seeds(r, method) for method in methods))
    return set.intersection(*({f["seed"] for f in E.fused(r, method)} for method in methods))


def pareto_points(r: dict, mask: str, kind: str, switch: dict) -> list[tuple[float, float, float, float, int]]:
    """One line of ``pareto.png``: (packed switch ms, accuracy %, the interval's distance below and above it,
    block) per block size of ``mask``, on the seeds all its block sizes share (``shared_seeds``)."""
    seeds = shared_seeds(r, mask, kind)
    out = []
    for m, block, method in variants(r):
        s = switch["blocks"].get(str(block), {}).get("packed")
        values = E.per_seed_average(r, method, seeds) if kind == "single" else E.fused_average(r, method, seeds)
        if m != mask or not s or not values:
            continue
        groups = E.average_groups(r, method, kind, seeds)
        mean = sum(values) / len(values)
        interval = stats.bootstrap(groups) if groups else stats.Interval(mean, mean, mean)  # no outcomes: no bar
        out.append((1e3 * s["median"], 100 * mean, 100 * (mean - interval.low), 100 * (interval.high - mean), block))
    return out


def pareto(results: dict, path: Path) -> bool:
    """``pareto.png``: per model, single-task and fused accuracy (mean, 95% bootstrap interval) against the packed
    switch time of each block size; one line per mask and kind, on the seeds all its block sizes share (the
    legend names them), points labelled by block size. False (no figure) when results.json has no switch
    times or no block variants."""
    switch = results.get("switch_times")
    models = [(kind, r) for kind, r in results["models"].items() if any(b > 1 for _, b, _ in variants(r))]
    if not switch or not models:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
    for ax, (_, r) in zip(axes[0], models):
        for color, mask in zip(("tab:blue", "tab:orange"), BLOCK_MASKS):
            for style, what, kind in (("-", "single task", "single"), ("--", "fused", "fused")):
                points_ = pareto_points(r, mask, kind, switch)
                if not points_:
                    continue
                seeds = sorted(shared_seeds(r, mask, kind))
                xs, ys, below, above, sizes = zip(*points_)
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[below, above],
                    fmt=style + "o",
                    color=color,
                    capsize=3,
                    label=f"{mask}, {what} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})",
                )
                for x, y, size in zip(xs, ys, sizes):
                    ax.annotate(f"b{size}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
        ax.set_xscale("log")
        ticks = sorted({1e3 * s["packed"]["median"] for s in switch["blocks"].values() if "packed" in s})
        ax.set_xticks(ticks, [f"{t:.1f}" for t in ticks])  # the measured times themselves, not powers of ten
        ax.minorticks_off()
        ax.set_title(r["model"], fontsize=10)
        ax.set_xlabel(
            f"whole-model switch (packed, float32), ms, log scale; SmolLM2-135M config, {switch.get('targets')} weights",
            fontsize=9,
        )
        ax.set_ylabel("test accuracy (%), average over tasks\nbars: 95% bootstrap interval", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
