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

Importing this package never imports transformers.
"""

from ._version import __version__
from .adapter import SparseAdapter, SparseDelta
from .attach import attach
from .handle import ShiraHandle, handles
from .bank import AdapterBank
from .errors import ShiraError
from .fusion import Overlap, fuse, overlap
from .mixed import MixedAdapters
from .packing import PackedWeights, pack
from .switch import AppliedAdapter, apply, clear_cache

__all__ = [
    "attach",
    "ShiraHandle",
    "handles",
    "SparseAdapter",
    "SparseDelta",
    "apply",
    "AppliedAdapter",
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
