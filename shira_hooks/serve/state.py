"""The switching state of each model: its weights, the applied adapters, the per-adapter caches, a lock.

``switch.apply`` / ``remove`` read and change it under the model's lock. It lives in a table keyed
weakly by the model (``STATES``), whose values refer to neither the model nor its parameters except
weakly: a model dropped with adapters still applied is freed, and so is an adapter dropped after
``remove()``. Nothing is stored on the model or on the adapters.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections import OrderedDict
from typing import Literal, Protocol, overload

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from .._base import WeakIdTable, check_dense, layout_key, storage_flat, storage_index
from ..errors import ShiraError
from ..format import SparseAdapter, SparseDelta

KEEP_RECENT = 4  # removed adapters per model whose precomputation is kept (least recently used dropped first)

_tokens = itertools.count(1)  # weight tokens: a new one whenever a weight changes behind our back


class Prepared:
    """One adapter's precomputation for one weight of one model."""

    def __init__(self, source: SparseDelta):
        self.source = source  # the adapter's delta (its tensors are the adapter's, not copies)
        self.verified: int | None = None  # weight token at which the base matched the fingerprint (kept when evicted)
        self.evict()

    def evict(self) -> None:
        """Drop the tensors, keep ``verified``."""
        self.layout: tuple | None = None  # layout_key of the weight the tensors below were made for
        self.logical: torch.Tensor | None = None  # (k,) int64 row-major indices, sorted
        self.index: torch.Tensor | None = None  # (k,) int64 positions in storage_flat(weight); `logical` if row-major
        # block adapters on a row-major weight: (k/B,) int64 run numbers in storage_flat(weight).view(-1, B)
        self.runs: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None  # (k,) float32 S on the weight's device
        self.forget_base()

    def forget_base(self) -> None:
        self.base_token: int | None = None  # weight token at which `base` was read
        self.base: torch.Tensor | None = None  # (k,) base values, weight dtype
        self.alpha: float | None = None
        self.written: torch.Tensor | None = None  # (k,) cast(base + alpha * S) for `alpha`

    def follow(self, layout: tuple, param: torch.Tensor) -> None:
        """The weight got new storage: its base is unknown; the tensors move if the layout changed."""
        if self.layout != layout:
            self.place(layout, param)
        self.forget_base()

    def place(self, layout: tuple, param: torch.Tensor) -> None:
        """Make the index and delta tensors for the weight's current device and strides."""
        self.evict()
        self.logical = self.source.indices.to(param.device, torch.int64)
        self.index = storage_index(self.logical, param)
        block = self.source.block
        if block > 1 and param.is_contiguous():  # runs of B are B consecutive storage elements
            self.runs = torch.div(self.logical[::block], block, rounding_mode="floor")
        self.delta = self.source.values.to(param.device, torch.float32)
        self.layout = layout

    def read(self, flat: torch.Tensor) -> torch.Tensor:
        """(k,) the values of ``flat`` (= storage_flat(weight)) at the entries, in index order."""
        if self.runs is not None:
            return flat.view(-1, self.source.block).index_select(0, self.runs).view(-1)
        assert self.index is not None  # placed: apply's checks place every Prepared before a read
        return flat.index_select(0, self.index)

    def write(self, flat: torch.Tensor, values: torch.Tensor) -> None:
        """``flat[entries] = values`` in place: k/B whole runs of a (numel / B, B) view, or k single entries.

        Both write the same values to the same elements (bit-identical results); whole runs are one
        row copy per cache line instead of one element copy per entry.
        """
        if self.runs is not None:
            block = self.source.block
            flat.view(-1, block).index_copy_(0, self.runs, values.reshape(-1, block))
        else:
            assert self.index is not None  # placed, as for read
            flat.index_copy_(0, self.index, values)

    def tensors(self) -> list[torch.Tensor]:
        """The tensors held for this weight that are not the adapter's own."""
        own = (self.source.indices, self.source.values)
        held = (self.logical, self.index, self.runs, self.delta, self.base, self.written)
        return [t for t in held if t is not None and not any(t is o for o in own)]


class Plan(Protocol):
    """What this module needs of a ``plan.SwitchPlan`` (``plan`` imports this module, not the reverse)."""

    def tensors(self) -> list[torch.Tensor]: ...


class AdapterCache:
    """One adapter's precomputation for one model: a ``Prepared`` per weight name."""

    def __init__(self) -> None:
        self.prepared: dict[str, Prepared] = {}
        self.active = 0  # applications of the adapter currently in the model
        self.plan: Plan | None = None  # the SwitchPlan of a whole-model switch (``plan``), built on first use

    def evict(self) -> None:
        self.plan = None
        for prep in self.prepared.values():
            prep.evict()


class Applied:
    """One adapter's write into one weight."""

    __slots__ = ("weight", "prepared", "originals")

    def __init__(self, weight: WeightState, prepared: Prepared, originals: torch.Tensor):
        self.weight = weight
        self.prepared = prepared
        self.originals = originals  # (k,) values before the write, weight dtype and device


class WeightState:
    """What the switching state knows about one weight (the parameter itself is held weakly)."""

    def __init__(self, name: str, param: nn.Parameter):
        self.name = name
        self.param = weakref.ref(param)
        self.stack: list[Applied] = []  # writes active on this weight, oldest first
        self.flat: torch.Tensor | None = None  # storage_flat(param), kept while `stack` is not empty
        self.reset(param)

    def reset(self, param: nn.Parameter) -> None:
        self.ptr, self.strides, self.shape, self.dtype = (
            param.data_ptr(),
            param.stride(),
            tuple(param.shape),
            param.dtype,
        )
        # The storage itself, weakly: a new storage that the allocator put at the old address (after
        # ``param.data = ...`` or a re-pack) has the same data_ptr, but this reference has expired.
        self.storage_ref = StorageWeakRef(param.untyped_storage())
        self.layout = layout_key(param)
        self.token, self.version, self.flat = next(_tokens), param._version, None

    def same_storage(self, param: nn.Parameter) -> bool:
        """Whether ``param`` still has the storage, position, strides and dtype seen at ``reset``."""
        return (
            param.data_ptr() == self.ptr
            and param.stride() == self.strides
            and param.dtype == self.dtype
            and not self.storage_ref.expired()
        )

    def storage(self, param: nn.Parameter) -> torch.Tensor:
        if self.flat is None:
            self.flat = storage_flat(param.detach())
        return self.flat


class ModelState:
    """A model's switching state: its weights, the applied adapters, the per-adapter caches, a lock."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.weights: WeakIdTable[nn.Parameter, WeightState] = WeakIdTable()
        self.stack: list = []  # active applications (``switch.AppliedAdapter``), oldest first
        self.caches: WeakIdTable[SparseAdapter, AdapterCache] = WeakIdTable()
        self.recent: OrderedDict[int, weakref.ref] = OrderedDict()  # removed adapters' caches, oldest first
        self.epoch = 0  # counts new weight tokens: a switch plan built at another epoch is stale

    def weight(self, name: str, param: nn.Parameter) -> WeightState:
        """The state of ``param``, synced with what others did to it (``sync``)."""
        weight = self.weights.get(param)
        if weight is None:
            check_dense(param, f"model weight '{name}'")
            weight = WeightState(name, param)
            self.weights.set(param, weight)
        else:
            self.sync(weight, param)
        return weight

    def sync(self, weight: WeightState, param: nn.Parameter) -> None:
        """A new token if anyone else wrote to the weight; new storage: the active writes follow it.

        Raises ShiraError (changing nothing) if the new storage has gaps, or a new shape while
        adapters are applied to it.
        """
        if weight.same_storage(param):
            if param._version != weight.version:
                weight.token, weight.version = next(_tokens), param._version
                self.epoch += 1
            return
        check_dense(param, f"model weight '{weight.name}'")
        if weight.stack and tuple(param.shape) != weight.shape:
            raise ShiraError(
                f"model weight '{weight.name}' changed shape from {list(weight.shape)} to {list(param.shape)} while "
                f"an adapter was applied to it; give it back its shape before applying or removing adapters"
            )
        weight.reset(param)
        self.epoch += 1
        for entry in weight.stack:  # `.to()` moves exactly and casts as the model's own conversion did
            entry.originals = entry.originals.to(param.device, param.dtype)
            entry.prepared.follow(weight.layout, param)
        for ref in self.recent.values():  # removed adapters: no tensors left on the old device or dtype
            cache = ref()
            if cache is None:
                continue
            prep = cache.prepared.get(weight.name)
            if prep is not None:
                cache.plan = None  # its tensors are on the old device, its tokens are gone
            if prep is not None and prep.layout != weight.layout:
                prep.evict()
            elif prep is not None:
                prep.forget_base()

    def cache(self, adapter: SparseAdapter) -> AdapterCache:
        cache = self.caches.get(adapter)
        if cache is None:
            cache = AdapterCache()
            self.caches.set(adapter, cache)
        self.recent.pop(id(cache), None)
        return cache

    def settle(self, cache: AdapterCache) -> None:
        """After a remove or a failed apply: an unused cache joins the recent ones; the oldest are evicted."""
        if cache.active:
            return
        self.recent[id(cache)] = weakref.ref(cache)
        if len(self.recent) <= KEEP_RECENT:
            return
        for key in [key for key, ref in self.recent.items() if ref() is None]:
            del self.recent[key]
        while len(self.recent) > KEEP_RECENT:
            evicted = self.recent.popitem(last=False)[1]()
            if evicted is not None:
                evicted.evict()

    def drop_plans(self) -> None:
        """Forget every switch plan of the model (they are rebuilt on next use)."""
        for _, cache in self.caches.items():
            cache.plan = None

    def clear(self) -> None:
        for adapter, cache in self.caches.items():
            if not cache.active:
                self.caches.pop(adapter)
        self.recent.clear()

    def held_bytes(self) -> int:
        """Bytes of the tensors kept for the model's adapters that are not the adapters' own (tests, debugging)."""
        with self.lock:
            tensors = [
                t for _, cache in self.caches.items() for prep in cache.prepared.values() for t in prep.tensors()
            ]
            tensors += [t for _, cache in self.caches.items() if cache.plan is not None for t in cache.plan.tensors()]
        storages = {
            (t.device, t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in tensors
        }  # views counted once
        return sum(storages.values())


STATES: WeakIdTable[nn.Module, ModelState] = WeakIdTable()  # the values never refer to the model
STATES_LOCK = threading.Lock()  # guards creating a model's state


@overload
def model_state(model: nn.Module, create: Literal[True] = True) -> ModelState: ...
@overload
def model_state(model: nn.Module, create: bool) -> ModelState | None: ...


def model_state(model: nn.Module, create: bool = True) -> ModelState | None:
    """The switching state of ``model``: made on first use, or None if it has none and not ``create``."""
    state = STATES.get(model)
    if state is None and create:
        with STATES_LOCK:
            state = STATES.get(model)
            if state is None:
                state = ModelState()
                STATES.set(model, state)
    return state
