"""apply / remove from several threads: on one model, and on two models sharing adapters."""

import random
import sys
import threading

import pytest
import torch
from torch import nn

from shira_hooks import AdapterBank, SparseAdapter, SparseDelta, applied, apply, digest

from conftest import changed_entries, snapshot


def _model(dtype=torch.float32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(64, 64) for _ in range(3))).to(dtype)


def _adapters(model: nn.Module, count: int, sparsity: float = 0.2) -> list[SparseAdapter]:
    """Random adapters over the three weights; at 20% each, any two share entries."""
    adapters = []
    for seed in range(count):
        g = torch.Generator().manual_seed(seed)
        deltas = {}
        for name, param in model.named_parameters():
            if name.endswith("weight"):
                k = int(sparsity * param.numel())
                index = torch.randperm(param.numel(), generator=g)[:k].sort().values
                base = param.detach().reshape(-1)[index]
                deltas[name] = SparseDelta(
                    tuple(param.shape), param.dtype, index.int(), torch.randn(k, generator=g), digest(base)
                )
        adapters.append(SparseAdapter(deltas))
    return adapters


def _differing(expected: dict, model: nn.Module) -> list[str]:
    """Names of the weights that differ from ``expected`` bit for bit."""
    return [name for name, param in model.named_parameters() if changed_entries(expected[name], param).numel()]


@pytest.fixture
def tight_switching():
    """Switch threads every microsecond, so that the threads interleave inside apply and remove."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def _run(workers) -> list[BaseException]:
    """Run each worker in its own thread; returns what they raised."""
    errors, start = [], threading.Barrier(len(workers))

    def guarded(worker):
        try:
            start.wait()  # all at once, not one after the other
            worker()
        except BaseException as error:  # noqa: BLE001 (reported by the test)
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_four_threads_switching_one_model_leave_the_base_exact(dtype, tight_switching):
    model = _model(dtype)
    base = snapshot(model)
    adapters = _adapters(model, 5)
    bank = AdapterBank(model, {str(i): a for i, a in enumerate(adapters)})

    def worker(seed: int):
        def run():
            rng = random.Random(seed)
            mine = []  # the handles this thread created
            for _ in range(300):
                op = rng.random()
                if op < 0.45 and len(mine) < 3:
                    alpha = rng.choice([0.5, -2.0, 0.0]) if rng.random() < 0.4 else 1.0
                    check = "always" if rng.random() < 0.1 else True  # re-hash under other threads' adapters
                    mine.append(apply(model, rng.choice(adapters), alpha=alpha, check_base=check))
                elif op < 0.9 and mine:
                    mine.pop(rng.randrange(len(mine))).remove()  # any order
                elif op < 0.95:
                    bank.activate(rng.sample(list(bank.adapters), 2), alpha=[1.0, rng.choice([0.5, 1.0])])
                else:
                    bank.deactivate()
            while mine:
                mine.pop(rng.randrange(len(mine))).remove()

        return run

    errors = _run([worker(seed) for seed in range(4)])
    assert errors == []
    bank.deactivate()
    assert applied(model) == []
    assert _differing(base, model) == []


def test_two_models_sharing_adapters_in_two_threads(tight_switching):
    """Each apply's own model and alpha are written, though another thread applies the same adapters."""
    models = [_model(seed=0), _model(seed=1)]  # two different bases (say, two fine-tuned variants) ...
    adapters = _adapters(models[0], 2)  # ... sharing unverified adapters
    alphas = [1.0, 0.5, -1.5]
    bases, expected = [snapshot(model) for model in models], {}  # computed before any thread runs
    for m, seed in enumerate((0, 1)):
        reference = _model(seed=seed)
        for i, adapter in enumerate(adapters):
            for alpha in alphas:
                with apply(reference, adapter, alpha=alpha, check_base=False):
                    expected[m, i, alpha] = snapshot(reference)

    together = threading.Barrier(len(models))
    order = random.Random(0)
    picks = [order.randrange(len(adapters)) for _ in range(500)]  # the same adapter in both threads at once

    def worker(m: int):
        def run():
            rng = random.Random(m)
            try:
                for i in picks:
                    alpha = rng.choice(alphas)
                    together.wait()
                    with apply(models[m], adapters[i], alpha=alpha, check_base=False):
                        assert _differing(expected[m, i, alpha], models[m]) == [], (i, alpha)
                    assert _differing(bases[m], models[m]) == []
            except BaseException:
                together.abort()  # the other thread stops at the barrier instead of waiting forever
                raise

        return run

    errors = _run([worker(m) for m in range(len(models))])
    assert errors == []
    assert all(_differing(base, model) == [] for base, model in zip(bases, models))
