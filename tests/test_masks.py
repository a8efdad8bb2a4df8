"""Mask selection: exact budgets, the structure of each mask, and known answers for grad/snip."""

import warnings

import pytest
import torch
from torch import nn

import shira_hooks
from shira_hooks import masks

from conftest import make_convnet, make_llama, make_mlp


@pytest.mark.parametrize("mask", ["struct", "rand", "wm", "grad", "snip"])
@pytest.mark.parametrize("builder", ["mlp", "conv", "llama"])
def test_exact_budget_per_weight(mask, builder):
    model = {"mlp": make_mlp, "conv": make_convnet, "llama": make_llama}[builder]()
    targets = [nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding] if builder == "conv" else None
    calibration = None
    if mask in ("grad", "snip"):
        if builder == "conv":
            calibration = [(torch.randint(0, 20, (4, 10)), torch.randn(4, 1, 6, 6))]
            loss_fn = lambda m, b: m(*b).pow(2).mean()
        elif builder == "mlp":
            calibration, loss_fn = [torch.randn(4, 16)], lambda m, b: m(b).pow(2).mean()
        else:
            ids = torch.randint(0, 96, (2, 8))
            calibration, loss_fn = [{"input_ids": ids, "labels": ids}], None
    else:
        loss_fn = None
    params = dict(model.named_parameters())
    with shira_hooks.attach(
        model, 0.03, mask, target_modules=targets, calibration=calibration, loss_fn=loss_fn, progress=False
    ) as shira:
        assert shira.calibrated
        for name, indices in shira.masks.items():
            numel = params[name].numel()
            assert indices.numel() == max(1, int(0.03 * numel + 0.5)), name
            assert indices.dtype == torch.int32
            assert bool((indices[1:] > indices[:-1]).all()) and int(indices[0]) >= 0 and int(indices[-1]) < numel
        assert shira.num_trainable == sum(i.numel() for i in shira.masks.values())


def test_lora_rank_matches_the_budget():
    # 1% of a 4096x4096 weight is 167,772 entries; rank 20 gives 163,840 LoRA parameters, rank 21 172,032
    assert masks.lora_rank([(4096, 4096)], 0.01) == 20
    shapes = [(576, 576), (192, 576), (1536, 576)]
    rank = masks.lora_rank(shapes, 0.01)
    entries = sum(masks.budget(o * i, 0.01) for o, i in shapes)
    per_rank = sum(o + i for o, i in shapes)
    assert all(abs(rank * per_rank - entries) <= abs(r * per_rank - entries) for r in range(1, 10))
    assert masks.lora_rank([(8, 8)], 0.001) == 1  # never zero
    with pytest.raises(
        shira_hooks.ShiraError, match=r"lora_rank\(\) needs one or more \(out, in\) weight shapes, got \[\]"
    ):
        masks.lora_rank([], 0.01)
    with pytest.raises(shira_hooks.ShiraError, match=r"got \[\(8, 3, 3\)\]"):
        masks.lora_rank([(8, 3, 3)], 0.01)  # a conv weight
    with pytest.raises(shira_hooks.ShiraError, match=r"sparsity=0 is outside \(0, 1\]"):
        masks.lora_rank([(8, 8)], 0)


def test_default_targets_skip_head_and_embeddings():
    model = make_llama()
    with shira_hooks.attach(model, 0.01, "rand") as shira:
        names = shira.target_names
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert not any("lm_head" in n or "embed" in n for n in names)


def test_tied_output_head_is_excluded():
    model = make_mlp()
    model.embed = nn.Embedding(6, 6)
    model.out = nn.Linear(6, 6, bias=False)
    model.out.weight = model.embed.weight  # tied
    with shira_hooks.attach(model, 0.1, "rand") as shira:
        assert "out.weight" not in shira.target_names and "embed.weight" not in shira.target_names
        assert len(shira.target_names) == 3


@pytest.mark.parametrize(
    "spec, expected",
    [
        (["layers.0", "2"], ["layers.0.weight", "layers.2.weight"]),
        (r"layers\.[01]", ["layers.0.weight", "layers.1.weight"]),
        (lambda name, module: name.endswith("1"), ["layers.1.weight"]),
        (nn.Linear, ["layers.0.weight", "layers.1.weight", "layers.2.weight"]),
    ],
)
def test_target_module_specs(spec, expected):
    model = make_mlp()
    with shira_hooks.attach(model, 0.1, "rand", target_modules=spec) as shira:
        assert shira.target_names == expected


def test_struct_is_diagonal_plus_rows():
    k = masks.budget(64 * 32, 0.05)  # 102 = 32 diagonal + 70 in rows
    indices = masks.struct_mask((64, 32), k, masks.generator_for(0, "w")).to(torch.int64)
    dense = torch.zeros(64 * 32, dtype=torch.bool)
    dense[indices] = True
    dense = dense.view(64, 32)
    assert indices.numel() == k
    assert bool(dense.diagonal().all())
    row_counts = dense.sum(1)
    off_diag_rows = (row_counts > 1).nonzero().reshape(-1)
    full = (row_counts == 32).sum().item()
    assert full == (k - 32) // 31  # whole rows (each adds 31 new entries beyond its diagonal one)
    assert off_diag_rows.numel() == full + 1  # plus one partial row
    # fewer entries than the diagonal: evenly spaced diagonal entries only
    small = masks.struct_mask((64, 32), 8, masks.generator_for(0, "w")).to(torch.int64)
    assert torch.equal(small, torch.arange(0, 32, 4) * 33)


def test_rand_reproducible_and_uniform_enough():
    g = lambda seed: masks.generator_for(seed, "layer.weight")
    a, b, c = (masks.rand_mask(10_000, 100, g(s)) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.zeros(10)
    for seed in range(200):
        counts += torch.bincount(masks.rand_mask(10_000, 100, g(seed)).long() // 1000, minlength=10)
    assert counts.min() > 0.8 * counts.mean()  # no tenth of the weight is starved
    # same seed and name -> same mask whatever else is targeted
    m1, m2 = make_mlp(), make_mlp()
    with shira_hooks.attach(m1, 0.1, "rand", seed=3) as h1:
        first = h1.masks["layers.1.weight"]
    with shira_hooks.attach(m2, 0.1, "rand", seed=3, target_modules=["layers.1"]) as h2:
        assert torch.equal(first, h2.masks["layers.1.weight"])


def test_wm_picks_largest_magnitudes():
    model = make_mlp()
    weight = model.layers[0].weight.detach().reshape(-1)
    with shira_hooks.attach(model, 0.1, "wm") as shira:
        chosen = shira.masks["layers.0.weight"].long()
    threshold = weight.abs()[chosen].min()
    outside = torch.ones_like(weight, dtype=torch.bool)
    outside[chosen] = False
    assert bool((weight.abs()[outside] <= threshold).all())


class Probe(nn.Module):
    """loss = sum(C * W): the gradient of W is exactly C, so grad/snip have a known answer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.linspace(0.1, 6.4, 64).view(8, 8))  # |W| grows with the index
        coef = torch.linspace(3.0, 0.01, 64).view(8, 8)  # |C| shrinks with the index
        self.register_buffer("coef", coef)

    def forward(self, scale):
        return (self.lin.weight * self.coef).sum() * scale


def _expected(kind, k=6):
    probe = Probe()
    score = probe.coef.abs() if kind == "grad" else (probe.lin.weight * probe.coef).abs()
    return torch.sort(torch.topk(score.detach().reshape(-1), k).indices).values


@pytest.mark.parametrize("kind", ["grad", "snip"])
def test_grad_and_snip_known_answer_eager(kind):
    probe = Probe()
    batches = [torch.tensor(1.0), torch.tensor(-2.0)]  # the sign must not matter: scores use |g|
    with shira_hooks.attach(
        probe, 6 / 64, kind, calibration=batches, loss_fn=lambda m, s: m(s), progress=False
    ) as shira:
        chosen = shira.masks["lin.weight"].long()
    assert torch.equal(chosen, _expected(kind))
    assert not torch.equal(_expected("grad"), _expected("snip"))  # the case tells the two apart


@pytest.mark.parametrize("kind", ["grad", "snip"])
def test_grad_and_snip_known_answer_lazy(kind):
    probe = Probe()
    before = probe.lin.weight.detach().clone()
    shira = shira_hooks.attach(probe, 6 / 64, kind, calibration_steps=3)
    optimizer = torch.optim.AdamW(probe.parameters(), lr=0.1, weight_decay=0.1)
    for step in range(3):
        assert not shira.calibrated
        with pytest.raises(shira_hooks.ShiraError, match="still calibrating"):
            shira.extract()
        probe(torch.tensor(1.0 + step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        assert torch.equal(probe.lin.weight, before)  # calibration steps change nothing
        assert len(optimizer.state) == 0  # and leave no optimizer state
    assert shira.calibrated
    assert torch.equal(shira.masks["lin.weight"].long(), _expected(kind))
    probe(torch.tensor(1.0)).backward()
    optimizer.step()
    changed = (probe.lin.weight != before).reshape(-1).nonzero().reshape(-1)
    assert torch.equal(changed, _expected(kind))  # now training moves exactly the masked entries
    shira.detach()


def test_user_mask_function_indices_and_bool():
    model = make_mlp()

    def first_column(name, weight):
        mask = torch.zeros_like(weight, dtype=torch.bool)
        mask[:, 0] = True
        return mask

    with shira_hooks.attach(model, 0.01, first_column) as shira:
        assert torch.equal(shira.masks["layers.0.weight"].long(), torch.arange(48) * 16)
    with shira_hooks.attach(model, 0.01, lambda name, w: [5, 1, 3]) as shira:
        assert shira.masks["layers.2.weight"].tolist() == [1, 3, 5]
        assert shira.num_trainable == 9


def test_mask_memory_is_small():
    model = make_llama()
    with shira_hooks.attach(model, 0.01, "rand") as shira:
        params = dict(model.named_parameters())
        mask_bytes = sum(i.numel() * i.element_size() for i in shira.masks.values())
        weight_bytes = sum(params[n].numel() * params[n].element_size() for n in shira.masks)
        assert mask_bytes < 0.02 * weight_bytes  # 1% of entries, int32 indices


def test_a_sparsity_above_one_half_warns_that_0_01_means_1_percent():
    """attach(model, sparsity=1), meant as 1%, used to train every entry without a word."""
    model = make_mlp()
    with pytest.warns(
        UserWarning,
        match=r"attach\(sparsity=1\) trains 100% of every target weight; sparsity is a fraction, so 1% is sparsity=0.01",
    ) as caught:
        shira = shira_hooks.attach(model, 1, "rand", seed=0)
    assert caught[0].filename == __file__  # points at the caller's line
    assert shira.num_trainable == sum(
        p.numel() for n, p in model.named_parameters() if n.endswith("weight")
    )  # it still does what was asked
    shira.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shira_hooks.attach(model, 0.5, "rand", seed=0).detach()  # a half is a deliberate choice: no warning


def test_a_mask_kind_is_one_registry_entry(monkeypatch):
    """Adding a kind is adding a MaskKind to masks.KINDS: attach, its budget, the lazy/eager choice and the
    adapter's metadata follow it; an unknown name lists the registered ones."""

    def last_entries(name, weight, k, seed, block):  # the k last entries of the weight
        return torch.arange(weight.numel() - k, weight.numel(), dtype=torch.int32)

    monkeypatch.setitem(masks.KINDS, "last", masks.MaskKind("last", "the k last entries", select=last_entries))
    model = make_mlp()
    with shira_hooks.attach(model, 0.05, "last") as shira:
        weight = model.layers[0].weight
        k = masks.budget(weight.numel(), 0.05)
        assert torch.equal(shira.masks["layers.0.weight"].long(), torch.arange(weight.numel() - k, weight.numel()))
        assert shira.extract().metadata["mask"] == "last"
    with pytest.raises(
        shira_hooks.ShiraError, match=r"calibration= is only used by mask='grad' or 'snip', not mask='last'"
    ):
        shira_hooks.attach(model, 0.05, "last", calibration=[torch.randn(2, 16)])
    with pytest.raises(
        shira_hooks.ShiraError, match=r"unknown mask='nope'; use one of struct, rand, wm, grad, snip or a function"
    ):
        shira_hooks.attach(model, 0.05, "nope")
    assert shira_hooks.MASK_KINDS == ("struct", "rand", "wm", "grad", "snip") and masks.CALIBRATED_KINDS == (
        "grad",
        "snip",
    )
