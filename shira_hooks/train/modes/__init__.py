"""The training modes: how the masked entries of a target weight train (``attach(mode=...)``).

One class per mode, following the ``Mode`` protocol (``train/target.py``, beside the ``Target`` that
holds a mode object); ``MODES`` maps each ``mode=`` name to its class, as ``masks.KINDS`` maps mask names.

* ``dense.py``: ``Dense``, the gradient hook masks the weight's dense gradient (any layer type);
* ``compact.py``: ``Compact``, the k entries are a parameter ``<layer>.shira_values`` of shape (k,) with a
  tap on the layer's output for their gradient (``nn.Linear``);
* ``sparse.py``: ``Sparse``, the compact mode with only the k masked entries of ``dY^T X`` computed;
* ``dora.py``: ``DoraCompact`` and ``DoraSparse``, ``attach(..., dora=True)``: the compact modes with the masked
  entries trained weight-decomposed (SHiRA-DoRA);
* ``read_check.py``: the first-forward check of the compact modes (a weight read without calling its layer).

Adding a mode is one new file with its class, and one entry in ``MODES`` (a DoRA variant: in ``DORA``).
"""

from __future__ import annotations

from ...errors import ShiraError
from ..target import Mode
from .compact import VALUES, Compact
from .dense import Dense
from .dora import DoraCompact, DoraSparse
from .sparse import Sparse

MODES: dict[str, type[Mode]] = {mode.name: mode for mode in (Dense, Compact, Sparse)}
# attach(mode=name, dora=True): the SHiRA-DoRA variant of each mode that has one
DORA: dict[str, type[Mode]] = {mode.name: mode for mode in (DoraCompact, DoraSparse)}


def mode_class(name: object, dora: bool = False) -> type[Mode]:
    """The class of ``attach``'s ``mode=name`` (with ``dora``: its SHiRA-DoRA variant).

    Raises:
        ShiraError: an unknown name, or ``dora`` with a mode that has no DoRA variant.
    """
    mode = MODES.get(name) if isinstance(name, str) else None
    if mode is None:
        names = [repr(known) for known in MODES]
        raise ShiraError(f"unknown mode={name!r}; use {', '.join(names[:-1])} or {names[-1]}")
    if dora:
        variant = DORA.get(mode.name)
        if variant is None:
            variants = " or ".join(f"mode={known!r}" for known in DORA)
            raise ShiraError(
                f"dora=True needs the masked entries as parameters of their own, which mode={name!r} does not make; "
                f"use {variants}"
            )
        return variant
    return mode


__all__ = ["DORA", "MODES", "VALUES", "Compact", "Dense", "DoraCompact", "DoraSparse", "Mode", "Sparse", "mode_class"]
