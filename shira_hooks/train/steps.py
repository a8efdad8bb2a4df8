"""``StepHooks``: a handle's collaborator for its work around optimizer steps.

``optim`` registers one global optimizer step pre-hook and post-hook while any handle is attached;
for each step of an optimizer over the handle's model (``holds_any``) they call ``before_step`` (once
the gradients exist: follow replaced parameters, say when no target can train, check gradients and
optimizer state, prepare each target for the step through its mode) and ``after_step`` (the modes
write what the step changed into the weights: compact values).
"""

from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from .. import distributed
from ..errors import ShiraError
from .calibration import Calibration
from .follow import Follower
from .target import Mode, Retired, Target


class StepHooks:
    """The checks and the work of one handle around every optimizer step that holds its weights.

    Args:
        model: the model the handle is attached to.
        targets: the handle's targets (the same list).
        follower: follows replaced weights at every step; its watch before forward passes ends at the first step.
        calibration: the handle's calibration (the settings and passes its messages name).
        mode: the handle's mode class (the wording of its warnings).
    """

    def __init__(
        self, model: nn.Module, targets: list[Target], follower: Follower, calibration: Calibration, mode: type[Mode]
    ):
        self.model = model
        self.targets = targets
        self.follower = follower
        self.calibration = calibration
        self.mode = mode
        self._warned_no_gradient = False
        self._warned_frozen = False  # targets whose requires_grad other code set to False were reported
        self._gradient_checked = False  # a target got a gradient, or it was said that none does
        self._checked_state: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> id(state) checked

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_checked_state": None}  # a copy checks the copy's optimizers afresh

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._checked_state = weakref.WeakKeyDictionary()

    def holds_any(self, ids: set[int]) -> bool:
        """Whether any of ``ids`` (an optimizer's parameters) is a parameter of the handle's model or one
        of its targets, present, replaced or retired by an earlier handle's ``detach()``: the handle's step work
        runs only for such optimizers."""
        for t in self.targets:
            if t.mode.held_by(t, ids):
                return True
            if any(old() is not None and id(old()) in ids for _, old in t.replaced):
                return True
            if Retired.held(t.module, ids) is not None:
                return True
        return any(id(p) in ids for p in self.model.parameters())

    def before_step(self, optimizer: torch.optim.Optimizer, members: dict[int, dict]) -> dict[int, Target]:
        """Called by the step pre-hook once the gradients exist, for an optimizer over the handle's model;
        ``members`` maps id(param) -> its group.

        Follows replaced parameters, says (once) when the targets cannot train, reports targets that get no
        gradient, checks the optimizer's state once, and prepares every target gradient
        (the target's ``mode.before_step``). Returns the targets whose masked gradient the step uses, by id(param).
        """
        self.follower.follow(at_step=True)
        self._check_replaced(optimizer, members)
        self._check_retired(optimizer, members)
        self._check_trainable(optimizer)
        mine = [t for t in self.targets if t.mode.held_by(t, members)]
        if not mine:
            return {}
        if self.follower.watching:
            self.follower.unwatch()  # training has started: from now on every step checks the weights
        self._check_gradients(mine)
        self.check_optimizer_state(optimizer, mine)
        stepped = {}
        for t in mine:
            if t.mode.before_step(t, optimizer, members):
                stepped[id(t.param)] = t
        return stepped

    def after_step(self, optimizer: torch.optim.Optimizer, members: set[int]) -> None:
        """Called after every optimizer step: compact values that it changed are written into the weights.

        Values the step left as they were are not written: they equal the weight's entries, unless
        something replaced them since (the Trainer resuming under FSDP2 loads the checkpoint's
        ``shira_values``, made for the checkpoint's masks, then takes ``torch.distributed.checkpoint``'s
        lr-0 step before ``ShiraCallback`` loads those masks). Under FSDP2 the ranks agree on which
        layers changed (one all-reduce of a flag per layer), since writing them is a collective.
        """
        stepped, changed = [], []
        for t in self.targets:
            moved = t.mode.step_changed(optimizer, members)
            if moved is not None:
                stepped.append(t)
                changed.append(moved)
        if not stepped:
            return
        agreed = torch.tensor(changed, dtype=torch.int32)
        sharded = next((tensor for t in stepped if (tensor := t.mode.sharded()) is not None), None)
        if sharded is not None:
            agreed = agreed.to(sharded.device)
            distributed.all_reduce(agreed, "max", mesh=sharded.device_mesh)
        for t, moved in zip(stepped, agreed.tolist()):
            if moved:
                t.mode.write(t)

    def _check_replaced(self, optimizer: torch.optim.Optimizer, members: dict[int, dict]) -> None:
        """Refuse an optimizer that holds a parameter the handle followed away from (``follow``): it is no
        longer in the model, so the optimizer would train nothing in its place."""
        for t in self.targets:
            held = [name for name, old in t.replaced if old() is not None and id(old()) in members]
            if held:
                raise ShiraError(
                    f"{type(optimizer).__name__} holds the parameter '{held[0]}' had before it was replaced "
                    f"(load_state_dict(..., assign=True), module.weight = nn.Parameter(...)), trained for '{t.name}': it "
                    f"is no longer in the model, so the optimizer would not train the weight. Build the optimizer after "
                    f"replacing parameters, or load into them in place (load_state_dict without assign=True)"
                )

    def _check_retired(self, optimizer: torch.optim.Optimizer, members: dict[int, dict]) -> None:
        """Refuse an optimizer built before an earlier handle's ``detach()``: it holds the trained tensors that
        ``detach()`` removed from a target layer, and none of those this handle trains there, so its steps would
        train nothing (an optimizer holding both, with ``add_param_group``, trains the new ones: allowed)."""
        for t in self.targets:
            name = Retired.held(t.module, members)
            if name is not None and not any(id(p) in members for p in t.mode.trained(t)):
                trained = ", ".join(
                    f"'{n}'" for n, p in self.model.named_parameters() if any(p is q for q in t.mode.trained(t))
                )
                raise ShiraError(
                    f"{type(optimizer).__name__} holds '{name}', which an earlier handle trained and detach() removed "
                    f"from the model; the handle attached since trains '{t.name}' through {trained or 'new tensors'}, "
                    f"which this optimizer does not hold, so its steps would train nothing. Build the optimizer after "
                    f"attach()"
                )

    def _check_trainable(self, optimizer: torch.optim.Optimizer) -> None:
        """Say once, at the first steps of an optimizer over the model, when targets cannot train.

        Targets whose flag other code set to False since ``attach`` (``peft.get_peft_model`` freezes every
        parameter but its adapter's; in the compact modes the flag of ``shira_values``): a warning naming
        them. Every target trainable, but none has received a gradient since ``attach`` and none holds one
        at a step where other parameters of the optimizer do (a model whose loss reaches none of them): a
        warning too. (``torch.distributed.checkpoint``'s lr-0 step before a resume gives every parameter,
        the targets included, a zero gradient: not reported.)
        """
        if not self._warned_frozen:
            frozen = [t for t in self.targets if t.mode.frozen(t)]
            if frozen:
                self._warned_frozen = True
                names = ", ".join(f"'{t.name}'" for t in frozen[:6]) + (
                    f" and {len(frozen) - 6} more" if len(frozen) > 6 else ""
                )
                which, them = self.mode.frozen_words
                warnings.warn(
                    f"shira_hooks: {len(frozen)} of {len(self.targets)} target weights cannot train: {which} have "
                    f"requires_grad=False, set after attach() by other code (peft.get_peft_model, for one, freezes every "
                    f"parameter but its adapter's): {names}. "
                    + ("No SHiRA entry trains: the adapter stays zero. " if len(frozen) == len(self.targets) else "")
                    + f"To train them, set requires_grad=True on {them} again; if they are "
                    f"not meant to train, detach() the handle",
                    stacklevel=4,
                )
                if len(frozen) == len(self.targets):
                    self._gradient_checked = True  # that is why none gets a gradient: said once
        if self._gradient_checked:
            return
        if any(t.mode.got_gradient(t) for t in self.targets):
            self._gradient_checked = True
            return
        if any(p.grad is not None for t in self.targets for p in t.mode.trained(t)):
            return
        if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
            self._gradient_checked = True
            warnings.warn(
                f"shira_hooks: none of the {len(self.targets)} target weights of the handle attached to "
                f"{type(self.model).__name__} has received a gradient, while other parameters of "
                f"{type(optimizer).__name__} have: the loss does not reach them (is the model that computes it the one "
                f"attach() got?), so no SHiRA entry trains",
                stacklevel=4,
            )

    def _check_gradients(self, mine: list[Target]) -> None:
        """Targets that got no gradient while others did: a warning, or an error if calibration cannot finish."""
        seen = [t.mode.got_gradient(t) for t in mine]
        if all(seen) or not any(seen):
            return
        missing = [t for t, s in zip(mine, seen) if not s]
        names = ", ".join(f"'{t.name}'" for t in missing[:6]) + (
            f" and {len(missing) - 6} more" if len(missing) > 6 else ""
        )
        stuck = [t for t in missing if t.indices is None]
        if stuck and all(t.indices is not None for t in mine if t not in stuck):
            config = self.calibration.config
            raise ShiraError(
                f"mask={config.mask!r} is scored on the gradients of the first {config.calibration_steps} backward passes, "
                f"and {len(stuck)} target weight(s) have received none while every other target's mask is fixed: "
                f"{names}. The loss does not depend on them (e.g. an unused pooler), so their masks can never be "
                f"scored. Exclude them with target_modules, or pass calibration= batches whose loss uses them"
            )
        if self._warned_no_gradient:
            return
        self._warned_no_gradient = True
        why = "the loss does not depend on them (e.g. an unused pooler or head)" + self.mode.unseen_why.format(
            mode=self.mode.name
        )
        warnings.warn(
            f"shira_hooks: {len(missing)} of {len(mine)} target weights received no gradient in the backward passes so "
            f"far while the others did: {names}. They do not train: {why}. Exclude them with target_modules"
            + self.mode.unseen_fix,
            stacklevel=4,
        )

    def check_optimizer_state(self, optimizer: torch.optim.Optimizer, targets: list[Target]) -> None:
        """Refuse optimizer state that is nonzero outside a mask (built before attach): it would move those entries.

        Checked once per optimizer state (``load_state_dict`` makes a new one), when every target's
        mask is fixed. State built by steps under the hooks is zero outside the masks.
        """
        state = optimizer.state
        if self._checked_state.get(optimizer) == id(state):
            return
        for t in targets:
            found = t.mode.optimizer_state_problem(t, state.get(t.param) or {}) if t.indices is not None else None
            if found:
                raise ShiraError(
                    f"{type(optimizer).__name__} has state '{found[0]}' for target weight '{t.name}' that is nonzero at "
                    f"{found[1]} entries outside the mask (state from steps before attach()); the optimizer would keep "
                    f"moving those entries. Build the optimizer after attach(), or drop its state for the target "
                    f"weights first (optimizer.state.pop(param) for each, or optimizer.state.clear())"
                )
        if all(t.indices is not None for t in targets):
            self._checked_state[optimizer] = id(state)
