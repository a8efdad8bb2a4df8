"""ShiraCallback with real transformers.Trainer and trl.SFTTrainer runs on a tiny Llama (offline)."""

import logging

import pytest
import torch

pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402

import shira_hooks  # noqa: E402
from shira_hooks import ShiraError, SparseAdapter, apply  # noqa: E402
from shira_hooks.integrations import ADAPTER_FILE, STATE_FILE, ShiraCallback  # noqa: E402

from conftest import assert_changes_within_masks, llama_batches, make_llama, snapshot, tiny_texts, tiny_tokenizer  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, seed=1):
        self.items = [
            {"input_ids": row, "labels": row} for b in llama_batches(n // 4, seed=seed) for row in b["input_ids"]
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_grad_norm=1.0,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def _logits(model, seed=9):
    ids = llama_batches(1, seed=seed)[0]["input_ids"]
    with torch.no_grad():
        return model(ids).logits


def test_trainer_writes_an_exact_adapter(tmp_path, caplog):
    model = make_llama()
    base = snapshot(model)
    shira = shira_hooks.attach(model, 0.02, "snip", calibration=llama_batches(2), progress=False)
    callback = ShiraCallback(shira)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[callback])
    with caplog.at_level(logging.INFO, logger="shira_hooks"):
        trainer.train()
    assert f"{shira.num_trainable:,} trainable entries; entries changed outside the masks: none" in caplog.text
    assert callback.report["changed_outside_masks"] == []
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.1  # the Trainer's AdamW, with decay
    assert assert_changes_within_masks(shira, base, model) > 0
    adapter = SparseAdapter.load(tmp_path / ADAPTER_FILE)
    assert adapter.num_entries == shira.num_trainable
    fresh = make_llama()
    with apply(fresh, adapter):
        assert (_logits(fresh) - _logits(model)).abs().max() <= 1e-5
    shira.detach()


def test_sft_trainer(tmp_path):
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    tokenizer = tiny_tokenizer()
    model = make_llama()
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    base = snapshot(model)
    shira = shira_hooks.attach(model, 0.02, "wm")
    config = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        weight_decay=0.1,
        max_length=24,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        bf16=False,
        logging_steps=1,
    )
    data = datasets.Dataset.from_dict({"text": tiny_texts(32)})
    trainer = SFTTrainer(
        model=model, args=config, train_dataset=data, processing_class=tokenizer, callbacks=[ShiraCallback(shira)]
    )
    trainer.train()
    assert assert_changes_within_masks(shira, base, model) > 0
    adapter = SparseAdapter.load(tmp_path / ADAPTER_FILE)
    fresh = make_llama()
    with apply(fresh, adapter):
        assert (_logits(fresh) - _logits(model)).abs().max() <= 1e-5
    shira.detach()


def test_resume_keeps_identical_masks_and_continues(tmp_path):
    def run(calibration_seed, resume=None, max_steps=6):
        model = make_llama()
        shira = shira_hooks.attach(
            model, 0.02, "grad", calibration=llama_batches(2, seed=calibration_seed), progress=False
        )
        args = _args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=3)
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ShiraCallback(shira)])
        trainer.train(resume_from_checkpoint=resume)
        return model, shira

    full, first = run(calibration_seed=1)
    checkpoint = tmp_path / "checkpoint-3"
    assert (checkpoint / STATE_FILE).exists() and (checkpoint / ADAPTER_FILE).exists()
    masks, final = first.masks, snapshot(full)
    first.detach()
    # a new process would calibrate on other data: different masks, until the state is restored
    resumed, second = run(calibration_seed=7, resume=str(checkpoint))
    assert all(torch.equal(second.masks[n], i) for n, i in masks.items())
    for name, param in resumed.named_parameters():
        torch.testing.assert_close(param, final[name], rtol=1e-5, atol=1e-6)
    assert second.verify() == []  # measured against the base of the first run
    second.detach()


def test_callback_refuses_a_model_without_handle(tmp_path):
    with pytest.raises(ShiraError, match=r"ShiraCallback has no handle: the Trainer's model was not attached"):
        Trainer(model=make_llama(), args=_args(tmp_path), train_dataset=Tokens(), callbacks=[ShiraCallback()])
    other = make_llama()
    shira = shira_hooks.attach(other, 0.02, "rand")
    with pytest.raises(
        ShiraError,
        match=r"the Trainer's model \(LlamaForCausalLM at 0x[0-9a-f]+\) is not the model the handle was attached",
    ):
        Trainer(model=make_llama(), args=_args(tmp_path), train_dataset=Tokens(), callbacks=[ShiraCallback(shira)])
    shira.detach()


def test_attach_at_train_begin_from_the_trainers_dataloader(tmp_path):
    model = make_llama()
    base = snapshot(model)
    callback = ShiraCallback(sparsity=0.02, mask="grad", calibration_batches=2, progress=False)
    Trainer(model=model, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[callback]).train()
    shira = callback.handle
    assert shira.calibrated and shira.verify() == []
    assert assert_changes_within_masks(shira, base, model) > 0
    assert (tmp_path / ADAPTER_FILE).exists()
    shira.detach()


def test_gradient_checkpointing_and_bf16_autocast(tmp_path):
    model = make_llama()
    base = snapshot(model)
    shira = shira_hooks.attach(model, 0.02, "rand")
    args = _args(tmp_path, gradient_checkpointing=True, bf16=True)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ShiraCallback(shira)]).train()
    assert assert_changes_within_masks(shira, base, model) > 0
    assert shira.verify() == []
    shira.detach()


def test_torch_compile(tmp_path):
    model = make_llama()
    base = snapshot(model)
    shira = shira_hooks.attach(model, 0.02, "rand")
    args = _args(tmp_path, torch_compile=True, max_steps=3)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ShiraCallback(shira)]).train()
    assert assert_changes_within_masks(shira, base, model) > 0  # the hooks fire under torch.compile
    assert shira.verify() == []
    shira.detach()


@pytest.mark.parametrize("mode", ["compact", "sparse"])
def test_trainer_with_compact_modes_and_resume(tmp_path, mode):
    def run(resume=None, mask_seed=0):
        model = make_llama()
        shira = shira_hooks.attach(model, 0.02, "rand", seed=mask_seed, mode=mode)
        args = _args(tmp_path, save_strategy="steps", save_steps=3)  # accumulation 2, clipping 1.0, AdamW wd 0.1
        trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[ShiraCallback(shira)])
        trainer.train(resume_from_checkpoint=resume)
        return model, shira, trainer

    base = snapshot(make_llama())
    model, shira, trainer = run()
    trained_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained_names and all(n.endswith("shira_values") for n in trained_names)
    assert assert_changes_within_masks(shira, base, model) > 0 and shira.verify() == []
    adapter = SparseAdapter.load(tmp_path / ADAPTER_FILE)
    fresh = make_llama()
    with apply(fresh, adapter):
        assert (_logits(fresh) - _logits(model)).abs().max() <= 1e-5
    masks, final = shira.masks, {n: p.detach().clone() for n, p in model.named_parameters() if "shira_values" not in n}
    shira.detach()
    resumed, again, _ = run(resume=str(tmp_path / "checkpoint-3"), mask_seed=5)
    assert all(torch.equal(again.masks[n], i) for n, i in masks.items())
    for name, param in resumed.named_parameters():
        if name in final:
            torch.testing.assert_close(param, final[name], rtol=1e-5, atol=1e-6)
    again.detach()


def test_trainer_writes_the_hub_style_folder(tmp_path):
    import json

    from shira_hooks.integrations import ADAPTER_FOLDER

    model = make_llama()
    model.config._name_or_path = "tiny-org/tiny-llama"  # what from_pretrained("tiny-org/tiny-llama") records
    shira = shira_hooks.attach(model, 0.02, "rand", seed=4, target_modules=["q_proj", "down_proj"])
    callback = ShiraCallback(shira, save_dtype=torch.bfloat16)
    Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=Tokens(), callbacks=[callback]).train()
    folder = tmp_path / ADAPTER_FOLDER
    assert callback.report["adapter_folder"] == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "shira_adapter.safetensors", "shira_config.json"]
    loaded, expected = SparseAdapter.from_pretrained(folder), shira.extract()
    assert loaded.metadata == {**expected.metadata, "base_model_name_or_path": "tiny-org/tiny-llama"}
    assert (
        list(loaded.deltas)
        == list(expected.deltas)
        == [f"model.layers.{i}.{name}.weight" for i in range(2) for name in ("self_attn.q_proj", "mlp.down_proj")]
    )
    for name, delta in expected.deltas.items():
        assert torch.equal(loaded.deltas[name].indices, delta.indices)
        assert torch.equal(loaded.deltas[name].values, delta.values.to(torch.bfloat16))
    config = json.loads((folder / "shira_config.json").read_text())
    assert (config["base_model_name_or_path"], config["values_dtype"], config["num_entries"]) == (
        "tiny-org/tiny-llama",
        "bfloat16",
        shira.num_trainable,
    )
    card = (folder / "README.md").read_text()
    assert "of 4 weights (`q_proj`, `down_proj`)" in card and 'base_model: "tiny-org/tiny-llama"' in card
    assert all(f"| `{name}` |" in card for name in expected.deltas)
    single = SparseAdapter.load(tmp_path / ADAPTER_FILE)  # the single file, as before
    assert single.num_entries == shira.num_trainable and single.metadata == expected.metadata
    shira.detach()


def test_model_init_gives_each_train_run_its_own_handle(tmp_path):
    """hyperparameter_search's pattern: one Trainer, a new model from model_init at every train()."""
    models = []

    def model_init():
        models.append(make_llama(seed=len(models)))
        return models[-1]

    callback = ShiraCallback(sparsity=0.02, mask="rand", progress=False)
    trainer = Trainer(
        model_init=model_init, args=_args(tmp_path / "a", max_steps=2), train_dataset=Tokens(), callbacks=[callback]
    )
    runs = []
    for folder in ("a", "b"):
        trainer.args.output_dir = str(tmp_path / folder)  # each trial's own output, as a search gives it
        trainer.train()
        model, shira = trainer.model, callback.handle
        assert shira.model is model and not shira.attached  # attached at train begin, detached at train end
        assert all(p.requires_grad for p in model.parameters()) and not any(
            "shira_values" in n for n, _ in model.named_parameters()
        )
        runs.append((models.index(model), model, shira, SparseAdapter.load(tmp_path / folder / ADAPTER_FILE)))
    assert runs[0][1] is not runs[1][1] and runs[0][2] is not runs[1][2]
    for seed, model, shira, adapter in runs:
        assert adapter.num_entries == shira.num_trainable and shira.verify() == []
        expected = shira.extract()
        assert all(torch.equal(adapter.deltas[n].values, d.values) for n, d in expected.deltas.items())
        fresh = make_llama(seed=seed)  # the base of that run's model
        with apply(fresh, adapter):
            assert (_logits(fresh) - _logits(model)).abs().max() <= 1e-5


def test_a_search_trial_writes_into_its_own_folder(tmp_path):
    """Under hyperparameter_search the Trainer saves a trial's checkpoints in <output_dir>/<trial name>, or a folder its
    search backend names: the callback writes the trial's files there (its hooks called as the Trainer calls them)."""
    from transformers import TrainerControl, TrainerState

    model = make_llama()
    shira = shira_hooks.attach(model, 0.02, "rand", seed=0)
    callback, args = ShiraCallback(shira), _args(tmp_path)
    named = TrainerState(global_step=2, trial_name="lr-0.01")
    callback.on_save(args, named, TrainerControl())
    callback.on_train_end(args, named, TrainerControl())
    assert (tmp_path / "lr-0.01" / "checkpoint-2" / STATE_FILE).exists() and (
        tmp_path / "lr-0.01" / ADAPTER_FILE
    ).exists()
    unnamed = TrainerState(trial_params={"learning_rate": 0.01})  # optuna: the Trainer's run-<number>
    callback.on_train_begin(args, unnamed, TrainerControl(), model=model)
    unnamed.global_step = 4
    (tmp_path / "run-3" / "checkpoint-4").mkdir(parents=True)  # what the Trainer has just written
    callback.on_save(args, unnamed, TrainerControl())
    callback.on_train_end(args, unnamed, TrainerControl())
    assert (tmp_path / "run-3" / "checkpoint-4" / STATE_FILE).exists() and (tmp_path / "run-3" / ADAPTER_FILE).exists()
    assert not (tmp_path / ADAPTER_FILE).exists() and not (tmp_path / "checkpoint-2").exists()
    shira.detach()


def test_the_hub_folder_names_a_hub_id_and_license_never_a_local_path(tmp_path):
    import json

    from shira_hooks.integrations.callback import ADAPTER_FOLDER, _base_model_id

    model = make_llama()
    model.config._name_or_path = str(tmp_path)  # loaded from a local folder: useless to a reader of the card
    assert _base_model_id(model) is None
    model.config._name_or_path = "tiny-org/tiny-llama"
    assert _base_model_id(model) == "tiny-org/tiny-llama"
    with pytest.raises(ShiraError, match=r"license='Apache 2' is not a Hub license id"):
        ShiraCallback(license="Apache 2", sparsity=0.02)

    model.config._name_or_path = str(tmp_path)
    shira = shira_hooks.attach(model, 0.02, "rand", seed=4, block=16, target_modules=["q_proj"])
    callback = ShiraCallback(shira, base_model_name_or_path="org/the-base", license="apache-2.0")
    Trainer(model=model, args=_args(tmp_path, max_steps=1), train_dataset=Tokens(), callbacks=[callback]).train()
    folder = tmp_path / ADAPTER_FOLDER
    config = json.loads((folder / "shira_config.json").read_text())
    assert (config["base_model_name_or_path"], config["license"]) == ("org/the-base", "apache-2.0")
    card = (folder / "README.md").read_text()
    assert card.startswith(
        '---\nlibrary_name: shira_hooks\ntags:\n- shira\n- sparse-adapter\nbase_model: "org/the-base"\nlicense: apache-2.0\n---\n'
    )
    assert str(tmp_path) not in card and "shira_hooks adapter format version 2)" in card  # block=16: version 2
    assert SparseAdapter.from_pretrained(folder).metadata["license"] == "apache-2.0"
    shira.detach()
