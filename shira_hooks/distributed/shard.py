"""Sharded target weights and the collectives: FSDP2 (``fully_shard``) is supported, other sharding is refused.

Every ``torch.distributed`` call of shira_hooks is made here (``world_size``, ``all_reduce``,
``broadcast``, the gathers below). This module imports nothing of shira_hooks but ``errors``: code
that must run at the model's forward passes registers a plain callable (``watch``).

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
hook with ``prepend=True``, so a hook on the model itself could run too late). A handle registers
a bound method of its follower (``watch(model, follower.follow)``), held weakly. The watch lasts from
``attach`` until the first optimizer step over the handle's weights; from then on the step hook
checks every step that the weights are still the handle's.

Refused with a ``ShiraError`` (they do not give each parameter its own gradient, or shard it in a
way not handled here): FSDP1 (``FullyShardedDataParallel``: flat parameters), DeepSpeed engines
and ZeRO-3 parameters, and DTensor placements other than ``Shard(0)`` / ``Replicate``.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, TypeGuard

import torch
from torch import nn

from ..errors import ShiraError

if TYPE_CHECKING:  # torch.distributed may be missing at run time (a build without it); only the checker reads these
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor
    from typing_extensions import TypeIs  # typing.TypeIs is Python 3.13+

SUPPORTED = (
    "shira_hooks supports DistributedDataParallel and FSDP2 (torch.distributed.fsdp.fully_shard, with the default "
    "Shard(0) placement; in Accelerate: fsdp_version: 2; in the HF Trainer: fsdp='full_shard' with "
    "fsdp_config={'fsdp_version': 2}), in every mode, attached before or after fully_shard"
)


@functools.cache
def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def initialized() -> bool:
    """Whether a ``torch.distributed`` process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the default ``torch.distributed`` group; 1 when it is not initialised."""
    if initialized():
        return torch.distributed.get_world_size()
    return 1


_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}


def all_reduce(
    tensor: torch.Tensor, op: Literal["sum", "max", "min"] = "sum", *, mesh: DeviceMesh | None = None
) -> torch.Tensor:
    """Reduce ``tensor`` in place over the ranks (a collective: every rank must call it); returns it.

    Args:
        op: "sum", "max" or "min".
        mesh: a DTensor's device mesh, to reduce over its group; default the default group.
    """
    group = None if mesh is None else mesh.get_group()
    torch.distributed.all_reduce(tensor, getattr(torch.distributed.ReduceOp, _OPS[op]), group=group)
    return tensor


def broadcast_int(value: int) -> int:
    """Rank 0's ``value`` on every rank (a collective), through the backend's device (CUDA for nccl)."""
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    agreed = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.broadcast(agreed, src=0)
    return int(agreed.item())


def is_sharded(tensor: torch.Tensor | None) -> TypeIs[DTensor]:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter or gradient)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def is_row_sharded(tensor: torch.Tensor | None) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a DTensor split by rows over a 1-D mesh (``Shard(0)``, FSDP2's default)."""
    if not is_sharded(tensor) or tensor.device_mesh.ndim != 1:
        return False
    from torch.distributed.tensor import Shard

    return tuple(tensor.placements) == (Shard(0),)


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
def gather_rows(values: torch.Tensor, like: DTensor) -> torch.Tensor:
    """(numel,) the per-entry ``values`` of every rank's shard of ``like``, in logical order (a collective).

    ``values``: (local numel,) on this rank, for the entries of its shard of ``like`` (a DTensor).
    """
    from torch.distributed.tensor import DTensor

    shard = DTensor.from_local(
        values.reshape(local(like).shape), like.device_mesh, like.placements, shape=like.shape, stride=like.stride()
    )
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
    if ("deepspeed", "DeepSpeedEngine") in names or any(
        top == "deepspeed" and name.endswith("Engine") for top, name in names
    ):
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
# model -> weak references to the bound methods to call before its forward passes
_WATCHED: weakref.WeakKeyDictionary[nn.Module, list[weakref.WeakMethod]] = weakref.WeakKeyDictionary()
_HOOK: list = []  # the global forward pre-hook handle, while some model is watched


def watch(model: nn.Module, before_forward: Callable[[], None]) -> None:
    """Call ``before_forward`` (a bound method, held weakly) before every forward pass of ``model``, until
    ``unwatch``; it goes by itself when its object is collected."""
    calls = _WATCHED.setdefault(model, [])
    if not any(ref() == before_forward for ref in calls):
        calls.append(weakref.WeakMethod(before_forward))
    if not _HOOK:
        _HOOK.append(nn.modules.module.register_module_forward_pre_hook(_before_forward))


def unwatch(model: nn.Module, before_forward: Callable[[], None]) -> None:
    """Stop calling ``before_forward`` before ``model``'s forward passes; the global hook goes when nothing is watched."""
    calls = _WATCHED.get(model)
    if calls is not None:
        calls[:] = [ref for ref in calls if ref() is not None and ref() != before_forward]
        if not calls:
            del _WATCHED[model]
    if not _WATCHED and _HOOK:
        _HOOK.pop().remove()


def _before_forward(module: nn.Module, args) -> None:
    if not _WATCHED and _HOOK:  # every watched model was collected without detach(): the hook goes
        _HOOK.pop().remove()  # safe here: torch calls the global hooks from a copy of their dict
        return
    calls = [call for ref in _WATCHED.get(module, ()) if (call := ref()) is not None]
    if calls:
        for call in calls:
            call()
        return
    inner = getattr(module, "module", None)  # DDP, FSDP1 and DeepSpeed keep the wrapped model here
    if isinstance(inner, nn.Module) and _WATCHED:
        problem = _refused_wrapper(module)
        if problem and any(
            model is inner or any(m is model for m in inner.modules()) for model in list(_WATCHED.keys())
        ):
            raise ShiraError(
                f"a model with an attached shira_hooks handle was wrapped in {problem}. {SUPPORTED}. Fix: shard with "
                f"fully_shard (FSDP2) instead, or use DDP"
            )


# ------------------------------------------------------------- compact/sparse values under FSDP2
@dataclass(frozen=True)
class RowSlice:
    """The masked entries in this rank's rows of a ``Shard(0)`` weight: ``[start, stop)`` of the sorted mask.

    The mask is sorted and each rank holds a contiguous block of rows (torch.chunk), so the entries
    in rank r's rows are one slice of it. ``bounds`` holds every rank's slice start, and the end.
    """

    start: int
    stop: int
    bounds: tuple[int, ...]

    @property
    def count(self) -> int:
        return self.stop - self.start


def row_slice(indices: torch.Tensor, weight: DTensor, where: str) -> RowSlice:
    """The ``RowSlice`` of a mask (sorted logical indices) for this rank's shard of a ``Shard(0)`` DTensor weight.

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
    per_rank = -(-rows // world)  # torch.chunk: ceil(rows / world) rows per rank, the last ones fewer or none
    if row_range(weight) != (min(rank * per_rank, rows), min((rank + 1) * per_rank, rows)):
        raise ShiraError(
            f"{where}: this rank's rows {row_range(weight)} are not the torch.chunk split that FSDP2 uses; use mode='dense'"
        )
    ends = torch.tensor(
        [min(r * per_rank, rows) * (weight.numel() // rows) for r in range(world + 1)], dtype=indices.dtype
    )
    bounds = tuple(torch.searchsorted(indices.cpu(), ends).tolist())
    return RowSlice(bounds[rank], bounds[rank + 1], bounds)


@torch.no_grad()
def gather_slices(part: torch.Tensor, rows: RowSlice, mesh: DeviceMesh) -> torch.Tensor:
    """(k,) every rank's ``part`` (its ``RowSlice`` of the masked values) in mask order (a collective, O(k))."""
    counts = [b - a for a, b in zip(rows.bounds, rows.bounds[1:])]
    width = max(1, max(counts))
    padded = part.new_zeros(width)
    padded[: part.numel()] = part
    out = part.new_empty(width * len(counts))
    torch.distributed.all_gather_single(out, padded, group=mesh.get_group())
    return torch.cat([out[r * width : r * width + c] for r, c in enumerate(counts)])


def check_values(values: torch.Tensor | None, weight: DTensor, where: str) -> None:
    """``shira_values`` sharded by ``fully_shard`` must be a (k,) ``Shard(0)`` DTensor on the weight's 1-D mesh.

    Raises:
        ShiraError: ``values`` is not such a DTensor (or is missing), naming ``where`` and its placements.
    """
    from torch.distributed.tensor import Shard

    if not (
        is_sharded(values) and values.device_mesh == weight.device_mesh and tuple(values.placements) == (Shard(0),)
    ):
        placements = tuple(values.placements) if is_sharded(values) else "not a DTensor"
        raise ShiraError(
            f"{where}: fully_shard sharded the weight but its values as {placements}; shira_hooks follows values "
            f"sharded as Shard(0) on the weight's mesh (fully_shard's default, applied to the module that holds both). "
            f"Use mode='dense'"
        )


def shard_values(full: torch.Tensor, weight: DTensor) -> nn.Parameter:
    """``shira_values`` as a (k,) ``Shard(0)`` DTensor parameter on the weight's mesh (torch.chunk of the k
    entries, as ``fully_shard`` would shard it), from the (k,) values that every rank holds."""
    from torch.distributed.tensor import Shard, distribute_tensor

    return nn.Parameter(distribute_tensor(full, weight.device_mesh, [Shard(0)], src_data_rank=None))


def values_grad(grad: torch.Tensor, values: DTensor) -> torch.Tensor:
    """The DTensor gradient of a ``shard_values`` parameter from this rank's (k,) gradient (a collective, O(k)).

    Averaged over the ranks, as FSDP2 averages the gradients it reduces: the gradient of the global batch.
    """
    from torch.distributed.tensor import DTensor

    torch.distributed.all_reduce(grad, group=values.device_mesh.get_group())
    grad.div_(values.device_mesh.size())
    start, stop = row_range(values)
    return DTensor.from_local(
        grad[start:stop].to(values.dtype),
        values.device_mesh,
        values.placements,
        shape=values.shape,
        stride=values.stride(),
    )
