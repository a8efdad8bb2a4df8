"""Queries the tests use to look inside the package; not part of the API (nothing in the package imports this)."""

from __future__ import annotations

from torch import nn

from .serve.state import model_state
from .train import optim


def attached_handles() -> list:
    """Every handle attached now, to any model, in attach order (the step guard's table)."""
    return optim.tracked()


def cached_bytes(model: nn.Module) -> int:
    """Bytes of the tensors ``apply`` keeps for ``model``'s adapters that are not the adapters' own."""
    state = model_state(model, create=False)
    return 0 if state is None else state.held_bytes()
