"""Whole-model adapter switching: shira_hooks against PEFT, in one run, on SmolLM2-135M's architecture.

    python benchmarks/switch_model.py --results benchmarks/RESULTS.md --json benchmarks/switch_model.json
    python benchmarks/switch_model.py --quick          # a 2-layer smoke run (used by the tests)

A Llama model built from SmolLM2-135M-Instruct's config (random weights: switching cost does not
depend on the values; nothing is downloaded). Every Linear layer of the transformer blocks is
targeted (210 layers; the output head is tied to the embeddings). At (nearly) the same number of
trainable parameters, the time of one adapter switch:

* shira_hooks: ``remove()`` adapter A, ``apply()`` adapter B (1% of each weight), in place;
* raw bound: the same with bare ``index_copy_`` calls on precomputed tensors (two per weight: A's
  originals back, B's values in), and the single-write bound (one ``index_copy_`` per weight);
* PEFT LoRA (rank matched to the same count): ``merge_adapter()`` + ``unmerge_adapter()``;
* PEFT SHiRA (``ShiraConfig``, same rank): ``merge_adapter()`` + ``unmerge_adapter()``;
* PEFT LoRA hot-swap (unfused): ``hotswap_adapter_from_state_dict`` between two adapters.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import shira_hooks
from shira_hooks import masks
from shira_hooks._io import digest
from shira_hooks._timing import command_line, machine, publish, report_header, time_pair

SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(quick: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(SMOLLM2_135M)
    if quick:
        config.update(num_hidden_layers=2, vocab_size=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).eval().requires_grad_(False)


def target_weights(model) -> dict[str, torch.nn.Parameter]:
    return {f"{name}.weight": m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in TARGETS}


def random_adapter(weights: dict, sparsity: float, seed: int) -> shira_hooks.SparseAdapter:
    """A 'rand' mask adapter with random deltas, fingerprinted against the model's weights."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, weight in weights.items():
        k = masks.budget(weight.numel(), sparsity)
        indices = masks.rand_mask(weight.numel(), k, masks.generator_for(seed, name))
        base = weight.detach().reshape(-1)[indices.long()]
        deltas[name] = shira_hooks.SparseDelta(tuple(weight.shape), weight.dtype, indices, torch.randn(k, generator=g) * 1e-3, digest(base))
    return shira_hooks.SparseAdapter(deltas, {"mask": "rand"})


def bench_shira(model, sparsity: float, timing: dict) -> dict:
    weights = target_weights(model)
    a, b = random_adapter(weights, sparsity, 1), random_adapter(weights, sparsity, 2)
    started = time.perf_counter()
    shira_hooks.apply(model, b).remove()  # first use of B: fingerprint check and precomputation
    first = time.perf_counter() - started
    current = [shira_hooks.apply(model, a)]
    nxt = [b, a]

    def remove():
        current.pop().remove()

    def apply_next():
        adapter = nxt.pop(0)
        current.append(shira_hooks.apply(model, adapter))
        nxt.append(adapter)

    remove_s, apply_s, switch_s = time_pair(remove, apply_next, **timing)
    current.pop().remove()

    # raw bound: precomputed int64 indices, originals and new values; nothing but index_copy_
    plan = []
    for name, weight in weights.items():
        flat = weight.detach().view(-1)
        ia, ib = a.deltas[name].indices.long(), b.deltas[name].indices.long()
        orig_a, orig_b = flat[ia].clone(), flat[ib].clone()
        plan.append((flat, ia, orig_a, (orig_a + a.deltas[name].values).to(flat.dtype), ib, orig_b, (orig_b + b.deltas[name].values).to(flat.dtype)))
    for flat, ia, _, new_a, *_ in plan:
        flat.index_copy_(0, ia, new_a)
    state = {"on": "a"}

    def raw_switch():
        for flat, ia, orig_a, new_a, ib, orig_b, new_b in plan:
            if state["on"] == "a":
                flat.index_copy_(0, ia, orig_a)
                flat.index_copy_(0, ib, new_b)
            else:
                flat.index_copy_(0, ib, orig_b)
                flat.index_copy_(0, ia, new_a)
        state["on"] = "b" if state["on"] == "a" else "a"

    raw_switch_s, _, _ = time_pair(raw_switch, lambda: None, **timing)

    def raw_single():
        for flat, ia, orig_a, *_ in plan:
            flat.index_copy_(0, ia, orig_a)

    raw_single_s, _, _ = time_pair(raw_single, lambda: None, **timing)  # leaves the base in place
    return {
        "entries": a.num_entries, "first_apply_s": first, "switch": switch_s, "remove": remove_s, "apply": apply_s,
        "raw_switch": raw_switch_s, "raw_single_write": raw_single_s,
    }


def bench_peft(model, rank: int, timing: dict) -> dict:
    from peft import LoraConfig, ShiraConfig, get_peft_model
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    results = {}
    lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    lora = get_peft_model(copy.deepcopy(model), lora_config)
    results["lora_params"] = sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)
    _, _, results["lora_merge_unmerge"] = time_pair(lora.merge_adapter, lora.unmerge_adapter, **timing)

    # hot-swap (unfused): two LoRA state dicts of the same shapes, swapped in turn
    state_a = {k: v.clone() for k, v in lora.state_dict().items() if "lora_" in k}  # keys name the adapter
    g = torch.Generator().manual_seed(3)
    state_b = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state_a.items()}
    turn = [state_b, state_a]

    def swap():
        state = turn.pop(0)
        hotswap_adapter_from_state_dict(lora, state, adapter_name="default", config=lora_config)
        turn.append(state)

    results["lora_hotswap"], _, _ = time_pair(swap, lambda: None, **timing)

    shira = get_peft_model(copy.deepcopy(model), ShiraConfig(r=rank, target_modules=TARGETS, random_seed=0))
    results["peft_shira_params"] = sum(p.numel() for n, p in shira.named_parameters() if "shira_" in n)
    with torch.no_grad():  # non-zero deltas, as after training
        for n, p in shira.named_parameters():
            if "shira_weight" in n:
                p.normal_(0, 1e-3)
    _, _, results["peft_shira_merge_unmerge"] = time_pair(shira.merge_adapter, shira.unmerge_adapter, **timing)
    return results


def markdown(row: dict, info: dict, command: str) -> str:
    ms = lambda s: f"{s.median * 1e3:.1f}"
    rng = lambda s: f"{s.min * 1e3:.1f}-{s.max * 1e3:.1f}"
    switch = row["switch"].median
    lines = report_header("`benchmarks/switch_model.py`: one adapter switch, whole model", command, info) + [
        f"Model: Llama architecture from SmolLM2-135M's config, {row['layers']} layers, {row['targets']} target Linear weights, float32.",
        f"Trainable entries: shira_hooks {row['entries']:,} (sparsity {row['sparsity']:g}); PEFT LoRA r={row['rank']} {row['lora_params']:,}; "
        f"PEFT SHiRA r={row['rank']} {row['peft_shira_params']:,}.",
        "",
        "| method | median ms | min-max ms | vs shira_hooks switch |",
        "|---|---:|---:|---:|",
    ]
    entries = [
        ("shira_hooks switch (remove A + apply B)", row["switch"]),
        ("raw bound: 2 index_copy_ per weight", row["raw_switch"]),
        ("raw bound: 1 index_copy_ per weight (a single write)", row["raw_single_write"]),
        ("PEFT LoRA merge_adapter + unmerge_adapter", row["lora_merge_unmerge"]),
        ("PEFT SHiRA merge_adapter + unmerge_adapter", row["peft_shira_merge_unmerge"]),
        ("PEFT LoRA hotswap_adapter_from_state_dict (unfused)", row["lora_hotswap"]),
    ]
    for name, stats in entries:
        lines.append(f"| {name} | {ms(stats)} | {rng(stats)} | {stats.median / switch:.2f}x |")
    lines += [
        "",
        f"shira_hooks switch / raw 2-write bound: {switch / row['raw_switch'].median:.2f}x; "
        f"PEFT LoRA merge+unmerge / shira_hooks switch: {row['lora_merge_unmerge'].median / switch:.1f}x; "
        f"first apply of an adapter (fingerprint check + precomputation): {row['first_apply_s'] * 1e3:.1f} ms.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=20.0)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--results", metavar="RESULTS.md")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    timing = dict(warmup=1 if args.quick else 3, repeats=3 if args.quick else args.repeats, budget=0.5 if args.quick else args.budget)

    import peft  # noqa: F401  (its version goes into the machine line)

    model = build_model(args.quick)
    weights = target_weights(model)
    row = {"layers": model.config.num_hidden_layers, "targets": len(weights), "sparsity": args.sparsity, "rank": masks.lora_rank((w.shape for w in weights.values()), args.sparsity)}
    row.update(bench_shira(model, args.sparsity, timing))
    row.update(bench_peft(model, row["rank"], timing))
    info = machine()
    command = command_line("python benchmarks/switch_model.py", argv)
    text = markdown(row, info, command)
    print(text)
    publish("switch_model", text, {"command": command, "machine": info, "result": row}, args.json, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
