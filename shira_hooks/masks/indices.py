"""How a mask is stored: sorted flat indices, runs of a block, and the CSR pattern of a mask.

A mask is a tensor of sorted, unique flat indices into ``weight.reshape(-1)`` (row-major, whatever the
weight's memory layout), never a dense boolean tensor; ``index_dtype`` says which integer type holds them.

Block masks (``block=B`` > 1): the mask is made of aligned runs of B consecutive entries of a row,
``[j * B, (j + 1) * B)`` for block numbers j, with B dividing the row length of the weight's
``(shape[0], -1)`` view, so a run never straddles two rows. B=16 is one 64-byte cache line of a
float32 weight (B=32 in bfloat16): writing a run touches one line, where 16 scattered entries touch
up to 16. Adapter files store one index per run (its block number).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


def index_dtype(numel: int) -> torch.dtype:
    """int32 where every flat index fits (numel < 2**31), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def row_length(shape: tuple[int, ...]) -> int:
    """Length of a row of the weight's ``(shape[0], -1)`` view (1 for a scalar)."""
    numel = int(np.prod(shape)) if len(shape) > 0 else 1
    return numel // shape[0] if len(shape) > 0 and shape[0] > 0 else numel


def expand_blocks(blocks: torch.Tensor, block: int) -> torch.Tensor:
    """(k/B,) block numbers -> (k,) int64 flat indices: ``blocks[:, None] * B + arange(B)``, in block order."""
    blocks = blocks.to(torch.int64)
    if block == 1:
        return blocks
    return (blocks.unsqueeze(1) * block + torch.arange(block, device=blocks.device)).reshape(-1)


def block_starts(indices: torch.Tensor, block: int) -> torch.Tensor | None:
    """The (k/B,) int64 block numbers of sorted unique ``indices`` if they form aligned runs of ``block``, else None."""
    flat = indices.to(torch.int64)
    if flat.numel() % block:
        return None
    runs = flat.view(-1, block)  # (k/B, B)
    first, last = runs[:, 0], runs[:, -1]
    # sorted and unique: B entries spanning exactly B - 1 are consecutive
    if bool((first % block != 0).any()) or bool((last - first != block - 1).any()):
        return None
    return torch.div(first, block, rounding_mode="floor")


def csr_pattern(index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The mask as an (out, in) CSR tensor with zero values, on the device of ``index``.

    Row-major order is flat index order, so the CSR values line up with ``index``. The row pointers and
    column indices are int32 where they fit (half the memory of int64; ``sampled_addmm`` takes both).
    ``mode="sparse"`` keeps this pattern and not ``index`` (8 bytes an entry less on every rank);
    ``MixedAdapters`` holds its deltas on it.
    """
    dtype = index_dtype(shape[0] * shape[1])
    rows, cols = torch.div(index, shape[1], rounding_mode="floor"), index % shape[1]
    crow = torch.zeros(shape[0] + 1, dtype=dtype, device=index.device)
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=shape[0]), 0)
    return csr_zeros(crow, cols.to(dtype), shape)


def csr_pattern_on(pattern: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``pattern`` on ``device``."""
    return csr_zeros(
        pattern.crow_indices().to(device), pattern.col_indices().to(device), (pattern.shape[0], pattern.shape[1])
    )


def csr_zeros(crow: torch.Tensor, cols: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A CSR tensor of zeros. ``sampled_addmm`` with ``beta=0`` reads only its pattern: on the CPU the zeros
    are one element expanded (no k-entry array); elsewhere a real array (the kernels there are not
    tested with a stride-0 array here)."""
    k = cols.numel()
    zeros = (
        torch.zeros(1, device=cols.device).expand(k)
        if cols.device.type == "cpu"
        else torch.zeros(k, device=cols.device)
    )
    with warnings.catch_warnings():  # "sparse CSR support is in beta" and invariant-check notices
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, cols, zeros, shape)
