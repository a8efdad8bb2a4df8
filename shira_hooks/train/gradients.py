"""The gradient hook: one ``register_post_accumulate_grad_hook`` per target weight.

It keeps only the k masked entries of the weight's gradient (gather, fill, put back: ``Target.mask_grad``),
or, while the target's mask is not fixed yet, hands the gradient to calibration and drops it, so that no
optimizer changes anything during calibration. In the compact modes the weight gets no gradient (its
``shira_values`` train); the hook stays registered and fires only for calibration at ``attach``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from .. import distributed
from .._base import is_dense
from ..errors import ShiraError
from .calibration import Calibration
from .target import Target


class GradientHooks:
    """Makes the gradient hooks of a handle's targets and runs them.

    Args:
        targets: the handle's targets (the same list; a hook finds its target by position).
        calibration: the handle's ``Calibration``, which scores gradients of calibrating targets.
    """

    def __init__(self, targets: list[Target], calibration: Calibration):
        self.targets = targets
        self.calibration = calibration

    def hook(self, position: int) -> Callable[[torch.Tensor], None]:
        """The hook of target ``position``, to register on its weight."""
        # Weak: a strong reference from a tensor's hook back to the handle (which holds the tensor) is a
        # cycle through torch's C++ side that the garbage collector cannot break.
        owner = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:  # post-accumulate-grad hooks must return None
            hooks = owner()
            if hooks is not None:
                hooks.on_grad(hooks.targets[position], param)

        return hook

    @torch.no_grad()
    def on_grad(self, target: Target, param: torch.Tensor) -> None:
        """Mask ``param.grad`` in place, or score and drop it while ``target`` calibrates."""
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise ShiraError(f"'{target.name}' received a sparse gradient; shira_hooks masks dense gradients only")
        target.grad_seen = True
        target.follow()
        if target.indices is None:  # calibrating: score, then drop the gradient so nothing is updated
            self.calibration.accumulate(target, grad)
            param.grad = None
            return
        target.fresh = False  # from here on .grad is masked training gradient
        if not is_dense(distributed.local(grad)):
            param.grad = grad = grad.contiguous()
        target.mask_grad(grad)
