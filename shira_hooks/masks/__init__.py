"""Which entries train: the mask kinds, the budget rule, how masks are stored, and which weights are targets.

* ``kinds``: ``KINDS``, one ``MaskKind`` per ``attach(mask=...)`` value (``MASK_KINDS`` lists the names);
* ``select``: the choosers (random, structured, top-k) and the check of a user mask function's result;
* ``budget``: k for a weight, and the checks of ``sparsity`` and ``block``;
* ``indices``: masks as sorted flat indices, block runs, and a mask's CSR pattern;
* ``targets``: ``target_modules`` resolution, and the one list of output-head names.

Imports nothing of shira_hooks but ``errors``.
"""

from .budget import budget, check_block, check_block_fits, check_sparsity, lora_rank
from .indices import block_starts, csr_pattern, csr_pattern_on, csr_zeros, expand_blocks, index_dtype, row_length
from .kinds import CALIBRATED_KINDS, KINDS, MASK_KINDS, MaskKind, kind_of
from .select import MaskFn, generator_for, rand_mask, struct_mask, topk_mask, user_mask
from .targets import HEAD_NAMES, TASK_HEAD_NAMES, TargetSpec, in_task_head, resolve_targets

__all__ = [
    "KINDS",
    "MASK_KINDS",
    "CALIBRATED_KINDS",
    "MaskKind",
    "MaskFn",
    "kind_of",
    "budget",
    "lora_rank",
    "check_sparsity",
    "check_block",
    "check_block_fits",
    "generator_for",
    "rand_mask",
    "struct_mask",
    "topk_mask",
    "user_mask",
    "index_dtype",
    "row_length",
    "expand_blocks",
    "block_starts",
    "csr_pattern",
    "csr_pattern_on",
    "csr_zeros",
    "TargetSpec",
    "resolve_targets",
    "HEAD_NAMES",
    "TASK_HEAD_NAMES",
    "in_task_head",
]
