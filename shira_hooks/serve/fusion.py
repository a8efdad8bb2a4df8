"""Multi-adapter fusion (``fuse``) and how much adapters interfere (``overlap``), paper §3.2."""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .._base import digest
from ..errors import ShiraError
from ..format import SparseAdapter, SparseDelta, as_adapter
from ..masks import index_dtype


def fuse(
    adapters: Sequence[SparseAdapter | str | os.PathLike],
    weights: Sequence[float] | None = None,
    *,
    base: nn.Module | None = None,
) -> SparseAdapter:
    """One adapter whose delta is the weighted sum of the given ones (union of their entries).

    Applying the result equals applying the adapters one after the other with alphas ``weights``
    (up to float32 rounding where they overlap).

    Block adapters: a union of aligned runs of B1 and of B2 entries is made of aligned runs of
    gcd(B1, B2), so each fused weight has block gcd of its parts' blocks: adapters of one block
    keep it (and ``apply``'s whole-run writes), 16 with 32 gives 16, and any mix with an
    unstructured (block 1) adapter gives an unstructured weight.

    Args:
        adapters: one or more adapters for the same base model (``SparseAdapter`` objects or paths).
        weights: one weight per adapter (default 1.0 each).
        base: the base model. Where the adapters' entries differ, the fused fingerprint must be
            computed from the base: with ``base`` it is (and every adapter's fingerprint is checked
            against it); without it, such modules get an empty fingerprint, which ``apply`` cannot verify.

    Raises:
        ShiraError: no adapters, a weight count mismatch, modules whose shape or dtype
            disagree between adapters, or an adapter that does not match ``base``.
    """
    loaded = [as_adapter(adapter, where="fuse()") for adapter in adapters]  # paths are loaded
    if len(loaded) < 1:
        raise ShiraError("fuse() needs at least one adapter")
    weights = [1.0] * len(loaded) if weights is None else [float(w) for w in weights]
    if len(weights) != len(loaded):
        raise ShiraError(f"fuse() got {len(loaded)} adapters but {len(weights)} weights; give one weight per adapter")
    params = dict(base.named_parameters()) if base is not None else {}
    names = list(dict.fromkeys(name for adapter in loaded for name in adapter.deltas))
    fused = {}
    for name in names:
        parts = [(adapter.deltas[name], w) for adapter, w in zip(loaded, weights) if name in adapter.deltas]
        first = parts[0][0]
        for delta, _ in parts[1:]:
            if delta.shape != first.shape or delta.dtype != first.dtype:
                raise ShiraError(
                    f"module '{name}': adapters disagree on the base weight ({list(first.shape)} {first.dtype} vs "
                    f"{list(delta.shape)} {delta.dtype}); fuse adapters trained on the same base model"
                )
        union = torch.unique(torch.cat([d.indices.to(torch.int64) for d, _ in parts]))  # sorted
        values = torch.zeros(union.numel(), dtype=torch.float32)
        for delta, w in parts:
            values.index_add_(
                0, torch.searchsorted(union, delta.indices.to(torch.int64)), delta.values.float(), alpha=w
            )
        same_entries = all(
            torch.equal(d.indices, first.indices) and d.fingerprint == first.fingerprint for d, _ in parts
        )
        if name in params:
            flat = params[name].detach().reshape(-1)
            for delta, _ in parts:
                if delta.fingerprint and digest(flat[delta.indices.to(torch.int64)]) != delta.fingerprint:
                    raise ShiraError(
                        f"module '{name}': an adapter's fingerprint does not match the base model given to fuse()"
                    )
            fingerprint = digest(flat[union])
        else:
            fingerprint = first.fingerprint if same_entries else ""
        block = math.gcd(*(d.block for d, _ in parts))
        fused[name] = SparseDelta(
            first.shape, first.dtype, union.to(index_dtype(first.numel)), values, fingerprint, block
        )
    metadata = {
        "mask": "fused",
        "fused_weights": json.dumps(weights),
        "fused_masks": json.dumps([a.metadata.get("mask", "?") for a in loaded]),
    }
    return SparseAdapter(fused, metadata)


@dataclass(frozen=True)
class ModuleOverlap:
    """Interference of two adapters on one weight.

    Attributes:
        entries_a, entries_b: adapted entries of each adapter.
        shared: entries adapted by both.
        product_density: share of nonzero entries of A1^T A2 (the weight viewed as (shape[0], -1));
            1.0 for two dense (fused LoRA) deltas, ~0 for orthogonal sparse ones.
        product_cosine: ||A1^T A2||_F / (||A1||_F ||A2||_F), in [0, 1].
    """

    entries_a: int
    entries_b: int
    shared: int
    product_density: float
    product_cosine: float


@dataclass(frozen=True)
class Overlap:
    modules: dict[str, ModuleOverlap]
    shared: int  # entries adapted by both, over all common modules
    entries_a: int
    entries_b: int

    @property
    def shared_fraction(self) -> float:
        """shared / min(entries_a, entries_b): 0 = disjoint, 1 = one contains the other."""
        return self.shared / max(1, min(self.entries_a, self.entries_b))

    def __str__(self) -> str:
        width = max([len("module")] + [len(n) for n in self.modules])
        lines = [
            f"{'module':<{width}}  {'shared':>9}  {'of a':>9}  {'of b':>9}  {'A1^T A2 density':>15}  {'cosine':>8}"
        ]
        for name, m in self.modules.items():
            lines.append(
                f"{name:<{width}}  {m.shared:>9,}  {m.entries_a:>9,}  {m.entries_b:>9,}  {m.product_density:>15.2e}  {m.product_cosine:>8.4f}"
            )
        lines.append(
            f"{'total':<{width}}  {self.shared:>9,}  {self.entries_a:>9,}  {self.entries_b:>9,}  ({100 * self.shared_fraction:.2f}% shared)"
        )
        return "\n".join(lines)


# Rows of A1^T A2 are computed a block at a time; a block holds at most this many product entries
# (~100 MB as float64 values plus the int64 row/column indices torch.sparse.mm returns), so memory
# is O(k) for the adapters plus this fixed budget, however many pairs of entries share a row.
_PRODUCT_CHUNK = 1 << 21


def _product_stats(da: SparseDelta, db: SparseDelta) -> tuple[float, float]:
    """Density of A1^T A2 and ||A1^T A2||_F / (||A1||_F ||A2||_F), in bounded memory.

    The weight is viewed as a (rows, cols) matrix, rows = shape[0]. (A1^T A2)[i, j] = sum_r
    A1[r, i] A2[r, j], a (cols, cols) matrix that can be dense (two adapters sharing one whole row
    already fill it), so it is never held whole: its rows i, which are the columns of A1, are taken
    in blocks whose product has at most ``_PRODUCT_CHUNK`` entries, each block multiplied by A2 as
    sparse float64 matrices, and only the count of nonzeros and the squared norm are kept.
    """
    rows = da.shape[0] if da.shape else 1
    cols = da.numel // rows
    index_a, index_b = da.indices.to(torch.int64), db.indices.to(torch.int64)
    rows_a, cols_a = torch.div(index_a, cols, rounding_mode="floor"), index_a % cols  # (ka,)
    rows_b, cols_b = torch.div(index_b, cols, rounding_mode="floor"), index_b % cols  # (kb,), sorted by row
    norm = float(da.values.double().norm() * db.values.double().norm())
    # partners of each entry of A1: the entries of A2 in its row (indices are sorted, so rows_b is too)
    partners = torch.searchsorted(rows_b, rows_a, right=True) - torch.searchsorted(rows_b, rows_a)  # (ka,)
    paired = partners > 0
    if not bool(paired.any()) or norm == 0:
        return 0.0, 0.0
    rows_a, cols_a, partners = rows_a[paired], cols_a[paired], partners[paired]
    values_a = da.values.double()[paired]
    # product rows with at least one pair, numbered 0..n-1; entries of A1 grouped by it (stable: rows stay sorted)
    product_rows, slot = torch.unique(cols_a, return_inverse=True)  # (n,), (ka',)
    order = torch.argsort(slot, stable=True)
    slot, rows_a, values_a = slot[order], rows_a[order], values_a[order]
    starts = torch.searchsorted(slot, torch.arange(product_rows.numel() + 1))  # (n + 1,) entry ranges
    # a product row has at most min(cols, pairs) entries: the bound that sizes the blocks
    bound = torch.zeros(product_rows.numel(), dtype=torch.int64).index_add_(0, slot, partners[order])
    reach = torch.cumsum(bound.clamp_(max=cols), 0)  # (n,)
    a2 = torch.sparse_coo_tensor(
        torch.stack([rows_b, cols_b]), db.values.double(), (rows, cols), is_coalesced=True, check_invariants=False
    )
    nonzeros, square = 0, 0.0
    first = 0
    while first < product_rows.numel():
        done = int(reach[first - 1]) if first else 0
        last = max(first + 1, int(torch.searchsorted(reach, done + _PRODUCT_CHUNK, right=True)))
        lo, hi = int(starts[first]), int(starts[last])
        block = torch.sparse_coo_tensor(  # rows first..last-1 of A1^T, (last - first, rows), sorted (slot, row)
            torch.stack([slot[lo:hi] - first, rows_a[lo:hi]]),
            values_a[lo:hi],
            (last - first, rows),
            is_coalesced=True,
            check_invariants=False,
        )
        with warnings.catch_warnings():  # sparse.mm goes through CSR, which warns that it is beta
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
            product = torch.sparse.mm(block, a2).values()  # (<= max(_PRODUCT_CHUNK, cols),), may hold zeros
        nonzeros += int(torch.count_nonzero(product))
        square += float(product.square().sum())
        first = last
    return nonzeros / cols**2, square**0.5 / norm


def overlap(a: SparseAdapter | str | os.PathLike, b: SparseAdapter | str | os.PathLike) -> Overlap:
    """How much two adapters interfere: shared entries per module and overall, and the paper's A1^T A2.

    ``a`` and ``b`` are ``SparseAdapter`` objects or paths (loaded with ``as_adapter``).

    Example:
        >>> print(shira_hooks.overlap(paint, knight))
    """
    a, b = as_adapter(a, where="overlap()"), as_adapter(b, where="overlap()")
    modules = {}
    for name in a.deltas.keys() & b.deltas.keys():
        da, db = a.deltas[name], b.deltas[name]
        if da.shape != db.shape:
            raise ShiraError(
                f"module '{name}': shapes differ ({list(da.shape)} vs {list(db.shape)}); compare adapters of one base model"
            )
        shared = int(torch.isin(da.indices.to(torch.int64), db.indices.to(torch.int64)).sum())
        density, cosine = _product_stats(da, db)
        modules[name] = ModuleOverlap(da.indices.numel(), db.indices.numel(), shared, density, cosine)
    ordered = {name: modules[name] for name in a.deltas if name in modules}
    return Overlap(ordered, sum(m.shared for m in modules.values()), a.num_entries, b.num_entries)
