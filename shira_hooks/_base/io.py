"""Atomic file writes, safetensors reading, and the fingerprints that tie adapters and states to base weights."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import ShiraError


def umask() -> int:
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
        return 0o666 & ~umask()


def sync_folder(folder: Path) -> None:
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


@functools.lru_cache(maxsize=1)
def _host_tag() -> str:
    """8 hex characters naming this machine and pid namespace: whose process ids a temporary's name holds.

    A folder may be shared (NFS, a volume mounted in several containers): a process id means
    something only on the host, and in the pid namespace, that wrote it.
    """
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return hashlib.blake2b(f"{socket.gethostname()}:{namespace}".encode(), digest_size=4).hexdigest()


def temporary_prefix(path: Path) -> str:
    """The name prefix of a temporary written for ``path``: ``.<name>.<host>-<pid>-`` (a random part and ``.tmp`` follow)."""
    return f".{path.name}.{_host_tag()}-{os.getpid()}-"


def _running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie counts: it is not reaped yet)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, run by another user
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporaries that earlier saves to ``path`` left behind when they were killed.

    Only those provably stale are deleted: named by ``temporary_prefix`` for this very ``path`` on this
    host and pid namespace, by a process that no longer runs (not this one: another thread of it may
    be saving). Anything else, older-style names included, is left alone. Not on Windows, where
    ``os.kill`` cannot test a process without ending it.

    Returns:
        The paths deleted.
    """
    if os.name == "nt":
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{_host_tag()}-(\d+)-[a-z0-9_]+\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except FileNotFoundError:
        return []
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or int(match[1]) == os.getpid() or _running(int(match[1])):
            continue
        stale = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except FileNotFoundError:  # another save removed it first
            continue
        removed.append(stale)
    return removed


def atomic_write(path: str | os.PathLike, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` so that a crash or error mid-write leaves any old file intact.

    The bytes go to a temporary file in the same folder, are flushed to disk, and then replace
    ``path`` in one ``os.replace`` (atomic on POSIX and Windows); the folder is then synced so the
    rename itself is durable. Permissions are those ``open(path, "w")`` gives: an existing file
    keeps its mode, a new one gets 0o666 minus the umask (``mkstemp``'s 0o600 would survive the rename).
    A process killed mid-write cannot delete its temporary (``.<name>.<host>-<pid>-<random>.tmp``):
    the next write to ``path`` deletes those whose process no longer runs (``remove_stale_temporaries``).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    mode = _new_file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
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
    sync_folder(path.parent)
    return path


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor (any dtype, bfloat16 included), without a copy if contiguous."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data  # a memoryview of the array's buffer


def digest(tensor: torch.Tensor, size: int = 8) -> str:
    """The blake2b hex digest of a tensor's raw little-endian bytes: the fingerprint adapters and states use.

    Bit-exact: two tensors of one dtype have the same digest exactly when their values are the same bits
    in row-major order (``-0.0`` differs from ``0.0``). An adapter's ``SparseDelta.fingerprint`` is
    ``digest(base_weight.reshape(-1)[indices])`` in the base dtype.

    Args:
        tensor: any tensor (any dtype and device; it is copied to the CPU if needed).
        size: digest length in bytes (8: 16 hex characters, as in adapter files).

    Returns:
        ``2 * size`` hex characters.

    Example:
        >>> before = shira_hooks.digest(model.lm_head.weight)
        >>> ...  # train with a handle attached
        >>> shira_hooks.digest(model.lm_head.weight) == before   # a frozen weight is bit for bit the same
        True
    """
    return hashlib.blake2b(tensor_bytes(tensor), digest_size=size).hexdigest()


def read_safetensors(
    path: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
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
        raise ShiraError(
            f"{where}: device={device!r} is not a torch device ({error}); pass e.g. 'cpu' or 'cuda:0'"
        ) from None
    size = os.stat(path).st_size  # FileNotFoundError as before; the size explains the errors below
    if size < 8:
        raise ShiraError(f"{where}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
    try:
        with safe_open(path, framework="pt", device=str(device)) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open has keys() but is not iterable)
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
    return ShiraError(
        f"{where}: not a safetensors file or truncated ({size} bytes, header unreadable: {detail}); {fix}"
    )
