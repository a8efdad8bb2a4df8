"""The arithmetic of SHiRA-DoRA: weight-decomposed training of the masked entries (issue 24).

For a target weight ``W0`` (out, in) with a mask of k entries ``(rows, cols)``, DoRA's decomposition
restricted to the mask gives the weight the forward uses::

    W = W0 + M * (m * V / ||V||_row - W0),      V = W0 + dV

with ``m`` a trainable magnitude per output row (initialised to ``||W0||_row``, PEFT's DoRA norm axis),
so that at initialisation ``W == W0`` exactly and at any time only the k masked entries differ from
``W0``. Two ways to parametrise ``dV``:

* ``rank=None`` (the cheap variant): ``dV = M * S``; the k trainable values are ``V``'s masked entries
  (``W0 + S`` there). The row norms need no dense weight: ``||V_i||^2 = base_i + sum_{j in M_i} V_ij^2``
  with ``base_i = ||W0_i||^2 - sum_{j in M_i} W0_ij^2`` (the unmasked part, fixed), O(k + out) per step.
* ``rank=r`` (the paper's variant): ``dV = B A``, dense low-rank factors; ``V``'s masked entries are
  ``W0 + (B A)`` there, and the row norms need the whole ``V = W0 + B A``: one (out, in) product per
  forward, the cost of DoRA itself.

Either way the layer's masked entries are ``E = m_rows * V_masked / ||V||_rows``, a differentiable
function of the trainable tensors, and the adapter is the plain sparse delta ``E - W0_masked``.
"""

from __future__ import annotations

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32, or float64 if it is float64 (bfloat16/float16 weights train their DoRA terms in float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def row_norm_base(weight: torch.Tensor, rows: torch.Tensor, base_values: torch.Tensor) -> torch.Tensor:
    """The unmasked part of each row's squared norm: ``||W0_i||^2 - sum_{j in M_i} W0_ij^2`` (out,).

    Summed in float64 and returned in float32 (float64 for a float64 weight), clamped at 0 against rounding.
    The magnitude's initial value is ``masked_norms(base_values, rows, base)``: the very computation the
    forward makes, so that ``m / ||V||`` is exactly 1 at initialisation.

    Args:
        weight: ``W0`` as an (out, in) tensor.
        rows: (k,) int64 row of each masked entry.
        base_values: (k,) ``W0``'s masked entries.
    """
    full = weight.detach().double().pow(2).sum(dim=1)
    masked = torch.zeros_like(full).index_add_(0, rows.to(full.device), base_values.detach().double().pow(2))
    return (full - masked).clamp_min(0).to(_wide(weight).dtype)


def _root(squares: torch.Tensor) -> torch.Tensor:
    """``sqrt`` of squared row norms, with a zero row's norm the smallest normal number: a row of zeros (pruned,
    zero-initialised) then has ``m / ||V|| == 1`` at attach and finite gradients, where ``0 / 0`` would make the
    whole model NaN after one step. Any other row's norm is unchanged, bit for bit."""
    return squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt()


def masked_norms(values: torch.Tensor, rows: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``||V_i||`` for every row from ``V``'s masked entries ``values`` (k,) and the unmasked part ``base`` (out,)."""
    squares = _wide(values).pow(2)
    return _root(base.to(squares.dtype).index_add(0, rows, squares))


def effective(values: torch.Tensor, magnitude: torch.Tensor, rows: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """The masked entries the layer uses: ``m_i * V_ij / ||V_i||`` (k,), differentiable in all inputs.

    Written as ``V * (m / ||V||)[rows]``: at initialisation ``m == ||V||`` bit for bit, the ratio is
    exactly 1 and ``E == V == W0``.
    """
    return _wide(values) * (magnitude / norms).index_select(0, rows)


def low_rank_masked(
    base_values: torch.Tensor,
    weight: torch.Tensor,
    lora_b: torch.Tensor,
    lora_a: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank=r``: ``V``'s masked entries and every row's norm, from the dense ``V = W0 + B A``.

    Args:
        base_values: (k,) ``W0``'s masked entries.
        weight: (out, in), frozen: ``W0`` outside the mask; its masked entries are not read (a trained layer's
            weight holds the effective entries there, not ``W0``).
        lora_b: (out, r), zeros at initialisation; lora_a: (r, in); rows, cols: (k,) int64 coordinates of the mask.

    Returns:
        ``(values, norms)``: (k,) masked entries of ``V`` and (out,) ``||V_i||``, differentiable in B and A.
        The magnitude's initial value is these norms at initialisation (B = 0), computed the same way.
    """
    wide = _wide(weight).dtype  # the factors' dtype, unless a cast after attach changed one of them
    delta = lora_b.to(wide) @ lora_a.to(wide)  # (out, in): the variant's cost, one dense product per forward
    values = base_values.to(wide) + delta[rows, cols]  # (k,)
    # V outside the mask, zero at it (the weight's masked entries are not W0), then the masked entries' squares
    outside = (weight.detach().to(wide) + delta).index_put((rows, cols), values.new_zeros(()))
    norms = _root(outside.pow(2).sum(dim=1).index_add(0, rows, values.pow(2)))
    return values, norms
