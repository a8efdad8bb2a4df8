"""Mask selection: which k entries of a weight train (paper §3.1), for each kind in ``kinds``.

Every function here returns the mask as sorted, unique flat indices (``indices``). Every kind chooses
blocks the way it chooses entries when ``block`` > 1; the budget is then rounded to whole blocks
(``budget.budget``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..errors import ShiraError
from .indices import block_starts, expand_blocks, index_dtype

MaskFn = Callable[[str, torch.Tensor], Any]


def generator_for(seed: int, name: str) -> torch.Generator:
    """A CPU generator seeded from ``seed`` and the weight's name.

    Each weight gets its own stream, so a mask does not depend on which other weights are targeted
    or in which order, and every process of a distributed run draws the same mask.
    """
    mixed = (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _finish(flat: torch.Tensor, numel: int) -> torch.Tensor:
    """Sort flat int64 indices and store them in the compact dtype."""
    return torch.sort(flat.to(torch.int64)).values.to(index_dtype(numel))


def rand_mask(numel: int, k: int, generator: torch.Generator, block: int = 1) -> torch.Tensor:
    """k entries drawn uniformly without replacement (with ``block``: k/B of the numel/B aligned blocks).

    For small k this samples with replacement, keeps the distinct draws and picks k of them at random
    (a uniform k-subset), so it never materialises a permutation of all ``numel`` entries.
    """
    if block > 1:
        return _finish(expand_blocks(rand_mask(numel // block, k // block, generator).to(torch.int64), block), numel)
    if k * 4 > numel:
        return _finish(torch.randperm(numel, generator=generator)[:k], numel)
    draws = torch.empty(0, dtype=torch.int64)
    while draws.numel() < k:
        more = torch.randint(numel, (k + k // 8 + 16,), generator=generator)
        draws = torch.unique(torch.cat([draws, more]))
    keep = torch.randperm(draws.numel(), generator=generator)[:k]
    return _finish(draws[keep], numel)


def struct_mask(shape: tuple[int, ...], k: int, generator: torch.Generator, block: int = 1) -> torch.Tensor:
    """SHiRA-Struct: the diagonal plus whole rows, sized to exactly k entries.

    The weight is viewed as a matrix (shape[0], numel // shape[0]). The diagonal (min(rows, cols)
    entries) makes the update high rank; whole rows, picked at random from ``generator``, add a
    rank-1-like block. The last row is filled only partly so that the count is exactly k. When k is
    smaller than the diagonal, k evenly spaced diagonal entries are used.

    With ``block`` the same is done on the (rows, cols / B) grid of blocks: the "diagonal" of row r
    is the block holding entry (r, r), and rows are filled a block at a time (k is a multiple of B).
    """
    rows = shape[0] if len(shape) > 0 else 1
    numel = int(np.prod(shape)) if len(shape) > 0 else 1
    cols = numel // rows
    grid_cols, wanted = cols // block, k // block  # in blocks
    diag_len = min(rows, cols)
    if wanted <= diag_len:
        picks = torch.div(torch.arange(wanted) * diag_len, wanted, rounding_mode="floor")
        return _finish(expand_blocks(picks * grid_cols + picks // block, block), numel)
    diagonal = torch.arange(diag_len)
    parts = [diagonal * grid_cols + diagonal // block]
    remaining = wanted - diag_len
    for row in torch.randperm(rows, generator=generator).tolist():
        if remaining == 0:
            break
        columns = torch.arange(grid_cols)
        if row < diag_len:  # the diagonal entry (block) of this row is already taken
            columns = columns[columns != row // block]
        columns = columns[:remaining]
        parts.append(row * grid_cols + columns)
        remaining -= columns.numel()
    return _finish(expand_blocks(torch.cat(parts), block), numel)


def topk_mask(scores: torch.Tensor, k: int, block: int = 1) -> torch.Tensor:
    """The k entries with the largest score (flat scores of shape (numel,)).

    With ``block``: the k/B aligned blocks with the largest summed score (``scores.view(-1, B).sum(1)``).
    """
    if block > 1:
        summed = scores.reshape(-1, block).sum(1, dtype=torch.float64)  # (numel/B,)
        return _finish(expand_blocks(torch.topk(summed, k // block, sorted=False).indices, block), scores.numel())
    return _finish(torch.topk(scores, k, sorted=False).indices, scores.numel())


def user_mask(result: Any, name: str, shape: tuple[int, ...], block: int = 1) -> torch.Tensor:
    """Check and normalise what a user mask function returned: flat indices or a boolean mask.

    With ``block`` > 1 the selected entries must form aligned runs of ``block`` (any number of them).

    Raises:
        ShiraError: wrong type or shape, an index out of range, duplicates, an empty mask, or (with
            ``block``) entries that are not whole aligned runs.
    """
    numel = int(np.prod(shape))
    where = f"mask function for '{name}' (shape {tuple(shape)})"
    tensor = torch.as_tensor(result) if not isinstance(result, torch.Tensor) else result.detach().cpu()
    if tensor.dtype == torch.bool:
        if tuple(tensor.shape) not in (tuple(shape), (numel,)):
            raise ShiraError(
                f"{where} returned a boolean mask of shape {tuple(tensor.shape)}; "
                f"a boolean mask must have the weight's shape {tuple(shape)} or ({numel},)"
            )
        flat = torch.nonzero(tensor.reshape(-1)).reshape(-1)
    elif not tensor.is_floating_point() and not tensor.is_complex():
        flat = tensor.reshape(-1).to(torch.int64)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= numel):
            raise ShiraError(
                f"{where} returned indices in [{int(flat.min())}, {int(flat.max())}]; "
                f"flat indices must lie in [0, {numel})"
            )
        if torch.unique(flat).numel() != flat.numel():
            raise ShiraError(f"{where} returned duplicate indices; return each flat index once")
    else:
        raise ShiraError(
            f"{where} returned a tensor of dtype {tensor.dtype}; return integer flat indices or a boolean mask"
        )
    if flat.numel() == 0:
        raise ShiraError(f"{where} selected no entries; select at least one")
    indices = _finish(flat, numel)
    if block > 1 and block_starts(indices, block) is None:
        raise ShiraError(
            f"{where} selected {indices.numel()} entries that are not whole aligned runs of block={block} "
            f"(every selected entry i needs all of [i // {block} * {block}, i // {block} * {block} + {block}) selected); "
            f"select whole blocks, e.g. with masks.expand_blocks(block_numbers, {block}), or attach with block=1"
        )
    return indices
