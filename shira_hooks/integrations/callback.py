"""``ShiraCallback``: SHiRA in Hugging Face ``Trainer`` and TRL ``SFTTrainer`` scripts.

    from shira_hooks.integrations import ShiraCallback
    shira = shira_hooks.attach(model, sparsity=0.01, mask="snip")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ShiraCallback(shira)])

This module imports transformers; ``import shira_hooks`` does not. The callback is thin: it calls
the same public methods a hand-written loop calls (``extract``, ``save_state``, ``load_state``,
``verify``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .. import masks
from ..errors import ShiraError
from ..format import ADAPTER_FILE, check_license, hub_id
from ..train import MODES, ShiraHandle, attach

logger = logging.getLogger("shira_hooks")

ADAPTER_FOLDER = "shira_adapter"  # SparseAdapter.save_pretrained's folder, written at train end
STATE_FILE = "shira_state.safetensors"


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    return batch


def _base_model_id(model: Any) -> str | None:
    """The Hub id the model was loaded from (``config._name_or_path``); None for a local folder or a model built from a config."""
    return hub_id(
        getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    )


class ShiraCallback(TrainerCallback):
    """Saves the SHiRA adapter at the end of training and with every checkpoint, and resumes masks.

    Args:
        handle: what ``shira_hooks.attach`` returned for the Trainer's model. Leave it out and pass
            ``attach`` arguments instead (``sparsity=``, ``mask=``, ``target_modules=``, ...) to
            attach at ``on_train_begin`` of every ``train()`` and detach at its end: each run's model
            gets a handle of its own, so a Trainer with ``model_init=`` (a new model per ``train()``, as
            ``hyperparameter_search`` does) trains SHiRA in every trial. grad/snip masks are then scored
            on the first ``calibration_batches`` batches of the Trainer's own dataloader.
        save_dtype: dtype of the adapter values on disk (float32, or bfloat16 for 6 bytes per entry).
        resume_from: a checkpoint folder to take the masks from. By default, when the Trainer
            resumes (``state.global_step > 0`` at train begin), ``<output_dir>/checkpoint-<step>``.
        calibration_batches: batches scored when attaching at train begin with a grad/snip mask.
        base_model_name_or_path: the base model's Hub id for the Hub-style folder's config and model
            card. Default: ``model.config._name_or_path`` when it is a Hub id (a model loaded from
            the Hub); a model loaded from a local folder is then recorded as unknown, so pass its Hub id.
        license: the adapter's Hub license id for the folder (usually the base model's, e.g.
            ``"apache-2.0"``); default none recorded.

    At train end the main process writes the adapter twice into the run's folder (``<output_dir>``; under
    ``hyperparameter_search``, the trial's folder: ``<output_dir>/<trial name>`` when the Trainer names
    trials (``hp_name``), else the folder of the trial's checkpoints, else ``<output_dir>/trial-<n>``): the
    single file ``shira_adapter.safetensors`` (``SparseAdapter.save``, read with ``load``), and the
    Hub-style folder ``shira_adapter/`` (``SparseAdapter.save_pretrained``: the same file, a config and a
    model card naming the base model and license above; read with ``SparseAdapter.from_pretrained``). The number
    of trainable entries and the result of ``verify()`` are logged and kept in ``callback.report``.
    At every checkpoint save, the adapter file and the handle's state (masks and base values at the
    masked entries) are written into the checkpoint folder, so
    ``trainer.train(resume_from_checkpoint=...)`` continues with identical masks. Under FSDP2 every
    rank extracts (the masked entries are gathered from the shards) and the main process writes.
    """

    def __init__(
        self,
        handle: ShiraHandle | None = None,
        *,
        save_dtype: torch.dtype = torch.float32,
        resume_from: str | os.PathLike | None = None,
        calibration_batches: int = 8,
        base_model_name_or_path: str | None = None,
        license: str | None = None,
        **attach_kwargs: Any,
    ):
        if handle is not None and not isinstance(handle, ShiraHandle):
            raise ShiraError(
                f"ShiraCallback(handle) needs what shira_hooks.attach() returned, got {type(handle).__name__}"
            )
        if handle is not None and attach_kwargs:
            raise ShiraError(
                f"pass either a handle or attach arguments to ShiraCallback, not both (got {sorted(attach_kwargs)})"
            )
        check_license(license)  # now, not after training
        self.handle = handle
        self.save_dtype = save_dtype
        self.resume_from = resume_from
        self.calibration_batches = calibration_batches
        self.base_model_name_or_path, self.license = base_model_name_or_path, license
        self.attach_kwargs = attach_kwargs
        self.report: dict[str, Any] = {}
        self._runs = 0  # train() runs begun: names the folder of a search trial that has no other
        self._trial_dir: Path | None = None  # a search trial's folder, found where the Trainer saved its checkpoint

    # ------------------------------------------------------------------------------ checks
    def _check_model(self, model: Any) -> None:
        if self.attach_kwargs and (self.handle is None or self.handle.model is not model):
            return  # attaches at train begin
        if self.handle is None:
            raise ShiraError(
                "ShiraCallback has no handle: the Trainer's model was not attached. Call "
                "shira = shira_hooks.attach(model, sparsity=0.01, mask=...) before building the Trainer and pass "
                "ShiraCallback(shira), or pass attach arguments: ShiraCallback(sparsity=0.01, mask='snip')"
            )
        if not self.handle.attached:
            raise ShiraError("the handle given to ShiraCallback was detached; attach again before training")
        if model is not None and model is not self.handle.model:
            raise ShiraError(
                f"the Trainer's model ({type(model).__name__} at {id(model):#x}) is not the model the handle was attached "
                f"to ({type(self.handle.model).__name__} at {id(self.handle.model):#x}); attach to the model you pass to the Trainer. "
                f"With model_init= (a new model for every train(), as hyperparameter_search does), pass attach arguments "
                f"instead of a handle: ShiraCallback(sparsity=..., mask=...) attaches to each run's model"
            )

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check_model(model)

    # ------------------------------------------------------------------------- train begin
    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        self._runs += 1
        self._trial_dir = None
        if self.attach_kwargs:  # a handle of its own for this run's model
            if self.handle is not None and self.handle.attached and self.handle.model is not model:
                self.handle.detach()  # the last run ended without on_train_end (it raised)
            if self.handle is None or not self.handle.attached:
                self.handle = self._attach(model, train_dataloader)
        self._check_model(model)
        handle = self.handle
        assert handle is not None  # attached above, or _check_model raised
        checkpoint = self.resume_from
        if checkpoint is None and state.global_step > 0:
            checkpoint = self._run_dir(args, state) / f"checkpoint-{state.global_step}"
        if checkpoint is not None:
            path = Path(checkpoint) / STATE_FILE
            if not path.exists():
                raise ShiraError(
                    f"resuming at step {state.global_step} but {path} does not exist, so the masks of the interrupted run are "
                    f"unknown; pass ShiraCallback(..., resume_from=<the checkpoint folder>)"
                )
            handle.load_state(path)
            logger.info("shira_hooks: masks and base values restored from %s", path)
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
        if isinstance(inner, torch.optim.Optimizer):
            handle.check_optimizer(inner)

    def _attach(self, model, dataloader) -> ShiraHandle:
        kwargs = dict(self.attach_kwargs)
        mode = MODES.get(kwargs.get("mode", "dense"))  # an unknown name: attach says so
        if mode is not None and not mode.weight_trains:  # its trained tensors would be made now, after the optimizer
            raise ShiraError(
                f"ShiraCallback cannot attach with mode={kwargs['mode']!r} at train begin: the Trainer has already built its "
                f"optimizer, which would not see shira_values. Attach before building the Trainer and pass the handle"
            )
        if (
            kwargs.get("mask", "snip") in masks.CALIBRATED_KINDS
            and "calibration" not in kwargs
            and dataloader is not None
        ):
            device = next(model.parameters()).device
            batches = []
            for batch in dataloader:
                batches.append(_to_device(batch, device))
                if len(batches) == self.calibration_batches:
                    break
            kwargs["calibration"] = batches
        return attach(model, **kwargs)

    # ------------------------------------------------------------------------------ saving
    def _run_dir(self, args, state) -> Path:
        """The folder of this ``train()`` run: ``output_dir``, or a ``hyperparameter_search`` trial's own folder."""
        root = Path(args.output_dir)
        if state.trial_name:  # the Trainer's own folder for a trial it names (hp_name)
            return root / state.trial_name
        if state.trial_params is not None:  # a trial named by its search backend (optuna: run-<trial number>)
            return self._trial_dir or root / f"trial-{self._runs}"
        return root

    def _checkpoint_dir(self, args, state) -> Path:
        """The checkpoint folder the Trainer has just written (``on_save`` comes after it)."""
        name = f"checkpoint-{state.global_step}"
        if state.trial_params is not None and not state.trial_name and self._trial_dir is None:
            # The backend names the trial's folder; the Trainer wrote <output_dir>/<run>/<name> just now.
            written = sorted(Path(args.output_dir).glob(f"*/{name}"), key=lambda path: path.stat().st_mtime)
            if written:
                self._trial_dir = written[-1].parent
        return self._run_dir(args, state) / name

    def on_save(self, args, state, control, **kwargs):
        if self.handle is None:
            return
        folder = self._checkpoint_dir(args, state)
        if not self.handle.calibrated:
            if state.is_world_process_zero:
                logger.warning(
                    "shira_hooks: masks are still calibrating at step %d; %s holds no SHiRA state",
                    state.global_step,
                    folder,
                )
            return
        adapter = self.handle.extract()  # every rank: under FSDP2 it gathers the shards (a collective)
        handle_state = self.handle.state_dict()  # every rank: under FSDP2 with dora=True it gathers (a collective)
        if state.is_world_process_zero:
            adapter.save(folder / ADAPTER_FILE, dtype=self.save_dtype)
            self.handle.save_state(folder / STATE_FILE, handle_state)

    def on_train_end(self, args, state, control, **kwargs):
        try:
            self._write_adapter(args, state)
        finally:
            if self.attach_kwargs and self.handle is not None:  # it attached at train begin: the model leaves plain
                self.handle.detach()

    def _write_adapter(self, args, state) -> None:
        if self.handle is None or not self.handle.calibrated:
            logger.warning("shira_hooks: training ended before the masks were fixed; no adapter written")
            return
        changed = self.handle.verify()
        run = self._run_dir(args, state)
        path, folder = run / ADAPTER_FILE, run / ADAPTER_FOLDER
        self.report = {
            "trainable_entries": self.handle.num_trainable,
            "changed_outside_masks": changed,
            "adapter": str(path) if state.is_world_process_zero else None,
            "adapter_folder": str(folder) if state.is_world_process_zero else None,
        }
        adapter = self.handle.extract()  # every rank: under FSDP2 it gathers the shards (a collective)
        if state.is_world_process_zero:
            adapter.save(path, dtype=self.save_dtype)
            base = self.base_model_name_or_path or _base_model_id(self.handle.model)
            adapter.save_pretrained(folder, base_model_name_or_path=base, dtype=self.save_dtype, license=self.license)
        level = logging.ERROR if changed else logging.INFO
        logger.log(
            level,
            "shira_hooks: %s trainable entries; entries changed outside the masks: %s; adapter: %s; adapter folder: %s",
            f"{self.handle.num_trainable:,}",
            changed or "none",
            self.report["adapter"],
            self.report["adapter_folder"],
        )
