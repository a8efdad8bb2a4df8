"""``mode="dense"``: the gradient hook masks the dense gradient of the weight; the optimizer steps the weight.

The default, and the only mode for layers other than ``nn.Linear``. Everything it needs is the target
itself: its post-accumulate-grad hook (``gradients``) keeps the k masked entries of ``weight.grad``, and
before each step ``Target.prepare_step`` masks the gradient again (something may have written it after
the hook) while the weight-decay guard (``optim``) decays only the masked entries. It is also the mode
every target holds while its mask is being chosen, and after ``detach``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ... import masks
from .. import flags
from ..config import Config
from ..target import Layer, Target

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor


class Dense:
    """The weight trains, through its masked dense gradient (stateless: one per target)."""

    name: ClassVar[str] = "dense"
    weight_trains: ClassVar[bool] = True
    frozen_words: ClassVar[tuple[str, str]] = ("they", "them")
    unseen_why: ClassVar[str] = ""
    unseen_fix: ClassVar[str] = ""

    @classmethod
    def check_attach(cls, mask: str | masks.MaskFn, kind: masks.MaskKind, calibration: Iterable | None) -> None:
        """Any mask: grad/snip without ``calibration=`` are scored on the first backward passes of training."""

    @classmethod
    def check_layer(cls, layer: Layer) -> None:
        """Any layer type, tied weights included."""

    @classmethod
    def install(cls, targets: list[Target], model: nn.Module, config: Config) -> None:
        """Nothing beyond the gradient hooks every target has: each target gets a ``Dense()``."""
        for target in targets:
            target.mode = cls()

    def uninstall(self, target: Target) -> None:
        pass

    def trained(self, target: Target) -> tuple[nn.Parameter, ...]:
        return (target.param,)

    def held_by(self, target: Target, members: dict[int, Any] | set[int]) -> bool:
        return id(target.param) in members

    def frozen(self, target: Target) -> bool:
        return not target.param.requires_grad

    def flag_changed(self, target: Target) -> bool:
        return flags.changed(target.param)

    def got_gradient(self, target: Target) -> bool:
        return target.grad_seen

    def optimizer_state_problem(self, target: Target, state: dict) -> tuple[str, int] | None:
        return target.state_outside_mask(state)

    def before_step(self, target: Target, optimizer: torch.optim.Optimizer, members: dict[int, dict]) -> bool:
        group = members.get(id(target.param))
        return group is not None and target.prepare_step(group)

    def step_changed(self, optimizer: torch.optim.Optimizer, members: set[int]) -> bool | None:
        return None  # the optimizer changed the weight itself: nothing to write

    def sharded(self) -> DTensor | None:
        return None

    def write(self, target: Target) -> None:
        pass

    def follow_own(self, target: Target, verb: str | None) -> None:
        pass

    def adopt(self, target: Target, weight: nn.Parameter) -> None:
        pass

    def weight_replaced(self, target: Target, old: nn.Parameter, new: nn.Parameter) -> None:
        pass

    def state(self, target: Target) -> dict[str, torch.Tensor]:
        return {}

    def check_state(self, target: Target, entry: dict[str, Any]) -> None:
        pass

    def load(self, target: Target, entry: dict[str, Any]) -> None:
        pass
