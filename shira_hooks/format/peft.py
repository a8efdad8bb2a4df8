"""Conversion between a ``SparseAdapter`` and a PEFT SHiRA adapter folder (``peft.ShiraConfig``).

What PEFT (>= 0.17) expects, read from ``peft/tuners/shira/``:

* ``adapter_config.json``: a ``ShiraConfig`` (``peft_type`` ``"SHIRA"``, one global ``r``,
  ``target_modules``); only ``nn.Linear`` modules can be adapted.
* ``adapter_model.safetensors``: per adapted module ``<path>`` two tensors,
  ``base_model.model.<path>.shira_weight`` (K,) float32 and ``base_model.model.<path>.shira_indices``
  (2, K) int32 (rows, columns), where K must be exactly ``r * (m + n)`` for an (m, n) weight and
  at most ``m * n``. The delta is the sparse COO matrix of those values (duplicates add up),
  times ``scaling`` (1.0 unless set at inference).

A ``SparseAdapter`` has any k per weight, so ``to_peft`` pads each weight up to ``r * (m + n)``
entries with ``-0.0`` deltas, and records in the safetensors header what it padded (key
``shira_hooks.modules``: shape, dtype, fingerprint and the number k of real entries, which come
first in each tensor) plus the adapter's metadata (``shira_hooks.metadata``). PEFT ignores those
header entries; ``from_peft`` uses them to give back exactly the adapter that was written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeGuard, cast

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from .._base import atomic_write, digest, read_safetensors
from ..errors import ShiraError
from . import formats
from .adapter import SparseAdapter, SparseDelta, dtype_name, parse_dtype

if TYPE_CHECKING:
    from peft import PeftModel, ShiraConfig

PREFIX = "base_model.model."  # PEFT's name for the wrapped model inside a PeftModel
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MODULES_KEY = "shira_hooks.modules"  # header entry: {weight name: {shape, dtype, fingerprint, entries}}
METADATA_KEY = "shira_hooks.metadata"  # header entry: the adapter's own metadata, as JSON


# ------------------------------------------------------------------------------------ export
def module_path(name: str) -> str:
    """``model.layers.0.q_proj.weight`` -> ``model.layers.0.q_proj``; ShiraError for anything else."""
    path, _, leaf = name.rpartition(".")
    if leaf != "weight" or not path:
        raise ShiraError(
            f"adapter weight '{name}': PEFT SHiRA adapts the `weight` of nn.Linear modules, so only names "
            f"'<module>.weight' can be exported; leave '{name}' out of the adapter passed to to_peft"
        )
    return path


_LISTED = 10  # unsupported weights named in to_peft's error; the filter it gives covers them all


def _check_exportable(adapter: SparseAdapter, base: nn.Module | None) -> None:
    """Raise ShiraError unless every delta is the weight of an nn.Linear; it names the weights that are not.

    The message lists them (the first ``_LISTED``, and how many more) with a one-line filter that
    leaves out every one of them, so a UNet adapter with dozens of convs is fixed in one go.
    """
    unsupported = {}  # weight name -> why it cannot be exported
    for name, delta in adapter.deltas.items():
        path, _, leaf = name.rpartition(".")
        if leaf != "weight" or not path:
            unsupported[name] = "not a module's weight"
        elif len(delta.shape) != 2:
            unsupported[name] = f"shape {list(delta.shape)}"
        elif base is not None and not isinstance(module := _base_module(base, path, "to_peft"), torch.nn.Linear):
            unsupported[name] = f"a {type(module).__name__} in the base"
    if unsupported:
        listed = ", ".join(f"'{name}' ({why})" for name, why in list(unsupported.items())[:_LISTED])
        more = f" and {len(unsupported) - _LISTED} more" if len(unsupported) > _LISTED else ""
        keep = (
            "isinstance(base.get_submodule(n.rpartition('.')[0]), torch.nn.Linear)"
            if base is not None
            else "n.endswith('.weight') and len(d.shape) == 2"
        )
        raise ShiraError(
            f"to_peft: PEFT SHiRA adapts only the weights of nn.Linear modules, and {len(unsupported)} of the adapter's "
            f"{len(adapter.deltas)} weights are not: {listed}{more}. Export the others with "
            f"SparseAdapter({{n: d for n, d in adapter.deltas.items() if {keep}}}, adapter.metadata).to_peft(...)"
        )
    if base is None:
        return
    for name, delta in adapter.deltas.items():
        module = _base_module(base, module_path(name), "to_peft")
        assert isinstance(module, torch.nn.Linear)  # checked above
        if tuple(module.weight.shape) != tuple(delta.shape):
            raise ShiraError(
                f"adapter weight '{name}' has shape {list(delta.shape)}, the base's is {list(module.weight.shape)}; "
                f"pass the base model the adapter was trained on"
            )
        base_values = module.weight.detach().reshape(-1)[delta.indices.long().to(module.weight.device)]
        if delta.fingerprint and digest(base_values) != delta.fingerprint:
            raise ShiraError(
                f"adapter weight '{name}': the base's values at the adapter's entries do not match its fingerprint "
                f"{delta.fingerprint} (it was trained on other weights); pass the base model it was trained on"
            )


def peft_rank(adapter: SparseAdapter) -> int:
    """The smallest r with ``r * (m + n) >= k`` for every (m, n) weight of k entries.

    Raises:
        ShiraError: some weight cannot hold ``r * (m + n)`` entries (PEFT requires at most m * n).
    """
    fits = {name: math.ceil(d.indices.numel() / sum(d.shape)) for name, d in adapter.deltas.items()}
    widest = max(fits, key=lambda name: fits[name])
    r = max(1, fits[widest])
    for name, delta in adapter.deltas.items():
        m, n = delta.shape
        if r * (m + n) > m * n:
            k = adapter.deltas[widest].indices.numel()
            raise ShiraError(
                f"adapter weight '{name}' ({m}x{n}) cannot be exported: PEFT SHiRA keeps r*(m+n) entries in every "
                f"layer with one r, at most m*n, and '{widest}' ({k} entries of {list(adapter.deltas[widest].shape)}) "
                f"needs r={r}, i.e. {r * (m + n)} > {m * n} entries here; export a sparser adapter, or the "
                f"two weights in separate adapters (SparseAdapter({{name: delta, ...}}))"
            )
    return r


def free_indices(indices: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` smallest flat indices not in ``indices`` (int64, CPU): where padding goes."""
    # Among the first count + k integers at most k are taken, so at least count are free.
    candidates = torch.arange(count + indices.numel(), dtype=torch.int64)
    return candidates[~torch.isin(candidates, indices)][:count]


def to_peft(
    adapter: SparseAdapter,
    folder: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    base: nn.Module | None = None,
) -> Path:
    """Write ``adapter_model.safetensors`` then ``adapter_config.json``, each atomically (see SparseAdapter.to_peft)."""
    try:
        from peft import ShiraConfig
    except ImportError as error:
        raise ImportError(f"SparseAdapter.to_peft needs peft>=0.17 (pip install peft): {error}") from None
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ShiraError(f"to_peft: {folder} is a file; pass a folder (PEFT adapters are a folder of two files)")
    _check_exportable(adapter, base)
    r = peft_rank(adapter)
    tensors, modules = {}, {}
    for name, delta in adapter.deltas.items():
        (m, n), indices = delta.shape, delta.indices.long().cpu()
        k = indices.numel()
        padding = free_indices(indices, r * (m + n) - k)
        flat = torch.cat([indices, padding])  # (r*(m+n),): the k real entries first
        # -0.0 is the exact additive identity (x + -0.0 == x bit for bit, a -0.0 weight included).
        values = torch.cat([delta.values.float().cpu(), torch.full((padding.numel(),), -0.0)])
        path = PREFIX + module_path(name)
        tensors[f"{path}.shira_indices"] = torch.stack([flat // n, flat % n]).to(torch.int32)  # (2, K) rows, columns
        tensors[f"{path}.shira_weight"] = values
        modules[name] = {
            "shape": [m, n],
            "dtype": dtype_name(delta.dtype),
            "fingerprint": delta.fingerprint,
            "entries": k,
        }
    header = {"format": "pt", MODULES_KEY: json.dumps(modules), METADATA_KEY: json.dumps(adapter.metadata)}
    config = ShiraConfig(
        r=r,
        target_modules=sorted(module_path(name) for name in adapter.deltas),
        base_model_name_or_path=base_model_name_or_path,
        inference_mode=True,
    ).to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}
    atomic_write(folder / WEIGHTS_NAME, save_safetensors(tensors, metadata=header))
    atomic_write(folder / CONFIG_NAME, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return folder


# ------------------------------------------------------------------------------------ import
def _base_module(base: nn.Module, path: str, where: str) -> nn.Module:
    try:
        return base.get_submodule(path)
    except AttributeError:
        raise ShiraError(
            f"{where}: the base model has no module '{path}'; pass the base model the adapter was trained on"
        ) from None


def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, str], dict[str, torch.Tensor]]:
    """(config, safetensors header, tensors) of a PEFT SHiRA folder, or ShiraError saying what was found."""
    if not folder.exists():
        raise FileNotFoundError(f"from_peft: no folder {folder}")
    if not folder.is_dir():
        raise ShiraError(f"from_peft: {folder} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    found = sorted(p.name for p in folder.iterdir())
    if CONFIG_NAME not in found:
        raise ShiraError(
            f"{folder}: not a PEFT adapter folder, no {CONFIG_NAME} (found {found[:10]}); pass the folder PeftModel.save_pretrained wrote"
        )
    try:
        config = json.loads((folder / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShiraError(f"{folder / CONFIG_NAME}: not JSON ({error}); save the adapter again") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != "SHIRA":
        raise ShiraError(
            f"{folder / CONFIG_NAME}: peft_type {peft_type!r}, not 'SHIRA'; from_peft reads PEFT SHiRA adapters "
            f"(ShiraConfig) only, a dense adapter such as LoRA has no sparse form"
        )
    if config.get("modules_to_save"):
        raise ShiraError(
            f"{folder / CONFIG_NAME}: modules_to_save={config['modules_to_save']} are trained in full, which a sparse "
            f"adapter cannot hold; train without modules_to_save, or keep those modules' weights separately"
        )
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise ShiraError(f"{folder / CONFIG_NAME}: r={config.get('r')!r}; PEFT SHiRA needs a positive integer r")
    if WEIGHTS_NAME not in found:
        fix = (
            "it is a pickle, which shira_hooks does not load; save it again with save_pretrained(folder, safe_serialization=True)"
            if "adapter_model.bin" in found
            else "pass the folder PeftModel.save_pretrained wrote"
        )
        raise ShiraError(f"{folder}: no {WEIGHTS_NAME} (found {found[:10]}); {fix}")
    header, tensors = read_safetensors(folder / WEIGHTS_NAME)
    return config, header, tensors


def _folder_layers(where: str, tensors: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (indices (2, K) int64, values (K,) float32)} from PEFT's state dict keys."""
    suffixes = (".shira_indices", ".shira_weight")
    odd = sorted(key for key in tensors if not (key.startswith(PREFIX) and key.endswith(suffixes)))
    if odd:
        raise ShiraError(
            f"{where}: tensor key(s) {odd[:5]} are not SHiRA '{PREFIX}<module>.shira_weight/.shira_indices'; save the SHiRA adapter alone"
        )
    layers = {}
    for key in sorted(k for k in tensors if k.endswith(".shira_weight")):
        path = key[len(PREFIX) : -len(".shira_weight")]
        indices, values = tensors.get(f"{PREFIX}{path}.shira_indices"), tensors[key]
        if (
            indices is None
            or indices.dim() != 2
            or indices.shape[0] != 2
            or values.dim() != 1
            or indices.shape[1] != values.numel()
        ):
            got = None if indices is None else list(indices.shape)
            raise ShiraError(
                f"{where}: module '{path}': shira_indices {got} and shira_weight {list(values.shape)}; expected (2, K) and (K,)"
            )
        if values.numel() == 0:
            raise ShiraError(
                f"{where}: module '{path}': K=0 entries; PEFT SHiRA keeps r*(m+n) >= 1 entries per module, the file is corrupt. Save the adapter again"
            )
        layers[path] = (indices.to(torch.int64), values.float())  # float indices: PEFT's Windows files
    missing = sorted(
        k for k in tensors if k.endswith(".shira_indices") and k.removesuffix("_indices") + "_weight" not in tensors
    )
    if missing:
        raise ShiraError(f"{where}: {missing[:5]} without their .shira_weight; save the adapter again")
    if not layers:
        raise ShiraError(
            f"{where}: no SHiRA tensors in the file; pass a folder saved from a PeftModel with a ShiraConfig"
        )
    return layers


class _ShiraLayer(Protocol):
    """What ``_live_layers`` reads of a PEFT ``ShiraLayer`` (found by its ``shira_indices``), per adapter name."""

    shira_indices: dict[str, torch.Tensor]
    shira_weight: nn.ParameterDict
    scaling: dict[str, float]
    merged_adapters: list[str]

    def get_base_layer(self) -> nn.Linear: ...  # PEFT SHiRA adapts nn.Linear only


def _live_layers(
    model: PeftModel, adapter_name: str | None
) -> tuple[int, dict[str, Any], dict[str, tuple[torch.Tensor, ...]]]:
    """(r, config as a dict, {module path: (indices, values * scaling, base weight)}) of a live PeftModel."""
    name = adapter_name or model.active_adapter
    configs = model.peft_config
    if name not in configs:
        raise ShiraError(
            f"from_peft: the PeftModel has no adapter {name!r} (it has {sorted(configs)}); pass adapter_name="
        )
    config = cast("ShiraConfig", configs[name])  # a ShiraConfig once its peft_type is SHIRA, checked next
    kind = str(getattr(config.peft_type, "value", config.peft_type))  # PeftType is a str Enum
    if kind != "SHIRA":
        raise ShiraError(
            f"from_peft: adapter {name!r} is a {kind} adapter, not SHIRA; from_peft reads PEFT SHiRA adapters only"
        )
    if config.modules_to_save:
        raise ShiraError(
            f"from_peft: adapter {name!r} has modules_to_save={sorted(config.modules_to_save)} trained in full, which a "
            f"sparse adapter cannot hold; train without modules_to_save, or keep those modules' weights separately"
        )
    layers: dict[str, tuple[torch.Tensor, ...]] = {}
    for path, found in model.named_modules():
        if name not in getattr(found, "shira_indices", {}):
            continue
        module = cast(_ShiraLayer, found)  # a PEFT ShiraLayer: it holds shira_indices for this adapter
        if name in module.merged_adapters:
            raise ShiraError(
                f"from_peft: module '{path.removeprefix(PREFIX)}' has adapter {name!r} merged into its weight, so the base weight is gone; "
                f"call peft_model.unmerge_adapter() first"
            )
        values = module.shira_weight[name].detach().float() * module.scaling[name]
        layers[path.removeprefix(PREFIX)] = (
            module.shira_indices[name].to(torch.int64).cpu(),
            values.cpu(),
            module.get_base_layer().weight,
        )
    if not layers:
        raise ShiraError(f"from_peft: no SHiRA layer holds adapter {name!r}")
    return config.r, {"mask_type": config.mask_type, "random_seed": config.random_seed}, layers


def _base_weight(base: nn.Module, path: str, where: str) -> torch.Tensor:
    weight = getattr(_base_module(base, path, where), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ShiraError(
            f"{where}: the base model's module '{path}' has no weight; pass the base model the adapter was trained on"
        )
    return weight


def _recorded(where: str, header: dict[str, str], layers: dict[str, tuple]) -> tuple[dict[str, dict], dict[str, str]]:
    """What to_peft wrote in the header: ({module path: {shape, dtype, fingerprint, entries}}, metadata); empty if not.

    Each field is checked for its type and range before it is used: a header edited by hand or written
    by something else gives a ShiraError naming the entry, never a raw TypeError.
    """
    fix = "the header was not written by to_peft or was edited; write the folder again with to_peft"
    try:
        modules, metadata = json.loads(header.get(MODULES_KEY, "{}")), json.loads(header.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as error:
        raise ShiraError(
            f"{where}: header entry {MODULES_KEY!r} or {METADATA_KEY!r} is not JSON ({error}); {fix}"
        ) from None
    for key, value in ((MODULES_KEY, modules), (METADATA_KEY, metadata)):
        if not isinstance(value, dict):
            raise ShiraError(
                f"{where}: header entry {key!r} is a JSON {type(value).__name__}, expected an object; {fix}"
            )
    recorded = {}
    for name, info in modules.items():
        path = name.removesuffix(".weight")
        problem = _recorded_problem(name, info, layers.get(path))
        if problem:
            raise ShiraError(f"{where}: header entry {MODULES_KEY!r}, weight '{name}': {problem}; {fix}")
        recorded[path] = info
    return recorded, metadata


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _recorded_problem(name: str, info: Any, layer: tuple | None) -> str | None:
    """What is wrong with one module's entry of the to_peft header, or None."""
    if not name.endswith(".weight") or layer is None:
        return "names no SHiRA module of the file"
    if not isinstance(info, dict):
        return f"{info!r:.80} is not an object"
    shape = info.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_count(s) and s >= 1 for s in shape):
        return f"shape {shape!r} is not two positive ints"
    try:
        parse_dtype(info.get("dtype"), "")
    except ShiraError as error:
        return str(error).removeprefix(": ")
    if not isinstance(info.get("fingerprint"), str):
        return f"fingerprint {info.get('fingerprint')!r} is not a string"
    entries, stored = info.get("entries"), layer[1].numel()
    if not _is_count(entries) or not 1 <= entries <= stored:
        return f"entries={entries!r} is not an int in [1, {stored}] (the module stores {stored})"
    return None


def _infer_shape(where: str, path: str, r: int, indices: torch.Tensor) -> tuple[int, int]:
    """(m, n) of a weight from PEFT's K = r * (m + n) and the largest row and column used, if that fixes it."""
    total = indices.shape[1] // r
    rows, cols = int(indices[0].max()) + 1, int(indices[1].max()) + 1
    if indices.shape[1] % r or rows + cols != total:
        raise ShiraError(
            f"{where}: module '{path}': the folder does not record the weight's shape, and {indices.shape[1]} entries "
            f"at r={r} with rows < {rows}, columns < {cols} do not fix it; pass base=<the base model> to from_peft"
        )
    return rows, cols


def from_peft(
    source: str | os.PathLike | nn.Module, base: nn.Module | None, adapter_name: str | None
) -> tuple[dict[str, SparseDelta], dict[str, str], str]:
    """(deltas, metadata, context) for SparseAdapter.from_peft, which documents the rules."""
    recorded: dict[str, dict] = {}
    metadata: dict[str, str] = {}
    if isinstance(source, torch.nn.Module):
        from peft import PeftModel

        if not isinstance(source, PeftModel):
            raise ShiraError(
                f"from_peft: got a {type(source).__name__}, not a peft.PeftModel; pass the model get_peft_model or PeftModel.from_pretrained returned, or its folder"
            )
        if base is not None:
            raise ShiraError("from_peft: base= is only for a folder; a PeftModel already holds its base weights")
        r, config, live = _live_layers(source, adapter_name)
        where = "from_peft"
        layers = {path: (indices, values) for path, (indices, values, _) in live.items()}
        weights = {path: weight for path, (_, _, weight) in live.items()}
    else:
        folder = Path(source) if adapter_name in (None, "default") else Path(source) / adapter_name  # PEFT's layout
        config, header, tensors = _read_folder(folder)
        r, where = config["r"], str(folder / WEIGHTS_NAME)
        layers = _folder_layers(where, tensors)
        recorded, metadata = _recorded(where, header, layers)
        weights = {path: _base_weight(base, path, where) for path in layers} if base is not None else {}
    if not metadata:
        metadata = {
            "mask": f"peft {config.get('mask_type', 'random')}",
            "seed": str(config.get("random_seed")),
            "created_by": f"PEFT ShiraConfig r={r}, read by shira_hooks.from_peft",
        }

    deltas = {}
    for path, (indices, values) in layers.items():
        info, weight = recorded.get(path), weights.get(path)
        if weight is not None:
            if (
                weight.dim() != 2
                or r * sum(weight.shape) != values.numel()
                or (info and info["shape"] != list(weight.shape))
            ):
                raise ShiraError(
                    f"{where}: module '{path}' holds {values.numel()} entries (r={r}, so m+n = {values.numel() / r:g}), but the "
                    f"base's weight has shape {list(weight.shape)}; pass the base model the adapter was trained on"
                )
            m, n = weight.shape
        elif info:
            m, n = info["shape"]
        else:
            m, n = _infer_shape(where, path, r, indices)
        low = indices.min(dim=1).values  # (2,): the smallest row and column
        if int(low.min()) < 0:
            raise ShiraError(
                f"{where}: module '{path}': negative indices (smallest row {int(low[0])}, column {int(low[1])}); rows and "
                f"columns start at 0, the file is corrupt. Save the adapter again"
            )
        if int(indices[0].max()) >= m or int(indices[1].max()) >= n:
            raise ShiraError(
                f"{where}: module '{path}': indices reach row {int(indices[0].max())}, column {int(indices[1].max())}, outside its {m}x{n} weight"
            )
        # to_peft's padding (after the first `entries` values) is dropped while it is still zero.
        keep = torch.ones(values.numel(), dtype=torch.bool)
        if info:
            keep[info["entries"] :] = values[info["entries"] :] != 0
        flat = indices[0, keep] * n + indices[1, keep]
        # sorted; duplicates add, as in PEFT. check_invariants is explicit: left implicit, torch warns that it skips it
        coo = torch.sparse_coo_tensor(flat.unsqueeze(0), values[keep], (m * n,), check_invariants=True).coalesce()
        flat = coo.indices()[0].to(torch.int32 if m * n < 2**31 else torch.int64)
        # the fingerprint to_peft recorded, when the entries kept are the index set it recorded
        recorded_fingerprint = info["fingerprint"] if info is not None and bool(keep.sum() == info["entries"]) else ""
        if weight is not None:
            dtype, fingerprint = weight.dtype, digest(weight.detach().reshape(-1)[flat.long().to(weight.device)])
            if recorded_fingerprint and recorded_fingerprint != fingerprint:
                raise ShiraError(
                    f"{where}: module '{path}': the base's values at the adapter's entries do not match the recorded "
                    f"fingerprint {recorded_fingerprint}; pass the base model it was trained on, or leave out base="
                )
        else:
            dtype = parse_dtype(info["dtype"], f"{where}: module '{path}'") if info else torch.float32
            fingerprint = recorded_fingerprint
        deltas[f"{path}.weight"] = SparseDelta((m, n), dtype, flat, coo.values().contiguous(), fingerprint)
    return deltas, {str(k): str(v) for k, v in metadata.items()}, f"{where}: "


def read(
    source: str | os.PathLike | nn.Module,
    *,
    device: str | torch.device = "cpu",
    base: nn.Module | None = None,
    adapter_name: str | None = None,
) -> SparseAdapter:
    """``SparseAdapter.from_peft`` (and ``formats.read`` of a PEFT folder): the adapter, its tensors on ``device``."""
    deltas, metadata, context = from_peft(source, base, adapter_name)
    device = torch.device(device)
    if device.type != "cpu":
        deltas = {
            name: dataclasses.replace(d, indices=d.indices.to(device), values=d.values.to(device))
            for name, d in deltas.items()
        }
    return SparseAdapter(deltas, metadata, context=context)


FOLDER = formats.Format(
    "peft", recognises=lambda path: path.is_dir() and (path / CONFIG_NAME).exists(), read=read, write=to_peft
)
