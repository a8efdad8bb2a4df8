"""Atomic file writes and the fingerprints used to tie adapters and states to base weights."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` so that a crash or error mid-write leaves any old file intact.

    The bytes go to a temporary file in the same folder, are flushed to disk, and then replace
    ``path`` in one ``os.replace`` (atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (any dtype, bfloat16 included), without a copy if contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def digest(tensor: torch.Tensor, size: int = 8) -> str:
    """blake2b hex digest of a tensor's raw bytes (``size`` bytes long)."""
    return hashlib.blake2b(tensor_bytes(tensor), digest_size=size).hexdigest()
