"""``apply`` / ``remove``: load a SHiRA adapter by overwriting its entries in place (paper §3.2, App. B).

``W.view(-1)[idx] = cast(W_orig[idx] + alpha * S)`` (computed in float32, float64 for float64
weights; ``alpha=0`` writes the originals unchanged) with ``index_copy_`` (the fastest in-place
scatter on CPU for float32 and bfloat16 alike; ``scatter_`` is a slow path for bfloat16), and
``remove`` writes ``W_orig[idx]`` back. Parameters keep their identity and storage.

Guarantees:

* Stacking: several adapters may be applied at once. Removal is allowed in any order and restores
  the base bit for bit: removing an adapter that is not the last one applied removes the ones above
  it, removes it, and re-applies them, which leaves exactly the weights that applying them without
  it gives.
* Threads: ``apply`` (validation and writes), ``remove`` and ``applied`` hold the model's reentrant
  lock, so threads may switch adapters on one model, and on several models sharing adapters, at
  once. (The lock makes each call atomic; a request that needs an adapter active during its forward
  pass must still keep others from switching meanwhile.)
* Devices, dtypes and layouts: any dense, non-overlapping layout works (row-major,
  ``channels_last``, transposed; ``_base.layout``): adapter indices stay logical row-major and are
  mapped to storage positions per device and strides. If the weight gets new storage between
  calls (``model.to(...)``, ``param.data = ...``), everything kept for the adapters applied to it
  follows it to its new device, dtype and layout at the next call (and nothing kept for removed
  ones stays on the old device), and the next apply verifies the base again. A layout with gaps
  raises ``ShiraError``. ``remove`` after a dtype change writes the originals cast to the new
  dtype: the base as that conversion made it.
* Memory: the switching state of a model lives in a table keyed weakly by the model, whose values
  refer to neither the model nor its parameters (only weakly): a model dropped with adapters still
  applied is freed, and so is an adapter dropped after ``remove``.

What is precomputed, so that switching costs two ``index_copy_`` calls per weight:

* Block adapters (``SparseDelta.block`` = B > 1) on row-major weights write whole runs:
  ``index_copy_`` of k/B rows of the weight's ``(numel // B, B)`` view, the same values into the
  same elements as the k single-entry writes (bit-identical), touching one cache line per run at
  B=16 in float32. Other layouts take the single-entry path.

* per model and adapter, per weight (``Prepared``): the int64 storage positions ``index_copy_``
  needs, the base values at them (the originals ``remove`` writes back) and the values written for
  the last ``alpha``. The S values are used as they are when already float32 on the weight's device.
  These are kept for the adapters currently applied and for the ``KEEP_RECENT`` most recently
  removed ones; older ones keep only the fact that the base was verified (so a later apply reads the
  base again but does not hash it). ``clear_cache(model)`` drops all of it for the adapters not
  applied now.
* per weight, the ``Tensor._version`` counter after each of our writes: while it is unchanged
  nobody else has written to the weight, so a base verified once is still the base and the
  fingerprint need not be hashed again. Writes through ``.data`` and fused optimizer kernels
  (``torch._fused_adamw_``) bypass the counter: if the base may be trained or edited that way
  between applies, use ``check_base="always"``.
"""

from __future__ import annotations

import math
import weakref
from typing import Literal, cast

import torch
from torch import nn

from .._base import digest
from ..errors import ShiraError
from ..format import SparseAdapter, as_adapter, dtype_name
from . import packing as _pack
from .plan import SwitchPlan, written_values
from .state import (
    KEEP_RECENT,
    STATES,
    STATES_LOCK,
    AdapterCache,
    Applied,
    ModelState,
    Prepared,
    WeightState,
    model_state,
)

__all__ = ["apply", "AppliedAdapter", "applied", "check", "clear_cache", "KEEP_RECENT"]


def _base_values(weight: WeightState, param: nn.Parameter, prep: Prepared) -> torch.Tensor:
    """Base values of ``param`` at the adapter's entries: current values with active writes undone."""
    values = prep.read(weight.storage(param))
    for applied in reversed(weight.stack):  # matched on the sorted logical indices (storage ones need not be)
        theirs = applied.prepared.logical
        assert theirs is not None and prep.logical is not None  # placed: by _check, and when applied
        position = torch.searchsorted(theirs, prep.logical).clamp_(max=theirs.numel() - 1)
        hit = theirs[position] == prep.logical
        values[hit] = applied.originals[position[hit]]
    if not weight.stack:
        weight.flat = None
    return values


class AppliedAdapter:
    """Handle returned by ``apply``: ``remove()`` (idempotent, also via ``with``) restores the weights.

    It holds the model weakly (``handle.model`` is None once the model is freed) and the adapter
    strongly (``handle.adapter``).
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: SparseAdapter,
        alpha: float,
        skipped: list[str],
        state: ModelState,
        cache: AdapterCache,
        targets: list,
    ):
        self._model = weakref.ref(model)
        self.adapter = adapter
        self.alpha = alpha
        self.skipped = skipped  # module names absent from the model (strict=False)
        self._state = state
        self._cache = cache
        self._targets: list[tuple[WeightState, Prepared]] = targets
        self._entries: list[Applied] = []  # the writes currently in the model, per weight
        self._plan: SwitchPlan | None = None  # applied through this plan instead (nothing else applied below it)

    @property
    def model(self) -> nn.Module | None:
        """The model (held weakly: None once it has been freed)."""
        return self._model()

    @property
    def active(self) -> bool:
        return bool(self._entries) or self._plan is not None

    def __repr__(self) -> str:
        return f"AppliedAdapter({self.adapter!r}, alpha={self.alpha:g}, active={self.active})"

    def __enter__(self) -> AppliedAdapter:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def _write_planned(self, plan: SwitchPlan, params: list[nn.Parameter]) -> None:
        """Write through ``plan`` (the model has nothing applied); undo everything if a write fails."""
        try:
            plan.apply(params, self.alpha)
        except BaseException:
            plan.restore(params)  # where nothing was written yet this writes the base over itself
            raise
        self._plan = plan
        self._state.stack.append(self)

    def _materialize(self) -> None:
        """Record a planned application as per-weight writes (what stacking and out-of-order removal use)."""
        plan, self._plan = self._plan, None
        assert plan is not None  # called only for a planned application
        for weight, prep in plan.targets:
            assert prep.base is not None  # a plan is built on bases read by the checks
            entry = Applied(weight, prep, prep.base)  # the plan wrote over the base it holds
            weight.stack.append(entry)
            self._entries.append(entry)

    @torch.no_grad()
    def _write(self) -> None:
        """Write alpha * S on top of the current weights (weights synced); undo everything if a write fails."""
        try:
            for weight, prep in self._targets:
                param = weight.param()
                if param is None:  # the module's parameter was replaced by another object
                    continue
                flat = weight.storage(param)
                assert prep.delta is not None  # placed by _check
                if not weight.stack and prep.base_token == weight.token:
                    originals = prep.base  # fast path: the base read (and verified) at this token is what is there
                    assert originals is not None  # read with base_token
                    if prep.alpha != self.alpha:
                        prep.written, prep.alpha = written_values(originals, prep.delta, self.alpha), self.alpha
                    values = prep.written
                    assert values is not None  # made with alpha, here or at an earlier write
                else:  # stacked on another adapter: read what is there
                    originals = prep.read(flat)
                    values = written_values(originals, prep.delta, self.alpha)
                prep.write(flat, values)
                weight.version = param._version
                entry = Applied(weight, prep, originals)
                weight.stack.append(entry)
                self._entries.append(entry)
        except BaseException:
            self._restore()
            raise
        self._state.stack.append(self)

    @torch.no_grad()
    def _restore(self) -> None:
        for entry in reversed(self._entries):
            weight, param = entry.weight, entry.weight.param()
            if param is not None:
                entry.prepared.write(weight.storage(param), entry.originals)
                weight.version = param._version
            weight.stack.remove(entry)
            if not weight.stack:
                weight.flat = None  # holds no storage while nothing is applied
        self._entries = []
        if self in self._state.stack:
            self._state.stack.remove(self)

    def remove(self) -> None:
        """Restore the values this adapter overwrote, bit for bit. Safe to call twice, from any thread.

        If adapters applied after this one are still active, they are removed first and applied
        again afterwards, so the result equals never having applied this one.

        Raises:
            ShiraError: a weight it wrote to has since been given a layout with gaps or another
                shape. Nothing has changed; fix the weight and call ``remove()`` again.
        """
        state = self._state
        with state.lock:
            if self._plan is not None:
                params = self._plan.current() if state.stack == [self] else None
                if params is not None:  # the serving switch: one write per storage
                    self._plan.restore(params)
                    self._plan = None
                    state.stack.remove(self)
                    self._cache.active -= 1
                    state.settle(self._cache)
                    return
                self._materialize()  # something changed: per weight, following moved storage
            if not self._entries:
                return
            above = state.stack[state.stack.index(self) + 1 :]
            for handle in (self, *above):  # everything that will be written, checked before the first write
                for entry in handle._entries:
                    weight, param = entry.weight, entry.weight.param()
                    if param is not None and (param._version != weight.version or not weight.same_storage(param)):
                        state.sync(weight, param)
            for other in reversed(above):
                other._restore()
            self._restore()
            self._cache.active -= 1
            state.settle(self._cache)
            for other in above:
                other._write()


def find_module(model: nn.Module, name: str) -> nn.Module | None:
    """The module holding parameter ``name`` (``model.get_submodule``), or None."""
    module = model
    for part in name.split(".")[:-1]:
        child = module._modules.get(part)
        if child is None:
            return None
        module = child
    return module


def _find_parameter(model: nn.Module, name: str) -> nn.Parameter | None:
    """``model.get_parameter(name)`` or None, through the module dicts (several times faster)."""
    module = find_module(model, name)
    return None if module is None else module._parameters.get(name.rsplit(".", 1)[-1])


def _materialize_all(state: ModelState) -> None:
    """Planned applications become per-weight entries before anything reads or stacks on the weights."""
    for handle in state.stack:
        if handle._plan is not None:
            handle._materialize()


def _repack_moved(model: nn.Module, adapter: SparseAdapter) -> None:
    """Weights packed by ``shira_hooks.pack`` that left their arenas (a move, a cast, new storage) are packed again."""
    owners = []
    for name in adapter.deltas:
        module = find_module(model, name)
        owner = _pack.owner_of(module) if module is not None else None
        if owner is not None and owner not in owners:
            owners.append(owner)
    for owner in owners:
        owner.repack()


def _check(
    model: nn.Module,
    adapter: SparseAdapter,
    state: ModelState,
    cache: AdapterCache,
    strict: bool,
    check_base: bool | str,
):
    """Validate every module before anything is written; returns ([(name, weight, prep)], skipped names)."""
    _materialize_all(state)
    targets, skipped = [], []
    named: dict[int, str] = {}  # id(parameter) -> the adapter's name for it
    for name, delta in adapter.deltas.items():
        param = _find_parameter(model, name)
        if param is not None and named.setdefault(id(param), name) != name:
            raise ShiraError(
                f"adapter modules '{named[id(param)]}' and '{name}' are one parameter of the model (tied weights); "
                f"their deltas would be written over each other. Keep one of them in the adapter (fuse them into one "
                f"delta if both were trained)"
            )
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
            raise ShiraError(
                f"adapter module '{name}' has shape {list(delta.shape)}, the model's weight is {list(param.shape)}"
            )
        if check_base and param.dtype != delta.dtype:
            raise ShiraError(
                f"adapter module '{name}' was trained on a {dtype_name(delta.dtype)} weight, the model's is "
                f"{dtype_name(param.dtype)}; load the model in {dtype_name(delta.dtype)}, or pass check_base=False "
                f"to apply it anyway"
            )
        weight = state.weight(name, param)
        prep = cache.prepared.get(name)
        if prep is None or prep.source is not delta:  # adapter.deltas[name] may have been replaced
            prep = cache.prepared[name] = Prepared(delta)
        if prep.layout != weight.layout:
            prep.place(weight.layout, param)
        if check_base and delta.fingerprint and (check_base == "always" or prep.verified != weight.token):
            base = _base_values(weight, param, prep)
            if digest(base) != delta.fingerprint:
                raise ShiraError(
                    f"adapter module '{name}': the model's base values at the adapter's entries do not match "
                    f"the adapter's fingerprint (it was trained on other weights); use the base model it was "
                    f"trained from, or pass check_base=False"
                )
            prep.verified = weight.token
            prep.base, prep.base_token, prep.alpha = base, weight.token, None
        elif prep.base_token != weight.token:  # verified earlier, or unverified: read the base as it is
            prep.base, prep.base_token, prep.alpha = _base_values(weight, param, prep), weight.token, None
        targets.append((name, weight, prep))
    if not targets:
        raise ShiraError(
            f"none of the adapter's {len(adapter.deltas)} modules is a parameter of the model (e.g. '{next(iter(adapter.deltas))}')"
        )
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

    Thread-safe: validation and writes hold the model's lock.

    Args:
        model: the base model (its parameter names must be the adapter's module names).
        adapter: a ``SparseAdapter`` (``extract()``, ``SparseAdapter.load`` or ``fuse``), or the path
            of an adapter file or folder (read as ``SparseAdapter.load`` reads it).
        alpha: strength; 0 leaves every weight bit-identical.
        strict: with False, adapter modules missing from the model are skipped and listed in
            ``handle.skipped`` (shape, dtype and fingerprint mismatches always raise).
        check_base: verify dtype and fingerprint of the base at the adapter's entries (hashed
            once, then trusted while ``Tensor._version`` shows no other write); "always" hashes on
            every call; False skips both checks.

    Returns:
        An ``AppliedAdapter``; ``remove()`` restores the original values bit for bit.

    Raises:
        ShiraError: a module is missing (strict), its shape, dtype or base fingerprint does not
            match, or a weight's layout has gaps. Raised before the first write: the model is untouched.

    Example:
        >>> adapter = shira_hooks.SparseAdapter.load("paint.safetensors")
        >>> with shira_hooks.apply(model, adapter, alpha=0.8):
        ...     images = pipe(prompt)
    """
    adapter = as_adapter(adapter, where="apply()")  # a path: loaded here
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ShiraError(f"alpha={alpha!r}; it must be a finite number (the adapter's strength, 1.0 = as trained)")
    alpha = float(alpha)
    state = model_state(model)
    with state.lock:
        cache = state.cache(adapter)
        try:
            planned = not state.stack and check_base != "always"  # the serving switch: nothing applied below
            # cache.plan holds only the SwitchPlans made below (state.py, which plan.py imports, names a protocol)
            plan = cast("SwitchPlan | None", cache.plan) if planned else None
            params = (
                plan.live(model, adapter, state.epoch)
                if plan is not None and _plan_fits(plan, model, strict, check_base)
                else None
            )
            if plan is not None and plan.restructured:
                state.drop_plans()  # they hold the children dicts of modules that may have left the model
            if params is None:
                if _pack.any_packed():
                    _repack_moved(model, adapter)
                checked, skipped = _check(model, adapter, state, cache, strict, check_base)
                targets = [(weight, prep) for _, weight, prep in checked]
                if planned:
                    plan = cache.plan = SwitchPlan(
                        model, adapter, checked, skipped, verified=bool(check_base), epoch=state.epoch
                    )
                    params = cast(
                        "list[nn.Parameter]", [weight.param() for weight, _ in targets]
                    )  # alive: just checked
            else:
                assert plan is not None  # params came from plan.live
                targets, skipped = plan.targets, list(plan.skipped)
            handle = AppliedAdapter(model, adapter, alpha, skipped, state, cache, targets)
            if planned:
                assert plan is not None and params is not None  # live, or made above
                handle._write_planned(plan, params)
            else:
                handle._write()
        except BaseException:
            state.settle(cache)
            raise
        cache.active += 1
    return handle


def _plan_fits(plan: SwitchPlan, model: nn.Module, strict: bool, check_base: bool | str) -> bool:
    """Whether a plan built earlier answers this call's options (its checks, its skipped modules)."""
    if check_base and not plan.verified:
        return False
    return not plan.skipped or (not strict and all(_find_parameter(model, name) is None for name in plan.skipped))


def check(model: nn.Module, adapter: SparseAdapter, *, check_base: bool | Literal["always"] = True) -> None:
    """Run ``apply``'s checks (strict) without writing anything: every module exists, with the
    adapter's shape, dtype and base fingerprint (the base as it is with the applied adapters undone).

    What the check computes is kept as ``apply`` keeps it, so a later ``apply`` of the adapter does
    not hash the base again.

    Raises:
        ShiraError: as ``apply`` does, for the first module that does not match.
    """
    state = model_state(model)
    with state.lock:
        cache = state.cache(adapter)
        try:
            _check(model, adapter, state, cache, True, check_base)
        finally:
            state.settle(cache)


def applied(model: nn.Module) -> list[AppliedAdapter]:
    """The adapters currently applied to ``model``, oldest first (``shira_hooks.attached`` is its counterpart
    for training handles).

    Args:
        model: any ``nn.Module``.

    Returns:
        The active ``AppliedAdapter`` handles, in the order they were applied (empty if none).

    Example:
        >>> with shira_hooks.apply(model, adapter) as handle:
        ...     assert shira_hooks.applied(model) == [handle]
        >>> shira_hooks.applied(model)
        []
    """
    state = model_state(model, create=False)
    if state is None:
        return []
    with state.lock:
        return list(state.stack)


def clear_cache(model: nn.Module | None = None) -> None:
    """Drop what ``apply`` keeps between calls for adapters not applied now (all models if None).

    ``apply`` keeps, per model, precomputed tensors for the adapters applied and for the
    ``KEEP_RECENT`` most recently removed ones (16 bytes per entry for a float32 weight), and for
    older ones the fact that the base was verified. Afterwards the next ``apply`` of each adapter
    verifies the base again (one hash of its entries). The adapters applied now keep what their
    ``remove()`` needs.

    Example:
        >>> shira_hooks.clear_cache(model)
    """
    if model is None:
        with STATES_LOCK:
            states = [state for _, state in STATES.items()]
    else:
        states = [state] if (state := model_state(model, create=False)) is not None else []
    for state in states:
        with state.lock:
            state.clear()
