"""shira_hooks: Sparse High Rank Adapters (SHiRA) for any PyTorch model, through gradient hooks.

    shira = shira_hooks.attach(model, sparsity=0.01, mask="snip", calibration=batches)
    ...train with any loop / trainer / optimizer...
    shira.extract().save("adapter.safetensors")
    shira.detach()

Importing this package never imports transformers.
"""

from ._version import __version__
from .adapter import SparseAdapter, SparseDelta
from .attach import ShiraHandle, attach
from .errors import ShiraError

__all__ = ["attach", "ShiraHandle", "SparseAdapter", "SparseDelta", "ShiraError", "__version__"]
