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
would decay a target weight (so does ASGD with ``lambd != 0``, which decays every entry). With a
closure, the gradients exist only inside ``step()``: the closure is wrapped so that this happens
after it ran. With a GradScaler and a fused optimizer, the L2 term is scaled like the gradient and
nothing is decayed on a step the scaler skips.
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
# These take a ``decoupled_weight_decay`` flag.
_SWITCHABLE_OPTIMIZERS = (torch.optim.Adam, torch.optim.NAdam, torch.optim.RAdam)
SUPPORTED = "torch.optim.AdamW, Adam, SGD, NAdam, RAdam, Adagrad, RMSprop, Adamax, Adadelta"


def decay_rule(optimizer: torch.optim.Optimizer, group: dict) -> str | None:
    """'decoupled', 'l2', or None when this optimizer's weight-decay rule is unknown."""
    if isinstance(optimizer, torch.optim.AdamW):  # a subclass of Adam only in recent torch
        return "decoupled"
    if isinstance(optimizer, _SWITCHABLE_OPTIMIZERS):
        return "decoupled" if group.get("decoupled_weight_decay", False) else "l2"
    if isinstance(optimizer, _L2_OPTIMIZERS):
        return "l2"
    return None


def _scalar(value) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def unknown_decay(optimizer: torch.optim.Optimizer, masked: dict[int, tuple[str, torch.Tensor]]) -> str | None:
    """The error message ``step()`` would raise for this optimizer, or None if its decay is handled."""
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        targets = [p for p in group["params"] if id(p) in masked]
        if not targets:
            continue
        target = masked[id(targets[0])][0]
        if isinstance(optimizer, torch.optim.ASGD) and _scalar(group.get("lambd", 0.0)) != 0.0:
            return (
                f"ASGD multiplies every parameter with a gradient by (1 - lambd * eta) at each step (lambd="
                f"{_scalar(group['lambd'])}), which would change entries of target weight '{target}' outside the mask. "
                f"Fix: ASGD(..., lambd=0), or use one of {SUPPORTED}"
            )
        decay = _scalar(group.get("weight_decay", 0.0) or 0.0)
        if decay != 0.0 and decay_rule(optimizer, group) is None:
            return (
                f"{name} has weight_decay={decay} on target weight '{target}'; shira_hooks does not know how "
                f"{name} applies weight decay, so it would change entries outside the mask. Fix: put the target "
                f"weights in a param group with weight_decay=0, or use one of {SUPPORTED}"
            )
    return None


@dataclass
class _PendingStep:
    """What the pre-step hook changed, so the post-step hook can put it back."""

    groups: list[tuple[dict, list, dict]] = field(default_factory=list)  # (group, its params, temp group)
    grads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (grad, idx, kept)


class WeightDecayGuard:
    """One attached handle's part in the optimizer step hooks.

    All guards share one pair of global step hooks (registered while any guard exists), so that
    several handles, on one model or on several, make one consistent change to the param groups.

    Args:
        masked: maps ``id(param)`` to ``(name, indices)`` for every target weight whose mask is fixed;
            read at every step, so masks fixed later (lazy calibration) are picked up.
        before_step: called at every step once the gradients exist (the handle drops calibration
            gradients there).
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
        if not _GUARDS:
            _HOOKS[:] = [register_optimizer_step_pre_hook(_before_step), register_optimizer_step_post_hook(_after_step)]
        _GUARDS.append(self)

    def remove(self) -> None:
        if self not in _GUARDS:
            return
        _GUARDS.remove(self)
        if not _GUARDS:
            for handle in _HOOKS:
                handle.remove()
            _HOOKS.clear()
            for optimizer, _ in list(_PENDING.values()):
                _restore(optimizer)


_GUARDS: list[WeightDecayGuard] = []
_HOOKS: list = []
_PENDING: dict[int, tuple[torch.optim.Optimizer, _PendingStep]] = {}


def _before_step(optimizer, args, kwargs):
    _restore(optimizer)  # a previous step that raised never reached the post hook
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args = (optimizer, closure?)
    if closure is None:
        _prepare(optimizer, kwargs)
        return None

    def guarded():  # the gradients exist only once the closure has run, inside step()
        loss = closure()
        _restore(optimizer)  # LBFGS calls the closure several times
        _prepare(optimizer, kwargs)
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": guarded}
    return (args[0], guarded, *args[2:]), kwargs


@torch.no_grad()
def _prepare(optimizer, kwargs) -> None:
    for guard in list(_GUARDS):
        guard._before()
    masked = {}
    for guard in _GUARDS:
        masked.update(guard._masked())
    if not masked:
        return
    found_inf = kwargs.get("found_inf")
    if found_inf is not None and _scalar(found_inf) != 0.0:
        return  # GradScaler: a fused kernel skips this step entirely, so no decay either
    grad_scale = kwargs.get("grad_scale")  # fused kernels unscale the gradients themselves
    scale = 1.0 if grad_scale is None else _scalar(grad_scale)
    stepped = {id(p): masked[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in masked and p.grad is not None}
    problem = unknown_decay(optimizer, stepped)
    if problem:
        raise ShiraError(problem)
    pending = _PendingStep()
    for group in list(optimizer.param_groups):
        decay = _scalar(group.get("weight_decay", 0.0) or 0.0)
        targets = [p for p in group["params"] if id(p) in stepped]
        if not targets or decay == 0.0:
            continue
        rule, lr = decay_rule(optimizer, group), group["lr"]
        sign = -1.0 if group.get("maximize", False) else 1.0
        for param in targets:
            idx = stepped[id(param)][1].to(param.device, torch.int64)  # index_copy_ wants int64
            flat = param.view(-1)
            if rule == "decoupled":
                kept = flat.index_select(0, idx)
                flat.index_copy_(0, idx, kept.mul_(1 - lr * decay))
            else:
                grad = param.grad.view(-1)
                kept = grad.index_select(0, idx)
                decayed = kept.add(flat.index_select(0, idx).to(grad.dtype), alpha=sign * decay * scale)
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
        _PENDING[id(optimizer)] = (optimizer, pending)


def _after_step(optimizer, args, kwargs) -> None:
    _restore(optimizer)
    for guard in list(_GUARDS):
        guard._after()


@torch.no_grad()
def _restore(optimizer) -> None:
    entry = _PENDING.pop(id(optimizer), None)
    if entry is None:
        return
    pending = entry[1]
    for group, params, temp in pending.groups:
        group["params"] = params
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not temp]
    for grad, idx, kept in pending.grads:
        grad.index_copy_(0, idx, kept)
