"""Tiny seeded models built in the tests (no download)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import shira_hooks


class MLP(nn.Module):
    def __init__(self, sizes=(16, 48, 32, 6)):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):  # (B, 16) -> (B, 6)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = torch.relu(x)
        return x


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv1d = nn.Conv1d(8, 12, 3, padding=1)
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(12 + 4 * 6 * 6, 5)

    def forward(self, tokens, image):  # tokens (B, 10), image (B, 1, 6, 6)
        seq = self.conv1d(self.embed(tokens).transpose(1, 2)).mean(-1)  # (B, 12)
        img = self.conv2d(image).flatten(1)  # (B, 144)
        return self.head(torch.cat([seq, img], 1))


class FunctionalUse(nn.Module):
    """``proj`` is a Linear whose weight is read with F.linear, never by calling ``proj``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.proj = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):  # (B, 8) -> (B, 4)
        return nn.functional.linear(torch.relu(self.first(x)), self.proj.weight, self.proj.bias)


def make_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def make_convnet(seed: int = 0) -> ConvNet:
    torch.manual_seed(seed)
    return ConvNet()


def make_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).to(dtype)


def mlp_batches(n: int, seed: int = 1, batch: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 16, generator=g), torch.randint(0, 6, (batch,), generator=g)) for _ in range(n)]


def mlp_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def mlp_steps(model, optimizer, batches) -> None:
    """One optimizer step per batch of ``mlp_batches``."""
    for batch in batches:
        mlp_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()


def llama_batches(n: int, seed: int = 1, batch: int = 4, length: int = 12):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 96, (batch, length), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed_entries(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices where the two tensors differ bit for bit."""
    a = before.detach().reshape(-1).contiguous()
    b = after.detach().reshape(-1).contiguous()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.nonzero(a.view(ints) != b.view(ints)).reshape(-1)


def assert_changes_within_masks(handle: shira_hooks.ShiraHandle, before: dict, model: nn.Module) -> int:
    """Every bit-level change of a target weight lies in its mask; returns how many entries changed."""
    params = dict(model.named_parameters())
    total = 0
    for name, indices in handle.masks.items():
        changed = changed_entries(before[name], params[name])
        outside = changed[~torch.isin(changed, indices.to(torch.int64))]
        assert outside.numel() == 0, f"{name}: {outside.numel()} entries changed outside the mask"
        total += changed.numel()
    return total


@pytest.fixture(autouse=True)
def _no_leftover_handles():
    """Every test must detach what it attached (a leftover handle would leak hooks into the next test)."""
    yield
    from shira_hooks._testing import attached_handles

    alive = attached_handles()
    for handle in alive:
        handle.detach()
    assert not alive, "a test left a handle attached"


WORDS = (
    "the a cat dog sat on mat ran to park and saw bird red blue green big small house tree "
    "river fast slow happy sad day night sun moon star sky sea boat fish king queen castle"
).split()


def tiny_tokenizer():
    """A word-level fast tokenizer built in memory (no download), vocabulary < 96."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_texts(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]
