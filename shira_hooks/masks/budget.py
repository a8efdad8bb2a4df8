"""The budget rule: how many entries of a weight train (paper §3.1), and the checks on its arguments."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ShiraError
from .indices import row_length


def check_sparsity(sparsity: Any) -> None:
    """A ShiraError unless ``sparsity`` is a number in (0, 1]."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 < sparsity <= 1:
        raise ShiraError(
            f"sparsity={sparsity!r} is outside (0, 1]; it is the fraction of each weight that trains, e.g. 0.01"
        )


def budget(numel: int, sparsity: float, block: int = 1) -> int:
    """Number of trainable entries for a weight of ``numel`` entries: ``block`` * round(sparsity * numel / block).

    Rounds to the nearest whole block, half up (``int(x + 0.5)``), keeps at least one block and
    never exceeds ``numel`` (``block`` divides ``numel``). With block=1: round(sparsity * numel), >= 1.
    For example a 576x576 weight at 1%: 3318 entries; with block=16, 207 blocks = 3312 entries.
    """
    blocks = numel // block
    return block * min(blocks, max(1, int(sparsity * numel / block + 0.5)))


def check_block(block: Any) -> None:
    """A ShiraError unless ``block`` is a positive int."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ShiraError(
            f"block={block!r}; it must be a positive int: the length of the aligned runs a mask is made of (1 = single entries, 16 = a 64-byte line of float32)"
        )


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


def lora_rank(shapes: Iterable[tuple[int, ...]], sparsity: float) -> int:
    """The LoRA rank whose ``r * (out + in)`` parameters over these (out, in) weights come closest to
    their SHiRA budget (``budget`` per weight), at least 1: how benchmarks compare at equal size."""
    check_sparsity(sparsity)
    shapes = [tuple(s) for s in shapes]
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ShiraError(
            f"lora_rank() needs one or more (out, in) weight shapes, got {shapes!r}; pass Linear weight shapes such as [(576, 576)]"
        )
    entries = sum(budget(out * inp, sparsity) for out, inp in shapes)
    return max(1, round(entries / sum(out + inp for out, inp in shapes)))
