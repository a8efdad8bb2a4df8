"""``WeakIdTable``: the one table keyed weakly by object identity that shira_hooks uses.

State that describes a model, a module or a parameter is kept in such tables (the switching state of
a model, the packing of a module, the ``requires_grad`` claims on a parameter, ...), so that nothing
here keeps those objects alive: an entry goes when its key is freed. Keys are compared by identity,
which tensors need (``==`` on tensors compares values).
"""

from __future__ import annotations

import weakref
from typing import Any, Generic

from typing_extensions import TypeVar  # a TypeVar default (typing has it from Python 3.13)

K = TypeVar("K", default=object)
V = TypeVar("V", default=Any)  # a table declared without types gives untyped values


class WeakIdTable(Generic[K, V]):
    """A table keyed weakly by object identity: an entry goes when its key is freed (values must not
    refer to their keys, or the key is never freed). Like ``torch.utils.weak.WeakIdKeyDictionary``,
    whose lookups cost several times more, and ``apply`` makes a few on every call."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[weakref.ref, V]] = {}  # id(key) -> (weak key, value)

    def get(self, key: K) -> V | None:
        """The value stored for ``key``, or None."""
        entry = self.entries.get(id(key))
        return entry[1] if entry is not None and entry[0]() is key else None

    def set(self, key: K, value: V) -> None:
        table, ident = weakref.ref(self), id(key)  # the callback must hold neither the table nor the key

        def forget(ref: weakref.ref) -> None:
            owner = table()
            if owner is not None and owner.entries.get(ident, (None,))[0] is ref:
                del owner.entries[ident]

        self.entries[id(key)] = (weakref.ref(key, forget), value)

    def pop(self, key: K) -> V | None:
        """Remove ``key``'s entry; returns its value, or None when there was none."""
        value = self.get(key)
        if value is not None:
            del self.entries[id(key)]
        return value

    def items(self) -> list[tuple[K, V]]:
        """The live (key, value) pairs."""
        return [(key, value) for ref, value in list(self.entries.values()) if (key := ref()) is not None]
