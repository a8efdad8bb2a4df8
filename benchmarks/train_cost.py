"""Training cost, the paper's Table 6 on this machine: step time and peak memory per method, side by side.

    python benchmarks/train_cost.py --results benchmarks/RESULTS.md --json benchmarks/train_cost.json
    python benchmarks/train_cost.py --quick           # tiny sizes, a smoke run (used by the tests)

Every method runs in its own process (peak memory is per process): full fine-tuning, shira_hooks in
its three modes (dense hooks, compact, sparse weight-gradients), SHiRA-DoRA over the sparse mode
(``dora=True``: the cheap variant, and ``dora_rank=r`` with r the paper's size, below), PEFT LoRA (without
and with dropout), PEFT SHiRA and PEFT DoRA, all at (nearly) the same number of trainable entries: 1% of
every Linear weight of the transformer blocks for SHiRA, the LoRA rank with as many parameters.
SHiRA-DoRA's low-rank variant takes the paper's size instead: its SHiRA-WM-DoRA masks a rank-128 DoRA
on LLaMA-7B (hidden size 4096; 6.25% of a square weight), so r is the hidden size / 32 (``DORA_RANK_DIVISOR``):
18 for SmolLM2-135M, 64 for the wide config. Model: SmolLM2-135M-Instruct (its cached
weights from the recipes if present, else built from its config; the cost does not depend on the
values), batch 4 x 64 tokens, AdamW, 2 threads. A second, wider Llama config (TinyLlama-1.1B's width,
``--large-layers`` of its 22 layers) shows how time and memory grow.

Step time: median of the timed steps (forward, backward, optimizer step, zero_grad) over ``--rounds``
rounds; each round starts every method's process once, in forward order and then in reverse order,
so the machine's drift over the run (10-50% here) falls on all methods alike. Memory:

* peak RSS of the process (``ru_maxrss``, the largest over the rounds) with the default allocator,
  what a user sees. glibc's malloc keeps freed memory in its heaps, so this includes whatever the
  allocation pattern of a method left fragmented, and grows for the first steps;
* peak RSS of one more process per method with ``MALLOC_MMAP_THRESHOLD_=65536`` and
  ``MALLOC_TRIM_THRESHOLD_=0`` (large blocks are mapped and unmapped, freed memory goes back at
  once): it follows the memory the tensors actually hold at their peak, the CPU counterpart of
  ``torch.cuda.max_memory_allocated`` (also reported when a GPU is used);
* where the memory goes: the tensors autograd saves for one backward (distinct storages,
  parameters excluded) and the optimizer state, measured after the timed steps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
from shira_hooks.masks import lora_rank  # noqa: E402
from shira_hooks.tools import command_line, machine, publish, report_header  # noqa: E402

METHODS = [
    "full",
    "shira_dense",
    "shira_compact",
    "shira_sparse",
    "shira_sparse_dora",
    "shira_sparse_dora_r",
    "peft_lora",
    "peft_lora_dropout",
    "peft_shira",
    "peft_dora",
]
LABELS = {
    "full": "full fine-tuning",
    "shira_dense": "shira_hooks mode='dense' (hooks)",
    "shira_compact": "shira_hooks mode='compact'",
    "shira_sparse": "shira_hooks mode='sparse'",
    "shira_sparse_dora": "shira_hooks mode='sparse', dora=True",
    "shira_sparse_dora_r": "shira_hooks mode='sparse', dora_rank=hidden/32",
    "peft_lora": "PEFT LoRA",
    "peft_lora_dropout": "PEFT LoRA, dropout 0.05",
    "peft_shira": "PEFT SHiRA",
    "peft_dora": "PEFT DoRA",
}
# SHiRA-WM-DoRA in the paper (§4.3.1) masks a rank-128 DoRA on LLaMA-7B, hidden size 4096 (128 * (4096 + 4096) is
# 6.25% of a 4096 x 4096 weight): dora_rank=r here is the model's hidden size over 4096 / 128.
DORA_RANK_DIVISOR = 4096 // 128
# PEFT's default LoRA dropout is 0. The paper trains its LLMs "following the setting of Hu et al. (2023)",
# LLM-Adapters, whose finetune.py defaults to lora_dropout=0.05: with dropout, every target saves its own
# dropped-out copy of the input (and the dropout mask) for the backward of A.
LORA_DROPOUT = 0.05
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {
    "smollm2": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ),
    "large": dict(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
SMOLLM2_CACHE = (
    Path(os.environ.get("SHIRA_HOOKS_CACHE", Path.home() / ".cache" / "shira_hooks")) / "SmolLM2-135M-Instruct"
)


def build(config_name: str, layers: int | None):
    from transformers import LlamaConfig, LlamaForCausalLM

    if config_name == "smollm2" and (SMOLLM2_CACHE / "model.safetensors").exists():
        return LlamaForCausalLM.from_pretrained(SMOLLM2_CACHE, dtype=torch.float32), "pretrained weights"
    settings = dict(CONFIGS[config_name], max_position_embeddings=2048)
    if layers:
        settings["num_hidden_layers"] = layers
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**settings)), "built from config"


def prepare(method: str, model, sparsity: float):
    """Make ``model`` train with ``method``; returns (model to call, trainable entries)."""
    if method == "full":
        return model, sum(p.numel() for p in model.parameters())
    shapes = [
        m.weight.shape
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS
    ]
    if method.startswith("shira_"):
        import shira_hooks

        mode, dora, low_rank = method.removeprefix("shira_").partition("_dora")  # "sparse", "_dora", "_r"
        dora_rank = max(1, model.config.hidden_size // DORA_RANK_DIVISOR) if low_rank else None
        handle = shira_hooks.attach(
            model, sparsity, "rand", target_modules=TARGETS, mode=mode, dora=bool(dora), dora_rank=dora_rank
        )
        if handle.dora:  # the DoRA tensors: a magnitude per output row, and the k entries or the factors
            return model, sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model, handle.num_trainable
    from peft import LoraConfig, ShiraConfig, get_peft_model

    rank = lora_rank(shapes, sparsity)
    lora = dict(r=rank, lora_alpha=2 * rank, target_modules=TARGETS)
    config = {
        "peft_lora": lambda: LoraConfig(**lora),
        "peft_lora_dropout": lambda: LoraConfig(**lora, lora_dropout=LORA_DROPOUT),
        "peft_dora": lambda: LoraConfig(**lora, use_dora=True),
        "peft_shira": lambda: ShiraConfig(r=rank, target_modules=TARGETS),
    }[method]()
    peft_model = get_peft_model(model, config)
    return peft_model, sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    model, source = build(args.config, args.layers)
    model.train()
    rss_model = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model, trainable = prepare(args.worker, model, args.sparsity)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    if args.live and not args.timed_too:
        return {"method": args.worker, "live_peak_mb": live_peaks(args, model, optimizer, device, g)}
    times = train_steps(model, optimizer, device, g, args.batch, args.length, args.warmup + args.steps)[args.warmup :]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before the diagnostic pass below
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.length), generator=g).to(device)
    saved_mb = saved_activations_mb(model, ids)
    state_mb = (
        sum(t.numel() * t.element_size() for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t))
        / 2**20
    )
    live = (
        {"live_peak_mb": live_peaks(args, model, optimizer, device, g)} if args.live else {}
    )  # --quick: one process does both
    return {
        **live,
        "saved_activations_mb": saved_mb,
        "optimizer_state_mb": state_mb,
        "method": args.worker,
        "config": args.config,
        "source": source,
        "layers": model.config.num_hidden_layers,
        "parameters": sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "shira_" not in n),
        "trainable": trainable,
        "times": times,
        "peak_rss_mb": peak_rss_mb,
        "rss_after_model_mb": rss_model,
        "cuda_max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def live_peaks(args, model, optimizer, device, g: torch.Generator) -> dict[str, float]:
    """Peak RSS (MB) after training at each length, ascending: memory grows with the tokens, so the
    peak so far is the peak at this length."""
    peaks = {}
    for length in sorted({args.length, *args.live_lengths}):
        train_steps(model, optimizer, device, g, args.batch, length, args.warmup + args.steps)
        peaks[str(length)] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return peaks


def train_steps(model, optimizer, device, g: torch.Generator, batch: int, length: int, steps: int) -> list[float]:
    """``steps`` training steps on random tokens; the seconds each took."""
    times = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def saved_activations_mb(model, ids: torch.Tensor) -> float:
    """MB that autograd keeps for the backward of one step: distinct storages saved by the graph,
    parameters and buffers excluded (where the methods differ besides the optimizer state)."""
    own = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
        b.untyped_storage().data_ptr() for b in model.buffers()
    }
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout != torch.strided:  # PEFT SHiRA's sparse COO delta: count its values and indices
            parts = [tensor._values(), tensor._indices()] if tensor.layout == torch.sparse_coo else []
        else:
            parts = [tensor]
        for part in parts:
            storage = part.untyped_storage()
            if storage.data_ptr() not in own:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values()) / 2**20


# glibc: blocks of 64 KiB and more are mmap'ed and unmapped on free, and freed heap tops are trimmed at
# once, so RSS follows the live tensors instead of what earlier allocations left behind.
RETURNING_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def spawn(args, method: str, config: str, layers: int | None, *, steps: int, warmup: int, extra=(), env=None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--config",
        config,
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--batch",
        str(args.batch),
        "--length",
        str(args.length),
        "--threads",
        str(args.threads),
        "--sparsity",
        str(args.sparsity),
        *extra,
    ]
    if layers:
        command += ["--layers", str(layers)]
    if args.quick:  # a smoke run: the worker in this process (no start-up per method; its memory numbers mean nothing)
        return worker(parser().parse_args(command[2:]))
    done = subprocess.run(command, capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    if done.returncode != 0:
        raise SystemExit(f"{method} on {config} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_all(args, config: str, layers: int | None) -> list[dict]:
    """``args.rounds`` timed processes per method (forward then reverse order), then one live-memory process.
    With ``--quick`` (a smoke run of every path, its numbers meaningless) the worker runs in this process and does both."""
    runs: dict[str, list[dict]] = {m: [] for m in args.methods}
    lengths = args.live_lengths if config == "smollm2" or args.quick else []
    live_args = ["--live", "--live-lengths", *map(str, lengths)]
    both = dict(extra=[*live_args, "--timed-too"], env=RETURNING_MALLOC) if args.quick else {}
    for round_ in range(args.rounds):
        for method in args.methods if round_ % 2 == 0 else reversed(args.methods):
            runs[method].append(spawn(args, method, config, layers, steps=args.steps, warmup=args.warmup, **both))
            last = runs[method][-1]
            print(
                f"{config:8} round {round_ + 1} {LABELS[method]:34} step {statistics.median(last['times']):.3f} s  peak RSS {last['peak_rss_mb']:,.0f} MB",
                flush=True,
            )
    rows = []
    for method in args.methods:
        first, times = runs[method][0], [t for run in runs[method] for t in run["times"]]
        live = (
            first
            if args.quick
            else spawn(
                args, method, config, layers, steps=args.live_steps, warmup=1, extra=live_args, env=RETURNING_MALLOC
            )
        )
        row = {k: v for k, v in first.items() if k not in ("times", "live_peak_mb")}
        row.update(
            step_median_s=statistics.median(times),
            step_min_s=min(times),
            step_max_s=max(times),
            steps=len(times),
            rounds=args.rounds,
            peak_rss_mb=max(run["peak_rss_mb"] for run in runs[method]),
            peak_live_rss_mb=live["live_peak_mb"][str(args.length)],
            live_peak_by_length=live["live_peak_mb"],
        )
        rows.append(row)
        print(
            f"{config:8} {LABELS[method]:34} trainable {row['trainable']:>13,}  step {row['step_median_s']:.3f} s  peak RSS {row['peak_rss_mb']:,.0f} MB"
            f"  live {row['peak_live_rss_mb']:,.0f} MB",
            flush=True,
        )
    return rows


def markdown(groups: dict[str, list[dict]], info: dict, command: str) -> str:
    lines = report_header(
        "`benchmarks/train_cost.py`: training step time and peak memory (the paper's Table 6)", command, info
    )
    lines += [
        "Step time: median over all timed steps of all rounds (each round runs every method once, alternately in forward and reverse order). "
        "Peak RSS: the largest over the rounds, default allocator. Live peak: peak RSS of one more process per method "
        f"with {' '.join(f'{k}={v}' for k, v in RETURNING_MALLOC.items())}, so that freed memory goes back at once and RSS follows the tensors "
        "(the CPU counterpart of `torch.cuda.max_memory_allocated`).",
        "",
    ]
    for config, rows in groups.items():
        first = rows[0]
        lora = next((r for r in rows if r["method"] == "peft_lora"), None)
        lines += [
            f"### {config}: {first['layers']} layers, {first['parameters'] / 1e6:.1f}M parameters ({first['source']}), batch {first.get('batch', '')}, "
            f"{first['rounds']} rounds, {first['steps']} timed steps per method",
            "",
            "| method | trainable | median step s (min-max) | peak RSS MB | live peak MB | RSS after model load MB | saved activations MB | optimizer state MB "
            "| step / LoRA | peak RSS / LoRA | live peak / LoRA |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            vs = [
                f"{r[key] / lora[key]:.2f}" if lora else "-"
                for key in ("step_median_s", "peak_rss_mb", "peak_live_rss_mb")
            ]
            lines.append(
                f"| {LABELS[r['method']]} | {r['trainable']:,} | {r['step_median_s']:.3f} ({r['step_min_s']:.3f}-{r['step_max_s']:.3f}) | "
                f"{r['peak_rss_mb']:,.0f} | {r['peak_live_rss_mb']:,.0f} | {r['rss_after_model_mb']:,.0f} | {r['saved_activations_mb']:,.1f} | "
                f"{r['optimizer_state_mb']:,.1f} | {' | '.join(vs)} |"
            )
        lines += ["", *ratios(rows), "", *by_length(rows)]
    return "\n".join(lines)


def by_length(rows: list[dict]) -> list[str]:
    """The live peak at each measured sequence length, and each shira mode's ratio to each LoRA variant there."""
    lengths = sorted({int(n) for r in rows for n in r["live_peak_by_length"]})
    if len(lengths) < 2:
        return []
    batch = rows[0]["batch_size"]
    lines = [
        "Live peak MB by tokens per batch (the same live-memory process, at ascending sequence lengths):",
        "",
        "| method | " + " | ".join(f"{batch} x {n}" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    lines += [
        f"| {LABELS[r['method']]} | " + " | ".join(f"{r['live_peak_by_length'][str(n)]:,.0f}" for n in lengths) + " |"
        for r in rows
    ]
    by = {r["method"]: r for r in rows}
    lines.append("")
    modes, loras = compared(by)
    for mode in modes:
        for lora in loras:
            ratio = ", ".join(
                f"{by[mode]['live_peak_by_length'][str(n)] / by[lora]['live_peak_by_length'][str(n)]:.2f}x at {batch} x {n}"
                for n in lengths
            )
            lines.append(f"- {LABELS[mode]} / {LABELS[lora]}, live peak: {ratio}.")
    return lines + [""]


def compared(by: dict[str, dict]) -> tuple[list[str], list[str]]:
    """The shira_hooks k-entry modes and the PEFT LoRA variants present in ``by``: the pairs the ratio lines compare."""
    return [m for m in ("shira_compact", "shira_sparse") if m in by], [
        m for m in ("peft_lora", "peft_lora_dropout") if m in by
    ]


def ratios(rows: list[dict]) -> list[str]:
    """One line per shira_hooks mode: its step time, peak RSS and live peak over each PEFT LoRA variant's; and one
    per SHiRA-DoRA variant over the sparse mode without DoRA and over PEFT DoRA."""
    by = {r["method"]: r for r in rows}
    modes, loras = compared(by)
    pairs = [(mode, loras) for mode in modes]
    pairs += [
        (dora, [m for m in ("shira_sparse", "peft_dora") if m in by])
        for dora in ("shira_sparse_dora", "shira_sparse_dora_r")
        if dora in by
    ]
    out = []
    for mode, others in pairs:
        r = by[mode]
        parts = [
            f"{r['step_median_s'] / by[m]['step_median_s']:.2f}x the step time, {r['peak_rss_mb'] / by[m]['peak_rss_mb']:.2f}x the peak RSS "
            f"and {r['peak_live_rss_mb'] / by[m]['peak_live_rss_mb']:.2f}x the live peak of {LABELS[m]}"
            for m in others
        ]
        if parts:
            out.append(f"- {LABELS[mode]}: " + "; ".join(parts) + ".")
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.01)
    p.add_argument(
        "--rounds", type=int, default=3, help="timed processes per method, alternating the order of the methods"
    )
    p.add_argument(
        "--live-steps", type=int, default=2, help="steps of the live-memory process per length (after one warm-up step)"
    )
    p.add_argument(
        "--live-lengths",
        type=int,
        nargs="*",
        default=[256],
        help="longer sequences at which the live-memory process of the SmolLM2 config also measures the peak",
    )
    p.add_argument("--large-layers", type=int, default=4, help="layers of the wide config (0 skips it)")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--results", metavar="RESULTS.md")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--config", default="smollm2", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--live", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--timed-too", action="store_true", help=argparse.SUPPRESS
    )  # --live after the timed steps, in one process
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        args.steps, args.warmup, args.batch, args.length, args.rounds, args.live_steps, args.live_lengths = (
            2,
            1,
            2,
            16,
            1,
            1,
            [32],
        )
    import peft  # noqa: F401  (its version goes into the machine line)

    groups = {}
    if args.quick:
        groups["tiny"] = run_all(args, "tiny", None)
    else:
        groups["smollm2"] = run_all(args, "smollm2", None)
        if args.large_layers:
            groups[f"large ({args.large_layers} layers of TinyLlama-1.1B's width)"] = run_all(
                args, "large", args.large_layers
            )
    for rows in groups.values():
        for r in rows:
            r["batch"], r["batch_size"] = f"{args.batch} x {args.length}", args.batch
    info = machine()
    command = command_line("python benchmarks/train_cost.py", argv)
    text = markdown(groups, info, command)
    print(text)
    publish("train_cost", text, {"command": command, "machine": info, "groups": groups}, args.json, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
