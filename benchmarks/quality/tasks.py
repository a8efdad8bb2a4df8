"""The tasks of the quality benchmark: BIG-bench examples, fixed splits, and how each model reads them.

Examples come from ``recipes/common.py:bigbench_task`` (the ``bigbench==1.0.0`` source archive,
fetched once with ``pip download --no-deps`` and cached; rows never enter the repository). Each task
is split once by a seeded shuffle into test / validation (for the learning-rate choice) / train, the
same split for every method and seed of a model. The rule (``split``): validation takes ``val`` rows
(encoder 150, LM 40); the training set keeps at least ``train`` rows (300); the test set takes ``test``
rows (300), or all that the other two leave when the task is too small for that. With the tasks used
(intent_recognition 693 rows, navigate 1000, winowhy 2865, reasoning_about_colored_objects 2000), the
test sets are 300 rows except intent_recognition on the encoder: 243 (with 300 training rows).

A task whose examples all share one option list (intent_recognition, strategyqa, ...) is a
classification for the encoder (one logit per option); a task whose options differ per example
(social_iqa) is a multiple choice (the encoder scores each input-option pair). The causal LM always
scores each option by its log-likelihood after the prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
from recipes.common import bigbench_task, collate  # noqa: E402

ANSWER = "\nAnswer:"


@dataclass
class Task:
    name: str
    train: list[dict]
    val: list[dict]
    test: list[dict]
    labels: list[str] | None  # the shared option list, or None when options differ per example

    @property
    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def test_digest(self) -> str:
        """sha1 of the test rows in order: per-example records of two runs line up only if it matches."""
        return hashlib.sha1(json.dumps(self.test, sort_keys=True).encode()).hexdigest()[:16]

    def majority(self) -> float:
        """Test accuracy of always answering the most frequent training answer (chance for multiple choice)."""
        if self.labels is None:
            return sum(1 / len(e["options"]) for e in self.test) / len(self.test)
        top = Counter(e["answer"] for e in self.train).most_common(1)[0][0]
        return sum(e["answer"] == top for e in self.test) / len(self.test)


def split(name: str, examples: list[dict], *, test: int, val: int, train: int, seed: int = 0) -> Task:
    """Shuffle ``examples`` with ``seed``, then cut test, validation and training rows in that order.

    Args:
        name: the task's name.
        examples: its rows {"input", "options", "answer"}.
        test: test rows wanted; fewer (all that remain) when the task cannot also give ``val`` and ``train``.
        val: validation rows.
        train: the fewest training rows to keep; the training set gets every row left over.
        seed: the shuffle's seed.

    Returns:
        The Task; its test rows keep the shuffled order, the order of every per-example record.

    Raises:
        ValueError: the task has no more than ``val + train`` rows.
    """
    examples = list(examples)
    random.Random(seed).shuffle(examples)
    test = min(test, len(examples) - val - train)
    if test <= 0:
        raise ValueError(
            f"task {name!r} has {len(examples)} rows: too few for {val} validation rows, at least {train} training rows "
            "and a test set; lower the validation or training sizes, or pick another task"
        )
    option_lists = {tuple(e["options"]) for e in examples}
    labels = list(option_lists.pop()) if len(option_lists) == 1 else None
    return Task(name, examples[test + val :], examples[test : test + val], examples[:test], labels)


def load(name: str, *, test: int, val: int, train: int) -> Task:
    return split(name, bigbench_task(name), test=test, val=val, train=train)


# ------------------------------------------------------------------------------ synthetic (--quick)
TEMPLATES = {
    "intent": {
        "play": ["play some {a} music", "put on {a} songs"],
        "weather": ["weather in {b} today", "will it rain in {b}"],
        "book": ["book a table in {b}", "reserve dinner for {a}"],
    },
    "sentiment": {
        "positive": ["the {a} film was great", "i loved the {a} show"],
        "negative": ["the {a} film was awful", "i hated the {a} show"],
    },
    "topic": {
        "sport": ["the {b} team won the match", "a goal for {b}"],
        "science": ["a new {a} particle found", "the {a} experiment in {b}"],
    },
}
FILLERS = {"a": ["jazz", "rock", "two", "four", "pop"], "b": ["paris", "rome", "oslo", "lima"]}


def synthetic(name: str, n: int = 64, seed: int = 0) -> list[dict]:
    rng = random.Random(f"{name}-{seed}")
    options = list(TEMPLATES[name])
    rows = []
    for _ in range(n):
        answer = rng.randrange(len(options))
        text = rng.choice(TEMPLATES[name][options[answer]]).format(
            a=rng.choice(FILLERS["a"]), b=rng.choice(FILLERS["b"])
        )
        rows.append({"input": text, "options": options, "answer": answer})
    return rows


def synthetic_words() -> list[str]:
    words = {w for t in TEMPLATES.values() for label, lines in t.items() for w in [label, *" ".join(lines).split()]}
    words |= {w for f in FILLERS.values() for w in f} | {"answer", ":"}
    return sorted(w for w in words if "{" not in w)


# --------------------------------------------------------------------------------- batching
def batches(examples: list[dict], batch_size: int, steps: int, seed: int):
    """``steps`` training batches: epochs of seeded shuffles of ``examples``."""
    rng = random.Random(seed)
    order: list[dict] = []
    for _ in range(steps):
        if len(order) < batch_size:
            pool = list(examples)
            rng.shuffle(pool)
            order += pool
        yield order[:batch_size]
        order = order[batch_size:]


def encoder_inputs(tokenizer, task: Task, rows: list[dict], max_length: int) -> dict:
    """Classification: one sequence per example; multiple choice: one (input, option) pair per option."""
    if task.labels is not None:
        enc = tokenizer(
            [r["input"].strip() for r in rows],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        return {"enc": dict(enc), "labels": torch.tensor([r["answer"] for r in rows]), "options": None}
    first = [r["input"].strip() for r in rows for _ in r["options"]]
    second = [o for r in rows for o in r["options"]]
    enc = tokenizer(first, second, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {
        "enc": dict(enc),
        "labels": torch.tensor([r["answer"] for r in rows]),
        "options": [len(r["options"]) for r in rows],
    }


def prompt_ids(tokenizer, row: dict) -> list[int]:
    return tokenizer(row["input"].strip() + ANSWER, add_special_tokens=False)["input_ids"]


def answer_ids(tokenizer, option: str) -> list[int]:
    """What the LM is trained on and scored by: " option" then eos."""
    return tokenizer(" " + option, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def lm_rows(tokenizer, row: dict, option: int, max_length: int) -> dict:
    """input_ids of prompt + " option" + eos, labels only on the option and eos."""
    head, tail = prompt_ids(tokenizer, row), answer_ids(tokenizer, row["options"][option])
    ids = (head + tail)[-max_length:]
    labels = ([-100] * len(head) + tail)[-max_length:]
    return {"input_ids": ids, "labels": labels}


def lm_inputs(tokenizer, rows: list[dict], max_length: int, *, every_option: bool = False) -> dict:
    """A right-padded batch: the correct option of each row, or every option of every row (scoring)."""
    items = [
        lm_rows(tokenizer, r, o, max_length)
        for r in rows
        for o in (range(len(r["options"])) if every_option else [r["answer"]])
    ]
    return collate(items, tokenizer.pad_token_id)
