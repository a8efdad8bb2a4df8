"""Keep every optimizer step exact for the target weights of the attached handles.

Masking gradients in the backward pass is not enough:

* decoupled decay (AdamW) multiplies every parameter that has a ``.grad`` by ``1 - lr * wd``, and L2
  decay (Adam, SGD, ...) adds ``wd * p`` to the gradient inside ``step()``: with gradients masked to
  45 entries of a 64x64 weight, 3 steps of ``AdamW(lr=1e-2)`` at the default ``weight_decay=0.01``
  changed all 4096 entries (``tests/test_optimizers.py::test_stock_optimizer_would_leak_without_the_guard``
  shows it);
* something may write ``.grad`` after the masking hook ran: a DDP communication hook (PowerSGD)
  writes its dense approximation back at the end of the backward pass, user code may assign it;
* optimizer state from before ``attach`` (momentum, Adam moments) keeps moving unmasked entries.

So around each step of an optimizer that holds target weights, each handle (the ``before_step`` it
registered with ``track``: ``steps.StepHooks.before_step``) masks the gradients again and checks the
optimizer's state, and then the guard here

1. moves the target weights of a decaying param group into a temporary group with
   ``weight_decay=0`` (the other parameters of the group keep their decay, untouched), and
2. applies the group's decay itself, only at the masked entries: ``p[idx] *= 1 - lr * wd`` for
   decoupled decay (before the update, as torch does), or ``grad[idx] += wd * p[idx]`` for L2
   decay (the gradient entries are put back after the step).

Optimizers whose decay rule is not known here raise ``ShiraError`` at their first step if they
would decay a target weight (so does ASGD with ``lambd != 0``, which decays every entry). With a
closure, the gradients exist only inside ``step()``: the closure is wrapped so that this happens
after it ran. A ``GradScaler`` hands fused optimizers ``grad_scale`` and ``found_inf`` as attributes
of the optimizer (older code passed them to ``step()``): the L2 term is scaled like the gradient,
and nothing is decayed on a step the scaler skips.

The step hooks are torch's global optimizer hooks (torch offers no other way to learn which optimizers
exist), registered while at least one handle is attached and removed when the last one is detached or
garbage collected. A handle registers its step work as bound methods (``track``), held weakly, in a table
keyed weakly by the handle: the hooks keep no model alive, this module never imports the handle, and once
no handle is attached no shira_hooks code runs in any optimizer's ``step()``. While one is, a handle's step work
runs only for optimizers that hold a parameter of its model (``related``); for any other optimizer each
hook does two weak-dictionary lookups and builds a tuple of its param groups' sizes, and returns. That
verdict is computed once per optimizer (one pass over its parameter ids) and again only when a handle
is attached or detached or the optimizer's param groups change in number or size.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..errors import ShiraError
from .target import Target

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


def unknown_decay(optimizer: torch.optim.Optimizer, targets: dict[int, str]) -> str | None:
    """The error message ``step()`` would raise for this optimizer, or None if its decay is handled.

    Args:
        targets: ``id(param) -> name`` of the target weights to check.
    """
    name = type(optimizer).__name__
    for group in optimizer.param_groups:
        found = [p for p in group["params"] if id(p) in targets]
        if not found:
            continue
        target = targets[id(found[0])]
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
    grads: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=list
    )  # (flat grad, index, kept)


class _Guard:
    """One tracked handle's step work: its bound methods, held weakly (the hooks keep no handle alive)."""

    __slots__ = ("order", "methods", "__weakref__")

    def __init__(self, order: int, *methods: Callable) -> None:
        self.order = order  # attach order: every rank walks the guards in it (their collectives match)
        self.methods = tuple(weakref.WeakMethod(method) for method in methods)  # holds_any, before_step, after_step

    def bound(self) -> tuple[Callable, ...] | None:
        """(holds_any, before_step, after_step) while the handle lives, else None."""
        methods = []
        for ref in self.methods:
            method = ref()
            if method is None:
                return None
            methods.append(method)
        return tuple(methods)


_LIVE: weakref.WeakKeyDictionary[object, _Guard] = weakref.WeakKeyDictionary()  # attached handle -> its guard
_HOOKS: list = []  # the global step pre/post hook handles, while a handle is attached
_PENDING: weakref.WeakKeyDictionary[torch.optim.Optimizer, _PendingStep] = weakref.WeakKeyDictionary()
# optimizer -> (key, weak references to the guards of the handles whose model it trains): the verdict of ``related``
_RELATED: weakref.WeakKeyDictionary[torch.optim.Optimizer, tuple[tuple, list]] = weakref.WeakKeyDictionary()
_generation = 0  # bumped at every attach and detach: cached verdicts are then taken again


def _guards() -> list[_Guard]:
    """The guards of the attached handles in attach order (a weak table's order is not the same in every
    process, and under FSDP2 the handles' step work includes collectives, which every rank must make in one order)."""
    return sorted((guard for guard in list(_LIVE.values()) if guard.bound() is not None), key=lambda guard: guard.order)


def tracked() -> list:
    """The handles tracked now (every attached handle), in attach order."""
    live = [(guard.order, owner) for owner, guard in list(_LIVE.items()) if guard.bound() is not None]
    return [owner for _, owner in sorted(live, key=lambda pair: pair[0])]


def related(optimizer: torch.optim.Optimizer) -> list[tuple[Callable, ...]]:
    """(holds_any, before_step, after_step) of the attached handles that train (a model holding) a parameter
    of ``optimizer``, in attach order.

    Cached per optimizer, with a key of the attach/detach generation and its param groups' sizes: for an
    optimizer over other models the step hooks do only this lookup.
    """
    groups = optimizer.param_groups
    key = (_generation, *(len(group["params"]) for group in groups))
    cached = _RELATED.get(optimizer)
    if cached is not None and cached[0] == key:
        return [
            methods
            for methods in (guard.bound() for guard in (ref() for ref in cached[1]) if guard is not None)
            if methods is not None
        ]
    ids = {id(p) for group in groups for p in group["params"]}
    found = [guard for guard in _guards() if (bound := guard.bound()) is not None and bound[0](ids)]
    _RELATED[optimizer] = (key, [weakref.ref(guard) for guard in found])
    return [methods for methods in (guard.bound() for guard in found) if methods is not None]


def track(
    owner: object,
    *,
    order: int,
    holds_any: Callable[[set[int]], bool],
    before_step: Callable[[torch.optim.Optimizer, dict[int, dict]], dict[int, Target]],
    after_step: Callable[[torch.optim.Optimizer, set[int]], None],
) -> weakref.finalize:
    """Start guarding optimizer steps for ``owner`` (an attached handle); the returned finalizer untracks it
    when it is collected.

    Args:
        order: the attach order; handles' step work runs in it.
        holds_any: bound method ``(ids of an optimizer's parameters) -> bool``: whether the optimizer's steps
            concern the handle (its step work runs only then).
        before_step: bound method ``(optimizer, {id(param): its group}) -> {id(param): Target}``, once the
            gradients exist: the targets whose masked gradient the step uses (their decay is applied here).
        after_step: bound method ``(optimizer, {id(param)})``, after the step.
    """
    global _generation
    _generation += 1
    _LIVE[owner] = _Guard(order, holds_any, before_step, after_step)
    if not _HOOKS:
        _HOOKS[:] = [register_optimizer_step_pre_hook(_before_step), register_optimizer_step_post_hook(_after_step)]
    return weakref.finalize(owner, _prune)


def untrack(owner: object) -> None:
    global _generation
    _generation += 1
    _LIVE.pop(owner, None)
    _prune()


def _prune() -> None:
    """Remove the global hooks once no handle is attached."""
    if _guards() or not _HOOKS:
        return
    for hook in _HOOKS:
        hook.remove()
    _HOOKS.clear()
    for optimizer in list(_PENDING.keys()):
        _restore(optimizer)


def _before_step(optimizer, args, kwargs):
    if optimizer in _PENDING:
        _restore(optimizer)  # a previous step that raised never reached the post hook
    guards = related(optimizer)
    if not guards:  # an optimizer over other models: nothing else runs
        return None
    closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args = (optimizer, closure?)
    if closure is None:
        _prepare(optimizer, kwargs, guards)
        return None

    def guarded():  # the gradients exist only once the closure has run, inside step()
        loss = closure()
        _restore(optimizer)  # LBFGS calls the closure several times
        _prepare(optimizer, kwargs, guards)
        return loss

    if "closure" in kwargs:
        return args, {**kwargs, "closure": guarded}
    return (args[0], guarded, *args[2:]), kwargs


@torch.no_grad()
def _prepare(optimizer, kwargs, guards: list[tuple[Callable, ...]]) -> None:
    members = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    stepped: dict[int, Target] = {}  # id(param) -> target with a fixed mask and a masked gradient
    for _, before_step, _ in guards:
        stepped.update(before_step(optimizer, members))
    if not stepped:
        return
    # GradScaler and fused kernels: step() arguments in old torch, attributes of the optimizer now.
    found_inf = kwargs.get("found_inf", getattr(optimizer, "found_inf", None))
    if found_inf is not None and _scalar(found_inf) != 0.0:
        return  # the fused kernel skips this step entirely, so no decay either
    grad_scale = kwargs.get("grad_scale", getattr(optimizer, "grad_scale", None))
    scale = 1.0 if grad_scale is None else _scalar(grad_scale)  # fused kernels unscale the gradients themselves
    problem = unknown_decay(optimizer, {key: target.name for key, target in stepped.items()})
    if problem:
        raise ShiraError(problem)
    pending = _PendingStep()
    for group in list(optimizer.param_groups):
        decay = _scalar(group.get("weight_decay", 0.0) or 0.0)
        targets = [p for p in group["params"] if id(p) in stepped]
        if not targets or decay == 0.0:
            continue
        rule, lr = decay_rule(optimizer, group), _scalar(group["lr"])
        sign = -1.0 if group.get("maximize", False) else 1.0
        for param in targets:
            target = stepped[id(param)]
            flat, index = target.storage(param)  # of a DTensor (FSDP2): this rank's rows
            if rule == "decoupled":
                kept = flat.index_select(0, index)
                flat.index_copy_(0, index, kept.mul_(1 - lr * decay))
            else:
                grad, grad_index = target.storage(param.grad)
                kept = grad.index_select(0, grad_index)
                decayed = kept.add(flat.index_select(0, index).to(grad.dtype), alpha=sign * decay * scale)
                grad.index_copy_(0, grad_index, decayed)
                pending.grads.append((grad, grad_index, kept))
        # The optimizer itself must not decay the targets: give them a group of their own.
        target_ids = {id(p) for p in targets}
        temp = dict(group)
        temp["params"] = targets
        temp["weight_decay"] = 0.0
        pending.groups.append((group, group["params"], temp))
        group["params"] = [p for p in group["params"] if id(p) not in target_ids]
        optimizer.param_groups.append(temp)
    if pending.groups or pending.grads:
        _PENDING[optimizer] = pending


def _after_step(optimizer, args, kwargs) -> None:
    if optimizer in _PENDING:
        _restore(optimizer)
    guards = related(optimizer)
    if guards:
        members = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for _, _, after_step in guards:
            after_step(optimizer, members)


@torch.no_grad()
def _restore(optimizer) -> None:
    pending = _PENDING.pop(optimizer, None)
    if pending is None:
        return
    for group, params, temp in pending.groups:
        group["params"] = params
        optimizer.param_groups[:] = [g for g in optimizer.param_groups if g is not temp]
    for grad, index, kept in pending.grads:
        grad.index_copy_(0, index, kept)
