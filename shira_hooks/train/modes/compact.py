"""``mode="compact"``: train the k masked entries as a k-length parameter (``mode="sparse"`` in ``sparse.py``
changes only how the gradient of those k entries is computed).

For each target ``nn.Linear`` (weight W of shape (out, in), mask ``index`` of k flat entries):

* ``module.shira_values`` is an ``nn.Parameter`` of shape (k,) holding ``W.view(-1)[index]``. It is
  registered on the module, so ``model.parameters()`` (and therefore a Trainer's optimizer, gradient
  clipping and DDP) sees it, and any stock optimizer keeps state for k entries only. W itself gets
  ``requires_grad=False``: autograd computes no dense ``dL/dW`` for it.
* A forward hook passes the layer's output through ``_Tap``, an identity whose backward produces the
  gradient of ``shira_values`` from the output gradient dY (T, out) and the saved input X (T, in):
  ``dL/dW[r, c] = sum_t dY[t, r] X[t, c]`` at the masked (r, c) only:
  here the dense product ``dY^T X`` (one weight's worth, freed at once), then a gather (``grad_at_mask``);
  ``Sparse`` computes only the k sampled entries (``sparse.py``).
* After every optimizer step (the handle's step hooks, ``Compact.write``) ``shira_values`` is written into W (``index_copy_``);
  a forward pre-hook also writes it whenever ``Tensor._version`` shows another in-place change, so the
  layer computes with the trained entries. Only masked entries of W are ever written.

Weight decay: the optimizer decays ``shira_values``, which are the weight's entries, so decay acts
exactly as in the dense mode (on the masked entries of the weight, not on a delta).

Under FSDP2 (a ``Shard(0)`` DTensor weight) ``shira_values`` is a (k,) ``Shard(0)`` DTensor: each rank
holds a chunk of k/n entries and its optimizer state, O(k) over all ranks. Two ways to get there:

* attached after ``fully_shard``: ``install`` makes the DTensor itself, outside FSDP2's parameter groups.
  The tap computes this rank's gradient of all k entries (the layer ran on the all-gathered weight and
  this rank's batch), averages it over the ranks (an all-reduce of k entries per layer) and keeps its chunk;
* attached before (the Trainer's and Accelerate's order): ``fully_shard`` shards ``shira_values`` with the
  weight, as one of the layer's parameters, and the handle adopts the new parameter (``Compact.adopt``).
  FSDP2 then all-gathers it for each forward (the tap reads the module's current ``shira_values``)
  and reduce-scatters its gradient, like any parameter.

Either way, after each optimizer step the values are all-gathered (k entries per layer) and every rank
writes the entries in its own rows (``distributed.RowSlice``) into its shard of the weight, which FSDP2
all-gathers for the next forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ... import distributed, masks
from ..._base import storage_flat
from ...errors import ShiraError
from ..config import Config
from ..target import REPLACED_FIX, Layer, Retired, Target, describe
from .read_check import FirstForwardCheck

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

VALUES = "shira_values"


class Compact:
    """The mode object of one compact target: its ``shira_values``, the layer's two hooks, and the mask's index.

    Attributes:
        weight: the target weight (the one the handle follows).
        values: (k,) the trained entries, ``<layer>.shira_values``.
        positions: the mask's storage positions in a tensor's layout (``Target.positions``).
        synced: ``values._version`` last written into the weight.
        seen: a gradient of the values was computed since attach.
        rows: FSDP2: the mask's entries in this rank's rows of the weight (``distributed.RowSlice``).
        managed: FSDP2: ``fully_shard`` sharded the values (it unshards them and reduces their gradient).
        hooks: the layer's forward pre-hook and forward hook.
        check: the handle's first-forward check (``read_check``), shared by its compact targets.
    """

    name: ClassVar[str] = "compact"
    weight_trains: ClassVar[bool] = False
    frozen_words: ClassVar[tuple[str, str]] = (f"their '{VALUES}'", f"their '{VALUES}'")
    unseen_why: ClassVar[str] = (
        ", or their module's weight is read without calling the module, which mode={mode!r} cannot see"
    )
    unseen_fix: ClassVar[str] = ", or use mode='dense'"
    dense_can: ClassVar[bool] = True  # whether a refusal may suggest mode='dense' (not with dora=True)

    @classmethod
    def fix(cls, dense: str, other: str) -> str:
        """The fix a refusal names: ``dense`` (which suggests mode='dense') when that mode could train the
        target instead, else ``other``."""
        return dense if cls.dense_can else other

    def __init__(
        self,
        weight: nn.Parameter,
        values: nn.Parameter,
        indices: torch.Tensor,
        positions: Callable[[torch.Tensor], torch.Tensor],
        shared: Any = None,
        rows: distributed.RowSlice | None = None,
    ):
        self.weight, self.values, self.positions, self.rows = weight, values, positions, rows
        self.synced = self.versions()
        self.seen = False
        self.managed = False
        self.hooks: list = []
        self.check: FirstForwardCheck | None = None
        self._before: weakref.WeakKeyDictionary = (
            weakref.WeakKeyDictionary()
        )  # optimizer -> (k,) values before its step
        self.use_mask(indices)

    def use_mask(self, indices: torch.Tensor) -> None:
        """Take the mask (sorted logical indices): here its (k,) int64 index on the weight's device."""
        self.index = indices.to(self.weight.device, torch.int64)

    def __getstate__(self) -> dict:
        """For a copy or a pickle of the model (the handle's ``__getstate__``): the copy's weight is written
        from the copy's values at its first forward; no step is pending in a copy."""
        return {**self.__dict__, "synced": -1, "_before": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._before = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------------------- attach
    @classmethod
    def check_attach(cls, mask: str | masks.MaskFn, kind: masks.MaskKind, calibration: Iterable | None) -> None:
        """The values are made at attach, so the masks must be known then."""
        if kind.needs_scores and calibration is None:
            raise ShiraError(
                f"mode={cls.name!r} needs the masks at attach time, and mask={mask!r} without calibration= would score them "
                f"lazily during training; pass calibration=batches"
                + cls.fix(", or use mode='dense'", " (dora=True trains in the compact and sparse modes only)")
            )

    @classmethod
    def check_layer(cls, layer: Layer) -> None:
        """Only an ``nn.Linear`` that is called (the tap is its forward hook), holds its weight alone and has no
        ``shira_values`` yet."""
        mode = cls.name
        if not isinstance(layer.module, nn.Linear):
            raise ShiraError(
                f"mode={mode!r} supports nn.Linear targets only; '{layer.module_name}' is a {type(layer.module).__name__}. "
                + cls.fix(
                    "Narrow target_modules to Linear layers, or use mode='dense'",
                    "Narrow target_modules to Linear layers",
                )
            )
        if layer.read_directly:
            raise ShiraError(
                f"'{layer.module_name}' is the out_proj of an nn.MultiheadAttention, which reads out_proj.weight directly "
                f"(F.multi_head_attention_forward) without calling the layer, so mode={mode!r}, which taps the layer's "
                f"output, would never train it. "
                + cls.fix("Use mode='dense', or leave it out of target_modules", "Leave it out of target_modules")
            )
        if layer.shared_by > 1:
            raise ShiraError(
                f"weight '{layer.name}' is shared by {layer.shared_by} modules; mode={mode!r} taps one layer's output, so "
                f"the others' gradient would be lost. "
                + cls.fix("Use mode='dense' for tied weights", "Leave tied weights out of target_modules")
            )
        if VALUES in layer.module._parameters:
            raise ShiraError(
                f"module '{layer.module_name}' already has a parameter '{VALUES}'; detach the handle that added it "
                f"first (shira_hooks.attached(model) finds it)"
            )

    @classmethod
    def shared(cls) -> Any:
        """What the mode objects of one handle share (nothing here; ``Sparse``: the input transposes)."""
        return None

    @classmethod
    def install(cls, targets: list[Target], model: nn.Module, config: Config) -> None:
        """Register every target layer's ``shira_values`` and hooks, and one first-forward check for them all."""
        shared = cls.shared()
        installed = []
        for target in targets:
            target.mode = mode = cls.register(target, shared, config)
            installed.append(mode)
        # Under FSDP2 the layer computes with the all-gathered weight and FSDP itself reads the sharded one
        # outside the layer (its all-gather), so the read check cannot tell a functional use there.
        layers = [
            (t.param, t.module, t.name.rpartition(".")[0] or type(t.module).__name__)
            for t in targets
            if not distributed.is_sharded(t.param)
        ]
        if layers:
            check = FirstForwardCheck(model, layers, cls.name, dense_can=cls.dense_can)
            for mode in installed:
                mode.check = check

    @classmethod
    def register(cls, target: Target, shared: Any, config: Config) -> Compact:
        """Register ``<layer>.shira_values`` (the weight's masked entries now) and the layer's two hooks."""
        module, weight, indices = target.module, target.param, target.indices
        assert indices is not None, (
            f"'{target.name}': install before its mask is fixed"
        )  # check_attach: masks known at attach
        values = (
            storage_flat(distributed.local(weight.detach())).index_select(0, target.positions(weight)).clone()
        )  # FSDP2: this rank's rows
        rows = None
        if distributed.is_sharded(weight):  # FSDP2: every rank's rows' entries, then this rank's chunk of the k
            rows = distributed.row_slice(indices, weight, f"weight of '{type(module).__name__}'")
            values = distributed.shard_values(distributed.gather_slices(values, rows, weight.device_mesh), weight)
        else:
            values = nn.Parameter(values)
        module.register_parameter(VALUES, values)
        mode = cls(weight, values, indices, target.positions, shared, rows)
        mode.hook(module)
        return mode

    def hook(self, module: nn.Module) -> None:
        """Register the layer's forward pre-hook and forward hook."""
        # Bound methods of the mode object, not closures: a deep copy or a pickle of the module carries them with a
        # copy of it, so a copied layer's hooks act on the copy's values and weight, never the original's.
        self.hooks = [
            module.register_forward_pre_hook(self.pre_forward),
            module.register_forward_hook(self.post_forward, with_kwargs=True),
        ]

    def uninstall(self, target: Target) -> None:
        """Write the values into the weight, unregister them and remove the hooks (under FSDP2 a collective).

        Values (and DoRA tensors) that ``fully_shard`` sharded stay registered, frozen: FSDP2 keeps them in its
        parameter group and would put them back on the module at its next all-gather.
        """
        self.sync(force=True)
        if self.managed:
            for param in self.trained(target):
                param.requires_grad_(False)
        else:
            prefix = target.name.rpartition(".")[0]
            for name in self.names():  # also parameters that replaced ours (load_state_dict(assign=True))
                removed = target.module._parameters.pop(name, None)
                if removed is not None:  # an optimizer built before detach() may hold it: a later handle refuses it
                    Retired.add(target.module, f"{prefix}.{name}" if prefix else name, removed)
        for hook in self.hooks:
            hook.remove()
        self.hooks = []
        if self.check is not None:
            self.check.remove()

    # ------------------------------------------------------------------------------ the hooks
    def pre_forward(self, module: nn.Module, args) -> None:
        """The layer's forward pre-hook: the weight holds the current values."""
        self.follow()
        self.sync()

    def post_forward(self, module: nn.Module, args, kwargs, output):
        """The layer's forward hook: taps the output so that its backward gives the values' gradient."""
        values = self.tap_values(module)
        if values is not None:
            x = args[0] if args else kwargs["input"]
            tapped = _whole_base(output)
            inputs, transposed = self.saved_input(x)
            tapped = _Tap.apply(tapped, values, inputs, self, transposed)
            return tapped if tapped is output else tapped.view(output.shape)
        return None

    def tap_values(self, module: nn.Module) -> torch.Tensor | None:
        """(k,) what the layer's masked weight entries are, for the tap (its gradient flows into them), or None
        when nothing trains in this forward: the module's current ``shira_values`` (under FSDP2: the
        all-gathered values, in the forward)."""
        values = module._parameters.get(VALUES, self.values)
        assert values is not None, (
            f"the layer's {VALUES} is None"
        )  # only register_parameter(VALUES, None) puts None there
        return values if torch.is_grad_enabled() and values.requires_grad else None

    def names(self) -> tuple[str, ...]:
        """The names of the parameters the mode registered on the layer."""
        return (VALUES,)

    def versions(self) -> Any:
        """The version counters of the trained tensors (a write is due when they moved)."""
        return self.values._version

    def entries(self) -> torch.Tensor:
        """(k,) the entries the weight must hold at the mask now (no autograd); under FSDP2 the ones in this
        rank's rows (a collective)."""
        values = self.values.detach()
        if self.rows is not None:
            values = distributed.gather(values)[self.rows.start : self.rows.stop]
        return values

    def saved_input(self, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """What the tap saves for the backward: the layer input X (..., in) as it is, not transposed."""
        return x, False

    def grad_at_mask(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(k,) float32 ``dL/dW`` at the mask from dY (T, out) and X (T, in), both float32: the dense (out, in)
        product, gathered."""
        return (dy.t() @ x).view(-1).index_select(0, self.index)

    def follow(self) -> None:
        """Keep the index on the weight's device (``model.to(...)`` moves only parameters)."""
        if self.index.device != self.weight.device:
            self.index = self.index.to(self.weight.device)

    @torch.no_grad()
    def sync(self, force: bool = False) -> None:
        """Write the values into the weight: always with ``force``, else when ``values._version`` moved.

        Fused optimizer kernels (``torch._fused_adamw_``, the Trainer's default) update the values
        without bumping the version counter, so after an optimizer step the write is forced. Under
        FSDP2 only forced writes happen (they all-gather the values: a collective that every rank
        makes at the same step), and each rank writes the entries in its rows.
        """
        if force or (self.rows is None and self.versions() != self.synced):
            weight = self.weight.detach()
            values = self.entries()
            storage_flat(distributed.local(weight)).index_copy_(
                0, self.positions(weight), values.to(weight.device, weight.dtype)
            )
            self.synced = self.versions()

    # --------------------------------------------------------------------- the handle's steps
    def trained(self, target: Target) -> tuple[nn.Parameter, ...]:
        return (self.values,)

    def held_by(self, target: Target, members: dict[int, Any] | set[int]) -> bool:
        return id(target.param) in members or any(id(p) in members for p in self.trained(target))

    def frozen(self, target: Target) -> bool:
        return not any(p.requires_grad for p in self.trained(target))

    def flag_changed(self, target: Target) -> bool:
        # The handle registered them trainable; every one frozen since is what peft.get_peft_model does. One of
        # several frozen (SHiRA-DoRA's magnitude, say: training the direction only) is the user's choice.
        return self.frozen(target)

    def got_gradient(self, target: Target) -> bool:
        return target.grad_seen or self.seen

    def optimizer_state_problem(self, target: Target, state: dict) -> tuple[str, int] | None:
        return None  # the optimizer's state is of the k values: nothing outside the mask

    def before_step(self, target: Target, optimizer: torch.optim.Optimizer, members: dict[int, dict]) -> bool:
        """Keep the trained tensors it holds as they are before the step (per optimizer: one optimizer's step may
        run another's inside it, as ZeroRedundancyOptimizer does); refuse an optimizer that holds the weight
        but none of them."""
        held = [p for p in self.trained(target) if id(p) in members]
        if not held:
            names = " and ".join(f"'{name}'" for name in self.names())
            raise ShiraError(
                f"{type(optimizer).__name__} holds target weight '{target.name}' but not its "
                f"{names} (mode={self.name!r} trains those instead of the weight): it "
                f"was built before attach() and would train nothing. Build the optimizer after attach()"
            )
        self._before[optimizer] = [(p, distributed.local(p).detach().clone()) for p in held]
        return False

    def step_changed(self, optimizer: torch.optim.Optimizer, members: set[int]) -> bool | None:
        """Whether the step changed a trained tensor bit for bit (None: none of them was in it)."""
        before = [(p, old) for p, old in self._before.pop(optimizer, ()) if id(p) in members]
        if not before:
            return None
        return any(not _same_bits(distributed.local(p).detach(), old) for p, old in before)

    def sharded(self) -> DTensor | None:
        return self.values if distributed.is_sharded(self.values) else None

    def write(self, target: Target) -> None:
        self.follow()
        self.sync(force=True)

    # ----------------------------------------------------------------- replaced parameters
    def follow_own(self, target: Target, verb: str | None) -> None:
        """The layer's ``shira_values`` (or another parameter of ``names()``) were replaced
        (``load_state_dict(assign=True)``). They are what trains, so a parameter of the same shape and dtype is
        followed and the weight written from it; anything else is refused. (Values that ``fully_shard`` sharded
        are followed by ``adopt``.)"""
        if self.managed:
            return
        replaced = False
        for name, old in zip(self.names(), self.trained(target)):
            now = target.module._parameters.get(name)
            if now is old:
                continue
            if not (
                isinstance(now, nn.Parameter)
                and now.shape == old.shape
                and now.dtype == old.dtype
                and now.device.type != "meta"
            ):
                layer = target.name.rpartition(".")[0]
                raise ShiraError(
                    f"{f'cannot {verb}: ' if verb else ''}'{layer}.{name}' ({describe(old)}, trained for "
                    f"'{target.name}') is no longer the parameter shira_hooks registered: the layer holds {describe(now)} now. {REPLACED_FIX}"
                )
            self.replace_own(name, now)
            target.replaced.append((f"{target.name.rpartition('.')[0]}.{name}", weakref.ref(old)))
            replaced = True
        if replaced:
            self.write(target)

    def replace_own(self, name: str, param: nn.Parameter) -> None:
        """Train ``param``, now in the layer in place of the parameter ``name`` the mode registered."""
        self.values = param

    def adopt(self, target: Target, weight: nn.Parameter) -> None:
        """Train the DTensors that ``fully_shard`` put in place of the weight and of ``shira_values``.

        Raises:
            ShiraError: the values are not sharded as ``Shard(0)`` on the weight's 1-D mesh.
        """
        where = f"'{target.name.rpartition('.')[0]}.{VALUES}'"
        assert (
            distributed.is_sharded(weight) and target.indices is not None
        )  # Follower adopts DTensors; masks fixed at attach
        values = target.module._parameters.get(VALUES)
        distributed.check_values(values, weight, where)
        assert values is not None  # check_values refused anything but a DTensor
        self.rows = distributed.row_slice(target.indices, weight, where)
        self.weight, self.values, self.managed = weight, values, True
        self.synced = self.versions()
        if self.check is not None:  # FSDP2 reads the sharded weights outside their layers (its all-gather)
            self.check.remove()

    def weight_replaced(self, target: Target, old: nn.Parameter, new: nn.Parameter) -> None:
        """The weight's masked entries mirror the values: write them into the new weight."""
        if self.check is not None:
            self.check.replace(old, new)
        self.weight = new
        self.write(target)

    # -------------------------------------------------------------------- resumable state
    def state(self, target: Target) -> dict[str, torch.Tensor]:
        return {}  # the values are the model's parameters (its state_dict), not the handle's

    def check_state(self, target: Target, entry: dict[str, Any]) -> None:
        if self.values.numel() != entry["indices"].numel():
            raise ShiraError(
                f"state for '{target.name}' has {entry['indices'].numel()} entries, the handle's {VALUES} has "
                f"{self.values.numel()}; attach with the sparsity of the run that saved it"
            )

    @torch.no_grad()
    def load(self, target: Target, entry: dict[str, Any]) -> None:
        """Take the loaded mask (k as before) and the weight's entries at it as the values, on every rank (same
        parameter objects, new entries: the weight holds the trained values)."""
        assert target.indices is not None  # the state's indices were set on the target before this call
        self.use_mask(target.indices)
        full = target.current()
        if self.rows is not None:
            assert distributed.is_sharded(self.weight)  # rows are kept for an FSDP2-sharded weight only
            self.rows = distributed.row_slice(target.indices, self.weight, "the loaded mask")
        if distributed.is_sharded(self.values):  # this rank's chunk of the k entries
            start, stop = distributed.row_range(self.values)
            distributed.local(self.values).copy_(full[start:stop])
        else:
            self.values.copy_(full)
        self.synced = self.versions()


class _Tap(torch.autograd.Function):
    """Identity on the layer output; its backward gives the gradient of the k masked weight entries."""

    @staticmethod
    def forward(
        ctx, output: torch.Tensor, values: torch.Tensor, inputs: torch.Tensor, mode: Compact, transposed: bool
    ) -> torch.Tensor:
        """``inputs``: the layer input X (..., in), or with ``transposed`` its transpose X^T (in, T).
        ``values``: the layer's ``shira_values`` now (under FSDP2 attached before ``fully_shard``: the
        all-gathered parameter, whose gradient FSDP2 reduce-scatters).

        The output is returned as itself, marked dirty, rather than as a view of it: autograd refuses
        in-place changes of a custom Function's view outputs, and layers are often followed by one
        (``nn.ReLU(inplace=True)``). Marking it dirty makes this node its producer, like an in-place op.
        """
        ctx.save_for_backward(inputs)
        ctx.mode, ctx.transposed = mode, transposed
        ctx.dtype, ctx.sharded = values.dtype, distributed.is_sharded(values)
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inputs,) = ctx.saved_tensors
        mode: Compact = ctx.mode
        mode.seen = True
        dy = grad_output.reshape(-1, grad_output.shape[-1]).float()  # (T, out)
        # (T, in); from a contiguous X^T, sampled_addmm's own transpose of its mat2 is a no-op
        x = inputs.float().t() if ctx.transposed else inputs.reshape(-1, inputs.shape[-1]).float()
        grad = mode.grad_at_mask(dy, x)  # (k,)
        if ctx.sharded:  # values sharded by install (FSDP2): average over the ranks, keep this rank's chunk
            values = mode.values
            assert distributed.is_sharded(values)  # the tapped values were the mode's own DTensor (ctx.sharded)
            return grad_output, distributed.values_grad(grad, values), None, None, None
        return grad_output, grad.to(ctx.dtype), None, None, None


def _whole_base(output: torch.Tensor) -> torch.Tensor:
    """The tensor to tap: F.linear returns a (..., out) view of its 2-D result; marking that view dirty
    would make autograd copy its gradient twice per layer (CopySlices), so the result it views is
    tapped instead and viewed again, when the view is that whole result in the same memory order."""
    base = output._base
    if (
        base is not None
        and output.is_contiguous()
        and base.is_contiguous()
        and output.numel() == base.numel()
        and output.data_ptr() == base.data_ptr()
    ):
        return base
    return output


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (-0.0 is not 0.0, NaN equals the same NaN); both contiguous, of one dtype and shape."""
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
