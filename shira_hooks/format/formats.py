"""Where adapters are stored: the formats, and the one dispatch that picks a format for a path.

Three formats, each one ``Format`` defined by the module that implements it and registered by
``format/__init__`` in the order they are recognised:

* ``peft`` (``peft.py``): a PEFT SHiRA folder, recognised by its ``adapter_config.json``
  (``SparseAdapter.to_peft`` / ``from_peft``);
* ``folder`` (``hub.py``): any other folder, a Hub-style one (``save_pretrained`` / ``from_pretrained`` /
  ``push_to_hub``);
* ``file`` (``adapter.py``): a single safetensors file (``SparseAdapter.save`` / ``load``).

``read(path)`` is the one place that decides how a path is read: ``SparseAdapter.load``, ``as_adapter``
(and so ``apply``, ``fuse``, ``overlap``, ``MixedAdapters``, ``AdapterBank``) and the command line go
through it. ``write(adapter, path)`` picks a format from the path's name (the command line's ``-o``).
The ``SparseAdapter`` methods of a format call its ``Format`` here, so the modules of this subpackage
import one way: ``hub`` and ``peft`` import ``adapter``, never the reverse, and this module imports none.

Adding a format: a module that defines its ``Format`` (reading with the ``SparseAdapter`` checks), and
one ``register`` line in ``format/__init__``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ShiraError


@dataclass(frozen=True)
class Format:
    """One way to store an adapter.

    Attributes:
        name: "file", "folder", "peft", ...
        recognises: ``(existing path) -> bool``: whether ``read`` should read the path with this format
            (asked in registration order; the first that says yes reads it).
        read: ``(path, *, device, **options) -> SparseAdapter``, validated.
        write: ``(adapter, path, **options) -> Path``, the path written.
        upload: ``(adapter, repo_id, **options)``: writes the format and uploads it (a Hub folder), or None.
    """

    name: str
    recognises: Callable[[Path], bool]
    read: Callable[..., Any]
    write: Callable[..., Path]
    upload: Callable[..., Any] | None = None


_FORMATS: list[Format] = []  # in the order read() asks them


def register(fmt: Format) -> None:
    """Add ``fmt`` (last in the order ``read`` asks; one per name)."""
    if any(known.name == fmt.name for known in _FORMATS):
        raise ShiraError(f"an adapter format named {fmt.name!r} is registered already")
    _FORMATS.append(fmt)


def get(name: str) -> Format:
    """The registered format ``name``."""
    for fmt in _FORMATS:
        if fmt.name == name:
            return fmt
    raise ShiraError(f"unknown adapter format {name!r}; the formats are {', '.join(f.name for f in _FORMATS)}")


def read(path: str | os.PathLike, *, device: Any = "cpu") -> Any:
    """The adapter stored at ``path``: a file, a ``save_pretrained`` folder or a PEFT SHiRA folder.

    Args:
        path: a file or a folder.
        device: where the indices and values are loaded.

    Returns:
        A validated ``SparseAdapter``.

    Raises:
        FileNotFoundError: nothing at ``path``.
        ShiraError: as the format's reader raises it (naming the file and the problem).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such adapter file or folder")
    return next(fmt for fmt in _FORMATS if fmt.recognises(path)).read(path, device=device)


def write(adapter: Any, path: str | os.PathLike) -> Path:
    """Write ``adapter`` to ``path``: a ``.safetensors`` path gets one file, anything else a Hub-style folder.

    Returns:
        The path written.
    """
    return get("file" if Path(path).suffix == ".safetensors" else "folder").write(adapter, Path(path))
