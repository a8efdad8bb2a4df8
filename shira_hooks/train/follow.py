"""The part of ``ShiraHandle`` that finds its weights again after something put new parameters in their place.

Two things replace a target's ``nn.Parameter`` after ``attach``:

* FSDP2's ``fully_shard`` puts a new ``DTensor`` parameter in place of every parameter of the modules it
  shards, so a handle attached before sharding would keep masking the old objects. ``distributed.watch``
  calls ``_follow_parameters`` before the model's forward passes until its first optimizer step, and every
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

import torch
from torch import nn

from .. import distributed
from .._base import check_dense, digest, is_dense
from ..errors import ShiraError
from . import compact, flags
from .target import Target

_FIX = (
    "Fix: load into the attached parameters instead of replacing them (load_state_dict without assign=True, or "
    "param.copy_(...) under torch.no_grad()), or detach() the handle first and attach again afterwards "
    "(save_state() / load_state() keep the masks)"
)


class FollowSharding:
    """Mixed into ``ShiraHandle``: adopt the parameters that ``fully_shard`` or user code put in place."""

    _targets: list[Target]
    _attached: bool
    _claimed: list[nn.Parameter]
    _claimed_names: list[str]
    _hooks: list
    _watch_hooks: list
    model: nn.Module

    def _follow_parameters(self, at_step: bool = False, verb: str | None = None) -> None:
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
        if not self._attached:
            return
        moved = False
        # Before a forward pass under torch.distributed a plain parameter may be FSDP2's unsharded weight.
        check = at_step or verb is not None or not distributed.initialized()
        for position, t in enumerate(self._targets):
            now = t.module._parameters.get(t.attr)
            if now is not t.param:
                if distributed.is_sharded(now) or distributed.is_sharded(t.param):
                    moved |= self._follow_shard(position, now, at_step)
                elif check:
                    problem = self._replacement_problem(t, now)
                    if problem:
                        raise ShiraError(
                            f"{f'cannot {verb}: ' if verb else ''}target weight '{t.name}' is no longer the parameter "
                            f"shira_hooks attached to: its module holds {_describe(now)} now, and {problem}. Something "
                            f"replaced it after attach (load_state_dict(..., assign=True), model.to('meta'), "
                            f"module.{t.attr} = nn.Parameter(...), an FSDP1 or DeepSpeed wrapper), so the handle's masks, "
                            f"stored originals and hooks no longer apply to it. {_FIX}"
                        )
                    self._follow_replacement(position, now)
                    moved = True
            if t.plan is not None and not t.plan.managed and check:
                values = t.module._parameters.get(compact.VALUES)
                if values is not t.plan.values:
                    self._follow_values(t, values, verb)
        if moved:  # the frozen parameters may have been replaced too: move their requires_grad claims by name
            now_params = dict(self.model.named_parameters(remove_duplicate=False))
            for i, (name, old) in enumerate(zip(self._claimed_names, self._claimed)):
                new = now_params.get(name)
                # (not FSDP2's unsharded weight in place of a sharded one: that is put back after the pass)
                if new is not None and new is not old and (distributed.is_sharded(new) or not distributed.is_sharded(old)):
                    flags.move(old, new)
                    self._claimed[i] = new

    def _follow_shard(self, position: int, now: nn.Parameter | None, at_step: bool) -> bool:
        """A target whose weight or replacement is a DTensor (FSDP2): adopt it, leave it, or refuse. Returns
        whether it was adopted."""
        t = self._targets[position]
        refused = at_step and t.plan is None and distributed.is_sharded(now) and (
            _unseen_gradient(now) or (t.indices is None and now.grad is not None)
        )
        if distributed.is_sharded(now) and not refused:
            self._adopt(position, now)
            return True
        if refused:
            raise ShiraError(
                f"target weight '{t.name}' was sharded by fully_shard and reached an optimizer step with a gradient "
                f"the hooks did not see: "
                + ("its mask is still calibrating. When the Trainer resumes under FSDP2, torch.distributed.checkpoint "
                   "takes an lr-0 step before any forward pass: fix the masks first, with "
                   "shira.load_state('<checkpoint>/shira_state.safetensors') before trainer.train(...)"
                   if t.indices is None else
                   "clip_grad_norm_ and gradient scalers saw it unmasked. Fix: run the forward pass through the "
                   "attached model (its start follows fully_shard), or attach after fully_shard")
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
        t = self._targets[position]
        distributed.check_placements(param, f"target weight '{t.name}'")
        check_dense(distributed.local(param), f"target weight '{t.name}'")
        if t.plan is not None:  # compact/sparse: fully_shard sharded the layer's values too
            t.plan.adopt(param, t.module._parameters.get(compact.VALUES), t.indices, f"'{t.name.rpartition('.')[0]}.{compact.VALUES}'")
            for hook in self._watch_hooks:  # FSDP2 reads the sharded weights outside their layers (its all-gather)
                hook.remove()
            self._watch_hooks = []
        self._drop_grad_hook(t)
        if param.requires_grad:  # compact/sparse: the weight itself gets no gradient
            t.grad_hook = param.register_post_accumulate_grad_hook(self._make_hook(position))
            self._hooks.append(t.grad_hook)
        flags.disown(t.param)
        flags.own(param, self)
        t.param = param
        t._positions.clear()
        t.follow()

    def _drop_grad_hook(self, t: Target) -> None:
        """Remove the gradient hook from the parameter ``t`` leaves (and from the handle's list: a copy of the
        handle must not carry a handle of a hook dict that holds a closure)."""
        t.grad_hook.remove()
        self._hooks = [hook for hook in self._hooks if hook is not t.grad_hook]

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
            return f"the handle holds a {str(t.param.dtype).removeprefix('torch.')} weight of shape {tuple(t.param.shape)}"
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
        t = self._targets[position]
        old = t.param
        self._drop_grad_hook(t)
        flags.disown(old)
        flags.own(param, self)
        t.param = param
        self._hooks.append(t.hook_gradient(self._make_hook(position)))  # compact weights get none, but may again
        t.replaced.append(weakref.ref(old))  # an optimizer still holding it would train nothing (steps)
        t._positions.clear()
        for check in self._watch_hooks:
            check.layers = [(param if weight is old else weight, layer, name) for weight, layer, name in check.layers]
        t.follow()
        if t.plan is not None:  # the weight's masked entries mirror the values: write them in
            t.plan.weight = param
            t.plan.follow()
            t.plan.sync(force=True)

    def _follow_values(self, t: Target, values: nn.Parameter | None, verb: str | None) -> None:
        """mode="compact"/"sparse": the layer's ``shira_values`` were replaced (``load_state_dict(assign=True)``).
        They are the trained entries, so a (k,) parameter of the weight's dtype is followed and written
        into the weight; anything else is refused."""
        old = t.plan.values
        if not (isinstance(values, nn.Parameter) and values.shape == old.shape and values.dtype == old.dtype and values.device.type != "meta"):
            layer = t.name.rpartition(".")[0]
            raise ShiraError(
                f"{f'cannot {verb}: ' if verb else ''}'{layer}.{compact.VALUES}' (the {old.numel()} trained entries of "
                f"'{t.name}') is no longer the parameter shira_hooks registered: the layer holds {_describe(values)} now. {_FIX}"
            )
        t.plan.values = values
        t.replaced.append(weakref.ref(old))
        t.plan.follow()
        t.plan.sync(force=True)


def _describe(param: torch.Tensor | None) -> str:
    if param is None:
        return "None"
    return f"a {type(param).__name__} of shape {tuple(param.shape)}, {str(param.dtype).removeprefix('torch.')}, on {param.device}"


def _unseen_gradient(param: nn.Parameter) -> bool:
    """Whether a sharded parameter first seen at a step carries a gradient that matters, on any rank.

    An all-zero gradient (``torch.distributed.checkpoint``'s lr-0 step that builds optimizer state before
    a resume) can be adopted, if the mask is fixed: the step masks it again, and masking zeros changes
    nothing. Any other gradient went through backward without the hooks. The ranks agree (an all-reduce).
    """
    grad = param.grad
    nonzero = torch.tensor([grad is not None and bool(distributed.local(grad).any())], dtype=torch.int32, device=param.device)
    distributed.all_reduce(nonzero, "max", mesh=param.device_mesh)
    return bool(nonzero.item())
