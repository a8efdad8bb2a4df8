"""``python -m shira_hooks`` (or ``python -m shira_hooks demo``): the whole SHiRA workflow on an embedded default.

A small MLP is first trained on task A (synthetic data generated from a fixed seed, nothing is
downloaded), then adapted to a related task B with SHiRA: ``attach`` with a SNIP mask scored on
calibration batches, a plain AdamW loop with weight decay, ``verify`` that no entry outside the
masks changed, ``extract`` the adapter, save it, load it back, ``apply`` it to a fresh copy of
the base and ``remove`` it again. A few seconds once torch is imported.

    python -m shira_hooks [--sparsity 0.02] [--mask snip] [--steps 300] [--out shira_demo]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shira_hooks
from shira_hooks.masks import CALIBRATED_KINDS

from .help import DefaultsFormatter

DESCRIPTION = (
    "The whole SHiRA workflow on an embedded default: train a small MLP on task A, adapt it to task B "
    "with SHiRA (attach, train, verify, extract, save), then load the adapter, apply it to a fresh base "
    "and remove it again. Nothing is downloaded."
)
FEATURES, CLASSES = 32, 8


def make_task(seed: int, shift: float = 0.0, base_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels argmax(x @ R) for a fixed random R; ``shift`` mixes in a second random matrix."""
    rule = torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(base_seed))
    if shift:
        rule = rule + shift * torch.randn(FEATURES, CLASSES, generator=torch.Generator().manual_seed(base_seed + 1))
    inputs = torch.randn(4096, FEATURES, generator=torch.Generator().manual_seed(seed))
    return inputs, (inputs @ rule).argmax(1)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, CLASSES))


def train(model, inputs, labels, steps, lr, weight_decay, batch=128):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        pick = torch.randint(0, inputs.shape[0] - 1024, (batch,), generator=generator)  # last 1024 held out
        loss = nn.functional.cross_entropy(model(inputs[pick]), labels[pick])  # (batch,) -> scalar
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


@torch.no_grad()
def accuracy(model, inputs, labels) -> float:
    return float((model(inputs[-1024:]).argmax(1) == labels[-1024:]).float().mean())


def main(argv: list[str] | None = None, prog: str = "python -m shira_hooks demo") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=DefaultsFormatter)
    parser.add_argument("--sparsity", type=float, default=0.02, help="fraction of each target weight that trains")
    parser.add_argument("--mask", default="snip", choices=shira_hooks.MASK_KINDS, help="how the entries are chosen")
    parser.add_argument("--steps", type=int, default=300, help="AdamW steps on each task")
    parser.add_argument("--out", type=Path, default=Path("shira_demo"), help="folder for the adapter file")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()

    task_a, task_b = make_task(seed=10), make_task(seed=11, shift=0.8)
    model = make_model()
    train(model, *task_a, steps=args.steps, lr=3e-3, weight_decay=0.01)
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    print(f"base model trained on task A: accuracy A {accuracy(model, *task_a):.3f}, B {accuracy(model, *task_b):.3f}")

    inputs, labels = task_b
    scoring: dict[str, Any] = {}  # grad and snip score the weights on batches of task B; struct, rand and wm need none
    if args.mask in CALIBRATED_KINDS:
        scoring["calibration"] = [(inputs[i : i + 128], labels[i : i + 128]) for i in range(0, 1024, 128)]
        scoring["loss_fn"] = lambda m, batch: nn.functional.cross_entropy(m(batch[0]), batch[1])
    shira = shira_hooks.attach(model, args.sparsity, args.mask, seed=0, progress=False, **scoring)
    print(shira.summary())
    loss = train(model, *task_b, steps=args.steps, lr=1e-2, weight_decay=0.1)
    changed_outside = shira.verify()
    print(
        f"after SHiRA on task B ({args.steps} AdamW steps, weight_decay=0.1): loss {loss:.3f}, "
        f"accuracy B {accuracy(model, *task_b):.3f}, A {accuracy(model, *task_a):.3f}"
    )
    print(f"entries changed outside the masks: {'none' if not changed_outside else changed_outside}")

    adapter = shira.extract()
    shira.detach()
    path = adapter.save(args.out / "adapter.safetensors")
    print(f"adapter: {adapter.num_entries:,} entries, {path.stat().st_size:,} bytes -> {path}")

    loaded = shira_hooks.SparseAdapter.load(path)
    rebuilt = make_model()
    rebuilt.load_state_dict(base)
    with torch.no_grad(), shira_hooks.apply(rebuilt, loaded):  # in place: ~2% of the entries overwritten
        gap = (rebuilt(inputs[-1024:]) - model(inputs[-1024:])).abs().max().item()
    restored = all(torch.equal(p, base[n]) for n, p in rebuilt.named_parameters())
    print(
        f"base + loaded adapter reproduces the adapted model: max |logit difference| = {gap:.2e}; "
        f"removed again, the base is {'bit-exact' if restored else 'NOT restored'}"
    )
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0 if not changed_outside and gap <= 1e-4 and restored else 1
