"""``attach``: SHiRA training of any ``nn.Module`` through gradient hooks (paper §3.1 and App. C).

Checks the arguments (the training mode's own checks: ``Mode.check_attach`` and ``Mode.check_layer``),
resolves the target weights, and calls ``handle.install``, which builds an attached ``ShiraHandle`` and
fixes the masks now (struct, rand, wm, a function, or grad/snip on ``calibration=`` batches) or leaves
grad/snip to be scored on the first backward passes of training. If anything fails, the handle is
detached before the error propagates: nothing stays changed.
"""

from __future__ import annotations

import os
import secrets
import sys
import warnings
from collections.abc import Iterable
from typing import Any

from torch import nn

from .. import distributed, masks
from .._base import check_dense
from ..errors import ShiraError
from . import flags, modes
from .calibration import LossFn
from .config import Config
from .handle import ShiraHandle, install
from .target import Layer

DEFAULT_CALIBRATION_STEPS = 8


def _check_arguments(model: Any, sparsity: Any, mask: Any, calibration: Any, calibration_steps: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ShiraError(f"attach() needs a torch.nn.Module, got {type(model).__name__}")
    masks.check_sparsity(sparsity)
    if sparsity > 0.5:  # sparsity=1 meaning 1% would silently train every entry
        warnings.warn(
            f"attach(sparsity={sparsity!r}) trains {sparsity:.0%} of every target weight; sparsity is a fraction, so 1% "
            f"is sparsity=0.01 (SHiRA trains about 1-2%)",
            UserWarning,
            stacklevel=3,
        )
    kind = masks.kind_of(mask)  # ShiraError for an unknown name
    if calibration is not None and not kind.needs_scores:
        scored = " or ".join(repr(name) for name in masks.CALIBRATED_KINDS)
        raise ShiraError(
            f"calibration= is only used by mask={scored}, not mask={mask!r}; drop calibration= or change the mask"
        )
    if isinstance(calibration_steps, bool) or not isinstance(calibration_steps, int) or calibration_steps < 1:
        raise ShiraError(
            f"calibration_steps={calibration_steps!r}; it must be a positive int (backward passes used to score)"
        )


def _check_not_peft(model: nn.Module) -> None:
    """Refuse a PEFT model (a ``PeftModel``, or a model with PEFT adapter layers injected), without importing peft.

    PEFT's layers wrap the Linear layers shira_hooks would train (``lora.Linear.weight`` is a property of the
    wrapped ``base_layer``, which two modules then claim), its default targets would include LoRA's own A/B
    matrices, and merging writes into the base weights: SHiRA there cannot be kept exact, so it is refused.
    """
    if "peft" not in sys.modules:
        return

    def from_peft(cls: type, name: str) -> bool:
        return any(c.__name__ == name and c.__module__.split(".")[0] == "peft" for c in cls.__mro__)

    layer = next(((name, m) for name, m in model.named_modules() if from_peft(type(m), "BaseTunerLayer")), None)
    if from_peft(type(model), "PeftModel") or layer is not None:
        inside = f", whose '{layer[0]}' is a PEFT {type(layer[1]).__name__}" if layer is not None else ""
        raise ShiraError(
            f"attach() got a PEFT model ({type(model).__name__}{inside}); shira_hooks does not train weights that PEFT "
            f"layers wrap (their weight is a property of the wrapped layer, and merging writes into it). Attach to the "
            f"model without PEFT layers: before peft.get_peft_model (which would then freeze the SHiRA targets), or to "
            f"peft_model.merge_and_unload() to train SHiRA on the merged weights. PEFT's own SHiRA is peft.ShiraConfig "
            f"(adapter.to_peft(folder) exports a shira_hooks adapter to it)"
        )


def _check_dora(dora: Any, dora_rank: Any) -> None:
    if not isinstance(dora, bool):
        raise ShiraError(f"dora={dora!r}; it must be True or False")
    if dora_rank is None:
        return
    if not dora:
        raise ShiraError(
            f"dora_rank={dora_rank!r} sets the rank of SHiRA-DoRA's factors; pass dora=True with it, or drop it"
        )
    if isinstance(dora_rank, bool) or not isinstance(dora_rank, int) or dora_rank < 1:
        raise ShiraError(
            f"dora_rank={dora_rank!r}; it must be a positive int (the rank of the factors), or None to train the k entries"
        )


def _check_dora_rank(dora_rank: int | None, name: str, module_name: str, shape: tuple[int, ...]) -> None:
    """Factors of a rank above min(out, in) add parameters (and memory: a huge rank failed in the allocator)
    but no expressiveness: refused, naming the weight."""
    if dora_rank is not None and len(shape) == 2 and dora_rank > min(shape):
        raise ShiraError(
            f"dora_rank={dora_rank} exceeds the rank of weight '{name}' (module '{module_name}', shape {tuple(shape)}): "
            f"factors of rank {min(shape)} already reach every matrix of that shape. Pass dora_rank <= {min(shape)}, "
            f"or leave that module out of target_modules"
        )


def resolve_seed(seed: Any, mask: Any) -> int:
    """``seed``, or a fresh random one agreed by every rank of a ``torch.distributed`` run.

    A fixed default would give every ``rand``/``struct`` adapter a user trains the same mask, so
    independently trained adapters would overlap completely and interfere when fused.
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ShiraError(f"seed={seed!r}; it must be a non-negative int, or None for a fresh random seed")
        return seed
    seed = secrets.randbits(62)
    if distributed.world_size() > 1:
        return distributed.broadcast_int(seed)  # every rank draws the same masks
    world = os.environ.get("WORLD_SIZE", "1")
    if masks.kind_of(mask).seeded and world.isdigit() and int(world) > 1:
        raise ShiraError(
            f"mask={mask!r} with seed=None draws a fresh random seed, but this is one of {world} processes "
            f"(WORLD_SIZE={world}) and torch.distributed is not initialized yet, so the ranks cannot agree on it "
            f"and would train different masks. Pass seed=<int> (the same on every rank), or initialize the process "
            f"group first (torch.distributed.init_process_group, or build the Trainer's TrainingArguments) and attach after"
        )
    return seed


def attach(
    model: nn.Module,
    sparsity: float = 0.01,
    mask: str | masks.MaskFn = "snip",
    *,
    target_modules: masks.TargetSpec = None,
    calibration: Iterable | None = None,
    loss_fn: LossFn | None = None,
    seed: int | None = None,
    calibration_steps: int = DEFAULT_CALIBRATION_STEPS,
    freeze_others: bool = True,
    progress: bool = True,
    mode: str = "dense",
    block: int = 1,
    dora: bool = False,
    dora_rank: int | None = None,
) -> ShiraHandle:
    """Make ``model`` train only a sparse mask of its target weights (SHiRA), with gradient hooks.

    Args:
        model: any ``nn.Module``; it is not rewritten.
        sparsity: fraction of each target weight that trains, in (0, 1]; k = round(sparsity * numel), >= 1.
            Above 0.5 a UserWarning says that 0.01 means 1% (``sparsity=1`` trains every entry).
        mask: "struct" (diagonal + whole rows), "rand" (uniform, from ``seed``), "wm" (top-k |W|),
            "grad" (top-k sum |dL/dW|), "snip" (top-k |W * sum dL/dW|), or a function
            ``(name, weight) -> flat indices or bool mask``.
        target_modules: None (every ``nn.Linear`` except the output head / tied embeddings), a list
            of module-name suffixes and/or module types, a regex (full match on the module name),
            a module type, or a function ``(name, module) -> bool``.
        calibration: batches to score "grad"/"snip" masks on now. Without it, the first
            ``calibration_steps`` backward passes of training score them, and the hooks drop those
            gradients so no optimizer changes anything during them.
        loss_fn: ``loss_fn(model, batch) -> scalar``; by default ``model(**batch).loss``.
        seed: seeds "rand" and the row choice of "struct" (per weight, mixed with its name). None (the
            default) draws a fresh random seed, broadcast from rank 0 under ``torch.distributed``, so that
            independently trained adapters get independent masks; it is kept in ``handle.seed``, the
            adapter's metadata and the resumable state. Pass an int to reproduce a mask.
        calibration_steps: backward passes used by lazy calibration (default 8).
        freeze_others: set ``requires_grad=False`` on every non-target parameter (restored by detach).
        progress: show a tqdm bar over calibration batches.
        mode: how the masked entries train (``nn.Linear`` targets only for the last two):
            "dense": hooks mask the dense gradient of each weight (any layer type);
            "compact": the k entries become a parameter ``<layer>.shira_values`` of shape (k,), so the
            optimizer keeps state for k entries; the dense ``dY^T X`` is formed one layer at a time
            and gathered; "sparse": the same, but only the k masked entries of ``dY^T X`` are
            computed (``sampled_addmm``). Masks must be known at attach (grad/snip need ``calibration=``);
            build the optimizer (and DDP) after attach, so they see ``shira_values``. Under FSDP2
            ``fully_shard`` may come before or after attach; either way ``shira_values`` is split across
            the ranks with its optimizer state.
        block: every mask is made of aligned runs of ``block`` consecutive entries of a row
            (``[j * block, (j + 1) * block)``), never straddling rows: ``block`` must divide the row
            length of each target's ``(shape[0], -1)`` view. k is rounded to the nearest multiple of
            ``block`` (at least one block). rand draws blocks uniformly, wm/grad/snip rank blocks by
            the sum of their entries' scores, struct fills the diagonal's blocks and then whole rows,
            and a mask function must return whole runs. 16 (one 64-byte line in float32; 32 in
            bfloat16) makes ``apply``/``remove`` write whole cache lines and halves the adapter file
            (one index per block). Default 1: single entries.
        dora: train the masked entries weight-decomposed, SHiRA-DoRA (paper §4.3.1; ``mode="compact"`` or
            ``"sparse"``): the layer computes with ``W = W0 + M * (m * V / ||V||_row - W0)``, a trainable
            magnitude ``<layer>.shira_magnitude`` per output row times the row-normalised direction V, so
            only the k masked entries ever differ from W0. ``extract()`` gives a plain sparse adapter.
            Not under FSDP2.
        dora_rank: with ``dora``: None (default) trains V's k masked entries (``shira_values``; the row norms
            cost O(k + out) per step); an int r trains V = W0 + B A instead, with factors
            ``<layer>.shira_dora_a`` (r, in) and ``shira_dora_b`` (out, r): one dense (out, in) product per forward.

    Returns:
        A ``ShiraHandle``.

    Raises:
        ShiraError: bad arguments, no matching target, a weight already attached, a ``block`` that
            does not divide a target's row length, a calibration batch the loss cannot be
            computed from, or ``dora=True`` with ``mode="dense"`` or on an FSDP2-sharded weight. Nothing is left changed when it is raised.

    Example:
        >>> shira = shira_hooks.attach(model, sparsity=0.01, mask="snip", calibration=batches)
        >>> ...  # any training loop or trainer
        >>> shira.extract().save("adapter.safetensors")
        >>> shira.detach()
    """
    _check_arguments(model, sparsity, mask, calibration, calibration_steps)
    _check_dora(dora, dora_rank)
    training = modes.mode_class(mode, dora)  # ShiraError for an unknown name, or dora=True with mode="dense"
    masks.check_block(block)
    training.check_attach(mask, masks.kind_of(mask), calibration)
    distributed.check_model(model)  # FSDP1, DeepSpeed: refused
    _check_not_peft(model)
    seed = resolve_seed(seed, mask)
    names: dict[int, str] = {}  # id(param) -> its first name
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    owners: dict[int, int] = {}  # id(weight) -> number of modules using it
    for _, module in model.named_modules(remove_duplicate=False):
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            owners[id(module.weight)] = owners.get(id(module.weight), 0) + 1
    # Layers whose weight their parent reads without calling them: a forward hook never sees them.
    read_directly = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    targets = []
    for module_name, module, weight in masks.resolve_targets(model, target_modules):
        name = names[id(weight)]
        if flags.owned(weight):
            raise ShiraError(
                f"weight '{name}' (module '{module_name}') already has a shira_hooks handle attached; call detach() on it "
                f"first (shira_hooks.attached(model) finds it, also in a copy of an attached model)"
            )
        if weight.device.type == "meta":
            raise ShiraError(
                f"weight '{name}' (module '{module_name}') is on the meta device: it has no values to mask or to measure "
                f"the adapter from. Attach after loading the weights (load_state_dict(..., assign=True), to_empty() and a load)"
            )
        distributed.check_placements(weight, f"weight '{name}' (module '{module_name}')")
        check_dense(distributed.local(weight), f"weight '{name}' (module '{module_name}')")
        masks.check_block_fits(block, name, tuple(weight.shape))  # the full (logical) shape, also under FSDP2
        _check_dora_rank(dora_rank, name, module_name, tuple(weight.shape))
        training.check_layer(
            Layer(name, module_name, module, weight, owners.get(id(weight), 0), id(module) in read_directly)
        )
        targets.append((name, module, weight))

    config = Config(mask, float(sparsity), seed, mode, block, calibration_steps, dora, dora_rank)
    return install(
        model, targets, config, freeze_others=freeze_others, calibration=calibration, loss_fn=loss_fn, progress=progress
    )
