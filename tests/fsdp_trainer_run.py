"""The HF Trainer under FSDP2 with ShiraCallback, in processes started by ``accelerate launch`` (test_fsdp.py).

    accelerate launch --config_file fsdp2.yaml tests/fsdp_trainer_run.py OUTPUT_DIR [MODE]

MODE is attach's mode (default dense); with compact/sparse ``fully_shard`` also shards ``shira_values``; ``dora``:
``mode="sparse", dora=True`` (it also shards ``shira_magnitude``).

Accelerate turns its FSDP plugin on only for accelerator devices: on CPU (``MULTI_CPU``) it silently
falls back to DDP, which is why an earlier Trainer run "with FSDP2" on CPU trained exactly (its
parameters were never sharded). On a machine without GPUs this script therefore sets the state to
FSDP itself (``_fsdp_on_cpu``), so that the Trainer runs Accelerate's real FSDP2 path
(``fsdp2_prepare_model``: ``fully_shard`` per decoder layer and the root, after ``attach``), with gloo.
Each rank writes ``rank<r>.json``.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def _fsdp_on_cpu() -> None:
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = patched


def main() -> None:
    out = Path(sys.argv[1])
    mode = sys.argv[2] if len(sys.argv) > 2 else "dense"
    options = {"mode": "sparse", "dora": True} if mode == "dora" else {"mode": mode}
    if not torch.cuda.is_available():
        _fsdp_on_cpu()
    from transformers import Trainer, TrainingArguments

    import shira_hooks
    from shira_hooks.distributed import gather
    from shira_hooks.integrations import ADAPTER_FILE, STATE_FILE, ShiraCallback

    from conftest import llama_batches, make_llama

    torch.set_num_threads(1)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=0.05,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        disable_tqdm=True,
        remove_unused_columns=False,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )  # the FSDP2 options come from the accelerate config file
    model = make_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    shira = shira_hooks.attach(model, 0.05, "rand", seed=3, **options)  # before the Trainer shards the model
    rows = [{k: v[i] for k, v in b.items()} for b in llama_batches(8, seed=1) for i in range(4)]
    callback = ShiraCallback(shira)
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()

    rank = torch.distributed.get_rank()
    full = {n: gather(p.detach()).cpu() for n, p in model.named_parameters()}  # every rank: a collective
    changed = {n: (full[n] != base[n]).reshape(-1).nonzero().reshape(-1) for n in shira.target_names}
    probe = llama_batches(1, seed=99)[0]
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"].to(trainer.args.device)).logits.cpu()
    report = {
        "fsdp": trainer.is_fsdp_enabled,
        "weight_type": type(model.model.layers[0].mlp.up_proj.weight).__name__,
        "values_type": type(getattr(model.model.layers[0].mlp.up_proj, "shira_values", None)).__name__,
        "verify": callback.report["changed_outside_masks"],
        "changed": sum(c.numel() for c in changed.values()),
        "budget": shira.num_trainable,
        "outside": sum(int((~torch.isin(changed[n], i.long())).sum()) for n, i in shira.masks.items()),
        "masks": {n: i.tolist() for n, i in shira.masks.items()},
    }
    if rank == 0:  # the saved adapter on a fresh base reproduces the trained (sharded) model
        adapter = shira_hooks.SparseAdapter.load(out / ADAPTER_FILE)
        fresh = make_llama()
        with shira_hooks.apply(fresh, adapter), torch.no_grad():
            report["logits_error"] = float((fresh(input_ids=probe["input_ids"]).logits - logits).abs().max())
        state = shira_hooks.attach(make_llama(), 0.05, "rand", seed=4, **options)
        state.load_state(out / "checkpoint-4" / STATE_FILE)
        report["checkpoint_masks_equal"] = {n: i.tolist() for n, i in state.masks.items()} == report["masks"]
        report["checkpoint_adapter"] = (out / "checkpoint-4" / ADAPTER_FILE).exists()
        state.detach()

    # Resume: a fresh model and a handle with other masks continue from checkpoint-2 to step 4. The Trainer
    # loads the sharded model and optimizer state, ShiraCallback the masks: the same run as without the stop.
    args.output_dir = str(out / "resumed")
    model = make_llama()
    again = shira_hooks.attach(model, 0.05, "rand", seed=4, **options)
    callback = ShiraCallback(again, resume_from=out / "checkpoint-2")
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train(
        resume_from_checkpoint=str(out / "checkpoint-2")
    )
    report["resumed_masks_equal"] = {n: i.tolist() for n, i in again.masks.items()} == report["masks"]
    report["resumed_verify"] = callback.report["changed_outside_masks"]
    if rank == 0:
        first, resumed = (shira_hooks.SparseAdapter.load(folder / ADAPTER_FILE) for folder in (out, out / "resumed"))
        report["resumed_adapter_error"] = max(
            float((first.deltas[n].values - d.values).abs().max()) for n, d in resumed.deltas.items()
        )
    again.detach()
    shira.detach()
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
