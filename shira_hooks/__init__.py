"""shira_hooks: Sparse High Rank Adapters (SHiRA) for any PyTorch model, through gradient hooks.

    shira = shira_hooks.attach(model, sparsity=0.01, mask="snip", calibration=batches)
    ...train with any loop / trainer / optimizer...
    shira.extract().save("adapter.safetensors")
    shira.detach()

    adapter = shira_hooks.SparseAdapter.load("adapter.safetensors")
    with shira_hooks.apply(model, adapter, alpha=1.0):   # in place, ~1% of the entries
        ...

    with shira_hooks.MixedAdapters(model, {"paint": a, "knight": b}) as mixed:   # one adapter per batch row
        with torch.no_grad(), mixed.route(["paint", None, "knight"]):
            ...

Importing this package never imports transformers (``shira_hooks.integrations``, the Trainer callback, does).

Layers, each a subpackage whose ``__init__`` names its public part; imports point down only:
``tools`` -> ``integrations`` -> ``serve`` / ``train`` -> ``format`` -> ``masks`` / ``distributed`` -> ``_base``.
"""

from ._base import digest
from ._version import __version__
from .errors import ShiraError
from .format import SparseAdapter, SparseDelta
from .masks import MASK_KINDS
from .serve import (
    AdapterBank,
    AppliedAdapter,
    MixedAdapters,
    Overlap,
    PackedWeights,
    applied,
    apply,
    clear_cache,
    fuse,
    overlap,
    pack,
)
from .train import ShiraHandle, attach, attached, handles

__all__ = [
    "attach",
    "ShiraHandle",
    "attached",
    "handles",
    "MASK_KINDS",
    "SparseAdapter",
    "SparseDelta",
    "digest",
    "apply",
    "AppliedAdapter",
    "applied",
    "clear_cache",
    "fuse",
    "overlap",
    "Overlap",
    "AdapterBank",
    "pack",
    "PackedWeights",
    "MixedAdapters",
    "ShiraError",
    "__version__",
]
