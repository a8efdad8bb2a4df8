"""Training: ``attach`` and the ``ShiraHandle`` it returns (gradient hooks, the step guard, the modes).

* ``attach``: argument checks and target resolution; it calls ``handle.install``, the one entry that
  builds an attached handle;
* ``handle``: ``ShiraHandle`` and its public verbs, a composition of the collaborators below;
* ``config``: ``Config``, the frozen settings of a handle (mask, sparsity, seed, mode, block, ...);
* ``target``: one trained weight (mask, base values, positions per device and layout), and the ``Mode``
  protocol of the object that says how it trains;
* ``modes/``: one file per training mode (``dense``, ``compact``, ``sparse``; ``dora``: the SHiRA-DoRA variants of the
  last two) and the registries ``MODES`` and ``DORA``;
* ``dora``: the arithmetic of SHiRA-DoRA (effective masked entries, row norms);
* ``calibration``: ``Calibration`` (scores, eager or lazy, the masks from them) and eager calibration;
* ``gradients``: ``GradientHooks``, the post-accumulate-grad hook of every target weight;
* ``follow``: ``Follower``, finding the weights again after ``fully_shard`` or a replacement;
* ``steps``: ``StepHooks``, the handle's work around optimizer steps;
* ``optim``: the global optimizer step hooks (weight decay at the masked entries only);
* ``flags``: ``requires_grad`` claims and owners of several handles;
* ``state``: the resumable state (masks and base values), functions of the targets and the config.

Imports ``format``, ``masks``, ``distributed`` and ``_base``; nothing of ``serve``.
"""

from .attach import attach
from .handle import ShiraHandle, attached, handles
from .modes import MODES

__all__ = ["attach", "ShiraHandle", "attached", "handles", "MODES"]
