"""Mixed-adapter batches: ``MixedAdapters`` against PEFT LoRA's ``adapter_names=``, on SmolLM2-135M's architecture.

    python benchmarks/mixed_batch.py --results benchmarks/RESULTS.md --json benchmarks/mixed_batch.json
    python benchmarks/mixed_batch.py --quick          # a 2-layer smoke run (used by the tests)

A Llama model built from SmolLM2-135M-Instruct's config (random weights: the time does not depend on
the values, and random logits never stop generation early), float32, 2 threads. Four adapters at 1%
of every Linear of the transformer blocks (210 weights), random deltas; the batch's rows are routed
to them round-robin (8 rows x 64 tokens: two rows each). Timed, interleaved round-robin after a
warm-up, median with min/max:

* forward: the base model; the same model with ``MixedAdapters`` hooks but no route (their idle
  cost); the mixed forward (``route``); PEFT LoRA with four adapters of the rank that matches the
  trainable-parameter count (``masks.lora_rank``), ``model(..., adapter_names=...)``;
* ``generate()``: greedy, a fixed number of new tokens, tokens per second for the base model, the
  mixed route and PEFT LoRA's ``generate(..., adapter_names=...)``;
* the kernel choice for one 1536x576 weight (the MLP's down projection transposed: gate/up) at 1%,
  the same rows and adapters: the alternatives ``shira_hooks/serve/mixed.py`` was chosen among.

Exactness is checked on the way: each mixed row against ``shira_hooks.apply`` of its adapter.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch

import shira_hooks
from shira_hooks import masks
from shira_hooks.tools import Stats, command_line, machine, publish, report_header, time_interleaved

from switch_model import HEADS, HIDDEN, INTERMEDIATE, KV_HEADS, LAYERS, TARGETS, random_adapter, target_weights


def build_model(quick: bool):
    """A Llama with SmolLM2-135M's config (2 layers and a small vocabulary with ``quick``), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=1024 if quick else 49152,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=2 if quick else LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False)


ADAPTERS = ["a0", "a1", "a2", "a3"]


def peft_lora(model, rank: int):
    """PEFT LoRA with one random (non-zero) adapter per name; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(1)
    lora = get_peft_model(model, config, adapter_name=ADAPTERS[0])
    for name in ADAPTERS[1:]:
        lora.add_adapter(name, config)
    return lora.eval()


def kernel_choice(route: list[str], tokens: int, timing: dict) -> dict:
    """One 1536x576 layer: the base product and the per-adapter delta kernels considered."""
    out_features, in_features = 1536, 576
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g)
    x = torch.randn(len(route), tokens, in_features, generator=g)
    rows = [torch.tensor([r for r, n in enumerate(route) if n == name]) for name in ADAPTERS]
    k = masks.budget(weight.numel(), 0.01)
    indices = [masks.rand_mask(weight.numel(), k, masks.generator_for(i, "w")).long() for i in range(len(ADAPTERS))]
    values = [torch.randn(k, generator=g) * 1e-3 for _ in ADAPTERS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense = [
            torch.zeros(weight.numel()).index_put_((i,), v).view(out_features, in_features)
            for i, v in zip(indices, values)
        ]
        csr = [d.to_sparse_csr() for d in dense]
        csr_t = [d.t().contiguous().to_sparse_csr() for d in dense]  # S^T (in, out), for a dense left operand
    y = torch.nn.functional.linear(x, weight)
    xs = [x.index_select(0, r).reshape(-1, in_features) for r in rows]

    def ours():  # what mixed.py does: contiguous (in, n*T) block, CSR @ block, transposed add per row run
        for s, r, xi in zip(csr, rows, xs):
            delta = torch.sparse.mm(s, xi.t().contiguous())
            for j, row in enumerate(r.tolist()):
                y[row].add_(delta[:, j * tokens : (j + 1) * tokens].t())

    def transposed_view():  # CSR @ a transposed (column-major) view, index_add_ of the transposed result
        for s, r, xi in zip(csr, rows, xs):
            y.index_add_(0, r, torch.sparse.mm(s, xi.t()).t().reshape(len(r), tokens, out_features))

    def dense_left():  # x @ S^T with S^T as CSR
        for st, r, xi in zip(csr_t, rows, xs):
            y.index_add_(0, r, torch.mm(xi, st).view(len(r), tokens, out_features))

    def gather():  # gather the k input columns, scale, scatter-add into the output columns
        for i, v, r, xi in zip(indices, values, rows, xs):
            contrib = xi[:, i % in_features] * v  # (n*T, k)
            delta = torch.zeros(xi.shape[0], out_features).index_add_(
                1, torch.div(i, in_features, rounding_mode="floor"), contrib
            )
            y.index_add_(0, r, delta.view(len(r), tokens, out_features))

    def dense_delta():  # the delta as a dense weight: one full product per adapter's rows
        for d, r, xi in zip(dense, rows, xs):
            y.index_add_(0, r, (xi @ d.t()).view(len(r), tokens, out_features))

    # bfloat16 models: MKL's CSR product has no bfloat16 kernel, so mixed.py computes in float32 and rounds once
    # into the bfloat16 output; the alternative is a gather in bfloat16
    x16, weight16 = x.to(torch.bfloat16), weight.to(torch.bfloat16)
    y16 = torch.nn.functional.linear(x16, weight16)
    xs16 = [x16.index_select(0, r).reshape(-1, in_features) for r in rows]
    values16 = [v.to(torch.bfloat16) for v in values]

    def ours_bf16():  # the input block cast to float32 in the copy it needs anyway, CSR in float32, add_ rounds
        for s, r, xi in zip(csr, rows, xs16):
            delta = torch.sparse.mm(s, xi.t().to(torch.float32))
            for j, row in enumerate(r.tolist()):
                y16[row].add_(delta[:, j * tokens : (j + 1) * tokens].t())

    def gather_bf16():
        for i, v, r, xi in zip(indices, values16, rows, xs16):
            delta = torch.zeros(xi.shape[0], out_features, dtype=torch.bfloat16)
            delta.index_add_(1, torch.div(i, in_features, rounding_mode="floor"), xi[:, i % in_features] * v)
            y16.index_add_(0, r, delta.view(len(r), tokens, out_features))

    methods = {
        "layer's own product x W^T (all rows)": (lambda: torch.nn.functional.linear(x, weight), lambda: None),
        "chosen: CSR sparse.mm on a contiguous x^T block, transposed add per row run": (ours, lambda: None),
        "CSR sparse.mm on a transposed view, index_add_": (transposed_view, lambda: None),
        "dense x @ CSR(S^T), index_add_": (dense_left, lambda: None),
        "gather + index_add_ (k columns)": (gather, lambda: None),
        "dense delta product": (dense_delta, lambda: None),
        "bfloat16: layer's own product x W^T (all rows)": (
            lambda: torch.nn.functional.linear(x16, weight16),
            lambda: None,
        ),
        "bfloat16, chosen: float32 CSR sparse.mm on the cast x^T block, add_ into the bfloat16 output": (
            ours_bf16,
            lambda: None,
        ),
        "bfloat16: gather + index_add_ (k columns) in bfloat16": (gather_bf16, lambda: None),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = time_interleaved(methods, **timing)
    return {name: s[0] for name, s in stats.items()}


@torch.no_grad()
def run(args) -> dict:
    rows, tokens, new_tokens = (4, 8, 4) if args.quick else (args.rows, args.tokens, args.new_tokens)
    route = [ADAPTERS[r % len(ADAPTERS)] for r in range(rows)]
    model = build_model(args.quick)
    weights = target_weights(model)
    adapters = {name: random_adapter(weights, args.sparsity, seed, 1) for seed, name in enumerate(ADAPTERS, start=1)}
    rank = masks.lora_rank((w.shape for w in weights.values()), args.sparsity)
    ids = torch.randint(0, model.config.vocab_size, (rows, tokens), generator=torch.Generator().manual_seed(0))

    # exactness on the way: each mixed row against apply of its adapter
    mixed_model = copy.deepcopy(model)
    mixed = shira_hooks.MixedAdapters(mixed_model, adapters)
    with mixed.route(route):
        mixed_logits = mixed_model(input_ids=ids).logits
    worst = 0.0
    for name, adapter in adapters.items():
        with shira_hooks.apply(model, adapter):
            applied = model(input_ids=ids).logits
        picked = [r for r, n in enumerate(route) if n == name]
        worst = max(worst, float((mixed_logits[picked] - applied[picked]).abs().max()))

    lora = peft_lora(copy.deepcopy(model), rank)
    row = {
        "layers": model.config.num_hidden_layers,
        "targets": len(weights),
        "sparsity": args.sparsity,
        "rows": rows,
        "tokens": tokens,
        "new_tokens": new_tokens,
        "entries_per_adapter": adapters["a0"].num_entries,
        "rank": rank,
        "lora_params_per_adapter": sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n and ".a0." in n),
        "max_abs_logit_diff_vs_apply": worst,
    }

    def mixed_forward():
        with mixed.route(route):
            mixed_model(input_ids=ids)

    fast = (
        dict(warmup=1, repeats=3, budget=0.5, settle=0)
        if args.quick
        else dict(warmup=2, repeats=args.repeats, budget=args.budget, settle=0)
    )
    forward = time_interleaved(
        {
            "base": (lambda: model(input_ids=ids), lambda: None),
            "base + idle MixedAdapters hooks (no route)": (lambda: mixed_model(input_ids=ids), lambda: None),
            "MixedAdapters mixed forward": (mixed_forward, lambda: None),
            "PEFT LoRA adapter_names= mixed forward": (lambda: lora(input_ids=ids, adapter_names=route), lambda: None),
        },
        **fast,
    )
    row["forward"] = {name: s[0] for name, s in forward.items()}
    print("forward timed; generate next", file=sys.stderr, flush=True)

    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def mixed_generate():
        with mixed.route(route):
            return mixed_model.generate(ids, **options)

    lengths = {"base": model.generate(ids, **options).shape[1], "mixed": mixed_generate().shape[1]}
    if set(lengths.values()) != {tokens + new_tokens}:  # min_new_tokens keeps every method at the same length
        raise RuntimeError(f"generate() lengths {lengths}; expected {tokens + new_tokens}")
    generate = time_interleaved(
        {
            "base": (lambda: model.generate(ids, **options), lambda: None),
            "MixedAdapters mixed generate": (mixed_generate, lambda: None),
            "PEFT LoRA adapter_names= mixed generate": (
                lambda: lora.generate(input_ids=ids, adapter_names=route, **options),
                lambda: None,
            ),
        },
        **dict(fast, repeats=3 if args.quick else args.generate_repeats),
    )
    row["generate"] = {name: s[0] for name, s in generate.items()}
    print("generate timed; kernels next", file=sys.stderr, flush=True)
    row["kernel"] = kernel_choice(route, tokens, dict(fast, repeats=3 if args.quick else 30))
    mixed.close()
    return row


def section_name(threads: int) -> str:
    """The RESULTS.md section: the 2-thread protocol's, or one per other thread count."""
    return "mixed_batch" if threads == 2 else f"mixed_batch_threads{threads}"


def loaded_warning(load: list[list[str]], cores: int) -> list[str]:
    """A paragraph when the 1-minute load average exceeded the cores: the timings then say little."""
    worst = max((float(values[0]) for values in load if values and values[0] != "-"), default=0.0)
    if worst <= cores:
        return []
    return [
        f"**The machine was loaded (1-minute load average up to {worst:.1f} on {cores} cores): threads of every "
        f"method were descheduled mid-kernel, the same call took several times longer from one round to the next "
        f"(see min-max), and the ratios below do not measure the methods. Rerun this command on a quiet machine.**",
        "",
    ]


def markdown(row: dict, info: dict, command: str, load: tuple[list[str], list[str]]) -> str:
    ms = lambda s: f"{s.median * 1e3:.1f}"
    rng = lambda s: f"{s.min * 1e3:.1f}-{s.max * 1e3:.1f}"
    fwd, gen, base = row["forward"], row["generate"], row["forward"]["base"].median
    new = row["rows"] * row["new_tokens"]
    lines = report_header(
        "`benchmarks/mixed_batch.py`: mixed-adapter batches (MixedAdapters vs PEFT LoRA adapter_names=)", command, info
    ) + [
        f"Load average before / after: {' '.join(load[0])} / {' '.join(load[1])}.",
        "",
        *loaded_warning(list(load), int(info["cores"])),
        f"Model: Llama architecture from SmolLM2-135M's config (random weights), {row['layers']} layers, float32; "
        f"{row['targets']} target Linear weights. Batch {row['rows']} rows x {row['tokens']} tokens routed round-robin over 4 adapters. "
        f"Each adapter: shira_hooks {row['entries_per_adapter']:,} entries (sparsity {row['sparsity']:g}); PEFT LoRA r={row['rank']} "
        f"{row['lora_params_per_adapter']:,} parameters. Largest |mixed - apply| on a row's logits: {row['max_abs_logit_diff_vs_apply']:.2e}.",
        "",
        "| forward | median ms | min-max ms | vs base |",
        "|---|---:|---:|---:|",
    ]
    for name, stats in fwd.items():
        lines.append(f"| {name} | {ms(stats)} | {rng(stats)} | {stats.median / base:.2f}x |")
    lines += [
        "",
        f"| generate(), {row['new_tokens']} new tokens per row, greedy | median ms | min-max ms | tokens/s (median) |",
        "|---|---:|---:|---:|",
    ]
    for name, stats in gen.items():
        lines.append(f"| {name} | {ms(stats)} | {rng(stats)} | {new / stats.median:.1f} |")
    kernel = row["kernel"]
    layer = next(iter(kernel.values())).median
    lines += [
        "",
        f"Kernel choice, one 1536x576 weight at 1%, the same {row['rows']} rows x {row['tokens']} tokens over 4 adapters (the delta only; "
        f"ratios against the float32 layer's product):",
        "",
        "| kernel | median ms | min-max ms | vs the layer's own product |",
        "|---|---:|---:|---:|",
    ]
    for name, stats in kernel.items():
        lines.append(f"| {name} | {ms(stats)} | {rng(stats)} | {stats.median / layer:.2f}x |")
    mixed, lora = fwd["MixedAdapters mixed forward"].median, fwd["PEFT LoRA adapter_names= mixed forward"].median
    lines += [
        "",
        f"Mixed forward / base forward: {mixed / base:.2f}x (target <= 1.25x); PEFT LoRA mixed / MixedAdapters mixed: {lora / mixed:.2f}x; "
        f"generate tokens/s MixedAdapters {new / gen['MixedAdapters mixed generate'].median:.1f}, PEFT LoRA {new / gen['PEFT LoRA adapter_names= mixed generate'].median:.1f}, "
        f"base {new / gen['base'].median:.1f}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=12, help="forward rounds")
    parser.add_argument("--generate-repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per method before rounds stop early")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--results", metavar="RESULTS.md")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report-from", metavar="JSON", help="rewrite the report of an earlier run's JSON (no timing)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.report_from:
        payload = json.loads(Path(args.report_from).read_text())
        row = payload["result"]
        for group in ("forward", "generate", "kernel"):
            row[group] = {name: Stats(**stats) for name, stats in row[group].items()}
        text = markdown(row, payload["machine"], payload["command"], (payload["load_before"], payload["load_after"]))
        print(text)
        publish(section_name(int(payload["machine"]["torch_threads"])), text, payload, None, args.results)
        return 0

    for name in ("peft", "transformers"):  # imported now so that their versions go into the machine line
        importlib.import_module(name)

    load_before = Path("/proc/loadavg").read_text().split()[:3] if not args.quick else ["-"]
    started = time.perf_counter()
    row = run(args)
    load_after = Path("/proc/loadavg").read_text().split()[:3] if not args.quick else ["-"]
    row["seconds"] = time.perf_counter() - started
    info = machine()
    command = command_line("python benchmarks/mixed_batch.py", argv)
    text = markdown(row, info, command, (load_before, load_after))
    print(text)
    publish(
        section_name(args.threads),
        text,
        {"command": command, "machine": info, "load_before": load_before, "load_after": load_after, "result": row},
        args.json,
        args.results,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
