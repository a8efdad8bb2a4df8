"""Training: ``attach`` and the ``ShiraHandle`` it returns (gradient hooks, the step guard, the modes).

* ``attach``: argument checks, target resolution, installing a handle, fixing or scoring the masks;
* ``handle``: ``ShiraHandle`` and its public verbs, with two mixins: ``steps`` (its work around optimizer
  steps) and ``follow`` (finding its weights again after ``fully_shard`` or a replacement);
* ``target``: one trained weight (mask, base values, positions per device and layout);
* ``calibration``: eager calibration on ``calibration=`` batches, and the mask from scores;
* ``optim``: the global optimizer step hooks (weight decay at the masked entries only);
* ``compact``: ``mode="compact"`` and ``mode="sparse"`` (the k entries as a parameter);
* ``flags``: ``requires_grad`` claims and owners of several handles;
* ``state``: the resumable state (masks and base values).

Imports ``format``, ``masks``, ``distributed`` and ``_base``; nothing of ``serve``.
"""

from .attach import attach
from .handle import ShiraHandle, attached, handles

__all__ = ["attach", "ShiraHandle", "attached", "handles"]
