"""The switch plan of one adapter on one model: the writes of a whole-model switch, prepared once.

``apply`` on a model with nothing applied, and the ``remove`` that follows it, are the serving switch.
They run from a ``SwitchPlan`` built the first time (after ``apply``'s full checks): per write, the
target, the positions, the base values (what ``remove`` writes back) and the values for the last
``alpha``. Weights packed in one arena (``shira_hooks.pack``) share one write: one ``index_copy_`` per
arena and direction over positions in the arena. Other weights get one write each.

A plan is used only while nothing it was built on has changed: the same modules at the same places of
the model, each holding the same ``Parameter`` with the same storage, strides and ``Tensor._version``
(nobody else wrote to it), no new switching token in the model (``ModelState.epoch``) and the adapter's
same ``SparseDelta`` objects. ``live`` checks that in a few passes (about a microsecond per weight in
all); anything else goes through ``apply``'s full checks, which rebuild the plan.

Writes into an arena go through the arena tensor, so they do not bump the weights' ``Tensor._version``
(which stays what ``live`` expects; autograd does not see them either: do not switch between a forward
pass and its backward); per-weight writes do, and the new version is recorded.
"""

from __future__ import annotations

import operator
import weakref

import torch
from torch import nn

from . import packing
from ._switch_state import Prepared, WeightState


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 weights: never less precise than the weight."""
    return torch.promote_types(dtype, torch.float32)


def written_values(originals: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """cast(originals + alpha * S); exactly the originals for alpha == 0 (-0.0 stays -0.0)."""
    if alpha == 0:
        return originals.clone()
    compute = compute_dtype(originals.dtype)
    return (originals.to(compute) + alpha * delta.to(compute)).to(originals.dtype)


class _Single:
    """One weight's write (its own storage, or a layout that cannot share a write)."""

    __slots__ = ("position", "weight", "prep")

    def __init__(self, position: int, weight: WeightState, prep: Prepared):
        self.position, self.weight, self.prep = position, weight, prep

    def apply(self, params: list[nn.Parameter], alpha: float) -> None:
        weight, prep, param = self.weight, self.prep, params[self.position]
        if prep.alpha != alpha:
            prep.written, prep.alpha = written_values(prep.base, prep.delta, alpha), alpha
        prep.write(weight.storage(param), prep.written)
        weight.version = param._version

    def restore(self, params: list[nn.Parameter]) -> None:
        weight, param = self.weight, params[self.position]
        clean = param._version == weight.version  # else someone else wrote too: the next apply must see it
        self.prep.write(weight.storage(param), self.prep.base)
        if clean:
            weight.version = param._version
        weight.flat = None  # holds no storage while nothing is applied

    def tensors(self) -> list[torch.Tensor]:
        return []  # the Prepared's own (counted with the cache)


class _Shared:
    """The writes into several weights packed in one arena (``shira_hooks.pack``): one ``index_copy_`` per direction.

    ``unit`` is B when every member's entries are aligned runs of B at an arena offset divisible by B
    (written as rows of the arena's ``(n // B, B)`` view), else 1 (single entries). The arena is held
    weakly: it lives as long as a weight lives in it.
    """

    __slots__ = ("arena", "unit", "index", "base", "delta", "written", "alpha", "rows")

    def __init__(self, arena: torch.Tensor, members: list[tuple[int, WeightState, Prepared, int]], unit: int):
        self.arena = weakref.ref(arena)
        self.unit = unit
        self.rows = arena.numel() // unit
        index, base, delta = [], [], []
        for _, _, prep, offset in members:  # sorted by arena offset: ascending positions
            index.append(prep.runs + offset // unit if unit > 1 else prep.index + offset)
            base.append(prep.base)
            delta.append(prep.delta)
        self.index = torch.cat(index)
        self.base, self.delta = torch.cat(base), torch.cat(delta)
        start = 0
        for _, _, prep, _ in members:  # the Prepared tensors become views of the concatenated ones
            end = start + prep.base.numel()
            prep.base, prep.delta = self.base[start:end], self.delta[start:end]
            start = end
        self.written, self.alpha = None, None

    def _target(self) -> torch.Tensor:
        arena = self.arena()  # alive: the plan checked that its weights still live in it
        return arena[: self.rows * self.unit].view(self.rows, self.unit) if self.unit > 1 else arena

    def _shaped(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, self.unit) if self.unit > 1 else values

    def apply(self, params: list[nn.Parameter], alpha: float) -> None:
        if self.alpha != alpha:
            self.written, self.alpha = written_values(self.base, self.delta, alpha), alpha
        self._target().index_copy_(0, self.index, self._shaped(self.written))

    def restore(self, params: list[nn.Parameter]) -> None:
        self._target().index_copy_(0, self.index, self._shaped(self.base))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.index, self.base, self.delta, self.written) if t is not None]


def _unit(prep: Prepared, offset: int) -> int:
    """B for a block adapter on a row-major weight at an arena offset divisible by B, else 1."""
    block = prep.source.block
    return block if prep.runs is not None and offset % block == 0 else 1


def _groups(targets: list[tuple[WeightState, Prepared]], params: list[nn.Parameter], holders: list[tuple[nn.Module, str]]) -> list:
    """Weights packed in one arena share a write per unit; the others write alone."""
    by_arena: dict[int, tuple[torch.Tensor, list]] = {}
    groups: list = []
    for position, ((weight, prep), param, (module, attr)) in enumerate(zip(targets, params, holders)):
        owner = packing.owner_of(module)
        found = owner.locate(module, attr, param) if owner is not None else None
        if found is None:
            groups.append(_Single(position, weight, prep))
            continue
        arena, offset = found
        by_arena.setdefault(id(arena), (arena, []))[1].append((position, weight, prep, offset))
    for arena, members in by_arena.values():
        members.sort(key=lambda member: member[3])
        by_unit: dict[int, list] = {}
        for member in members:
            by_unit.setdefault(_unit(member[2], member[3]), []).append(member)
        for unit, same in by_unit.items():
            groups.append(_Shared(arena, same, unit) if len(same) > 1 else _Single(*same[0][:3]))
    return groups


class SwitchPlan:
    """The prepared writes of one adapter on one model (module docstring)."""

    def __init__(self, model: nn.Module, adapter, targets: list[tuple[str, WeightState, Prepared]], skipped: list[str], verified: bool, epoch: int):
        self.targets = [(weight, prep) for _, weight, prep in targets]
        self.skipped = list(skipped)
        self.verified = verified  # built under check_base=True: fingerprints were checked at these tokens
        parents: dict[int, weakref.ref] = {}  # every module on the way from the model to a target
        self.holders: list[tuple[weakref.ref, str]] = []  # (module, attribute) holding each target
        params = []
        for name, weight, prep in targets:
            *path, leaf = name.split(".")
            module = model
            for key in path:
                parents.setdefault(id(module), weakref.ref(module))
                module = module._modules[key]
            self.holders.append((weakref.ref(module), leaf))
            params.append(weight.param())
        # Per module on the way: the ids of all its children, in order. A child replaced by another object
        # changes them; an id reused by a new object at a freed one's address is caught by the weak
        # reference to the freed module (a parent here, or a holder).
        self.edges = [(ref, tuple(map(id, ref()._modules.values()))) for ref in parents.values()]
        self.weights = [weight for weight, _ in self.targets]
        self.refs = [weight.param for weight in self.weights]  # weak references to the parameters
        self.ptrs = [weight.ptr for weight in self.weights]
        # The adapter's SparseDelta objects, all of them, held so that their ids cannot be reused while
        # the plan lives (the plan goes with the adapter's cache entry, which goes with the adapter).
        self.deltas = tuple(adapter.deltas.values())
        self.sources = tuple(map(id, self.deltas))
        # Row-major weights: is_contiguous() (a flag) stands for the full stride comparison.
        self.contiguous = [i for i, param in enumerate(params) if param.is_contiguous()]
        self.strided = [(i, param.stride()) for i, param in enumerate(params) if not param.is_contiguous()]
        self.groups = _groups(self.targets, params, [(ref(), leaf) for ref, leaf in self.holders])
        # A storage freed and replaced by another at the same address (same data_ptr) is noticed through
        # a weak reference to each single weight's storage and to each arena (whose members' addresses
        # are checked: while the arena lives, nothing else can be there).
        self.storages = [group.weight.storage_ref for group in self.groups if isinstance(group, _Single)]
        self.arenas = [group.arena for group in self.groups if isinstance(group, _Shared)]
        self.epoch = epoch  # ModelState.epoch: any new WeightState token of the model makes the plan stale

    def _unchanged(self, params: list) -> bool:
        """Same storage, layout and Tensor._version as when last written or checked (nobody else wrote)."""
        return (
            [param.data_ptr() for param in params] == self.ptrs
            and [param._version for param in params] == [weight.version for weight in self.weights]
            and all(params[i].is_contiguous() for i in self.contiguous)
            and all(params[i].stride() == strides for i, strides in self.strided)
            and not any(ref.expired() for ref in self.storages)
            and not any(ref() is None for ref in self.arenas)
        )

    def live(self, model: nn.Module, adapter, epoch: int) -> list[nn.Parameter] | None:
        """The target parameters, if nothing the plan was built on has changed; else None.

        One pass per kind of check over all targets (comprehensions, about a microsecond per weight in all):
        the module tree down to each target, the parameter each holds, the adapter's deltas, then
        ``_unchanged``. ``epoch`` is the model's ``ModelState.epoch``.
        """
        if epoch != self.epoch:
            return None
        try:
            if not all(tuple(map(id, parent()._modules.values())) == children for parent, children in self.edges):
                return None  # the module tree changed on the way to a target
            params = [module()._parameters.get(leaf) for module, leaf in self.holders]
        except AttributeError:  # a module of the plan was freed: it is not in the model any more
            return None
        if tuple(map(id, adapter.deltas.values())) != self.sources:  # a delta replaced, added or removed
            return None
        same = all(map(operator.is_, params, [ref() for ref in self.refs]))  # the same Parameter objects
        return params if same and self._unchanged(params) else None

    def current(self) -> list[nn.Parameter] | None:
        """For ``remove``: the parameters ``apply`` wrote to, if each still has the storage it wrote to; else None.

        Writing the base back at the same storage positions undoes the write whatever else happened
        (another writer, a new view of the same storage); a write by someone else stays visible to the
        next ``apply`` through ``Tensor._version``. A weight given new storage needs ``remove``'s full path,
        which follows it.
        """
        params = [ref() for ref in self.refs]
        if any(param is None for param in params) or [param.data_ptr() for param in params] != self.ptrs:
            return None
        if any(ref.expired() for ref in self.storages) or any(ref() is None for ref in self.arenas):
            return None
        return params

    @torch.no_grad()
    def apply(self, params: list[nn.Parameter], alpha: float) -> None:
        for group in self.groups:
            group.apply(params, alpha)

    @torch.no_grad()
    def restore(self, params: list[nn.Parameter]) -> None:
        for group in self.groups:
            group.restore(params)

    def tensors(self) -> list[torch.Tensor]:
        return [t for group in self.groups for t in group.tensors()]
