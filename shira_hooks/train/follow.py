"""``Follower``: a handle's collaborator that finds its weights again after something put new parameters in their place.

Two things replace a target's ``nn.Parameter`` after ``attach``:

* FSDP2's ``fully_shard`` puts a new ``DTensor`` parameter in place of every parameter of the modules it
  shards, so a handle attached before sharding would keep masking the old objects. ``distributed.watch``
  calls ``Follower.follow`` before the model's forward passes until its first optimizer step, and every
  step calls it again (``steps``).
* User code: ``load_state_dict(sd, assign=True)`` (meta-device initialisation, several loaders),
  ``model.to("meta")``, ``module.weight = nn.Parameter(...)``. The new parameter is followed only where it
  provably is the same weight: it holds the base bit for bit outside the mask (so the mask, the stored
  originals and the base digest stay valid; its masked entries are trained values, as after an in-place
  load) and no gradient reached it without the hooks. Anything else is refused with a ``ShiraError``
  naming the weight, at the handle's next public verb (``extract``, ``verify``, ``state_dict``, ...), at the
  next step of an optimizer over the model, or before a forward pass (outside ``torch.distributed``, where
  a plain parameter in a module can also be FSDP2's unsharded weight).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import distributed
from .._base import check_dense, digest, is_dense
from ..errors import ShiraError
from . import flags
from .gradients import GradientHooks
from .target import REPLACED_FIX, Target, describe

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class Follower:
    """Adopts the parameters that ``fully_shard`` or user code put in place of a handle's target weights.

    Args:
        model: the model the handle is attached to.
        targets: the handle's targets (the same list).
        claimed: the handle's ``requires_grad`` claims, moved by name with the weights.
        gradients: makes the gradient hook registered on an adopted weight.
        owner: the handle: it owns the adopted weights (``flags.own``), and nothing is followed once it is
            detached.
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[Target],
        claimed: flags.Claimed,
        gradients: GradientHooks,
        owner: flags.Owner,
    ):
        self.model = model
        self.targets = targets
        self.claimed = claimed
        self.gradients = gradients
        self.owner = owner
        self.watching = False  # follow runs before forward passes (distributed.watch), until the first step

    def watch(self) -> None:
        """Follow before every forward pass of the model (through a later ``fully_shard``), until ``unwatch``."""
        distributed.watch(self.model, self.follow)
        self.watching = True

    def unwatch(self) -> None:
        """Stop following before forward passes (training has started: every step follows; or ``detach``)."""
        distributed.unwatch(self.model, self.follow)
        self.watching = False

    def follow(self, at_step: bool = False, verb: str | None = None) -> None:
        """Find the weights again after ``fully_shard`` or user code put new parameters in their modules.

        Called before the model's forward passes until its first optimizer step (``distributed.watch``), at every
        step of an optimizer over the model (``at_step``), and by the public verbs (``verb``: what the
        caller is about to do, for the message). A new DTensor is adopted: the gradient hook moves to it, and
        so do the ``requires_grad`` claims of every parameter this handle claimed (found by name). Before a
        forward pass under ``torch.distributed``, a replacement that is not a DTensor is left alone: it may be
        FSDP2's unsharded weight, put there by the pre-forward of an enclosing ``fully_shard`` module. A
        dense-mode DTensor first seen at a step is adopted if its gradient is zero on every rank and its
        mask is fixed: the step masks it again, which changes nothing. That is the step
        ``torch.distributed.checkpoint`` takes (zero gradients, lr 0) to build the optimizer state it loads
        into when the Trainer resumes under FSDP2, before any forward pass. Any other gradient went through
        backward without the hooks (clipping and scalers saw it unmasked), and a calibrating mask would
        drop it and leave the optimizer without state for the weight: both are refused. Compact modes
        adopt at a step always (their tap reads the module's current values, so gradients are right).

        A plain parameter in place of a plain one (``load_state_dict(assign=True)``, ...) is followed when
        it holds the base outside the mask and carries no gradient the hooks did not see
        (``_replacement_problem``); otherwise a ``ShiraError`` names the weight and the fix.

        Raises:
            ShiraError: a placement other than Shard(0)/Replicate, compact/sparse values sharded otherwise than
                their weight, a target weight replaced by something that cannot be followed, or (at a step) a
                sharded weight with a gradient the hooks could not see.
        """
        if not self.owner.attached:
            return
        moved = False
        # Before a forward pass under torch.distributed a plain parameter may be FSDP2's unsharded weight.
        check = at_step or verb is not None or not distributed.initialized()
        for position, t in enumerate(self.targets):
            now = t.module._parameters.get(t.attr)
            if now is not t.param:
                if distributed.is_sharded(now) or distributed.is_sharded(t.param):
                    moved |= self._follow_shard(position, now, at_step)
                elif check:
                    problem = self._replacement_problem(t, now)
                    if problem:
                        raise ShiraError(
                            f"{f'cannot {verb}: ' if verb else ''}target weight '{t.name}' is no longer the parameter "
                            f"shira_hooks attached to: its module holds {describe(now)} now, and {problem}. Something "
                            f"replaced it after attach (load_state_dict(..., assign=True), model.to('meta'), "
                            f"module.{t.attr} = nn.Parameter(...), an FSDP1 or DeepSpeed wrapper), so the handle's masks, "
                            f"stored originals and hooks no longer apply to it. {REPLACED_FIX}"
                        )
                    assert isinstance(now, nn.Parameter)  # _replacement_problem refused anything else
                    self._follow_replacement(position, now)
                    moved = True
            if check:  # the parameters the target's mode registered on the layer (compact: shira_values)
                t.mode.follow_own(t, verb)
        if moved:  # the frozen parameters may have been replaced too: move their requires_grad claims by name
            self.claimed.follow(self.model)

    def _follow_shard(self, position: int, now: nn.Parameter | None, at_step: bool) -> bool:
        """A target whose weight or replacement is a DTensor (FSDP2): adopt it, leave it, or refuse. Returns
        whether it was adopted."""
        t = self.targets[position]
        # A mode whose weight does not train adopts at a step always: its own tensors carry the gradient.
        refused = (
            at_step
            and t.mode.weight_trains
            and distributed.is_sharded(now)
            and (_unseen_gradient(now) or (t.indices is None and now.grad is not None))
        )
        if distributed.is_sharded(now) and not refused:
            self._adopt(position, now)
            return True
        if refused:
            raise ShiraError(
                f"target weight '{t.name}' was sharded by fully_shard and reached an optimizer step with a gradient "
                f"the hooks did not see: "
                + (
                    "its mask is still calibrating. When the Trainer resumes under FSDP2, torch.distributed.checkpoint "
                    "takes an lr-0 step before any forward pass: fix the masks first, with "
                    "shira.load_state('<checkpoint>/shira_state.safetensors') before trainer.train(...)"
                    if t.indices is None
                    else "clip_grad_norm_ and gradient scalers saw it unmasked. Fix: run the forward pass through the "
                    "attached model (its start follows fully_shard), or attach after fully_shard"
                )
            )
        if at_step and not isinstance(now, nn.Parameter):  # else FSDP2's unsharded weight, during a pass
            raise ShiraError(
                f"target weight '{t.name}' is no longer the parameter shira_hooks attached to (now: "
                f"{type(now).__name__}{'' if now is None else ' ' + str(tuple(now.shape))}), and its gradient reached the optimizer "
                f"without the mask. Something replaced it after attach (an FSDP1 or DeepSpeed wrapper, model.weight = "
                f"nn.Parameter(...), or fully_shard on a model whose forward pass did not start at the attached model). "
                f"{distributed.SUPPORTED}. Fix: attach after wrapping, to the model that is called"
            )
        return False

    def _adopt(self, position: int, param: nn.Parameter) -> None:
        """Make target ``position`` train ``param``, the DTensor that replaced its weight."""
        t = self.targets[position]
        distributed.check_placements(param, f"target weight '{t.name}'")
        check_dense(distributed.local(param), f"target weight '{t.name}'")
        t.mode.adopt(t, param)  # compact/sparse: fully_shard sharded the layer's values too
        _drop_grad_hook(t)
        if param.requires_grad:  # compact/sparse: the weight itself gets no gradient
            t.grad_hook = param.register_post_accumulate_grad_hook(self.gradients.hook(position))
        flags.disown(t.param)
        flags.own(param, self.owner)
        t.rebind(param)
        t.follow()

    # ------------------------------------------------------------------ replaced by user code
    @torch.no_grad()
    def _replacement_problem(self, t: Target, now: nn.Parameter | None) -> str | None:
        """Why the plain parameter ``now`` in place of ``t.param`` cannot be followed, or None when it can:
        it holds the base bit for bit outside the mask (the masks, originals and base digest stay valid)
        and no gradient reached it without the hooks."""
        if not isinstance(now, nn.Parameter):
            return "the weight is gone"
        if now.device.type == "meta":
            return "a meta tensor has no values to train"
        if now.shape != t.param.shape or now.dtype != t.param.dtype:
            return (
                f"the handle holds a {str(t.param.dtype).removeprefix('torch.')} weight of shape {tuple(t.param.shape)}"
            )
        if not is_dense(now):
            return "its layout has gaps or overlapping elements"
        if now.grad is not None and bool(now.grad.any()):
            return "it received a gradient without the mask (clipping and gradient scalers saw it unmasked)"
        base = t.restored(now) if t.indices is not None else now.detach()
        if digest(base, 16) != t.base_digest:
            return "its entries outside the mask differ from the base weight the adapter is measured from"
        return None

    def _follow_replacement(self, position: int, param: nn.Parameter) -> None:
        """Make target ``position`` train ``param``, a plain parameter that replaced its weight and holds the
        base outside the mask (its masked entries are trained values, as after an in-place load)."""
        t = self.targets[position]
        old = t.param
        _drop_grad_hook(t)
        flags.disown(old)
        flags.own(param, self.owner)
        t.rebind(param)
        t.hook_gradient(self.gradients.hook(position))  # compact weights get none, but may again
        t.replaced.append((t.name, weakref.ref(old)))  # an optimizer still holding it would train nothing (steps)
        t.follow()
        t.mode.weight_replaced(t, old, param)  # compact: the weight's masked entries mirror the values


def _drop_grad_hook(t: Target) -> None:
    """Remove the gradient hook from the parameter ``t`` leaves."""
    if t.grad_hook is not None:
        t.grad_hook.remove()
        t.grad_hook = None


def _unseen_gradient(param: DTensor) -> bool:
    """Whether a sharded parameter first seen at a step carries a gradient that matters, on any rank.

    An all-zero gradient (``torch.distributed.checkpoint``'s lr-0 step that builds optimizer state before
    a resume) can be adopted, if the mask is fixed: the step masks it again, and masking zeros changes
    nothing. Any other gradient went through backward without the hooks. The ranks agree (an all-reduce).
    """
    grad = param.grad
    nonzero = torch.tensor(
        [grad is not None and bool(distributed.local(grad).any())], dtype=torch.int32, device=param.device
    )
    distributed.all_reduce(nonzero, "max", mesh=param.device_mesh)
    return bool(nonzero.item())
