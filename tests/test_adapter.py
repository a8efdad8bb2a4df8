"""extract() and the adapter file: exact deltas, round trip, size, atomic writes, and validation."""

import json
import os

import pytest
import torch
from safetensors.torch import save as save_safetensors

import shira_hooks
from shira_hooks import ShiraError, SparseAdapter

from conftest import llama_batches, make_llama, make_mlp, snapshot


def _trained(dtype=torch.float32, mask="rand"):
    model = make_llama(dtype=dtype)
    base = snapshot(model)
    shira = shira_hooks.attach(model, 0.02, mask)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in llama_batches(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, base, shira


def _apply(base: dict, adapter: SparseAdapter) -> dict:
    """base + S by hand (the library's own apply() is tested in its own module)."""
    out = {name: w.clone() for name, w in base.items()}
    for name, delta in adapter.deltas.items():
        flat = out[name].view(-1)
        idx = delta.indices.long()
        flat[idx] = (flat[idx].float() + delta.values.float()).to(flat.dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extract_is_exact(dtype):
    model, base, shira = _trained(dtype)
    adapter = shira.extract()
    assert adapter.num_entries == shira.num_trainable
    rebuilt = _apply(base, adapter)
    for name, param in model.named_parameters():
        if dtype == torch.float32:
            torch.testing.assert_close(rebuilt[name], param.detach(), rtol=0, atol=1e-6)
        else:  # bf16: W_orig + S rounds back to the trained bf16 value
            assert torch.equal(rebuilt[name], param.detach()), name
        if name in adapter.deltas:  # exactly equal outside the mask
            outside = torch.ones(param.numel(), dtype=torch.bool)
            outside[adapter.deltas[name].indices.long()] = False
            assert torch.equal(rebuilt[name].view(-1)[outside], param.detach().reshape(-1)[outside])
        delta = adapter.deltas.get(name)
        if delta is not None:
            assert delta.values.dtype == torch.float32 and delta.dtype == dtype
    # the trained model's logits are reproduced from base + adapter
    fresh = make_llama(dtype=dtype)
    fresh.load_state_dict(rebuilt)
    ids = llama_batches(1, seed=9)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    shira.detach()


def test_bf16_one_ulp_updates_survive_in_float32():
    model = make_mlp().to(torch.bfloat16)
    shira = shira_hooks.attach(model, 0.1, "rand")
    weight = model.layers[0].weight
    idx = shira.masks["layers.0.weight"].long()
    before = weight.detach().reshape(-1)[idx].clone()
    with torch.no_grad():  # move every masked entry by the smallest bf16 step
        bumped = (before.view(torch.int16) + 1).view(torch.bfloat16)
        weight.view(-1)[idx] = bumped
    values = shira.extract().deltas["layers.0.weight"].values
    assert values.dtype == torch.float32 and bool((values != 0).all())
    assert torch.equal(values, bumped.float() - before.float())
    shira.detach()


def test_save_load_round_trip_and_size(tmp_path):
    model, base, shira = _trained()
    adapter = shira.extract()
    path = adapter.save(tmp_path / "sub" / "adapter.safetensors")
    loaded = SparseAdapter.load(path)
    assert loaded.deltas.keys() == adapter.deltas.keys()
    for name, delta in adapter.deltas.items():
        other = loaded.deltas[name]
        assert torch.equal(other.indices, delta.indices) and torch.equal(other.values, delta.values)
        assert (other.shape, other.dtype, other.fingerprint) == (delta.shape, delta.dtype, delta.fingerprint)
    assert loaded.metadata["mask"] == "rand" and loaded.metadata["sparsity"] == "0.02"
    raw = path.read_bytes()
    header = 8 + int.from_bytes(raw[:8], "little")
    assert (len(raw) - header) == 8 * adapter.num_entries  # int32 index + float32 value per entry
    half = SparseAdapter.load(adapter.save(tmp_path / "bf16.safetensors", dtype=torch.bfloat16))
    raw = (tmp_path / "bf16.safetensors").read_bytes()
    assert len(raw) - 8 - int.from_bytes(raw[:8], "little") == 6 * adapter.num_entries
    for name, delta in adapter.deltas.items():
        torch.testing.assert_close(half.deltas[name].values.float(), delta.values, rtol=1e-2, atol=1e-6)
    shira.detach()


def test_fingerprint_is_the_documented_digest():
    import hashlib

    model = make_mlp()
    shira = shira_hooks.attach(model, 0.1, "wm")
    delta = shira.extract().deltas["layers.1.weight"]
    values = model.layers[1].weight.detach().reshape(-1)[delta.indices.long()].numpy().astype("<f4").tobytes()
    assert delta.fingerprint == hashlib.blake2b(values, digest_size=8).hexdigest()
    shira.detach()


def test_save_is_atomic(tmp_path, monkeypatch):
    model, _, shira = _trained()
    adapter = shira.extract()
    path = tmp_path / "adapter.safetensors"
    adapter.save(path)
    good = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        adapter.save(path, dtype=torch.bfloat16)
    assert path.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]  # no temp file left
    shira.detach()


KILLED_SAVE = """
import os, signal, sys
import shira_hooks
adapter = shira_hooks.SparseAdapter.load(sys.argv[1])
os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # killed mid-save: the bytes are written, not yet renamed
getattr(adapter, sys.argv[2])(sys.argv[3])
"""


def killed_save(source, method: str, destination) -> None:
    """Run ``SparseAdapter.load(source).<method>(destination)`` in a process that is killed (SIGKILL) mid-save."""
    import signal
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", KILLED_SAVE, str(source), method, str(destination)], capture_output=True, text=True
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]


@pytest.mark.skipif(os.name == "nt", reason="kills a process with SIGKILL")
def test_the_next_save_deletes_the_temporary_files_of_killed_saves_and_nothing_else(tmp_path):
    adapter = SparseAdapter.load(_write(tmp_path, *_valid(), name="source.safetensors"))
    folder = tmp_path / "out"
    path = folder / "adapter.safetensors"
    killed_save(tmp_path / "source.safetensors", "save", path)
    stale = sorted(p.name for p in folder.iterdir())
    assert len(stale) == 1 and all(name.startswith(".adapter.safetensors.") and name.endswith(".tmp") for name in stale)
    from shira_hooks._base.io import _host_tag

    keep = [
        f".adapter.safetensors.{_host_tag()}-{os.getppid()}-abcd1234.tmp",  # a process that still runs
        ".adapter.safetensors.0123abcd-999999-abcd1234.tmp"
        if _host_tag() != "0123abcd"
        else ".adapter.safetensors.0123abce-999999-abcd1234.tmp",
        ".adapter.safetensors.abcd1234.tmp",  # not named by this scheme: not provably ours
        f".other.safetensors.{_host_tag()}-{stale[0].split('-')[1]}-abcd1234.tmp",  # a killed save to another file
    ]
    for name in keep:
        (folder / name).write_bytes(b"x")
    adapter.save(path)
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep + ["adapter.safetensors"])
    assert SparseAdapter.load(path).num_entries == 3


def _write(tmp_path, tensors, metadata, name="bad.safetensors"):
    path = tmp_path / name
    path.write_bytes(save_safetensors(tensors, metadata=metadata))
    return path


def _valid(**changes):
    tensors = {
        "lin.weight.indices": torch.tensor([1, 4, 7], dtype=torch.int32),
        "lin.weight.values": torch.tensor([0.1, -0.2, 0.3]),
    }
    modules = {"lin.weight": {"shape": [3, 4], "dtype": "float32", "fingerprint": "00" * 8}}
    metadata = {"format": "shira_hooks.adapter", "format_version": "1", "modules": json.dumps(modules)}
    tensors.update(changes.pop("tensors", {}))
    for key in changes.pop("drop", []):
        tensors.pop(key)
    metadata.update(changes)
    return tensors, metadata


@pytest.mark.parametrize(
    "tensors_meta, pattern",
    [
        (_valid(format_version="9"), r"bad.safetensors: unknown adapter format_version '9'"),
        (_valid(format="other"), r"bad.safetensors: not a shira_hooks adapter"),
        (_valid(drop=["lin.weight.values"]), r"missing tensor key\(s\) \['lin.weight.values'\]"),
        (
            _valid(tensors={"extra.indices": torch.tensor([0], dtype=torch.int32)}),
            r"unexpected tensor key\(s\) \['extra.indices'\]",
        ),
        (
            _valid(tensors={"lin.weight.indices": torch.tensor([1, 4, 12], dtype=torch.int32)}),
            r"tensor 'lin.weight.indices': indices out of range \[1, 12\]",
        ),
        (
            _valid(tensors={"lin.weight.indices": torch.tensor([4, 1, 7], dtype=torch.int32)}),
            r"tensor 'lin.weight.indices': indices are not sorted",
        ),
        (
            _valid(tensors={"lin.weight.indices": torch.tensor([1, 4, 4], dtype=torch.int32)}),
            r"tensor 'lin.weight.indices': duplicate index 4",
        ),
        (
            _valid(tensors={"lin.weight.values": torch.tensor([0.1, 0.2])}),
            r"tensor 'lin.weight.values': 2 values for 3 indices",
        ),
        (
            _valid(tensors={"lin.weight.values": torch.tensor([0.1, float("nan"), 0.3])}),
            r"tensor 'lin.weight.values': 1 NaN/inf values",
        ),
        (_valid(tensors={"lin.weight.indices": torch.tensor([1.0, 4.0, 7.0])}), r"must be a 1-D int32/int64 tensor"),
    ],
)
def test_load_rejects_bad_files(tmp_path, tensors_meta, pattern):
    path = _write(tmp_path, *tensors_meta)
    with pytest.raises(ShiraError, match=pattern):
        SparseAdapter.load(path)


def test_load_accepts_the_valid_fixture(tmp_path):
    adapter = SparseAdapter.load(_write(tmp_path, *_valid()))
    assert adapter.num_entries == 3 and adapter.deltas["lin.weight"].shape == (3, 4)


def _header(modules, version="2", tensors=None):
    """A one-module adapter file's (tensors, metadata) with the given 'modules' header."""
    tensors = tensors or {"w.indices": torch.tensor([0], dtype=torch.int64), "w.values": torch.tensor([0.5])}
    return tensors, {"format": "shira_hooks.adapter", "format_version": version, "modules": json.dumps(modules)}


_W = {"dtype": "float32", "fingerprint": "00" * 8}


@pytest.mark.parametrize(
    "tensors_meta, pattern",
    [
        # the product overflows int64: it used to be reported as a weight of a negative number of entries
        (
            _header({"w": {**_W, "shape": [2**40, 2**40]}}, "1"),
            r"module 'w': shape \[1099511627776, 1099511627776\] has 1,208,925,819,614,629,174,706,176 entries, more than an int64 index",
        ),
        (
            _header({"w": {**_W, "shape": ["a", "b"]}}, "1"),
            r"module 'w': shape \['a', 'b'\] is not a list of positive ints",
        ),
        (_header({"w": {**_W, "shape": [4, 0]}}, "1"), r"module 'w': shape \[4, 0\] is not a list of positive ints"),
        # "block": true was read as block 1, then reported as a count mismatch
        (
            _header({"w": {**_W, "shape": [1, 16], "block": True}}),
            r"tensor 'w.indices': block=True is not a positive int dividing the row length 16",
        ),
        # a version-1 file with block fields was read as version 2
        (
            _header(
                {"w": {**_W, "shape": [1, 16], "block": 16}},
                "1",
                {"w.indices": torch.tensor([0], dtype=torch.int32), "w.values": torch.ones(16)},
            ),
            r"module 'w': has a 'block' entry, which format_version 1 files do not have",
        ),
        (_header(["w"], "1"), r"metadata entry 'modules' is a JSON list"),
        (
            _header({"w": {**_W, "shape": [1, 16], "dtype": ["float32"]}}, "1"),
            r"module 'w': unknown dtype \['float32'\]",
        ),
    ],
    ids=["overflowing-shape", "string-shape", "zero-dim", "block-true", "v1-with-block", "modules-list", "dtype-list"],
)
def test_load_refuses_malformed_headers_with_what_is_wrong(tmp_path, tensors_meta, pattern):
    path = _write(tmp_path, *tensors_meta)
    with pytest.raises(ShiraError, match=pattern):
        SparseAdapter.load(path)


def _oversized_block_file(tmp_path):
    """A 348-byte version-2 file whose header claims one block of 2**31 entries (16 GB of int64 indices)."""
    return _write(tmp_path, *_header({"w": {**_W, "shape": [1, 2**31], "block": 2**31}}), name="huge.safetensors")


def test_a_header_claiming_2_31_entries_is_refused_before_the_runs_are_expanded(tmp_path, monkeypatch):
    path = _oversized_block_file(tmp_path)
    assert path.stat().st_size < 400

    def expand(blocks, block):  # the old reader got here and allocated 16 GB: fail instead of allocating
        raise AssertionError(f"expanding {blocks.numel()} runs of {block} before checking the value count")

    monkeypatch.setattr(shira_hooks.format.adapter, "expand_blocks", expand)
    with pytest.raises(
        ShiraError,
        match=r"huge.safetensors: tensor 'w.indices': \(1,\) block numbers of 2147483648 entries each need 2,147,483,648 values, the file holds \(1,\)",
    ):
        SparseAdapter.load(path)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the address space size from Linux /proc")
def test_inspect_of_the_oversized_file_under_a_memory_limit_prints_the_error_and_exits_2(tmp_path):
    """The work before refusing is bounded by the file's size: the CLI runs with 1 GB of address space to spare."""
    import subprocess
    import sys

    path = _oversized_block_file(tmp_path)
    code = (
        "import resource, sys\n"
        "from shira_hooks.tools.cli import main\n"  # imports torch: the limit is set above what the process already holds
        "size = next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('VmSize:'))\n"
        "resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, resource.RLIM_INFINITY))\n"
        "sys.exit(main(['inspect', sys.argv[1]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.startswith("python -m shira_hooks inspect: error: ") and "Traceback" not in done.stderr
    assert "block numbers of 2147483648 entries each need 2,147,483,648 values" in done.stderr


def test_load_rejects_non_safetensors_and_truncated(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a tensor file at all")
    with pytest.raises(ShiraError, match="notes.safetensors: not a safetensors file"):
        SparseAdapter.load(text)
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(ShiraError, match="tiny.safetensors: not a safetensors file \\(2 bytes"):
        SparseAdapter.load(tiny)
    good = _write(tmp_path, *_valid(), name="good.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good[:-5])
    with pytest.raises(ShiraError, match="cut.safetensors: truncated or corrupt"):
        SparseAdapter.load(cut)
    cut.write_bytes(good[:20])
    with pytest.raises(ShiraError, match="cut.safetensors: not a safetensors file or truncated"):
        SparseAdapter.load(cut)


def _saved_state(tmp_path):
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.1, "rand", seed=3)
    path = shira.save_state(tmp_path / "state.safetensors")
    return model, shira, path


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_saved_files_get_the_mode_open_would_give(tmp_path, monkeypatch, umask, mode):
    _, shira, _ = _saved_state(tmp_path / "first")
    masks = {name: indices.clone() for name, indices in shira.masks.items()}
    adapter = shira.extract()
    adapter_path, state_path = tmp_path / "adapter.safetensors", tmp_path / "state.safetensors"
    old = os.umask(umask)
    try:
        if os.path.exists("/proc/self/status"):  # Linux reads the umask without setting it process-wide
            monkeypatch.setattr(os, "umask", lambda *_: pytest.fail("os.umask called"))
        adapter.save(adapter_path)
        shira.save_state(state_path)
        new_modes = [oct(os.stat(p).st_mode & 0o777) for p in (adapter_path, state_path)]
        # replacing an existing file keeps its mode, as open(path, "w") does
        os.chmod(adapter_path, 0o600)
        os.chmod(state_path, 0o600)
        adapter.save(adapter_path, dtype=torch.bfloat16)
        shira.save_state(state_path)
        kept_modes = [oct(os.stat(p).st_mode & 0o777) for p in (adapter_path, state_path)]
    finally:
        monkeypatch.undo()
        os.umask(old)
        shira.detach()
    assert new_modes == [oct(mode)] * 2
    assert kept_modes == [oct(0o600)] * 2
    loaded = SparseAdapter.load(adapter_path)
    for name, delta in adapter.deltas.items():
        assert torch.equal(loaded.deltas[name].indices, delta.indices)
        assert torch.equal(loaded.deltas[name].values, delta.values.to(torch.bfloat16))
    with shira_hooks.attach(make_mlp(), 0.1, "rand", seed=99) as fresh:
        fresh.load_state(state_path)
        assert fresh.masks.keys() == masks.keys()
        assert all(torch.equal(fresh.masks[name], masks[name]) for name in masks)


@pytest.mark.skipif(os.name == "nt", reason="folders cannot be fsynced on Windows")
def test_save_syncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    import stat

    adapter = SparseAdapter.load(_write(tmp_path, *_valid(), name="fixture.safetensors"))
    events = []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda src, dst: (events.append("replace"), real_replace(src, dst))[1])
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (
            events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file"),
            real_fsync(fd),
        )[1],
    )
    adapter.save(tmp_path / "out" / "adapter.safetensors")
    assert events == ["fsync file", "replace", "fsync folder"]


def test_load_memory_maps_instead_of_reading_the_file(tmp_path, monkeypatch):
    import builtins
    import io
    import pathlib

    from safetensors.torch import load as load_bytes

    _, _, shira = _trained()
    adapter = shira.extract()
    shira.detach()
    paths = {
        "f32": adapter.save(tmp_path / "adapter.safetensors"),
        "bf16": adapter.save(tmp_path / "adapter_bf16.safetensors", dtype=torch.bfloat16),
    }
    _, handle, state_path = _saved_state(tmp_path)
    masks = {name: indices.clone() for name, indices in handle.masks.items()}
    handle.detach()
    # what the whole-bytes reader gave, as the reference: the same tensors, dtypes and metadata
    expected = {kind: load_bytes(path.read_bytes()) for kind, path in paths.items()}
    guarded = {str(p) for p in [*paths.values(), state_path]}

    def refuse(real):
        def call(file, *args, **kwargs):
            if str(file) in guarded:
                raise AssertionError(f"{file} was read into Python memory")
            return real(file, *args, **kwargs)

        return call

    monkeypatch.setattr(pathlib.Path, "read_bytes", refuse(pathlib.Path.read_bytes))
    monkeypatch.setattr(builtins, "open", refuse(builtins.open))
    monkeypatch.setattr(io, "open", refuse(io.open))
    for kind, path in paths.items():
        for options in ({}, {"device": "cpu"}, {"device": torch.device("cpu")}):
            loaded = SparseAdapter.load(path, **options)
            assert loaded.metadata == adapter.metadata
            assert loaded.deltas.keys() == adapter.deltas.keys()
            for name, delta in loaded.deltas.items():
                for part, tensor in (("indices", delta.indices), ("values", delta.values)):
                    reference = expected[kind][f"{name}.{part}"]
                    assert tensor.device.type == "cpu" and tensor.dtype == reference.dtype
                    assert torch.equal(tensor, reference), (kind, name, part)
                original = adapter.deltas[name]
                assert (delta.shape, delta.dtype, delta.fingerprint) == (
                    original.shape,
                    original.dtype,
                    original.fingerprint,
                )
    with shira_hooks.attach(make_mlp(), 0.1, "rand", seed=99) as fresh:
        fresh.load_state(state_path)
        assert all(torch.equal(fresh.masks[name], masks[name]) for name in masks)
    monkeypatch.undo()
    with pytest.raises(ShiraError, match=r"adapter.safetensors: device='gpu:x' is not a torch device"):
        SparseAdapter.load(paths["f32"], device="gpu:x")
    with pytest.raises(FileNotFoundError):
        SparseAdapter.load(tmp_path / "absent.safetensors")


def test_apply_fuse_and_overlap_take_a_path_or_a_folder(tmp_path):
    """apply(model, "adapter.safetensors") used to raise TypeError: cannot create weak reference to 'str' object."""
    _, base, shira = _trained()
    adapter = shira.extract()
    shira.detach()
    fresh = make_llama()
    with shira_hooks.apply(fresh, adapter):
        trained = snapshot(fresh)  # what applying the object writes
    file = adapter.save(tmp_path / "adapter.safetensors")
    adapter.save_pretrained(tmp_path / "hub")
    adapter.to_peft(tmp_path / "peft")
    for source in (str(file), file, tmp_path / "hub", str(tmp_path / "peft")):
        with shira_hooks.apply(
            fresh, source, check_base=source != str(tmp_path / "peft")
        ):  # PEFT folders have no fingerprints
            assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters())
        assert all(torch.equal(p, base[n]) for n, p in fresh.named_parameters())
    fused = shira_hooks.fuse([str(file), tmp_path / "hub"], weights=[0.5, 0.5])
    assert all(torch.equal(fused.deltas[n].indices, d.indices) for n, d in adapter.deltas.items())
    assert shira_hooks.overlap(file, adapter).shared_fraction == 1.0
    with pytest.raises(
        ShiraError, match=r"apply\(\): got a int, not a SparseAdapter or a path; pass SparseAdapter.load\(path\)"
    ):
        shira_hooks.apply(fresh, 3)
    with pytest.raises(ShiraError, match=r"fuse\(\): got a dict, not a SparseAdapter or a path"):
        shira_hooks.fuse([adapter, adapter.deltas])
    with pytest.raises(FileNotFoundError, match="missing.safetensors: no such adapter file or folder"):
        shira_hooks.apply(fresh, tmp_path / "missing.safetensors")
    assert all(torch.equal(p, base[n]) for n, p in fresh.named_parameters())
