"""``MixedAdapters``: one batch, a different adapter per row, without writing any weight.

For every target ``nn.Linear`` (weight W (out, in), bias b) a forward hook adds, to the rows routed to
adapter i, ``alpha_i * x S_i^T``, with S_i the adapter's sparse delta held as an (out, in) CSR
tensor (values ``alpha_i * S_i``, float32; float64 for float64 weights)::

    y = x W^T + b                                # the layer's own output, (B, T, out)
    y[rows_i] += x[rows_i] (alpha_i S_i)^T       # per adapter i of the route, in place

Rows routed to ``None`` (and rows of an adapter that does not adapt this layer) are never written,
so they are bit for bit what the layer computed. Nothing else changes: no weight, no parameter, no
buffer; ``close()`` removes the hooks.

Kernel (chosen by measurement; ``benchmarks/mixed_batch.py`` times the alternatives; fastest of 25 rounds on a busy machine,
2 CPU threads, a 1536x576 weight at 1%, 7 rows x 64 tokens over 4 adapters,
the layer's own product ~2.7 ms): per adapter, the rows' inputs are copied transposed into one
contiguous (in, n*T) block (0.14 ms for the four; shared by layers that read the same input, as
q/k/v and gate/up do), ``torch.sparse.mm(S_csr, x^T)`` gives (out, n*T) (0.28 ms for the four;
MKL's CSR kernel wants a row-major dense operand: on a transposed view it took 0.67 ms, and a dense
left operand, ``x @ S^T`` with S^T as CSR, 3.6 ms), and the transposed result is added to each run
of consecutive rows of the output (0.42 ms; ``index_add_`` with a transposed source 0.70 ms; a
column-major ``out=`` makes torch copy, 1.3 ms). A gather of the k input columns with ``index_add_``
and a dense delta product are slower still.

Dtypes: the delta is computed in float32 (float64 for float64 outputs) whatever the model's dtype and
autocast, then added to the output, which rounds it to the output's dtype. MKL's CSR kernel has no
bfloat16/float16 version, and the input block is a copy anyway, so casting it costs nothing extra;
a gather of the k input columns with ``index_add_`` in bfloat16 took 4x as long in a small run
(``benchmarks/mixed_batch.py`` has the numbers). The CSR values follow the model's device and dtype
at the next routed forward pass.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .._base import WeakIdTable
from ..errors import ShiraError
from ..format import SparseAdapter, as_adapter
from ..masks import csr_pattern
from .state import model_state
from .switch import check

__all__ = ["MixedAdapters"]

_OPEN = WeakIdTable()  # nn.Linear -> weakref to the open MixedAdapters that hooks it (one per layer)
_OPEN_LOCK = threading.Lock()


class _Layer:
    """One target Linear: its name and, per adapter position, the (out, in) CSR of alpha * S (or None)."""

    def __init__(self, name: str, module: nn.Linear, count: int):
        self.name = name
        self.module = module
        self.deltas: list[torch.Tensor | None] = [None] * count

    def delta(self, position: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """The CSR delta of one adapter, on ``device`` in ``dtype`` (moved or cast once when the model was)."""
        csr = self.deltas[position]
        if csr is not None and (csr.device != device or csr.dtype != dtype):
            csr = self.deltas[position] = csr.to(device, dtype)
        return csr


class _Route:
    """An active route: the thread that entered it and, per adapter, the runs of its rows."""

    def __init__(self, names: list[str | None], positions: dict[str, int]):
        self.thread = threading.get_ident()
        self.size = len(names)
        # per adapter position: [(first row, number of rows), ...], consecutive rows merged into runs
        runs: dict[int, list[list[int]]] = {}
        for row, name in enumerate(names):
            if name is None:
                continue
            group = runs.setdefault(positions[name], [])
            if group and group[-1][0] + group[-1][1] == row:
                group[-1][1] += 1
            else:
                group.append([row, 1])
        self.groups: list[tuple[int, list[tuple[int, int]]]] = [
            (p, [(r[0], r[1]) for r in rs]) for p, rs in sorted(runs.items())
        ]
        self._inputs: tuple[weakref.ref, int, torch.dtype, list[torch.Tensor]] | None = None

    def transposed_inputs(self, x: torch.Tensor, batch_dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per group, its rows of ``x`` (batch along ``batch_dim``) as one contiguous (in, n*T) block in ``dtype``.

        Layers that read the same input one after another (q/k/v, gate/up) share the blocks; an input
        changed in place (``_version``) or a new tensor gets new ones.
        """
        if self._inputs is not None:
            source, version, kept_dtype, blocks = self._inputs
            if source() is x and version == x._version and kept_dtype == dtype:
                return blocks
        columns = x.shape[-1]
        rows = x.movedim(batch_dim, 0)  # (B, ..., in), a view
        blocks = []
        for _, runs in self.groups:
            parts = [rows[start : start + count].reshape(-1, columns).t() for start, count in runs]  # (in, n*T)
            blocks.append(torch.cat(parts, dim=1).to(dtype))  # one copy, contiguous (cat of one view copies too)
        self._inputs = (weakref.ref(x), x._version, dtype, blocks)
        return blocks


class MixedAdapters:
    """Serve several SHiRA adapters in one batch: each row of the batch gets its own adapter.

    The model's weights are never written. ``route(names)`` gives one adapter name (or None: no
    adapter) per batch row, for every forward pass of the model in the thread that entered it, a
    whole ``generate()`` included (its cached decoding steps keep the rows). Each row's output equals
    the model with that row's adapter applied by ``shira_hooks.apply`` (to float rounding; 1e-4 on
    the logits of a small Llama in the tests), and rows routed to None are bit for bit the model's
    own output.

    With ``apply``: the mixed deltas are added to the layer's output computed from the weights as
    they are, so adapters applied in place act as the new base for every row (a row routed to ``a``
    while ``c`` is applied gets what ``apply(c)`` then ``apply(a)`` gives; a None row gets ``c``).
    Adapters are checked against the true base (applied adapters undone), as ``apply`` checks them.
    A route holds the model's switching lock, so ``apply``/``remove`` from other threads wait until it
    ends (the same thread may still switch inside it).

    Threads: a route acts only on forward passes run by the thread that entered it; other threads
    using the model meanwhile get its plain output. One route at a time: entering a second one
    (nested, or from another thread) raises ShiraError. A layer is served by one open ``MixedAdapters``
    at a time.

    Batch dimension: by default dim 0 of every adapted layer's input is the batch (``(B, T, in)`` or
    ``(B, in)``). A model holding a module with ``batch_first=False`` (``nn.TransformerEncoderLayer``,
    ``nn.MultiheadAttention``, ``nn.LSTM``, ...) may feed its layers sequence-first ``(T, B, in)``
    inputs, which cannot be told apart from batch-first ones when T == B: such a model is refused
    unless ``batch_dim`` is given (1 for sequence-first inputs).

    Dtypes: any floating dtype, autocast included; each row equals ``apply`` in that dtype to its
    rounding (the delta is computed in float32 and rounded once into the output). The model may be
    moved or cast after construction.

    Limits: ``nn.Linear`` targets only, inference only (a forward with gradients through a routed
    layer raises ShiraError: run it under ``torch.no_grad()``), the layer must be called as a module
    (a weight read functionally, ``F.linear(x, layer.weight)``, gets no delta; the ``out_proj`` of an
    ``nn.MultiheadAttention``, which it reads so, is refused), and a weight tied to another module or
    sharing memory with another parameter or buffer is refused. The fingerprints are checked at
    construction; build a new one after training or editing the base.

    Example:
        >>> mixed = shira_hooks.MixedAdapters(model, {"paint": a, "knight": b}, alpha={"knight": 0.5})
        >>> with torch.no_grad(), mixed.route(["paint", None, "knight", "paint"]):
        ...     logits = model(input_ids=ids).logits          # ids: (4, T)
        ...     out = model.generate(ids, max_new_tokens=20)
        >>> mixed.close()
    """

    def __init__(
        self,
        model: nn.Module,
        adapters: Mapping[str, SparseAdapter],
        alpha: float | Mapping[str, float] = 1.0,
        *,
        check_base: bool = True,
        batch_dim: int | None = None,
    ):
        """Check every adapter against the model, then hook the target layers.

        Args:
            model: the base model (its parameter names are the adapters' module names).
            adapters: ``{name: adapter}``, each a ``SparseAdapter`` or the path of an adapter file or
                folder (read as ``SparseAdapter.load`` reads it); names are what ``route`` takes.
            alpha: one strength for all, or ``{name: alpha}`` (missing names get 1.0).
            check_base: verify dtypes and base fingerprints, as ``apply`` does.
            batch_dim: which dimension of an adapted layer's input holds the batch rows: 0 for
                ``(B, T, in)`` or ``(B, in)``, 1 for sequence-first ``(T, B, in)``. None (default): 0,
                but a model with a ``batch_first=False`` module is refused (it may be either).

        Raises:
            ShiraError: no adapters, a name that is not a string, an adapter that is not a
                SparseAdapter or a path, an alpha that is not a finite number or names no adapter, an
                adapter that does not fit the model (missing module, shape, dtype, fingerprint:
                ``apply``'s checks), a target that is not an ``nn.Linear`` weight (or is tied to another
                module, shares memory with another tensor of the model, or is the ``out_proj`` of an
                ``nn.MultiheadAttention``), a bad ``batch_dim`` or none for a model with
                ``batch_first=False`` modules, or a layer that another open ``MixedAdapters`` serves.
                Nothing is installed then.
        """
        self.model = model
        self.batch_dim = _check_batch_dim(model, batch_dim)
        self.names, self.alphas = _check_arguments(adapters, alpha)
        self.adapters = [as_adapter(adapters[name], where=f"MixedAdapters adapter {name!r}") for name in self.names]
        self._lock = threading.Lock()  # guards entering and leaving routes
        self._route: _Route | None = None
        self._hooks: list = []
        self._closed = False
        self._switch_lock = model_state(model).lock
        for name, adapter in zip(self.names, self.adapters):
            try:
                check(model, adapter, check_base=check_base)
            except ShiraError as error:
                raise ShiraError(f"adapter {name!r}: {error}") from None
        layers = _target_layers(model, self.names, self.adapters, self.alphas)
        with _OPEN_LOCK:
            for layer in layers:  # a layer hooked twice would get the deltas twice
                entry = _OPEN.get(layer.module)
                owner = entry() if entry is not None else None
                if owner is not None and not owner._closed:
                    raise ShiraError(
                        f"layer '{layer.name}' is already served by an open MixedAdapters; close() that one first, "
                        f"or give one MixedAdapters all the adapters"
                    )
            for layer in layers:
                self._hooks.append(layer.module.register_forward_hook(self._hook(layer), with_kwargs=True))
                _OPEN.set(layer.module, weakref.ref(self))
        self._layers = layers
        self.layers = [layer.name for layer in layers]  # the hooked layers' names

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self.layers)} layers"
        return f"MixedAdapters({self.names}, {state})"

    # ------------------------------------------------------------------------------- routing
    @contextmanager
    def route(self, names: Sequence[str | None]) -> Iterator[None]:
        """Route batch row ``r`` to adapter ``names[r]`` (None: no adapter) inside the block.

        Every routed layer's input must have ``len(names)`` rows along ``batch_dim`` (dim 0 of a
        (B, T, in) or (B, in) input by default). Holds the model's switching lock for the whole
        block (``apply``/``remove`` from other threads wait).

        Raises:
            ShiraError: ``names`` is not a non-empty sequence, names an unknown adapter, this
                object is closed, or another route is active (nested or from another thread).
                Inside the block, a forward pass raises ShiraError for a layer input whose batch
                size is not ``len(names)``, or one that needs gradients.
        """
        if isinstance(names, (str, bytes)) or not isinstance(names, Sequence) or len(names) == 0:
            raise ShiraError(
                f"route() takes one adapter name (or None) per batch row, as a non-empty list; got {names!r}"
            )
        unknown = sorted({repr(n) for n in names if n is not None and n not in self.names})
        if unknown:
            raise ShiraError(
                f"route(): unknown adapter name(s) {', '.join(unknown)}; the known ones are {self.names} (or None for the base)"
            )
        if self._closed:
            raise ShiraError("route(): this MixedAdapters is closed; create a new one")
        plan = _Route(list(names), {name: i for i, name in enumerate(self.names)})
        with self._lock:
            if self._route is not None:
                where = "this thread" if self._route.thread == plan.thread else "another thread"
                raise ShiraError(
                    f"route(): a route is already active (entered in {where}); routes cannot overlap, leave it first"
                )
            self._route = plan
        try:
            with self._switch_lock:
                yield
        finally:
            with self._lock:
                self._route = None

    def _hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> None:
            route = self._route
            if route is None or route.thread != threading.get_ident():
                return None
            self._add_deltas(layer, route, args[0] if args else kwargs["input"], output)
            return None

        return hook

    @torch.no_grad()
    def _add_deltas(self, layer: _Layer, route: _Route, x: torch.Tensor, y: torch.Tensor) -> None:
        """y[rows of adapter i] += x[rows] (alpha_i S_i)^T, in place, for every adapter of the route."""
        batch_dim = self.batch_dim
        if x.dim() < 2 or batch_dim >= x.dim() - 1 or x.shape[batch_dim] != route.size:
            size = x.shape[batch_dim] if batch_dim < x.dim() - 1 else "none"
            raise ShiraError(
                f"layer '{layer.name}': its input has batch size {size} along batch_dim={batch_dim} (shape {list(x.shape)}), "
                f"the route has {route.size} rows; give route() one name per row of the batch the model sees "
                f"(beam search and other batch expansions are not supported)"
            )
        if y.requires_grad:
            raise ShiraError(
                f"layer '{layer.name}': a routed forward pass needs gradients; MixedAdapters is for inference, "
                f"run it under torch.no_grad() or torch.inference_mode()"
            )
        rows = y.movedim(batch_dim, 0)  # (B, ..., out), a view of the output
        # float32 compute whatever the output's dtype (CSR has no bfloat16/float16 kernel); add_ rounds once
        dtype = torch.float64 if y.dtype == torch.float64 else torch.float32
        with torch.autocast(y.device.type, enabled=False):  # autocast would cast the product to bfloat16
            self._add_groups(layer, route, x, rows, dtype)

    def _add_groups(
        self, layer: _Layer, route: _Route, x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype
    ) -> None:
        """rows[rows of adapter i] += the delta computed in ``dtype``; ``rows`` is the output viewed (B, ..., out)."""
        inner, out = rows.shape[1:-1], rows.shape[-1]
        blocks = None
        for block_index, (position, runs) in enumerate(route.groups):
            csr = layer.delta(position, rows.device, dtype)
            if csr is None:  # this adapter does not adapt this layer
                continue
            if blocks is None:
                blocks = route.transposed_inputs(x, self.batch_dim, dtype)
            delta = torch.sparse.mm(csr, blocks[block_index])  # (out, n*T)
            column = 0
            for start, count in runs:
                width = count * math.prod(inner)
                # (width, out) -> (count, T, out): splitting the first dim of a transposed slice is a view
                rows[start : start + count].add_(delta[:, column : column + width].t().view(count, *inner, out))
                column += width

    # ------------------------------------------------------------------------------- closing
    def close(self) -> None:
        """Remove every hook; the model is as it was before. Safe to call twice.

        Raises:
            ShiraError: a route is active (leave it first).
        """
        with self._lock:
            if self._route is not None:
                raise ShiraError("close(): a route is active; leave the `with mixed.route(...)` block first")
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            self._closed = True
        with _OPEN_LOCK:
            for layer in self._layers:
                if (entry := _OPEN.get(layer.module)) is not None and entry() is self:
                    _OPEN.pop(layer.module)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> MixedAdapters:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_batch_dim(model: nn.Module, batch_dim: int | None) -> int:
    """``batch_dim``, or 0 when None and no module of the model may feed its layers sequence-first inputs."""
    if batch_dim is not None:
        if isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0:
            raise ShiraError(
                f"batch_dim={batch_dim!r}; it must be a non-negative int: 0 for (B, T, in) inputs, 1 for (T, B, in)"
            )
        return batch_dim
    sequence_first = [
        (name or "<model>", type(module).__name__)
        for name, module in model.named_modules()
        if getattr(module, "batch_first", True) is False
    ]
    if sequence_first:
        (name, kind), more = sequence_first[0], len(sequence_first) - 1
        raise ShiraError(
            f"module '{name}' ({kind}) has batch_first=False{f' (and {more} more)' if more else ''}, so adapted "
            f"layers may see (T, B, in) inputs, which cannot be told from (B, T, in) when T == B; pass batch_dim=1 for "
            f"sequence-first inputs, or batch_dim=0 if every adapted layer sees the batch first"
        )
    return 0


def _check_arguments(
    adapters: Mapping[str, SparseAdapter | str], alpha: float | Mapping[str, float]
) -> tuple[list[str], list[float]]:
    """The adapter names, in order, and their alphas; ShiraError for bad ones."""
    if not isinstance(adapters, Mapping) or not adapters:
        raise ShiraError(
            f"MixedAdapters needs a non-empty {{name: SparseAdapter}} mapping, got {type(adapters).__name__}"
        )
    for name in adapters:
        if not isinstance(name, str):
            raise ShiraError(
                f"adapter name {name!r} is a {type(name).__name__}; names must be strings (None means the base in route())"
            )
    names = list(adapters)
    given = dict(alpha) if isinstance(alpha, Mapping) else dict.fromkeys(names, alpha)
    extra = sorted(set(given) - set(names), key=str)
    if extra:
        raise ShiraError(f"alpha names unknown adapter(s) {extra}; the adapters are {names}")
    alphas = [given.get(name, 1.0) for name in names]
    for name, value in zip(names, alphas):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ShiraError(f"alpha for adapter {name!r} is {value!r}; it must be a finite number (1.0 = as trained)")
    return names, [float(a) for a in alphas]


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first byte, end byte) of the memory a strided tensor's elements lie in."""
    reach = [(size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride())]  # elements, per dim
    low = tensor.data_ptr() + sum(r for r in reach if r < 0) * tensor.element_size()
    return low, low + (1 + sum(abs(r) for r in reach)) * tensor.element_size()


def _memory(model: nn.Module) -> list[tuple[int, int, str, int, torch.device]]:
    """(first byte, end byte, name, id, device) of every parameter and buffer of the model (dense, not on meta)."""
    spans = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.numel() and tensor.layout == torch.strided and tensor.device.type != "meta":
            spans.append((*_span(tensor), name, id(tensor), tensor.device))
    return spans


def _sharing(weight: torch.Tensor, memory: list[tuple[int, int, str, int, torch.device]]) -> str | None:
    """The name of another parameter or buffer whose memory overlaps ``weight``'s, or None.

    Compares byte ranges on the same device, not storages: weights packed side by side into one
    buffer do not overlap.
    """
    if weight.numel() == 0 or weight.device.type == "meta":
        return None
    low, high = _span(weight)
    return next(
        (
            name
            for other_low, other_high, name, other, device in memory
            if other != id(weight) and device == weight.device and other_low < high and low < other_high
        ),
        None,
    )


def _target_layers(
    model: nn.Module, names: list[str], adapters: list[SparseAdapter], alphas: list[float]
) -> list[_Layer]:
    """One ``_Layer`` per adapted Linear (CSR deltas built); ShiraError for a target that is not one."""
    holders: dict[int, int] = {}  # id(param) -> number of modules holding it (tied weights)
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders[id(param)] = holders.get(id(param), 0) + 1
    # Layers their parent reads without calling them: a forward hook never sees their use.
    read_directly = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    memory = _memory(model)
    layers: dict[str, _Layer] = {}
    for position, (name, adapter, alpha) in enumerate(zip(names, adapters, alphas)):
        for weight_name, delta in adapter.deltas.items():
            module_name, _, leaf = weight_name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            if not isinstance(module, nn.Linear) or leaf != "weight":
                raise ShiraError(
                    f"adapter {name!r} adapts '{weight_name}' ({type(module).__name__}.{leaf}); MixedAdapters serves "
                    f"nn.Linear weights only. Use shira_hooks.apply for this adapter"
                )
            if holders[id(module.weight)] > 1:
                raise ShiraError(
                    f"adapter {name!r} adapts '{weight_name}', a weight tied to another module (e.g. the input "
                    f"embedding); a hook on this layer would not reach the other use. Use shira_hooks.apply"
                )
            if id(module) in read_directly:
                raise ShiraError(
                    f"adapter {name!r} adapts '{weight_name}', the out_proj of an nn.MultiheadAttention, which reads the "
                    f"weight directly without calling the layer, so no hook sees it. Use shira_hooks.apply for this adapter"
                )
            if module_name not in layers and (other := _sharing(module.weight, memory)) is not None:
                raise ShiraError(
                    f"adapter {name!r} adapts '{weight_name}', whose memory is shared with '{other}' (e.g. a weight tied by "
                    f"nn.Parameter(other.weight.data)); apply would change both, a hook on this layer only its own output. "
                    f"Use shira_hooks.apply, or give the two their own storage (.clone())"
                )
            layer = layers.get(module_name)
            if layer is None:
                layer = layers[module_name] = _Layer(module_name, module, len(names))
            if alpha == 0:  # no effect: the rows keep the base output exactly
                continue
            index = delta.indices.to(module.weight.device, torch.int64)
            pattern = csr_pattern(index, (delta.shape[0], delta.shape[1]))  # (out, in) of an nn.Linear
            # float32 (float64 for float64 weights); cast to the output's compute dtype at the first routed pass
            dtype = torch.float64 if module.weight.dtype == torch.float64 else torch.float32
            values = alpha * delta.values.to(module.weight.device, dtype)
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore")
                layer.deltas[position] = torch.sparse_csr_tensor(
                    pattern.crow_indices(), pattern.col_indices(), values, pattern.shape
                )
    return list(layers.values())
