"""The statistics of the quality report, on per-example test outcomes (numpy only).

Data: for each task, a ``(seeds, examples)`` array: one row per training seed, one column per test example,
the same examples in the same order for every seed and method (``tasks.split`` fixes the test rows). A value
is an outcome (1 right, 0 wrong) or a paired difference of outcomes (-1, 0, 1; or a difference of drops).

The statistic is always the mean over tasks of the mean over seeds and examples: the task-averaged accuracy
(or difference) the report shows, each task weighted equally whatever its size.

* ``bootstrap``: a 95% percentile interval from resampling each task's test examples with replacement. One
  draw of examples serves every seed: the seeds were tested on the same examples, so resampling them
  independently per seed would treat 3 seeds as 3 test sets and shrink the interval by up to sqrt(3). The
  interval is about the test examples; the spread of training runs is the seed standard deviation, reported
  beside it.
* ``sign_flip``: the paired test of a difference. Under the null hypothesis that the two methods are
  exchangeable on every test example, each example's difference (averaged over the seeds, so that one
  example's seeds flip together) is equally likely to have either sign. Two-sided p-value over every sign
  pattern (exact) when at most ``EXACT_UP_TO`` examples differ, else over ``FLIPS`` random patterns
  (p = (1 + hits) / (1 + FLIPS), never 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000  # bootstrap resamples
FLIPS = 10_000  # random sign patterns when the exact test is too large
EXACT_UP_TO = 16  # examples that differ: at most 2**16 sign patterns enumerated
SEED = 0  # every interval and p-value is reproducible
TIE = 1e-12  # float slack when comparing a flipped statistic with the observed one

BOOTSTRAP_TEXT = (
    f"95% bootstrap interval ({RESAMPLES:,} resamples of each task's test examples, one draw for all seeds, "
    "the statistic averaged over seeds; percentile method)"
)
SIGN_FLIP_TEXT = (
    f"two-sided paired sign-flip test over test examples (each example's difference averaged over the seeds "
    f"both methods have; exact when at most {EXACT_UP_TO} examples differ, else {FLIPS:,} random sign patterns)"
)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% bootstrap interval."""

    mean: float
    low: float
    high: float

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Paired:
    """A paired difference (first method minus second): its mean and interval, the p-value of the sign-flip
    test, and how many seeds and test examples it rests on."""

    interval: Interval
    p: float
    seeds: int
    examples: int


def outcomes(correct: str) -> np.ndarray:
    """A per-example record ("1" right, "0" wrong, one character per test row) as an int8 array."""
    return np.frombuffer(correct.encode("ascii"), dtype=np.uint8).astype(np.int8) - ord("0")


def _example_means(groups: list[np.ndarray]) -> list[np.ndarray]:
    """Each task's per-example mean over seeds, (examples,); checks the shapes."""
    if not groups:
        raise ValueError("no tasks: nothing to average")
    means = []
    for g in groups:
        g = np.asarray(g, dtype=np.float64)
        if g.ndim != 2 or g.shape[0] == 0 or g.shape[1] == 0:
            raise ValueError(
                f"each task needs a (seeds, examples) array with at least one of each, got shape {g.shape}"
            )
        means.append(g.mean(axis=0))
    return means


def statistic(groups: list[np.ndarray]) -> float:
    """Mean over tasks of the mean over seeds and examples."""
    return float(np.mean([m.mean() for m in _example_means(groups)]))


def bootstrap(groups: list[np.ndarray], resamples: int = RESAMPLES, seed: int = SEED) -> Interval:
    """The statistic and its 95% percentile interval, resampling each task's test examples (one draw for all seeds).

    Args:
        groups: one ``(seeds, examples)`` array per task.
        resamples: bootstrap resamples.
        seed: of the resampling.

    Returns:
        ``Interval(mean, low, high)``.

    Raises:
        ValueError: no task, or an array that is not 2-D with at least one seed and one example.
    """
    means = _example_means(groups)
    rng = np.random.default_rng(seed)
    total = np.zeros(resamples)
    for m in means:  # (examples,)
        draw = rng.integers(0, len(m), size=(resamples, len(m)))  # (resamples, examples)
        total += m[draw].mean(axis=1)
    total /= len(means)
    low, high = np.percentile(total, [2.5, 97.5])
    return Interval(float(np.mean([m.mean() for m in means])), float(low), float(high))


def sign_flip(groups: list[np.ndarray], flips: int = FLIPS, seed: int = SEED) -> float:
    """Two-sided p-value of the paired sign-flip test that the statistic of these differences is 0.

    Args:
        groups: one ``(seeds, examples)`` array of paired differences per task.
        flips: random sign patterns when more than ``EXACT_UP_TO`` examples differ.
        seed: of the random patterns.

    Returns:
        The p-value: 1.0 when no example differs.

    Raises:
        ValueError: as ``bootstrap``.
    """
    means = _example_means(groups)
    # each example's weight in the statistic: 1 / (tasks * its task's examples)
    terms = np.concatenate([m / (len(means) * len(m)) for m in means])
    terms = terms[terms != 0]  # an example without a difference contributes 0 under every sign
    observed = abs(terms.sum())
    if len(terms) == 0:
        return 1.0
    if len(terms) <= EXACT_UP_TO:
        patterns = ((np.arange(2 ** len(terms))[:, None] >> np.arange(len(terms))) & 1) * 2 - 1  # (2^m, m) of +-1
        return float(np.mean(np.abs(patterns @ terms) >= observed - TIE))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, flips, 1000):  # chunks of (1000, examples): bounded memory
        rows = min(1000, flips - start)
        # random bits from random bytes (8 per byte: an order of magnitude faster than integers(0, 2));
        # flipping the examples whose bit is 1 turns the sum into total - 2 * (their sum)
        bits = np.unpackbits(rng.integers(0, 256, size=(rows, (len(terms) + 7) // 8), dtype=np.uint8), axis=1)[
            :, : len(terms)
        ]
        hits += int(np.sum(np.abs(terms.sum() - 2 * (bits @ terms)) >= observed - TIE))
    return (1 + hits) / (1 + flips)


def paired(first: list[np.ndarray], second: list[np.ndarray]) -> Paired:
    """First minus second, example by example and seed by seed: the mean difference, its bootstrap interval
    and the sign-flip p-value.

    Args:
        first, second: per task, ``(seeds, examples)`` arrays of the same shapes (the same seeds in the same order).

    Returns:
        ``Paired``.

    Raises:
        ValueError: different numbers of tasks or different shapes.
    """
    if len(first) != len(second) or any(np.shape(a) != np.shape(b) for a, b in zip(first, second)):
        raise ValueError(
            f"paired data need the same tasks, seeds and examples: {[np.shape(a) for a in first]} vs {[np.shape(b) for b in second]}"
        )
    diffs = [np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64) for a, b in zip(first, second)]
    return Paired(
        bootstrap(diffs),
        sign_flip(diffs),
        seeds=int(np.shape(first[0])[0]),
        examples=sum(int(np.shape(a)[1]) for a in first),
    )
