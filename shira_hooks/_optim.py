"""Keep weight decay off the entries outside the masks, for any torch optimizer step.

Masking gradients is not enough: decoupled decay (AdamW) multiplies every parameter that has a
``.grad`` by ``1 - lr * wd``, and L2 decay (Adam, SGD, ...) adds ``wd * p`` to the gradient inside
``step()`` (FACTS.md has the reproduction). Around each step that touches a target weight, the guard

1. moves the target weights of a decaying param group into a temporary group with
   ``weight_decay=0`` (the other parameters of the group keep their decay, untouched), and
2. applies the group's decay itself, only at the masked entries: ``p[idx] *= 1 - lr * wd`` for
   decoupled decay (before the update, as torch does), or ``grad[idx] += wd * p[idx]`` for L2
   decay (the gradient entries are put back after the step).

Optimizers whose decay rule is not known here raise ``ShiraError`` at their first step if they
would decay a target weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .errors import ShiraError

_L2_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adagrad,
    torch.optim.RMSprop,
    torch.optim.Adamax,
    torch.optim.Adadelta,
)
# These take a ``decoupled_weight_decay`` flag (AdamW is Adam with the flag set).
_SWITCHABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam)
SUPPORTED = "torch.optim.AdamW, Adam, SGD, NAdam, RAdam, Adagrad, RMSprop, Adamax, Adadelta"


def decay_rule(optimizer: torch.optim.Optimizer, group: dict) -> str | None:
    """'decoupled', 'l2', or None when this optimizer's weight-decay rule is unknown."""
    if isinstance(optimizer, _SWITCHABLE_OPTIMIZERS):
        default = isinstance(optimizer, torch.optim.AdamW)
        return "decoupled" if group.get("decoupled_weight_decay", default) else "l2"
    if isinstance(optimizer, _L2_OPTIMIZERS):
        return "l2"
    return None


def _scalar(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def unknown_decay(optimizer: torch.optim.Optimizer, masked: dict[int, tuple[str, torch.Tensor]]) -> str | None:
    """The error message ``step()`` would raise for this optimizer, or None if its decay is handled."""
    for group in optimizer.param_groups:
        decay = _scalar(group.get("weight_decay", 0.0) or 0.0)
        targets = [p for p in group["params"] if id(p) in masked]
        if targets and decay != 0.0 and decay_rule(optimizer, group) is None:
            name = type(optimizer).__name__
            return (
                f"{name} has weight_decay={decay} on target weight '{masked[id(targets[0])][0]}'; "
                f"shira_hooks does not know how {name} applies weight decay, so it would change entries "
                f"outside the mask. Fix: put the target weights in a param group with weight_decay=0, "
                f"or use one of {SUPPORTED}"
            )
    return None


@dataclass
class _PendingStep:
    """What the pre-step hook changed, so the post-step hook can put it back."""

    groups: list[tuple[dict, list, dict]] = field(default_factory=list)  # (group, its params, temp group)
    grads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (grad, idx, kept)


class WeightDecayGuard:
    """Registers global optimizer step hooks for one attached handle.

    Args:
        masked: maps ``id(param)`` to ``(name, indices)`` for every target weight whose mask is fixed;
            read at every step, so masks fixed later (lazy calibration) are picked up.
        before_step: called first at every step (the handle drops calibration gradients there).
        after_step: called after every step (the compact modes write the new values into the weights).
    """

    def __init__(
        self,
        masked: Callable[[], dict[int, tuple[str, torch.Tensor]]],
        before_step: Callable[[], None],
        after_step: Callable[[], None],
    ):
        self._masked = masked
        self._before = before_step
        self._after = after_step
        self._pending: dict[int, tuple[torch.optim.Optimizer, _PendingStep]] = {}
        self._handles = [
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for optimizer, _ in list(self._pending.values()):
            self._restore(optimizer)

    @torch.no_grad()
    def _before_step(self, optimizer, args, kwargs) -> None:
        self._restore(optimizer)  # a previous step that raised never reached the post hook
        self._before()
        masked = self._masked()
        if not masked:
            return
        stepped = {id(p): masked[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in masked and p.grad is not None}
        problem = unknown_decay(optimizer, stepped)
        if problem:
            raise ShiraError(problem)
        plan = []  # (group, target weights with a gradient, rule, decay) for every decaying group
        for group in optimizer.param_groups:
            decay = _scalar(group.get("weight_decay", 0.0) or 0.0)
            targets = [p for p in group["params"] if id(p) in stepped]
            if targets and decay != 0.0:
                plan.append((group, targets, decay_rule(optimizer, group), decay))

        pending = _PendingStep()
        for group, targets, rule, decay in plan:
            lr = group["lr"]
            sign = -1.0 if group.get("maximize", False) else 1.0
            for param in targets:
                idx = masked[id(param)][1].to(torch.int64)  # index_copy_ wants int64
                flat = param.view(-1)
                if rule == "decoupled":
                    kept = flat.index_select(0, idx)
                    flat.index_copy_(0, idx, kept.mul_(1 - lr * decay))
                else:
                    grad = param.grad.view(-1)
                    kept = grad.index_select(0, idx)
                    decayed = kept.add(flat.index_select(0, idx).to(grad.dtype), alpha=sign * decay)
                    grad.index_copy_(0, idx, decayed)
                    pending.grads.append((grad, idx, kept))
            # The optimizer itself must not decay the targets: give them a group of their own.
            target_ids = {id(p) for p in targets}
            temp = dict(group)
            temp["params"] = targets
            temp["weight_decay"] = 0.0
            pending.groups.append((group, group["params"], temp))
            group["params"] = [p for p in group["params"] if id(p) not in target_ids]
            optimizer.param_groups.append(temp)
        if pending.groups or pending.grads:
            self._pending[id(optimizer)] = (optimizer, pending)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self._restore(optimizer)
        self._after()

    @torch.no_grad()
    def _restore(self, optimizer) -> None:
        entry = self._pending.pop(id(optimizer), None)
        if entry is None:
            return
        pending = entry[1]
        for group, params, temp in pending.groups:
            group["params"] = params
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not temp]
        for grad, idx, kept in pending.grads:
            grad.index_copy_(0, idx, kept)
