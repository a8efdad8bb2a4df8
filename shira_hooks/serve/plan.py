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
from itertools import repeat
from typing import cast

import torch
from torch import nn

from .._base import storage_flat
from . import packing
from .state import Prepared, WeightState

# Called through map() over all targets: one C-level pass each, no Python frame per weight.
_expired = (
    torch.UntypedStorage._expired
)  # (weak storage reference) -> whether the storage was freed (what torch.Storage._expired calls)
_data_ptr = torch.Tensor.data_ptr
_is_contiguous = torch.Tensor.is_contiguous
_version = operator.attrgetter("_version")
_call = weakref.ref.__call__


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
    """One weight's write (its own storage, or a layout that cannot share a write).

    The positions and the values are kept in the shape of the write: (k/B,) run numbers with (k/B, B)
    values on the weight's (numel / B, B) view for a block adapter on a row-major weight, else (k,)
    storage positions with (k,) values. The view of the weight itself is made at each write (holding
    it between switches would keep an old storage alive after a move).
    """

    __slots__ = ("position", "weight", "prep", "unit", "index", "contiguous", "base", "written", "written_of")

    def __init__(self, position: int, weight: WeightState, prep: Prepared, param: nn.Parameter):
        self.position, self.weight, self.prep = position, weight, prep
        self.unit = prep.source.block if prep.runs is not None else 1
        index = prep.runs if self.unit > 1 else prep.index
        assert index is not None and prep.base is not None  # placed and read by apply's checks before a plan is built
        self.index = index
        self.contiguous = param.is_contiguous()  # else storage positions through storage_flat
        self.base = self._shaped(prep.base)
        self.written: torch.Tensor | None = None  # prep.written shaped for the write, made at the first apply
        self.written_of: torch.Tensor | None = None  # the prep.written it was made from

    def _shaped(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, self.unit) if self.unit > 1 else values

    def _target(self, param: nn.Parameter) -> torch.Tensor:
        # The positions are storage positions (logical ones equal them for a contiguous weight). Decided at each
        # write: a weight re-strided in place since (``w.data = w.data.t()``) keeps its storage, not its view.
        if not (self.contiguous and param.is_contiguous()):
            flat = storage_flat(param.detach())
            return flat.view(-1, self.unit) if self.unit > 1 else flat
        return param.view(-1, self.unit) if self.unit > 1 else param.view(-1)  # (under no_grad)

    def apply(self, params: list[nn.Parameter], alpha: float) -> None:
        weight, prep, param = self.weight, self.prep, params[self.position]
        if prep.alpha != alpha:
            assert prep.base is not None and prep.delta is not None  # placed and read by the checks, kept while planned
            prep.written, prep.alpha = written_values(prep.base, prep.delta, alpha), alpha
        written = prep.written
        assert written is not None  # made above, or by an earlier write at this alpha
        shaped = self.written
        if shaped is None or self.written_of is not written:
            shaped = self.written = self._shaped(written)
            self.written_of = written
        self._target(param).index_copy_(0, self.index, shaped)
        weight.version = param._version

    def restore(self, params: list[nn.Parameter]) -> None:
        weight, param = self.weight, params[self.position]
        clean = param._version == weight.version  # else someone else wrote too: the next apply must see it
        self._target(param).index_copy_(0, self.index, self.base)
        if clean:
            weight.version = param._version

    def tensors(self) -> list[torch.Tensor]:
        return []  # views of the Prepared's own (counted with the cache)


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
        index: list[torch.Tensor] = []
        base: list[torch.Tensor] = []
        delta: list[torch.Tensor] = []
        for _, _, prep, offset in members:  # sorted by arena offset: ascending positions
            # placed and read by apply's checks before a plan is built; unit > 1 only where runs exist (_unit)
            assert prep.index is not None and prep.base is not None and prep.delta is not None
            if unit > 1:
                assert prep.runs is not None
                index.append(prep.runs + offset // unit)
            else:
                index.append(prep.index + offset)
            base.append(prep.base)
            delta.append(prep.delta)
        self.index = torch.cat(index)
        self.base, self.delta = torch.cat(base), torch.cat(delta)
        start = 0
        for (_, _, prep, _), values in zip(members, base):  # the Prepared tensors become views of the concatenated ones
            end = start + values.numel()
            prep.base, prep.delta = self.base[start:end], self.delta[start:end]
            start = end
        self.written: torch.Tensor | None = None  # base + alpha * delta, cast, for `alpha`
        self.alpha: float | None = None

    def _target(self) -> torch.Tensor:
        arena = self.arena()
        assert arena is not None  # alive: the plan checked that its weights still live in it
        return arena[: self.rows * self.unit].view(self.rows, self.unit) if self.unit > 1 else arena

    def _shaped(self, values: torch.Tensor) -> torch.Tensor:
        return values.view(-1, self.unit) if self.unit > 1 else values

    def apply(self, params: list[nn.Parameter], alpha: float) -> None:
        written = self.written
        if written is None or self.alpha != alpha:
            written = self.written = written_values(self.base, self.delta, alpha)
            self.alpha = alpha
        self._target().index_copy_(0, self.index, self._shaped(written))

    def restore(self, params: list[nn.Parameter]) -> None:
        self._target().index_copy_(0, self.index, self._shaped(self.base))

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.index, self.base, self.delta, self.written) if t is not None]


def _unit(prep: Prepared, offset: int) -> int:
    """B for a block adapter on a row-major weight at an arena offset divisible by B, else 1."""
    block = prep.source.block
    return block if prep.runs is not None and offset % block == 0 else 1


def _groups(
    targets: list[tuple[WeightState, Prepared]], params: list[nn.Parameter], holders: list[tuple[nn.Module, str]]
) -> list:
    """Weights packed in one arena share a write per unit; the others write alone."""
    by_arena: dict[
        int, tuple[torch.Tensor, list[tuple[int, WeightState, Prepared, int]]]
    ] = {}  # (position, weight, prep, offset)
    groups: list = []
    for position, ((weight, prep), param, (module, attr)) in enumerate(zip(targets, params, holders)):
        owner = packing.owner_of(module)
        found = owner.locate(module, attr, param) if owner is not None else None
        if found is None:
            groups.append(_Single(position, weight, prep, param))
            continue
        arena, offset = found
        by_arena.setdefault(id(arena), (arena, []))[1].append((position, weight, prep, offset))
    for arena, members in by_arena.values():
        members.sort(key=lambda member: member[3])
        by_unit: dict[int, list[tuple[int, WeightState, Prepared, int]]] = {}
        for member in members:
            by_unit.setdefault(_unit(member[2], member[3]), []).append(member)
        for unit, same in by_unit.items():
            position, weight, prep, _ = same[0]
            groups.append(
                _Shared(arena, same, unit) if len(same) > 1 else _Single(position, weight, prep, params[position])
            )
    return groups


class SwitchPlan:
    """The prepared writes of one adapter on one model (module docstring)."""

    def __init__(
        self,
        model: nn.Module,
        adapter,
        targets: list[tuple[str, WeightState, Prepared]],
        skipped: list[str],
        verified: bool,
        epoch: int,
    ):
        self.targets = [(weight, prep) for _, weight, prep in targets]
        self.skipped = list(skipped)
        self.verified = verified  # built under check_base=True: fingerprints were checked at these tokens
        parents: dict[int, nn.Module] = {}  # every module on the way from the model to a target (while building)
        holding: list[tuple[nn.Module, str]] = []  # (module, attribute) holding each target (while building)
        params: list[nn.Parameter] = []
        for name, weight, _ in targets:
            *path, leaf = name.split(".")
            module = model
            for key in path:
                parents.setdefault(id(module), module)
                child = module._modules[key]
                assert child is not None  # apply's checks just found the target's parameter down this path
                module = child
            holding.append((module, leaf))
            param = weight.param()
            assert param is not None  # alive: apply's checks just found it in the model
            params.append(param)
        self.holders = [(weakref.ref(module), leaf) for module, leaf in holding]  # held weakly from now on
        # Per module on the way: the ids of all its children, in order. A child replaced by another object
        # changes them; an id reused by a new object at a freed one's address is caught by the weak
        # reference to the freed module (a parent here, or a holder).
        # The children dicts themselves are held (not the modules): a dict holds what its module holds
        # now, so a replaced child or parameter is not kept alive; a module taken out of the model keeps
        # its dicts alive only until the next apply (live() fails on its parent's dict, and the model's
        # plans are dropped).
        self.edges = [(d := parent._modules, tuple(map(id, d.values()))) for parent in parents.values()]
        self.getters = [(module._parameters.get, leaf) for module, leaf in holding]
        self.weights = [weight for weight, _ in self.targets]
        self.refs = [weight.param for weight in self.weights]  # weak references to the parameters
        self.ptrs = [weight.ptr for weight in self.weights]
        # The adapter's SparseDelta objects, all of them, held so that their ids cannot be reused while
        # the plan lives (the plan goes with the adapter's cache entry, which goes with the adapter).
        self.deltas = tuple(adapter.deltas.values())
        self.sources = tuple(map(id, self.deltas))
        # Row-major weights: is_contiguous() (a flag) stands for the full stride comparison.
        self.strided = [(i, param.stride()) for i, param in enumerate(params) if not param.is_contiguous()]
        self.groups = _groups(self.targets, params, holding)
        # Packed writes leave Tensor._version alone, so a plan without per-weight writes compares the
        # versions with those it was built at; per-weight writes (also another plan's) bump and record them.
        self.singles = any(isinstance(group, _Single) for group in self.groups)
        self.versions = [weight.version for weight in self.weights]
        # A storage freed and replaced by another at the same address (same data_ptr) is noticed through
        # a weak reference to each single weight's storage and to each arena (whose members' addresses
        # are checked: while the arena lives, nothing else can be there).
        self.storages = [group.weight.storage_ref for group in self.groups if isinstance(group, _Single)]
        self.storage_ids = [ref.cdata for ref in self.storages]  # for torch.Storage._expired, without a call per weight
        self.arenas = [group.arena for group in self.groups if isinstance(group, _Shared)]
        self.epoch = epoch  # ModelState.epoch: any new WeightState token of the model makes the plan stale
        self.restructured = False

    def _unchanged(self, params: list) -> bool:
        """Same storage, layout and Tensor._version as when last written or checked (nobody else wrote)."""
        versions = [weight.version for weight in self.weights] if self.singles else self.versions
        if list(map(_data_ptr, params)) != self.ptrs or list(map(_version, params)) != versions:
            return False
        if self.strided:
            others = {i for i, _ in self.strided}
            layouts = all(params[i].stride() == strides for i, strides in self.strided)
            layouts = layouts and all(param.is_contiguous() for i, param in enumerate(params) if i not in others)
        else:
            layouts = all(map(_is_contiguous, params))
        return layouts and not any(map(_expired, self.storage_ids)) and not any(ref() is None for ref in self.arenas)

    def live(self, model: nn.Module, adapter, epoch: int) -> list[nn.Parameter] | None:
        """The target parameters, if nothing the plan was built on has changed; else None.

        One pass per kind of check over all targets (comprehensions, about a microsecond per weight in all):
        the module tree down to each target, the parameter each holds, the adapter's deltas, then
        ``_unchanged``. ``epoch`` is the model's ``ModelState.epoch``.
        """
        if epoch != self.epoch:
            return None
        if not all(tuple(map(id, children.values())) == ids for children, ids in self.edges):
            self.restructured = True  # the module tree changed on the way to a target: every plan of the model is stale
            return None
        found = [get(leaf) for get, leaf in self.getters]
        if tuple(map(id, adapter.deltas.values())) != self.sources:  # a delta replaced, added or removed
            return None
        if not all(map(operator.is_, found, map(_call, self.refs))):  # the same Parameter objects
            return None
        # None is None: a parameter set to None whose old object was freed (the checks then say it is missing)
        if any(map(operator.is_, found, repeat(None))):
            return None
        params = cast("list[nn.Parameter]", found)  # none is None (checked above)
        return params if self._unchanged(params) else None

    def current(self) -> list[nn.Parameter] | None:
        """For ``remove``: the parameters ``apply`` wrote to, if each still has the storage it wrote to; else None.

        Writing the base back at the same storage positions undoes the write whatever else happened
        (another writer, a new view of the same storage); a write by someone else stays visible to the
        next ``apply`` through ``Tensor._version``. A weight given new storage needs ``remove``'s full path,
        which follows it.
        """
        found = list(map(_call, self.refs))
        if any(param is None for param in found):
            return None
        params = cast("list[nn.Parameter]", found)  # none is None (checked above)
        if list(map(_data_ptr, params)) != self.ptrs:
            return None
        if any(map(_expired, self.storage_ids)) or any(ref() is None for ref in self.arenas):
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
