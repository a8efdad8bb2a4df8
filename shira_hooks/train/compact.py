"""``mode="compact"`` and ``mode="sparse"``: train the k masked entries as a k-length parameter.

For each target ``nn.Linear`` (weight W of shape (out, in), mask ``index`` of k flat entries):

* ``module.shira_values`` is an ``nn.Parameter`` of shape (k,) holding ``W.view(-1)[index]``. It is
  registered on the module, so ``model.parameters()`` (and therefore a Trainer's optimizer, gradient
  clipping and DDP) sees it, and any stock optimizer keeps state for k entries only. W itself gets
  ``requires_grad=False``: autograd computes no dense ``dL/dW`` for it.
* A forward hook passes the layer's output through ``_Tap``, an identity whose backward produces the
  gradient of ``shira_values`` from the output gradient dY (T, out) and the saved input X (T, in):
  ``dL/dW[r, c] = sum_t dY[t, r] X[t, c]`` at the masked (r, c) only.
  - "compact": the dense product ``dY^T X`` (one weight's worth, freed at once), then a gather;
  - "sparse": only the k sampled entries, with ``torch.sparse.sampled_addmm`` on a CSR pattern of the mask.
    The kernel reads X with T contiguous, so the forward hook saves X^T (in, T) instead of X, made while
    X is fresh in cache and made once for layers that read the same input (q/k/v, gate/up:
    ``InputTransposes``), instead of one transposing copy per layer in the backward. An input whose
    storage the backward keeps anyway is saved as it is, since a transpose would be a second copy:
    a view (an attention output reshaped: SDPA saves its output) or the result of an op that saves
    its own result (tanh, sigmoid, softmax, ...).
* After every optimizer step (a global step hook) ``shira_values`` is written into W (``index_copy_``);
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
  weight, as one of the layer's parameters, and the handle adopts the new parameter (``Plan.adopt``).
  FSDP2 then all-gathers it for each forward (the tap reads the module's current ``shira_values``)
  and reduce-scatters its gradient, like any parameter.

Either way, after each optimizer step the values are all-gathered (k entries per layer) and every rank
writes the entries in its own rows (``distributed.RowSlice``) into its shard of the weight, which FSDP2
all-gathers for the next forward.
"""

from __future__ import annotations

import itertools
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .. import distributed
from .._base import storage_flat
from ..errors import ShiraError
from ..masks import csr_pattern, csr_pattern_on, csr_zeros

VALUES = "shira_values"


@dataclass(eq=False)
class Plan:
    """Everything the hooks of one target layer need."""

    weight: nn.Parameter
    values: nn.Parameter  # (k,)
    index: torch.Tensor | None  # mode="compact": (k,) int64 logical flat indices (row-major (out, in)), on the weight's device
    positions: Callable[[torch.Tensor], torch.Tensor]  # the mask's storage positions in a tensor's layout
    pattern: torch.Tensor | None = None  # mode="sparse": (out, in) CSR with the mask's nonzeros, for sampled_addmm
    transposes: "InputTransposes | None" = None  # mode="sparse": shared by the layers of one handle
    synced: int = -1  # values._version last written into the weight
    seen: bool = False  # a gradient of the values was computed since attach
    rows: distributed.RowSlice | None = None  # FSDP2: the mask's entries in this rank's rows of the weight
    managed: bool = False  # FSDP2: fully_shard sharded the values (it unshards them and reduces their gradient)

    @property
    def sparse(self) -> bool:
        return self.transposes is not None

    def __getstate__(self) -> dict:
        """For a copy or a pickle of the model (``ShiraHandle.__getstate__``): a CSR tensor has no storage
        that ``copy.deepcopy`` could copy, so the pattern travels as its row pointers and columns."""
        state = dict(self.__dict__)
        if self.pattern is not None:
            state["pattern"] = (self.pattern.crow_indices(), self.pattern.col_indices(), tuple(self.pattern.shape))
        state["synced"] = -1  # the copy's weight is written from the copy's values at its first forward
        return state

    def __setstate__(self, state: dict) -> None:
        if state["pattern"] is not None:
            state["pattern"] = csr_zeros(*state["pattern"])
        self.__dict__.update(state)

    def pre_forward(self, module: nn.Module, args) -> None:
        """The layer's forward pre-hook: the weight holds the current values."""
        self.follow()
        self.sync()

    def post_forward(self, module: nn.Module, args, kwargs, output):
        """The layer's forward hook: taps the output so that its backward gives the values' gradient."""
        values = module._parameters.get(VALUES, self.values)  # under FSDP2: the all-gathered values, in the forward
        if torch.is_grad_enabled() and values.requires_grad:
            x = args[0] if args else kwargs["input"]
            tapped = _whole_base(output)
            if self.sparse and not _kept_by_producer(x):
                tapped = _Tap.apply(tapped, values, self.transposes(x), self, True)
            else:
                tapped = _Tap.apply(tapped, values, x, self, False)
            return tapped if tapped is output else tapped.view(output.shape)
        return None

    def follow(self) -> None:
        """Keep the index and the CSR pattern on the weight's device (``model.to(...)`` moves only parameters)."""
        device = self.weight.device
        if self.index is not None and self.index.device != device:
            self.index = self.index.to(device)
        if self.pattern is not None and self.pattern.device != device:
            self.pattern = csr_pattern_on(self.pattern, device)

    @torch.no_grad()
    def sync(self, force: bool = False) -> None:
        """Write the values into the weight: always with ``force``, else when ``values._version`` moved.

        Fused optimizer kernels (``torch._fused_adamw_``, the Trainer's default) update the values
        without bumping the version counter, so after an optimizer step the write is forced. Under
        FSDP2 only forced writes happen (they all-gather the values: a collective that every rank
        makes at the same step), and each rank writes the entries in its rows.
        """
        if force or (self.rows is None and self.values._version != self.synced):
            weight = self.weight.detach()
            values = self.values.detach()
            if self.rows is not None:
                values = distributed.gather(values)[self.rows.start : self.rows.stop]
            storage_flat(distributed.local(weight)).index_copy_(0, self.positions(weight), values.to(weight.device, weight.dtype))
            self.synced = self.values._version

    def adopt(self, weight: nn.Parameter, values: torch.Tensor, indices: torch.Tensor, where: str) -> None:
        """Train the DTensors that ``fully_shard`` put in place of the weight and of ``shira_values``.

        ``indices``: the mask (sorted logical indices, on the CPU).

        Raises:
            ShiraError: the values are not sharded as ``Shard(0)`` on the weight's 1-D mesh.
        """
        distributed.check_values(values, weight, where)
        rows = distributed.row_slice(indices, weight, where)
        self.weight, self.values, self.rows, self.managed = weight, values, rows, True
        self.synced = values._version

    @torch.no_grad()
    def load(self, indices: torch.Tensor, full: torch.Tensor) -> None:
        """Take another mask (sorted logical indices, k as before) and (k,) values for it, on every rank."""
        index = indices.to(self.weight.device, torch.int64)
        if self.sparse:
            self.pattern = csr_pattern(index, tuple(self.weight.shape))
        else:
            self.index = index
        if self.rows is not None:
            self.rows = distributed.row_slice(indices, self.weight, "the loaded mask")
        if distributed.is_sharded(self.values):  # this rank's chunk of the k entries
            start, stop = distributed.row_range(self.values)
            distributed.local(self.values).copy_(full[start:stop])
        else:
            self.values.copy_(full)
        self.synced = self.values._version


class InputTransposes:
    """The (in, T) transpose of the last layer input, for the sparse-mode layers of one handle.

    Layers that read the same input tensor one after another (a transformer's q/k/v projections, its
    gate/up projections) get one transposed copy between them. Only weak references are kept: the
    copy lives as long as a backward graph saves it, and an input that changed in place (its
    ``_version``) or a new tensor at the same address gets a fresh copy.
    """

    def __init__(self) -> None:
        self._last: tuple[weakref.ref, int, weakref.ref] | None = None

    def __getstate__(self) -> dict:
        return {"_last": None}  # weak references do not pickle, and a copy starts with no input

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            source, version, copy = self._last
            xt = copy()
            if source() is x and version == x._version and xt is not None:
                return xt
        xt = x.detach().reshape(-1, x.shape[-1]).t().contiguous()
        self._last = (weakref.ref(x), x._version, weakref.ref(xt))
        return xt


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

    def __init__(self, model: nn.Module, layers: list[tuple[nn.Parameter, nn.Module, str]], mode: str):
        self.layers, self.mode = layers, mode
        self.watching: list = []  # [ReadWatch, layer hook handles] while the first forward runs
        self.hooks = [model.register_forward_pre_hook(self.start), model.register_forward_hook(self.stop, always_call=True)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "watching": []}  # a copy taken during the first forward starts afresh

    def start(self, root: nn.Module, args) -> None:
        if not self.layers or not torch.is_grad_enabled() or torch.compiler.is_compiling() or self.watching:
            return
        watch = ReadWatch({id(weight): name for weight, _, name in self.layers})
        self.watching.append(watch)
        for weight, layer, _ in self.layers:  # prepend: before the plan's own pre-hook reads the weight
            if layer is root:  # the model is itself a target layer, and already running
                watch.enter_layer(weight)
            self.watching.append(layer.register_forward_pre_hook(lambda mod, a, w=weight: watch.enter_layer(w), prepend=True))
            self.watching.append(layer.register_forward_hook(lambda mod, a, out, w=weight: watch.leave_layer(w), always_call=True))
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
                f"Use mode='dense', or leave {found} out of target_modules"
            )

    def remove(self) -> None:
        """Remove the hooks on the model (and on the layers, during the first pass); also stops a first pass
        whose pre-hooks torch has already listed."""
        for hook in self.hooks + self.watching[1:]:
            hook.remove()
        self.hooks, self.layers = [], []


class _Tap(torch.autograd.Function):
    """Identity on the layer output; its backward gives the gradient of the k masked weight entries."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, values: torch.Tensor, inputs: torch.Tensor, plan: Plan, transposed: bool) -> torch.Tensor:
        """``inputs``: the layer input X (..., in), or with ``transposed`` its transpose X^T (in, T).
        ``values``: the layer's ``shira_values`` now (under FSDP2 attached before ``fully_shard``: the
        all-gathered parameter, whose gradient FSDP2 reduce-scatters).

        The output is returned as itself, marked dirty, rather than as a view of it: autograd refuses
        in-place changes of a custom Function's view outputs, and layers are often followed by one
        (``nn.ReLU(inplace=True)``). Marking it dirty makes this node its producer, like an in-place op.
        """
        ctx.save_for_backward(inputs)
        ctx.plan, ctx.transposed = plan, transposed
        ctx.dtype, ctx.sharded = values.dtype, distributed.is_sharded(values)
        ctx.mark_dirty(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (inputs,) = ctx.saved_tensors
        plan: Plan = ctx.plan
        plan.seen = True
        dy = grad_output.reshape(-1, grad_output.shape[-1]).float()  # (T, out)
        # (T, in); from a contiguous X^T, sampled_addmm's own transpose of its mat2 is a no-op
        x = inputs.float().t() if ctx.transposed else inputs.reshape(-1, inputs.shape[-1]).float()
        if plan.sparse:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                grad = torch.sparse.sampled_addmm(plan.pattern, dy.t(), x, beta=0.0).values()  # (k,)
        else:
            grad = (dy.t() @ x).view(-1).index_select(0, plan.index)  # dense (out, in) product, gathered
        if ctx.sharded:  # values sharded by install (FSDP2): average over the ranks, keep this rank's chunk
            return grad_output, distributed.values_grad(grad, plan.values), None, None, None
        return grad_output, grad.to(ctx.dtype), None, None, None


def _whole_base(output: torch.Tensor) -> torch.Tensor:
    """The tensor to tap: F.linear returns a (..., out) view of its 2-D result; marking that view dirty
    would make autograd copy its gradient twice per layer (CopySlices), so the result it views is
    tapped instead and viewed again, when the view is that whole result in the same memory order."""
    base = output._base
    whole = (
        base is not None and output.is_contiguous() and base.is_contiguous()
        and output.numel() == base.numel() and output.data_ptr() == base.data_ptr()
    )
    return base if whole else output


def _kept_by_producer(x: torch.Tensor) -> bool:
    """Whether the backward already keeps ``x``'s storage: ``x`` is a view, or the op that made it
    saved its own result. ``dir`` lists the saved fields without unpacking them (which would run
    saved-tensor hooks such as offloading or checkpoint recomputation)."""
    return x._base is not None or (x.grad_fn is not None and "_saved_result" in dir(x.grad_fn))


def install(
    module: nn.Module,
    weight: nn.Parameter,
    indices: torch.Tensor,
    positions: Callable[[torch.Tensor], torch.Tensor],
    transposes: InputTransposes | None,
) -> tuple[Plan, list]:
    """Register ``module.shira_values`` and the two hooks; returns the plan and the hook handles.

    ``indices`` are the mask's logical flat indices, ``positions(tensor)`` their storage positions in a
    tensor's layout. ``transposes`` (shared between the layers of one handle) selects mode="sparse";
    None is "compact".
    """
    index = indices.to(weight.device, torch.int64)
    values = storage_flat(distributed.local(weight.detach())).index_select(0, positions(weight)).clone()  # FSDP2: this rank's rows
    rows = None
    if distributed.is_sharded(weight):  # FSDP2: every rank's rows' entries, then this rank's chunk of the k
        rows = distributed.row_slice(indices, weight, f"weight of '{type(module).__name__}'")
        values = distributed.shard_values(distributed.gather_slices(values, rows, weight.device_mesh), weight)
    else:
        values = nn.Parameter(values)
    module.register_parameter(VALUES, values)
    pattern = csr_pattern(index, tuple(weight.shape)) if transposes is not None else None
    plan = Plan(weight, values, index if pattern is None else None, positions, pattern, transposes, rows=rows)
    plan.synced = values._version
    # Bound methods of the plan, not closures: a deep copy or a pickle of the module carries them with a
    # copy of the plan, so a copied layer's hooks act on the copy's values and weight, never the original's.
    return plan, [module.register_forward_pre_hook(plan.pre_forward), module.register_forward_hook(plan.post_forward, with_kwargs=True)]


def uninstall(module: nn.Module, plan: Plan) -> None:
    """Write the values into the weight and unregister them (under FSDP2 a collective).

    Values that ``fully_shard`` sharded stay registered, frozen: FSDP2 keeps them in its parameter
    group and would put them back on the module at its next all-gather.
    """
    plan.sync(force=True)
    if plan.managed:
        plan.values.requires_grad_(False)
    elif VALUES in module._parameters:  # also values that replaced the plan's (load_state_dict(assign=True))
        del module._parameters[VALUES]
