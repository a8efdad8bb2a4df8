"""Whole-model adapter switching: shira_hooks against PEFT and the bounds, each method in its own processes.

    python benchmarks/switch_model.py --results benchmarks/RESULTS.md --json benchmarks/switch_model.json
    python benchmarks/switch_model.py --llama --results benchmarks/RESULTS.md --json benchmarks/switch_model_llama.json
    python benchmarks/switch_model.py --quick          # 2 layers, 1 round (used by the tests)

The 210 target Linear weights of SmolLM2-135M-Instruct (its config: 30 layers of q/k/v/o/gate/up/down
projections, hidden 576, intermediate 1536), random values (switching cost does not depend on them;
nothing is downloaded), in a plain module tree with the model's names, so that the shira_hooks workers
do not import transformers. One switch is:

* shira_hooks: ``remove()`` adapter A, ``apply()`` adapter B (rand masks at 1% of each weight),
  unstructured (block 1) and with ``block=16`` (float32; one 64-byte line) or ``block=32`` (bfloat16),
  on the weights as they are (one write per weight) and after ``shira_hooks.pack(model)`` (one write per
  arena); ``--blocks`` adds both at other block sizes (float32; the block-size trade-off);
* raw bounds: the same writes as bare ``index_copy_`` calls on precomputed tensors (2 per weight; for
  blocks on the weight's ``(numel // B, B)`` view), and "packed": the weights made views of one
  buffer, so that a switch is 2 ``index_copy_`` calls for the whole model (one write for all weights);
* the in-place LoRA bound: ``W.addmm_(B, A)`` then ``W.addmm_(B, A, alpha=-1)`` weight by weight, at
  the rank whose parameter count matches the SHiRA budget: what any LoRA fuse + unfuse must pay;
* PEFT LoRA ``merge_adapter()`` + ``unmerge_adapter()`` (same rank) with glibc's allocator warm
  (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``/``MALLOC_TOP_PAD_`` = 1 GiB: freed deltas stay in
  the heap and are reused), cold (``MALLOC_MMAP_THRESHOLD_=131072``: a fixed threshold, so every delta
  of a layer is a fresh ``mmap``, faulted in page by page and unmapped on free), and unset (glibc's
  dynamic threshold: what a user gets, warm or cold depending on the process's history);
* with ``--extras``: PEFT SHiRA merge + unmerge and PEFT LoRA hot-swap (unfused), float32, unset
  allocator, and PEFT LoRA in bfloat16 with cold pages.

``--llama`` builds the weights as a real ``transformers`` ``LlamaForCausalLM`` from the same config
(embedding, norms and head included; random values) instead of the plain module tree. The memory of
``pack`` itself is measured in a process of its own: resident memory before, and the peak while packing
(``VmHWM`` after resetting it through ``/proc/self/clear_refs``) with ``--chunk-mb`` arenas.

Every method runs in its own processes, ``--rounds`` times, the methods alternating (forward order on
even rounds, reverse on odd ones); a process warms up, then times up to ``--repeats`` switches.
Reported: median, min and max over all timed switches of all rounds, and the range of the per-round
medians (how much a method moves from one process to the next).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import shira_hooks
from shira_hooks import masks
from shira_hooks.tools import command_line, machine, publish, report_header

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS = 576, 1536, 30, 9, 3  # SmolLM2-135M-Instruct's config
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = str(2**30)
ALLOCATOR = {  # glibc malloc tunables (mallopt through the environment)
    "warm": {"MALLOC_MMAP_THRESHOLD_": GIB, "MALLOC_TRIM_THRESHOLD_": GIB, "MALLOC_TOP_PAD_": GIB},
    "cold": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "unset": {},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------------------- model
class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        head = HIDDEN // HEADS
        self.q_proj, self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False), nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj, self.v_proj = (
            nn.Linear(HIDDEN, KV_HEADS * head, bias=False),
            nn.Linear(HIDDEN, KV_HEADS * head, bias=False),
        )


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = (
            nn.Linear(HIDDEN, INTERMEDIATE, bias=False),
            nn.Linear(HIDDEN, INTERMEDIATE, bias=False),
        )
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn, self.mlp = Attention(), MLP()


class Stack(nn.Module):
    def __init__(self, layers: int):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(layers))

    def forward(self, x):  # PEFT wraps models it can call; never called here
        return x


class Model(nn.Module):
    """``model.layers.N.self_attn.q_proj`` ...: the names of the Llama model's target layers."""

    def __init__(self, layers: int):
        super().__init__()
        self.model = Stack(layers)

    def forward(self, x):
        return x


def build_model(layers: int, dtype: torch.dtype, llama: bool = False) -> nn.Module:
    """The plain module tree, or (``llama``) transformers' LlamaForCausalLM with SmolLM2-135M's config."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = llama_model(layers) if llama else Model(layers)
    model = model.to_empty(device="cpu").to(dtype).requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def llama_model(layers: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def target_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {
        f"{n}.weight": m.weight
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[-1] in TARGETS
    }


def random_adapter(weights: dict, sparsity: float, seed: int, block: int) -> shira_hooks.SparseAdapter:
    """A rand-mask adapter (block runs if ``block`` > 1) with random deltas, fingerprinted against the weights."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, weight in weights.items():
        k = masks.budget(weight.numel(), sparsity, block)
        indices = masks.rand_mask(weight.numel(), k, masks.generator_for(seed, name), block)
        base = weight.detach().reshape(-1)[indices.long()]
        deltas[name] = shira_hooks.SparseDelta(
            tuple(weight.shape),
            weight.dtype,
            indices,
            torch.randn(k, generator=g) * 1e-3,
            shira_hooks.digest(base),
            block,
        )
    return shira_hooks.SparseAdapter(deltas, {"mask": "rand"})


# -------------------------------------------------------------------------------------- workers
def shira_switch(model, adapters):
    """remove() the applied adapter, apply() the other: (first, second) callables for time_pair."""
    a, b = adapters
    shira_hooks.apply(model, b).remove()  # first use of B: fingerprint check and precomputation
    current, turn = [shira_hooks.apply(model, a)], [b, a]

    def apply_next():
        adapter = turn.pop(0)
        current.append(shira_hooks.apply(model, adapter))
        turn.append(adapter)

    return (lambda: current.pop().remove()), apply_next


def raw_plan(weights, adapters, block: int, packed: bool):
    """(flat tensor, run or entry numbers, values to write) per write of one switch direction, precomputed."""
    flats, offsets = {}, {}
    if packed:  # every weight becomes a view of one buffer: 2 writes per switch for the whole model
        total = sum(w.numel() for w in weights.values())
        buffer = torch.empty(total, dtype=next(iter(weights.values())).dtype)
        offset = 0
        for name, w in weights.items():
            buffer[offset : offset + w.numel()].copy_(w.detach().reshape(-1))
            w.data = buffer[offset : offset + w.numel()].view(w.shape)
            flats[name], offsets[name] = buffer, offset
            offset += w.numel()
    else:
        flats = {name: w.detach().view(-1) for name, w in weights.items()}
        offsets = dict.fromkeys(weights, 0)
    plans = []
    for adapter in adapters:
        rows, originals, written, targets = [], [], [], []
        for name, delta in adapter.deltas.items():
            flat, index = flats[name], delta.indices.long() + offsets[name]
            base = flat[index]
            rows.append(index[::block] // block)
            originals.append(base)
            written.append((base.float() + delta.values).to(flat.dtype))
            targets.append(flat)
        if packed:
            rows, originals, written, targets = (
                [torch.cat(rows)],
                [torch.cat(originals)],
                [torch.cat(written)],
                [targets[0]],
            )
        shaped = (lambda t: t.view(-1, block)) if block > 1 else (lambda t: t)  # block 1: the library's 1-D writes
        plans.append(
            [(shaped(flat), r, shaped(o), shaped(n)) for flat, r, o, n in zip(targets, rows, originals, written)]
        )
    return plans


def raw_switch(weights, adapters, block: int, packed: bool):
    plan_a, plan_b = raw_plan(weights, adapters, block, packed)
    for view, rows, _, new in plan_a:
        view.index_copy_(0, rows, new)
    state = {"on": 0}

    def switch():
        on, off = (plan_a, plan_b) if state["on"] == 0 else (plan_b, plan_a)
        for view, rows, original, _ in on:
            view.index_copy_(0, rows, original)
        for view, rows, _, new in off:
            view.index_copy_(0, rows, new)
        state["on"] ^= 1

    return switch, (lambda: None)


def addmm_bound(weights, rank: int):
    """In-place LoRA fuse + unfuse, weight by weight: W += B @ A, then W -= B @ A (no temporaries)."""
    g = torch.Generator().manual_seed(3)
    pairs = []
    for w in weights.values():
        out, inp = w.shape
        pairs.append(
            (
                w.detach(),
                (torch.randn(out, rank, generator=g) * 0.01).to(w.dtype),
                (torch.randn(rank, inp, generator=g) * 0.01).to(w.dtype),
            )
        )

    def fuse():
        for w, b, a in pairs:
            w.addmm_(b, a)

    def unfuse():
        for w, b, a in pairs:
            w.addmm_(b, a, alpha=-1)

    return fuse, unfuse


def peft_methods(model, method: str, rank: int):
    import warnings

    from peft import LoraConfig, ShiraConfig, get_peft_model

    warnings.filterwarnings("ignore")
    if method == "peft_shira":
        peft_model = get_peft_model(model, ShiraConfig(r=rank, target_modules=TARGETS, random_seed=0))
        with torch.no_grad():  # non-zero deltas, as after training
            for n, p in peft_model.named_parameters():
                if "shira_weight" in n:
                    p.normal_(0, 1e-3)
        return peft_model.merge_adapter, peft_model.unmerge_adapter
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    if method != "lora_hotswap":
        return peft_model.merge_adapter, peft_model.unmerge_adapter
    from peft.utils.hotswap import hotswap_adapter_from_state_dict

    state_a = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_" in k}
    g = torch.Generator().manual_seed(3)
    turn = [{k: (torch.randn(v.shape, generator=g) * 0.01).to(v.dtype) for k, v in state_a.items()}, state_a]

    def swap():
        state = turn.pop(0)
        hotswap_adapter_from_state_dict(peft_model, state, adapter_name="default", config=config)
        turn.append(state)

    return swap, (lambda: None)


def worker(case: dict, args) -> dict:
    """Time one case in this process: warm-up, then up to ``repeats`` switches; the samples in seconds."""
    torch.set_num_threads(args.threads)
    dtype, block, method = DTYPES[case["dtype"]], case.get("block", 1), case["method"]
    if method == "pack_memory":
        return pack_memory(args)
    model = build_model(args.layers, dtype, args.llama)
    weights = target_weights(model)
    rank = masks.lora_rank((w.shape for w in weights.values()), args.sparsity)
    if method in ("shira", "shira_packed", "raw", "packed"):
        adapters = [random_adapter(weights, args.sparsity, seed, block) for seed in (1, 2)]
        if method == "shira_packed":
            shira_hooks.pack(model, TARGETS)
        if method.startswith("shira"):
            first, second = shira_switch(model, adapters)
        else:
            first, second = raw_switch(weights, adapters, block, method == "packed")
    elif method == "addmm":
        first, second = addmm_bound(weights, rank)
    else:
        first, second = peft_methods(model, method, rank)
    for _ in range(args.warmup):
        first(), second()
    samples, started = [], time.perf_counter()
    while len(samples) < args.repeats and (len(samples) < 3 or time.perf_counter() - started < args.budget):
        t0 = time.perf_counter()
        first()
        second()
        samples.append(time.perf_counter() - t0)
    return {"samples": samples, "rank": rank}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def pack_memory(args) -> dict:
    """Resident memory before packing and its peak while packing and while unpacking, in MB."""
    model = build_model(args.layers, torch.float32, args.llama)
    weights = target_weights(model)
    target_mb = sum(w.numel() * w.element_size() for w in weights.values()) / 2**20
    peaks = {}
    before = _status_kb("VmRSS") / 1024
    for phase in ("pack", "unpack"):
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM (the peak) to the current resident size
            f.write("5")
        start = _status_kb("VmRSS") / 1024
        if phase == "pack":
            packed = shira_hooks.pack(model, TARGETS, chunk_mb=args.chunk_mb)
        else:
            packed.unpack()
        peaks[phase] = {"start_mb": start, "peak_mb": _status_kb("VmHWM") / 1024, "end_mb": _status_kb("VmRSS") / 1024}
    return {
        "samples": [0.0],
        "rank": None,
        "target_mb": target_mb,
        "before_mb": before,
        "chunk_mb": args.chunk_mb,
        "phases": peaks,
    }


# --------------------------------------------------------------------------------------- parent
def cases(quick: bool, extras: bool, blocks: list[int] = ()) -> list[dict]:
    """What is timed: label, dtype, method, block, allocator. ``extras``: PEFT SHiRA, PEFT hot-swap and bfloat16
    cold pages too; ``blocks``: the packed and per-weight switches at these float32 block sizes too."""
    rows = []
    for dtype, block in (("float32", 16), ("bfloat16", 32)):
        rows += [
            dict(dtype=dtype, method="shira", block=1, label="shira_hooks switch, unstructured"),
            dict(dtype=dtype, method="shira", block=block, label=f"shira_hooks switch, block={block}"),
            dict(
                dtype=dtype,
                method="shira_packed",
                block=block,
                label=f"shira_hooks switch on packed weights, block={block}",
            ),
            dict(dtype=dtype, method="raw", block=1, label="raw bound: 2 index_copy_ per weight, unstructured"),
            dict(dtype=dtype, method="raw", block=block, label=f"raw bound: 2 index_copy_ per weight, block={block}"),
            dict(
                dtype=dtype,
                method="packed",
                block=block,
                label=f"packed raw bound: 2 index_copy_ for all weights, block={block}",
            ),
            dict(dtype=dtype, method="addmm", label="in-place LoRA bound: addmm_ fuse + unfuse"),
            dict(dtype=dtype, method="lora", allocator="warm", label="PEFT LoRA merge + unmerge, warm allocator"),
        ]
        if dtype == "float32":
            rows += [
                dict(
                    dtype=dtype,
                    method="shira_packed",
                    block=1,
                    label="shira_hooks switch on packed weights, unstructured",
                ),
                dict(
                    dtype=dtype,
                    method="packed",
                    block=1,
                    label="packed raw bound: 2 index_copy_ for all weights, unstructured",
                ),
            ]
        if dtype == "float32" or extras:
            rows.append(
                dict(dtype=dtype, method="lora", allocator="cold", label="PEFT LoRA merge + unmerge, cold pages")
            )
        if dtype == "float32":
            rows.append(
                dict(dtype=dtype, method="lora", allocator="unset", label="PEFT LoRA merge + unmerge, allocator unset")
            )
        if dtype == "float32" and extras:
            rows += [
                dict(dtype=dtype, method="peft_shira", label="PEFT SHiRA merge + unmerge"),
                dict(dtype=dtype, method="lora_hotswap", label="PEFT LoRA hot-swap (unfused)"),
            ]
    have = {(r["dtype"], r["method"], r.get("block", 1)) for r in rows}
    for block in blocks:
        for method, label in (
            ("shira_packed", "shira_hooks switch on packed weights"),
            ("shira", "shira_hooks switch"),
            ("packed", "packed raw bound: 2 index_copy_ for all weights"),
        ):
            if ("float32", method, block) not in have:
                rows.append(dict(dtype="float32", method=method, block=block, label=f"{label}, block={block}"))
    if quick:  # one of each kind of worker, float32
        rows = [
            r
            for r in rows
            if r["dtype"] == "float32"
            and (r.get("block", 1) > 1 or r["method"] == "addmm" or r.get("allocator") == "cold")
        ]
    for row in rows:
        row["key"] = f"{row['dtype']}/{row['method']}/b{row.get('block', 1)}/{row.get('allocator', 'unset')}"
    return rows


def run_case(case: dict, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(ALLOCATOR[case.get("allocator", "unset")])
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps(case),
        "--layers",
        str(args.layers),
        "--sparsity",
        str(args.sparsity),
        "--threads",
        str(args.threads),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--budget",
        str(args.budget),
        "--chunk-mb",
        str(args.chunk_mb),
    ] + (["--llama"] if args.llama else [])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"worker {case['key']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bytes_moved(layers: int, sparsity: float) -> dict[str, dict[str, int]]:
    """Per dtype, bytes of weight memory one switch reads and writes, from the masks (64-byte lines).

    A sparse switch touches every 64-byte line that holds an entry of A (restored) or of B (written):
    each such line is read and written once (2 x 64 bytes). A dense fuse + unfuse reads and writes
    every weight entry twice (4 x numel x element size; PEFT's per-layer delta temporaries come on top).
    """
    out = {}
    shapes = {n: tuple(w.shape) for n, w in target_weights(build_model(layers, torch.float32)).items()}
    numel = sum(torch.Size(s).numel() for s in shapes.values())
    for dtype, block in (("float32", 16), ("bfloat16", 32)):
        size = DTYPES[dtype].itemsize
        row = {"dense": 4 * numel * size}
        for b in (1, block):
            lines = entries = 0
            for seed in (1, 2):
                for name, shape in shapes.items():
                    n = torch.Size(shape).numel()
                    k = masks.budget(n, sparsity, b)
                    index = masks.rand_mask(n, k, masks.generator_for(seed, name), b).long()
                    lines += torch.unique(index * size // 64).numel()
                    entries += k
            row[f"lines_b{b}"] = 2 * 64 * lines
            row[f"entries_b{b}"] = 2 * entries * size  # the bytes of the entries themselves, read and written
        out[dtype] = row
    return out


def reference_ms() -> float:
    """Median ms of one index_copy_ of 1% scattered entries into a 4096 x 4096 float32 weight, in this process:
    a yardstick of how busy the machine is (0.2 ms on the project's machine when it is quiet)."""
    g = torch.Generator().manual_seed(0)
    weight = torch.zeros(4096 * 4096)
    index = torch.randperm(weight.numel(), generator=g)[: weight.numel() // 100].sort().values
    values = torch.randn(index.numel(), generator=g)
    times = []
    for _ in range(12):
        started = time.perf_counter()
        weight.index_copy_(0, index, values)
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:]) * 1e3


def summarize(samples: list[list[float]]) -> dict:
    pooled = [s for round_ in samples for s in round_]
    medians = [statistics.median(r) for r in samples]
    return {
        "median": statistics.median(pooled),
        "min": min(pooled),
        "max": max(pooled),
        "round_medians": medians,
        "n": len(pooled),
    }


def markdown(rows: list[dict], results: dict, moved: dict, info: dict, command: str, extra: dict) -> str:
    ms = lambda s: f"{s * 1e3:.1f}"
    lines = report_header("`benchmarks/switch_model.py`: one adapter switch, whole model", command, info) + [
        f"Weights: the {extra['targets']} target Linear weights of SmolLM2-135M's config ({extra['layers']} layers"
        + (", a transformers `LlamaForCausalLM`" if extra.get("llama") else ", a plain module tree")
        + f"), sparsity "
        f"{extra['sparsity']:g} (rand masks; block masks round k to whole blocks), LoRA rank {extra['rank']} (parameter count "
        f"matched to the SHiRA budget). Each method ran in its own processes, {extra['rounds']} rounds alternating the methods' "
        f"order; times are over all timed switches of all rounds; `per-round medians` shows how much a method moved "
        f"between processes. Load average before / after: {extra['load_before']} / {extra['load_after']}"
        + (
            f"; a yardstick of how busy the machine was, one `index_copy_` of 1% scattered entries into a 4096 x 4096 float32 "
            f"weight, took {extra['reference_ms'][0]:.2f} / {extra['reference_ms'][1]:.2f} ms before / after (about 0.2 ms on a quiet "
            f"machine here)."
            if "reference_ms" in extra
            else "."
        ),
        "",
        "Allocator states (glibc `malloc`, set through its environment tunables): warm = `MALLOC_MMAP_THRESHOLD_`, "
        "`MALLOC_TRIM_THRESHOLD_` and `MALLOC_TOP_PAD_` at 1 GiB, so a freed delta stays in the heap and the next one "
        "reuses its pages (steady state); cold = `MALLOC_MMAP_THRESHOLD_=131072`, a fixed threshold, so every delta "
        "is a fresh `mmap` whose pages fault in on first touch; unset = glibc's dynamic threshold (what a user gets).",
        "",
    ]
    for dtype in ("float32", "bfloat16"):
        mine = [r for r in rows if r["dtype"] == dtype]
        if not mine:
            continue
        block = 16 if dtype == "float32" else 32
        by = {r["key"]: results[r["key"]] for r in mine}
        headline = by.get(f"{dtype}/shira_packed/b{block}/unset")
        lines += [
            f"### {dtype}",
            "",
            f"| method | median ms | min-max ms | per-round medians ms | x packed block={block} switch |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in mine:
            s = by[r["key"]]
            x = s["median"] / headline["median"] if headline else None
            ratio = "-" if x is None else f"{x:.2f}x" if x < 1 else f"{x:.1f}x"
            lines.append(
                f"| {r['label']} | {ms(s['median'])} | {ms(s['min'])}-{ms(s['max'])} | {' / '.join(ms(m) for m in s['round_medians'])} | {ratio} |"
            )
        m = moved.get(dtype)
        if m:
            lines += [
                "",
                f"Bytes of weight memory per switch: unstructured {m['lines_b1'] / 1e6:.1f} MB (64-byte lines holding an entry, read "
                f"and written), block={block} {m[f'lines_b{block}'] / 1e6:.1f} MB, the entries themselves {m['entries_b1'] / 1e6:.1f} MB; "
                f"a dense fuse + unfuse {m['dense'] / 1e6:.0f} MB (every entry read and written twice, before PEFT's temporaries).",
            ]
        # by and dtype bound now (the lambdas are used within this iteration only, but say so)
        get = lambda key, by=by, dtype=dtype: by.get(f"{dtype}/{key}")
        times = lambda key, of, get=get: (
            get(key)["median"] / get(of)["median"] if get(key) and get(of) else float("nan")
        )
        if headline:
            cold = (
                f"; {times('lora/b1/cold', f'shira_packed/b{block}/unset'):.0f}x against cold pages"
                if get("lora/b1/cold")
                else ""
            )
            lines += [
                "",
                f"**Packed block={block} switch** (medians; PEFT at steady state = warm allocator): "
                f"{times('addmm/b1/unset', f'shira_packed/b{block}/unset'):.1f}x faster than in-place `addmm_` fuse + unfuse (target 20x), "
                f"{times('lora/b1/warm', f'shira_packed/b{block}/unset'):.0f}x faster than PEFT LoRA merge + unmerge (target 100x{cold}), "
                f"{times(f'shira_packed/b{block}/unset', f'packed/b{block}/unset'):.2f}x the time of the packed raw bound (target 1.3x or less), "
                f"{times(f'shira/b{block}/unset', f'shira_packed/b{block}/unset'):.1f}x faster than the same switch unpacked.",
            ]
        if get(f"shira/b{block}/unset"):
            lines += [
                "",
                f"Unpacked (one write per weight): block={block} switch {times(f'shira/b{block}/unset', f'raw/b{block}/unset'):.2f}x "
                f"and unstructured switch {times('shira/b1/unset', 'raw/b1/unset'):.2f}x the time of their per-weight raw bounds "
                f"(target 1.3x or less); block={block} {times('addmm/b1/unset', f'shira/b{block}/unset'):.1f}x faster than `addmm_`.",
            ]
        if get("shira_packed/b1/unset"):
            lines += [
                "",
                f"Unstructured on packed weights: {times('shira_packed/b1/unset', 'packed/b1/unset'):.2f}x its packed raw bound, "
                f"{times('addmm/b1/unset', 'shira_packed/b1/unset'):.1f}x faster than `addmm_`, "
                f"{times('shira/b1/unset', 'shira_packed/b1/unset'):.2f}x faster than unpacked (scattered entries are bound by memory "
                f"latency, not by calls).",
            ]
        lines.append("")
    sizes = sorted({r.get("block", 1) for r in rows if r["dtype"] == "float32" and r["method"] == "shira_packed"})
    if len(sizes) > 2:
        lines += [
            "### Block size (float32): switch time",
            "",
            "| block | packed switch ms | per-weight switch ms | packed raw bound ms |",
            "|---:|---:|---:|---:|",
        ]
        for size in sizes:
            cell = lambda method, size=size: (
                ms(results[key]["median"]) if (key := f"float32/{method}/b{size}/unset") in results else "-"
            )
            lines.append(f"| {size} | {cell('shira_packed')} | {cell('shira')} | {cell('packed')} |")
        lines.append("")
    memory = extra.get("pack_memory")
    if memory:
        p, u = memory["phases"]["pack"], memory["phases"]["unpack"]
        lines += [
            "### Memory of `pack`",
            "",
            f"Target weights {memory['target_mb']:.0f} MB (float32), arenas of at most {memory['chunk_mb']:g} MB. "
            f"Resident before packing {p['start_mb']:.0f} MB; peak while packing {p['peak_mb']:.0f} MB "
            f"(**{p['peak_mb'] - p['start_mb']:.0f} MB above**, target: at most one chunk), after {p['end_mb']:.0f} MB; "
            f"peak while unpacking {u['peak_mb'] - u['start_mb']:.0f} MB above its start, after {u['end_mb']:.0f} MB.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--budget", type=float, default=4.0, help="seconds of timed switches per process (at least 3 switches)"
    )
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--results", metavar="RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="2 layers, 1 round, a few workers")
    parser.add_argument(
        "--extras",
        action="store_true",
        help="also PEFT SHiRA merge + unmerge, PEFT LoRA hot-swap, and bfloat16 cold pages",
    )
    parser.add_argument("--render", metavar="JSON", help="write the report of an earlier run's JSON again (no timing)")
    parser.add_argument(
        "--llama", action="store_true", help="the weights of a transformers LlamaForCausalLM with the same config"
    )
    parser.add_argument(
        "--blocks",
        type=int,
        nargs="*",
        default=[],
        help="also time the packed and per-weight switches at these float32 block sizes",
    )
    parser.add_argument(
        "--chunk-mb", type=float, default=256, help="arena size for pack (and for the memory measurement)"
    )
    parser.add_argument(
        "--section", default="switch_model", help="the RESULTS.md section (and JSON name) this run writes"
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker), args)))
        return 0
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        text = markdown(saved["cases"], saved["results"], saved["bytes"], saved["machine"], saved["command"], saved)
        print(text)
        publish(saved.get("section", "switch_model"), text, saved, None, args.results)
        return 0
    if args.quick:
        args.layers, args.rounds, args.repeats, args.warmup, args.budget = 2, 1, 3, 1, 0.2
    torch.set_num_threads(args.threads)
    rows = cases(args.quick, args.extras, args.blocks)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    reference_before = reference_ms()
    samples: dict[str, list[list[float]]] = {r["key"]: [] for r in rows}
    rank = None
    for round_ in range(args.rounds):
        for case in rows if round_ % 2 == 0 else reversed(rows):
            started = time.perf_counter()
            out = run_case(case, args)
            samples[case["key"]].append(out["samples"])
            rank = out["rank"]
            print(
                f"round {round_ + 1}/{args.rounds} {case['key']:32} median {statistics.median(out['samples']) * 1e3:8.1f} ms "
                f"({len(out['samples'])} switches, process {time.perf_counter() - started:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
    load_after = Path("/proc/loadavg").read_text().split()[:3]
    reference_after = reference_ms()
    pack_mem = run_case({"method": "pack_memory", "dtype": "float32", "key": "pack_memory"}, args)
    results = {key: summarize(s) for key, s in samples.items()}
    moved = bytes_moved(args.layers, args.sparsity)
    import peft  # noqa: F401  (its version goes into the machine line)

    info = machine()
    command = command_line("python benchmarks/switch_model.py", argv)
    extra = {
        "layers": args.layers,
        "targets": args.layers * len(TARGETS),
        "sparsity": args.sparsity,
        "rank": rank,
        "rounds": args.rounds,
        "load_before": " ".join(load_before),
        "load_after": " ".join(load_after),
        "reference_ms": [round(reference_before, 3), round(reference_after, 3)],
        "llama": args.llama,
        "pack_memory": {k: v for k, v in pack_mem.items() if k not in ("samples", "rank")},
    }
    text = markdown(rows, results, moved, info, command, extra)
    print(text)
    payload = {
        "command": command,
        "machine": info,
        "section": args.section,
        **extra,
        "cases": rows,
        "results": results,
        "bytes": moved,
    }
    publish(args.section, text, payload, args.json, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
