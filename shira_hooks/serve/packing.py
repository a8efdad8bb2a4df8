"""``pack``: re-home chosen weights into a few contiguous arenas, so that a switch writes one call per arena.

Switching an adapter writes ~1% of every target weight. With each weight in its own storage that is one
``index_copy_`` per weight and direction (420 calls for the 210 targets of a 135M Llama); with the weights
packed as views of a few large buffers ("arenas") it is one call per arena, over precomputed positions in
the arena (``switch`` does that whenever several target weights are views of one storage).

What ``pack`` changes and what it keeps:

* Each chosen ``Parameter`` keeps its identity, ``requires_grad``, dtype, device, shape and strides
  (``channels_last`` stays ``channels_last``); only its storage changes: ``param.data`` becomes a view of
  an arena, with the same values bit for bit. Optimizers, hooks and compiled models holding the parameter
  keep working. Tied weights (one ``Parameter`` under several names) are packed once.
* Arenas are grouped by (device, dtype, pinned), each at most ``chunk_mb`` (a weight larger than that
  gets an arena of its own), and each weight starts a multiple of 4096 bytes into its arena (so on a
  64-byte cache line, and block adapters with runs of up to 4096 bytes are written as whole runs). A
  pinned weight gets a pinned arena, and pinned storage back at ``unpack``. Weights are copied one arena
  at a time: while packing (and unpacking) the process holds at most one arena more than the model.
* Weights in shared memory (``model.share_memory()``) are refused, at ``pack`` and at ``repack``: new
  private storage would cut them off from the processes that share them.
* Nothing holds an arena but the weights that are views of it: a weight given new storage
  (``model.to(...)``, ``load_state_dict(..., assign=True)``, ``param.data = ...``) leaves its arena,
  and an arena whose weights all left is freed. Such weights are packed again (on their new device and
  dtype) by ``repack()``, which the next ``apply`` / ``AdapterBank.activate`` on the model also calls:
  a packed model stays packed across moves; ``packed.packed`` says whether it is now.
* ``unpack()`` (also ``close()`` and leaving a ``with`` block) gives every weight storage of its own
  again, with the same values and strides, and forgets the packing.

The packing is state of the model: each packed module refers to its ``PackedWeights`` from a table
keyed weakly by the module, and the ``PackedWeights`` refers to the modules and weights only weakly.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from .._base import WeakIdTable, check_dense, storage_flat
from ..errors import ShiraError
from ..masks import TargetSpec, resolve_targets
from .state import model_state

__all__ = ["pack", "PackedWeights"]

ALIGN_BYTES = 4096  # every weight starts a multiple of this into its arena: aligned runs up to this size stay whole
# module -> PackedWeights that packed one of its parameters (values hold modules weakly)
_OWNERS: WeakIdTable[nn.Module, PackedWeights] = WeakIdTable()


@dataclass(eq=False)
class _Slot:
    """One packed weight: where it lives (module and attribute) and where it was put."""

    name: str
    module: weakref.ref[nn.Module]
    attr: str
    param: weakref.ref[nn.Parameter]
    arena: int = -1  # index into PackedWeights._arenas
    offset: int = 0  # element offset of the weight's first element in the arena

    def parameter(self) -> nn.Parameter:
        """The parameter, where something holds it: the model while it is packed, the caller while packing."""
        param = self.param()
        assert param is not None, f"packed weight '{self.name}' was freed"
        return param

    def holder(self) -> nn.Module:
        """The module, where the model holds it (while packing)."""
        module = self.module()
        assert module is not None, f"the module of packed weight '{self.name}' was freed"
        return module


@dataclass(eq=False)
class _Arena:
    tensor: weakref.ref[torch.Tensor]  # the (numel,) arena: alive while a weight lives in it (module docstring)
    device: torch.device
    dtype: torch.dtype
    ptr: int  # its data_ptr
    numel: int
    kept: torch.Tensor | None = None  # held strongly only where the weights are plain views of its storage


def _in_arena(param: torch.Tensor, arena: _Arena, offset: int) -> bool:
    """Whether ``param`` still lives where ``pack`` put it. A live arena's memory cannot be another
    storage's, so the arena being alive and the address being the slot's is enough."""
    return (
        param.device == arena.device
        and param.dtype == arena.dtype
        and param.data_ptr() == arena.ptr + offset * arena.dtype.itemsize
        and arena.tensor() is not None
    )


class PackedWeights:
    """The weights ``pack`` re-homed into arenas. ``unpack()`` gives them storage of their own back.

    Attributes:
        names: the packed weights' parameter names (relative to the model given to ``pack``).
        chunk_mb: the largest arena, in MiB (a weight larger than that has an arena of its own).
    """

    def __init__(self, model: nn.Module, slots: list[_Slot], chunk_mb: float):
        self._model = weakref.ref(model)
        self._slots = slots
        self._by_module = {(id(slot.module()), slot.attr): slot for slot in slots}  # (module id, attribute) -> slot
        self._arenas: list[_Arena] = []
        self.chunk_mb = chunk_mb
        self.closed = False

    @property
    def names(self) -> list[str]:
        return [slot.name for slot in self._slots]

    def __repr__(self) -> str:
        state = (
            "closed"
            if self.closed
            else ("packed" if self.packed else "moved: repack() or the next apply packs it again")
        )
        return f"PackedWeights({len(self._slots)} weights in {len(self._live_arenas())} arenas, {state})"

    def __enter__(self) -> PackedWeights:
        return self

    def __exit__(self, *exc) -> None:
        self.unpack()

    def close(self) -> None:
        """Same as ``unpack()``."""
        self.unpack()

    def _current(self, slot: _Slot) -> nn.Parameter | None:
        """The parameter the module holds now under the slot's attribute (it may be a new object)."""
        module = slot.module()
        return None if module is None else module._parameters.get(slot.attr)

    def _holds(self, slot: _Slot, param: torch.Tensor | None) -> bool:
        held = slot.param()
        return (
            held is not None
            and held is param
            and slot.arena >= 0
            and _in_arena(held, self._arenas[slot.arena], slot.offset)
        )

    @property
    def packed(self) -> bool:
        """Whether every packed weight is still in its arena (False once unpacked, or once the model is gone)."""
        alive = [slot for slot in self._slots if slot.module() is not None]
        return not self.closed and bool(alive) and all(self._holds(slot, self._current(slot)) for slot in alive)

    def _live_arenas(self) -> set[int]:
        return {slot.arena for slot in self._slots if self._holds(slot, self._current(slot))}

    def arenas(self) -> list[dict]:
        """One row per arena in use: device, dtype, MiB and the number of weights it holds."""
        rows: dict[int, dict] = {}
        for slot in self._slots:
            if self._holds(slot, self._current(slot)):
                arena = self._arenas[slot.arena]
                row = rows.setdefault(
                    slot.arena,
                    {
                        "device": str(arena.device),
                        "dtype": str(arena.dtype).removeprefix("torch."),
                        "mb": arena.numel * arena.dtype.itemsize / 2**20,
                        "weights": 0,
                    },
                )
                row["weights"] += 1
        return [rows[i] for i in sorted(rows)]

    # ------------------------------------------------------------------------------------ moves
    def repack(self) -> int:
        """Pack again the weights that left their arenas (a move, a dtype cast, new storage, a new
        ``Parameter`` in the module), with every other weight of the arenas they left, so that no arena
        is kept alive by a few weights. Returns the number of weights re-homed (0 when all are in place).

        Raises:
            ShiraError: the packing was closed, or a weight cannot be packed now (meta device, sharded,
                shared memory, a layout with gaps, storage shared with a tensor outside the packing); nothing
                is changed.
        """
        with _locked(self._model()):
            if self.closed:
                raise ShiraError(
                    "this PackedWeights was unpacked; call shira_hooks.pack(model) to pack the model again"
                )
            return self._repack()

    def _repack(self) -> int:
        stale = {
            slot.arena
            for slot in self._slots
            if slot.module() is not None and not self._holds(slot, self._current(slot))
        }
        if not stale:
            return 0
        pairs = [
            (slot, param) for slot in self._slots if slot.arena in stale and (param := self._current(slot)) is not None
        ]
        moving, params = [slot for slot, _ in pairs], [param for _, param in pairs]
        model = self._model()
        _validate([(s.name, p) for s, p in zip(moving, params)], model, others_packed=self._packed_ids(exclude=moving))
        for slot, param in zip(moving, params):
            slot.param = weakref.ref(param)
        self._place(moving)
        return len(moving)

    def _packed_ids(self, exclude: Iterable[_Slot] = ()) -> set[int]:
        skip = {id(s) for s in exclude}
        return {
            id(p)
            for s in self._slots
            if id(s) not in skip and (p := self._current(s)) is not None and self._holds(s, p)
        }

    def unpack(self) -> None:
        """Give every packed weight storage of its own (same values, strides and ``Parameter``), one arena
        at a time, and forget the packing. Safe to call twice."""
        with _locked(self._model()), torch.inference_mode(False), torch.no_grad():  # never inference tensors
            if self.closed:
                return
            for index in range(len(self._arenas)):
                for slot in self._slots:
                    param = self._current(slot)
                    if param is not None and slot.arena == index and self._holds(slot, param):
                        own = torch.empty_strided(
                            param.shape,
                            param.stride(),
                            dtype=param.dtype,
                            device=param.device,
                            pin_memory=_pinned(param),
                        )
                        storage_flat(own).copy_(storage_flat(param.detach()))
                        param.data = own
            for slot in self._slots:
                module = slot.module()
                if module is not None and _OWNERS.get(module) is self:
                    _OWNERS.pop(module)
            self.closed = True

    # ---------------------------------------------------------------------------------- packing
    @torch.inference_mode(False)  # an apply in a request handler may pack: the arenas must train and switch
    def _place(self, slots: list[_Slot]) -> None:
        """Copy the slots' weights into new arenas (per device and dtype, at most chunk_mb each) and make
        each weight a view of its arena. One arena at a time, so at most one arena is held beside the model."""
        limit = int(self.chunk_mb * 2**20)
        groups: dict[tuple, list[_Slot]] = {}
        for slot in slots:
            param = slot.parameter()
            groups.setdefault((param.device, param.dtype, _pinned(param)), []).append(slot)
        for (device, dtype, pinned), members in groups.items():
            align = max(1, ALIGN_BYTES // dtype.itemsize)
            chunk: list[tuple[_Slot, int]] = []
            size = 0
            for member in [*members, None]:  # None flushes the last chunk
                numel = member.parameter().numel() if member is not None else 0
                padded = -(-numel // align) * align
                if chunk and (member is None or (size + padded) * dtype.itemsize > limit):
                    self._fill(chunk, device, dtype, size, pinned)
                    chunk, size = [], 0
                if member is not None:
                    chunk.append((member, size))
                    size += padded

    @torch.no_grad()
    def _fill(
        self, chunk: list[tuple[_Slot, int]], device: torch.device, dtype: torch.dtype, numel: int, pinned: bool
    ) -> None:
        arena = torch.empty(numel, dtype=dtype, device=device, pin_memory=pinned)
        record = _Arena(weakref.ref(arena), device, dtype, arena.data_ptr(), numel)
        self._arenas.append(record)
        for slot, offset in chunk:
            param = slot.parameter()
            storage, aliased = _alias(arena, offset, param.numel())
            if not aliased:  # no DLPack here: views of the arena's storage, which do not keep the arena tensor
                record.kept = arena  # itself alive
            view = torch.empty(0, dtype=dtype, device=device).set_(
                storage, storage_offset(storage, arena, offset), param.shape, param.stride()
            )
            storage_flat(view).copy_(storage_flat(param.detach()))
            param.data = view  # same Parameter, requires_grad and version counter; its old storage is freed
            slot.arena, slot.offset = len(self._arenas) - 1, offset

    def locate(self, module: nn.Module, attr: str, param: torch.Tensor) -> tuple[torch.Tensor, int] | None:
        """(arena, element offset) of ``module.<attr>`` if it is ``param`` and still lives in its arena."""
        slot = self._by_module.get((id(module), attr))
        if slot is None or slot.module() is not module or not self._holds(slot, param):
            return None
        arena = self._arenas[slot.arena].tensor()
        assert arena is not None  # _holds saw it alive, and the weight in it keeps it so
        return arena, slot.offset


def _pinned(param: torch.Tensor) -> bool:
    """Whether ``param`` is in page-locked host memory (its arena, and its storage after unpack, are too)."""
    return param.device.type == "cpu" and param.is_pinned()


def _alias(arena: torch.Tensor, offset: int, numel: int) -> tuple[torch.UntypedStorage, bool]:
    """A storage of its own over ``arena[offset:offset + numel]`` (through DLPack), which keeps the arena
    alive, and True; the arena's storage itself where DLPack is not available (e.g. some accelerators), and
    False."""
    try:
        return torch.from_dlpack(arena[offset : offset + numel]).untyped_storage(), True
    except (RuntimeError, TypeError, BufferError):
        return arena.untyped_storage(), False


def storage_offset(storage: torch.UntypedStorage, arena: torch.Tensor, offset: int) -> int:
    """The element offset of arena element ``offset`` in ``storage`` (0 for a storage of its own)."""
    return offset if storage.data_ptr() == arena.untyped_storage().data_ptr() else 0


def owner_of(module: nn.Module) -> PackedWeights | None:
    """The open ``PackedWeights`` that packed a parameter of ``module``, if any."""
    owner = _OWNERS.get(module)
    return owner if owner is not None and not owner.closed else None


def any_packed() -> bool:
    """Whether any module of any model is packed now (a cheap test before looking for moved weights)."""
    return bool(_OWNERS.entries)


def _validate(
    named: list[tuple[str, nn.Parameter]], model: nn.Module | None, others_packed: Collection[int] = frozenset()
) -> None:
    """Refuse, before anything is copied, weights that cannot be packed soundly (see ``pack``'s Raises)."""
    ids = {id(p) for _, p in named}
    for name, param in named:
        if distributed.is_sharded(param):
            raise ShiraError(
                f"model weight '{name}' is sharded (a DTensor, e.g. after fully_shard); pack() re-homes whole local "
                f"weights and does not support sharded ones: pack the model for serving, without FSDP"
            )
        if param.is_meta:
            raise ShiraError(
                f"model weight '{name}' is on the meta device (no values yet); load or materialize the weights "
                f"(to_empty + load_state_dict) before pack()"
            )
        if param.device.type == "cpu" and param.is_shared():
            raise ShiraError(
                f"model weight '{name}' is in shared memory (share_memory(), or received from another process); "
                f"packing would give it new private storage, and the processes sharing it would stop seeing its "
                f"changes (adapters applied here included). Do not pack a model whose weights are shared: unpack() "
                f"it before share_memory()"
            )
        check_dense(param, f"model weight '{name}'")
    if model is None:
        return
    # Storage shared with another tensor of the model: packing would give the weight storage of its own
    # and silently untie them. Non-overlapping views of one storage among the packed weights are fine.
    by_storage: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for other_name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        if tensor.is_meta or distributed.is_sharded(tensor) or tensor.untyped_storage().nbytes() == 0:
            continue
        by_storage.setdefault((tensor.device, tensor.untyped_storage().data_ptr()), []).append((other_name, tensor))
    for name, param in named:
        for other_name, other in by_storage.get((param.device, param.untyped_storage().data_ptr()), []):
            if other is param:
                continue
            if (id(other) in ids or id(other) in others_packed) and not _overlap(param, other):
                continue
            raise ShiraError(
                f"model weight '{name}' shares its storage with '{other_name}', which "
                + ("overlaps it" if id(other) in ids else "is not packed with it")
                + f"; packing would give '{name}' storage of its own and untie them. Tie them as one Parameter "
                f"(e.g. `b.weight = a.weight`), or leave '{name}' out of target_modules"
            )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two dense views of one storage share an element (their memory extents intersect)."""
    start_a, start_b = a.storage_offset(), b.storage_offset()
    return start_a < start_b + b.numel() and start_b < start_a + a.numel()


def _slots_for(model: nn.Module, targets: Iterable[tuple[str, nn.Module, str, nn.Parameter]]) -> list[_Slot]:
    slots, seen = [], set()
    owners = packed_owners(model)
    for name, module, attr, param in targets:
        if id(param) in seen:  # tied: one Parameter under several names is packed once
            continue
        seen.add(id(param))
        owner = owners.get(id(param)) or owner_of(module)
        if owner is not None:
            raise ShiraError(
                f"model weight '{name}' is already packed ({owner!r}); call that PackedWeights' unpack() first, "
                f"or keep using it (it packs moved weights again by itself)"
            )
        slots.append(_Slot(name, weakref.ref(module), attr, weakref.ref(param)))
    return slots


def packed_owners(model: nn.Module) -> dict[int, PackedWeights]:
    """id(parameter) -> the open packing that holds it, for every packed parameter of ``model``, whichever of
    its modules the packing went through (a tied weight has several)."""
    owners: dict[int, PackedWeights] = {}
    for module in model.modules():
        owner = owner_of(module)
        if owner is not None:
            for param in module._parameters.values():
                if param is not None:
                    owners[id(param)] = owner
    return owners


def pack_parameters(
    model: nn.Module, targets: list[tuple[str, nn.Module, str, nn.Parameter]], chunk_mb: float = 256
) -> PackedWeights:
    """``pack`` for explicit (parameter name, module, attribute, parameter) targets (used by ``AdapterBank``)."""
    if (
        isinstance(chunk_mb, bool)
        or not isinstance(chunk_mb, (int, float))
        or not math.isfinite(chunk_mb)
        or chunk_mb <= 0
    ):
        raise ShiraError(f"chunk_mb={chunk_mb!r}; it must be a positive number of MiB (the largest arena, default 256)")
    with _locked(model):  # not while another thread switches an adapter on the model
        slots = _slots_for(model, targets)
        if not slots:
            raise ShiraError("pack() was given no weights to pack")
        _validate([(s.name, s.parameter()) for s in slots], model)
        packed = PackedWeights(model, slots, chunk_mb)
        packed._place(slots)
        for slot in slots:
            _OWNERS.set(slot.holder(), packed)
        return packed


def _locked(model: nn.Module | None) -> Any:
    """The model's switching lock (re-entrant; ``apply`` packs moved weights again under it)."""
    return model_state(model).lock if model is not None else contextlib.nullcontext()


def pack(model: nn.Module, target_modules: TargetSpec = None, *, chunk_mb: float = 256) -> PackedWeights:
    """Re-home the chosen weights into contiguous arenas, so that switching an adapter is one write per arena.

    Values, strides, dtype, device, ``requires_grad`` and the ``Parameter`` objects stay as they are; only
    the storage changes (see the module docstring). ``apply``, ``remove`` and ``AdapterBank`` find packed
    weights by themselves; nothing else changes for the model (forward, training, ``state_dict``,
    ``save_pretrained``, ``torch.compile``, DDP).

    Args:
        model: the model whose weights to pack.
        target_modules: which modules' ``weight`` to pack, as for ``attach`` (default: every ``nn.Linear``
            except the output head; a regex, suffixes, types or a predicate).
        chunk_mb: the largest arena in MiB; also the most memory packing holds beside the model.

    Returns:
        A ``PackedWeights``; ``unpack()`` (or ``with pack(model):``) gives the weights their own storage back.

    Raises:
        ShiraError: a weight is already packed, on the meta device, sharded (DTensor), in shared memory
            (``share_memory()``: other processes would lose sight of it), in a layout with gaps, or shares its
            storage with a tensor that is not packed with it (a tie by shared storage that packing would
            break); ``chunk_mb`` is not a positive number. Nothing is changed then.

    Example:
        >>> packed = shira_hooks.pack(model)                 # once, after loading the model
        >>> with shira_hooks.apply(model, adapter):          # one index_copy_ per arena
        ...     output = model(**batch)
    """
    targets = [
        (f"{name}.weight", module, "weight", weight) for name, module, weight in resolve_targets(model, target_modules)
    ]
    return pack_parameters(model, targets, chunk_mb)
