"""Sharded target weights: FSDP2 (``fully_shard``) is supported, other sharding is refused.

Under FSDP2 every parameter is a ``DTensor`` whose local tensor is a block of rows: with
``Shard(0)`` on an n-rank mesh, rank r holds rows ``[r * c, min((r + 1) * c, rows))`` with
``c = ceil(rows / n)`` (torch.chunk; the last ranks may hold fewer rows, or none). Masks stay
logical flat indices of the *full* weight (the same masks and files as one process); each rank
masks and decays only the indices that fall in its rows (``local_mask``), and anything that needs
the whole weight (the base digest, ``verify``, ``extract``) gathers it with ``full_tensor()``, a
collective that every rank must call.

``fully_shard`` replaces every parameter object with a new ``DTensor`` parameter, so a handle
attached before sharding must find its weights again. ``watch`` does that at the start of the
model's next forward pass, through a global module forward pre-hook: global hooks run before a
module's own hooks, i.e. before FSDP2's pre-forward unshards the weights (FSDP2 registers its
hook with ``prepend=True``, so a hook on the model itself could run too late). The watch lasts
from ``attach`` until the first optimizer step over the handle's weights; from then on the step
hook checks every step that the weights are still the handle's (``ShiraHandle._follow_parameters``).

Refused with a ``ShiraError`` (they do not give each parameter its own gradient, or shard it in a
way not handled here): FSDP1 (``FullyShardedDataParallel``: flat parameters), DeepSpeed engines
and ZeRO-3 parameters, and DTensor placements other than ``Shard(0)`` / ``Replicate``.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ShiraError

if TYPE_CHECKING:
    from .handle import ShiraHandle

SUPPORTED = (
    "shira_hooks supports DistributedDataParallel and FSDP2 (torch.distributed.fsdp.fully_shard, with the default "
    "Shard(0) placement; in Accelerate: fsdp_version: 2; in the HF Trainer: fsdp='full_shard' with "
    "fsdp_config={'fsdp_version': 2}); mode='compact'/'sparse' under FSDP2 when attached after fully_shard"
)


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(tensor: torch.Tensor | None) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter or gradient)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (writes go to it), or the tensor itself."""
    if not is_sharded(tensor):
        return tensor
    with torch.no_grad():  # without autograd, to_local() is the local tensor itself, not a copy
        return tensor.to_local()


def row_range(tensor: torch.Tensor) -> tuple[int, int]:
    """(first row, end row) of this rank's shard of a ``Shard(0)`` DTensor; (0, rows) for a plain tensor."""
    if not is_sharded(tensor):
        return 0, tensor.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return offset[0], offset[0] + shape[0]


def local_mask(indices: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """The logical indices (into the *full* weight) that fall in this rank's rows, as flat indices of the shard."""
    if not is_sharded(tensor):
        return indices
    start, stop = row_range(tensor)
    width = tensor.numel() // tensor.shape[0] if tensor.shape[0] else 0  # entries per row
    inside = (indices >= start * width) & (indices < stop * width)
    return indices[inside] - start * width


@torch.no_grad()
def gather(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a ``DTensor`` (a collective: every rank must call it), or the tensor itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@torch.no_grad()
def gather_rows(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(numel,) the per-entry ``values`` of every rank's shard of ``like``, in logical order (a collective).

    ``values``: (local numel,) on this rank, for the entries of its shard of ``like`` (a DTensor).
    """
    from torch.distributed.tensor import DTensor

    shard = DTensor.from_local(values.reshape(local(like).shape), like.device_mesh, like.placements, shape=like.shape, stride=like.stride())
    return shard.full_tensor().reshape(-1)


def check_placements(tensor: torch.Tensor, where: str) -> None:
    """A ShiraError unless every placement of a DTensor is ``Shard(0)`` or ``Replicate``."""
    if not is_sharded(tensor):
        return
    from torch.distributed.tensor import Replicate, Shard

    for placement in tensor.placements:
        if isinstance(placement, Replicate) or (type(placement) is Shard and placement.dim == 0):
            continue
        raise ShiraError(
            f"{where} is a DTensor with placements {tuple(tensor.placements)}; shira_hooks masks weights sharded by rows "
            f"(Shard(0), FSDP2's default) or replicated, not {placement}. Fix: drop shard_placement_fn from fully_shard "
            f"(and tensor parallelism on the target layers). {SUPPORTED}"
        )


def _refused_wrapper(module: nn.Module) -> str | None:
    """What is wrong with a module that wraps or partitions parameters in a way shira_hooks cannot mask, or None."""
    names = {(cls.__module__.split(".")[0], cls.__name__) for cls in type(module).__mro__}
    if ("deepspeed", "DeepSpeedEngine") in names or any(top == "deepspeed" and name.endswith("Engine") for top, name in names):
        return (
            f"a DeepSpeed engine ({type(module).__name__}): DeepSpeed ZeRO moves gradients into its own partitioned "
            f"buffers and steps flat fp32 copies, so per-weight gradient masks and the weight-decay guard never apply"
        )
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FullyShardedDataParallel

        if isinstance(module, FullyShardedDataParallel):
            return (
                "an FSDP1 FullyShardedDataParallel wrapper: it flattens the weights into FlatParameters, so "
                "the target weights get no gradient of their own"
            )
    return None


def check_model(model: nn.Module) -> None:
    """At attach: refuse FSDP1 wrappers, DeepSpeed engines and ZeRO-3 parameters in ``model``.

    Raises:
        ShiraError: naming the module and what is supported instead.
    """
    for name, module in model.named_modules():
        problem = _refused_wrapper(module)
        if problem:
            raise ShiraError(
                f"module '{name or type(model).__name__}' is {problem}. {SUPPORTED}. Fix: attach to the plain model "
                f"and shard it with fully_shard (or FSDP2 in Accelerate / the Trainer), or use DDP"
            )
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or type(param).__name__ == "FlatParameter":
            kind = "a DeepSpeed ZeRO-3 partitioned parameter" if hasattr(param, "ds_id") else "an FSDP1 FlatParameter"
            raise ShiraError(f"parameter '{name}' is {kind}; its gradient cannot be masked per weight. {SUPPORTED}")


# ------------------------------------------------------------------------------ the watch
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[ShiraHandle]]" = weakref.WeakKeyDictionary()
_HOOK: list = []  # the global forward pre-hook handle, while some handle is watched


def watch(handle: "ShiraHandle") -> None:
    """Follow ``handle``'s weights through ``fully_shard`` at the model's forward passes, until ``unwatch``."""
    _WATCHED.setdefault(handle.model, weakref.WeakSet()).add(handle)
    if not _HOOK:
        _HOOK.append(nn.modules.module.register_module_forward_pre_hook(_before_forward))


def unwatch(handle: "ShiraHandle") -> None:
    """Stop watching ``handle``; the global hook goes when no handle is watched."""
    handles = _WATCHED.get(handle.model)
    if handles is not None:
        handles.discard(handle)
        if not handles:
            del _WATCHED[handle.model]
    if not _WATCHED and _HOOK:
        _HOOK.pop().remove()


def _before_forward(module: nn.Module, args) -> None:
    if not _WATCHED and _HOOK:  # every watched model was collected without detach(): the hook goes
        _HOOK.pop().remove()  # safe here: torch calls the global hooks from a copy of their dict
        return
    handles = _WATCHED.get(module)
    if handles:
        for handle in list(handles):
            handle._follow_parameters()
        return
    inner = getattr(module, "module", None)  # DDP, FSDP1 and DeepSpeed keep the wrapped model here
    if isinstance(inner, nn.Module) and _WATCHED:
        problem = _refused_wrapper(module)
        if problem and any(model is inner or any(m is model for m in inner.modules()) for model in list(_WATCHED.keys())):
            raise ShiraError(
                f"a model with an attached shira_hooks handle was wrapped in {problem}. {SUPPORTED}. Fix: shard with "
                f"fully_shard (FSDP2) instead, or use DDP"
            )


# ------------------------------------------------------------- compact/sparse values under FSDP2
@dataclass(frozen=True)
class ValuesSplit:
    """How ``shira_values`` (mode compact/sparse) is split across the ranks of a ``Shard(0)`` weight.

    The mask is sorted and each rank holds a contiguous block of rows, so the entries in rank r's rows
    are one slice ``[start, stop)`` of the sorted mask. ``shira_values`` is a ``Shard(0)`` DTensor of
    ``world * width`` entries: rank r holds its slice, zero-padded to ``width`` (the largest slice),
    so the values and their optimizer state are O(k) over all ranks, and each rank writes its values
    into its own rows of the weight without communication. The padding has zero gradient, so it stays
    zero under AdamW, its decay included.
    """

    start: int
    stop: int
    width: int
    world: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def split_values(indices: torch.Tensor, weight: torch.Tensor, where: str) -> ValuesSplit:
    """The ``ValuesSplit`` of a mask (sorted logical indices) over the ranks of a ``Shard(0)`` DTensor weight.

    Raises:
        ShiraError: the weight is sharded on a mesh with more than one dimension (HSDP), or not as torch.chunk.
    """
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise ShiraError(
            f"{where} is sharded on a {mesh.ndim}-D device mesh (HSDP); mode='compact'/'sparse' support FSDP2 on a "
            f"1-D mesh only. Use mode='dense'"
        )
    world, rank, rows = mesh.size(), mesh.get_local_rank(), weight.shape[0]
    width_rows = -(-rows // world)  # torch.chunk: ceil(rows / world) rows per rank, the last ones fewer or none
    bounds = torch.tensor([min(r * width_rows, rows) * (weight.numel() // rows) for r in range(world + 1)], dtype=indices.dtype)
    starts = torch.searchsorted(indices, bounds).tolist()
    if row_range(weight) != (min(rank * width_rows, rows), min((rank + 1) * width_rows, rows)):
        raise ShiraError(f"{where}: this rank's rows {row_range(weight)} are not the torch.chunk split that FSDP2 uses; use mode='dense'")
    width = max(1, max(b - a for a, b in zip(starts, starts[1:])))
    return ValuesSplit(starts[rank], starts[rank + 1], width, world)


def values_parameter(local_values: torch.Tensor, split: ValuesSplit, weight: torch.Tensor) -> nn.Parameter:
    """``shira_values`` as a ``Shard(0)`` DTensor parameter on the weight's mesh: this rank's values, zero-padded."""
    from torch.distributed.tensor import DTensor, Shard

    padded = local_values.new_zeros(split.width)
    padded[: split.count] = local_values
    return nn.Parameter(DTensor.from_local(padded, weight.device_mesh, [Shard(0)], shape=(split.world * split.width,), stride=(1,)))


def values_grad(grad: torch.Tensor, split: ValuesSplit, values: torch.Tensor) -> torch.Tensor:
    """The DTensor gradient of ``shira_values`` from this rank's (k,) gradient of every mask entry (a collective).

    Averaged over the ranks, as FSDP2 averages the gradients it reduces: the gradient of the global batch.
    """
    from torch.distributed.tensor import DTensor

    torch.distributed.all_reduce(grad, group=values.device_mesh.get_group())
    grad.div_(split.world)
    padded = grad.new_zeros(split.width)
    padded[: split.count] = grad[split.start : split.stop]
    return DTensor.from_local(padded.to(values.dtype), values.device_mesh, values.placements, shape=values.shape, stride=values.stride())
