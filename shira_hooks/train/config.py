"""``Config``: the settings a handle was attached with, as one frozen value.

What ``attach`` was asked for (mask, sparsity, seed, mode, block, calibration steps, DoRA), checked by ``attach``
before a ``Config`` is made. The handle's resumable state (``state``) is written from its targets and its
``Config``; loading a state gives a new ``Config`` (``dataclasses.replace``) with the mask, sparsity and
seed of the run that saved it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import masks


@dataclass(frozen=True)
class Config:
    """The settings of one attached handle.

    Attributes:
        mask: a mask name (``masks.KINDS``) or a mask function ``(name, weight) -> indices``.
        sparsity: the fraction of each target weight that trains, in (0, 1].
        seed: seeds ``rand`` and ``struct`` (per weight, mixed with its name).
        mode: the training mode's name (``modes.MODES``).
        block: masks are aligned runs of ``block`` entries of a row (``masks.indices``).
        calibration_steps: backward passes that score a lazily calibrated grad/snip mask.
        dora: the masked entries train weight-decomposed (SHiRA-DoRA, ``modes.dora``).
        dora_rank: with ``dora``: None for the k trainable entries of the direction, or the rank of its
            low-rank factors.
    """

    mask: str | masks.MaskFn
    sparsity: float
    seed: int
    mode: str = "dense"
    block: int = 1
    calibration_steps: int = 8
    dora: bool = False
    dora_rank: int | None = None

    @property
    def mask_name(self) -> str:
        """The mask's name, ``"custom"`` for a function (what files and states record)."""
        return self.mask if isinstance(self.mask, str) else "custom"

    def budget(self, numel: int) -> int:
        """k of a weight of ``numel`` entries; 0 for a mask function (its result sets k)."""
        return masks.budget(numel, self.sparsity, self.block) if isinstance(self.mask, str) else 0

    def picklable(self) -> Config:
        """This config with a mask function replaced by ``"custom"`` (a function may not pickle; a copy's
        masks are fixed already, so it never calls it)."""
        return self if isinstance(self.mask, str) else dataclasses.replace(self, mask="custom")
