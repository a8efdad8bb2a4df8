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

The handle is a composition: it holds its settings (``config.Config``), its targets (``target.Target``,
each with its training mode: ``modes``) and four collaborators, plain objects built with the targets and
what else they need, that share no attributes: ``calibration.Calibration`` (scores and masks from them),
``gradients.GradientHooks`` (the gradient hook), ``follow.Follower`` (finding the weights again after
``fully_shard`` or a replacement) and ``steps.StepHooks`` (the work around optimizer steps). The resumable
state is functions of the targets and the config (``state``). The modules below the handle never import
it: the step guard (``optim``) and the watch before forward passes (``distributed.watch``) call bound
methods of its collaborators, held weakly. ``install`` is the one entry ``attach`` calls.
"""

from __future__ import annotations

import copy
import itertools
import logging
import os
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed, masks
from .._base import digest
from .._version import __version__
from ..errors import ShiraError
from ..format import SparseAdapter, SparseDelta
from . import flags, modes, optim
from . import state as resumable
from .calibration import Calibration, LossFn
from .config import Config
from .follow import Follower
from .gradients import GradientHooks
from .steps import StepHooks
from .target import Target

logger = logging.getLogger("shira_hooks")

KEEP_ALIVE = "_shira_handle"  # the attribute of each target module that keeps its handle alive


class _KeepAlive:
    """The value of ``module._shira_handle``: keeps an attached handle alive as long as a module it trains.

    A deep copy or a pickle of the module carries a copy of the handle (``ShiraHandle.__setstate__``).
    """

    __slots__ = ("handle",)

    def __init__(self, handle: ShiraHandle):
        self.handle = handle


_SERIALS = itertools.count()


def attached(model: nn.Module) -> list[ShiraHandle]:
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


class ShiraHandle:
    """The handle ``attach`` returns: masks, originals at the masked entries, and the hooks.

    Use ``extract()`` after training, ``detach()`` (or a ``with`` block) to make the model an
    ordinary model again, and ``state_dict()`` / ``load_state_dict()`` to resume with the same masks.
    """

    def __init__(self, model: nn.Module, config: Config):
        """A handle with no targets yet; ``install`` (what ``attach`` calls) makes an attached one."""
        self.model = model
        self._config = config
        self.frozen: list[str] = []  # trainable parameters that freeze_others froze (not in the adapter)
        self._targets: list[Target] = []
        self._claimed = flags.Claimed()  # parameters whose requires_grad this handle claims (flags)
        self._calibration = Calibration(self._targets, config)
        self._gradients = GradientHooks(self._targets, self._calibration)
        self._follower = Follower(model, self._targets, self._claimed, self._gradients, self)
        self._steps = StepHooks(
            model, self._targets, self._follower, self._calibration, modes.mode_class(config.mode, config.dora)
        )
        self._finalizer: weakref.finalize | None = None
        self._attached = False
        self._serial = next(_SERIALS)  # attach order: every rank walks its handles in it (their collectives match)

    # ------------------------------------------------------------------------------ install
    def _install(
        self,
        targets: list[tuple[str, nn.Module, nn.Parameter]],
        *,
        freeze_others: bool,
        calibration: Iterable | None,
        loss_fn: LossFn | None,
        progress: bool,
    ) -> None:
        """Attach to ``targets`` (checked by ``attach``): claim flags, register the gradient hooks and the step
        guard, fix or score the masks, install the mode. Partial work is undone by ``detach``."""
        self._attached = True
        self._track()
        self._follower.watch()  # follows the weights through a later fully_shard (FSDP2)
        target_ids = {id(p) for _, _, p in targets}
        keep_alive = _KeepAlive(self)
        for name, module, param in targets:
            # A DTensor (FSDP2) is gathered for the digest: the same base digest as one process.
            base_digest = digest(distributed.gather(param.detach()), 16)
            # Every target trains densely, through its gradient hook, until its masks are fixed and its mode installed.
            target = Target(
                name, module, param, self._config.budget(param.numel()), base_digest, param.dtype, modes.Dense()
            )
            target.attr = next((key for key, value in module._parameters.items() if value is param), "weight")
            self._targets.append(target)
            module.__dict__[KEEP_ALIVE] = keep_alive
            flags.own(param, self)
            flags.claim(self, param, target=True, wanted=True)
            self._claimed.add(name, param)
            target.grad_hook = param.register_post_accumulate_grad_hook(self._gradients.hook(len(self._targets) - 1))
        if freeze_others:
            for name, param in self.model.named_parameters():
                if id(param) in target_ids:
                    continue
                trainable = param.requires_grad
                flags.claim(self, param, target=False, wanted=False)  # another handle's target keeps training
                self._claimed.add(name, param)
                if trainable and not param.requires_grad:
                    self.frozen.append(name)
            self._report_frozen()
        if not masks.kind_of(self._config.mask).needs_scores:
            self._calibration.fix_unscored()
        elif calibration is not None:
            self._calibration.run(self.model, calibration, loss_fn, progress)
        # The masks are fixed now (Mode.check_attach refused lazy calibration where a mode needs them): the
        # targets take their mode. One whose weights do not train (compact) gets no dense dL/dW; detach() restores it.
        modes.mode_class(self._config.mode, self._config.dora).install(self._targets, self.model, self._config)
        for t in self._targets:
            flags.claim(self, t.param, target=True, wanted=t.mode.weight_trains)

    def _track(self) -> None:
        """Guard the steps of optimizers over the model (``optim``), until ``detach`` or collection."""
        self._finalizer = optim.track(
            self,
            order=self._serial,
            holds_any=self._steps.holds_any,
            before_step=self._steps.before_step,
            after_step=self._steps.after_step,
        )

    def _report_frozen(self) -> None:
        """freeze_others froze trainable parameters: say which, loudly if one looks like an output head."""
        if not self.frozen:
            return
        heads = [n for n in self.frozen if masks.in_task_head(n)]
        shown = ", ".join(self.frozen[:8]) + (f", ... ({len(self.frozen)} in all)" if len(self.frozen) > 8 else "")
        logger.info(
            "shira_hooks: freeze_others=True froze %d trainable non-target parameter(s): %s", len(self.frozen), shown
        )
        if heads:
            logger.warning(
                "shira_hooks: freeze_others=True froze %s, which look like an output head: they keep their current "
                "values and are not part of the SHiRA adapter. To train them, attach with freeze_others=False (they "
                "then train densely and must be saved separately, e.g. with the model's state_dict)",
                ", ".join(heads[:8]),
            )

    def _sync(self) -> None:
        """Make the weights hold what their modes trained (compact values; a no-op in the dense mode)."""
        for t in self._targets:
            t.follow()
            t.mode.write(t)

    # ------------------------------------------------------------------------------ settings
    @property
    def mask(self) -> str | masks.MaskFn:
        """The mask: a name, or the mask function ``attach`` got."""
        return self._config.mask

    @property
    def sparsity(self) -> float:
        """The fraction of each target weight that trains."""
        return self._config.sparsity

    @property
    def seed(self) -> int:
        """The seed of rand/struct masks (the one drawn by ``attach(seed=None)``, or a loaded state's)."""
        return self._config.seed

    @property
    def mode(self) -> str:
        """How the masked entries train: "dense", "compact" or "sparse" (``modes``)."""
        return self._config.mode

    @property
    def dora(self) -> bool:
        """Whether the masked entries train weight-decomposed (SHiRA-DoRA, ``attach(dora=True)``)."""
        return self._config.dora

    @property
    def dora_rank(self) -> int | None:
        """SHiRA-DoRA's rank: None (the k entries of the direction train) or the rank of its factors."""
        return self._config.dora_rank

    @property
    def block(self) -> int:
        """Masks are aligned runs of ``block`` entries of a row."""
        return self._config.block

    @property
    def calibration_steps(self) -> int:
        """Backward passes that score a lazily calibrated grad/snip mask."""
        return self._config.calibration_steps

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
        self._follower.follow(verb="summarise the handle")
        total = sum(t.param.numel() for t in self._targets)
        state = (
            "calibrated"
            if self.calibrated
            else (
                f"calibrating: {sum(t.indices is not None for t in self._targets)}/{len(self._targets)} masks fixed, "
                f"{self.calibration_steps} backward passes each"
            )
        )
        mask = self.mask if isinstance(self.mask, str) else getattr(self.mask, "__name__", "custom")
        width = max(len("weight"), *(len(t.name) for t in self._targets))
        lines = [
            f"shira_hooks: mask={mask!r} sparsity={self.sparsity:g}{f' block={self.block}' if self.block > 1 else ''}"
            f"{self._dora_words().replace(',', '')} ({state})",
        ]
        if self.frozen:
            shown = ", ".join(self.frozen[:8]) + (", ..." if len(self.frozen) > 8 else "")
            lines.append(f"frozen by freeze_others, not in the adapter: {len(self.frozen)} parameter(s): {shown}")
        lines.append(f"{'weight':<{width}}  {'shape':>14}  {'k':>10}  {'%':>6}")
        for t in self._targets:
            shape = "x".join(str(s) for s in t.param.shape)
            lines.append(f"{t.name:<{width}}  {shape:>14}  {t.budget:>10,}  {100 * t.budget / t.param.numel():>6.2f}")
        lines.append(
            f"{'total':<{width}}  {total:>14,}  {self.num_trainable:>10,}  {100 * self.num_trainable / total:>6.2f}"
        )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ShiraHandle({len(self._targets)} weights, {self.num_trainable:,} trainable entries, "
            f"mask={self.mask!r}, mode={self.mode!r}{self._dora_words()}, calibrated={self.calibrated}, attached={self._attached})"
        )

    def _dora_words(self) -> str:
        if not self.dora:
            return ""
        return ", dora=True" + (f", dora_rank={self.dora_rank}" if self.dora_rank is not None else "")

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Raise ``ShiraError`` now, not at its first step, if ``optimizer`` cannot train the targets exactly.

        That is: a weight-decay rule shira_hooks does not know on a target weight (or ASGD's ``lambd``),
        or state nonzero outside a mask (built before ``attach``), or a target weight replaced by a parameter
        the handle cannot follow. ``ShiraCallback`` calls it at train begin.
        """
        self._follower.follow(verb="check the optimizer")
        problem = optim.unknown_decay(optimizer, {id(t.param): t.name for t in self._targets})
        if problem:
            raise ShiraError(problem)
        self._steps.check_optimizer_state(optimizer, self._targets)

    def _require_calibrated(self, action: str) -> None:
        waiting = [t for t in self._targets if t.indices is None]
        if waiting:
            raise ShiraError(
                f"cannot {action}: {len(waiting)} target weight(s) are still calibrating (e.g. '{waiting[0].name}', "
                f"{self._calibration.passes(waiting[0])}/{self.calibration_steps} backward passes seen). Train for more steps, "
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
        self._follower.follow(verb="extract an adapter")
        self._sync()
        deltas = {}
        for t in self._targets:
            assert t.indices is not None and t.originals is not None  # _require_calibrated: every mask is fixed
            values = t.current().float() - t.originals.float()
            deltas[t.name] = SparseDelta(
                tuple(t.param.shape), t.param.dtype, t.indices.clone(), values.cpu(), digest(t.originals), self.block
            )
        return SparseAdapter(
            deltas,
            {
                "mask": self._config.mask_name,
                "sparsity": f"{self.sparsity:g}",
                "seed": str(self.seed),
                "created_by": f"shira_hooks {__version__}",
            },
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
        self._follower.follow(verb="verify")
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
        self._claimed.follow_before_release(self.model)
        managed_elsewhere = bool(self._targets) and all(t.mode.flag_changed(t) for t in self._targets)
        for t in self._targets:
            t.mode.uninstall(t)  # compact: the values are written into the weight and unregistered
            t.mode = modes.Dense()  # what a detached target is: its weight, as trained
            if t.grad_hook is not None:
                t.grad_hook.remove()
                t.grad_hook = None
        self._attached = False
        optim.untrack(self)
        self._follower.unwatch()
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        flags.release(self, self._claimed.params, restore=not managed_elsewhere)
        if managed_elsewhere:
            logger.warning(
                "shira_hooks: detach() left every requires_grad flag as it is: the flags of all %d target weights were "
                "changed after attach (peft.get_peft_model, for one, freezes every parameter but its adapter's), so "
                "the model's flags are managed by other code now",
                len(self._targets),
            )
        self._claimed.clear()
        self._calibration.clear()
        for t in self._targets:
            keep_alive = t.module.__dict__.get(KEEP_ALIVE)
            if isinstance(keep_alive, _KeepAlive) and keep_alive.handle is self:
                del t.module.__dict__[KEEP_ALIVE]
            flags.disown(t.param, self)

    # ------------------------------------------------------------------- copies and pickles
    def __getstate__(self) -> dict[str, Any]:
        """The handle's state for ``copy.deepcopy`` / ``pickle`` of the model it trains (see the module docstring).

        Raises:
            ShiraError: a target weight is sharded by FSDP2 (a copy cannot take part in the original's collectives).
        """
        sharded = [
            t.name
            for t in self._targets
            if distributed.is_sharded(t.param) or distributed.is_sharded(t.module._parameters.get(t.attr))
        ]
        if sharded and self._attached:
            raise ShiraError(
                f"cannot copy or pickle a model whose shira_hooks targets are sharded by fully_shard (FSDP2), such as "
                f"'{sharded[0]}'; save the adapter (handle.extract().save(...)) and the handle's state "
                f"(handle.save_state(...)) instead, or detach() first"
            )
        return {
            **self.__dict__,
            "_config": self._config.picklable(),  # a mask function may not pickle; masks are fixed
            "_finalizer": None,
            "_flag_originals": [flags.original(param) for param in self._claimed.params],
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Make a copied or unpickled handle an attached handle of the copy: gradient hooks on the copy's
        weights, ``requires_grad`` claims (with the flags from before ``attach``), the step hooks."""
        originals = state.pop("_flag_originals")
        self.__dict__.update(state)
        self._serial = next(_SERIALS)
        if not self._attached:
            return
        self._track()
        if self._follower.watching:
            self._follower.watch()
        targets = {id(t.param): t for t in self._targets}
        for position, t in enumerate(self._targets):  # the gradient hooks are not carried (Target.__getstate__)
            flags.own(t.param, self)
            t.hook_gradient(self._gradients.hook(position))
        for param, original in zip(self._claimed.params, originals):
            target = targets.get(id(param))
            flags.claim(
                self,
                param,
                target=target is not None,
                wanted=target is not None and target.mode.weight_trains,
                original=original,
            )

    def __copy__(self) -> ShiraHandle:
        """Refused: a shallow copy would be a second handle on the same parameters."""
        raise ShiraError("a shira_hooks handle cannot be copied on its own; copy.deepcopy the model that attach() got")

    def __deepcopy__(self, memo: dict) -> ShiraHandle:
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

    def __enter__(self) -> ShiraHandle:
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
        self._follower.follow(verb="save the handle's state")
        return resumable.state_dict(self._targets, self._config)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt the masks and originals of ``state_dict()``; everything is checked before anything changes.

        Raises:
            ShiraError: the state is for other weights, shapes or dtypes, another ``block``, or its
                indices are invalid.
        """
        self._follower.follow(verb="load a handle state")
        self._config = resumable.load_state_dict(
            self._targets, state, self._config
        )  # mask, sparsity, seed: as the run that saved it
        self._calibration.clear()  # every mask is fixed now

    def save_state(self, path: str | os.PathLike, state: dict[str, Any] | None = None) -> Path:
        """``state_dict()`` as one safetensors file, written atomically.

        Args:
            state: a ``state_dict()`` taken before (default: one taken now). Under FSDP2 with ``dora=True``,
                ``state_dict()`` gathers the DoRA tensors, a collective: take it on every rank, write it on one
                (``state = shira.state_dict()``, then ``shira.save_state(path, state)`` on rank 0).
        """
        return resumable.save_state(self.state_dict() if state is None else state, path)

    def load_state(self, path: str | os.PathLike) -> None:
        """Read a file written by ``save_state`` and ``load_state_dict`` it."""
        self.load_state_dict(resumable.read_state(path))


def install(
    model: nn.Module,
    targets: list[tuple[str, nn.Module, nn.Parameter]],
    config: Config,
    *,
    freeze_others: bool,
    calibration: Iterable | None,
    loss_fn: LossFn | None,
    progress: bool,
) -> ShiraHandle:
    """An attached handle on ``targets`` of ``model`` (``(name, module, weight)``, checked by ``attach``), with
    its masks fixed or, for grad/snip without ``calibration``, scored on the first backward passes.

    If anything fails, the handle is detached before the error propagates: nothing stays changed.
    """
    handle = ShiraHandle(model, config)
    try:
        handle._install(
            targets, freeze_others=freeze_others, calibration=calibration, loss_fn=loss_fn, progress=progress
        )
    except BaseException:
        handle.detach()
        raise
    return handle
