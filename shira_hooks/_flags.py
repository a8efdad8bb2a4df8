"""``requires_grad`` flags shared by every handle attached to a parameter's model(s).

Several handles may be attached at once (to one model, or to models sharing modules), and each
wants some flags: its dense targets train (True), its compact targets' weights do not (False, their
``shira_values`` train instead), and with ``freeze_others`` every other parameter is frozen (False).
Each parameter keeps one record: its flag from before the first handle touched it, and the claims
of the handles attached now. Its flag is always the resolution of the live claims:

* a target of an attached handle: what that handle wants (a weight has at most one handle);
* else frozen by any attached handle: False;
* else (no claim left): the flag from before the first attach, and the record is dropped.

So flags are right while any handle is attached and end as they were, in any detach order. Records
are keyed weakly by the parameter and refer to handles weakly: they keep nothing alive.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from torch import nn
from torch.utils.weak import WeakIdKeyDictionary


@dataclass(eq=False)
class _Claim:
    handle: weakref.ref
    target: bool  # a target of the handle (else: frozen by its freeze_others)
    wanted: bool


@dataclass(eq=False)
class _Record:
    original: bool
    claims: list[_Claim] = field(default_factory=list)

    def resolve(self) -> bool:
        live = [c for c in self.claims if _alive(c.handle)]
        for claim in live:
            if claim.target:
                return claim.wanted
        return False if live else self.original


_RECORDS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> _Record


def _alive(ref: weakref.ref) -> bool:
    handle = ref()
    return handle is not None and handle.attached


def claim(handle, param: nn.Parameter, *, target: bool, wanted: bool) -> None:
    """Record what ``handle`` wants for ``param`` and set the resolved flag."""
    record = _RECORDS.get(param)
    if record is None:
        record = _RECORDS[param] = _Record(param.requires_grad)
    record.claims = [c for c in record.claims if c.handle() is not handle] + [_Claim(weakref.ref(handle), target, wanted)]
    param.requires_grad_(record.resolve())


def move(old: nn.Parameter, new: nn.Parameter) -> None:
    """``new`` replaced ``old`` in the model (FSDP2's fully_shard): it takes over ``old``'s record and flag."""
    record = _RECORDS.pop(old, None)
    if record is not None:
        _RECORDS[new] = record
        new.requires_grad_(record.resolve())


def release(handle, params: list[nn.Parameter]) -> None:
    """Drop ``handle``'s claims on ``params`` and set each to what the remaining claims resolve to."""
    for param in params:
        record = _RECORDS.get(param)
        if record is None:
            continue
        record.claims = [c for c in record.claims if c.handle() is not handle and _alive(c.handle)]
        param.requires_grad_(record.resolve())
        if not record.claims:
            del _RECORDS[param]



# ------------------------------------------------------------------------------ owners
# parameter -> weakref to the attached handle that trains it; a weight takes one handle at a time.
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def own(param: nn.Parameter, handle) -> None:
    """Record ``handle`` as the one that trains ``param``."""
    _OWNERS[param] = weakref.ref(handle)


def disown(param: nn.Parameter, handle=None) -> None:
    """Forget the handle that trains ``param`` (only if it is ``handle``, when given)."""
    ref = _OWNERS.get(param)
    if ref is not None and (handle is None or ref() is handle):
        del _OWNERS[param]


def owned(param: nn.Parameter) -> bool:
    """Whether an attached handle trains ``param``."""
    ref = _OWNERS.get(param)
    handle = ref() if ref is not None else None
    return handle is not None and handle.attached
