"""A Hub-style folder for a ``SparseAdapter``: the adapter file, a JSON config and a model card.

    shira_adapter/
        shira_adapter.safetensors   the adapter, exactly as ``SparseAdapter.save`` writes it
        shira_config.json           what the folder holds (format below), for people and tools
        README.md                   a model card: what the adapter is and how to load it

``shira_config.json`` (format version 1) is one JSON object:

    format                   "shira_hooks.adapter_folder"
    format_version           1
    base_model_name_or_path  the base model's Hub id or path, or null when unknown
    revision                 the base model's revision (branch, tag or commit), or null
    target_weights           the adapted parameter names, in the adapter's order
    num_entries              the total number of adapted entries (k summed over the weights)
    mask, sparsity, seed     from the adapter's metadata (null when it has none)
    block                    the adapter's block (``SparseAdapter.block``): 1 for single entries, B when
                             every weight's entries are aligned runs of B (the file then stores one
                             index per run: adapter format version 2)
    values_dtype             how the values are stored: "float32", "bfloat16" or "float16"
    license                  the adapter's Hub license id (e.g. "apache-2.0"), or null when not given
                             (folders written before it existed have no entry: read as null)
    created_by               the shira_hooks version that wrote the folder

The adapter file and ``SparseAdapter.load`` are the source of truth; ``from_pretrained`` checks the
config against them. The folder is written into a temporary sibling folder and renamed into place
(see ``save_pretrained``). This module imports neither transformers nor huggingface_hub
(``push_to_hub`` imports huggingface_hub when called).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .._base import atomic_write, remove_stale_temporaries, sync_folder, temporary_prefix, umask
from .._version import __version__
from ..errors import ShiraError
from . import formats
from .adapter import SparseAdapter, dtype_name, read_file

FOLDER_FORMAT = "shira_hooks.adapter_folder"
FOLDER_FORMAT_VERSION = 1
ADAPTER_FILE = "shira_adapter.safetensors"
CONFIG_FILE = "shira_config.json"
CARD_FILE = "README.md"
FOLDER_FILES = (ADAPTER_FILE, CONFIG_FILE, CARD_FILE)
BASE_KEYS = ("base_model_name_or_path", "revision", "license")  # kept in the config and in adapter.metadata

# "org/name" or "name" as the Hub spells a repository id; a card names a base_model only in this form
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# a Hub license id, as the Hub lists them: "apache-2.0", "cc-by-nc-4.0", "llama3.1", "other"
_LICENSE = re.compile(r"[a-z0-9][a-z0-9.+-]*")


def hub_id(name: str | os.PathLike | None) -> str | None:
    """``name`` if it reads as a Hub repository id and is not a local path that exists, else None.

    ``config._name_or_path`` holds whatever the model was loaded from: a local folder is of no use
    to anyone else reading the card (and the Hub rejects it as ``base_model``).
    """
    if not isinstance(name, (str, os.PathLike)):
        return None
    name = os.fspath(name)
    return name if _REPO_ID.fullmatch(name) and not os.path.exists(name) else None


# ------------------------------------------------------------------------------------ writing
def save_pretrained(
    adapter: SparseAdapter,
    folder: str | os.PathLike,
    *,
    base_model_name_or_path: str | os.PathLike | None = None,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    license: str | None = None,
) -> Path:
    """``SparseAdapter.save_pretrained``: build the three files in memory, then swap the folder in."""
    # A symlink or "." is written through: the rename below needs the real folder's own name.
    target = Path(os.path.realpath(folder))
    base, revision = _base_model(adapter, base_model_name_or_path, revision)
    license = _license(adapter, license)
    _check_destination(target)
    # Everything that can fail on bad input is computed before anything touches the disk.
    metadata = {k: v for k, v in adapter.metadata.items() if k not in BASE_KEYS}
    metadata.update({k: v for k, v in zip(BASE_KEYS, (base, revision, license)) if v is not None})
    tagged = type(adapter)(adapter.deltas, metadata)  # the same deltas, tagged with the base model
    payload = tagged.to_bytes(dtype=dtype)  # ShiraError for a dtype it cannot store
    config = folder_config(tagged, base, revision, dtype, license)
    files = {
        ADAPTER_FILE: payload,
        CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode(),
        CARD_FILE: model_card(tagged, config).encode(),
    }
    _write_folder(target, files)
    return Path(folder)


def _base_model(
    adapter: SparseAdapter, base: str | os.PathLike | None, revision: str | None
) -> tuple[str | None, str | None]:
    """The base model id and revision to record: the arguments, else what the adapter's metadata says."""
    if base is None:
        base, revision = adapter.metadata.get("base_model_name_or_path"), revision or adapter.metadata.get("revision")
    if base is not None and not isinstance(base, (str, os.PathLike)):
        raise ShiraError(
            f"base_model_name_or_path={base!r} is a {type(base).__name__}; pass the base model's Hub id or path as a str, or None"
        )
    base = os.fspath(base) if base is not None else None
    if base == "":
        raise ShiraError(
            "base_model_name_or_path='' is empty; pass the base model's Hub id or path (e.g. 'HuggingFaceTB/SmolLM2-135M'), or None"
        )
    if revision is not None and not isinstance(revision, str):
        raise ShiraError(
            f"revision={revision!r} is a {type(revision).__name__}; pass a branch, tag or commit as a str, or None"
        )
    if revision is not None and base is None:
        raise ShiraError(
            f"revision={revision!r} given without base_model_name_or_path; pass the base model's id as well, or leave revision out"
        )
    return base, revision


def check_license(license: Any) -> None:
    """ShiraError unless ``license`` is None or reads as a Hub license id (it goes into the card's YAML front matter)."""
    if license is not None and (not isinstance(license, str) or not _LICENSE.fullmatch(license)):
        raise ShiraError(
            f"license={license!r} is not a Hub license id; pass one such as 'apache-2.0', 'mit', 'llama3.1' or 'other' "
            f"(usually the base model's), or None"
        )


def _license(adapter: SparseAdapter, license: str | None) -> str | None:
    """The license id to record: the argument, else the adapter's metadata."""
    license = adapter.metadata.get("license") if license is None else license
    check_license(license)
    return license


def _check_destination(folder: Path) -> None:
    """Refuse a destination whose replacement would lose something: a file, or a folder with other content."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ShiraError(
            f"{folder}: exists and is not a folder; save_pretrained writes a folder there. Pass a folder path"
        )
    foreign = sorted(entry.name for entry in folder.iterdir() if entry.name not in FOLDER_FILES)
    if foreign:
        raise ShiraError(
            f"{folder}: holds {len(foreign)} entries save_pretrained did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); the folder is replaced as a whole, so they would be lost. "
            f"Save into a new folder (e.g. {folder / 'shira_adapter'}), or move them away"
        )


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into a temporary sibling folder, then rename it to ``folder``.

    A new folder appears complete or not at all (one rename). An existing one is first renamed to a
    hidden sibling ``.<name>.old-<hex>``, the new one renamed into place, and the old one deleted:
    between those two renames ``folder`` does not exist, and a crash there leaves the old folder
    under the sibling name (kept: it may be the only copy). A failure before the second rename puts
    the old folder back. A staging folder left by a killed save is deleted by the next save to
    ``folder`` once its process no longer runs (``remove_stale_temporaries``).
    """
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)  # staging folders of earlier saves that were killed
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=temporary_prefix(folder), suffix=".tmp"))
    try:
        os.chmod(staging, _folder_mode(folder))  # mkdtemp's 0o700 would survive the rename
        for name, payload in files.items():
            atomic_write(staging / name, payload)
        if not folder.exists():
            os.rename(staging, folder)
        else:
            old = parent / f".{folder.name}.old-{secrets.token_hex(4)}"
            os.rename(folder, old)
            try:
                os.rename(staging, folder)
            except BaseException:
                os.rename(old, folder)
                raise
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    sync_folder(parent)


def _folder_mode(folder: Path) -> int:
    """The permission bits ``mkdir`` would give: the existing folder's, or 0o777 & ~umask."""
    try:
        return os.stat(folder).st_mode & 0o7777
    except FileNotFoundError:
        return 0o777 & ~umask()


def folder_config(
    adapter: SparseAdapter, base: str | None, revision: str | None, dtype: torch.dtype, license: str | None = None
) -> dict[str, Any]:
    """The content of ``shira_config.json`` (see the module docstring)."""
    metadata = adapter.metadata
    return {
        "format": FOLDER_FORMAT,
        "format_version": FOLDER_FORMAT_VERSION,
        "base_model_name_or_path": base,
        "revision": revision,
        "target_weights": list(adapter.deltas),
        "num_entries": adapter.num_entries,
        "mask": metadata.get("mask"),
        "sparsity": _number(metadata.get("sparsity"), float),
        "seed": _number(metadata.get("seed"), int),
        "block": adapter.block,
        "values_dtype": dtype_name(dtype),
        "license": license,
        "created_by": f"shira_hooks {__version__}",
    }


def _number(text: str | None, kind: type) -> int | float | None:
    """``kind(text)``, or None for a missing entry or one that is not a number ("None", "fused")."""
    try:
        return kind(text)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------- the card
def model_card(adapter: SparseAdapter, config: dict[str, Any]) -> str:
    """The folder's README.md: Hub front matter, what the adapter is, its targets, and how to load it."""
    base, revision, license = config["base_model_name_or_path"], config["revision"], config["license"]
    front = ["---", "library_name: shira_hooks", "tags:", "- shira", "- sparse-adapter"]
    if hub_id(base) is not None:  # the Hub rejects a local path as base_model
        front.append(f"base_model: {json.dumps(base)}")
    if license is not None:
        front.append(f"license: {license}")
    front.append("---")
    license_text = (
        f"License: `{license}`."
        if license is not None
        else "License: not recorded (pass `license=` to `save_pretrained`; an adapter is usually bound by its base model's license)."
    )
    version = adapter.format_version
    layout = (
        "flat row-major indices"
        if version == "1"
        else "flat row-major indices, or for weights marked `block` B in the header the numbers of aligned runs of B entries"
    )

    base_text = (
        f"`{base}`" + (f" (revision `{revision}`)" if revision else "") if base else "its base model (not recorded)"
    )
    numel = sum(delta.numel for delta in adapter.deltas.values())
    modules = list(dict.fromkeys(_module_kind(name) for name in adapter.deltas))
    settings = (
        ", ".join(f"{key} `{config[key]}`" for key in ("mask", "sparsity", "seed") if config[key] is not None)
        or "not recorded"
    )
    rows = [
        f"| `{name}` | {' x '.join(map(str, delta.shape))} | {delta.indices.numel():,} | "
        f"{100 * delta.indices.numel() / delta.numel:.3g}% |"
        for name, delta in adapter.deltas.items()
    ]
    load_base = f'"{base}"' + (f', revision="{revision}"' if revision else "") if base else '"<base model>"'
    return "\n".join(
        [
            *front,
            "",
            "# SHiRA adapter",
            "",
            f"A SHiRA (Sparse High Rank Adapter) for {base_text}, written by "
            f"shira_hooks {__version__}. It holds the sparse deltas `S = W_new - W` "
            f"of {len(adapter.deltas)} weights ({', '.join(f'`{m}`' for m in modules)}): "
            f"{adapter.num_entries:,} entries of {numel:,} ({100 * adapter.num_entries / numel:.3g}%). "
            f"Applying it overwrites those entries of the base weights in place; every other weight is unchanged.",
            "",
            f"Mask settings: {settings}. Values are stored as {config['values_dtype']}.",
            "",
            license_text,
            "",
            "| target weight | shape | k | % of the weight |",
            "|---|---|---|---|",
            *rows,
            "",
            "## Files",
            "",
            f"- `{ADAPTER_FILE}`: the adapter (safetensors; for every weight `<name>.indices`, {layout}, "
            f"and `<name>.values`, the deltas at them; shira_hooks adapter format version {version}).",
            f"- `{CONFIG_FILE}`: the base model, the targets, the mask settings and the entry count.",
            "",
            "## Load it with shira_hooks",
            "",
            "```python",
            "import shira_hooks",
            "from transformers import AutoModelForCausalLM  # or the class that fits the base model",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({load_base})",
            'adapter = shira_hooks.SparseAdapter.from_pretrained("path/to/this/folder")',
            "applied = shira_hooks.apply(model, adapter)  # in place; applied.remove() restores the base bit for bit",
            "```",
            "",
            "For a copy on the Hub, download the folder first: `huggingface_hub.snapshot_download(repo_id)`.",
            "",
            "## Load it with PEFT",
            "",
            'Convert it to a PEFT SHiRA folder with `adapter.to_peft("peft_folder")`, or on the command line '
            "`python -m shira_hooks convert --to-peft path/to/this/folder -o peft_folder`, then load that folder "
            'with `peft.PeftModel.from_pretrained(model, "peft_folder")`.',
            "",
        ]
    )


def _module_kind(name: str) -> str:
    """The last part of a weight's name that is not a layer number: ``q_proj`` for ``model.layers.0.self_attn.q_proj.weight``."""
    parts = [part for part in name.removesuffix(".weight").split(".") if not part.isdigit()]
    return parts[-1] if parts else name


# ------------------------------------------------------------------------------------ reading
def from_pretrained(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> SparseAdapter:
    """``SparseAdapter.from_pretrained``: read the config, load the adapter file, check they agree."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise ShiraError(
            f"{folder}: is a file, not a folder; read a single adapter file with SparseAdapter.load({str(folder)!r})"
        )
    config = read_config(folder)
    path = folder / ADAPTER_FILE
    if not path.is_file():
        raise ShiraError(
            f"{folder}: has {CONFIG_FILE} but no {ADAPTER_FILE}; the folder is incomplete. Save it again with adapter.save_pretrained(folder)"
        )
    adapter = read_file(path, device=device)
    if sorted(config["target_weights"]) != sorted(adapter.deltas) or config["num_entries"] != adapter.num_entries:
        raise ShiraError(
            f"{folder}: {CONFIG_FILE} describes {len(config['target_weights'])} weights and {config['num_entries']:,} entries, "
            f"but {ADAPTER_FILE} holds {len(adapter.deltas)} weights and {adapter.num_entries:,} entries; the files come from "
            f"different saves. Save the folder again with adapter.save_pretrained(folder)"
        )
    for key in BASE_KEYS:  # the config is what a person edits to point at another base
        adapter.metadata.pop(key, None)
        if config[key] is not None:
            adapter.metadata[key] = config[key]
    return adapter


def read_config(folder: Path) -> dict[str, Any]:
    """The validated ``shira_config.json`` of ``folder``; ShiraError naming the file and the fix otherwise."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        peft = (
            " It holds adapter_config.json: a PEFT folder, loaded with peft.PeftModel.from_pretrained."
            if (folder / "adapter_config.json").exists()
            else ""
        )
        raise ShiraError(
            f"{folder}: no {CONFIG_FILE}, so it is not a folder written by SparseAdapter.save_pretrained "
            f"({', '.join(FOLDER_FILES)}).{peft} Read a single adapter file with SparseAdapter.load(path)"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ShiraError(
            f"{path}: not valid JSON ({error}); save the folder again with adapter.save_pretrained(folder)"
        ) from None
    if not isinstance(config, dict):
        raise ShiraError(
            f"{path}: holds a JSON {type(config).__name__}, expected an object; save the folder again with adapter.save_pretrained(folder)"
        )
    if config.get("format") != FOLDER_FORMAT:
        raise ShiraError(
            f"{path}: format={config.get('format')!r}, expected {FOLDER_FORMAT!r}; not a shira_hooks adapter folder"
        )
    version = config.get("format_version")
    if version != FOLDER_FORMAT_VERSION or isinstance(version, bool):
        raise ShiraError(
            f"{path}: unknown format_version {version!r}; this shira_hooks reads version {FOLDER_FORMAT_VERSION}. "
            f"Upgrade shira_hooks to read newer folders"
        )
    checks = {
        "base_model_name_or_path": (
            lambda v: v is None or (isinstance(v, str) and v != ""),
            "a non-empty string or null",
        ),
        "revision": (lambda v: v is None or isinstance(v, str), "a string or null"),
        "license": (
            lambda v: v is None or (isinstance(v, str) and _LICENSE.fullmatch(v) is not None),
            "a Hub license id or null",
        ),
        "target_weights": (
            lambda v: isinstance(v, list) and bool(v) and all(isinstance(n, str) for n in v),
            "a non-empty list of parameter names",
        ),
        "num_entries": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
    }
    config.setdefault("license", None)  # folders written before the entry existed
    for key, (valid, allowed) in checks.items():
        if key not in config or not valid(config[key]):
            got = repr(config[key]) if key in config else "missing"
            raise ShiraError(
                f"{path}: {key!r} is {got}, expected {allowed}; fix it or save the folder again with adapter.save_pretrained(folder)"
            )
    return config


# --------------------------------------------------------------------------------------- Hub
def push_to_hub(
    adapter: SparseAdapter,
    repo_id: str,
    *,
    base_model_name_or_path: str | os.PathLike | None = None,
    revision: str | None = None,
    dtype: torch.dtype = torch.float32,
    license: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload SHiRA adapter",
) -> Any:
    """``SparseAdapter.push_to_hub``: ``save_pretrained`` into a temporary folder, then ``HfApi.upload_folder``."""
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ImportError("SparseAdapter.push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    with tempfile.TemporaryDirectory(prefix="shira_hub_") as scratch:
        folder = save_pretrained(
            adapter,
            Path(scratch) / "adapter",
            base_model_name_or_path=base_model_name_or_path,
            revision=revision,
            dtype=dtype,
            license=license,
        )
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)


FOLDER = formats.Format(
    "folder", recognises=Path.is_dir, read=from_pretrained, write=save_pretrained, upload=push_to_hub
)
