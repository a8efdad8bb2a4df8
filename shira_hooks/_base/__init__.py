"""The lowest layer: files, fingerprints, flat access to weights, and the weak table. Imports nothing of
shira_hooks but ``errors``.

* ``io``: atomic file writes, safetensors reading, ``digest`` (the fingerprint of a tensor's bytes);
* ``layout``: flat access to a weight in any dense layout (logical indices -> storage positions);
* ``weakrefs``: ``WeakIdTable``, the one table keyed weakly by object identity.
"""

from .io import (
    atomic_write,
    digest,
    read_safetensors,
    remove_stale_temporaries,
    sync_folder,
    temporary_prefix,
    tensor_bytes,
    umask,
)
from .layout import check_dense, is_dense, layout_key, storage_flat, storage_index
from .weakrefs import WeakIdTable

__all__ = [
    "atomic_write",
    "digest",
    "read_safetensors",
    "remove_stale_temporaries",
    "sync_folder",
    "temporary_prefix",
    "tensor_bytes",
    "umask",
    "check_dense",
    "is_dense",
    "layout_key",
    "storage_flat",
    "storage_index",
    "WeakIdTable",
]
