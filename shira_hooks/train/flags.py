"""``requires_grad`` flags shared by every handle attached to a parameter's model(s).

Several handles may be attached at once (to one model, or to models sharing modules), and each
wants some flags: its dense targets train (True), its compact targets' weights do not (False, their
``shira_values`` train instead), and with ``freeze_others`` every other parameter is frozen (False).
Each parameter keeps one record: its flag from before the first handle touched it, and the claims
of the handles attached now. Its flag is always the resolution of the live claims:

* a target of an attached handle: what that handle wants (a weight has at most one handle);
* else frozen by any attached handle: False;
* else (no claim left): the flag from before the first attach, and the record is dropped.

So flags are right while any handle is attached and end as they were, in any detach order. A flag
is changed only while it still holds the value shira_hooks last set (``set_to``): one that something
else set since (``peft.get_peft_model`` freezes every parameter that is not its adapter's) is left
as that other code set it. Records are keyed weakly by the parameter and refer to handles weakly:
they keep nothing alive.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn

from .. import distributed
from .._base import WeakIdTable


class Owner(Protocol):
    """What the records need of a handle: whether it is attached (a detached handle's claims no longer count)."""

    @property
    def attached(self) -> bool: ...


@dataclass(eq=False)
class _Claim:
    handle: weakref.ref
    target: bool  # a target of the handle (else: frozen by its freeze_others)
    wanted: bool


@dataclass(eq=False)
class _Record:
    original: bool  # the flag before the first handle claimed the parameter
    claims: list[_Claim] = field(default_factory=list)
    set_to: bool | None = None  # the flag as shira_hooks last set it

    def resolve(self) -> bool:
        live = [c for c in self.claims if _alive(c.handle)]
        for claim in live:
            if claim.target:
                return claim.wanted
        return False if live else self.original


_RECORDS = WeakIdTable()  # parameter -> _Record


def _alive(ref: weakref.ref) -> bool:
    handle = ref()
    return handle is not None and handle.attached


def claim(handle: Owner, param: nn.Parameter, *, target: bool, wanted: bool, original: bool | None = None) -> None:
    """Record what ``handle`` wants for ``param`` and set the resolved flag.

    Args:
        original: the flag from before any handle claimed ``param``, when it is not ``param``'s flag now
            (a copy of an attached model: its flags are the ones the handles set). Default: the flag now.
    """
    record = _RECORDS.get(param)
    if record is None:
        record = _Record(param.requires_grad if original is None else original)
        _RECORDS.set(param, record)
    record.claims = [c for c in record.claims if c.handle() is not handle] + [
        _Claim(weakref.ref(handle), target, wanted)
    ]
    _set(param, record)


def _set(param: nn.Parameter, record: _Record) -> None:
    record.set_to = record.resolve()
    param.requires_grad_(record.set_to)


def original(param: nn.Parameter) -> bool | None:
    """The flag ``param`` had before the first handle claimed it (None: no handle claims it)."""
    record = _RECORDS.get(param)
    return None if record is None else record.original


def changed(param: nn.Parameter) -> bool:
    """Whether something other than shira_hooks set ``param``'s flag since shira_hooks last set it."""
    record = _RECORDS.get(param)
    return record is not None and record.set_to is not None and param.requires_grad != record.set_to


def move(old: nn.Parameter, new: nn.Parameter, *, only_unchanged: bool = False) -> None:
    """``new`` replaced ``old`` in the model (FSDP2's fully_shard, ``load_state_dict(assign=True)``): it takes
    over ``old``'s record and flag. With ``only_unchanged``, only if ``new`` holds the flag shira_hooks set on
    ``old`` (``assign=True`` copies it); otherwise ``new`` is left as it is and ``old``'s record is dropped."""
    record = _RECORDS.pop(old)
    if record is None:
        return
    if only_unchanged and new.requires_grad != record.set_to:
        return
    _RECORDS.set(new, record)
    _set(new, record)


def release(handle: Owner, params: list[nn.Parameter], *, restore: bool = True) -> None:
    """Drop ``handle``'s claims on ``params`` and set each to what the remaining claims resolve to.

    A flag that no longer holds the value shira_hooks set is left as it is (something else set it since),
    and so is every flag when ``restore`` is False.
    """
    for param in params:
        record = _RECORDS.get(param)
        if record is None:
            continue
        record.claims = [c for c in record.claims if c.handle() is not handle and _alive(c.handle)]
        if restore and param.requires_grad == record.set_to:
            _set(param, record)
        if not record.claims:
            _RECORDS.pop(param)


class Claimed:
    """The parameters one handle claims the flag of, with their names, to find them again by name when
    something replaced them (FSDP2's ``fully_shard``, ``load_state_dict(assign=True)``)."""

    def __init__(self) -> None:
        self.params: list[nn.Parameter] = []
        self.names: list[str] = []

    def add(self, name: str, param: nn.Parameter) -> None:
        self.params.append(param)
        self.names.append(name)

    def clear(self) -> None:
        self.params, self.names = [], []

    def follow(self, model: nn.Module) -> None:
        """After the handle followed a replaced target: move the claims of every replaced parameter by name (the
        frozen ones may have been replaced too)."""
        now = dict(model.named_parameters(remove_duplicate=False))
        for i, (name, old) in enumerate(zip(self.names, self.params)):
            new = now.get(name)
            # (not FSDP2's unsharded weight in place of a sharded one: that is put back after the pass)
            if new is not None and new is not old and (distributed.is_sharded(new) or not distributed.is_sharded(old)):
                move(old, new)
                self.params[i] = new

    def follow_before_release(self, model: nn.Module) -> None:
        """At ``detach``: claimed parameters that user code replaced (``load_state_dict(assign=True)`` copies the
        flag): the claim moves to the parameter now at that name if it holds the flag the handle set, so that
        ``release`` restores the flags of the model's parameters, not of objects no longer in it."""
        now = dict(model.named_parameters(remove_duplicate=False))
        for i, (name, old) in enumerate(zip(self.names, self.params)):
            new = now.get(name)
            if new is not None and new is not old and not distributed.is_sharded(old):
                move(old, new, only_unchanged=True)
                self.params[i] = new


# ------------------------------------------------------------------------------ owners
# parameter -> weakref to the attached handle that trains it; a weight takes one handle at a time.
_OWNERS = WeakIdTable()


def own(param: nn.Parameter, handle: Owner) -> None:
    """Record ``handle`` as the one that trains ``param``."""
    _OWNERS.set(param, weakref.ref(handle))


def disown(param: nn.Parameter, handle: Owner | None = None) -> None:
    """Forget the handle that trains ``param`` (only if it is ``handle``, when given)."""
    ref = _OWNERS.get(param)
    if ref is not None and (handle is None or ref() is handle):
        _OWNERS.pop(param)


def owned(param: nn.Parameter) -> bool:
    """Whether an attached handle trains ``param``."""
    ref = _OWNERS.get(param)
    handle = ref() if ref is not None else None
    return handle is not None and handle.attached
