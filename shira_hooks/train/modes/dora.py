"""``attach(..., dora=True)``: SHiRA-DoRA, the masked entries trained weight-decomposed (paper §4.3.1).

The variant of ``mode="compact"`` (``DoraCompact``) and ``mode="sparse"`` (``DoraSparse``): the layer's two
hooks, its tap and the (k,) gradient of the masked weight entries are theirs. What the tap's gradient flows
into changes. For a target weight W0 (out, in) with a mask M of k entries the layer computes with
(``train/dora.py``)::

    W = W0 + M * (m * V / ||V||_row - W0)

Its masked entries are ``E = m_rows * V_masked / ||V||_rows`` (k,). The forward hook computes E with autograd
and hands it to the tap in place of ``shira_values``, so the tap's gradient reaches the trained tensors:

* ``dora_rank=None``: ``<layer>.shira_values`` (k,), V's masked entries (W0 there at attach, the weight's
  dtype), and ``<layer>.shira_magnitude`` (out,), float32. The unmasked part of each row's squared norm is
  fixed (``base``, kept by the mode): O(k + out) per forward, no dense tensor.
* ``dora_rank=r``: ``<layer>.shira_dora_a`` (r, in), Kaiming-uniform like LoRA's A from attach's seed,
  ``<layer>.shira_dora_b`` (out, r), zeros, and ``shira_magnitude``: V = W0 + B A, so every forward forms the
  dense (out, in) product B A and keeps it for the backward, as PEFT's DoRA does.

The magnitude starts at the row norms computed by the forward's own function, so ``m / ||V||`` is exactly 1
and the layer is W0 bit for bit at attach. After each optimizer step, and before a forward when a trained
tensor's version moved, E is written into the weight's masked entries (no autograd, cast to the weight's
dtype): only masked entries ever change, and ``extract()`` reads the plain sparse delta ``E - W0`` off the
weight, the magnitude folded in.

Under FSDP2, attached before ``fully_shard`` (the Trainer's and Accelerate's order): ``fully_shard`` shards the
DoRA tensors with the weight (``Shard(0)``, as the layer's parameters) and the handle adopts them (``adopt``).
FSDP2 all-gathers them for each forward, where the tap reads the module's current tensors, and reduce-scatters
their gradients. After each step every rank all-gathers the DoRA tensors (and, with ``dora_rank``, the weight),
computes E for all k entries and writes those in its rows; ``state()`` gathers them too, so under FSDP2
``state_dict()`` is a collective, like ``extract()``. Attaching to a weight that ``fully_shard`` already sharded is
refused: the magnitude and factors are made from the full weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ... import distributed, masks
from ..._base import storage_flat
from ...errors import ShiraError
from .. import dora
from ..config import Config
from ..target import Layer, Target
from .compact import VALUES, Compact
from .sparse import Sparse

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

MAGNITUDE = "shira_magnitude"
DORA_A = "shira_dora_a"
DORA_B = "shira_dora_b"

# The fix for a weight that fully_shard sharded before attach.
FSDP_FIX = (
    "Attach before fully_shard (the Trainer's and Accelerate's order: fully_shard then shards the DoRA tensors with "
    "the weight), or train with DistributedDataParallel"
)


class DoraCompact(Compact):
    """A compact target trained weight-decomposed: the tap's gradient flows through E into the DoRA tensors.

    Attributes:
        tensors: the trained parameters by their name on the layer (``shira_values`` and ``shira_magnitude``;
            or ``shira_dora_a``, ``shira_dora_b`` and ``shira_magnitude``).
        rank: None, or the rank of the factors.
        mask_rows, mask_cols: (k,) int64 row and column of each masked entry, on the weight's device.
        base: ``rank=None``: (out,) the unmasked part of each row's squared norm (fixed); else None.
        base_values: ``rank=r``: (k,) W0's masked entries (the weight holds E there); else None.
        weight_dtype: the weight's dtype the fixed terms and the DoRA tensors were made for.
        stepped: an optimizer step (or a loaded state) changed the DoRA tensors since attach.
        layer: the layer's name, for messages.
    """

    frozen_words: ClassVar[tuple[str, str]] = (f"their '{MAGNITUDE}' and direction tensors", "those tensors")
    unseen_fix: ClassVar[str] = ""
    dense_can: ClassVar[bool] = False  # mode='dense' has no DoRA variant: refusals do not suggest it

    def __init__(
        self,
        weight: nn.Parameter,
        values: nn.Parameter | None,
        indices: torch.Tensor,
        positions: Callable[[torch.Tensor], torch.Tensor],
        shared: Any = None,
        rows: distributed.RowSlice | None = None,
        *,
        tensors: dict[str, nn.Parameter] | None = None,
    ):
        self.tensors = dict(tensors or {})
        self.rank = self.tensors[DORA_A].shape[0] if DORA_A in self.tensors else None
        self.base: torch.Tensor | None = None
        self.base_values: torch.Tensor | None = None
        self.weight_dtype = weight.dtype
        self.stepped = False
        self.layer = ""
        super().__init__(weight, values, indices, positions, shared, rows)  # type: ignore[arg-type]

    def use_mask(self, indices: torch.Tensor) -> None:
        """Take the mask: the base mode's index (or CSR pattern), and each entry's row and column."""
        super().use_mask(indices)
        index = indices.to(self.weight.device, torch.int64)
        self.mask_rows, self.mask_cols = index // self.weight.shape[1], index % self.weight.shape[1]

    # ------------------------------------------------------------------------------- attach
    @classmethod
    def check_layer(cls, layer: Layer) -> None:
        """The base mode's checks, no DoRA parameter on the layer yet, and no FSDP2-sharded weight."""
        super().check_layer(layer)
        if distributed.is_sharded(layer.weight):
            raise ShiraError(
                f"dora=True cannot train weight '{layer.name}': fully_shard (FSDP2) already sharded it, and SHiRA-DoRA's "
                f"magnitude and factors are made at attach from the full weight. {FSDP_FIX}"
            )
        for name in (MAGNITUDE, DORA_A, DORA_B):
            if name in layer.module._parameters:
                raise ShiraError(
                    f"module '{layer.module_name}' already has a parameter '{name}'; detach the handle that added it "
                    f"first (shira_hooks.attached(model) finds it)"
                )

    @classmethod
    def register(cls, target: Target, shared: Any, config: Config) -> DoraCompact:
        """Register the layer's DoRA tensors, with the magnitude at V's row norms (so the layer is W0), and its hooks."""
        module, weight = target.module, target.param
        w0 = weight.detach()  # W0: nothing has trained yet
        assert target.indices is not None and target.originals is not None  # install comes after the masks are fixed
        index = target.indices.to(w0.device, torch.int64)
        rows, cols = index // w0.shape[1], index % w0.shape[1]
        originals = target.originals  # (k,) W0's masked entries, the weight's dtype
        wide = torch.promote_types(w0.dtype, torch.float32)
        base = base_values = None
        if config.dora_rank is None:
            base = dora.row_norm_base(w0, rows, originals)
            tensors = {VALUES: originals.clone(), MAGNITUDE: dora.masked_norms(originals, rows, base)}
        else:
            a = torch.empty(config.dora_rank, w0.shape[1], dtype=wide)
            # LoRA's A initialisation, drawn per weight from attach's seed (the mask kinds' generator, another name)
            nn.init.kaiming_uniform_(
                a, a=math.sqrt(5), generator=masks.generator_for(config.seed, f"{target.name}.{DORA_A}")
            )
            a, b = a.to(w0.device), torch.zeros(w0.shape[0], config.dora_rank, dtype=wide, device=w0.device)
            base_values = originals.clone()
            _, norms = dora.low_rank_masked(base_values, w0, b, a, rows, cols)
            tensors = {DORA_A: a, DORA_B: b, MAGNITUDE: norms}
        params = {name: nn.Parameter(tensor.detach()) for name, tensor in tensors.items()}
        for name, param in params.items():
            module.register_parameter(name, param)
        mode = cls(weight, params.get(VALUES), target.indices, target.positions, shared, None, tensors=params)
        mode.base, mode.base_values = base, base_values
        mode.layer = target.name.rpartition(".")[0] or type(module).__name__
        mode.hook(module)
        return mode

    # ------------------------------------------------------------------------------ the hooks
    def follow(self) -> None:
        """Keep the mask's coordinates and the fixed DoRA tensors on the weight's device, and follow a cast."""
        super().follow()
        device = self.weight.device
        if self.mask_rows.device != device:
            self.mask_rows, self.mask_cols = self.mask_rows.to(device), self.mask_cols.to(device)
        if self.base is not None and self.base.device != device:
            self.base = self.base.to(device)
        if self.base_values is not None and self.base_values.device != device:
            self.base_values = self.base_values.to(device)
        if self.weight.dtype != self.weight_dtype or any(
            p.dtype != self.dtype_of(name) for name, p in self.tensors.items()
        ):
            self.recast()

    def dtype_of(self, name: str) -> torch.dtype:
        """The dtype attach gives a DoRA tensor: the weight's for the values, float32 (float64 for a float64
        weight) for the magnitude and the factors."""
        return self.weight_dtype if name == VALUES else torch.promote_types(self.weight_dtype, torch.float32)

    @torch.no_grad()
    def recast(self) -> None:
        """``model.to(dtype)`` (``half()``, ``bfloat16()``) after attach cast the weight and the DoRA tensors.

        Before any training, the mode starts again from the cast weight, as an attach after the cast would:
        the fixed terms from the cast base, the values its masked entries (the weight holds W0 there), the factors
        and magnitude in the dtype attach gives them, the magnitude at the new row norms. The layer is then the
        cast base bit for bit and ``extract()`` all zeros. After training, the cast would have rounded the trained
        magnitude and direction: refused.

        Raises:
            ShiraError: the DoRA tensors trained (or were loaded) before the cast, or FSDP2 shards them.
        """
        cast = (
            self.weight.dtype
            if self.weight.dtype != self.weight_dtype
            else next(p.dtype for name, p in self.tensors.items() if p.dtype != self.dtype_of(name))
        )
        what = f"'{self.layer}' was cast from {str(self.weight_dtype).removeprefix('torch.')} to {str(cast).removeprefix('torch.')}"
        if self.stepped or self.rows is not None:
            raise ShiraError(
                f"{what} after attach(dora=True)"
                + (
                    " and training, which rounds its trained magnitude and direction"
                    if self.stepped
                    else " under FSDP2"
                )
                + ". Cast the model before attach, or train in mixed precision (torch.autocast: the Trainer's bf16=True "
                "or fp16=True keeps the weights as they are); detach() writes what trained into the weight"
            )
        self.weight_dtype = self.weight.dtype
        weight = self.weight.detach()
        w0 = storage_flat(weight).index_select(0, self.positions(weight))  # nothing trained: W0's masked entries
        wide = self.dtype_of(MAGNITUDE)
        if self.rank is None:
            self.base = dora.row_norm_base(weight, self.mask_rows, w0)
            self.tensors[VALUES].data = w0.clone()
            self.tensors[MAGNITUDE].data = dora.masked_norms(self.tensors[VALUES], self.mask_rows, self.base)
        else:
            self.base_values = w0.clone()
            a, b = self.tensors[DORA_A], self.tensors[DORA_B]
            a.data, b.data = a.detach().to(wide), torch.zeros_like(b, dtype=wide)
            _, norms = dora.low_rank_masked(self.base_values, weight, b, a, self.mask_rows, self.mask_cols)
            self.tensors[MAGNITUDE].data = norms
        self.synced = self.versions()

    def effective(
        self, tensors: dict[str, torch.Tensor] | None = None, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(k,) E, the masked entries the layer computes with, float32 (float64 for a float64 weight), with autograd.

        From ``tensors`` and ``weight`` (default: the mode's own; under FSDP2 whole tensors: the forward's
        all-gathered ones, or gathered after a step). Outside autocast: the E the tap differentiates in the forward
        and the E written into the weight after a step (outside the forward) are the same function of the same
        tensors, bit for bit.
        """
        using: dict[str, torch.Tensor] = dict(self.tensors) if tensors is None else tensors
        weight = self.weight if weight is None else weight
        rows = self.mask_rows
        with torch.autocast(self.weight.device.type, enabled=False):
            if self.base is not None:  # rank=None
                values: torch.Tensor = using[VALUES]
                norms = dora.masked_norms(values, rows, self.base)
            else:
                assert self.base_values is not None
                values, norms = dora.low_rank_masked(
                    self.base_values, weight, using[DORA_B], using[DORA_A], rows, self.mask_cols
                )
            return dora.effective(values, using[MAGNITUDE], rows, norms)

    def tap_values(self, module: nn.Module) -> torch.Tensor | None:
        """E with autograd: the tap's (k,) gradient flows through it into the DoRA tensors (the module's current
        ones: under FSDP2, in the forward, the all-gathered parameters whose gradients FSDP2 reduce-scatters)."""
        tensors = {name: module._parameters.get(name, param) for name, param in self.tensors.items()}
        if not torch.is_grad_enabled() or not any(p is not None and p.requires_grad for p in tensors.values()):
            return None
        return self.effective(tensors, module.weight)  # type: ignore[arg-type]  # None only by register_parameter(name, None)

    def names(self) -> tuple[str, ...]:
        return tuple(self.tensors)

    def versions(self) -> Any:
        return tuple(p._version for p in self.tensors.values())

    @torch.no_grad()
    def entries(self) -> torch.Tensor:
        """(k,) E (no autograd); under FSDP2 the entries in this rank's rows, from the gathered DoRA tensors (and
        with ``dora_rank`` the gathered weight): a collective."""
        if self.rows is None:
            return self.effective()
        tensors = {name: distributed.gather(param.detach()) for name, param in self.tensors.items()}
        weight = self.weight if self.rank is None else distributed.gather(self.weight.detach())
        return self.effective(tensors, weight)[self.rows.start : self.rows.stop]

    # --------------------------------------------------------------------- the handle's steps
    def trained(self, target: Target) -> tuple[nn.Parameter, ...]:
        return tuple(self.tensors.values())

    def step_changed(self, optimizer: torch.optim.Optimizer, members: set[int]) -> bool | None:
        changed = super().step_changed(optimizer, members)
        self.stepped = self.stepped or bool(changed)
        return changed

    def sharded(self) -> DTensor | None:
        return next((p for p in self.tensors.values() if distributed.is_sharded(p)), None)

    # ----------------------------------------------------------------- replaced parameters
    def replace_own(self, name: str, param: nn.Parameter) -> None:
        self.tensors[name] = param
        if name == VALUES:
            self.values = param

    def adopt(self, target: Target, weight: nn.Parameter) -> None:
        """Train the DTensors that ``fully_shard`` put in place of the weight and of the layer's DoRA tensors.

        Raises:
            ShiraError: a DoRA tensor is not sharded as ``Shard(0)`` on the weight's 1-D mesh.
        """
        assert distributed.is_sharded(weight) and target.indices is not None  # Follower adopts DTensors; masks fixed
        layer = target.name.rpartition(".")[0]
        adopted = {}
        for name in self.tensors:
            param = target.module._parameters.get(name)
            distributed.check_values(param, weight, f"'{layer}.{name}'")
            adopted[name] = param
        self.rows = distributed.row_slice(target.indices, weight, f"'{layer}.{MAGNITUDE}'")
        self.weight, self.managed = weight, True
        for name, param in adopted.items():
            self.replace_own(name, param)  # type: ignore[arg-type]  # check_values refused anything but a DTensor
        self.synced = self.versions()
        if self.check is not None:  # FSDP2 reads the sharded weights outside their layers (its all-gather)
            self.check.remove()

    # -------------------------------------------------------------------- resumable state
    def state(self, target: Target) -> dict[str, torch.Tensor]:
        """The DoRA tensors: the weight holds E, from which they cannot be recovered (under FSDP2 gathered: a
        collective)."""
        return {name: distributed.gather(param.detach()) for name, param in self.tensors.items()}

    def check_state(self, target: Target, entry: dict[str, Any]) -> None:
        """Refuse an entry without this handle's DoRA tensors, or with other shapes or dtypes."""
        saved = entry.get("mode") or {}
        expected = {name: (tuple(p.shape), p.dtype) for name, p in self.tensors.items()}
        found = {name: (tuple(t.shape), t.dtype) for name, t in saved.items() if isinstance(t, torch.Tensor)}
        if found != expected:
            wanted = ", ".join(
                f"{name} {list(shape)} {str(dtype).removeprefix('torch.')}" for name, (shape, dtype) in expected.items()
            )
            got = (
                ", ".join(
                    f"{name} {list(shape)} {str(dtype).removeprefix('torch.')}"
                    for name, (shape, dtype) in found.items()
                )
                or "none"
            )
            raise ShiraError(
                f"state for '{target.name}' holds DoRA tensors {got}; the handle (dora_rank={self.rank}) trains {wanted}. "
                f"Attach with the sparsity, dora and dora_rank of the run that saved it"
            )

    @torch.no_grad()
    def load(self, target: Target, entry: dict[str, Any]) -> None:
        """Take the loaded mask and DoRA tensors (same parameter objects) and write E into the weight."""
        assert target.indices is not None and target.originals is not None  # set by load_state_dict before
        self.use_mask(target.indices)
        originals = target.originals
        if self.rank is None:
            self.base = dora.row_norm_base(target.restored(), self.mask_rows, originals)
        else:
            self.base_values = originals.clone()
        if self.rows is not None:  # FSDP2: the new mask's entries in this rank's rows
            self.rows = distributed.row_slice(target.indices, self.weight, "the loaded mask")  # type: ignore[arg-type]  # rows: a DTensor weight
        for name, param in self.tensors.items():
            saved = entry["mode"][name]
            if distributed.is_sharded(param):  # this rank's rows of the whole tensor
                start, stop = distributed.row_range(param)
                distributed.local(param).copy_(saved[start:stop])
            else:
                param.copy_(saved)
        self.stepped = True  # a loaded state holds what trained: a later cast would round it
        self.sync(force=True)


class DoraSparse(DoraCompact, Sparse):
    """``mode="sparse", dora=True``: ``DoraCompact`` with the sparse mode's sampled gradient of the k entries."""

    name: ClassVar[str] = "sparse"


__all__ = ["DORA_A", "DORA_B", "MAGNITUDE", "DoraCompact", "DoraSparse"]
