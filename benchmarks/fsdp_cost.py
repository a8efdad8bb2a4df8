"""Training cost over ranks: per-rank live peak memory and step time, FSDP2 (``fully_shard``) vs DDP.

    python benchmarks/fsdp_cost.py --results benchmarks/RESULTS.md --json benchmarks/fsdp_cost.json
    python benchmarks/fsdp_cost.py --quick     # tiny config, every case in one pair of processes (used by the tests)

Methods (as in ``train_cost.py``, 1% of the q/k/v/o/gate/up/down weights or the LoRA rank with as
many parameters): full fine-tuning, shira_hooks ``mode="dense"`` and ``mode="sparse"``, PEFT LoRA;
each under FSDP2 (``fully_shard`` on every decoder layer, then the root; SHiRA attached after
sharding, or before with ``--attach before`` as the Trainer does; PEFT applied before) and under DDP.
Model: the wide config of ``train_cost.py`` (TinyLlama-1.1B's width, ``--layers`` of its 22 layers,
built from the config), ``--world`` gloo ranks on the CPU (default 2), batch 2 x 64 tokens per rank,
AdamW, 1 thread per rank.

Each case runs in its own pair of processes, started with ``MALLOC_MMAP_THRESHOLD_=65536
MALLOC_TRIM_THRESHOLD_=0`` (freed memory goes back at once, so RSS follows the live tensors). Every
rank builds the whole model before sharding; that transient is not what training costs, so after the
warm-up steps each rank resets its peak RSS (``/proc/self/clear_refs``) and reports ``VmHWM`` after
the timed steps: the per-rank live peak of steady-state training (weights, gradients, optimizer
state, activations, and the process itself). The process's own share (torch, transformers, peft, the
process group), its RSS just before it builds the model, is also subtracted from that peak: the peak
above the process, the CPU counterpart of ``torch.cuda.max_memory_allocated``. Step time: median of rank 0's timed steps over all rounds; rounds alternate the
order of the cases. A case a method refuses (a ``ShiraError``) is reported as refused, with the reason.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))
from shira_hooks.tools import command_line, machine, publish, report_header  # noqa: E402

import train_cost  # noqa: E402

METHODS = ["full", "shira_dense", "shira_sparse", "peft_lora"]
WRAPPERS = ["fsdp2", "ddp"]
LABELS = {**train_cost.LABELS, "fsdp2": "FSDP2", "ddp": "DDP"}
UNITS = {
    "layers": "every decoder layer and the root (torch's defaults: the root's embedding and head stay gathered from forward to backward)",
    "accelerate": "the embedding, every decoder layer, norm + head, and the root, all resharded after forward (Accelerate's layout)",
}


# ------------------------------------------------------------------------------ one rank
def shard(model, layout: str = "layers") -> None:
    """``fully_shard`` every decoder layer, then the root (which keeps the embedding and the output head).

    ``layout="accelerate"``: as Accelerate's ``fsdp2_prepare_model`` does, the embedding and the final
    norm + output head become units of their own, and every unit (the root too) reshards after forward.
    """
    from torch.distributed.fsdp import fully_shard

    reshard = True if layout == "accelerate" else None  # None: torch's default, the root keeps its weights gathered
    for module in model.modules():
        if type(module).__name__ == "LlamaDecoderLayer":
            fully_shard(module, reshard_after_forward=reshard)
    if layout == "accelerate":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model wraps it
        embed, head = base.get_input_embeddings(), base.get_output_embeddings()
        if embed.weight is head.weight:  # tied: one unit
            fully_shard([embed, base.model.norm, head], reshard_after_forward=True)
        else:
            fully_shard(embed, reshard_after_forward=True)
            fully_shard([base.model.norm, head], reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=reshard)


def prepare(method: str, wrapper: str, model, sparsity: float, layout: str = "layers", attach: str = "after"):
    """(model to call, trainable entries) for ``method`` under ``wrapper``; SHiRA attaches after sharding,
    or before it with ``attach="before"``."""
    from torch.nn.parallel import DistributedDataParallel

    if wrapper == "ddp":
        model, trainable = train_cost.prepare(method, model, sparsity)
        return DistributedDataParallel(model), trainable
    if method.startswith("peft_") or (attach == "before" and method.startswith("shira_")):
        model, trainable = train_cost.prepare(method, model, sparsity)
        shard(model, layout)
        return model, trainable
    shard(model, layout)
    return train_cost.prepare(method, model, sparsity)


def _local_mb(tensors) -> float:
    from shira_hooks.distributed import local

    return sum(local(t).numel() * t.element_size() for t in tensors if torch.is_tensor(t)) / 2**20


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def run_case(method: str, wrapper: str, args, rank: int) -> dict:
    import peft  # noqa: F401  (imported before the baseline, as every method's process has it)
    import transformers  # noqa: F401

    from shira_hooks import ShiraError

    gc.collect()
    baseline = _status_mb("VmRSS")  # the process alone: libraries, the process group
    model, source = train_cost.build(args.config, args.layers)  # the same seed on every rank
    model.train()
    case = {"method": method, "wrapper": wrapper, "rank": rank}
    try:
        model, trainable = prepare(method, wrapper, model, args.sparsity, args.layout, args.attach)
    except ShiraError as error:
        return {**case, "refused": str(error)}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    vocab = train_cost.CONFIGS[args.config]["vocab_size"]
    g = torch.Generator().manual_seed(rank)  # each rank its own batches

    def step() -> float:
        ids = torch.randint(0, vocab, (args.batch, args.length), generator=g)
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    for _ in range(args.warmup):
        step()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := RSS now; the model build is not training
    times = [step() for _ in range(args.steps)]
    return {
        **case,
        "source": source,
        "trainable": trainable,
        "times": times,
        "peak_mb": _status_mb("VmHWM"),
        "baseline_mb": baseline,
        "parameters_mb": _local_mb(model.parameters()),
        "optimizer_state_mb": _local_mb(t for state in optimizer.state.values() for t in state.values()),
    }


def worker(args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(args.threads)
    rank = dist.get_rank()
    for case in args.cases:
        method, wrapper = case.split("/")
        result = run_case(method, wrapper, args, rank)
        print(json.dumps(result), flush=True)
        dist.barrier()
        gc.collect()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ the driver
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, cases: list[str]) -> list[dict]:
    """Run ``cases`` in order in one set of rank processes; every rank's result of every case."""
    base = {
        **os.environ,
        **train_cost.RETURNING_MALLOC,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(args.world),
    }
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--cases",
        *cases,
        "--config",
        args.config,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--threads",
        str(args.threads),
        "--sparsity",
        str(args.sparsity),
        "--layout",
        args.layout,
        "--attach",
        args.attach,
    ]
    if args.layers:
        command += ["--layers", str(args.layers)]
    ranks = [
        subprocess.Popen(
            command,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(args.world)
    ]
    results = []
    for process in ranks:
        out, err = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"{cases} failed:\n{err[-3000:]}")
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


def run_all(args) -> list[dict]:
    cases = [f"{m}/{w}" for w in args.wrappers for m in args.methods]
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    if args.quick:  # a smoke run: every case in one pair of processes
        for result in launch(args, cases):
            runs[f"{result['method']}/{result['wrapper']}"].append(result)
    else:
        for round_ in range(args.rounds):
            for case in cases if round_ % 2 == 0 else list(reversed(cases)):
                results = launch(args, [case])
                runs[case] += results
                done = [r for r in results if "refused" not in r]
                shown = (
                    f"peak {max(r['peak_mb'] for r in done):,.0f} MB/rank, step {statistics.median(done[0]['times']):.3f} s"
                    if done
                    else "refused"
                )
                print(f"round {round_ + 1} {case:22} {shown}  (load {os.getloadavg()[0]:.1f})", flush=True)
    rows = []
    for case, results in runs.items():
        method, wrapper = case.split("/")
        refused = [r["refused"] for r in results if "refused" in r]
        if refused:
            rows.append({"method": method, "wrapper": wrapper, "refused": refused[0]})
            continue
        times = [t for r in results if r["rank"] == 0 for t in r["times"]]
        peaks = {str(rank): max(r["peak_mb"] for r in results if r["rank"] == rank) for rank in range(args.world)}
        above = max(r["peak_mb"] - r["baseline_mb"] for r in results)
        first = results[0]
        rows.append(
            {
                "method": method,
                "wrapper": wrapper,
                "trainable": first["trainable"],
                "source": first["source"],
                "step_median_s": statistics.median(times),
                "step_min_s": min(times),
                "step_max_s": max(times),
                "steps": len(times),
                "peak_mb_by_rank": peaks,
                "peak_mb": max(peaks.values()),
                "peak_above_process_mb": above,
                "process_mb": max(r["baseline_mb"] for r in results),
                "parameters_mb": max(r["parameters_mb"] for r in results),
                "optimizer_state_mb": max(r["optimizer_state_mb"] for r in results),
            }
        )
    return rows


def markdown(rows: list[dict], info: dict, command: str, args, load: tuple[str, str]) -> str:
    title = f"`benchmarks/fsdp_cost.py`: {args.world} ranks, FSDP2 vs DDP, per-rank live peak and step time ({args.layers or 'all'} layers)"
    lines = report_header(title, command, info)
    config = train_cost.CONFIGS[args.config]
    lines += [
        f"Model: `{args.config}` config of `train_cost.py` (hidden {config['hidden_size']}, intermediate {config['intermediate_size']}, "
        f"{args.layers or config['num_hidden_layers']} layers, vocab {config['vocab_size']}; built from the config), FSDP2 units: "
        f"{UNITS[args.layout]}, SHiRA attached {args.attach} sharding, {args.world} gloo ranks on the CPU, "
        f"{args.threads} thread(s) each, batch {args.batch} x {args.length} per rank, AdamW. Peak: VmHWM of each rank after a reset "
        f"following {args.warmup} warm-up step(s), i.e. steady-state training; the largest over the ranks "
        f"and {args.rounds} round(s); above the process: that peak less the rank's RSS before it built the model. Step: median (min-max) of rank 0's timed steps. Load average before / after: {load[0]} / {load[1]}.",
        "",
        f"| method | wrapper | trainable | peak MB per rank (rank {' / '.join(map(str, range(args.world)))}) | above the process MB "
        f"(process MB) | weights MB per rank | optimizer state MB per rank | median step s (min-max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "refused" in r:
            lines.append(
                f"| {LABELS[r['method']]} | {LABELS[r['wrapper']]} | refused: {r['refused'].split('. ')[0]} | | | | | |"
            )
            continue
        lines.append(
            f"| {LABELS[r['method']]} | {LABELS[r['wrapper']]} | {r['trainable']:,} | {r['peak_mb']:,.0f} "
            f"({' / '.join(f'{v:,.0f}' for v in r['peak_mb_by_rank'].values())}) | {r['peak_above_process_mb']:,.0f} ({r['process_mb']:,.0f}) | "
            f"{r['parameters_mb']:,.0f} | {r['optimizer_state_mb']:,.1f} | "
            f"{r['step_median_s']:.3f} ({r['step_min_s']:.3f}-{r['step_max_s']:.3f}) |"
        )
    lines += ["", *targets(rows)]
    return "\n".join(lines)


def targets(rows: list[dict]) -> list[str]:
    """The issue's two targets for SHiRA sparse under FSDP2, and the same ratios for the dense mode."""
    by = {(r["method"], r["wrapper"]): r for r in rows}
    out = []
    for mode in ("shira_sparse", "shira_dense"):
        mine = by.get((mode, "fsdp2"))
        if mine is None:
            continue
        if "refused" in mine:
            out.append(f"- {LABELS[mode]} under FSDP2: refused, so neither target can be measured for it.")
            continue
        for other, goal in (((("peft_lora", "fsdp2")), 1.05), ((mode, "ddp"), 0.6)):
            ref = by.get(other)
            if ref is None or "refused" in ref:
                continue
            ratio = mine["peak_mb"] / ref["peak_mb"]
            above = (
                f"{mine['peak_above_process_mb'] / ref['peak_above_process_mb']:.2f}x"
                if ref["peak_above_process_mb"] >= 1
                else "n/a"
            )
            met = "met" if ratio <= goal else "missed"
            target = f" (target for mode='sparse': <= {goal}x, {met})" if mode == "shira_sparse" else ""
            out.append(
                f"- {LABELS[mode]} under FSDP2: per-rank peak {ratio:.2f}x {LABELS[other[0]]} under {LABELS[other[1]]}{target}, "
                f"{above} above the process; step time {mine['step_median_s'] / ref['step_median_s']:.2f}x."
            )
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--wrappers", nargs="+", default=WRAPPERS, choices=WRAPPERS)
    parser.add_argument("--layers", type=int, default=4, help="layers of the wide config")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2, help="per rank")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="per rank")
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--world", type=int, default=2, help="ranks (processes)")
    parser.add_argument(
        "--attach", default="after", choices=["after", "before"], help="SHiRA attaches after or before fully_shard"
    )
    parser.add_argument(
        "--layout",
        default="layers",
        choices=["layers", "accelerate"],
        help="FSDP2 units: decoder layers + root (torch defaults), or also embedding and head apart, all resharded after forward (Accelerate)",
    )
    parser.add_argument(
        "--section", default="fsdp_cost", help="the RESULTS.md section to write (another run of other sizes)"
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--results", metavar="RESULTS.md")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cases", nargs="*", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--config", default="large", choices=sorted(train_cost.CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.quick:
        args.config, args.layers, args.steps, args.warmup, args.batch, args.length, args.rounds = (
            "tiny",
            None,
            1,
            1,
            2,
            16,
            1,
        )
    import peft  # noqa: F401  (its version goes into the machine line)

    before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows = run_all(args)
    after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info = machine()
    command = command_line("python benchmarks/fsdp_cost.py", argv)
    text = markdown(rows, info, command, args, (before, after))
    print(text)
    publish(
        args.section,
        text,
        {"command": command, "machine": info, "load": [before, after], "rows": rows},
        args.json,
        args.results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
