"""Timing and reporting helpers shared by ``python -m shira_hooks.bench`` and ``benchmarks/`` (public: the
benchmarks are users, and import them from ``shira_hooks.tools``)."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Stats:
    """Seconds: median, min and max over ``n`` timed repeats."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))


def time_pair(
    first: Callable[[], object], second: Callable[[], object], *, warmup: int, repeats: int, budget: float
) -> tuple[Stats, Stats, Stats]:
    """Time ``first(); second()`` repeatedly (e.g. fuse then unfuse); returns stats of first, second, both.

    ``warmup`` untimed rounds, then up to ``repeats`` timed rounds, stopping early once ``budget``
    seconds are spent (but never with fewer than 3 rounds).
    """
    started = time.perf_counter()
    for _ in range(warmup):
        first(), second()
        if time.perf_counter() - started > budget / 4:
            break
    firsts: list[float] = []
    seconds: list[float] = []
    started = time.perf_counter()
    while len(firsts) < repeats and (len(firsts) < 3 or time.perf_counter() - started < budget):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        firsts.append(t1 - t0)
        seconds.append(t2 - t1)
    return Stats.of(firsts), Stats.of(seconds), Stats.of([a + b for a, b in zip(firsts, seconds)])


def time_interleaved(
    methods: Mapping[str, tuple[Callable[[], object], Callable[[], object]]],
    *,
    warmup: int,
    repeats: int,
    budget: float,
    settle: int = 1,
) -> dict[str, tuple[Stats, Stats, Stats]]:
    """``time_pair`` for several methods at once, interleaved round-robin.

    Each round times one ``first(); second()`` pair of every method, in forward order on even rounds
    and in reverse order on odd ones, so that a slow phase of the machine (another process, a noisy
    neighbour) falls on all methods alike instead of on whichever was being timed then. Before its
    timed pair, each method runs ``settle`` untimed pairs: what the previous method left behind
    (its data in the caches, the TLB flushes of memory it gave back to the kernel, which made the
    next method's scattered writes up to 3x slower here) is not charged to this one, so the figures
    are each method's steady state. Up to ``repeats`` rounds, stopping once ``budget`` seconds per
    method are spent (never fewer than 3 rounds). Returns, per method, stats of first, second, and both.
    """
    names = list(methods)
    for _ in range(warmup):
        for name in names:
            first, second = methods[name]
            first(), second()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    started = time.perf_counter()
    for round_ in range(repeats):
        if round_ >= 3 and time.perf_counter() - started > budget * len(names):
            break
        for name in names if round_ % 2 == 0 else reversed(names):
            first, second = methods[name]
            for _ in range(settle):
                first(), second()
            t0 = time.perf_counter()
            first()
            t1 = time.perf_counter()
            second()
            t2 = time.perf_counter()
            samples[name].append((t1 - t0, t2 - t1))
    return {
        name: (Stats.of([a for a, _ in pairs]), Stats.of([b for _, b in pairs]), Stats.of([a + b for a, b in pairs]))
        for name, pairs in samples.items()
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """What a benchmark result depends on: CPU, threads, library versions."""
    info = {
        "cpu": cpu_name(),
        "cores": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for name in ("peft", "transformers"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def command_line(program: str, argv: list[str] | None) -> str:
    """The command a benchmark was run with, for its report."""
    return f"{program} {' '.join(argv if argv is not None else sys.argv[1:])}".strip()


def report_header(title: str, command: str, info: dict[str, str]) -> list[str]:
    """The first lines of every benchmark section: title, command, machine."""
    return [
        f"## {title}",
        "",
        f"Command: `{command}`",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items()),
        "",
    ]


def publish(section: str, text: str, payload: dict, json_path: str | None, results_path: str | None) -> None:
    """Write the JSON payload and the markdown section where the command line asked."""
    if json_path:
        write_json(json_path, payload)
    if results_path:
        update_section(results_path, section, text)


def write_json(path: str | os.PathLike, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(
        json.dumps(payload, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    )


def update_section(path: str | os.PathLike, section: str, markdown: str) -> None:
    """Replace (or append) the block between ``<!-- section:start -->`` and ``<!-- section:end -->``."""
    path = Path(path)
    text = (
        path.read_text()
        if path.exists()
        else "# Benchmark results\n\nEvery table below is written by the command shown with it; none is typed by hand.\n"
    )
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
