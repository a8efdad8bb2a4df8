"""Atomic file writes, safetensors reading, and the fingerprints that tie adapters and states to base weights."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from .errors import ShiraError


def _umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux /proc)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    # Elsewhere the only way to read it is to set it and put it back (briefly process-wide).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _new_file_mode(path: Path) -> int:
    """The permission bits ``open(path, "w")`` would leave: the existing file's, or 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _sync_folder(folder: Path) -> None:
    """fsync a folder so that a rename into it survives a crash (POSIX; Windows cannot open folders)."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # a filesystem without folder fsync
            raise
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` so that a crash or error mid-write leaves any old file intact.

    The bytes go to a temporary file in the same folder, are flushed to disk, and then replace
    ``path`` in one ``os.replace`` (atomic on POSIX and Windows); the folder is then synced so the
    rename itself is durable. Permissions are those ``open(path, "w")`` gives: an existing file
    keeps its mode, a new one gets 0o666 minus the umask (``mkstemp``'s 0o600 would survive the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            os.chmod(tmp, mode)
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _sync_folder(path.parent)
    return path


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (any dtype, bfloat16 included), without a copy if contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def digest(tensor: torch.Tensor, size: int = 8) -> str:
    """blake2b hex digest of a tensor's raw bytes (``size`` bytes long)."""
    return hashlib.blake2b(tensor_bytes(tensor), digest_size=size).hexdigest()

def read_safetensors(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The (metadata, tensors) of a safetensors file, memory-mapped through ``safe_open``.

    Shared by ``SparseAdapter.load`` and ``ShiraHandle.load_state``, which validate the content.

    Raises:
        FileNotFoundError: no file at ``path``.
        ShiraError: naming the file, for a file safetensors cannot parse (not safetensors,
            truncated, corrupt), or a ``device`` torch does not know.
    """
    where = str(path)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ShiraError(f"{where}: device={device!r} is not a torch device ({error}); pass e.g. 'cpu' or 'cuda:0'") from None
    size = os.stat(path).st_size  # FileNotFoundError as before; the size explains the errors below
    if size < 8:
        raise ShiraError(f"{where}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
    try:
        with safe_open(path, framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except SafetensorError as error:
        raise _unreadable(where, size, device, error) from None
    return metadata, tensors


def _unreadable(where: str, size: int, device: torch.device, error: Exception) -> ShiraError:
    """A ShiraError for what ``safe_open`` rejected: the header, the data it describes, or the device."""
    detail = str(error)
    fix = "it was not written by shira_hooks or was cut short (an interrupted copy); copy or save it again"
    if not detail.startswith("Error while deserializing header"):
        return ShiraError(f"{where}: safetensors could not load it on device '{device}' ({detail}); load it on 'cpu'")
    detail = detail.removeprefix("Error while deserializing header: ")
    # the header parsed, but the tensor bytes it lists do not fill the file (older safetensors: the enum name)
    if "not fully covered" in detail or "MetadataIncompleteBuffer" in detail:
        return ShiraError(f"{where}: truncated or corrupt safetensors file ({size} bytes: {detail}); {fix}")
    return ShiraError(f"{where}: not a safetensors file or truncated ({size} bytes, header unreadable: {detail}); {fix}")
