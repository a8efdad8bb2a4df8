"""Every ```python block of README.md and of the pages in docs/ runs, so that the snippets a newcomer pastes stay runnable.

A block runs as pasted, in a fresh namespace and an empty folder, unless an HTML comment right
before it says otherwise (invisible on GitHub):

* ``<!-- readme-test: setup=NAME (what it defines) -->``: the block uses names defined elsewhere
  (``model``, ``batches``, ...); the test first runs the setup ``NAME`` below, which defines them
  on tiny seeded models, then the block in that namespace.
* ``<!-- readme-test: skip (reason) -->``: the block cannot run here; the reason is reported as
  the skip reason (``pytest -ra`` lists it).

One test per block (its id is the line and the section), so pytest's summary says how many ran and
how many were skipped; ``test_the_readme_has_its_blocks`` pins how many of each there are.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

import shira_hooks
from shira_hooks._testing import attached_handles

from conftest import llama_batches, make_llama
from test_mixed import random_adapter

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # docs/changelog.md is a link to CHANGELOG.md
BLOCK = re.compile(r"(?:<!-- readme-test: (?P<marker>[^\n]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def readme_blocks() -> list[tuple[str, str | None, str]]:
    """(id, marker, code) of every python block: id is ``<page>-L<line>-<section title>``."""
    blocks = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))  # the line of the fence
            heading = re.findall(r"^#+ (.+)$", text[: match.start()], re.M)
            section = re.sub(r"[^A-Za-z0-9]+", "-", heading[-1] if heading else "top").strip("-")[:40]
            blocks.append((f"{page.stem}-L{line}-{section}", match["marker"], match["code"]))
    return blocks


# ------------------------------------------------------------------------------------ setups
def setup_llama() -> dict:
    return {"torch": torch, "shira_hooks": shira_hooks, "model": make_llama(), "batches": llama_batches(2)}


def setup_adapters() -> dict:
    model = make_llama().eval()
    a, b, c = (random_adapter(model, seed) for seed in (1, 2, 3))  # random deltas, fingerprinted on the model
    a.save("paint.safetensors")
    b.save("knight.safetensors")
    ids = torch.randint(0, 96, (4, 8), generator=torch.Generator().manual_seed(0))
    return {"torch": torch, "shira_hooks": shira_hooks, "model": model, "a": a, "b": b, "c": c, "ids": ids}


def setup_trainer() -> dict:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir="out",
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    data = [{"input_ids": row, "labels": row} for batch in llama_batches(4) for row in batch["input_ids"]]
    return {**setup_llama(), "Trainer": Trainer, "args": args, "data": data}


SETUPS = {"llama": setup_llama, "adapters": setup_adapters, "trainer": setup_trainer}


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize(
    "marker, code", [(m, c) for _, m, c in readme_blocks()], ids=[i for i, _, _ in readme_blocks()]
)
def test_readme_block_runs(marker, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files a block writes land in an empty folder
    namespace: dict = {"__name__": "__readme__"}
    if marker is not None:
        kind = re.fullmatch(r"(skip|setup=(\w+))(?: \((.*)\))?", marker)
        assert kind is not None, (
            f"unknown readme-test marker {marker!r}; use 'skip (reason)' or 'setup=NAME (what it defines)'"
        )
        if kind[1] == "skip":
            assert kind[3], "a skipped block needs a reason: <!-- readme-test: skip (reason) -->"
            pytest.skip(f"documentation block not run: {kind[3]}")
        assert kind[2] in SETUPS, f"no setup {kind[2]!r}; known: {sorted(SETUPS)}"
        namespace.update(SETUPS[kind[2]]())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notices about the tiny configs are not the README's
            exec(compile(code, f"documentation block ({marker or 'as pasted'})", "exec"), namespace)
    finally:
        for handle in attached_handles():  # a snippet that leaves a handle attached (as a user's training would)
            handle.detach()


def test_the_readme_has_its_blocks():
    """Pins the counts, so that a block added without being runnable (or a marker lost) shows here."""
    markers = [marker for _, marker, _ in readme_blocks()]
    skipped = [m for m in markers if m is not None and m.startswith("skip")]
    standalone = [m for m in markers if m is None]
    assert (len(markers), len(standalone), len(skipped)) == (9, 1, 1), markers
