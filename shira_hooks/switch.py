"""``apply`` / ``remove``: load a SHiRA adapter by overwriting its entries in place (paper §3.2, App. B).

``W.view(-1)[idx] = cast(W_orig[idx] + alpha * S)`` (computed in float32, float64 for float64
weights; ``alpha=0`` writes the originals unchanged) with ``index_copy_`` (the fastest in-place
scatter on CPU for float32 and bfloat16 alike; ``scatter_`` is a slow path for bfloat16), and
``remove`` writes ``W_orig[idx]`` back. Parameters keep their identity and storage.

What is precomputed, so that switching costs two ``index_copy_`` calls per weight:

* on the adapter, per weight, when it is first applied: the int64 indices ``index_copy_`` needs, the
  verified base values at the indices (these are the originals ``remove`` writes back), and the
  values written for the last ``alpha`` used;
* per weight, the ``Tensor._version`` counter after each of our writes: while it is unchanged
  nobody else has written to the weight, so a base verified once is still the base and the
  fingerprint need not be hashed again. Writes through ``.data`` and fused optimizer kernels
  (``torch._fused_adamw_``) bypass the counter: if the base may be trained or edited that way
  between applies, use ``check_base="always"``.

Several adapters may be applied at once. Removal is allowed in any order and restores the base bit
for bit: removing an adapter that is not the last one applied removes the ones above it, removes
it, and re-applies them, which leaves exactly the weights that applying them without it gives.
"""

from __future__ import annotations

import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ._io import digest
from .adapter import SparseAdapter, SparseDelta, dtype_name
from .errors import ShiraError

_tokens = itertools.count(1)


@dataclass(eq=False)
class _Prepared:
    """Per-weight precomputation cached on an adapter (``adapter._prepared[name]``)."""

    index: torch.Tensor  # (k,) int64 indices for index_copy_, on the weight's device
    delta: torch.Tensor  # (k,) float32 S
    base: torch.Tensor | None = None  # (k,) verified base values, weight dtype
    base_token: tuple[int, int] | None = None  # (id(param), token) the base was verified against
    alpha: float | None = None
    written: torch.Tensor | None = None  # (k,) cast(base + alpha * S) for `alpha`


@dataclass(eq=False)
class _WeightState:
    """What this module knows about one weight of a model."""

    token: int  # changes whenever someone else writes to the weight
    version: int  # param._version after our last write
    flat: torch.Tensor  # param.detach().view(-1), made once
    stack: list = field(default_factory=list)  # _Applied entries active on this weight, oldest first


@dataclass(eq=False)
class _Applied:
    """One adapter's write into one weight."""

    name: str
    param: nn.Parameter
    prepared: _Prepared
    originals: torch.Tensor  # (k,) values before the write, weight dtype


class _ModelState:
    def __init__(self) -> None:
        self.weights: dict[int, _WeightState] = {}
        self.stack: list[AppliedAdapter] = []  # active applications, oldest first

    def weight(self, param: nn.Parameter) -> _WeightState:
        """The state of ``param``, with a new token if anybody else has written to it since we did."""
        state = self.weights.get(id(param))
        if state is None:
            state = self.weights[id(param)] = _WeightState(next(_tokens), param._version, param.detach().view(-1))
        elif state.flat.data_ptr() != param.data_ptr():  # `param.data = ...`, .to(): new storage, same stack
            state.token, state.version, state.flat = next(_tokens), param._version, param.detach().view(-1)
        elif param._version != state.version:
            state.token, state.version = next(_tokens), param._version
        return state


_MODELS: "weakref.WeakKeyDictionary[nn.Module, _ModelState]" = weakref.WeakKeyDictionary()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 weights: never less precise than the weight."""
    return torch.promote_types(dtype, torch.float32)


def _written(originals: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """cast(originals + alpha * S); exactly the originals for alpha == 0 (-0.0 stays -0.0)."""
    if alpha == 0:
        return originals.clone()
    compute = _compute_dtype(originals.dtype)
    return (originals.to(compute) + alpha * delta.to(compute)).to(originals.dtype)


def _prepared(adapter: SparseAdapter, name: str, delta: SparseDelta, device: torch.device) -> _Prepared:
    cache = adapter.__dict__.setdefault("_prepared", {})
    prep = cache.get(name)
    if prep is None or prep.index.device != device:
        prep = cache[name] = _Prepared(delta.indices.to(device, torch.int64), delta.values.to(device, torch.float32))
    return prep


def _base_values(state: _WeightState, param: nn.Parameter, index: torch.Tensor) -> torch.Tensor:
    """Base values of ``param`` at ``index``: current values with active adapters' writes undone."""
    values = param.detach().view(-1).index_select(0, index)
    for applied in reversed(state.stack):
        theirs = applied.prepared.index
        position = torch.searchsorted(theirs, index).clamp_(max=theirs.numel() - 1)
        hit = theirs[position] == index
        values[hit] = applied.originals[position[hit]]
    return values


class AppliedAdapter:
    """Handle returned by ``apply``: ``remove()`` (idempotent, also via ``with``) restores the weights."""

    def __init__(self, model: nn.Module, adapter: SparseAdapter, alpha: float, targets: list, skipped: list[str]):
        self.model = model
        self.adapter = adapter
        self.alpha = alpha
        self.skipped = skipped  # module names absent from the model (strict=False)
        self._targets: list[tuple[str, nn.Parameter, _Prepared]] = targets
        self._entries: list[_Applied] = []  # the writes currently in the model

    @property
    def active(self) -> bool:
        return bool(self._entries)

    def __repr__(self) -> str:
        return f"AppliedAdapter({self.adapter!r}, alpha={self.alpha:g}, active={self.active})"

    def __enter__(self) -> "AppliedAdapter":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @torch.no_grad()
    def _write(self, state: _ModelState) -> None:
        """Write alpha * S on top of the current weights; undo everything if a write fails."""
        try:
            for name, param, prep in self._targets:
                weight = state.weight(param)
                flat = weight.flat
                if not weight.stack and prep.base_token == (id(param), weight.token):
                    originals = prep.base  # fast path: the verified base is what is there now
                    if prep.alpha != self.alpha:
                        prep.written, prep.alpha = _written(prep.base, prep.delta, self.alpha), self.alpha
                    values = prep.written
                else:  # stacked on another adapter: read what is there
                    originals = flat.index_select(0, prep.index)
                    values = _written(originals, prep.delta, self.alpha)
                flat.index_copy_(0, prep.index, values)
                weight.version = param._version
                entry = _Applied(name, param, prep, originals)
                weight.stack.append(entry)
                self._entries.append(entry)
        except BaseException:
            self._restore(state)
            raise
        state.stack.append(self)

    @torch.no_grad()
    def _restore(self, state: _ModelState) -> None:
        for entry in reversed(self._entries):
            weight = state.weight(entry.param)
            weight.flat.index_copy_(0, entry.prepared.index, entry.originals)
            weight.version = entry.param._version
            if entry in weight.stack:
                weight.stack.remove(entry)
        self._entries = []
        if self in state.stack:
            state.stack.remove(self)

    def remove(self) -> None:
        """Restore the values this adapter overwrote, bit for bit. Safe to call twice.

        If adapters applied after this one are still active, they are removed first and applied
        again afterwards, so the result equals never having applied this one.
        """
        if not self._entries:
            return
        state = _MODELS[self.model]
        above = state.stack[state.stack.index(self) + 1 :]
        for other in reversed(above):
            other._restore(state)
        self._restore(state)
        for other in above:
            other._write(state)


def _find_parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """``model.get_parameter(name)`` or None, through the module dicts (several times faster)."""
    *path, leaf = name.split(".")
    module = model
    for part in path:
        module = module._modules.get(part)
        if module is None:
            return None
    return module._parameters.get(leaf)


def _check(model: nn.Module, adapter: SparseAdapter, state: _ModelState, strict: bool, check_base: bool | str):
    """Validate every module before anything is written; returns (targets, skipped names)."""
    targets, skipped = [], []
    for name, delta in adapter.deltas.items():
        param = _find_parameter(model, name)
        if param is None:
            if strict:
                suffix = ".".join(name.split(".")[-2:])
                similar = [n for n, _ in model.named_parameters() if n.endswith(suffix)][:3]
                raise ShiraError(
                    f"adapter module '{name}' is not a parameter of the model (similar names: {similar or 'none'}); "
                    f"apply it to the model it was trained on, or pass strict=False to skip missing modules"
                )
            skipped.append(name)
            continue
        if tuple(param.shape) != tuple(delta.shape):
            raise ShiraError(f"adapter module '{name}' has shape {list(delta.shape)}, the model's weight is {list(param.shape)}")
        if check_base and param.dtype != delta.dtype:
            raise ShiraError(
                f"adapter module '{name}' was trained on a {dtype_name(delta.dtype)} weight, the model's is "
                f"{dtype_name(param.dtype)}; load the model in {dtype_name(delta.dtype)}, or pass check_base=False "
                f"to apply it anyway"
            )
        if not param.is_contiguous():
            raise ShiraError(f"model weight '{name}' is not contiguous; flat indices need a contiguous weight")
        prep = _prepared(adapter, name, delta, param.device)
        weight = state.weight(param)
        if check_base and delta.fingerprint:
            if check_base == "always" or prep.base_token != (id(param), weight.token):
                base = _base_values(weight, param, prep.index)
                if digest(base) != delta.fingerprint:
                    raise ShiraError(
                        f"adapter module '{name}': the model's base values at the adapter's entries do not match "
                        f"the adapter's fingerprint (it was trained on other weights); use the base model it was "
                        f"trained from, or pass check_base=False"
                    )
                prep.base, prep.base_token, prep.alpha = base, (id(param), weight.token), None
        elif prep.base_token != (id(param), weight.token):  # unverified: read the base as it is
            prep.base, prep.base_token, prep.alpha = _base_values(weight, param, prep.index), (id(param), weight.token), None
        targets.append((name, param, prep))
    if not targets:
        raise ShiraError(f"none of the adapter's {len(adapter.deltas)} modules is a parameter of the model (e.g. '{next(iter(adapter.deltas))}')")
    return targets, skipped


def apply(
    model: nn.Module,
    adapter: SparseAdapter,
    alpha: float = 1.0,
    *,
    strict: bool = True,
    check_base: bool | Literal["always"] = True,
) -> AppliedAdapter:
    """Load ``adapter`` into ``model`` in place: ``W[idx] = cast(W_orig[idx] + alpha * S)``.

    Args:
        model: the base model (its parameter names must be the adapter's module names).
        adapter: a ``SparseAdapter`` (``extract()``, ``SparseAdapter.load`` or ``fuse``).
        alpha: strength; 0 leaves every weight bit-identical.
        strict: with False, adapter modules missing from the model are skipped and listed in
            ``handle.skipped`` (shape, dtype and fingerprint mismatches always raise).
        check_base: verify dtype and fingerprint of the base at the adapter's entries (hashed
            once, then trusted while ``Tensor._version`` shows no other write); "always" hashes on
            every call; False skips both checks.

    Returns:
        An ``AppliedAdapter``; ``remove()`` restores the original values bit for bit.

    Raises:
        ShiraError: a module is missing (strict), or its shape, dtype or base fingerprint does not
            match. Raised before the first write: the model is untouched.

    Example:
        >>> adapter = shira_hooks.SparseAdapter.load("paint.safetensors")
        >>> with shira_hooks.apply(model, adapter, alpha=0.8):
        ...     images = pipe(prompt)
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ShiraError(f"alpha={alpha!r}; it must be a finite number (the adapter's strength, 1.0 = as trained)")
    state = _MODELS.setdefault(model, _ModelState())
    targets, skipped = _check(model, adapter, state, strict, check_base)
    handle = AppliedAdapter(model, adapter, float(alpha), targets, skipped)
    handle._write(state)
    return handle


def applied(model: nn.Module) -> list[AppliedAdapter]:
    """The adapters currently applied to ``model``, oldest first."""
    state = _MODELS.get(model)
    return list(state.stack) if state is not None else []
