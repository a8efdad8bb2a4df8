"""The training modes: how the masked entries of a target weight train (``attach(mode=...)``).

One class per mode, following the ``Mode`` protocol (``train/target.py``, beside the ``Target`` that
holds a mode object); ``MODES`` maps each ``mode=`` name to its class, as ``masks.KINDS`` maps mask names.

* ``dense.py``: ``Dense``, the gradient hook masks the weight's dense gradient (any layer type);
* ``compact.py``: ``Compact``, the k entries are a parameter ``<layer>.shira_values`` of shape (k,) with a
  tap on the layer's output for their gradient (``nn.Linear``);
* ``sparse.py``: ``Sparse``, the compact mode with only the k masked entries of ``dY^T X`` computed;
* ``read_check.py``: the first-forward check of the compact modes (a weight read without calling its layer).

Adding a mode is one new file with its class, and one entry in ``MODES``.
"""

from __future__ import annotations

from ...errors import ShiraError
from ..target import Mode
from .compact import VALUES, Compact
from .dense import Dense
from .sparse import Sparse

MODES: dict[str, type[Mode]] = {mode.name: mode for mode in (Dense, Compact, Sparse)}


def mode_class(name: object) -> type[Mode]:
    """The class of ``attach``'s ``mode=name``.

    Raises:
        ShiraError: an unknown name.
    """
    mode = MODES.get(name) if isinstance(name, str) else None
    if mode is None:
        names = [repr(known) for known in MODES]
        raise ShiraError(f"unknown mode={name!r}; use {', '.join(names[:-1])} or {names[-1]}")
    return mode


__all__ = ["MODES", "VALUES", "Compact", "Dense", "Mode", "Sparse", "mode_class"]
