"""The part of ``ShiraHandle`` that finds its weights again after FSDP2's ``fully_shard`` replaced them.

``fully_shard`` puts a new ``DTensor`` parameter in place of every parameter of the modules it shards,
so a handle attached before sharding would keep masking the old objects. ``_shard.watch`` calls
``_follow_parameters`` before the model's forward passes until its first optimizer step, and every
step calls it again (``_steps``); ``extract``/``verify`` call it too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from . import _compact, _flags, _shard
from ._layout import check_dense
from .errors import ShiraError

if TYPE_CHECKING:
    from ._target import Target


class FollowSharding:
    """Mixed into ``ShiraHandle``: adopt the ``DTensor`` parameters that ``fully_shard`` put in place."""

    _targets: "list[Target]"
    _attached: bool
    _claimed: list[nn.Parameter]
    _claimed_names: list[str]
    _hooks: list
    _watch_hooks: list
    model: nn.Module

    def _follow_parameters(self, at_step: bool = False) -> None:
        """Find the weights again after FSDP2's ``fully_shard`` put new ``DTensor`` parameters in their modules.

        Called before the model's forward passes until its first optimizer step (``_shard.watch``), at every
        optimizer step (``at_step``), and by ``extract``/``verify``. A new DTensor is adopted:
        the gradient hook moves to it, and so do the ``requires_grad`` claims of every parameter this handle
        claimed (found by name). Before a forward pass, a replacement that is not a DTensor is left alone:
        it may be FSDP2's unsharded weight, put there by the pre-forward of an enclosing ``fully_shard``
        module. A dense-mode DTensor first seen at a step is adopted if its gradient is zero on every rank
        and its mask is fixed: the step masks it again, which changes nothing. That is the step
        ``torch.distributed.checkpoint`` takes (zero gradients, lr 0) to build the optimizer state it loads
        into when the Trainer resumes under FSDP2, before any forward pass. Any other gradient went through
        backward without the hooks (clipping and scalers saw it unmasked), and a calibrating mask would
        drop it and leave the optimizer without state for the weight: both are refused. Compact modes
        adopt at a step always (their tap reads the module's current values, so gradients are right).

        Raises:
            ShiraError: a placement other than Shard(0)/Replicate, compact/sparse values sharded otherwise than
                their weight, or (at a step) a target weight replaced by something the hooks could not follow.
        """
        if not self._attached:
            return
        moved = False
        for position, t in enumerate(self._targets):
            now = t.module._parameters.get(t.attr)
            if now is t.param:
                continue
            refused = at_step and t.plan is None and _shard.is_sharded(now) and (
                _unseen_gradient(now) or (t.indices is None and now.grad is not None)
            )
            if _shard.is_sharded(now) and not refused:
                self._adopt(position, now)
                moved = True
            elif refused:
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
            elif at_step and not (_shard.is_sharded(t.param) and isinstance(now, nn.Parameter)):  # else: unsharded by FSDP2
                raise ShiraError(
                    f"target weight '{t.name}' is no longer the parameter shira_hooks attached to (now: "
                    f"{type(now).__name__}{'' if now is None else ' ' + str(tuple(now.shape))}), and its gradient reached the optimizer "
                    f"without the mask. Something replaced it after attach (an FSDP1 or DeepSpeed wrapper, model.weight = "
                    f"nn.Parameter(...), or fully_shard on a model whose forward pass did not start at the attached model). "
                    f"{_shard.SUPPORTED}. Fix: attach after wrapping, to the model that is called"
                )
        if moved:  # the frozen parameters were replaced too: move their requires_grad claims by name
            now_params = dict(self.model.named_parameters(remove_duplicate=False))
            for i, (name, old) in enumerate(zip(self._claimed_names, self._claimed)):
                new = now_params.get(name)
                if new is not None and new is not old and _shard.is_sharded(new):
                    _flags.move(old, new)
                    self._claimed[i] = new

    def _adopt(self, position: int, param: nn.Parameter) -> None:
        """Make target ``position`` train ``param``, the DTensor that replaced its weight."""
        t = self._targets[position]
        _shard.check_placements(param, f"target weight '{t.name}'")
        check_dense(_shard.local(param), f"target weight '{t.name}'")
        if t.plan is not None:  # compact/sparse: fully_shard sharded the layer's values too
            t.plan.adopt(param, t.module._parameters.get(_compact.VALUES), t.indices, f"'{t.name.rpartition('.')[0]}.{_compact.VALUES}'")
            for hook in self._watch_hooks:  # FSDP2 reads the sharded weights outside their layers (its all-gather)
                hook.remove()
            self._watch_hooks = []
        t.grad_hook.remove()
        if param.requires_grad:  # compact/sparse: the weight itself gets no gradient
            t.grad_hook = param.register_post_accumulate_grad_hook(self._make_hook(position))
            self._hooks.append(t.grad_hook)
        _flags.disown(t.param)
        _flags.own(param, self)
        t.param = param
        t._positions.clear()
        t.follow()


def _unseen_gradient(param: nn.Parameter) -> bool:
    """Whether a sharded parameter first seen at a step carries a gradient that matters, on any rank.

    An all-zero gradient (``torch.distributed.checkpoint``'s lr-0 step that builds optimizer state before
    a resume) can be adopted, if the mask is fixed: the step masks it again, and masking zeros changes
    nothing. Any other gradient went through backward without the hooks. The ranks agree (an all-reduce).
    """
    grad = param.grad
    nonzero = torch.tensor([grad is not None and bool(_shard.local(grad).any())], dtype=torch.int32, device=param.device)
    torch.distributed.all_reduce(nonzero, torch.distributed.ReduceOp.MAX, group=param.device_mesh.get_group())
    return bool(nonzero.item())
