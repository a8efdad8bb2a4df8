"""Mask selection: which k entries of a weight SHiRA trains (paper §3.1).

Every function here returns the mask as sorted, unique flat indices into ``weight.view(-1)``,
never as a dense boolean tensor. ``index_dtype`` says which integer type they are stored in.
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


def budget(numel: int, sparsity: float) -> int:
    """Number of trainable entries for a weight of ``numel`` entries: round(sparsity * numel), at least 1.

    Rounds half up (``int(x + 0.5)``) and never exceeds ``numel``.
    """
    return min(numel, max(1, int(sparsity * numel + 0.5)))


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


def rand_mask(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """k entries drawn uniformly without replacement.

    For small k this samples with replacement, keeps the distinct draws and picks k of them at random
    (a uniform k-subset), so it never materialises a permutation of all ``numel`` entries.
    """
    if k * 4 > numel:
        return _finish(torch.randperm(numel, generator=generator)[:k], numel)
    draws = torch.empty(0, dtype=torch.int64)
    while draws.numel() < k:
        more = torch.randint(numel, (k + k // 8 + 16,), generator=generator)
        draws = torch.unique(torch.cat([draws, more]))
    keep = torch.randperm(draws.numel(), generator=generator)[:k]
    return _finish(draws[keep], numel)


def struct_mask(shape: tuple[int, ...], k: int, generator: torch.Generator) -> torch.Tensor:
    """SHiRA-Struct: the diagonal plus whole rows, sized to exactly k entries.

    The weight is viewed as a matrix (shape[0], numel // shape[0]). The diagonal (min(rows, cols)
    entries) makes the update high rank; whole rows, picked at random from ``generator``, add a
    rank-1-like block. The last row is filled only partly so that the count is exactly k. When k is
    smaller than the diagonal, k evenly spaced diagonal entries are used.
    """
    rows = shape[0] if len(shape) > 0 else 1
    numel = int(np.prod(shape)) if len(shape) > 0 else 1
    cols = numel // rows
    diag_len = min(rows, cols)
    if k <= diag_len:
        picks = torch.div(torch.arange(k) * diag_len, k, rounding_mode="floor")
        return _finish(picks * cols + picks, numel)
    parts = [torch.arange(diag_len) * (cols + 1)]
    remaining = k - diag_len
    for row in torch.randperm(rows, generator=generator).tolist():
        if remaining == 0:
            break
        columns = torch.arange(cols)
        if row < diag_len:  # the diagonal entry of this row is already taken
            columns = columns[columns != row]
        columns = columns[:remaining]
        parts.append(row * cols + columns)
        remaining -= columns.numel()
    return _finish(torch.cat(parts), numel)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k entries with the largest score (flat scores of shape (numel,))."""
    return _finish(torch.topk(scores, k, sorted=False).indices, scores.numel())


def fixed_mask(mask: str | MaskFn, name: str, weight: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """The mask of a weight for the kinds that need no calibration data: struct, rand, wm, a function."""
    shape, numel = tuple(weight.shape), weight.numel()
    if callable(mask):
        return user_mask(mask(name, weight), name, shape)
    if mask == "struct":
        return struct_mask(shape, k, generator_for(seed, name))
    if mask == "rand":
        return rand_mask(numel, k, generator_for(seed, name))
    return topk_mask(weight.reshape(-1).abs(), k)  # "wm"


def user_mask(result: Any, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Check and normalise what a user mask function returned: flat indices or a boolean mask.

    Raises:
        ShiraError: wrong type or shape, an index out of range, duplicates, or an empty mask.
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
    return _finish(flat, numel)
