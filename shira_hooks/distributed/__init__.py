"""Processes and shards: every ``torch.distributed`` call of shira_hooks, and the ``DTensor`` helpers of FSDP2.

``shard`` is a leaf: it imports nothing of shira_hooks but ``errors``, and code that must run before a
model's forward passes registers a plain callable with ``watch``.
"""

from .shard import (
    SUPPORTED,
    RowSlice,
    all_reduce,
    broadcast_int,
    check_model,
    check_placements,
    check_values,
    gather,
    gather_rows,
    gather_slices,
    initialized,
    is_row_sharded,
    is_sharded,
    local,
    local_mask,
    row_range,
    row_slice,
    shard_values,
    unwatch,
    values_grad,
    watch,
    world_size,
)

__all__ = [
    "SUPPORTED",
    "RowSlice",
    "all_reduce",
    "broadcast_int",
    "check_model",
    "check_placements",
    "check_values",
    "gather",
    "gather_rows",
    "gather_slices",
    "initialized",
    "is_row_sharded",
    "is_sharded",
    "local",
    "local_mask",
    "row_range",
    "row_slice",
    "shard_values",
    "unwatch",
    "values_grad",
    "watch",
    "world_size",
]
