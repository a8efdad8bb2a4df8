"""Choosing the masks: ``Calibration``, a handle's calibration state, and eager calibration on given batches.

struct, rand, wm and mask functions are chosen at ``attach`` (``Calibration.fix_unscored``). grad and snip
are scored on gradients: on ``calibration=`` batches at ``attach`` (eager: ``Calibration.run``), or on the
first ``calibration_steps`` backward passes of training (lazy: the gradient hook hands each calibrating
target's gradient to ``Calibration.accumulate`` and drops it, and the mask is fixed after the last pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed, masks
from ..errors import ShiraError
from .config import Config
from .target import Target

LossFn = Callable[[nn.Module, Any], torch.Tensor]

# Running out of host or accelerator memory, or a device fault, says nothing about the batch: the fix
# is a smaller batch or another device, and callers catch these by type (to retry smaller), so they
# pass through calibration unchanged instead of becoming a ShiraError. (OutOfMemoryError is a
# RuntimeError, AcceleratorError too; both are recent names, hence the lookups.)
_RESOURCE_ERRORS = tuple(
    error
    for error in (
        MemoryError,
        getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError,
        getattr(torch, "AcceleratorError", None),
    )
    if error is not None
)


def _length(batches: Iterable) -> int | None:
    """How many batches there are, for the progress bar, or None when ``batches`` cannot tell (a generator; a
    ``DataLoader`` over an ``IterableDataset``, whose ``__len__`` raises TypeError)."""
    if not isinstance(batches, Sized):
        return None
    try:
        return len(batches)
    except TypeError:
        return None


def _progress(batches: Iterable, enabled: bool, total: int | None) -> Iterable:
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a missing progress bar must not stop training
        return batches
    return tqdm(batches, total=total, desc="shira_hooks calibration", unit="batch")


def compute_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None, position: int) -> torch.Tensor:
    """The scalar loss of one calibration batch: ``loss_fn(model, batch)`` or ``model(**batch).loss``.

    Raises:
        ShiraError: naming the batch, when no loss can be computed or the loss is not a scalar.
        MemoryError, torch.OutOfMemoryError, torch.AcceleratorError: unchanged, as raised by the
            model or ``loss_fn`` (as is any BaseException such as KeyboardInterrupt).
    """
    fix = "pass loss_fn=lambda model, batch: <scalar loss>"
    loss: object  # whatever loss_fn or the model returned: checked below
    try:
        if loss_fn is not None:
            loss = loss_fn(model, batch)
        else:
            if not isinstance(batch, Mapping):
                raise ShiraError(
                    f"calibration batch {position} is a {type(batch).__name__}; without loss_fn a batch "
                    f"must be a dict of model inputs so that model(**batch).loss is the loss. Fix: {fix}"
                )
            output = model(**batch)
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, Mapping):
                loss = output.get("loss")
            if loss is None:
                raise ShiraError(
                    f"model(**batch) returned no loss for calibration batch {position} (Hugging Face models "
                    f"return one only when the batch has labels). Fix: add labels, or {fix}"
                )
    except (ShiraError, *_RESOURCE_ERRORS):
        raise
    except Exception as error:  # a batch the model cannot take: wrong keys, types, shapes
        raise ShiraError(
            f"could not compute a loss from calibration batch {position} ({type(error).__name__}: {error}). Fix: {fix}"
        ) from error
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else f"a {type(loss).__name__}"
        raise ShiraError(
            f"the loss of calibration batch {position} is {got}; it must be a floating-point scalar "
            f"tensor (reduce it, e.g. with .mean())"
        )
    if not loss.requires_grad:
        raise ShiraError(
            f"the loss of calibration batch {position} does not depend on any target weight "
            f"(it has no grad_fn); check target_modules and that the loss is computed from the model"
        )
    return loss


def run_calibration(
    model: nn.Module,
    batches: Iterable,
    loss_fn: LossFn | None,
    target_ids: set[int],
    progress: bool,
    after_pass: Callable[[], None] | None = None,
) -> int:
    """Run one backward pass per batch; the handle's hooks accumulate scores and drop the gradients.

    ``after_pass`` runs after each backward pass (the handle averages the pass's gradients over the ranks).

    The model is left as it was found: every module's train/eval mode and every parameter's
    ``requires_grad`` are restored, and no ``.grad`` is left behind (non-target parameters are
    frozen while scoring, target gradients are dropped by the hooks).

    Returns:
        The number of batches used.
    """
    modes = [(module, module.training) for module in model.modules()]
    thawed = [p for p in model.parameters() if p.requires_grad and id(p) not in target_ids]
    for param in thawed:
        param.requires_grad_(False)
    model.eval()  # deterministic scores: no dropout
    count = 0
    world, device = distributed.world_size(), next(iter(model.parameters())).device
    try:
        for position, batch in enumerate(_progress(_agreed(batches, world, device), progress, _length(batches))):
            compute_loss(model, batch, loss_fn, position).backward()
            if after_pass is not None:
                after_pass()
            count += 1
    finally:
        for module, training in modes:
            module.training = training
        for param in thawed:
            param.requires_grad_(True)
    if count == 0:
        raise ShiraError(
            "calibration= yielded no batches; pass at least one batch, or omit calibration= to score "
            "on the first backward passes of training"
        )
    return count


def _agreed(batches: Iterable, world: int, device: torch.device) -> Iterator:
    """``batches``, but under ``torch.distributed`` only as many as every rank has: each backward pass of
    eager calibration averages gradients over the ranks (collectives), so all ranks must take the same
    number of passes. Before each one the ranks agree (an all-reduce of one flag) that all have a batch."""
    if world <= 1:
        yield from batches
        return
    iterator = iter(batches)
    while True:
        batch = next(iterator, _END)
        more = torch.tensor([batch is not _END], dtype=torch.int32, device=device)
        distributed.all_reduce(more, "min")
        if not more.item():
            return
        yield batch


_END = object()


def mask_from_scores(
    kind: masks.MaskKind,
    name: str,
    scores: torch.Tensor | None,
    weight: torch.Tensor,
    k: int,
    block: int = 1,
    averaged: bool = False,
) -> torch.Tensor:
    """The top-k mask of a weight with a scored ``kind`` (grad, snip) from its accumulated ``sum_b |g_b|``
    (logical order, float32), ranked by ``kind.score``.

    With ``block`` > 1, the k/B aligned blocks whose entries' scores sum highest (``masks.topk_mask``).

    Under ``torch.distributed`` every rank must choose the same mask:

    * ``averaged`` (eager calibration of a replicated model): each pass's gradient was averaged over the
      ranks before scoring, i.e. it is the global batch's, and every rank holds the same scores;
    * under FSDP2 (``weight`` a DTensor) each rank scored its own rows of the gradient FSDP2 already
      averaged over the ranks: the rows are gathered (a collective).

    Both give the mask one process would choose on the global batches. Otherwise (lazy calibration
    under DDP, whose hooks see each rank's own gradient) the ranks' scores are summed.

    Raises:
        ShiraError: the weight got no gradient at all, or its scores are not finite.
    """
    if scores is None:
        raise ShiraError(
            f"target weight '{name}' received no gradient from the calibration batches, so "
            f"mask={kind.name!r} cannot score it; exclude it with target_modules"
        )
    assert kind.score is not None, f"mask kind {kind.name!r} has no score"  # callers pass a kind that needs_scores
    scores = kind.score(scores, distributed.local(weight))  # this rank's rows of the weight under FSDP2
    if distributed.is_sharded(weight):
        scores = distributed.gather_rows(scores, weight)
    elif not averaged and distributed.world_size() > 1:
        distributed.all_reduce(scores)
    if not bool(torch.isfinite(scores).all()):
        raise ShiraError(
            f"calibration scores of '{name}' contain NaN/inf (the loss or its gradients "
            f"overflowed); calibrate on batches with a finite loss"
        )
    return masks.topk_mask(scores, k, block)


@dataclass(eq=False)
class _Scoring:
    """One calibrating target's scores."""

    scores: torch.Tensor | None = None  # (numel,) float32 sum of |dL/dW| over the passes, logical order
    pass_grad: torch.Tensor | None = (
        None  # eager calibration under torch.distributed: this pass's gradient, until averaged
    )
    passes: int = 0  # backward passes scored


class Calibration:
    """A handle's calibration state: the scores of the targets whose masks are not fixed yet, and how they are
    fixed (the mask kind of ``config``, its seed and block).

    Args:
        targets: the handle's targets (the same list; read, and their masks set through ``Target.set_indices``).
        config: the handle's settings at attach. (A loaded state fixes every mask, so the mask, sparsity and
            seed it brings never reach calibration.)
    """

    def __init__(self, targets: list[Target], config: Config):
        self.targets = targets
        self.config = config
        # attach is scoring calibration= batches now; otherwise grad/snip masks are scored lazily, each fixed
        # after `calibration_steps` backward passes of training
        self.eager = False
        self._scoring: dict[str, _Scoring] = {}  # target name -> its scores, while it calibrates

    def __getstate__(self) -> dict:
        return {**self.__dict__, "config": self.config.picklable()}

    def passes(self, target: Target) -> int:
        """Backward passes scored for ``target`` so far."""
        record = self._scoring.get(target.name)
        return 0 if record is None else record.passes

    def clear(self) -> None:
        """Drop every score (``detach``: no more gradients come)."""
        self._scoring.clear()

    def fix_unscored(self) -> None:
        """Choose the masks that need no calibration data (struct, rand, wm, a user function)."""
        kind = masks.kind_of(self.config.mask)
        assert kind.select is not None, (
            f"mask kind {kind.name!r} has no select"
        )  # attach calls this for kinds without scores
        for target in self.targets:
            weight = target.param.detach()  # under FSDP2 a DTensor: its shape and numel are the full weight's
            if kind.reads_values:  # struct and rand need only the shape
                weight = distributed.gather(
                    weight
                )  # FSDP2: the full weight (a collective), the same masks as one process
            target.set_indices(kind.select(target.name, weight, target.budget, self.config.seed, self.config.block))

    def run(self, model: nn.Module, batches: Iterable, loss_fn: LossFn | None, progress: bool) -> None:
        """Eager calibration: score every target on ``batches`` (one backward pass each) and fix its mask."""
        self.eager = True
        try:
            run_calibration(model, batches, loss_fn, {id(t.param) for t in self.targets}, progress, self.end_pass)
            for target in self.targets:
                self.fix(target)
        finally:
            self.eager = False

    def accumulate(self, target: Target, grad: torch.Tensor) -> None:
        """The gradient hook's call for a calibrating target: score ``grad`` (the caller drops it)."""
        if self.eager and distributed.world_size() > 1 and not distributed.is_sharded(grad):
            # Eager calibration of a replicated model (before DDP or fully_shard wraps it): kept until the
            # pass ends, when every rank's gradient of it is averaged (end_pass)
            record = self._record(target)
            record.pass_grad = grad if record.pass_grad is None else record.pass_grad.add_(grad)
            return
        self._score(target, grad)

    def _record(self, target: Target) -> _Scoring:
        record = self._scoring.get(target.name)
        if record is None:
            record = self._scoring[target.name] = _Scoring()
        return record

    def _score(self, target: Target, grad: torch.Tensor) -> None:
        grad = distributed.local(grad)  # FSDP2: this rank's rows of the gradient averaged over the ranks
        record = self._record(target)
        if record.scores is None:
            record.scores = torch.zeros(grad.numel(), dtype=torch.float32, device=grad.device)
        elif record.scores.device != grad.device:  # the model moved (model.to(device)) while calibrating
            record.scores = record.scores.to(grad.device)
        record.scores.add_(grad.reshape(-1).abs_())  # logical order; the gradient is dropped next, so abs_ in place
        record.passes += 1
        if not self.eager and record.passes >= self.config.calibration_steps:
            self.fix(target)
            target.fresh = True

    @torch.no_grad()
    def end_pass(self) -> None:
        """After each backward pass of eager calibration under ``torch.distributed``: score the mean over the
        ranks of each replicated target's gradient, i.e. the global batch's gradient, which one process
        would score. Walked in target order, with zeros where this rank got none, so that every rank makes
        the same collectives even when layers get gradients on some ranks only (routing, unused layers)."""
        world = distributed.world_size()
        targets = [t for t in self.targets if t.indices is None and not distributed.is_sharded(t.param)]
        if world <= 1 or not targets:
            return
        records = [self._record(t) for t in targets]
        got = torch.tensor(
            [r.pass_grad is not None for r in records], dtype=torch.int32, device=targets[0].param.device
        )
        distributed.all_reduce(got)  # how many ranks have a gradient of each target
        for t, record, ranks in zip(targets, records, got.tolist()):
            grad, record.pass_grad = record.pass_grad, None
            if ranks == 0:  # no rank's loss used it in this pass
                continue
            grad = (
                torch.zeros(t.param.shape, dtype=t.param.dtype, device=t.param.device)
                if grad is None
                else grad.contiguous()
            )
            distributed.all_reduce(grad)
            self._score(t, grad.div_(world))

    def fix(self, target: Target) -> None:
        """Fix ``target``'s mask from its scores (``mask_from_scores``) and drop them."""
        # eager: under torch.distributed every pass was averaged over the ranks already (end_pass)
        record = self._scoring.get(target.name)
        scores = None if record is None else record.scores
        kind = masks.kind_of(self.config.mask)
        target.set_indices(
            mask_from_scores(
                kind, target.name, scores, target.param.detach(), target.budget, self.config.block, self.eager
            )
        )
        self._scoring.pop(target.name, None)
