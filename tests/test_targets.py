"""target_modules resolution: containers and weightless modules are skipped for every kind of spec."""

import pytest
import torch
from torch import nn

import shira_hooks
from shira_hooks import ShiraError


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    return BertModel(config)


def _weights_under_encoder(model):
    """Parameter names of every module weight under ``encoder.``: its Linear and LayerNorm layers."""
    names = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if name.startswith("encoder.") and isinstance(getattr(module, "weight", None), nn.Parameter)
    ]
    assert all(isinstance(model.get_submodule(n.removesuffix(".weight")), (nn.Linear, nn.LayerNorm)) for n in names)
    return names


def test_regex_that_also_matches_containers_targets_the_weights_under_it():
    model = _tiny_bert()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    expected = _weights_under_encoder(model)
    # per layer: query, key, value, attention.output.dense, intermediate.dense, output.dense (Linear)
    # and attention.output.LayerNorm, output.LayerNorm: "the module's weight is trained, whatever the layer type"
    assert len(expected) == 2 * 8
    shira = shira_hooks.attach(model, 0.05, "rand", target_modules=r"encoder\..*")
    assert shira.target_names == expected
    params = dict(model.named_parameters())
    assert [name for name, p in params.items() if p.requires_grad] == expected
    assert shira.num_trainable == sum(max(1, int(0.05 * params[n].numel() + 0.5)) for n in expected)
    shira.detach()
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


@pytest.mark.parametrize(
    "spec",
    [
        ["layer", "attention.self.query"],  # a suffix naming a ModuleList and a Linear
        [nn.ModuleList, nn.Linear],  # types, one of them a container
        lambda name, module: name.startswith("encoder.layer.0.attention.self"),  # a function
    ],
)
def test_every_kind_of_spec_skips_modules_without_a_weight(spec):
    model = _tiny_bert()
    with shira_hooks.attach(model, 0.05, "rand", target_modules=spec) as shira:
        names = shira.target_names
    if isinstance(spec, list) and spec[0] == "layer":
        assert names == ["encoder.layer.0.attention.self.query.weight", "encoder.layer.1.attention.self.query.weight"]
    elif isinstance(spec, list):  # every Linear; the ModuleList adds nothing
        assert names == [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    else:
        assert names == [f"encoder.layer.0.attention.self.{p}.weight" for p in ("query", "key", "value")]


def test_only_containers_matched_still_lists_the_modules_with_weights():
    model = _tiny_bert()
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(
        ShiraError,
        match=r"target_modules='encoder\\\\.layer' matched no module with a weight; modules with weights include: embeddings.word_embeddings",
    ):
        shira_hooks.attach(model, 0.05, "rand", target_modules=r"encoder\.layer")
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


class _Quantized(nn.Module):
    """A layer whose weight is an integer parameter (as some quantized layers keep it)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)


def test_a_matched_weight_that_cannot_train_still_raises():
    model = nn.Sequential(nn.Linear(4, 4), _Quantized(), nn.Embedding(10, 4, sparse=True))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(
        ShiraError,
        match=r"target module '1' \(_Quantized\) has a torch.int8 weight; only floating-point weights can be trained",
    ):
        shira_hooks.attach(model, 0.5, "rand", target_modules=r"\d")
    with pytest.raises(ShiraError, match=r"target module '2' is an nn.Embedding with sparse=True"):
        shira_hooks.attach(model, 0.5, "rand", target_modules=["0", nn.Embedding])
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
