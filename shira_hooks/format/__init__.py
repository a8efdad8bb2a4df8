"""Adapters and their files: ``SparseAdapter`` / ``SparseDelta``, and the formats they are stored in.

* ``adapter``: the in-memory adapter, its checks, and the single-file format (``save`` / ``load``);
* ``formats``: ``Format`` and the one dispatch that reads a path (``read``) or writes one (``write``);
* ``hub``: the Hub-style folder (``save_pretrained``, ``from_pretrained``, the model card, ``push_to_hub``);
* ``peft``: conversion to and from a PEFT SHiRA folder (``to_peft``, ``from_peft``).

Imports ``masks`` and ``_base`` below it; never transformers (``peft`` and ``huggingface_hub`` are
imported only inside the calls that need them).
"""

from . import formats, hub, peft
from .adapter import (
    FILE,
    SparseAdapter,
    SparseDelta,
    as_adapter,
    check_indices,
    check_shape,
    dtype_name,
    parse_dtype,
)
from .hub import ADAPTER_FILE, check_license, hub_id

# The order in which formats.read asks them whether they recognise a path.
formats.register(peft.FOLDER)  # a folder holding adapter_config.json
formats.register(hub.FOLDER)  # any other folder
formats.register(FILE)  # anything else: a file

__all__ = [
    "SparseAdapter",
    "SparseDelta",
    "as_adapter",
    "formats",
    "check_indices",
    "check_shape",
    "dtype_name",
    "parse_dtype",
    "ADAPTER_FILE",
    "check_license",
    "hub_id",
]
