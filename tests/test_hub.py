"""SparseAdapter.save_pretrained / from_pretrained / push_to_hub: the Hub-style folder (shira_hooks/format/hub.py)."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import shira_hooks
from shira_hooks import ShiraError, SparseAdapter
from shira_hooks.format import hub as _hub

from conftest import make_mlp, mlp_batches, mlp_steps

FILES = ["README.md", "shira_adapter.safetensors", "shira_config.json"]


def trained_adapter() -> SparseAdapter:
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.05, "rand", seed=3)
    mlp_steps(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), mlp_batches(2))
    adapter = shira.extract()
    shira.detach()
    return adapter


def assert_same_deltas(a: SparseAdapter, b: SparseAdapter, values_dtype=torch.float32) -> None:
    assert list(a.deltas) == list(b.deltas)
    for name, delta in a.deltas.items():
        other = b.deltas[name]
        assert (delta.shape, delta.dtype, delta.fingerprint) == (other.shape, other.dtype, other.fingerprint)
        assert torch.equal(delta.indices, other.indices)
        assert other.values.dtype == values_dtype
        assert torch.equal(delta.values.to(values_dtype), other.values)


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_round_trip_with_config_and_metadata(tmp_path):
    adapter = trained_adapter()
    folder = tmp_path / "paint"
    assert adapter.save_pretrained(folder, base_model_name_or_path="org/base", revision="v1") == folder
    assert listing(tmp_path) == ["paint"]  # no staging folder left beside it
    assert listing(folder) == FILES
    config = json.loads((folder / "shira_config.json").read_text())
    assert config == {
        "format": "shira_hooks.adapter_folder",
        "format_version": 1,
        "base_model_name_or_path": "org/base",
        "revision": "v1",
        "target_weights": ["layers.0.weight", "layers.1.weight", "layers.2.weight"],
        "num_entries": 38 + 77 + 10,
        "mask": "rand",
        "sparsity": 0.05,
        "seed": 3,
        "block": 1,
        "values_dtype": "float32",
        "license": None,
        "created_by": f"shira_hooks {shira_hooks.__version__}",
    }
    loaded = SparseAdapter.from_pretrained(folder)
    assert_same_deltas(adapter, loaded)
    assert loaded.metadata == {**adapter.metadata, "base_model_name_or_path": "org/base", "revision": "v1"}
    assert "base_model_name_or_path" not in adapter.metadata  # the caller's adapter is not changed
    # the file in the folder is an ordinary adapter file, tagged with the base model
    assert SparseAdapter.load(folder / "shira_adapter.safetensors").metadata == loaded.metadata
    # saving it again without arguments keeps the base model; an argument replaces both entries
    loaded.save_pretrained(tmp_path / "again")
    assert SparseAdapter.from_pretrained(tmp_path / "again").metadata["revision"] == "v1"
    loaded.save_pretrained(tmp_path / "other", base_model_name_or_path=Path("/models/base"))
    other = json.loads((tmp_path / "other" / "shira_config.json").read_text())
    assert (other["base_model_name_or_path"], other["revision"]) == ("/models/base", None)
    assert "revision" not in SparseAdapter.from_pretrained(tmp_path / "other").metadata


def test_unknown_base_and_bfloat16_values(tmp_path):
    adapter = trained_adapter()
    adapter.save_pretrained(tmp_path / "a", dtype=torch.bfloat16)
    config = json.loads((tmp_path / "a" / "shira_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"], config["values_dtype"]) == (None, None, "bfloat16")
    loaded = SparseAdapter.from_pretrained(tmp_path / "a")
    assert_same_deltas(adapter, loaded, values_dtype=torch.bfloat16)
    assert loaded.metadata == adapter.metadata
    card = (tmp_path / "a" / "README.md").read_text()
    assert "for its base model (not recorded)" in card and "base_model:" not in card
    assert 'AutoModelForCausalLM.from_pretrained("<base model>")' in card


def test_fused_adapter_has_no_sparsity_or_seed(tmp_path):
    first, second = trained_adapter(), trained_adapter()
    fused = shira_hooks.fuse([first, second])
    fused.save_pretrained(tmp_path / "f")
    config = json.loads((tmp_path / "f" / "shira_config.json").read_text())
    assert (config["mask"], config["sparsity"], config["seed"]) == ("fused", None, None)
    assert "Mask settings: mask `fused`. Values are stored as float32." in (tmp_path / "f" / "README.md").read_text()


def test_model_card(tmp_path):
    adapter = trained_adapter()
    adapter.save_pretrained(tmp_path / "a", base_model_name_or_path="org/base", revision="v1")
    card = (tmp_path / "a" / "README.md").read_text()
    assert card.startswith(
        '---\nlibrary_name: shira_hooks\ntags:\n- shira\n- sparse-adapter\nbase_model: "org/base"\n---\n'
    )
    assert "A SHiRA (Sparse High Rank Adapter) for `org/base` (revision `v1`)" in card
    assert "of 3 weights (`layers`): 125 entries of 2,496 (5.01%)" in card
    assert "| `layers.0.weight` | 48 x 16 | 38 | 4.95% |" in card
    assert "| `layers.1.weight` | 32 x 48 | 77 | 5.01% |" in card
    assert "| `layers.2.weight` | 6 x 32 | 10 | 5.21% |" in card
    assert "Mask settings: mask `rand`, sparsity `0.05`, seed `3`." in card
    assert 'model = AutoModelForCausalLM.from_pretrained("org/base", revision="v1")' in card
    assert 'adapter = shira_hooks.SparseAdapter.from_pretrained("path/to/this/folder")' in card
    assert "applied = shira_hooks.apply(model, adapter)" in card
    assert (
        'adapter.to_peft("peft_folder")' in card
        and "`python -m shira_hooks convert --to-peft path/to/this/folder -o peft_folder`" in card
    )
    assert 'peft.PeftModel.from_pretrained(model, "peft_folder")' in card


def test_model_card_names_a_local_base_in_the_text_only(tmp_path):
    """A local path is named in the text, never as the Hub's base_model (the Hub rejects it)."""
    adapter = trained_adapter()
    adapter.save_pretrained(tmp_path / "b", base_model_name_or_path="/models/base")
    card = (tmp_path / "b" / "README.md").read_text()
    assert "base_model:" not in card and "for `/models/base`, written by" in card


def test_model_card_license_and_format_version(tmp_path):
    adapter = trained_adapter()
    adapter.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert (
        "license:" not in card.split("\n---\n")[0]
        and "License: not recorded (pass `license=` to `save_pretrained`" in card
    )
    assert "shira_hooks adapter format version 1)" in card
    adapter.save_pretrained(tmp_path / "a", license="llama3.1")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "\nlicense: llama3.1\n---\n" in card and "License: `llama3.1`." in card
    assert json.loads((tmp_path / "a" / "shira_config.json").read_text())["license"] == "llama3.1"
    loaded = SparseAdapter.from_pretrained(tmp_path / "a")
    assert loaded.metadata["license"] == "llama3.1"
    loaded.save_pretrained(tmp_path / "b")  # kept by a re-save
    assert "\nlicense: llama3.1\n" in (tmp_path / "b" / "README.md").read_text()
    with pytest.raises(ShiraError, match=r"license='MIT License' is not a Hub license id"):
        adapter.save_pretrained(tmp_path / "c", license="MIT License")
    assert not (tmp_path / "c").exists()

    # a block adapter is a version-2 file, and its card says so
    model = make_mlp()
    shira = shira_hooks.attach(model, 0.25, "rand", seed=3, block=16, target_modules=["layers.0", "layers.2"])
    block = shira.extract()
    shira.detach()
    block.save_pretrained(tmp_path / "d")
    card = (tmp_path / "d" / "README.md").read_text()
    assert "shira_hooks adapter format version 2)" in card and "aligned runs of B entries" in card


def test_an_existing_folder_is_replaced_whole(tmp_path):
    first, second = trained_adapter(), shira_hooks.fuse([trained_adapter()], weights=[0.5])
    folder = tmp_path / "a"
    first.save_pretrained(folder, base_model_name_or_path="org/base")
    (folder / "README.md").unlink()  # a partial folder of ours is replaced as well
    os.chmod(folder, 0o750)
    second.save_pretrained(folder)
    assert listing(tmp_path) == ["a"] and listing(folder) == FILES
    assert oct(os.stat(folder).st_mode & 0o777) == oct(0o750)  # the old folder's permissions are kept
    loaded = SparseAdapter.from_pretrained(folder)
    assert_same_deltas(second, loaded)
    assert loaded.metadata == second.metadata  # the old folder's base model is not carried over


def test_a_new_folder_gets_the_permissions_mkdir_gives(tmp_path):
    (tmp_path / "reference").mkdir()
    trained_adapter().save_pretrained(tmp_path / "deep" / "a")
    assert os.stat(tmp_path / "deep" / "a").st_mode == os.stat(tmp_path / "reference").st_mode
    assert listing(tmp_path / "deep") == ["a"]


@pytest.mark.parametrize("failing", ["README.md", "rename"])
def test_a_failed_write_leaves_the_old_folder(tmp_path, monkeypatch, failing):
    adapter = trained_adapter()
    folder = tmp_path / "a"
    adapter.save_pretrained(folder, base_model_name_or_path="org/old")
    before = {name: (folder / name).read_bytes() for name in FILES}
    if failing == "README.md":
        real = _hub.atomic_write

        def atomic_write(path, payload):
            if Path(path).name == failing:
                raise OSError(28, "No space left on device")
            return real(path, payload)

        monkeypatch.setattr(_hub, "atomic_write", atomic_write)
    else:
        real = os.rename

        def rename(source, destination):
            if Path(source).name.endswith(".tmp"):  # the staging folder, renamed into place
                raise OSError(28, "No space left on device")
            return real(source, destination)

        monkeypatch.setattr(_hub.os, "rename", rename)
    with pytest.raises(OSError, match="No space left on device"):
        adapter.save_pretrained(folder, base_model_name_or_path="org/new")
    assert listing(tmp_path) == ["a"]  # nothing staged or moved aside is left
    assert {name: (folder / name).read_bytes() for name in FILES} == before


@pytest.mark.skipif(os.name == "nt", reason="kills a process with SIGKILL")
def test_the_next_save_pretrained_deletes_the_staging_folders_of_killed_saves(tmp_path):
    from test_adapter import killed_save

    adapter = trained_adapter()
    source = adapter.save(tmp_path / "source.safetensors")
    folder = tmp_path / "out" / "paint"
    adapter.save_pretrained(folder)
    killed_save(source, "save_pretrained", folder)
    stale = sorted(p.name for p in folder.parent.iterdir() if p.name != "paint")
    assert len(stale) == 1 and all(name.startswith(".paint.") and name.endswith(".tmp") for name in stale)
    assert listing(folder) == FILES  # the old folder is intact
    adapter.save_pretrained(folder, dtype=torch.bfloat16)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["paint"]
    assert SparseAdapter.from_pretrained(folder).deltas[next(iter(adapter.deltas))].values.dtype == torch.bfloat16


def test_errors_before_anything_is_written(tmp_path):
    adapter = trained_adapter()
    target = tmp_path / "new" / "a"
    with pytest.raises(ShiraError, match=r"cannot store adapter values as torch.int32; use torch.float32"):
        adapter.save_pretrained(target, dtype=torch.int32)
    with pytest.raises(ShiraError, match=r"base_model_name_or_path='' is empty; pass the base model's Hub id or path"):
        adapter.save_pretrained(target, base_model_name_or_path="")
    with pytest.raises(
        ShiraError, match=r"base_model_name_or_path=3 is a int; pass the base model's Hub id or path as a str, or None"
    ):
        adapter.save_pretrained(target, base_model_name_or_path=3)
    with pytest.raises(
        ShiraError, match=r"revision='v1' given without base_model_name_or_path; pass the base model's id as well"
    ):
        adapter.save_pretrained(target, revision="v1")
    with pytest.raises(ShiraError, match=r"revision=1 is a int; pass a branch, tag or commit as a str, or None"):
        adapter.save_pretrained(target, base_model_name_or_path="org/base", revision=1)
    assert listing(tmp_path) == []

    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ShiraError, match=r"file: exists and is not a folder; save_pretrained writes a folder there"):
        adapter.save_pretrained(tmp_path / "file")
    (tmp_path / "outputs").mkdir()
    for name in ("checkpoint-3", ".git", "shira_config.json"):
        (tmp_path / "outputs" / name).mkdir()
    with pytest.raises(
        ShiraError,
        match=r"outputs: holds 2 entries save_pretrained did not write \(.git, checkpoint-3\); the folder is replaced as a "
        r"whole, so they would be lost. Save into a new folder \(e.g. .*outputs/shira_adapter\), or move them away",
    ):
        adapter.save_pretrained(tmp_path / "outputs")
    assert listing(tmp_path) == ["file", "outputs"] and listing(tmp_path / "outputs") == [
        ".git",
        "checkpoint-3",
        "shira_config.json",
    ]


def test_a_symlinked_folder_is_written_through(tmp_path):
    adapter = trained_adapter()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    adapter.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and listing(tmp_path / "real") == FILES
    assert_same_deltas(adapter, SparseAdapter.from_pretrained(tmp_path / "link"))


def write_folder(tmp_path) -> Path:
    folder = tmp_path / "a"
    trained_adapter().save_pretrained(folder, base_model_name_or_path="org/base")
    return folder


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "shira_config.json").read_text())
    config.update(changes)
    (folder / "shira_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"format_version": 2},
            r"shira_config.json: unknown format_version 2; this shira_hooks reads version 1. Upgrade shira_hooks",
        ),
        ({"format_version": True}, r"shira_config.json: unknown format_version True; this shira_hooks reads version 1"),
        (
            {"format": "peft"},
            r"shira_config.json: format='peft', expected 'shira_hooks.adapter_folder'; not a shira_hooks adapter folder",
        ),
        (
            {"base_model_name_or_path": ""},
            r"shira_config.json: 'base_model_name_or_path' is '', expected a non-empty string or null; fix it",
        ),
        ({"revision": 5}, r"shira_config.json: 'revision' is 5, expected a string or null"),
        (
            {"target_weights": []},
            r"shira_config.json: 'target_weights' is \[\], expected a non-empty list of parameter names",
        ),
        ({"num_entries": "125"}, r"shira_config.json: 'num_entries' is '125', expected a positive integer"),
        (
            {"num_entries": 124},
            r"a: shira_config.json describes 3 weights and 124 entries, but shira_adapter.safetensors holds 3 weights and 125 entries; the files come from different saves",
        ),
        (
            {"target_weights": ["layers.0.weight"]},
            r"shira_config.json describes 1 weights and 125 entries, but shira_adapter.safetensors holds 3 weights",
        ),
    ],
)
def test_from_pretrained_refuses_a_bad_config(tmp_path, changes, message):
    folder = write_folder(tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ShiraError, match=message):
        SparseAdapter.from_pretrained(folder)


def test_from_pretrained_errors(tmp_path):
    folder = write_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"missing: no such folder"):
        SparseAdapter.from_pretrained(tmp_path / "missing")
    with pytest.raises(
        ShiraError,
        match=r"shira_adapter.safetensors: is a file, not a folder; read a single adapter file with SparseAdapter.load\(",
    ):
        SparseAdapter.from_pretrained(folder / "shira_adapter.safetensors")
    config = json.loads((folder / "shira_config.json").read_text())
    del config["num_entries"]
    (folder / "shira_config.json").write_text(json.dumps(config))
    with pytest.raises(ShiraError, match=r"shira_config.json: 'num_entries' is missing, expected a positive integer"):
        SparseAdapter.from_pretrained(folder)
    (folder / "shira_config.json").write_text("[1, 2]")
    with pytest.raises(ShiraError, match=r"shira_config.json: holds a JSON list, expected an object"):
        SparseAdapter.from_pretrained(folder)
    (folder / "shira_config.json").write_text("{not json")
    with pytest.raises(ShiraError, match=r"shira_config.json: not valid JSON \(Expecting property name"):
        SparseAdapter.from_pretrained(folder)
    (folder / "shira_config.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ShiraError, match=r"shira_config.json: not valid JSON \('utf-8' codec can't decode"):
        SparseAdapter.from_pretrained(folder)
    (folder / "shira_config.json").unlink()
    with pytest.raises(
        ShiraError,
        match=r"a: no shira_config.json, so it is not a folder written by SparseAdapter.save_pretrained \(shira_adapter.safetensors, shira_config.json, README.md\). Read a single",
    ):
        SparseAdapter.from_pretrained(folder)
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(
        ShiraError, match=r"It holds adapter_config.json: a PEFT folder, loaded with peft.PeftModel.from_pretrained"
    ):
        SparseAdapter.from_pretrained(folder)

    other = write_folder(tmp_path / "other")
    (other / "shira_adapter.safetensors").unlink()
    with pytest.raises(
        ShiraError, match=r"a: has shira_config.json but no shira_adapter.safetensors; the folder is incomplete"
    ):
        SparseAdapter.from_pretrained(other)
    (other / "shira_adapter.safetensors").write_bytes(b"12345678garbage")
    with pytest.raises(ShiraError, match=r"shira_adapter.safetensors: not a safetensors file or truncated"):
        SparseAdapter.from_pretrained(other)
    with pytest.raises(ShiraError, match=r"device='nowhere' is not a torch device"):
        SparseAdapter.from_pretrained(write_folder(tmp_path / "third"), device="nowhere")


def test_push_to_hub_uploads_the_folder(tmp_path, monkeypatch):
    calls = []

    class HfApi:  # a stand-in: the tests run offline
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, *, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private, exist_ok))

        def upload_folder(self, *, repo_id, folder_path, commit_message=None):
            config = json.loads((Path(folder_path) / "shira_config.json").read_text())
            calls.append(
                (
                    "upload_folder",
                    repo_id,
                    listing(Path(folder_path)),
                    config["base_model_name_or_path"],
                    commit_message,
                )
            )
            return "commit-info"

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(HfApi=HfApi))
    adapter = trained_adapter()
    assert adapter.push_to_hub("me/paint", base_model_name_or_path="org/base", private=True, token="t") == "commit-info"
    assert calls == [
        ("init", "t"),
        ("create_repo", "me/paint", True, True),
        ("upload_folder", "me/paint", FILES, "org/base", "Upload SHiRA adapter"),
    ]
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    with pytest.raises(
        ImportError, match=r"SparseAdapter.push_to_hub needs huggingface_hub: pip install huggingface_hub"
    ):
        adapter.push_to_hub("me/paint")


def test_folder_io_imports_neither_transformers_nor_huggingface_hub(tmp_path):
    code = (
        "import sys, torch, shira_hooks\n"
        "from shira_hooks import SparseAdapter, SparseDelta\n"
        "delta = SparseDelta((2, 3), torch.float32, torch.tensor([1, 4], dtype=torch.int32), torch.tensor([0.5, -1.0]), '0' * 16)\n"
        f"SparseAdapter({{'w': delta}}).save_pretrained({str(tmp_path / 'a')!r})\n"
        f"print(SparseAdapter.from_pretrained({str(tmp_path / 'a')!r}).num_entries, 'transformers' in sys.modules, 'huggingface_hub' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "2 False False\n"
