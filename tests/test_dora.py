"""SHiRA-DoRA's arithmetic (shira_hooks/train/dora.py) against a dense float64 reference."""

from __future__ import annotations

import pytest
import torch

from shira_hooks.train import dora


def _case(seed: int = 0, out: int = 6, inp: int = 9, k: int = 11, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out, inp, generator=g, dtype=dtype)
    flat = torch.randperm(out * inp, generator=g)[:k].sort().values
    return w0, flat, flat // inp, flat % inp


def _dense_reference(w0, flat, v_masked, magnitude):
    """W = W0 + M * (m * V / ||V||_row - W0) with V = W0 + M * S, built densely."""
    mask = torch.zeros(w0.numel(), dtype=torch.bool)
    mask[flat] = True
    mask = mask.view_as(w0)
    v = w0.clone().view(-1).index_put((flat,), v_masked).view_as(w0)
    directed = magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
    return torch.where(mask, directed, w0)


def test_the_masked_entries_equal_the_dense_reference_and_their_gradients_match():
    w0, flat, rows, _ = _case()
    base = dora.row_norm_base(w0, rows, w0.view(-1)[flat])
    values = (w0.view(-1)[flat] + 0.3 * torch.randn(flat.numel(), dtype=torch.float64)).requires_grad_()
    magnitude = (w0.norm(dim=1) * 1.2).requires_grad_()

    def ours(values, magnitude):
        return dora.effective(values, magnitude, rows, dora.masked_norms(values, rows, base))

    def reference(values, magnitude):
        return _dense_reference(w0, flat, values, magnitude).view(-1)[flat]

    torch.testing.assert_close(ours(values, magnitude), reference(values, magnitude), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (values, magnitude))
    cotangent = torch.randn(flat.numel(), dtype=torch.float64)
    ours_grads = torch.autograd.grad(ours(values, magnitude), (values, magnitude), cotangent)
    reference_grads = torch.autograd.grad(reference(values, magnitude), (values, magnitude), cotangent)
    for a, b in zip(ours_grads, reference_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_at_initialisation_the_layer_is_the_base_bit_for_bit(dtype):
    w0, flat, rows, cols = _case(seed=1, out=64, inp=48, k=300, dtype=torch.float32)
    w0 = w0.to(dtype)
    v0 = w0.view(-1)[flat]
    base = dora.row_norm_base(w0, rows, v0)
    magnitude = dora.masked_norms(v0, rows, base)  # the initial magnitude: the forward's own computation
    out = dora.effective(v0, magnitude, rows, dora.masked_norms(v0, rows, base)).to(dtype)
    assert torch.equal(out, v0)
    # the low-rank variant: B = 0 at initialisation
    b, a = torch.zeros(64, 4), torch.randn(4, 48)
    values, norms = dora.low_rank_masked(v0, w0, b, a, rows, cols)
    assert torch.equal(dora.effective(values, norms.clone(), rows, norms).to(dtype), v0)


def test_the_low_rank_variant_matches_a_dense_reference():
    w0, flat, rows, cols = _case(seed=2)
    b = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    magnitude = torch.rand(6, dtype=torch.float64, requires_grad=True)

    def ours(b, a, magnitude):
        values, norms = dora.low_rank_masked(w0.view(-1)[flat], w0, b, a, rows, cols)
        return dora.effective(values, magnitude, rows, norms)

    def reference(b, a, magnitude):
        v = w0 + b @ a
        return (magnitude[:, None] * v / v.norm(dim=1, keepdim=True)).view(-1)[flat]

    torch.testing.assert_close(ours(b, a, magnitude), reference(b, a, magnitude), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(ours, (b, a, magnitude))
