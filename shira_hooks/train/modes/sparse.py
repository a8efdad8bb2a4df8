"""``mode="sparse"``: ``mode="compact"`` with only the k masked entries of ``dY^T X`` computed.

Everything but the gradient of ``shira_values`` is the compact mode's (``Compact``). The gradient comes
from ``torch.sparse.sampled_addmm`` on a CSR pattern of the mask. The kernel reads X with T contiguous,
so the forward hook saves X^T (in, T) instead of X, made while X is fresh in cache and made once for
layers that read the same input (q/k/v, gate/up: ``InputTransposes``, one per handle), instead of one
transposing copy per layer in the backward. An input whose storage the backward keeps anyway is saved
as it is, since a transpose would be a second copy: a view (an attention output reshaped: SDPA saves its
output) or the result of an op that saves its own result (tanh, sigmoid, softmax, ...).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from ... import distributed
from ...masks import csr_pattern, csr_pattern_on, csr_zeros
from .compact import Compact


class Sparse(Compact):
    """A compact target whose gradient is sampled at the mask (``pattern``: the (out, in) CSR of the mask)."""

    name: ClassVar[str] = "sparse"

    def __init__(
        self,
        weight: nn.Parameter,
        values: nn.Parameter,
        indices: torch.Tensor,
        positions: Callable[[torch.Tensor], torch.Tensor],
        shared: InputTransposes,
        rows: distributed.RowSlice | None = None,
    ):
        self.transposes = shared  # shared by the sparse layers of one handle
        super().__init__(weight, values, indices, positions, shared, rows)

    @classmethod
    def shared(cls) -> InputTransposes:
        return InputTransposes()

    def use_mask(self, indices: torch.Tensor) -> None:
        """Take the mask (sorted logical indices): its CSR pattern on the weight's device."""
        rows, cols = self.weight.shape  # an nn.Linear's (out, in): check_layer takes nothing else
        self.pattern = csr_pattern(indices.to(self.weight.device, torch.int64), (rows, cols))

    def __getstate__(self) -> dict:
        """A CSR tensor has no storage that ``copy.deepcopy`` could copy: the pattern travels as its row
        pointers and columns."""
        state = super().__getstate__()
        state["pattern"] = (self.pattern.crow_indices(), self.pattern.col_indices(), tuple(self.pattern.shape))
        return state

    def __setstate__(self, state: dict) -> None:
        state["pattern"] = csr_zeros(*state["pattern"])
        super().__setstate__(state)

    def follow(self) -> None:
        """Keep the CSR pattern on the weight's device (``model.to(...)`` moves only parameters)."""
        if self.pattern.device != self.weight.device:
            self.pattern = csr_pattern_on(self.pattern, self.weight.device)

    def saved_input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """X^T (in, T), shared with the layers that read the same input; X itself when the backward keeps its
        storage anyway."""
        if _kept_by_producer(x):
            return x, False
        return self.transposes(x), True

    def grad_at_mask(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(k,) float32 ``dL/dW`` at the mask: only the k sampled entries of ``dY^T X``."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.sparse.sampled_addmm(self.pattern, dy.t(), x, beta=0.0).values()


class InputTransposes:
    """The (in, T) transpose of the last layer input, for the sparse-mode layers of one handle.

    Layers that read the same input tensor one after another (a transformer's q/k/v projections, its
    gate/up projections) get one transposed copy between them. Only weak references are kept: the
    copy lives as long as a backward graph saves it, and an input that changed in place (its
    ``_version``) or a new tensor at the same address gets a fresh copy.
    """

    def __init__(self) -> None:
        self._last: tuple[weakref.ref, int, weakref.ref] | None = None

    def __getstate__(self) -> dict:
        return {"_last": None}  # weak references do not pickle, and a copy starts with no input

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            source, version, copy = self._last
            xt = copy()
            if source() is x and version == x._version and xt is not None:
                return xt
        xt = x.detach().reshape(-1, x.shape[-1]).t().contiguous()
        self._last = (weakref.ref(x), x._version, weakref.ref(xt))
        return xt


def _kept_by_producer(x: torch.Tensor) -> bool:
    """Whether the backward already keeps ``x``'s storage: ``x`` is a view, or the op that made it
    saved its own result. ``dir`` lists the saved fields without unpacking them (which would run
    saved-tensor hooks such as offloading or checkpoint recomputation)."""
    return x._base is not None or (x.grad_fn is not None and "_saved_result" in dir(x.grad_fn))
