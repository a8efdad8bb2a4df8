"""``ShiraHandle``: what ``attach`` returns — the masks, the gradient hooks and the public verbs.

One ``register_post_accumulate_grad_hook`` per target weight keeps only the k masked entries of
its gradient; a global optimizer step hook (``_optim.WeightDecayGuard``) keeps weight decay off
the other entries. No module is replaced and no parameter object changes; ``detach()`` removes
every hook and restores every ``requires_grad`` flag.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import _compact, _state, masks
from ._io import digest
from ._optim import WeightDecayGuard
from ._version import __version__
from .adapter import SparseAdapter, SparseDelta
from .errors import ShiraError

# id(weight) -> the live handle attached to it; a weight takes one handle at a time.
_ATTACHED: dict[int, "weakref.ref[ShiraHandle]"] = {}


def _attached_elsewhere(param: nn.Parameter) -> bool:
    holder = _ATTACHED.get(id(param))
    return holder is not None and holder() is not None and holder().attached


@dataclass(eq=False)
class _Target:
    """One trained weight and its mask."""

    name: str  # parameter name in the model, e.g. "layers.0.q_proj.weight"
    module: nn.Module  # the layer that owns the weight
    param: nn.Parameter
    budget: int  # k, the number of trainable entries
    base_digest: str  # digest of the whole base weight, for verify()
    indices: torch.Tensor | None = None  # (k,) sorted flat indices; None while calibrating
    originals: torch.Tensor | None = None  # (k,) base values at indices, in the weight's dtype
    scores: torch.Tensor | None = None  # (numel,) float32 calibration buffer
    backward_passes: int = 0
    # The mask was fixed in the last backward pass and no masked gradient has arrived since: whatever
    # .grad holds (a DDP reducer writes the averaged dense gradient back after our hook) is calibration.
    fresh: bool = False
    plan: _compact.Plan | None = None  # mode="compact"/"sparse": the k-length parameter and its hooks


class ShiraHandle:
    """The handle ``attach`` returns: masks, originals at the masked entries, and the hooks.

    Use ``extract()`` after training, ``detach()`` (or a ``with`` block) to make the model an
    ordinary model again, and ``state_dict()`` / ``load_state_dict()`` to resume with the same masks.
    """

    def __init__(self, model: nn.Module, mask: str | masks.MaskFn, sparsity: float, seed: int, calibration_steps: int, mode: str = "dense"):
        self.model = model
        self.mode = mode
        self.mask = mask
        self.sparsity = sparsity
        self.seed = seed
        self.calibration_steps = calibration_steps
        self._targets: list[_Target] = []
        self._flags: list[tuple[nn.Parameter, bool]] = []
        self._hooks: list[Any] = []
        self._guard: WeightDecayGuard | None = None
        self._lazy = True  # lazy calibration fixes each mask after `calibration_steps` backward passes
        self._attached = False

    # ------------------------------------------------------------------------------ install
    def _install(self, targets: list[tuple[str, nn.Module, nn.Parameter]], freeze_others: bool) -> None:
        """Freeze, register hooks and the optimizer guard. Partial work is undone by ``detach``."""
        self._attached = True
        target_ids = {id(p) for _, _, p in targets}
        for param in self.model.parameters():
            self._flags.append((param, param.requires_grad))
            if id(param) in target_ids:
                param.requires_grad_(True)
            elif freeze_others and not _attached_elsewhere(param):  # another handle's target keeps training
                param.requires_grad_(False)
        for name, module, param in targets:
            numel = param.numel()
            budget = masks.budget(numel, self.sparsity) if isinstance(self.mask, str) else 0
            target = _Target(name, module, param, budget, digest(param, 16))
            self._targets.append(target)
            _ATTACHED[id(param)] = weakref.ref(self)
            self._hooks.append(param.register_post_accumulate_grad_hook(self._make_hook(target)))
        self._guard = WeightDecayGuard(self._masked, self._drop_calibration_grads, self._sync)

    def _make_hook(self, target: _Target):
        def hook(param: torch.Tensor) -> None:  # post-accumulate-grad hooks must return None
            self._on_grad(target, param)

        return hook

    def _masked(self) -> dict[int, tuple[str, torch.Tensor]]:
        return {id(t.param): (t.name, t.indices) for t in self._targets if t.indices is not None}

    def _drop_calibration_grads(self) -> None:
        """Before an optimizer step: no gradient of a calibration pass may reach the optimizer.

        The hook already drops them, but a DDP reducer writes the averaged gradient back into
        ``.grad`` after the hook has run, so they are dropped again here.
        """
        for t in self._targets:
            if t.indices is None or t.fresh:
                t.param.grad = None
                t.fresh = False

    # --------------------------------------------------------------------------- the hook
    @torch.no_grad()
    def _on_grad(self, target: _Target, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise ShiraError(f"'{target.name}' received a sparse gradient; shira_hooks masks dense gradients only")
        if target.indices is None:  # calibrating: score, then drop the gradient so nothing is updated
            self._accumulate(target, grad)
            param.grad = None
            return
        target.fresh = False  # from here on .grad is masked training gradient
        if not grad.is_contiguous():
            grad = grad.contiguous()
            param.grad = grad
        # Keep the k masked entries, zero the rest in place, put them back: no dense temporary,
        # and an inf outside the mask becomes 0, never NaN. index_copy_ wants int64 indices (a (k,)
        # conversion, cheaper than index_put_ with int32).
        index = target.indices.to(grad.device, torch.int64)  # (k,)
        flat = grad.view(-1)  # (numel,)
        kept = flat.index_select(0, index)  # (k,)
        flat.zero_()
        flat.index_copy_(0, index, kept)

    def _accumulate(self, target: _Target, grad: torch.Tensor) -> None:
        if target.scores is None:
            target.scores = torch.zeros(grad.numel(), dtype=torch.float32, device=grad.device)
        target.scores.add_(grad.reshape(-1).abs_())  # the gradient is dropped next, so abs_ in place
        target.backward_passes += 1
        if self._lazy and target.backward_passes >= self.calibration_steps:
            self._mask_from_scores(target)
            target.fresh = True

    def _mask_from_scores(self, target: _Target) -> None:
        scores = target.scores
        if scores is None:
            raise ShiraError(
                f"target weight '{target.name}' received no gradient from the calibration batches, so "
                f"mask={self.mask!r} cannot score it; exclude it with target_modules"
            )
        if self.mask == "snip":  # sum_b |W * g_b| = |W * sum_b |g_b|| while W is fixed
            scores.mul_(target.param.detach().reshape(-1)).abs_()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:  # every rank must choose the same mask
                torch.distributed.all_reduce(scores)
        if not bool(torch.isfinite(scores).all()):
            raise ShiraError(
                f"calibration scores of '{target.name}' contain NaN/inf (the loss or its gradients "
                f"overflowed); calibrate on batches with a finite loss"
            )
        self._set_mask(target, masks.topk_mask(scores, target.budget))

    def _set_mask(self, target: _Target, indices: torch.Tensor) -> None:
        indices = indices.to(target.param.device)  # rand/struct/user masks are made on the CPU
        target.indices = indices
        target.originals = target.param.detach().view(-1).index_select(0, indices)
        target.budget = indices.numel()
        target.scores = None

    def _fix_masks(self) -> None:
        """Choose the masks that need no calibration data (struct, rand, wm, a user function)."""
        for target in self._targets:
            weight = target.param.detach()
            shape, numel = tuple(weight.shape), weight.numel()
            if callable(self.mask):
                indices = masks.user_mask(self.mask(target.name, weight), target.name, shape)
            elif self.mask == "struct":
                indices = masks.struct_mask(shape, target.budget, masks.generator_for(self.seed, target.name))
            elif self.mask == "rand":
                indices = masks.rand_mask(numel, target.budget, masks.generator_for(self.seed, target.name))
            else:  # "wm"
                indices = masks.topk_mask(weight.reshape(-1).abs(), target.budget)
            self._set_mask(target, indices)

    def _make_compact(self) -> None:
        """mode="compact"/"sparse": move the trainable entries into k-length parameters (``_compact``)."""
        transposes = _compact.InputTransposes() if self.mode == "sparse" else None
        for t in self._targets:
            t.plan, hooks = _compact.install(t.module, t.param, t.indices, transposes)
            self._hooks.extend(hooks)
            t.param.requires_grad_(False)  # no dense dL/dW; the flag is restored by detach()

    def _sync(self) -> None:
        """Make the weights hold the current compact values (a no-op in the dense mode)."""
        for t in self._targets:
            if t.plan is not None:
                t.plan.sync(force=True)

    # ------------------------------------------------------------------------- public API
    @property
    def attached(self) -> bool:
        """True until ``detach()``."""
        return self._attached

    @property
    def calibrated(self) -> bool:
        """True once every target weight has its mask (always true for struct/rand/wm)."""
        return all(t.indices is not None for t in self._targets)

    @property
    def num_trainable(self) -> int:
        """Number of trainable entries over all target weights (the sum of the k's)."""
        return sum(t.budget for t in self._targets)

    @property
    def target_names(self) -> list[str]:
        """Parameter names of the target weights, in model order."""
        return [t.name for t in self._targets]

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Parameter name -> sorted flat indices of its mask (weights still calibrating are absent)."""
        return {t.name: t.indices for t in self._targets if t.indices is not None}

    def summary(self) -> str:
        """A table: target weight, shape, k and the share of the weight that trains."""
        total = sum(t.param.numel() for t in self._targets)
        state = "calibrated" if self.calibrated else (
            f"calibrating: {sum(t.indices is not None for t in self._targets)}/{len(self._targets)} masks fixed, "
            f"{self.calibration_steps} backward passes each"
        )
        mask = self.mask if isinstance(self.mask, str) else getattr(self.mask, "__name__", "custom")
        width = max(len("weight"), *(len(t.name) for t in self._targets))
        lines = [
            f"shira_hooks: mask={mask!r} sparsity={self.sparsity:g} ({state})",
            f"{'weight':<{width}}  {'shape':>14}  {'k':>10}  {'%':>6}",
        ]
        for t in self._targets:
            shape = "x".join(str(s) for s in t.param.shape)
            lines.append(f"{t.name:<{width}}  {shape:>14}  {t.budget:>10,}  {100 * t.budget / t.param.numel():>6.2f}")
        lines.append(f"{'total':<{width}}  {total:>14,}  {self.num_trainable:>10,}  {100 * self.num_trainable / total:>6.2f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"ShiraHandle({len(self._targets)} weights, {self.num_trainable:,} trainable entries, "
            f"mask={self.mask!r}, calibrated={self.calibrated}, attached={self._attached})"
        )

    def _require_calibrated(self, action: str) -> None:
        waiting = [t for t in self._targets if t.indices is None]
        if waiting:
            raise ShiraError(
                f"cannot {action}: {len(waiting)} target weight(s) are still calibrating (e.g. '{waiting[0].name}', "
                f"{waiting[0].backward_passes}/{self.calibration_steps} backward passes seen). Train for more steps, "
                f"or pass calibration= to attach"
            )

    @torch.no_grad()
    def extract(self) -> SparseAdapter:
        """The adapter S = W_new - W at the masked entries, in float32 from the stored originals.

        Works before and after ``detach()``.

        Returns:
            A ``SparseAdapter`` with one ``SparseDelta`` per target weight.

        Raises:
            ShiraError: masks are not fixed yet (lazy calibration still running), or a delta is NaN/inf.

        Example:
            >>> shira = shira_hooks.attach(model, sparsity=0.01, mask="wm")
            >>> train(model)
            >>> shira.extract().save("adapter.safetensors")
        """
        self._require_calibrated("extract an adapter")
        self._sync()
        deltas = {}
        for t in self._targets:
            current = t.param.detach().view(-1).index_select(0, t.indices)
            values = current.float() - t.originals.float()
            deltas[t.name] = SparseDelta(
                tuple(t.param.shape), t.param.dtype, t.indices.cpu().clone(), values.cpu(), digest(t.originals)
            )
        mask = self.mask if isinstance(self.mask, str) else "custom"
        return SparseAdapter(
            deltas, {"mask": mask, "sparsity": f"{self.sparsity:g}", "seed": str(self.seed), "created_by": f"shira_hooks {__version__}"}
        )

    @torch.no_grad()
    def verify(self) -> list[str]:
        """Names of target weights with an entry outside the mask that differs bit-for-bit from the base.

        Compares a digest of each weight, with its masked entries put back to the originals, against
        the digest taken at ``attach`` (no dense copy of the base is kept). An empty list means the
        exactness guarantee held.
        """
        self._sync()
        changed = []
        for t in self._targets:
            weight = t.param.detach()
            if t.indices is not None:
                weight = weight.clone()
                weight.view(-1).index_put_((t.indices,), t.originals)
            if digest(weight, 16) != t.base_digest:
                changed.append(t.name)
        return changed

    def detach(self) -> None:
        """Remove every hook, restore every ``requires_grad`` flag. Safe to call twice.

        Masks and originals are kept, so ``extract()`` still works afterwards.
        """
        if not self._attached:
            return
        for t in self._targets:
            if t.plan is not None:
                _compact.uninstall(t.module, t.plan)
                t.plan = None
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
        for param, flag in self._flags:
            param.requires_grad_(flag)
        self._flags = []
        for t in self._targets:
            t.scores = None
            entry = _ATTACHED.get(id(t.param))
            if entry is not None and entry() is self:
                del _ATTACHED[id(t.param)]
        self._attached = False

    def __enter__(self) -> "ShiraHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # ---------------------------------------------------------------------- resume state

    # ---------------------------------------------------------------------- resume state
    def state_dict(self) -> dict[str, Any]:
        """Masks and base values at the masked entries, to resume a run with identical masks.

        Returns:
            ``{"format", "format_version", "mask", "sparsity", "seed", "targets": {name: {"shape",
            "dtype", "base_digest", "indices", "originals"}}}``; tensors are CPU copies.
        """
        return _state.state_dict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt the masks and originals of ``state_dict()``; everything is checked before anything changes.

        Raises:
            ShiraError: the state is for other weights, shapes or dtypes, or its indices are invalid.
        """
        _state.load_state_dict(self, state)

    def save_state(self, path: str | os.PathLike) -> Path:
        """``state_dict()`` as one safetensors file, written atomically."""
        return _state.save_state(self, path)

    def load_state(self, path: str | os.PathLike) -> None:
        """Read a file written by ``save_state`` and ``load_state_dict`` it."""
        _state.load_state(self, path)
