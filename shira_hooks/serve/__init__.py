"""Serving: adapters written into a model (``apply``), combined (``fuse``), kept by name (``AdapterBank``),
packed for fast switching (``pack``), or mixed per batch row without writing (``MixedAdapters``).

* ``switch``: ``apply`` / ``remove`` / ``applied`` / ``check`` / ``clear_cache``;
* ``state``: the per-model switching state (weights, applied adapters, per-adapter caches, a lock);
* ``plan``: the switch plan of a whole-model switch, prepared once;
* ``packing``: ``pack`` / ``PackedWeights`` (target weights as views of a few arenas);
* ``fusion``: ``fuse`` and ``overlap``;
* ``bank``: ``AdapterBank``;
* ``mixed``: ``MixedAdapters`` (one adapter per batch row).

Imports ``format``, ``masks``, ``distributed`` and ``_base``; nothing of ``train``.
"""

from .bank import AdapterBank
from .fusion import Overlap, fuse, overlap
from .mixed import MixedAdapters
from .packing import PackedWeights, pack
from .state import KEEP_RECENT
from .switch import AppliedAdapter, applied, apply, check, clear_cache

__all__ = [
    "apply",
    "AppliedAdapter",
    "applied",
    "check",
    "clear_cache",
    "KEEP_RECENT",
    "fuse",
    "overlap",
    "Overlap",
    "AdapterBank",
    "pack",
    "PackedWeights",
    "MixedAdapters",
]
