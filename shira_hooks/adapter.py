"""``SparseAdapter``: the sparse deltas S = W_new - W of a SHiRA run, and their safetensors file.

File format (version 1), one safetensors file, no pickle:

* for every adapted weight ``<name>`` (its parameter name in the model, e.g.
  ``model.layers.0.self_attn.q_proj.weight``) two 1-D tensors of equal length k:
  ``<name>.indices`` (I32, or I64 when the weight has 2**31 entries or more): flat row-major
  indices into the weight, strictly increasing; and ``<name>.values`` (F32 by default, BF16 or F16
  on request): the delta S at those indices;
* ``__metadata__``: ``format`` = ``shira_hooks.adapter``, ``format_version`` = ``1``, ``modules`` =
  a JSON object ``{name: {"shape": [...], "dtype": "<base weight dtype>", "fingerprint": "<hex>"}}``,
  and free-form string entries such as ``mask`` and ``sparsity``.

The fingerprint is the 8-byte blake2b digest (16 hex characters) of the base weight's values at
``indices``, as raw little-endian bytes of the base dtype, in index order.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_safetensors

from ._io import atomic_write
from .errors import ShiraError

FORMAT = "shira_hooks.adapter"
FORMAT_VERSION = "1"
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_BASE_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str, where: str) -> torch.dtype:
    if name not in _BASE_DTYPES:
        raise ShiraError(f"{where}: unknown dtype {name!r}; expected one of {sorted(_BASE_DTYPES)}")
    return _BASE_DTYPES[name]


def check_indices(indices: torch.Tensor, numel: int, where: str) -> None:
    """Raise ShiraError unless ``indices`` are 1-D integers, strictly increasing, within [0, numel)."""
    if indices.dtype not in _INDEX_DTYPES or indices.dim() != 1:
        raise ShiraError(
            f"{where}: indices must be a 1-D int32/int64 tensor, got {indices.dtype} of shape "
            f"{tuple(indices.shape)}"
        )
    if indices.numel() == 0:
        raise ShiraError(f"{where}: no indices; an adapted weight needs at least one entry")
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= numel:
        raise ShiraError(f"{where}: indices out of range [{low}, {high}]; a weight of {numel} entries allows [0, {numel - 1}]")
    steps = indices[1:].to(torch.int64) - indices[:-1].to(torch.int64)
    if bool((steps == 0).any()):
        at = int(torch.nonzero(steps == 0)[0])
        raise ShiraError(f"{where}: duplicate index {int(indices[at])} at position {at + 1}; indices must be unique")
    if bool((steps < 0).any()):
        at = int(torch.nonzero(steps < 0)[0])
        raise ShiraError(f"{where}: indices are not sorted (position {at + 1}: {int(indices[at + 1])} after {int(indices[at])}); sort them ascending")


@dataclass(frozen=True)
class SparseDelta:
    """The delta of one weight: ``W_new.view(-1)[indices] - W.view(-1)[indices] == values``.

    Attributes:
        shape: shape of the base weight.
        dtype: dtype of the base weight.
        indices: (k,) strictly increasing flat indices, int32 (int64 for >= 2**31 entries).
        values: (k,) the delta at ``indices``, float32 unless saved/loaded in a lower precision.
        fingerprint: digest of the base weight's values at ``indices`` (see the module docstring).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: torch.Tensor
    values: torch.Tensor
    fingerprint: str

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def validate(self, name: str, context: str = "") -> None:
        """Raise ShiraError, naming ``context`` and the tensor key, unless this delta is well formed."""
        check_indices(self.indices, self.numel, f"{context}'{name}.indices'")
        where = f"{context}'{name}.values'"
        if self.values.dtype not in _VALUE_DTYPES or self.values.dim() != 1:
            raise ShiraError(
                f"{where}: must be a 1-D float32/bfloat16/float16 tensor, got {self.values.dtype} "
                f"of shape {tuple(self.values.shape)}"
            )
        if self.values.numel() != self.indices.numel():
            raise ShiraError(
                f"{where}: {self.values.numel()} values for {self.indices.numel()} indices; "
                f"they must have the same length"
            )
        if not bool(torch.isfinite(self.values).all()):
            bad = int((~torch.isfinite(self.values)).sum())
            raise ShiraError(f"{where}: {bad} NaN/inf values; an adapter delta must be finite")


class SparseAdapter:
    """A SHiRA adapter: one ``SparseDelta`` per adapted weight, plus string metadata.

    Example:
        >>> adapter = shira.extract()
        >>> adapter.save("adapter.safetensors")
        >>> same = SparseAdapter.load("adapter.safetensors")
        >>> same.num_entries == adapter.num_entries
        True
    """

    def __init__(self, deltas: Mapping[str, SparseDelta], metadata: Mapping[str, str] | None = None, *, context: str = ""):
        if not deltas:
            raise ShiraError(f"{context}a SparseAdapter needs at least one weight delta, got none")
        for name, delta in deltas.items():
            delta.validate(name, context)
        self.deltas: dict[str, SparseDelta] = dict(deltas)
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}

    @property
    def num_entries(self) -> int:
        """Total number of adapted entries over all weights."""
        return sum(d.indices.numel() for d in self.deltas.values())

    def __repr__(self) -> str:
        mask = self.metadata.get("mask", "?")
        return f"SparseAdapter({len(self.deltas)} weights, {self.num_entries:,} entries, mask={mask!r})"

    # ----------------------------------------------------------------------------------- file
    def to_bytes(self, *, dtype: torch.dtype = torch.float32) -> bytes:
        """The adapter as safetensors bytes, values stored as ``dtype`` (float32, bfloat16 or float16)."""
        if dtype not in _VALUE_DTYPES:
            raise ShiraError(f"cannot store adapter values as {dtype}; use torch.float32, torch.bfloat16 or torch.float16")
        tensors, modules = {}, {}
        for name, delta in self.deltas.items():
            tensors[f"{name}.indices"] = delta.indices.contiguous()
            tensors[f"{name}.values"] = delta.values.to(dtype).contiguous()
            modules[name] = {"shape": list(delta.shape), "dtype": dtype_name(delta.dtype), "fingerprint": delta.fingerprint}
        metadata = dict(self.metadata)
        metadata.update(format=FORMAT, format_version=FORMAT_VERSION, modules=json.dumps(modules))
        return save_safetensors(tensors, metadata=metadata)

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
        """Write the adapter to one safetensors file, atomically (an old file survives a failed write).

        Args:
            path: destination file; its folder is created if needed.
            dtype: how to store the values: torch.float32 (8 bytes per entry with int32 indices),
                torch.bfloat16 or torch.float16 (6 bytes per entry).

        Returns:
            The path written.
        """
        return atomic_write(path, self.to_bytes(dtype=dtype))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "SparseAdapter":
        """Read and validate an adapter file written by ``save``.

        The file is memory-mapped (``safetensors.safe_open``), never read whole into Python memory.

        Args:
            path: the adapter file.
            device: where the indices and values are loaded (e.g. ``"cuda:0"``, to apply the
                adapter to a model there); validation runs on that device.

        Raises:
            FileNotFoundError: no file at ``path``.
            ShiraError: naming the file, the tensor key and the problem, for a file that is not
                safetensors, is truncated, has an unknown format version, missing or extra keys,
                indices out of range, unsorted or duplicate, mismatched lengths, or non-finite
                values; or a ``device`` that is not a torch device.

        Example:
            >>> adapter = SparseAdapter.load("adapter.safetensors", device="cpu")
        """
        metadata, tensors = read_safetensors(path, device=device)
        if metadata.get("format") != FORMAT:
            raise ShiraError(f"{path}: not a shira_hooks adapter (metadata format={metadata.get('format')!r}, expected {FORMAT!r})")
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ShiraError(
                f"{path}: unknown adapter format_version {metadata.get('format_version')!r}; this shira_hooks "
                f"reads version {FORMAT_VERSION}. Upgrade shira_hooks to read newer files"
            )
        try:
            modules = json.loads(metadata.pop("modules"))
        except (KeyError, json.JSONDecodeError) as error:
            raise ShiraError(f"{path}: metadata entry 'modules' is missing or not JSON ({error})") from None
        expected = {f"{name}.{part}" for name in modules for part in ("indices", "values")}
        missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
        if missing:
            raise ShiraError(f"{path}: missing tensor key(s) {missing[:5]}; every module in the metadata needs .indices and .values")
        if extra:
            raise ShiraError(f"{path}: unexpected tensor key(s) {extra[:5]} not described in the metadata 'modules'")
        deltas = {}
        for name, info in modules.items():
            try:
                shape, fingerprint = tuple(int(s) for s in info["shape"]), str(info["fingerprint"])
                dtype = parse_dtype(info["dtype"], f"{path}: module '{name}'")
            except (KeyError, TypeError, ValueError) as error:
                if isinstance(error, ShiraError):
                    raise
                raise ShiraError(f"{path}: metadata for module '{name}' is malformed ({error!r}); expected shape, dtype, fingerprint") from None
            deltas[name] = SparseDelta(shape, dtype, tensors[f"{name}.indices"], tensors[f"{name}.values"], fingerprint)
        metadata.pop("format"), metadata.pop("format_version")
        return cls(deltas, metadata, context=f"{path}: tensor ")


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
