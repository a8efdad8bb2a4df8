"""``python -m shira_hooks.bench``: CPU micro-benchmark of adapter loading, SHiRA scatter vs LoRA fusion.

The paper's Fig. 5, done side by side in one run. For square weights of each dimension and dtype:

* LoRA fuse ``W += s * B @ A`` then unfuse, in the fastest in-place form (``W.addmm_``);
* LoRA fuse / unfuse as PEFT does it: ``delta = (B @ A) * s`` computed in float32 for bf16/fp16
  weights, cast back, then ``W += delta`` / ``W -= delta``;
* SHiRA ``apply`` then ``remove`` through the library (``shira_hooks.apply``), with as many adapter
  entries as LoRA has parameters (rank r = round(sparsity * dim / 2) unless ``--rank``);
* the raw bound: two bare ``index_copy_`` calls (write the new values, write the originals back);
* a naive apply: gather the originals, upcast, add, cast, copy (no precomputation).

Timings are medians of repeated rounds after warm-up (min and max go to the JSON); nothing here
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

from . import masks
from ._io import digest
from ._timing import command_line, machine, publish, report_header, time_pair
from .adapter import SparseAdapter, SparseDelta
from .switch import apply

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = (
    ("dim", 6), ("dtype", 9), ("r", 4), ("k", 9), ("LoRA addmm_", 12), ("LoRA PEFT", 11),
    ("SHiRA", 9), ("raw bound", 10), ("naive", 9), ("x addmm_", 9), ("x PEFT", 8), ("x best", 7), ("SHiRA/raw", 10),
)


def bench_one(dim: int, dtype: torch.dtype, sparsity: float, rank: int | None, *, warmup: int, repeats: int, budget: float, seed: int = 0) -> dict:
    """All methods for one (dim, dtype); returns a JSON-ready row (times in seconds)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(dim, dim, generator=g) * 0.02).to(dtype)  # (out, in)
    r = rank or masks.lora_rank([(dim, dim)], sparsity)
    lora_a = (torch.randn(r, dim, generator=g) * 0.01).to(dtype)  # (r, in), like lora_A.weight
    lora_b = (torch.randn(dim, r, generator=g) * 0.01).to(dtype)  # (out, r), like lora_B.weight
    scale = 2.0  # lora_alpha / r
    timing = dict(warmup=warmup, repeats=repeats, budget=budget)

    # SHiRA first, on the pristine weight; the LoRA loops below drift it by rounding.
    k = masks.budget(dim * dim, sparsity)
    indices = masks.rand_mask(dim * dim, k, masks.generator_for(seed, "weight"))
    flat = weight.view(-1)
    index = indices.to(torch.int64)
    delta = SparseDelta((dim, dim), dtype, indices, torch.randn(k, generator=g) * 1e-3, digest(flat[index]))
    adapter = SparseAdapter({"weight": delta})
    holder = nn.Module()
    holder.weight = nn.Parameter(weight, requires_grad=False)
    started = time.perf_counter()
    apply(holder, adapter).remove()  # first use: validate the fingerprint, precompute
    first_apply = time.perf_counter() - started
    active = []
    shira = time_pair(lambda: active.append(apply(holder, adapter)), lambda: active.pop().remove(), **timing)

    originals = flat.index_select(0, index)
    written = (originals.float() + delta.values).to(dtype)
    raw = time_pair(lambda: flat.index_copy_(0, index, written), lambda: flat.index_copy_(0, index, originals), **timing)

    def naive_apply():
        flat.index_copy_(0, index, (flat.index_select(0, index).float() + delta.values).to(dtype))

    naive = time_pair(naive_apply, lambda: flat.index_copy_(0, index, originals), **timing)

    addmm = time_pair(lambda: weight.addmm_(lora_b, lora_a, alpha=scale), lambda: weight.addmm_(lora_b, lora_a, alpha=-scale), **timing)

    def peft_delta() -> torch.Tensor:
        if dtype in (torch.bfloat16, torch.float16):  # PEFT upcasts on CPU: slow low-precision matmuls
            return ((lora_b.float() @ lora_a.float()) * scale).to(dtype)
        return (lora_b @ lora_a) * scale

    peft = time_pair(lambda: weight.add_(peft_delta()), lambda: weight.sub_(peft_delta()), **timing)

    stats = {"lora_addmm": addmm, "lora_peft": peft, "shira": shira, "raw_bound": raw, "naive": naive}
    return {
        "dim": dim,
        "dtype": str(dtype).removeprefix("torch."),
        "rank": r,
        "entries": k,
        "first_apply_s": first_apply,
        **{name: {"first": asdict(s[0]), "second": asdict(s[1]), "pair": asdict(s[2])} for name, s in stats.items()},
        "speedup_vs_addmm": addmm[2].median / shira[2].median,
        "speedup_vs_peft": peft[2].median / shira[2].median,
        "speedup_vs_best_lora": min(addmm[2].median, peft[2].median) / shira[2].median,
        "shira_over_raw": shira[2].median / raw[2].median,
    }


def _cells(row: dict) -> list[str]:
    pair = lambda name: f"{row[name]['pair']['median'] * 1e3:.3f}"
    return [
        str(row["dim"]), row["dtype"], str(row["rank"]), f"{row['entries']:,}", pair("lora_addmm"), pair("lora_peft"),
        pair("shira"), pair("raw_bound"), pair("naive"), f"{row['speedup_vs_addmm']:.1f}", f"{row['speedup_vs_peft']:.1f}",
        f"{row['speedup_vs_best_lora']:.1f}", f"{row['shira_over_raw']:.2f}",
    ]


def table_header() -> str:
    return "  ".join(f"{name:>{width}}" for name, width in COLUMNS)


def table_row(row: dict) -> str:
    return "  ".join(f"{cell:>{width}}" for cell, (_, width) in zip(_cells(row), COLUMNS))


def markdown(rows: list[dict], info: dict, command: str) -> str:
    lines = report_header("`python -m shira_hooks.bench`: one weight, SHiRA apply+remove vs LoRA fuse+unfuse", command, info) + [
        "Times are medians in ms of one fuse+unfuse (LoRA) or apply+remove (SHiRA) round; `x addmm_`, `x PEFT`",
        "and `x best` (the faster of the two LoRA forms) are LoRA's time over SHiRA's; `SHiRA/raw` is the",
        "library's time over two bare `index_copy_` calls; `naive` is an apply that gathers, upcasts, adds and casts.",
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---:|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    labels = {"lora_addmm": "LoRA fuse+unfuse (addmm_)", "lora_peft": "LoRA fuse+unfuse (PEFT-style)", "shira": "SHiRA apply+remove", "raw_bound": "2x index_copy_ (raw bound)"}
    for ax, dtype in zip(axes[0], dtypes):
        chosen = [row for row in rows if row["dtype"] == dtype]
        for key, label in labels.items():
            ax.plot([r["dim"] for r in chosen], [r[key]["pair"]["median"] * 1e3 for r in chosen], marker="o", label=label)
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
    parser = argparse.ArgumentParser(prog="python -m shira_hooks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: matched to --sparsity)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds per measurement before stopping early (>= 3 rounds)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH.png")
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
    print(f"sparsity: {args.sparsity:g}, LoRA rank: {args.rank or 'matched'}, warmup {args.warmup}, repeats <= {args.repeats}, budget {args.budget:g} s")
    print("times: median ms per round (fuse+unfuse, apply+remove)")
    print(table_header())
    rows = []
    for dtype in args.dtypes:
        for dim in args.dims:
            row = bench_one(dim, DTYPES[dtype], args.sparsity, args.rank, warmup=args.warmup, repeats=args.repeats, budget=args.budget)
            rows.append(row)
            print(table_row(row), flush=True)
    command = command_line("python -m shira_hooks.bench", argv)
    publish("bench", markdown(rows, info, command), {"command": command, "machine": info, "rows": rows}, args.json, args.results)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
