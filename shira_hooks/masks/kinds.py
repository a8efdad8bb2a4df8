"""The mask kinds: one ``MaskKind`` per value of ``attach(mask=...)``, in the registry ``KINDS``.

Everything that depends on the kind of a mask asks its ``MaskKind`` instead of comparing names: whether
it is scored on gradients (``needs_scores``: calibration), whether choosing it reads the weight's values
(``reads_values``: under FSDP2 the full weight is gathered first), whether it draws from the seed
(``seeded``: every rank must agree on the seed). Adding a kind is adding one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ShiraError
from .select import MaskFn, generator_for, rand_mask, struct_mask, topk_mask, user_mask

# (name, weight, k, seed, block) -> (k,) sorted flat indices: the kinds chosen without calibration data
Select = Callable[[str, torch.Tensor, int, int, int], torch.Tensor]
# (scores, weight) -> per-entry scores, both (numel,) in logical order: the kinds scored on gradients.
# ``scores`` holds sum_b |dL/dW_b| over the calibration passes and may be changed in place.
Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MaskKind:
    """One way of choosing the k entries of a weight that train.

    Attributes:
        name: the value of ``attach(mask=...)``.
        summary: what it chooses, for help texts.
        needs_scores: chosen from gradient scores (eager ``calibration=`` batches, or the first backward
            passes of training); ``score`` turns the accumulated ``sum |g|`` into the score ranked.
        reads_values: choosing reads the weight's values (not only its shape).
        seeded: draws from the seed, so every process of a distributed run needs the same one.
        select: the chooser of a kind without scores.
        score: the scoring of a kind with scores.
    """

    name: str
    summary: str
    needs_scores: bool = False
    reads_values: bool = False
    seeded: bool = False
    select: Select | None = None
    score: Score | None = None


def _struct(name: str, weight: torch.Tensor, k: int, seed: int, block: int) -> torch.Tensor:
    return struct_mask(tuple(weight.shape), k, generator_for(seed, name), block)


def _rand(name: str, weight: torch.Tensor, k: int, seed: int, block: int) -> torch.Tensor:
    return rand_mask(weight.numel(), k, generator_for(seed, name), block)


def _weight_magnitude(name: str, weight: torch.Tensor, k: int, seed: int, block: int) -> torch.Tensor:
    return topk_mask(weight.reshape(-1).abs(), k, block)


def _gradient(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scores


def _snip(scores: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return scores.mul_(weight.reshape(-1)).abs_()  # sum_b |W * g_b| = |W * sum_b |g_b|| while W is fixed


KINDS: dict[str, MaskKind] = {
    kind.name: kind
    for kind in (
        MaskKind("struct", "the diagonal plus whole rows (SHiRA-Struct)", seeded=True, select=_struct),
        MaskKind("rand", "uniform at random, from the seed", seeded=True, select=_rand),
        MaskKind("wm", "the k largest |W|", reads_values=True, select=_weight_magnitude),
        MaskKind("grad", "the k largest sum |dL/dW|", needs_scores=True, score=_gradient),
        MaskKind("snip", "the k largest |W * sum dL/dW|", needs_scores=True, reads_values=True, score=_snip),
    )
}
MASK_KINDS = tuple(KINDS)  # the names, for choices= of a command line
CALIBRATED_KINDS = tuple(name for name, kind in KINDS.items() if kind.needs_scores)


def kind_of(mask: str | MaskFn) -> MaskKind:
    """The ``MaskKind`` of ``attach``'s ``mask``: a registered name, or a mask function (``custom``: it reads
    the weight, needs no scores and no seed; what it returns is checked by ``select.user_mask``).

    Raises:
        ShiraError: an unknown name.
    """
    if callable(mask):
        return MaskKind(
            "custom",
            "a function (name, weight) -> indices or a bool mask",
            reads_values=True,
            select=lambda name, weight, k, seed, block: user_mask(mask(name, weight), name, tuple(weight.shape), block),
        )
    kind = KINDS.get(mask) if isinstance(mask, str) else None
    if kind is None:
        raise ShiraError(
            f"unknown mask={mask!r}; use one of {', '.join(MASK_KINDS)} or a function (name, weight) -> indices"
        )
    return kind
