"""``AdapterBank``: named adapters for one model, switched in the fused mode (the serving case)."""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Mapping, Sequence

from torch import nn

from ..errors import ShiraError
from ..format import SparseAdapter, as_adapter
from .packing import PackedWeights, pack_parameters, packed_owners
from .switch import AppliedAdapter, apply, find_module


class AdapterBank:
    """Keeps adapters by name and switches the model between them.

    Each adapter is verified and precomputed the first time it is activated. With ``pack=True`` (the
    default) the bank packs the weights its adapters write (``shira_hooks.pack``) when it is built and
    when ``add`` brings new ones, so that a switch is one ``index_copy_`` per arena and direction
    (restore the previous adapter's entries, write the next one's); with ``pack=False`` it is one per
    weight and direction. The precomputation is kept for the active adapters and the
    ``shira_hooks.serve.KEEP_RECENT`` (4) most recently deactivated ones; switching back to an
    older one reads its base values again (no re-hash). Raise ``shira_hooks.serve.state.KEEP_RECENT`` to keep more.

    ``close()`` (or leaving a ``with`` block) deactivates every adapter and unpacks what the bank packed:
    the model's weights are then the base again, each in storage of its own.

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

    def __init__(
        self,
        model: nn.Module,
        adapters: Mapping[str, SparseAdapter | str | os.PathLike] | None = None,
        *,
        pack: bool = True,
        chunk_mb: float = 256,
    ):
        self.model = model
        self.lock = threading.RLock()  # held by add, activate, deactivate and close
        self.adapters: dict[str, SparseAdapter] = {}
        self.pack, self.chunk_mb = pack, chunk_mb
        self.packed: list[PackedWeights] = []  # what this bank packed (``close`` unpacks it)
        self._handles: list[tuple[str, AppliedAdapter]] = []
        loaded = {name: self._load(adapter) for name, adapter in (adapters or {}).items()}
        self._pack(loaded.values())
        for name, adapter in loaded.items():
            self.adapters[name] = adapter

    @staticmethod
    def _load(adapter: SparseAdapter | str | os.PathLike) -> SparseAdapter:
        return as_adapter(adapter, where="AdapterBank")

    def _pack(self, adapters) -> None:
        """Pack the weights these adapters write that nothing has packed yet (all in one ``pack``)."""
        if not self.pack:
            return
        targets: list[tuple[str, nn.Module, str, nn.Parameter]] = []
        seen: set[str] = set()
        packed = packed_owners(self.model)
        for adapter in adapters:
            for name in adapter.deltas:
                module = find_module(self.model, name)
                attr = name.rsplit(".", 1)[-1]
                if (
                    module is None
                    or (param := module._parameters.get(attr)) is None
                    or name in seen
                    or id(param) in packed
                ):
                    continue  # missing weights are apply's to report; packed ones stay where they are
                seen.add(name)
                targets.append((name, module, attr, param))
        if not targets:
            return
        try:
            self.packed.append(pack_parameters(self.model, targets, self.chunk_mb))
        except ShiraError as error:  # the bank still switches, one write per weight
            warnings.warn(
                f"AdapterBank: the weights were not packed ({error}); switching writes each weight on its own. "
                f"Pass pack=False to switch unpacked without this warning",
                UserWarning,
                stacklevel=3,
            )

    def add(self, name: str, adapter: SparseAdapter | str | os.PathLike) -> None:
        """Register an adapter object, or load one from a file (and pack its weights, with ``pack=True``)."""
        loaded = self._load(adapter)
        with self.lock:
            self._pack([loaded])
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

    def close(self) -> None:
        """Deactivate every adapter and unpack the weights the bank packed (each its own storage again)."""
        with self.lock:
            self.deactivate()
            while self.packed:
                self.packed.pop().unpack()

    def __enter__(self) -> AdapterBank:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
