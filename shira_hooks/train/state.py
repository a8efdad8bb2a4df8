"""The handle's resumable state: masks, base values at the masked entries, base digests.

Functions of the handle's targets and its ``Config``, never of the handle itself: ``ShiraHandle.state_dict``
/ ``load_state_dict`` / ``save_state`` / ``load_state`` call these after following replaced parameters.
A target's mode may add tensors of its own to its entry (``Mode.state``, under ``"mode"``): the SHiRA-DoRA
variants add their magnitude and direction tensors, and the state records ``"dora": {"rank": ...}``; the
other modes add none, and their states are as before.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from .._base import atomic_write, read_safetensors
from ..errors import ShiraError
from ..format import check_indices, dtype_name
from ..masks import block_starts
from .config import Config
from .target import Target

STATE_FORMAT = "shira_hooks.state"
STATE_VERSION = 1


def state_dict(targets: list[Target], config: Config) -> dict[str, Any]:
    """Masks and base values at the masked entries of calibrated ``targets``, to resume a run with identical masks.

    Returns:
        ``{"format", "format_version", "mask", "sparsity", "seed", "block", "targets": {name:
        {"shape", "dtype", "base_digest", "indices", "originals"}}}``; tensors are CPU copies. A target whose
        mode keeps tensors of its own has them under ``"mode"`` too. States written before ``block``
        existed have no "block" entry: they load as block 1.
    """
    for t in targets:  # masks and originals only: no values to write (no collective under FSDP2)
        t.follow()
    state = {
        "format": STATE_FORMAT,
        "format_version": STATE_VERSION,
        "mask": config.mask_name,
        "sparsity": config.sparsity,
        "seed": config.seed,
        "block": config.block,
        "targets": {t.name: _entry(t) for t in targets},
    }
    if config.dora:  # only then: states without DoRA stay as they were
        state["dora"] = {"rank": config.dora_rank}
    return state


def _dora_words(dora: Any) -> str:
    """A state's or a config's DoRA setting as attach's arguments."""
    if not isinstance(dora, dict):
        return "dora=False"
    return "dora=True" + (f", dora_rank={dora.get('rank')}" if dora.get("rank") is not None else "")


def _entry(t: Target) -> dict[str, Any]:
    # ShiraHandle.state_dict refuses a handle that is still calibrating, so every mask is fixed here.
    assert t.indices is not None and t.originals is not None, f"state of '{t.name}' before its mask is fixed"
    entry = {
        "shape": list(t.param.shape),
        "dtype": dtype_name(t.param.dtype),
        "base_digest": t.base_digest,
        "indices": t.indices.clone(),
        "originals": t.originals.cpu().clone(),
    }
    own = t.mode.state(t)
    if own:
        entry["mode"] = {key: tensor.detach().cpu().clone() for key, tensor in own.items()}
    return entry


@torch.no_grad()
def load_state_dict(targets: list[Target], state: dict[str, Any], config: Config) -> Config:
    """Make ``targets`` adopt the masks and originals of ``state_dict()``; everything is checked before anything
    changes. ``config``: the handle's.

    Returns:
        ``config`` with the settings the state records: ``mask`` (a name, not "custom"), ``sparsity``, ``seed``
        (each only where the state has it).

    Raises:
        ShiraError: the state is for other weights, shapes or dtypes, another block, or its indices are invalid.
    """
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ShiraError(
            f"not a shira_hooks handle state (format={state.get('format') if isinstance(state, dict) else type(state).__name__!r}, expected {STATE_FORMAT!r})"
        )
    if state.get("format_version") != STATE_VERSION:
        raise ShiraError(
            f"unknown handle state format_version {state.get('format_version')!r}; this shira_hooks reads {STATE_VERSION}"
        )
    block = config.block
    saved_block = state.get("block", 1)  # states from before block masks: single entries
    if saved_block != block:
        raise ShiraError(
            f"the state's masks are made of runs of block={saved_block!r} entries, the handle was attached with "
            f"block={block}; attach with block={saved_block!r}, as the run that saved it"
        )
    saved_dora = state.get("dora")  # absent: saved without DoRA
    ours_dora = {"rank": config.dora_rank} if config.dora else None
    if saved_dora != ours_dora:
        raise ShiraError(
            f"the state was saved by a handle attached with {_dora_words(saved_dora)}, this handle was attached with "
            f"{_dora_words(ours_dora)}; attach with {_dora_words(saved_dora)}, as the run that saved it"
        )
    saved = state["targets"]
    ours = {t.name: t for t in targets}
    if saved.keys() != ours.keys():
        missing, extra = sorted(ours.keys() - saved.keys()), sorted(saved.keys() - ours.keys())
        raise ShiraError(
            f"the state is for other target weights: missing {missing[:5]}, unexpected {extra[:5]}; "
            f"attach with the same target_modules as the run that saved it"
        )
    for name, entry in saved.items():
        param = ours[name].param
        if list(entry["shape"]) != list(param.shape) or entry["dtype"] != dtype_name(param.dtype):
            raise ShiraError(
                f"state for '{name}' is a {entry['dtype']} weight of shape {list(entry['shape'])}, the model's "
                f"is {dtype_name(param.dtype)} {list(param.shape)}; load it into the model it was saved from"
            )
        check_indices(entry["indices"], param.numel(), f"state '{name}.indices'")
        if block > 1 and block_starts(entry["indices"], block) is None:
            raise ShiraError(
                f"state '{name}.indices' are not aligned runs of block={block} entries; the state is corrupt, save it again"
            )
        originals = entry["originals"]
        if originals.dtype != param.dtype or originals.shape != entry["indices"].shape:
            raise ShiraError(
                f"state '{name}.originals' is {originals.dtype} of shape {tuple(originals.shape)}; expected "
                f"{param.dtype} of shape {tuple(entry['indices'].shape)}"
            )
        ours[name].mode.check_state(ours[name], entry)
    sparsity, seed = state.get("sparsity"), state.get("seed")
    if sparsity is not None and (
        isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1
    ):
        raise ShiraError(f"state has sparsity={sparsity!r}; expected a number in (0, 1]")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ShiraError(f"state has seed={seed!r}; expected an int")
    for name, entry in saved.items():
        target = ours[name]
        target.set_indices(entry["indices"].clone(), entry["originals"].clone())
        target.base_digest, target.base_dtype = entry["base_digest"], target.param.dtype
        target.mode.load(target, entry)  # compact: the same values parameter, the new mask's entries
    settings: dict[str, Any] = {}
    if isinstance(state.get("mask"), str) and state["mask"] != "custom":
        settings["mask"] = state["mask"]
    if sparsity is not None:
        settings["sparsity"] = float(sparsity)
    if seed is not None:
        settings["seed"] = seed
    return dataclasses.replace(config, **settings)


def save_state(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """A ``state_dict()`` as one safetensors file, written atomically."""
    tensors, info = {}, {}
    for name, entry in state["targets"].items():
        entry = dict(entry)
        tensors[f"{name}.indices"], tensors[f"{name}.originals"] = entry.pop("indices"), entry.pop("originals")
        own = entry.pop("mode", {})
        for key, tensor in own.items():
            tensors[f"{name}.mode.{key}"] = tensor
        if own:
            entry["mode"] = sorted(own)  # the header names the mode's tensors; the file holds them
        info[name] = entry
    header = {k: json.dumps(v) for k, v in state.items() if k != "targets"}
    header["targets"] = json.dumps(info)
    return atomic_write(path, save_safetensors(tensors, metadata=header))


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The ``state_dict()`` in a file written by ``save_state`` (memory-mapped, not read whole); checked by
    ``load_state_dict``."""
    metadata, tensors = read_safetensors(path)
    try:
        meta = {k: json.loads(v) for k, v in metadata.items()}
        targets = meta.pop("targets")
        for name, entry in targets.items():
            entry["indices"], entry["originals"] = tensors[f"{name}.indices"], tensors[f"{name}.originals"]
            if "mode" in entry:
                entry["mode"] = {key: tensors[f"{name}.mode.{key}"] for key in entry["mode"]}
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise ShiraError(f"{path}: not a shira_hooks handle state ({type(error).__name__}: {error})") from None
    return {**meta, "targets": targets}
