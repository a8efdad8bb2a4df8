"""Flat access to a weight in any dense layout (row-major, ``channels_last``, transposed, ...).

Masks are *logical* flat indices: positions in ``weight.reshape(-1)``, the row-major order of the
weight's shape, whatever its memory layout. That is what files and fingerprints hold. Writing in
place needs *storage* positions instead: for a weight whose elements fill one block of memory
without gaps or overlap (any permutation of a contiguous layout, e.g. a ``channels_last`` conv
weight), ``storage_flat`` is the 1-D view of that block and ``storage_index`` maps logical indices
to positions in it. For a row-major contiguous weight both are the identity.
"""

from __future__ import annotations

import torch

from ..errors import ShiraError


def is_dense(tensor: torch.Tensor) -> bool:
    """Whether the elements fill one block of memory without gaps or overlap (any dim order)."""
    expected = 1
    # Sorted by stride, the stride of each dim (of size > 1) must be the product of the smaller dims' sizes.
    for stride, size in sorted((st, s) for s, st in zip(tensor.shape, tensor.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_dense(tensor: torch.Tensor, where: str) -> None:
    """A ShiraError unless ``tensor`` is dense and non-overlapping (flat indices need that)."""
    if not is_dense(tensor):
        raise ShiraError(
            f"{where} has a layout with gaps or overlapping elements (shape {tuple(tensor.shape)}, strides "
            f"{tuple(tensor.stride())}), so its entries cannot be addressed by flat indices; give it a dense "
            f"layout (for example `.data = .data.contiguous()` or `.contiguous(memory_format=torch.channels_last)`)"
        )


def storage_flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D view of a dense tensor's elements in memory order (writes go to the tensor)."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    return tensor.as_strided((tensor.numel(),), (1,))


def storage_index(indices: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """int64 positions in ``storage_flat(tensor)`` of the logical row-major ``indices``, on its device."""
    index = indices.to(tensor.device, torch.int64)
    if tensor.is_contiguous():
        return index
    rest, position = index.clone(), torch.zeros_like(index)
    for size, stride in reversed(list(zip(tensor.shape, tensor.stride()))):
        position += (rest % size) * stride
        rest = torch.div(rest, size, rounding_mode="floor")
    return position


def layout_key(tensor: torch.Tensor) -> tuple:
    """What ``storage_index`` depends on: the device and the strides."""
    return (tensor.device, tuple(tensor.stride()))
