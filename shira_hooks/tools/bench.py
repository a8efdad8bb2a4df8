"""``python -m shira_hooks.bench``: CPU micro-benchmark of adapter loading, SHiRA scatter vs LoRA fusion.

The paper's Fig. 5, done side by side in one run. For square weights of each dimension and dtype:

* LoRA fuse ``W += s * B @ A`` then unfuse, in the fastest in-place form (``W.addmm_``);
* LoRA fuse / unfuse as PEFT does it: ``delta = (B @ A) * s`` computed in float32 for bf16/fp16
  weights, cast back, then ``W += delta`` / ``W -= delta``;
* SHiRA ``apply`` then ``remove`` through the library (``shira_hooks.apply``), with as many adapter
  entries as LoRA has parameters (rank r = round(sparsity * dim / 2) unless ``--rank``);
* the raw bound: two bare ``index_copy_`` calls (write the new values, write the originals back),
  and the same two writes with ``scatter_`` (which the library does not use: for bfloat16 it is a
  slow path on CPU, and it is never faster than ``index_copy_`` here);
* a naive apply: gather the originals, upcast, add, cast, copy (no precomputation).

The methods are timed round-robin, each on its own copy of the weight and after one untimed round
of its own, so that a slow phase of the machine falls on all of them; timings are medians of the rounds after warm-up (min and max go to the
JSON), and a row where one method's slowest round is 3x its median or more is flagged. Nothing here
is a test assertion.

    python -m shira_hooks.bench [--dims 512 1024 2048 4096 8192] [--dtypes float32 bfloat16]
        [--sparsity 0.01] [--rank R] [--threads 2] [--json PATH] [--plot PATH.png] [--quick]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch
from torch import nn

from .. import masks
from .._base import digest
from ..format import SparseAdapter, SparseDelta
from ..serve import apply
from .help import DefaultsFormatter
from .timing import command_line, machine, publish, report_header, time_interleaved

DESCRIPTION = (
    "CPU micro-benchmark of adapter loading: SHiRA apply+remove against LoRA fuse+unfuse, one square weight at a time."
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = (
    ("dim", 6),
    ("dtype", 9),
    ("r", 4),
    ("k", 9),
    ("LoRA addmm_", 12),
    ("LoRA PEFT", 11),
    ("SHiRA", 9),
    ("index_copy_", 12),
    ("scatter_", 9),
    ("naive", 9),
    ("x addmm_", 9),
    ("x PEFT", 8),
    ("x best", 7),
    ("SHiRA/raw", 10),
    ("spread", 7),
)
OUTLIER = 3.0  # a method whose slowest round is this many times its median is flagged: the machine, not the method
METHODS = ("lora_addmm", "lora_peft", "shira", "raw_bound", "raw_scatter", "naive")
LEGEND = (
    f"x addmm_ / x PEFT / x best: LoRA's time over SHiRA's; SHiRA/raw: SHiRA over two bare index_copy_; spread: the "
    f"slowest round over the median round of the row's least steady method, '!' when {OUTLIER:g}x or more (the machine "
    f"slowed one round: read the median)"
)


def bench_one(
    dim: int,
    dtype: torch.dtype,
    sparsity: float,
    rank: int | None,
    *,
    warmup: int,
    repeats: int,
    budget: float,
    seed: int = 0,
) -> dict:
    """All methods for one (dim, dtype), interleaved round-robin; returns a JSON-ready row (times in seconds).

    Every method works on its own copy of the weight, so that one method's writes (LoRA's rounding
    drift, the raw writes bumping the version counter) never change what another one sees.
    """
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(dim, dim, generator=g) * 0.02).to(dtype)  # (out, in)
    r = rank or masks.lora_rank([(dim, dim)], sparsity)
    lora_a = (torch.randn(r, dim, generator=g) * 0.01).to(dtype)  # (r, in), like lora_A.weight
    lora_b = (torch.randn(dim, r, generator=g) * 0.01).to(dtype)  # (out, r), like lora_B.weight
    scale = 2.0  # lora_alpha / r

    k = masks.budget(dim * dim, sparsity)
    indices = masks.rand_mask(dim * dim, k, masks.generator_for(seed, "weight"))
    index = indices.to(torch.int64)
    delta = SparseDelta((dim, dim), dtype, indices, torch.randn(k, generator=g) * 1e-3, digest(weight.view(-1)[index]))
    adapter = SparseAdapter({"weight": delta})
    holder = nn.Module()
    holder.weight = nn.Parameter(weight.clone(), requires_grad=False)
    started = time.perf_counter()
    apply(holder, adapter).remove()  # first use: validate the fingerprint, precompute
    first_apply = time.perf_counter() - started
    active = []

    raw_flat, scatter_flat, naive_flat = (weight.clone().view(-1) for _ in range(3))
    originals = raw_flat.index_select(0, index)
    written = (originals.float() + delta.values).to(dtype)

    def naive_apply():
        naive_flat.index_copy_(0, index, (naive_flat.index_select(0, index).float() + delta.values).to(dtype))

    addmm_weight, peft_weight = weight.clone(), weight.clone()

    def peft_delta() -> torch.Tensor:
        if dtype in (torch.bfloat16, torch.float16):  # PEFT upcasts on CPU: slow low-precision matmuls
            return ((lora_b.float() @ lora_a.float()) * scale).to(dtype)
        return (lora_b @ lora_a) * scale

    methods = {
        "lora_addmm": (
            lambda: addmm_weight.addmm_(lora_b, lora_a, alpha=scale),
            lambda: addmm_weight.addmm_(lora_b, lora_a, alpha=-scale),
        ),
        "lora_peft": (lambda: peft_weight.add_(peft_delta()), lambda: peft_weight.sub_(peft_delta())),
        "shira": (lambda: active.append(apply(holder, adapter)), lambda: active.pop().remove()),
        "raw_bound": (
            lambda: raw_flat.index_copy_(0, index, written),
            lambda: raw_flat.index_copy_(0, index, originals),
        ),
        "raw_scatter": (
            lambda: scatter_flat.scatter_(0, index, written),
            lambda: scatter_flat.scatter_(0, index, originals),
        ),
        "naive": (naive_apply, lambda: naive_flat.index_copy_(0, index, originals)),
    }
    stats = time_interleaved(methods, warmup=warmup, repeats=repeats, budget=budget)
    addmm, peft, shira, raw = (stats[name][2].median for name in ("lora_addmm", "lora_peft", "shira", "raw_bound"))
    spread = {name: s[2].max / s[2].median for name, s in stats.items()}
    return {
        "dim": dim,
        "dtype": str(dtype).removeprefix("torch."),
        "rank": r,
        "entries": k,
        "first_apply_s": first_apply,
        **{name: {"first": asdict(s[0]), "second": asdict(s[1]), "pair": asdict(s[2])} for name, s in stats.items()},
        "speedup_vs_addmm": addmm / shira,
        "speedup_vs_peft": peft / shira,
        "speedup_vs_best_lora": min(addmm, peft) / shira,
        "shira_over_raw": shira / raw,
        "scatter_over_index_copy": stats["raw_scatter"][2].median / raw,
        "spread": spread,  # per method: slowest round / median round
    }


def _outliers(row: dict) -> list[str]:
    return [name for name in METHODS if row["spread"][name] >= OUTLIER]


def _cells(row: dict) -> list[str]:
    pair = lambda name: f"{row[name]['pair']['median'] * 1e3:.3f}"
    widest = max(row["spread"].values())
    return [
        str(row["dim"]),
        row["dtype"],
        str(row["rank"]),
        f"{row['entries']:,}",
        pair("lora_addmm"),
        pair("lora_peft"),
        pair("shira"),
        pair("raw_bound"),
        pair("raw_scatter"),
        pair("naive"),
        f"{row['speedup_vs_addmm']:.1f}",
        f"{row['speedup_vs_peft']:.1f}",
        f"{row['speedup_vs_best_lora']:.1f}",
        f"{row['shira_over_raw']:.2f}",
        f"{widest:.1f}" + (" !" if widest >= OUTLIER else ""),
    ]


def table_header() -> str:
    return "  ".join(f"{name:>{width}}" for name, width in COLUMNS)


def table_row(row: dict) -> str:
    return "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(_cells(row), COLUMNS))


def markdown(rows: list[dict], info: dict, command: str) -> str:
    lines = report_header(
        "`python -m shira_hooks.bench`: one weight, SHiRA apply+remove vs LoRA fuse+unfuse", command, info
    ) + [
        "Times are medians in ms of one fuse+unfuse (LoRA) or apply+remove (SHiRA) round, the methods timed",
        "round-robin (alternately forward and reverse) so that a slow phase of the machine falls on all of them;",
        "before its timed round each method runs one untimed round, so these are steady-state figures (the memory",
        "the previous method freed or streamed through is not charged to the next one).",
        "`x addmm_`, `x PEFT` and `x best` (the faster of the two LoRA forms) are LoRA's time over SHiRA's;",
        "`SHiRA/raw` is the library's time over two bare `index_copy_` calls; `scatter_` is the same two writes",
        "with `scatter_` (the mission's name for them); `naive` is an apply that gathers, upcasts, adds and casts.",
        "`spread` is the largest slowest-round / median-round ratio of the row's methods; `!` flags a row where",
        f"it is {OUTLIER:g}x or more: one round of that method was slowed by the machine, and the median is the figure to read.",
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---:|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    by_dtype: dict[str, list[float]] = {}
    for row in rows:
        by_dtype.setdefault(row["dtype"], []).append(row["scatter_over_index_copy"])
    lines += [
        "",
        "`scatter_` over `index_copy_` (the same writes): "
        + "; ".join(
            f"{dtype} {min(values):.1f}x to {max(values):.1f}x (`scatter_` faster in {sum(v < 1 for v in values)} of {len(values)} sizes)"
            for dtype, values in by_dtype.items()
        )
        + ". The library writes with `index_copy_`: one path for every dtype, never the slow one.",
    ]
    flagged = [(row, name) for row in rows for name in _outliers(row)]
    if flagged:
        lines += ["", "Rows flagged for their spread (slowest round / median):"] + [
            f"- {row['dim']} {row['dtype']} {name}: median {row[name]['pair']['median'] * 1e3:.3f} ms, slowest "
            f"{row[name]['pair']['max'] * 1e3:.3f} ms ({row['spread'][name]:.1f}x)"
            for row, name in flagged
        ]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    labels = {
        "lora_addmm": "LoRA fuse+unfuse (addmm_)",
        "lora_peft": "LoRA fuse+unfuse (PEFT-style)",
        "shira": "SHiRA apply+remove",
        "raw_bound": "2x index_copy_ (raw bound)",
    }
    for ax, dtype in zip(axes[0], dtypes):
        chosen = [row for row in rows if row["dtype"] == dtype]
        for key, label in labels.items():
            ax.plot(
                [r["dim"] for r in chosen], [r[key]["pair"]["median"] * 1e3 for r in chosen], marker="o", label=label
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("weight dimension (square)")
        ax.set_ylabel("time per round (ms)")
        ax.set_title(f"{dtype}, {rows[0]['entries'] / rows[0]['dim'] ** 2:.0%} entries")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shira_hooks.bench", description=DESCRIPTION, formatter_class=DefaultsFormatter
    )
    parser.add_argument(
        "--dims", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192], help="square weight sizes to time"
    )
    parser.add_argument(
        "--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES), help="weight dtypes to time"
    )
    parser.add_argument("--sparsity", type=float, default=0.01, help="share of each weight the SHiRA adapter changes")
    parser.add_argument(
        "--rank",
        type=int,
        default=None,
        help="LoRA rank (default: the rank with as many parameters as --sparsity gives entries)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds per method before timing")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds per method (at most)")
    parser.add_argument(
        "--budget", type=float, default=10.0, help="seconds per measurement before stopping early (>= 3 rounds)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the rows, machine and command as JSON")
    parser.add_argument(
        "--plot", metavar="PATH.png", help="also plot the times against the dimension (needs matplotlib)"
    )
    parser.add_argument("--results", metavar="RESULTS.md", help="write the table into this markdown file")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small dims, few repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.dims, args.warmup, args.repeats, args.budget = [256, 512], 1, 5, 0.5
    if not 0 < args.sparsity <= 1:
        parser.error(f"--sparsity {args.sparsity} is outside (0, 1]")
    torch.set_num_threads(args.threads)
    info = machine()
    for key, value in info.items():
        print(f"{key}: {value}")
    print(
        f"sparsity: {args.sparsity:g}, LoRA rank: {args.rank or 'matched'}, warmup {args.warmup}, repeats <= {args.repeats}, budget {args.budget:g} s"
    )
    print("times: median ms per round (fuse+unfuse, apply+remove); methods interleaved round-robin")
    print(LEGEND)
    print(table_header())
    rows = []
    for dtype in args.dtypes:
        for dim in args.dims:
            row = bench_one(
                dim,
                DTYPES[dtype],
                args.sparsity,
                args.rank,
                warmup=args.warmup,
                repeats=args.repeats,
                budget=args.budget,
            )
            rows.append(row)
            print(table_row(row), flush=True)
    command = command_line("python -m shira_hooks.bench", argv)
    publish(
        "bench",
        markdown(rows, info, command),
        {"command": command, "machine": info, "rows": rows},
        args.json,
        args.results,
    )
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
