"""One trained weight of a handle: its mask, the base values at the mask, and where they live.

A mask is kept as *logical* flat indices (row-major positions in ``weight.reshape(-1)``, on the CPU):
what files, states and fingerprints hold. Everything that touches the weight or its gradient goes
through ``positions(tensor)``, the int64 storage positions of the mask in that tensor's current
device and layout (``_base.layout``), cached per layout. ``follow()`` makes the stored base values follow
the weight after ``model.to(device)``, a dtype cast or a ``param.data = ...`` replacement, so no
tensor of the handle is ever on the wrong device at use time.

Under FSDP2 the weight, its gradient and its optimizer state are ``DTensor``s sharded by rows
(``distributed``): ``storage(tensor)`` then addresses this rank's shard and the mask's indices in its
rows, while ``current()`` and ``restored()`` gather the full weight (collectives).

How the masked entries train is the target's ``mode``, an object of one of the classes in ``modes``
(``Dense``, ``Compact``, ``Sparse``, and the SHiRA-DoRA variants of the last two) that follows the ``Mode`` protocol below. The protocol lives here,
beside the ``Target`` that holds a mode, so that the modes import this module and not the other way round.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from .. import distributed, masks
from .._base import check_dense, digest, is_dense, layout_key, storage_flat, storage_index
from ..errors import ShiraError
from .config import Config

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

# The fix, in every message that refuses a replaced target weight or mode parameter (``follow``, the modes).
REPLACED_FIX = (
    "Fix: load into the attached parameters instead of replacing them (load_state_dict without assign=True, or "
    "param.copy_(...) under torch.no_grad()), or detach() the handle first and attach again afterwards "
    "(save_state() / load_state() keep the masks)"
)


def describe(param: torch.Tensor | None) -> str:
    """A parameter for a message: its type, shape, dtype and device."""
    if param is None:
        return "None"
    return f"a {type(param).__name__} of shape {tuple(param.shape)}, {str(param.dtype).removeprefix('torch.')}, on {param.device}"


RETIRED = "_shira_retired"  # the attribute of a target module that remembers its retired trained tensors


class Retired:
    """The value of ``module._shira_retired``: the trained tensors (``shira_values``, SHiRA-DoRA's) that
    ``detach()`` unregistered from the module, held weakly with their names.

    An optimizer built before ``detach()`` still holds them, and a handle attached to the module later trains
    new ones: the steps of that optimizer would train nothing, silently. The later handle's step hooks refuse
    them (``StepHooks``). A copy or a pickle of the module carries none: no optimizer holds a copy's tensors.
    """

    def __init__(self) -> None:
        self.refs: dict[int, tuple[weakref.ref, str]] = {}

    @staticmethod
    def add(module: nn.Module, name: str, param: torch.Tensor) -> None:
        """Remember ``param`` (named ``name`` in the model) as retired from ``module``."""
        retired = module.__dict__.get(RETIRED)
        if not isinstance(retired, Retired):
            retired = module.__dict__[RETIRED] = Retired()
        retired.refs = {i: (ref, n) for i, (ref, n) in retired.refs.items() if ref() is not None}
        retired.refs[id(param)] = (weakref.ref(param), name)

    @staticmethod
    def held(module: nn.Module, ids: dict[int, Any] | set[int]) -> str | None:
        """The name of a tensor retired from ``module`` that is among ``ids`` (an optimizer's), else None."""
        retired = module.__dict__.get(RETIRED)
        if not isinstance(retired, Retired):
            return None
        # a live referent with an id in ids is that very tensor: ids are unique among live objects
        return next((n for i, (ref, n) in retired.refs.items() if i in ids and ref() is not None), None)

    def __getstate__(self) -> dict:
        return {"refs": {}}

    def __deepcopy__(self, memo: dict) -> Retired:
        return Retired()


@dataclass(frozen=True)
class Layer:
    """What ``attach`` knows of one target layer, for ``Mode.check_layer``.

    Attributes:
        name: the weight's parameter name; module_name: the layer's name in the model.
        module: the layer; weight: its weight.
        shared_by: how many modules of the model hold this weight (tied weights: more than one).
        read_directly: the layer's parent reads its weight without calling it (``nn.MultiheadAttention``'s
            ``out_proj``).
    """

    name: str
    module_name: str
    module: nn.Module
    weight: nn.Parameter
    shared_by: int
    read_directly: bool


class Mode(Protocol):
    """How the masked entries of one target weight train: ``attach(mode=...)``, one class per mode in ``modes``.

    Each ``Target`` holds one mode object (``target.mode``). Until its mode is installed (``install``, after
    the masks are fixed) and after ``detach``, a target holds a ``modes.Dense()``: calibration scores the
    dense gradient. The class-level part runs at ``attach``; the object's methods take the target they
    belong to. A mode may own trainable tensors of its own (the k ``shira_values`` of the compact modes; the
    magnitude and factors of the DoRA variants): ``trained`` names them for the step hooks, ``follow_own`` and
    ``adopt`` carry them through replacements and ``fully_shard``, ``state``/``check_state``/``load`` through
    the handle's resumable state.
    """

    name: ClassVar[str]  # the value of attach(mode=...)
    weight_trains: ClassVar[bool]  # the weight itself gets a (masked) dense gradient and optimizer state
    # For the warnings of the step hooks: what has requires_grad=False when a target cannot train ("they"
    # / "their 'shira_values'"), the word for it in the fix, and what else may keep a gradient away.
    frozen_words: ClassVar[tuple[str, str]]
    unseen_why: ClassVar[str]
    unseen_fix: ClassVar[str]

    @classmethod
    def check_attach(cls, mask: str | masks.MaskFn, kind: masks.MaskKind, calibration: Iterable | None) -> None:
        """Refuse, at ``attach``, a mask this mode cannot train (raises ``ShiraError``)."""

    @classmethod
    def check_layer(cls, layer: Layer) -> None:
        """Refuse, at ``attach``, a target layer this mode cannot train (raises ``ShiraError``)."""

    @classmethod
    def install(cls, targets: list[Target], model: nn.Module, config: Config) -> None:
        """Give every target (masks fixed) a mode object of this class and register what it needs (``config``: the
        handle's settings, such as the DoRA variant's rank and the seed of its factors)."""

    def uninstall(self, target: Target) -> None:
        """Undo ``install`` for ``target``: its weight holds the trained entries, nothing of the mode stays."""

    def trained(self, target: Target) -> tuple[nn.Parameter, ...]:
        """The parameters an optimizer must hold to train ``target``."""

    def held_by(self, target: Target, members: dict[int, Any] | set[int]) -> bool:
        """Whether an optimizer with these parameter ids holds ``target``'s weight or a tensor of its mode."""

    def frozen(self, target: Target) -> bool:
        """Whether something set ``requires_grad=False`` on a tensor that trains (so nothing does)."""

    def flag_changed(self, target: Target) -> bool:
        """Whether other code changed a trained tensor's flag since the handle set it (``detach``)."""

    def got_gradient(self, target: Target) -> bool:
        """Whether a gradient for ``target`` arrived since ``attach``."""

    def optimizer_state_problem(self, target: Target, state: dict) -> tuple[str, int] | None:
        """(key, entries) of optimizer state that would move entries outside the mask, or None."""

    def before_step(self, target: Target, optimizer: torch.optim.Optimizer, members: dict[int, dict]) -> bool:
        """Before a step of ``optimizer`` that holds the target: whether the step uses the weight's masked
        dense gradient (the weight-decay guard then decays its masked entries)."""

    def step_changed(self, optimizer: torch.optim.Optimizer, members: set[int]) -> bool | None:
        """After the step: whether it changed the mode's tensors (None: the mode took no part in it)."""

    def sharded(self) -> DTensor | None:
        """A tensor of the mode sharded by FSDP2 (a DTensor), over whose mesh the ranks agree on which layers a
        step changed (writing them is a collective), or None."""

    def write(self, target: Target) -> None:
        """Make the weight hold the mode's trained entries now (a collective under FSDP2)."""

    def follow_own(self, target: Target, verb: str | None) -> None:
        """Follow (or refuse) replacements of the parameters the mode registered on the layer."""

    def adopt(self, target: Target, weight: nn.Parameter) -> None:
        """``fully_shard`` replaced the weight (and the layer's other parameters) with DTensors: follow them."""

    def weight_replaced(self, target: Target, old: nn.Parameter, new: nn.Parameter) -> None:
        """User code put ``new`` (holding the base outside the mask) in place of the weight ``old``."""

    def state(self, target: Target) -> dict[str, torch.Tensor]:
        """Tensors of the mode to keep in the handle's resumable state (besides indices and originals)."""

    def check_state(self, target: Target, entry: dict[str, Any]) -> None:
        """Refuse a state entry this mode cannot load (raises ``ShiraError``), before anything changes."""

    def load(self, target: Target, entry: dict[str, Any]) -> None:
        """Take the mask (and tensors) of a loaded state entry; ``target`` already holds its indices."""


@dataclass(eq=False)
class Target:
    """One trained weight and its mask."""

    name: str  # parameter name in the model, e.g. "layers.0.q_proj.weight"
    module: nn.Module  # the layer that owns the weight
    param: nn.Parameter
    budget: int  # k, the number of trainable entries
    base_digest: str  # digest of the whole base weight (logical order), for verify()
    base_dtype: torch.dtype  # the dtype the base digest and originals refer to
    mode: Mode  # how the masked entries train (``modes``)
    indices: torch.Tensor | None = None  # (k,) sorted logical flat indices on the CPU; None while calibrating
    originals: torch.Tensor | None = None  # (k,) base values at indices, the weight's dtype and device
    # The mask was fixed in the last backward pass and no masked gradient has arrived since: whatever
    # .grad holds (a DDP reducer writes the averaged dense gradient back after our hook) is calibration.
    fresh: bool = False
    grad_seen: bool = False  # a dense gradient of the weight arrived since attach
    attr: str = "weight"  # the parameter's attribute name in ``module`` (FSDP2 puts a new object there)
    grad_hook: Any = None  # the post-accumulate-grad hook handle on ``param`` (also in the handle's list)
    # (name, weak reference) of each parameter this target followed away from: its weight's or a mode's
    replaced: list = field(default_factory=list)
    _positions: dict = field(default_factory=dict)  # layout_key -> (k,) int64 storage positions

    def __getstate__(self) -> dict:
        """For a copy or a pickle of the model: the gradient hook is registered again on the copy's parameter
        (``ShiraHandle.__setstate__``); weak references and per-device caches are not carried."""
        return {**self.__dict__, "grad_hook": None, "replaced": [], "_positions": {}}

    def rebind(self, param: nn.Parameter) -> None:
        """Train ``param``, the parameter now in the module in place of ``self.param`` (same shape, the mask's
        positions are taken again for its layout)."""
        self.param = param
        self._positions.clear()

    def hook_gradient(self, hook: Any) -> Any:
        """Register ``hook`` as ``param``'s post-accumulate-grad hook (also when its ``requires_grad`` is False
        now: torch refuses that, but a hook registered while it was True keeps firing after it is set back)."""
        flag = self.param.requires_grad
        self.param.requires_grad_(True)
        try:
            self.grad_hook = self.param.register_post_accumulate_grad_hook(hook)
        finally:
            self.param.requires_grad_(flag)
        return self.grad_hook

    def positions(self, tensor: torch.Tensor) -> torch.Tensor:
        """(k,) int64 positions of the mask in ``storage_flat(tensor)``, on ``tensor``'s device.

        For a DTensor: the positions in this rank's shard (``storage``) of the masked entries in its rows.
        """
        assert self.indices is not None, "positions of a mask that is not fixed yet"  # callers run once it is fixed
        shard = distributed.local(tensor)
        key = layout_key(shard) + (distributed.row_range(tensor) if shard is not tensor else ())
        found = self._positions.get(key)
        if found is None:
            if len(self._positions) >= 2:  # the weight's and its gradient's layout; drop stale devices
                self._positions.clear()
            found = self._positions[key] = storage_index(distributed.local_mask(self.indices, tensor), shard)
        return found

    def storage(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat storage view, positions of the mask in it) of ``tensor``, or of this rank's shard of a DTensor."""
        return storage_flat(distributed.local(tensor)), self.positions(tensor)

    def set_indices(self, indices: torch.Tensor, originals: torch.Tensor | None = None) -> None:
        """Adopt a mask (sorted logical indices) and the base values at it (by default: read them now)."""
        self.indices = indices.cpu()
        self._positions.clear()
        self.budget = indices.numel()
        self.originals = self.current() if originals is None else originals.to(self.param.device)

    def current(self) -> torch.Tensor:
        """(k,) the weight's values at the mask now (a copy; of a DTensor: gathered, a collective).

        Of a ``Shard(0)`` DTensor on a 1-D mesh (FSDP2) only the masked entries travel: each rank reads those in its rows and
        they are all-gathered (O(k), not the whole weight, at every ``extract`` and checkpoint).
        """
        assert self.indices is not None, "values at a mask that is not fixed yet"  # set_indices sets it first
        weight = self.param.detach()
        if distributed.is_row_sharded(weight):
            rows = distributed.row_slice(self.indices, weight, f"target weight '{self.name}'")
            part = storage_flat(distributed.local(weight)).index_select(0, self.positions(weight))
            return distributed.gather_slices(part, rows, weight.device_mesh)
        if distributed.is_sharded(weight):
            return distributed.gather(weight).reshape(-1).index_select(0, self.indices.to(weight.device, torch.int64))
        return storage_flat(weight).index_select(0, self.positions(weight))

    @torch.no_grad()
    def follow(self) -> None:
        """Make the stored base follow the weight's device and dtype (checked at every use; cheap).

        A device move keeps every value, so the originals are moved. A dtype cast (``model.half()``)
        changes the base itself: the originals are cast the same way and the base digest is taken
        again from the cast weight with the originals put back, i.e. the cast base. Entries changed
        outside the mask before the cast are then no longer detected: ``verify()`` before casting.
        """
        weight = self.param.detach()
        check_dense(distributed.local(weight), f"target weight '{self.name}'")
        if self.originals is None:  # calibrating (its scores follow the gradients' device: calibration)
            if self.base_dtype != weight.dtype:
                self.base_digest, self.base_dtype = digest(weight, 16), weight.dtype
            return
        if self.originals.device != weight.device or self.originals.dtype != weight.dtype:
            recast = self.originals.dtype != weight.dtype
            self.originals = self.originals.to(weight.device, weight.dtype)
            if recast:
                self.base_digest, self.base_dtype = digest(self.restored(), 16), weight.dtype

    def restored(self, param: torch.Tensor | None = None) -> torch.Tensor:
        """A copy of the weight (or of ``param``, a tensor of its shape and dtype) with the originals put back
        at the mask (the base, if exact).

        Of a DTensor: the full weight, gathered (a collective).
        """
        # Callers check ``indices`` (calibration has no base to put back); set_indices sets both together.
        assert self.indices is not None and self.originals is not None, "restored() before the mask is fixed"
        param = self.param if param is None else param
        if distributed.is_sharded(param):
            weight = distributed.gather(param.detach()).clone().reshape(-1)  # (numel,) row-major
            return weight.index_copy_(0, self.indices.to(weight.device, torch.int64), self.originals).view(param.shape)
        weight = param.detach().clone()  # keeps the layout
        storage_flat(weight).index_copy_(0, self.positions(weight), self.originals.to(weight.device))
        return weight

    def mask_grad(self, grad: torch.Tensor, fill: float = 0.0) -> None:
        """Keep the k masked gradient entries and set the rest to ``fill``, in place.

        Gather, fill, put back: no dense temporary, and an inf outside the mask becomes ``fill``,
        never NaN. ``fill=-0.0`` for ``maximize`` optimizers, which negate the gradient: a -0.0
        weight then stays -0.0 (``-0.0 + 0.0`` would be ``+0.0``).
        """
        flat, index = self.storage(grad)  # (numel,) in memory order, (k,); of a DTensor: this rank's rows
        kept = flat.index_select(0, index)
        flat.fill_(fill)
        flat.index_copy_(0, index, kept)

    @torch.no_grad()
    def prepare_step(self, group: dict) -> bool:
        """Before an optimizer step (dense mode): whether the step will use this weight's gradient.

        A calibration gradient is dropped (a DDP reducer writes the averaged gradient back after the
        hook dropped it). Any other gradient is masked again, since something may have written it
        after the hook (a DDP communication hook such as PowerSGD, user code).
        """
        self.follow()
        grad = self.param.grad
        if grad is None:
            return False
        if self.indices is None or self.fresh:  # calibrating: nothing may be updated from it
            self.param.grad, self.fresh = None, False
            return False
        if grad.is_sparse:
            raise ShiraError(f"'{self.name}' has a sparse gradient; shira_hooks masks dense gradients only")
        if not is_dense(distributed.local(grad)):
            self.param.grad = grad = grad.contiguous()
        self.mask_grad(grad, -0.0 if group.get("maximize", False) else 0.0)
        return True

    def state_outside_mask(self, state: dict) -> tuple[str, int] | None:
        """(key, entries) of the first weight-shaped optimizer state tensor nonzero outside the mask, or None.

        For DTensor state (FSDP2) the count is summed over the ranks (a collective), so all raise alike.
        """
        for key, value in state.items():
            if (
                not isinstance(value, torch.Tensor)
                or value.shape != self.param.shape
                or not is_dense(distributed.local(value))
            ):
                continue
            flat, index = self.storage(value)
            outside = torch.count_nonzero(flat) - torch.count_nonzero(flat.index_select(0, index))
            if distributed.is_sharded(value):
                distributed.all_reduce(outside)
            count = int(outside)
            if count:
                return key, count
        return None
