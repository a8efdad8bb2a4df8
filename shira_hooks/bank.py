"""``AdapterBank``: named adapters for one model, switched in the fused mode (the serving case)."""

from __future__ import annotations

import os
import threading
from typing import Mapping, Sequence

from torch import nn

from .adapter import SparseAdapter
from .errors import ShiraError
from .switch import AppliedAdapter, apply


class AdapterBank:
    """Keeps adapters by name and switches the model between them.

    Each adapter is verified and precomputed the first time it is activated; after that a switch
    costs one ``index_copy_`` per weight to restore the previous adapter's entries and one to write
    the next one's. The precomputation is kept for the active adapters and the
    ``shira_hooks.switch.KEEP_RECENT`` (4) most recently deactivated ones; switching back to an
    older one reads its base values again (no re-hash). Raise ``KEEP_RECENT`` to keep more.

    Threads: ``add``, ``activate`` and ``deactivate`` hold the bank's lock, so each is atomic and
    the bank's record of what is active stays true. The lock does not keep the model in a given
    state between calls: a request that needs an adapter active during its forward pass must hold
    ``bank.lock`` around ``activate`` and the forward (or use one model per worker).

    Example:
        >>> bank = AdapterBank(model, {"paint": "paint.safetensors", "knight": knight_adapter})
        >>> bank.activate("paint")
        >>> bank.activate(["paint", "knight"], alpha=[1.0, 0.5])  # stacked
        >>> bank.deactivate()                                    # the base model again
    """

    def __init__(self, model: nn.Module, adapters: Mapping[str, SparseAdapter | str | os.PathLike] | None = None):
        self.model = model
        self.lock = threading.RLock()  # held by add, activate and deactivate
        self.adapters: dict[str, SparseAdapter] = {}
        self._handles: list[tuple[str, AppliedAdapter]] = []
        for name, adapter in (adapters or {}).items():
            self.add(name, adapter)

    def add(self, name: str, adapter: SparseAdapter | str | os.PathLike) -> None:
        """Register an adapter object, or load one from a file."""
        loaded = adapter if isinstance(adapter, SparseAdapter) else SparseAdapter.load(adapter)
        with self.lock:
            self.adapters[name] = loaded

    @property
    def active(self) -> list[str]:
        """Names of the active adapters, in the order they were applied."""
        with self.lock:
            return [name for name, _ in self._handles]

    def activate(self, names: str | Sequence[str], alpha: float | Sequence[float] = 1.0) -> None:
        """Make exactly ``names`` active (with strengths ``alpha``), replacing what was active.

        Raises:
            ShiraError: an unknown name, or an adapter that does not match the model; the previously
                active adapters are then active again.
        """
        with self.lock:
            names = [names] if isinstance(names, str) else list(names)
            alphas = [alpha] * len(names) if isinstance(alpha, (int, float)) else list(alpha)
            unknown = [n for n in names if n not in self.adapters]
            if unknown:
                raise ShiraError(f"unknown adapter name(s) {unknown}; the bank has {sorted(self.adapters)}")
            if len(alphas) != len(names):
                raise ShiraError(f"{len(names)} adapters but {len(alphas)} alphas; give one alpha per adapter")
            previous = [(name, handle.alpha) for name, handle in self._handles]
            self.deactivate()
            try:
                for name, strength in zip(names, alphas):
                    self._handles.append((name, apply(self.model, self.adapters[name], strength)))
            except BaseException:
                self.deactivate()
                for name, strength in previous:
                    self._handles.append((name, apply(self.model, self.adapters[name], strength)))
                raise

    def deactivate(self) -> None:
        """Remove every active adapter: the model's weights are the base again, bit for bit."""
        with self.lock:
            while self._handles:
                self._handles.pop()[1].remove()
