"""Mask selection: which k entries of a weight SHiRA trains (paper §3.1).

Every function here returns the mask as sorted, unique flat indices into ``weight.view(-1)``,
never as a dense boolean tensor. ``index_dtype`` says which integer type they are stored in.

Block masks (``block=B`` > 1): the mask is made of aligned runs of B consecutive entries of a row,
``[j * B, (j + 1) * B)`` for block numbers j, with B dividing the row length of the weight's
``(shape[0], -1)`` view, so a run never straddles two rows. B=16 is one 64-byte cache line of a
float32 weight (B=32 in bfloat16): writing a run touches one line, where 16 scattered entries touch
up to 16. Every kind chooses blocks the way it chooses entries; the budget is rounded to whole
blocks (``budget``).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .errors import ShiraError

MASK_KINDS = ("struct", "rand", "wm", "grad", "snip")
CALIBRATED_KINDS = ("grad", "snip")

MaskFn = Callable[[str, torch.Tensor], Any]


def check_sparsity(sparsity: Any) -> None:
    """A ShiraError unless ``sparsity`` is a number in (0, 1]."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
        raise ShiraError(f"sparsity={sparsity!r} is outside (0, 1]; it is the fraction of each weight that trains, e.g. 0.01")


def budget(numel: int, sparsity: float, block: int = 1) -> int:
    """Number of trainable entries for a weight of ``numel`` entries: ``block`` * round(sparsity * numel / block).

    Rounds to the nearest whole block, half up (``int(x + 0.5)``), keeps at least one block and
    never exceeds ``numel`` (``block`` divides ``numel``). With block=1: round(sparsity * numel), >= 1.
    For example a 576x576 weight at 1%: 3318 entries; with block=16, 207 blocks = 3312 entries.
    """
    blocks = numel // block
    return block * min(blocks, max(1, int(sparsity * numel / block + 0.5)))


def row_length(shape: tuple[int, ...]) -> int:
    """Length of a row of the weight's ``(shape[0], -1)`` view (1 for a scalar)."""
    numel = int(np.prod(shape)) if len(shape) > 0 else 1
    return numel // shape[0] if len(shape) > 0 and shape[0] > 0 else numel


def check_block(block: Any) -> None:
    """A ShiraError unless ``block`` is a positive int."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ShiraError(f"block={block!r}; it must be a positive int: the length of the aligned runs a mask is made of (1 = single entries, 16 = a 64-byte line of float32)")


def check_block_fits(block: int, name: str, shape: tuple[int, ...]) -> None:
    """A ShiraError, naming the weight, unless ``block`` divides the row length of its (shape[0], -1) view."""
    cols = row_length(shape)
    if cols % block:
        valid = [b for b in range(1, min(cols, 64) + 1) if cols % b == 0]
        raise ShiraError(
            f"block={block} does not divide the row length {cols} of weight '{name}' (shape {tuple(shape)}, viewed as "
            f"({shape[0] if shape else 1}, {cols})), so its runs would straddle rows. Valid blocks for it: {valid}"
            f"{' and larger divisors of ' + str(cols) if cols > 64 else ''}; pick one that divides every target's row "
            f"length, or narrow target_modules"
        )


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


def lora_rank(shapes: Iterable[tuple[int, ...]], sparsity: float) -> int:
    """The LoRA rank whose ``r * (out + in)`` parameters over these (out, in) weights come closest to
    their SHiRA budget (``budget`` per weight), at least 1: how benchmarks compare at equal size."""
    check_sparsity(sparsity)
    shapes = [tuple(s) for s in shapes]
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ShiraError(f"lora_rank() needs one or more (out, in) weight shapes, got {shapes!r}; pass Linear weight shapes such as [(576, 576)]")
    entries = sum(budget(out * inp, sparsity) for out, inp in shapes)
    return max(1, round(entries / sum(out + inp for out, inp in shapes)))


def index_dtype(numel: int) -> torch.dtype:
    """int32 where every flat index fits (numel < 2**31), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


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


def fixed_mask(mask: str | MaskFn, name: str, weight: torch.Tensor, k: int, seed: int, block: int = 1) -> torch.Tensor:
    """The mask of a weight for the kinds that need no calibration data: struct, rand, wm, a function."""
    shape, numel = tuple(weight.shape), weight.numel()
    if callable(mask):
        return user_mask(mask(name, weight), name, shape, block)
    if mask == "struct":
        return struct_mask(shape, k, generator_for(seed, name), block)
    if mask == "rand":
        return rand_mask(numel, k, generator_for(seed, name), block)
    return topk_mask(weight.reshape(-1).abs(), k, block)  # "wm"


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
            f"{where} returned a tensor of dtype {tensor.dtype}; return integer flat indices "
            f"or a boolean mask"
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
