"""overlap(): the paper's A1^T A2 statistics, exact against a dense reference and in bounded memory."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shira_hooks import SparseAdapter, SparseDelta, overlap
from shira_hooks.masks import budget, generator_for, rand_mask, struct_mask
from shira_hooks.serve import fusion


def _adapter(shape, indices, seed):
    values = torch.randn(indices.numel(), generator=torch.Generator().manual_seed(seed))
    return SparseAdapter({"w": SparseDelta(tuple(shape), torch.float32, indices, values, "")})


def _dense_stats(a: SparseAdapter, b: SparseAdapter):
    """Density and cosine of A1^T A2 from dense float64 matrices (the weight viewed as (shape[0], -1))."""
    da, db = a.deltas["w"], b.deltas["w"]
    rows = da.shape[0]

    def dense(delta):
        flat = torch.zeros(delta.numel, dtype=torch.float64)
        flat[delta.indices.long()] = delta.values.double()
        return flat.view(rows, -1)

    product = dense(da).T @ dense(db)  # (cols, cols)
    norm = float(da.values.double().norm() * db.values.double().norm())
    return int((product != 0).sum()) / product.numel(), float(product.norm()) / norm


@pytest.mark.parametrize("chunk", [1, 7, 1 << 21])
def test_product_stats_equal_a_dense_reference(monkeypatch, chunk):
    # chunk=1 and 7 split the product into many blocks; 1 << 21 is the default (one block here)
    monkeypatch.setattr(fusion, "_PRODUCT_CHUNK", chunk)
    cases = []
    for seed, (shape, sparsity) in enumerate(
        [((12, 9), 0.2), ((9, 12), 0.5), ((6, 3, 2, 2), 0.3), ((1, 40), 0.1), ((20, 20), 0.05)]
    ):
        numel = int(torch.Size(shape).numel())
        k = budget(numel, sparsity)
        cases.append(
            (shape, rand_mask(numel, k, generator_for(seed, "a")), rand_mask(numel, k, generator_for(seed, "b")))
        )
        cases.append(
            (
                shape,
                struct_mask(shape, k, generator_for(seed, "a")),
                struct_mask(shape, k, generator_for(seed + 1, "a")),
            )
        )
    for number, (shape, left, right) in enumerate(cases):
        a, b = _adapter(shape, left, 2 * number), _adapter(shape, right, 2 * number + 1)
        density, cosine = _dense_stats(a, b)
        got = overlap(a, b).modules["w"]
        assert got.product_density == density, (shape, number)
        assert got.product_cosine == pytest.approx(cosine, rel=1e-12, abs=0), (shape, number)
    # a single shared row pairing every entry: A1^T A2 is the dense outer product of the two rows
    full = torch.arange(5 * 8, 6 * 8, dtype=torch.int32)  # row 5 of an (8, 8) weight
    a, b = _adapter((8, 8), full, 0), _adapter((8, 8), full, 1)
    assert overlap(a, b).modules["w"].product_density == 1.0
    assert overlap(a, b).modules["w"].product_cosine == pytest.approx(1.0, rel=1e-12)


_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from shira_hooks import SparseAdapter, SparseDelta, overlap
    from shira_hooks.masks import budget, generator_for, rand_mask, struct_mask

    def status(field):  # kB for VmRSS / VmHWM, bytes for VmSize
        with open("/proc/self/status") as lines:
            value = next(int(line.split()[1]) for line in lines if line.startswith(field + ":"))
        return value * 1024 if field == "VmSize" else value

    n, kind = 4096, sys.argv[1]
    k = budget(n * n, 0.01)
    adapters = []
    for seed in (0, 3):  # struct seeds 0 and 3 share 2 whole rows: A1^T A2 is fully dense
        g = generator_for(seed, "w")
        indices = struct_mask((n, n), k, g) if kind == "struct" else rand_mask(n * n, k, g)
        values = torch.randn(k, generator=torch.Generator().manual_seed(10 + seed))
        adapters.append(SparseAdapter({"w": SparseDelta((n, n), torch.float32, indices, values, "")}))
    # a regression must fail fast, not take the machine's memory: cap the address space at +3 GB
    resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + (3 << 30), resource.RLIM_INFINITY))
    # The peak is this process's VmHWM, reset to the current RSS first: ru_maxrss would not do, since a
    # child started through vfork inherits its parent's peak (the pytest process, after the Trainer tests).
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = status("VmRSS")
    result = overlap(*adapters).modules["w"]
    peak_mb = (status("VmHWM") - before) / 1024
    resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    def dense(adapter):
        delta = adapter.deltas["w"]
        flat = torch.zeros(n * n, dtype=torch.float64)
        flat[delta.indices.long()] = delta.values.double()
        return flat.view(n, n)

    product = dense(adapters[0]).T @ dense(adapters[1])  # (4096, 4096) float64 reference
    norm = float(adapters[0].deltas["w"].values.double().norm() * adapters[1].deltas["w"].values.double().norm())
    print(json.dumps({
        "peak_mb": peak_mb, "shared": result.shared,
        "density": result.product_density, "cosine": result.product_cosine,
        "expected_density": int((product != 0).sum()) / n**2, "expected_cosine": float(product.norm()) / norm,
    }))
    """
)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads the peak RSS from Linux /proc")
@pytest.mark.parametrize("kind", ["struct", "rand"])
def test_overlap_of_4096_square_adapters_stays_in_bounded_memory(kind):
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, kind], capture_output=True, text=True, env=env, cwd=root, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    # blocks of A1^T A2 take ~100-150 MB here; enumerating the pairs of entries took 460 MB (rand) and 2 GB (struct)
    assert out["peak_mb"] < 300, out
    assert out["density"] == out["expected_density"], out
    assert out["cosine"] == pytest.approx(out["expected_cosine"], rel=1e-12, abs=0), out
    if kind == "struct":  # two shared whole rows make every entry of A1^T A2 nonzero
        assert out["density"] == 1.0
