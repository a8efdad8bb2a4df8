"""``ShiraHandle``: what ``attach`` returns — the masks, the gradient hooks and the public verbs.

One ``register_post_accumulate_grad_hook`` per target weight keeps only the k masked entries of
its gradient; the optimizer step hooks (``optim``) mask again before every step, keep weight decay
off the other entries and refuse optimizer state that would move them. No module is replaced and no
parameter object changes; ``detach()`` removes every hook and restores every ``requires_grad`` flag.

Where the state lives: an attached handle is kept alive by the modules it trains, through an
attribute ``_shira_handle`` on each target module (a plain Python reference, so a model and its
handle, dropped without ``detach()``, are collected together). Everything else refers to handles
weakly: the gradient hooks (torch keeps a tensor's hooks from C++, where the garbage collector cannot
see a cycle back to the tensor), the step guard's weak table (``optim``), and the tables keyed weakly by parameter
that say which handle trains a parameter and what every attached handle wants of its ``requires_grad``
flag (``flags``).

Copies: ``copy.deepcopy(model)``, ``pickle`` and ``torch.save(model)`` / ``torch.load`` give an
independent, working SHiRA model. The handle travels with the model (through ``_shira_handle`` and the
layers' hooks, which are bound methods of plain objects, never closures) and ``__setstate__`` registers
what lives outside the objects again for the copy: its gradient hooks, its ``requires_grad`` claims
(with the flags from before ``attach``) and its place among the attached handles. Nothing of a copy
refers to the original's objects. ``attached(model)`` finds a copy's handle.

Two concerns of the handle live in their own modules, mixed into the class: its work around optimizer
steps (``steps.StepHooks``) and following FSDP2's ``fully_shard`` (``follow.FollowSharding``). The
modules below the handle never import it: the step guard (``optim``) and the watch before forward passes
(``distributed.watch``) call bound methods the handle registers, held weakly.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed, masks
from .._base import digest, is_dense
from .._version import __version__
from ..errors import ShiraError
from ..format import SparseAdapter, SparseDelta
from . import compact, flags, optim
from . import state as resumable
from .calibration import mask_from_scores
from .follow import FollowSharding
from .steps import StepHooks
from .target import Target

logger = logging.getLogger("shira_hooks")

KEEP_ALIVE = "_shira_handle"  # the attribute of each target module that keeps its handle alive


class _KeepAlive:
    """The value of ``module._shira_handle``: keeps an attached handle alive as long as a module it trains.

    A deep copy or a pickle of the module carries a copy of the handle (``ShiraHandle.__setstate__``).
    """

    __slots__ = ("handle",)

    def __init__(self, handle: "ShiraHandle"):
        self.handle = handle


_SERIALS = itertools.count()


def attached(model: nn.Module) -> list["ShiraHandle"]:
    """The handles attached to ``model``'s weights, in attach order (``shira_hooks.applied`` is its
    counterpart for adapters applied with ``apply``).

    The way to a copy's handle: ``copy.deepcopy``, ``pickle`` and ``torch.save``/``torch.load`` of an
    attached model give an independent SHiRA model with a handle of its own.

    Args:
        model: any ``nn.Module``.

    Returns:
        The attached ``ShiraHandle`` objects that train a weight of ``model`` (empty if none).

    Example:
        >>> ema = copy.deepcopy(model)  # an attached model
        >>> (ema_shira,) = shira_hooks.attached(ema)
        >>> ema_shira.extract()  # the copy's adapter; ema_shira.detach() makes the copy a plain model
    """
    found = {}
    for module in model.modules():
        keep_alive = module.__dict__.get(KEEP_ALIVE)
        if isinstance(keep_alive, _KeepAlive) and keep_alive.handle.attached:
            found[id(keep_alive.handle)] = keep_alive.handle
    return sorted(found.values(), key=lambda handle: handle._serial)


handles = attached  # the README's older name for it, kept


class ShiraHandle(FollowSharding, StepHooks):
    """The handle ``attach`` returns: masks, originals at the masked entries, and the hooks.

    Use ``extract()`` after training, ``detach()`` (or a ``with`` block) to make the model an
    ordinary model again, and ``state_dict()`` / ``load_state_dict()`` to resume with the same masks.
    """

    def __init__(self, model: nn.Module, mask: str | masks.MaskFn, sparsity: float, seed: int, calibration_steps: int, mode: str = "dense", block: int = 1):
        self.model = model
        self.mode = mode
        self.mask = mask
        self.sparsity = sparsity
        self.block = block  # masks are aligned runs of `block` entries of a row (masks.indices)
        self.seed = seed
        self.calibration_steps = calibration_steps
        self.frozen: list[str] = []  # trainable parameters that freeze_others froze (not in the adapter)
        self._targets: list[Target] = []
        self._claimed: list[nn.Parameter] = []  # parameters whose requires_grad this handle claims (flags)
        self._claimed_names: list[str] = []  # their names, to find them again after fully_shard (_follow_parameters)
        self._hooks: list[Any] = []
        self._watch_hooks: list[Any] = []  # compact modes: the model's first-forward check (compact.FirstForwardCheck)
        self._watched = False  # _follow_parameters runs before forward passes (distributed.watch), until the first step
        self._finalizer: weakref.finalize | None = None
        # attach is scoring calibration= batches now; otherwise grad/snip masks are scored lazily, each fixed
        # after `calibration_steps` backward passes of training
        self._eager_calibration = False
        self._attached = False
        self._warned_no_gradient = False
        self._warned_frozen = False  # targets whose requires_grad other code set to False were reported (steps)
        self._gradient_checked = False  # a target got a gradient, or it was reported that none does (steps)
        self._checked_state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> id(state) checked
        self._before_values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # compact: optimizer -> values before its step
        self._serial = next(_SERIALS)  # attach order: every rank walks its handles in it (their collectives match)

    # ------------------------------------------------------------------------------ install
    def _install(self, targets: list[tuple[str, nn.Module, nn.Parameter]], freeze_others: bool) -> None:
        """Claim flags, register hooks and the optimizer guard. Partial work is undone by ``detach``."""
        self._attached = True
        self._track()
        distributed.watch(self.model, self._follow_parameters)  # follows the weights through a later fully_shard (FSDP2)
        self._watched = True
        target_ids = {id(p) for _, _, p in targets}
        keep_alive = _KeepAlive(self)
        for name, module, param in targets:
            # A DTensor (FSDP2) is gathered for the digest: the same base digest as one process.
            target = Target(name, module, param, self._budget(param), digest(distributed.gather(param.detach()), 16), param.dtype)
            target.attr = next((key for key, value in module._parameters.items() if value is param), "weight")
            self._targets.append(target)
            module.__dict__[KEEP_ALIVE] = keep_alive
            flags.own(param, self)
            flags.claim(self, param, target=True, wanted=True)
            self._claimed.append(param)
            self._claimed_names.append(name)
            target.grad_hook = param.register_post_accumulate_grad_hook(self._make_hook(len(self._targets) - 1))
            self._hooks.append(target.grad_hook)
        if freeze_others:
            for name, param in self.model.named_parameters():
                if id(param) in target_ids:
                    continue
                trainable = param.requires_grad
                flags.claim(self, param, target=False, wanted=False)  # another handle's target keeps training
                self._claimed.append(param)
                self._claimed_names.append(name)
                if trainable and not param.requires_grad:
                    self.frozen.append(name)
            self._report_frozen()

    def _track(self) -> None:
        """Guard the steps of optimizers over the model (``optim``), until ``detach`` or collection."""
        self._finalizer = optim.track(
            self, order=self._serial, holds_any=self._holds_any, before_step=self._before_step, after_step=self._after_step
        )

    def _budget(self, param: nn.Parameter) -> int:
        return masks.budget(param.numel(), self.sparsity, self.block) if isinstance(self.mask, str) else 0

    def _report_frozen(self) -> None:
        """freeze_others froze trainable parameters: say which, loudly if one looks like an output head."""
        if not self.frozen:
            return
        heads = [n for n in self.frozen if masks.in_task_head(n)]
        shown = ", ".join(self.frozen[:8]) + (f", ... ({len(self.frozen)} in all)" if len(self.frozen) > 8 else "")
        logger.info("shira_hooks: freeze_others=True froze %d trainable non-target parameter(s): %s", len(self.frozen), shown)
        if heads:
            logger.warning(
                "shira_hooks: freeze_others=True froze %s, which look like an output head: they keep their current "
                "values and are not part of the SHiRA adapter. To train them, attach with freeze_others=False (they "
                "then train densely and must be saved separately, e.g. with the model's state_dict)", ", ".join(heads[:8]),
            )

    def _make_hook(self, position: int):
        # Weak: a strong reference from a tensor's hook back to the handle (which holds the tensor) is a
        # cycle through torch's C++ side that the garbage collector cannot break.
        owner = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:  # post-accumulate-grad hooks must return None
            handle = owner()
            if handle is not None:
                handle._on_grad(handle._targets[position], param)

        return hook

    # --------------------------------------------------------------------------- the hook
    @torch.no_grad()
    def _on_grad(self, target: Target, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise ShiraError(f"'{target.name}' received a sparse gradient; shira_hooks masks dense gradients only")
        target.grad_seen = True
        target.follow()
        if target.indices is None:  # calibrating: score, then drop the gradient so nothing is updated
            self._accumulate(target, grad)
            param.grad = None
            return
        target.fresh = False  # from here on .grad is masked training gradient
        if not is_dense(distributed.local(grad)):
            param.grad = grad = grad.contiguous()
        target.mask_grad(grad)

    def _accumulate(self, target: Target, grad: torch.Tensor) -> None:
        if self._eager_calibration and distributed.world_size() > 1 and not distributed.is_sharded(grad):
            # Eager calibration of a replicated model (before DDP or fully_shard wraps it): kept until the
            # pass ends, when every rank's gradient of it is averaged (_end_pass)
            target.pass_grad = grad if target.pass_grad is None else target.pass_grad.add_(grad)
            return
        self._score(target, grad)

    def _score(self, target: Target, grad: torch.Tensor) -> None:
        grad = distributed.local(grad)  # FSDP2: this rank's rows of the gradient averaged over the ranks
        if target.scores is None:
            target.scores = torch.zeros(grad.numel(), dtype=torch.float32, device=grad.device)
        target.scores.add_(grad.reshape(-1).abs_())  # logical order; the gradient is dropped next, so abs_ in place
        target.backward_passes += 1
        if not self._eager_calibration and target.backward_passes >= self.calibration_steps:
            self._mask_from_scores(target)
            target.fresh = True

    @torch.no_grad()
    def _end_pass(self) -> None:
        """After each backward pass of eager calibration under ``torch.distributed``: score the mean over the
        ranks of each replicated target's gradient, i.e. the global batch's gradient, which one process
        would score. Walked in target order, with zeros where this rank got none, so that every rank makes
        the same collectives even when layers get gradients on some ranks only (routing, unused layers)."""
        world = distributed.world_size()
        targets = [t for t in self._targets if t.indices is None and not distributed.is_sharded(t.param)]
        if world <= 1 or not targets:
            return
        got = torch.tensor([t.pass_grad is not None for t in targets], dtype=torch.int32, device=targets[0].param.device)
        distributed.all_reduce(got)  # how many ranks have a gradient of each target
        for t, ranks in zip(targets, got.tolist()):
            grad, t.pass_grad = t.pass_grad, None
            if ranks == 0:  # no rank's loss used it in this pass
                continue
            grad = torch.zeros(t.param.shape, dtype=t.param.dtype, device=t.param.device) if grad is None else grad.contiguous()
            distributed.all_reduce(grad)
            self._score(t, grad.div_(world))

    def _mask_from_scores(self, target: Target) -> None:
        # eager: under torch.distributed every pass was averaged over the ranks already (_end_pass)
        averaged = self._eager_calibration
        kind = masks.kind_of(self.mask)
        target.set_indices(mask_from_scores(kind, target.name, target.scores, target.param.detach(), target.budget, self.block, averaged))

    def _fix_masks(self) -> None:
        """Choose the masks that need no calibration data (struct, rand, wm, a user function)."""
        kind = masks.kind_of(self.mask)
        for target in self._targets:
            weight = target.param.detach()  # under FSDP2 a DTensor: its shape and numel are the full weight's
            if kind.reads_values:  # struct and rand need only the shape
                weight = distributed.gather(weight)  # FSDP2: the full weight (a collective), the same masks as one process
            target.set_indices(kind.select(target.name, weight, target.budget, self.seed, self.block))

    def _make_compact(self) -> None:
        """mode="compact"/"sparse": move the trainable entries into k-length parameters (``compact``)."""
        transposes = compact.InputTransposes() if self.mode == "sparse" else None
        for t in self._targets:
            t.plan, hooks = compact.install(t.module, t.param, t.indices, t.positions, transposes)
            self._hooks.extend(hooks)
            flags.claim(self, t.param, target=True, wanted=False)  # no dense dL/dW; restored by detach()
        # Under FSDP2 the layer computes with the all-gathered weight and FSDP itself reads the sharded one
        # outside the layer (its all-gather), so the read check cannot tell a functional use there.
        layers = [(t.param, t.module, t.name.rpartition(".")[0] or type(t.module).__name__) for t in self._targets if not distributed.is_sharded(t.param)]
        if layers:
            self._watch_hooks = [compact.FirstForwardCheck(self.model, layers, self.mode)]

    def _sync(self) -> None:
        """Make the weights hold the current compact values (a no-op in the dense mode)."""
        for t in self._targets:
            t.follow()
            if t.plan is not None:
                t.plan.follow()
                t.plan.sync(force=True)

    # ------------------------------------------------------------------------- public API
    @property
    def attached(self) -> bool:
        """True until ``detach()``."""
        return self._attached

    @property
    def calibrated(self) -> bool:
        """True once every target weight has its mask (always true for struct/rand/wm)."""
        return all(t.indices is not None for t in self._targets)

    @property
    def num_trainable(self) -> int:
        """Number of trainable entries over all target weights (the sum of the k's)."""
        return sum(t.budget for t in self._targets)

    @property
    def target_names(self) -> list[str]:
        """Parameter names of the target weights, in model order."""
        return [t.name for t in self._targets]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> sorted flat indices of its mask (weights still calibrating are absent)."""
        return {t.name: t.indices for t in self._targets if t.indices is not None}

    def summary(self) -> str:
        """A table: target weight, shape, k and the share of the weight that trains.

        Raises:
            ShiraError: a target weight was replaced by a parameter the handle cannot follow (``follow``).
        """
        self._follow_parameters(verb="summarise the handle")
        total = sum(t.param.numel() for t in self._targets)
        state = "calibrated" if self.calibrated else (
            f"calibrating: {sum(t.indices is not None for t in self._targets)}/{len(self._targets)} masks fixed, "
            f"{self.calibration_steps} backward passes each"
        )
        mask = self.mask if isinstance(self.mask, str) else getattr(self.mask, "__name__", "custom")
        width = max(len("weight"), *(len(t.name) for t in self._targets))
        lines = [
            f"shira_hooks: mask={mask!r} sparsity={self.sparsity:g}{f' block={self.block}' if self.block > 1 else ''} ({state})",
        ]
        if self.frozen:
            shown = ", ".join(self.frozen[:8]) + (", ..." if len(self.frozen) > 8 else "")
            lines.append(f"frozen by freeze_others, not in the adapter: {len(self.frozen)} parameter(s): {shown}")
        lines.append(f"{'weight':<{width}}  {'shape':>14}  {'k':>10}  {'%':>6}")
        for t in self._targets:
            shape = "x".join(str(s) for s in t.param.shape)
            lines.append(f"{t.name:<{width}}  {shape:>14}  {t.budget:>10,}  {100 * t.budget / t.param.numel():>6.2f}")
        lines.append(f"{'total':<{width}}  {total:>14,}  {self.num_trainable:>10,}  {100 * self.num_trainable / total:>6.2f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ShiraHandle({len(self._targets)} weights, {self.num_trainable:,} trainable entries, "
            f"mask={self.mask!r}, mode={self.mode!r}, calibrated={self.calibrated}, attached={self._attached})"
        )

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ``ShiraError`` now, not at its first step, if ``optimizer`` cannot train the targets exactly.

        That is: a weight-decay rule shira_hooks does not know on a target weight (or ASGD's ``lambd``),
        or state nonzero outside a mask (built before ``attach``), or a target weight replaced by a parameter
        the handle cannot follow. ``ShiraCallback`` calls it at train begin.
        """
        self._follow_parameters(verb="check the optimizer")
        problem = optim.unknown_decay(optimizer, {id(t.param): t.name for t in self._targets})
        if problem:
            raise ShiraError(problem)
        self._check_optimizer_state(optimizer, [t for t in self._targets if t.plan is None])

    def _require_calibrated(self, action: str) -> None:
        waiting = [t for t in self._targets if t.indices is None]
        if waiting:
            raise ShiraError(
                f"cannot {action}: {len(waiting)} target weight(s) are still calibrating (e.g. '{waiting[0].name}', "
                f"{waiting[0].backward_passes}/{self.calibration_steps} backward passes seen). Train for more steps, "
                f"or pass calibration= to attach"
            )

    @torch.no_grad()
    def extract(self) -> SparseAdapter:
        """The adapter S = W_new - W at the masked entries, in float32 from the stored originals.

        Works before and after ``detach()``. Under FSDP2 every rank must call it (it gathers the masked
        entries of each weight); every rank gets the whole adapter, and one of them saves it.

        Returns:
            A ``SparseAdapter`` with one ``SparseDelta`` per target weight.

        Raises:
            ShiraError: masks are not fixed yet (lazy calibration still running), a delta is NaN/inf, or a
                target weight was replaced by a parameter the handle cannot follow (``load_state_dict(...,
                assign=True)`` with other values, ``model.to("meta")``).

        Example:
            >>> shira = shira_hooks.attach(model, sparsity=0.01, mask="wm")
            >>> train(model)
            >>> shira.extract().save("adapter.safetensors")
        """
        self._require_calibrated("extract an adapter")
        self._follow_parameters(verb="extract an adapter")
        self._sync()
        deltas = {}
        for t in self._targets:
            values = t.current().float() - t.originals.float()
            deltas[t.name] = SparseDelta(tuple(t.param.shape), t.param.dtype, t.indices.clone(), values.cpu(), digest(t.originals), self.block)
        mask = self.mask if isinstance(self.mask, str) else "custom"
        return SparseAdapter(
            deltas, {"mask": mask, "sparsity": f"{self.sparsity:g}", "seed": str(self.seed), "created_by": f"shira_hooks {__version__}"}
        )

    @torch.no_grad()
    def verify(self) -> list[str]:
        """Names of target weights with an entry outside the mask that differs bit-for-bit from the base.

        Compares a digest of each weight, with its masked entries put back to the originals, against
        the digest taken at ``attach`` (no dense copy of the base is kept). An empty list means the
        exactness guarantee held.

        Under FSDP2 every rank must call it (it gathers each weight); all get the same list.

        Raises:
            ShiraError: a target weight was replaced by a parameter the handle cannot follow: a replaced weight
                is never reported as unchanged.
        """
        self._follow_parameters(verb="verify")
        self._sync()
        changed = []
        for t in self._targets:
            weight = t.restored() if t.indices is not None else t.param.detach()
            if digest(weight, 16) != t.base_digest:
                changed.append(t.name)
        return changed

    def detach(self) -> None:
        """Remove every hook, restore the ``requires_grad`` flags it set. Safe to call twice.

        A flag is restored only where it still holds the value the handle set: one that other code set
        since is left alone. When every target's flag was changed (``peft.get_peft_model`` after ``attach``
        freezes every parameter but its adapter's), the model's flags are managed elsewhere and none is
        restored. Masks and originals are kept, so ``extract()`` still works afterwards.
        """
        if not self._attached:
            return
        self._move_claims_by_name()
        managed_elsewhere = bool(self._targets) and all(self._flag_changed(t) for t in self._targets)
        for t in self._targets:
            if t.plan is not None:
                compact.uninstall(t.module, t.plan)
                t.plan = None
        for hook in self._hooks + self._watch_hooks:
            hook.remove()
        self._hooks, self._watch_hooks = [], []
        self._attached = False
        optim.untrack(self)
        distributed.unwatch(self.model, self._follow_parameters)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        flags.release(self, self._claimed, restore=not managed_elsewhere)
        if managed_elsewhere:
            logger.warning(
                "shira_hooks: detach() left every requires_grad flag as it is: the flags of all %d target weights were "
                "changed after attach (peft.get_peft_model, for one, freezes every parameter but its adapter's), so "
                "the model's flags are managed by other code now", len(self._targets),
            )
        self._claimed, self._claimed_names = [], []
        for t in self._targets:
            t.scores = None
            keep_alive = t.module.__dict__.get(KEEP_ALIVE)
            if isinstance(keep_alive, _KeepAlive) and keep_alive.handle is self:
                del t.module.__dict__[KEEP_ALIVE]
            flags.disown(t.param, self)

    def _flag_changed(self, t: Target) -> bool:
        """Whether other code changed the flag that makes target ``t`` train since the handle set it."""
        if t.plan is not None:  # the values train; the handle registered them trainable
            return not t.plan.values.requires_grad
        return flags.changed(t.param)

    def _move_claims_by_name(self) -> None:
        """Claimed parameters that user code replaced (``load_state_dict(assign=True)`` copies the flag): the
        claim moves to the parameter now at that name if it holds the flag the handle set, so ``detach``
        restores the flags of the model's parameters, not of objects no longer in it."""
        now = dict(self.model.named_parameters(remove_duplicate=False))
        for i, (name, old) in enumerate(zip(self._claimed_names, self._claimed)):
            new = now.get(name)
            if new is not None and new is not old and not distributed.is_sharded(old):
                flags.move(old, new, only_unchanged=True)
                self._claimed[i] = new

    # ------------------------------------------------------------------- copies and pickles
    def __getstate__(self) -> dict[str, Any]:
        """The handle's state for ``copy.deepcopy`` / ``pickle`` of the model it trains (see the module docstring).

        Raises:
            ShiraError: a target weight is sharded by FSDP2 (a copy cannot take part in the original's collectives).
        """
        sharded = [t.name for t in self._targets if distributed.is_sharded(t.param) or distributed.is_sharded(t.module._parameters.get(t.attr))]
        if sharded and self._attached:
            raise ShiraError(
                f"cannot copy or pickle a model whose shira_hooks targets are sharded by fully_shard (FSDP2), such as "
                f"'{sharded[0]}'; save the adapter (handle.extract().save(...)) and the handle's state "
                f"(handle.save_state(...)) instead, or detach() first"
            )
        grad_hooks = {id(t.grad_hook) for t in self._targets}
        return {
            **self.__dict__,
            "mask": self.mask if isinstance(self.mask, str) else "custom",  # a mask function may not pickle; masks are fixed
            "_finalizer": None,
            "_checked_state": None,
            "_before_values": None,
            "_hooks": [hook for hook in self._hooks if id(hook) not in grad_hooks],  # registered again on the copy
            "_flag_originals": [flags.original(param) for param in self._claimed],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Make a copied or unpickled handle an attached handle of the copy: gradient hooks on the copy's
        weights, ``requires_grad`` claims (with the flags from before ``attach``), the step hooks."""
        originals = state.pop("_flag_originals")
        self.__dict__.update(state)
        self._checked_state, self._before_values = weakref.WeakKeyDictionary(), weakref.WeakKeyDictionary()
        self._serial = next(_SERIALS)
        if not self._attached:
            return
        self._track()
        if self._watched:
            distributed.watch(self.model, self._follow_parameters)
        targets = {id(t.param): t for t in self._targets}
        for position, t in enumerate(self._targets):
            flags.own(t.param, self)
            self._hooks.append(t.hook_gradient(self._make_hook(position)))
        for param, original in zip(self._claimed, originals):
            t = targets.get(id(param))
            flags.claim(self, param, target=t is not None, wanted=t is not None and t.plan is None, original=original)

    def __copy__(self) -> "ShiraHandle":
        """Refused: a shallow copy would be a second handle on the same parameters."""
        raise ShiraError("a shira_hooks handle cannot be copied on its own; copy.deepcopy the model that attach() got")

    def __deepcopy__(self, memo: dict) -> "ShiraHandle":
        """Part of ``copy.deepcopy(model)``; refused for the handle alone or a part of the model (the copy
        would bring a second copy of the whole model with it)."""
        if self._attached and id(self.model) not in memo:
            raise ShiraError(
                f"copy.deepcopy reached a shira_hooks handle (attached to a {type(self.model).__name__}) without copying "
                f"the model it is attached to: a copy of a handle, or of a part of an attached model, would carry a copy "
                f"of the whole model. Copy the model that attach() got (the copy has a handle of its own: "
                f"shira_hooks.attached(copy)), or detach() first"
            )
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def __enter__(self) -> "ShiraHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---------------------------------------------------------------------- resume state
    def state_dict(self) -> dict[str, Any]:
        """Masks and base values at the masked entries, to resume a run with identical masks.

        Returns:
            ``{"format", "format_version", "mask", "sparsity", "seed", "block", "targets": {name:
            {"shape", "dtype", "base_digest", "indices", "originals"}}}``; tensors are CPU copies.
        """
        self._require_calibrated("save the handle's state")
        self._follow_parameters(verb="save the handle's state")
        mask = self.mask if isinstance(self.mask, str) else "custom"
        return resumable.state_dict(self._targets, mask=mask, sparsity=self.sparsity, seed=self.seed, block=self.block)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt the masks and originals of ``state_dict()``; everything is checked before anything changes.

        Raises:
            ShiraError: the state is for other weights, shapes or dtypes, another ``block``, or its
                indices are invalid.
        """
        self._follow_parameters(verb="load a handle state")
        for key, value in resumable.load_state_dict(self._targets, state, block=self.block).items():
            setattr(self, key, value)  # mask, sparsity, seed: as the run that saved the state

    def save_state(self, path: str | os.PathLike) -> Path:
        """``state_dict()`` as one safetensors file, written atomically."""
        return resumable.save_state(self.state_dict(), path)

    def load_state(self, path: str | os.PathLike) -> None:
        """Read a file written by ``save_state`` and ``load_state_dict`` it."""
        self.load_state_dict(resumable.read_state(path))
