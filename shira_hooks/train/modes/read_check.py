"""The first-forward check of the modes that tap a layer's output: a target weight read without calling its
layer would never train, so the model's first forward pass with gradients refuses it.

``Compact.install`` makes one ``FirstForwardCheck`` for all the compact/sparse targets of a handle.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ...errors import ShiraError


class ReadWatch(TorchFunctionMode):
    """Finds target weights that a torch function reads while their own layer is not running.

    The tap is a forward hook of the layer, so a weight read another way (``nn.MultiheadAttention``
    passes ``out_proj.weight`` to ``F.multi_head_attention_forward``; ``F.linear(x, layer.weight)``)
    would silently never train. Active during the model's first forward pass with gradients only
    (every torch call then goes through Python once).

    Args:
        names: ``id(weight) -> module name`` of the compact targets.
    """

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.running: set[int] = set()  # ids of the weights whose layer is inside its forward (hooks included)
        self.found: list[str] = []  # module names of weights read from outside their layer

    def enter_layer(self, weight: torch.Tensor) -> None:
        self.running.add(id(weight))

    def leave_layer(self, weight: torch.Tensor) -> None:
        self.running.discard(id(weight))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in itertools.chain(args, kwargs.values()):
            key = id(value)
            if key in self.names and key not in self.running and self.names[key] not in self.found:
                self.found.append(self.names[key])
        return func(*args, **kwargs)


class FirstForwardCheck:
    """Refuses, in the model's first forward pass with gradients, a target weight read without calling its
    layer (``ReadWatch``): the tap would never see that use, so the weight would silently not train.

    Registers a forward pre-hook and a forward hook on ``model``; they remove themselves after that first
    pass (``remove()`` removes them on detach if it never comes, or when ``fully_shard`` replaced the
    weights). Skipped under ``torch.compile`` tracing. An object rather than closures, so that a deep copy
    or a pickle of the model carries a check of its own, on the copy's weights (the ids of the weights are
    taken when the pass starts, never stored).

    Args:
        layers: ``(weight, its layer, the layer's name)`` of every compact target.
    """

    def __init__(
        self, model: nn.Module, layers: list[tuple[nn.Parameter, nn.Module, str]], mode: str, *, dense_can: bool = True
    ):
        """``mode``: the mode's name, for the message."""
        self.layers, self.mode, self.dense_can = layers, mode, dense_can
        self.watching: list = []  # [ReadWatch, layer hook handles] while the first forward runs
        self.hooks = [
            model.register_forward_pre_hook(self.start),
            model.register_forward_hook(self.stop, always_call=True),
        ]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "watching": []}  # a copy taken during the first forward starts afresh

    def start(self, root: nn.Module, args) -> None:
        if not self.layers or not torch.is_grad_enabled() or torch.compiler.is_compiling() or self.watching:
            return
        watch = ReadWatch({id(weight): name for weight, _, name in self.layers})
        self.watching.append(watch)
        for weight, layer, _ in self.layers:  # prepend: before the mode's own pre-hook reads the weight
            if layer is root:  # the model is itself a target layer, and already running
                watch.enter_layer(weight)
            self.watching.append(
                layer.register_forward_pre_hook(lambda mod, a, w=weight: watch.enter_layer(w), prepend=True)
            )
            self.watching.append(
                layer.register_forward_hook(lambda mod, a, out, w=weight: watch.leave_layer(w), always_call=True)
            )
        watch.__enter__()

    def stop(self, root: nn.Module, args, output) -> None:
        if not self.watching:
            return
        watch = self.watching[0]
        watch.__exit__(None, None, None)
        self.remove()
        self.watching.clear()
        if watch.found:
            found = ", ".join(f"'{n}'" for n in watch.found)
            raise ShiraError(
                f"the weight of {found} is read without calling its module (a functional use such as "
                f"F.linear(x, layer.weight)); mode={self.mode!r} taps the module's output, so it would never train. "
                + (f"Use mode='dense', or leave {found}" if self.dense_can else f"Leave {found}")
                + " out of target_modules"
            )

    def replace(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """User code put ``new`` in place of the target weight ``old``: watch reads of ``new`` instead."""
        self.layers = [(new if weight is old else weight, layer, name) for weight, layer, name in self.layers]

    def remove(self) -> None:
        """Remove the hooks on the model (and on the layers, during the first pass); also stops a first pass
        whose pre-hooks torch has already listed."""
        for hook in self.hooks + self.watching[1:]:
            hook.remove()
        self.hooks, self.layers = [], []
