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

Version 2, written only for block adapters (``attach(..., block=B)``, B > 1): the same, except that
a module whose entries are aligned runs of B (its ``modules`` entry has ``"block": B``) stores one
index per run: ``<name>.indices`` holds the k/B strictly increasing *block numbers* j (the run
covers flat indices ``[j * B, (j + 1) * B)``; I32 while numel / B < 2**31), and ``<name>.values``
its k values in flat-index order. At B=16 and float32 values that is 4.25 bytes per entry instead
of 8. Version 1 readers refuse version 2 files (they would misread block numbers as flat indices);
this reader reads both, a module without ``"block"`` being single entries.

The fingerprint is the 8-byte blake2b digest (16 hex characters) of the base weight's values at
``indices``, as raw little-endian bytes of the base dtype, in index order.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from .._base import atomic_write, read_safetensors
from ..errors import ShiraError
from ..masks import block_starts, check_block, expand_blocks, index_dtype, row_length
from . import formats

FORMAT = "shira_hooks.adapter"
FORMAT_VERSION = "1"
BLOCK_FORMAT_VERSION = "2"  # written when a module stores one index per block (module docstring)
_READABLE = (FORMAT_VERSION, BLOCK_FORMAT_VERSION)
_VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
_BASE_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: object, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _BASE_DTYPES:
        raise ShiraError(f"{where}: unknown dtype {name!r}; expected one of {sorted(_BASE_DTYPES)}")
    return _BASE_DTYPES[name]


def check_indices(indices: torch.Tensor, numel: int, where: str) -> None:
    """Raise ShiraError unless ``indices`` are 1-D integers, strictly increasing, within [0, numel)."""
    if indices.dtype not in _INDEX_DTYPES or indices.dim() != 1:
        raise ShiraError(
            f"{where}: indices must be a 1-D int32/int64 tensor, got {indices.dtype} of shape {tuple(indices.shape)}"
        )
    if indices.numel() == 0:
        raise ShiraError(f"{where}: no indices; an adapted weight needs at least one entry")
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= numel:
        raise ShiraError(
            f"{where}: indices out of range [{low}, {high}]; a weight of {numel} entries allows [0, {numel - 1}]"
        )
    steps = indices[1:].to(torch.int64) - indices[:-1].to(torch.int64)
    if bool((steps == 0).any()):
        at = int(torch.nonzero(steps == 0)[0])
        raise ShiraError(f"{where}: duplicate index {int(indices[at])} at position {at + 1}; indices must be unique")
    if bool((steps < 0).any()):
        at = int(torch.nonzero(steps < 0)[0])
        raise ShiraError(
            f"{where}: indices are not sorted (position {at + 1}: {int(indices[at + 1])} after {int(indices[at])}); sort them ascending"
        )


def check_shape(shape: object, where: str) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints whose product fits an int64 index; ShiraError otherwise.

    Checked before anything is sized from it: a product that overflows would wrap to a negative
    entry count (and a huge one would size allocations). ``()`` is a scalar weight (one entry).
    """
    if not isinstance(shape, (list, tuple)) or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 for s in shape
    ):
        raise ShiraError(f"{where}: shape {shape!r} is not a list of positive ints")
    dims = tuple(int(s) for s in shape)  # Python ints: their product cannot wrap around
    if math.prod(dims) >= 2**63:
        raise ShiraError(
            f"{where}: shape {list(dims)} has {math.prod(dims):,} entries, more than an int64 index can address (2**63 - 1)"
        )
    return dims


def _block_indices(
    blocks: torch.Tensor, values: torch.Tensor, block: object, shape: tuple[int, ...], where: str
) -> torch.Tensor:
    """The flat indices of the runs a version-2 file stores by block number, validated first.

    Every size is checked against the tensors read from the file before the runs are expanded, so the
    expansion (k = len(values) entries) is bounded by the file's size whatever its header claims.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1 or row_length(shape) % block:
        raise ShiraError(
            f"{where}: block={block!r} is not a positive int dividing the row length {row_length(shape)} of a {list(shape)} "
            f"weight; the header is corrupt, save the adapter again"
        )
    if blocks.dim() != 1 or values.dim() != 1 or blocks.numel() * block != values.numel():
        raise ShiraError(
            f"{where}: {tuple(blocks.shape)} block numbers of {block} entries each need {blocks.numel() * block:,} values, the "
            f"file holds {tuple(values.shape)}; the file is corrupt, save the adapter again"
        )
    numel = math.prod(shape)
    check_indices(blocks, numel // block, f"{where} (block numbers, block={block})")
    return expand_blocks(blocks, block).to(index_dtype(numel))


@dataclass(frozen=True)
class SparseDelta:
    """The delta of one weight: ``W_new.view(-1)[indices] - W.view(-1)[indices] == values``.

    Attributes:
        shape: shape of the base weight.
        dtype: dtype of the base weight.
        indices: (k,) strictly increasing flat indices, int32 (int64 for >= 2**31 entries).
        values: (k,) the delta at ``indices``, float32 unless saved/loaded in a lower precision.
        fingerprint: digest of the base weight's values at ``indices`` (see the module docstring).
        block: 1, or B > 1 when ``indices`` are aligned runs of B entries of a row (``attach(...,
            block=B)``): the file then stores one index per run and ``apply`` writes whole runs.
            In memory ``indices`` always lists every entry.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    indices: torch.Tensor
    values: torch.Tensor
    fingerprint: str
    block: int = 1

    @property
    def numel(self) -> int:
        return math.prod(int(s) for s in self.shape)  # a Python int: torch.Size.numel() wraps around past 2**63

    def validate(self, name: str, context: str = "") -> None:
        """Raise ShiraError, naming ``context`` and the tensor key, unless this delta is well formed."""
        check_shape(self.shape, f"{context}'{name}'")
        check_indices(self.indices, self.numel, f"{context}'{name}.indices'")
        if self.block != 1:
            check_block(self.block)
            if row_length(self.shape) % self.block or block_starts(self.indices, self.block) is None:
                raise ShiraError(
                    f"{context}'{name}.indices': block={self.block}, but the {self.indices.numel()} indices are not aligned "
                    f"runs of {self.block} entries within the rows of a {list(self.shape)} weight; use block=1 for "
                    f"unstructured entries"
                )
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

    def __init__(
        self, deltas: Mapping[str, SparseDelta], metadata: Mapping[str, str] | None = None, *, context: str = ""
    ):
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

    @property
    def block(self) -> int:
        """The run length B every weight's entries are aligned runs of (1: unstructured).

        The greatest common divisor of the deltas' blocks: a mix of block 16 and 32 is block 16, a mix
        with an unstructured delta is block 1.
        """
        return math.gcd(*(d.block for d in self.deltas.values()))

    @property
    def format_version(self) -> str:
        """The file format version ``save`` writes: "2" when a weight stores runs (block > 1), else "1"."""
        return BLOCK_FORMAT_VERSION if max(d.block for d in self.deltas.values()) > 1 else FORMAT_VERSION

    def __repr__(self) -> str:
        mask = self.metadata.get("mask", "?")
        block = f", block={self.block}" if self.block > 1 else ""
        return f"SparseAdapter({len(self.deltas)} weights, {self.num_entries:,} entries, mask={mask!r}{block})"

    # ----------------------------------------------------------------------------------- file
    def to_bytes(self, *, dtype: torch.dtype = torch.float32) -> bytes:
        """The adapter as safetensors bytes, values stored as ``dtype`` (float32, bfloat16 or float16)."""
        if dtype not in _VALUE_DTYPES:
            raise ShiraError(
                f"cannot store adapter values as {dtype}; use torch.float32, torch.bfloat16 or torch.float16"
            )
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict[str, object]] = {}
        for name, delta in self.deltas.items():
            modules[name] = {
                "shape": list(delta.shape),
                "dtype": dtype_name(delta.dtype),
                "fingerprint": delta.fingerprint,
            }
            if delta.block > 1:  # one index per run: its block number
                blocks = block_starts(delta.indices, delta.block)
                assert blocks is not None  # SparseDelta refuses a block > 1 whose indices are not aligned runs
                tensors[f"{name}.indices"] = blocks.to(index_dtype(delta.numel // delta.block)).contiguous()
                modules[name]["block"] = delta.block
            else:
                tensors[f"{name}.indices"] = delta.indices.contiguous()
            tensors[f"{name}.values"] = delta.values.to(dtype).contiguous()
        metadata = dict(self.metadata)
        metadata.update(format=FORMAT, format_version=self.format_version, modules=json.dumps(modules))
        return save_safetensors(tensors, metadata=metadata)

    def save(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
        """Write the adapter to one safetensors file, atomically (an old file survives a failed write).

        Args:
            path: destination file; its folder is created if needed.
            dtype: how to store the values: torch.float32 (8 bytes per entry with int32 indices),
                torch.bfloat16 or torch.float16 (6 bytes per entry). A block adapter stores one
                int32 index per run of B: 4 + 4/B bytes per entry in float32 (4.25 at B=16).

        Returns:
            The path written.
        """
        return atomic_write(path, self.to_bytes(dtype=dtype))

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> SparseAdapter:
        """Read and validate an adapter: a file written by ``save``, a folder written by ``save_pretrained``
        or a PEFT SHiRA folder (the one dispatch, ``formats.read``).

        A file is memory-mapped (``safetensors.safe_open``), never read whole into Python memory.

        Args:
            path: the adapter file, a folder written by ``save_pretrained``, or a PEFT SHiRA folder
                (holding ``adapter_config.json``: read as ``from_peft(path)``, without a base).
            device: where the indices and values are loaded (e.g. ``"cuda:0"``, to apply the
                adapter to a model there); validation runs on that device.

        Raises:
            FileNotFoundError: nothing at ``path``.
            ShiraError: naming the file, the tensor key and the problem, for a file that is not
                safetensors, is truncated, has an unknown format version, missing or extra keys,
                indices out of range, unsorted or duplicate, mismatched lengths, or non-finite
                values; or a ``device`` that is not a torch device. For folders, see
                ``from_pretrained`` and ``from_peft``.

        Example:
            >>> adapter = SparseAdapter.load("adapter.safetensors", device="cpu")
        """
        return formats.read(path, device=device)

    # ------------------------------------------------------------------ PEFT format (peft.py)
    def to_peft(
        self,
        folder: str | os.PathLike,
        base_model_name_or_path: str | None = None,
        *,
        base: torch.nn.Module | None = None,
    ) -> Path:
        """Write the adapter as a PEFT SHiRA adapter folder, which ``peft.PeftModel.from_pretrained`` loads.

        The folder gets ``adapter_config.json`` (a ``peft.ShiraConfig``: ``target_modules`` = the
        adapted Linear modules by full name, one ``r``, ``inference_mode=True``) and
        ``adapter_model.safetensors`` (``base_model.model.<module>.shira_weight`` float32 and
        ``.shira_indices`` int32 (2, K) rows and columns). PEFT requires exactly ``r * (m + n)``
        entries for every (m, n) weight, with one ``r`` for all of them, so:

        * ``r`` is the smallest with ``r * (m + n) >= k`` for every weight of k entries (the least
          padding); PEFT also requires ``r * (m + n) <= m * n``.
        * Each weight is padded to ``r * (m + n)`` entries with deltas of ``-0.0`` at the smallest
          flat row-major indices outside the adapter's mask (deterministic). ``-0.0`` is IEEE's exact
          additive identity (``w + -0.0 == w`` bit for bit, ``w = -0.0`` included), so PEFT's merge and
          forward leave padded entries exactly as in the base. The k real entries come first in each
          tensor, padding after; the safetensors header records, under ``shira_hooks.modules`` and
          ``shira_hooks.metadata``, each weight's shape, dtype, fingerprint and k, and the adapter's
          metadata, so ``from_peft`` gives this adapter back exactly (PEFT ignores those entries).
          Training the folder further in PEFT trains the padded entries too.
        * Values are stored in float32, as PEFT keeps them; ``alpha`` is not part of the export
          (PEFT's ``scaling`` is 1.0).

        Each of the two files is written atomically (weights first, then the config); other files in
        the folder are left alone, as ``save_pretrained`` leaves them.

        Args:
            folder: destination folder, created if needed.
            base_model_name_or_path: written to the config (what ``AutoPeftModel`` loads as the base).
            base: optional base model to check before anything is written: every adapted weight must
                be the weight of an ``nn.Linear`` there, of the same shape and fingerprint. Without it an
                ``nn.Embedding`` weight (2-D like a Linear's) is only refused by PEFT when loading.

        Returns:
            The folder.

        Raises:
            ShiraError: naming the weight, for a weight that is not ``<module>.weight`` of a 2-D
                (Linear) weight (a conv or, with ``base``, an embedding), a base that does not match,
                a weight that cannot hold ``r * (m + n)`` entries, or a ``folder`` that is a file.
                Nothing is written then.
            ImportError: peft (>= 0.17) is not installed.

        Example:
            >>> adapter.to_peft("peft-adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
            >>> model = peft.PeftModel.from_pretrained(base, "peft-adapter").merge_and_unload()
        """
        return formats.get("peft").write(self, folder, base_model_name_or_path=base_model_name_or_path, base=base)

    @classmethod
    def from_peft(
        cls,
        source: str | os.PathLike | torch.nn.Module,
        *,
        base: torch.nn.Module | None = None,
        adapter_name: str | None = None,
    ) -> SparseAdapter:
        """Read a PEFT SHiRA adapter: a folder written by ``PeftModel.save_pretrained``, or a live ``PeftModel``.

        PEFT's module names become parameter names (``base_model.model.<path>`` -> ``<path>.weight``);
        the (2, K) row/column indices become sorted flat row-major indices (duplicates, which PEFT's
        sparse delta adds up, are added up); values become float32, times PEFT's ``scaling`` for a
        live model. Every entry PEFT holds is kept, zero-valued ones included (they are trained
        entries), except the padding ``to_peft`` wrote, which is dropped while it is still zero: a
        folder from ``to_peft`` gives back the same indices, values, shapes, dtypes, fingerprints and
        metadata.

        Shapes, dtypes and fingerprints come from, in order: the live model's base weights, or
        ``base``; the header ``to_peft`` wrote; otherwise a folder saved by PEFT records none of them:
        each shape (m, n) is then read from PEFT's rule ``K = r * (m + n)`` and the largest row and
        column used (a ShiraError asks for ``base`` where they do not fix it), the dtype is taken to
        be float32, and the fingerprints are left empty, so ``apply`` cannot check that the model is
        the adapter's base (pass ``check_base=False`` to apply it to a weight of another dtype).

        Args:
            source: a folder (holding ``adapter_config.json`` and ``adapter_model.safetensors``),
                or a ``peft.PeftModel`` whose adapter is not merged.
            base: for a folder, the base model: gives the dtypes and the fingerprints, and checks
                that every module exists with the shape the adapter needs.
            adapter_name: which adapter; default the live model's active adapter, or, for a folder,
                the one in it (another name reads ``source/<adapter_name>``, where ``save_pretrained``
                puts adapters other than ``"default"``).

        Returns:
            A ``SparseAdapter`` with one delta per SHiRA module.

        Raises:
            FileNotFoundError: no folder at ``source``.
            ShiraError: naming the folder or module, for a folder that is not a PEFT SHiRA adapter
                (another ``peft_type`` such as LoRA, a missing or unreadable file, ``modules_to_save``,
                which a sparse adapter cannot hold), a base whose modules or shapes do not fit the
                adapter, a merged live adapter, or ``base`` given with a live model.

        Example:
            >>> peft_model.save_pretrained("peft-shira")
            >>> adapter = SparseAdapter.from_peft("peft-shira", base=fresh_base_model)
            >>> shira_hooks.apply(fresh_base_model, adapter)   # = peft_model.merge_and_unload()
        """
        return formats.get("peft").read(source, base=base, adapter_name=adapter_name)

    # ------------------------------------------------------------- Hub-style folder (hub.py)
    def save_pretrained(
        self,
        folder: str | os.PathLike,
        *,
        base_model_name_or_path: str | os.PathLike | None = None,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        license: str | None = None,
    ) -> Path:
        """Write a Hub-style folder: the adapter file, ``shira_config.json`` and a model card ``README.md``.

        The adapter file ``shira_adapter.safetensors`` is what ``save`` writes, its metadata tagged
        with the base model; the config and the card are described in ``shira_hooks/format/hub.py``.
        The three files are written into a temporary sibling folder, which is then renamed to
        ``folder``: a new folder appears complete or not at all. An existing ``folder`` (holding only
        these files) is kept until the new one is complete, then moved aside and replaced, so
        ``folder`` is missing only between two renames; a crash there leaves the old one as the
        hidden sibling ``.<name>.old-<hex>``.

        Args:
            folder: the folder to write; its parents are created if needed.
            base_model_name_or_path: the base model's Hub id or path, recorded in the config, the
                card and the adapter's metadata. ``None``: the adapter's
                ``metadata["base_model_name_or_path"]`` (set by ``from_pretrained``), if any.
            revision: the base model's branch, tag or commit (needs ``base_model_name_or_path``).
            dtype: how to store the values: torch.float32, torch.bfloat16 or torch.float16.
            license: the adapter's license as a Hub license id (``"apache-2.0"``, ``"llama3.1"``,
                ``"other"``; usually the base model's), written to the card's front matter and the
                config. ``None``: the adapter's ``metadata["license"]`` (set by ``from_pretrained``), if
                any; otherwise the card says that no license was recorded.

        Returns:
            ``folder``, as a Path.

        Raises:
            ShiraError: ``folder`` is a file or holds other entries (they would be lost), a
                ``dtype`` that cannot be stored, an empty or non-string base model id or revision,
                a revision without a base model, or a license that is not a Hub license id. Raised
                before anything is written.

        Example:
            >>> adapter.save_pretrained("paint", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
            PosixPath('paint')
            >>> sorted(p.name for p in Path("paint").iterdir())
            ['README.md', 'shira_adapter.safetensors', 'shira_config.json']
        """
        return formats.get("folder").write(
            self,
            folder,
            base_model_name_or_path=base_model_name_or_path,
            revision=revision,
            dtype=dtype,
            license=license,
        )

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> SparseAdapter:
        """Read a folder written by ``save_pretrained``.

        The config's base model id, revision and license, when recorded, are kept in
        ``adapter.metadata["base_model_name_or_path"]``, ``["revision"]`` and ``["license"]``.

        Args:
            folder: the folder (a local path; download a Hub copy first with
                ``huggingface_hub.snapshot_download``).
            device: where the indices and values are loaded, as in ``load``.

        Returns:
            The adapter.

        Raises:
            FileNotFoundError: no folder at ``folder``.
            ShiraError: naming the file and the fix, for a path that is a file, a missing,
                malformed or newer ``shira_config.json``, a missing or invalid adapter file (see
                ``load``), or a config that does not describe the adapter file.

        Example:
            >>> adapter = SparseAdapter.from_pretrained("paint")
            >>> adapter.metadata["base_model_name_or_path"]
            'HuggingFaceTB/SmolLM2-135M'
            >>> applied = shira_hooks.apply(model, adapter)
        """
        return formats.get("folder").read(folder, device=device)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        base_model_name_or_path: str | os.PathLike | None = None,
        revision: str | None = None,
        dtype: torch.dtype = torch.float32,
        license: str | None = None,
        private: bool | None = None,
        token: str | None = None,
        commit_message: str = "Upload SHiRA adapter",
    ):
        """Upload the ``save_pretrained`` folder to the Hub repository ``repo_id`` (created if needed).

        Untested against the real Hub (the tests run offline, with a stand-in ``HfApi``). Needs
        ``huggingface_hub``, imported only here. The folder is written to a temporary folder and
        uploaded in one commit to the repository's default branch with ``HfApi.upload_folder``.

        Args:
            repo_id: ``"user/name"`` of a model repository.
            base_model_name_or_path, revision, dtype, license: as in ``save_pretrained`` (``revision``
                is the base model's, not a branch of ``repo_id``).
            private: passed to ``HfApi.create_repo`` when the repository is created.
            token: a Hub token; ``None`` uses the one ``huggingface-cli login`` stored.
            commit_message: the commit's message.

        Returns:
            What ``HfApi.upload_folder`` returns (a ``huggingface_hub.CommitInfo``).

        Raises:
            ImportError: huggingface_hub is not installed.
            ShiraError: as ``save_pretrained``, before anything is uploaded.

        Example:
            >>> adapter.push_to_hub("me/smollm2-paint-shira", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M")
        """
        upload = formats.get("folder").upload
        assert upload is not None  # the folder format (hub.py) registers one
        return upload(
            self,
            repo_id,
            base_model_name_or_path=base_model_name_or_path,
            revision=revision,
            dtype=dtype,
            license=license,
            private=private,
            token=token,
            commit_message=commit_message,
        )


def as_adapter(source: SparseAdapter | str | os.PathLike, *, where: str = "") -> SparseAdapter:
    """``source`` as a ``SparseAdapter``: an adapter as it is, or one read from a path.

    A path is read as ``SparseAdapter.load`` reads it (``formats.read``): an adapter file, a folder written
    by ``save_pretrained`` (``from_pretrained``) or a PEFT SHiRA folder holding ``adapter_config.json``
    (``from_peft``, no base: shapes from the folder, no fingerprints). ``apply``, ``fuse``, ``overlap``,
    ``MixedAdapters`` and ``AdapterBank`` take their adapters through it.

    Args:
        source: a ``SparseAdapter``, or a ``str`` / ``os.PathLike`` path.
        where: what the adapter is for, to start an error message (e.g. ``"apply()"``).

    Returns:
        The adapter.

    Raises:
        FileNotFoundError: no file or folder at the path.
        ShiraError: ``source`` is neither an adapter nor a path, or the file or folder is not a
            valid adapter (see ``SparseAdapter.load``).

    Example:
        >>> adapter = as_adapter("adapter.safetensors")   # = SparseAdapter.load("adapter.safetensors")
    """
    if isinstance(source, SparseAdapter):
        return source
    if not isinstance(source, (str, os.PathLike)):
        raise ShiraError(
            f"{where + ': ' if where else ''}got a {type(source).__name__}, not a SparseAdapter or a path; pass "
            f"SparseAdapter.load(path) (a file or a save_pretrained folder), SparseAdapter.from_peft(folder), or the path itself"
        )
    return formats.read(source)  # a file, a save_pretrained folder or a PEFT folder


def read_file(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> SparseAdapter:
    """Read and validate an adapter file written by ``SparseAdapter.save`` (the ``file`` format)."""
    metadata, tensors = read_safetensors(path, device=device)
    if metadata.get("format") != FORMAT:
        raise ShiraError(
            f"{path}: not a shira_hooks adapter (metadata format={metadata.get('format')!r}, expected {FORMAT!r})"
        )
    if metadata.get("format_version") not in _READABLE:
        raise ShiraError(
            f"{path}: unknown adapter format_version {metadata.get('format_version')!r}; this shira_hooks "
            f"reads versions {', '.join(_READABLE)}. Upgrade shira_hooks to read newer files"
        )
    version = metadata["format_version"]
    try:
        modules = json.loads(metadata.pop("modules"))
    except (KeyError, json.JSONDecodeError) as error:
        raise ShiraError(f"{path}: metadata entry 'modules' is missing or not JSON ({error})") from None
    if not isinstance(modules, dict) or not modules:
        raise ShiraError(
            f"{path}: metadata entry 'modules' is a JSON {type(modules).__name__} {str(modules)[:80]}; expected a non-empty object {{name: {{shape, dtype, fingerprint}}}}"
        )
    expected = {f"{name}.{part}" for name in modules for part in ("indices", "values")}
    missing, extra = sorted(expected - tensors.keys()), sorted(tensors.keys() - expected)
    if missing:
        raise ShiraError(
            f"{path}: missing tensor key(s) {missing[:5]}; every module in the metadata needs .indices and .values"
        )
    if extra:
        raise ShiraError(f"{path}: unexpected tensor key(s) {extra[:5]} not described in the metadata 'modules'")
    deltas = {}
    for name, info in modules.items():
        where = f"{path}: module '{name}'"
        if (
            not isinstance(info, dict)
            or not {"shape", "dtype", "fingerprint"} <= info.keys()
            or not isinstance(info["fingerprint"], str)
        ):
            raise ShiraError(
                f'{where}: metadata {str(info)[:120]} is malformed; expected {{"shape": [...], "dtype": ..., "fingerprint": "<hex>"}}'
            )
        shape = check_shape(info["shape"], where)
        dtype = parse_dtype(info["dtype"], where)
        indices, values = tensors[f"{name}.indices"], tensors[f"{name}.values"]
        block = info.get("block", 1)
        if "block" in info and version == FORMAT_VERSION:  # a version-1 reader would take block numbers for indices
            raise ShiraError(
                f"{where}: has a 'block' entry, which format_version {FORMAT_VERSION} files do not have (block adapters are "
                f"version {BLOCK_FORMAT_VERSION}); the header is corrupt or was edited, save the adapter again"
            )
        if "block" in info:
            indices = _block_indices(indices, values, block, shape, f"{path}: tensor '{name}.indices'")
        deltas[name] = SparseDelta(shape, dtype, indices, values, info["fingerprint"], block)
    metadata.pop("format"), metadata.pop("format_version")
    return SparseAdapter(deltas, metadata, context=f"{path}: tensor ")


def _write_file(adapter: SparseAdapter, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    return adapter.save(path, dtype=dtype)


FILE = formats.Format("file", recognises=lambda path: not path.is_dir(), read=read_file, write=_write_file)
