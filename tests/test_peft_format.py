"""SparseAdapter.to_peft / from_peft against real PEFT SHiRA: loads, equal merges, exact round trips, bad input."""

import dataclasses
import json
import shutil
import subprocess
import sys
import warnings

import peft
import pytest
import torch
from safetensors import safe_open

import shira_hooks
from shira_hooks import ShiraError, SparseAdapter, SparseDelta, digest

from conftest import llama_batches, make_convnet, make_llama

IDS = llama_batches(1, seed=5)[0]["input_ids"]  # (4, 12)
PEFT_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits  # (4, 12, 96)


def _params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def _load_peft(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that the Llama config has no task_type
        return peft.PeftModel.from_pretrained(make_llama(), folder)


def _assert_same(a: SparseAdapter, b: SparseAdapter) -> None:
    assert a.deltas.keys() == b.deltas.keys()
    for name, delta in a.deltas.items():
        other = b.deltas[name]
        assert (other.shape, other.dtype, other.fingerprint) == (delta.shape, delta.dtype, delta.fingerprint), name
        assert other.indices.dtype == torch.int32 and torch.equal(other.indices, delta.indices), name
        assert other.values.dtype == torch.float32 and torch.equal(other.values, delta.values), name


@pytest.fixture(scope="module")
def adapter() -> SparseAdapter:
    """A shira_hooks adapter trained for two AdamW steps on the tiny Llama (2% of every Linear)."""
    model = make_llama()
    shira = shira_hooks.attach(model, 0.02, "rand", seed=0, progress=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in llama_batches(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    shira.detach()
    return shira.extract()


@pytest.fixture(scope="module")
def peft_trained(tmp_path_factory):
    """A PEFT SHiRA model (r=2) trained for three AdamW steps, and the folder save_pretrained wrote."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make_llama(), peft.ShiraConfig(r=2, target_modules=PEFT_TARGETS, random_seed=0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in llama_batches(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    folder = tmp_path_factory.mktemp("peft") / "shira"
    model.save_pretrained(folder)
    return model, folder


# ------------------------------------------------------------------------------------- to_peft
def test_to_peft_loads_in_peft_and_equals_apply_bit_for_bit(adapter, tmp_path):
    assert adapter.to_peft(tmp_path / "out", base_model_name_or_path="tiny-llama") == tmp_path / "out"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    # k = round(2% of m*n) is 20 (32x32) or 41 (32x64, 64x32): r = 1 holds it, since m + n >= 64
    assert (config["peft_type"], config["r"], config["base_model_name_or_path"]) == ("SHIRA", 1, "tiny-llama")
    assert config["target_modules"] == sorted(name.removesuffix(".weight") for name in adapter.deltas)

    # PEFT's layout: r*(m+n) entries, the adapter's first, then -0.0 at the smallest free indices
    name = "model.layers.0.self_attn.q_proj.weight"
    delta = adapter.deltas[name]
    with safe_open(tmp_path / "out" / "adapter_model.safetensors", "pt") as f:
        indices = f.get_tensor(f"base_model.model.{name.removesuffix('.weight')}.shira_indices")
        values = f.get_tensor(f"base_model.model.{name.removesuffix('.weight')}.shira_weight")
    assert indices.dtype == torch.int32 and indices.shape == (2, 64) and values.shape == (64,)
    flat = (indices[0].long() * 32 + indices[1].long()).tolist()
    free = [i for i in range(1024) if i not in set(delta.indices.tolist())][:44]
    assert flat == delta.indices.tolist() + free
    assert (
        torch.equal(values[:20], delta.values)
        and bool(torch.signbit(values[20:]).all())
        and bool((values[20:] == 0).all())
    )

    # A -0.0 base weight at a padded entry keeps its sign through PEFT's merge and forward.
    assert free[0] == 0
    bases = [make_llama(), make_llama()]
    for model in bases:
        model.model.layers[0].self_attn.q_proj.weight.data[0, 0] = -0.0
    peft_model = peft.PeftModel.from_pretrained(bases[0], tmp_path / "out")
    applied = shira_hooks.apply(bases[1], adapter)
    reference = _logits(bases[1])
    assert torch.allclose(_logits(peft_model), reference, rtol=0, atol=1e-5)  # unmerged PEFT forward
    merged = peft_model.merge_and_unload()
    assert torch.allclose(_logits(merged), reference, rtol=0, atol=1e-5)
    expected = _params(bases[1])
    assert all(torch.equal(p, expected[n]) for n, p in _params(merged).items())  # float32: bit for bit
    assert torch.signbit(merged.model.layers[0].self_attn.q_proj.weight[0, 0])
    applied.remove()


def test_to_peft_refuses_what_peft_cannot_hold_and_writes_nothing(adapter, tmp_path):
    out = tmp_path / "out"
    conv = SparseDelta((12, 8, 3), torch.float32, torch.tensor([0, 5], dtype=torch.int32), torch.ones(2), "")
    with pytest.raises(
        ShiraError,
        match=r"PEFT SHiRA adapts only the weights of nn.Linear modules, and 1 of the adapter's 1 weights are not: 'conv1d.weight' \(shape \[12, 8, 3\]\)",
    ):
        SparseAdapter({"conv1d.weight": conv}).to_peft(out)
    embed = SparseDelta((20, 8), torch.float32, torch.tensor([0, 5], dtype=torch.int32), torch.ones(2), "")
    with pytest.raises(
        ShiraError, match=r"1 of the adapter's 1 weights are not: 'embed.weight' \(a Embedding in the base\)"
    ):
        SparseAdapter({"embed.weight": embed}).to_peft(out, base=make_convnet())
    with pytest.raises(ShiraError, match=r"'embed.bias' \(not a module's weight\)"):
        SparseAdapter({"embed.bias": embed}).to_peft(out)
    # a full 32x64 weight needs r = ceil(2048 / 96) = 22, and 22 * 96 > 2048 entries
    full = SparseDelta((32, 64), torch.float32, torch.arange(2048, dtype=torch.int32), torch.ones(2048), "")
    with pytest.raises(
        ShiraError, match=r"'down.weight' \(32x64\) cannot be exported: .* needs r=22, i.e. 2112 > 2048 entries here"
    ):
        SparseAdapter({"down.weight": full}).to_peft(out)
    with pytest.raises(ShiraError, match=r"the base's values at the adapter's entries do not match its fingerprint"):
        adapter.to_peft(out, base=make_llama(seed=1))
    assert not out.exists()


def _convnet_adapter() -> SparseAdapter:
    """Deltas on every weight of the conv net: an embedding, a Conv1d, a Conv2d and the Linear head."""
    model = make_convnet()
    deltas = {}
    for name, param in model.named_parameters():
        if name.endswith(".weight"):
            indices = torch.arange(0, param.numel(), 7, dtype=torch.int32)
            deltas[name] = SparseDelta(
                tuple(param.shape),
                param.dtype,
                indices,
                torch.full((indices.numel(),), 0.01),
                digest(param.detach().reshape(-1)[indices.long()]),
            )
    return SparseAdapter(deltas, {"mask": "rand"})


@pytest.mark.parametrize("with_base", [False, True], ids=["no-base", "base"])
def test_to_peft_names_every_weight_it_cannot_export_and_a_filter_that_works(tmp_path, with_base):
    """A UNet-like adapter: the error names all the non-Linear weights at once, and its one-line filter exports the rest."""
    adapter, base = _convnet_adapter(), make_convnet() if with_base else None
    with pytest.raises(ShiraError) as error:
        adapter.to_peft(tmp_path / "out", base=base)
    message = str(error.value)
    refused = ["embed.weight", "conv1d.weight", "conv2d.weight"] if with_base else ["conv1d.weight", "conv2d.weight"]
    assert f"{len(refused)} of the adapter's 4 weights are not: " in message
    assert all(f"'{name}'" in message for name in refused) and "'head.weight'" not in message
    snippet = message.split("Export the others with ")[1]
    assert snippet.endswith(".to_peft(...)")
    kept = eval(
        snippet.removesuffix(".to_peft(...)"),
        {"SparseAdapter": SparseAdapter, "adapter": adapter, "base": base, "torch": torch},
    )
    kept.to_peft(tmp_path / "out", base=base)  # the filter leaves out exactly what was refused
    assert (
        sorted(SparseAdapter.from_peft(tmp_path / "out").deltas) == ["head.weight"]
        if with_base
        else ["embed.weight", "head.weight"]
    )


def test_to_peft_names_ten_refused_weights_and_counts_the_rest(tmp_path):
    conv = SparseDelta((4, 2, 3), torch.float32, torch.tensor([0, 5], dtype=torch.int32), torch.ones(2), "")
    adapter = SparseAdapter({f"down.{i}.conv.weight": conv for i in range(33)})
    with pytest.raises(
        ShiraError,
        match=r"33 of the adapter's 33 weights are not: 'down.0.conv.weight' .*'down.9.conv.weight' \(shape \[4, 2, 3\]\) and 23 more\.",
    ):
        adapter.to_peft(tmp_path / "out")


def _rewrite(folder, header=None, tensors=None):
    """Rewrite a to_peft folder's adapter_model.safetensors with header entries and tensors changed."""
    from safetensors.torch import save_file

    path = folder / "adapter_model.safetensors"
    with safe_open(str(path), "pt") as f:
        old_header, old_tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    save_file({**old_tensors, **(tensors or {})}, path, metadata={**old_header, **(header or {})})


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (
            lambda m: {"shira_hooks.metadata": "[1, 2]"},
            r"header entry 'shira_hooks.metadata' is a JSON list, expected an object",
        ),
        (
            lambda m: {"shira_hooks.modules": json.dumps({n: {**i, "entries": 1.5} for n, i in m.items()})},
            r"weight 'model.layers.0.self_attn.q_proj.weight': entries=1.5 is not an int in \[1, 64\]",
        ),
        (
            lambda m: {"shira_hooks.modules": json.dumps({n: {**i, "shape": ["a", "b"]} for n, i in m.items()})},
            r"shape \['a', 'b'\] is not two positive ints",
        ),
        (
            lambda m: {"shira_hooks.modules": json.dumps({n: {**i, "dtype": 3} for n, i in m.items()})},
            r"unknown dtype 3",
        ),
        (lambda m: {"shira_hooks.modules": json.dumps(dict.fromkeys(m, "x"))}, r"weight '.*': 'x' is not an object"),
        (
            lambda m: {"shira_hooks.modules": json.dumps([1])},
            r"header entry 'shira_hooks.modules' is a JSON list, expected an object",
        ),
    ],
    ids=["metadata-list", "entries-float", "shape-strings", "dtype-int", "module-not-object", "modules-list"],
)
def test_from_peft_refuses_malformed_headers_with_a_shira_error(adapter, tmp_path, edit, pattern):
    adapter.to_peft(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        modules = json.loads(f.metadata()["shira_hooks.modules"])
    _rewrite(tmp_path / "out", header=edit(modules))
    with pytest.raises(ShiraError, match=pattern):
        SparseAdapter.from_peft(tmp_path / "out")


def test_from_peft_refuses_empty_modules_and_negative_indices_with_what_is_wrong(adapter, tmp_path):
    adapter.to_peft(tmp_path / "out")
    with safe_open(str(tmp_path / "out" / "adapter_model.safetensors"), "pt") as f:
        indices = f.get_tensor(f"{Q}.shira_indices")
    _rewrite(
        tmp_path / "out",
        tensors={f"{Q}.shira_indices": torch.zeros(2, 0, dtype=torch.int32), f"{Q}.shira_weight": torch.zeros(0)},
    )
    with pytest.raises(
        ShiraError, match=r"module 'model.layers.0.self_attn.q_proj': K=0 entries; PEFT SHiRA keeps r\*\(m\+n\) >= 1"
    ):
        SparseAdapter.from_peft(tmp_path / "out")
    adapter.to_peft(tmp_path / "out")
    negative = indices.clone()
    negative[1, 3] = -2  # a column; the largest row and column are still in range
    _rewrite(tmp_path / "out", tensors={f"{Q}.shira_indices": negative})
    with pytest.raises(
        ShiraError, match=r"module 'model.layers.0.self_attn.q_proj': negative indices \(smallest row 0, column -2\)"
    ):
        SparseAdapter.from_peft(tmp_path / "out")


def test_convert_from_peft_prints_no_warnings(adapter, tmp_path):
    adapter.to_peft(tmp_path / "peft")
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "always",
            "-m",
            "shira_hooks",
            "convert",
            "--from-peft",
            str(tmp_path / "peft"),
            "-o",
            str(tmp_path / "a.safetensors"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and done.stderr == "", (
        done.stderr
    )  # torch's "Sparse invariant checks are implicitly disabled" used to show
    _assert_same(adapter, SparseAdapter.load(tmp_path / "a.safetensors"))


# ----------------------------------------------------------------------------------- from_peft
def test_every_format_is_read_through_one_dispatch(adapter, tmp_path):
    """SparseAdapter.load, the path arguments (apply, AdapterBank) and the CLI read a file, a save_pretrained
    folder and a PEFT folder alike (shira_hooks/format/formats.py)."""
    sources = {
        "file": adapter.save(tmp_path / "a.safetensors"),
        "folder": adapter.save_pretrained(tmp_path / "hub"),
        "peft": adapter.to_peft(tmp_path / "peft"),
    }
    for kind, path in sources.items():
        _assert_same(adapter, SparseAdapter.load(path))
        model = make_llama()
        base = _params(model)
        with shira_hooks.AdapterBank(model, {kind: path}, pack=False) as bank:
            bank.activate(kind)
            with shira_hooks.apply(make_llama(), path) as applied:  # a path: read as load reads it
                assert applied.adapter.num_entries == adapter.num_entries
        assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    with pytest.raises(FileNotFoundError, match="missing: no such adapter file or folder"):
        SparseAdapter.load(tmp_path / "missing")


def test_to_peft_from_peft_round_trip_is_exact(adapter, tmp_path):
    as_bf16 = SparseAdapter(
        {n: dataclasses.replace(d, dtype=torch.bfloat16) for n, d in adapter.deltas.items()}, adapter.metadata
    )
    for original in (adapter, as_bf16):
        original.to_peft(tmp_path / "out")
        back = SparseAdapter.from_peft(tmp_path / "out")
        _assert_same(original, back)
        assert back.metadata == adapter.metadata
    _assert_same(adapter, SparseAdapter.from_peft(adapter.to_peft(tmp_path / "out"), base=make_llama()))
    with pytest.raises(
        ShiraError,
        match=r"module 'model.layers.0.mlp.down_proj': the base's values .* do not match the recorded fingerprint",
    ):
        SparseAdapter.from_peft(tmp_path / "out", base=make_llama(seed=1))


def test_from_peft_of_a_trained_peft_model_equals_its_merge(peft_trained):
    model, folder = peft_trained
    from_folder = SparseAdapter.from_peft(folder, base=make_llama())
    layers = {
        f"model.layers.{i}.{part}.weight": shape
        for i in range(2)
        for part, shape in [("self_attn.q_proj", (32, 32)), ("self_attn.v_proj", (16, 32)), ("mlp.down_proj", (32, 64))]
    }
    assert {n: d.shape for n, d in from_folder.deltas.items()} == layers
    assert {n: d.indices.numel() for n, d in from_folder.deltas.items()} == {n: 2 * sum(s) for n, s in layers.items()}
    base = _params(make_llama())
    assert all(d.fingerprint == digest(base[n].reshape(-1)[d.indices.long()]) for n, d in from_folder.deltas.items())
    assert from_folder.metadata["created_by"] == "PEFT ShiraConfig r=2, read by shira_hooks.from_peft"

    merged = _load_peft(folder).merge_and_unload()
    target = make_llama()
    applied = shira_hooks.apply(target, from_folder)
    assert torch.allclose(_logits(target), _logits(merged), rtol=0, atol=1e-5)
    expected = _params(merged)
    assert all(torch.equal(p, expected[n]) for n, p in _params(target).items())  # float32: bit for bit
    applied.remove()

    _assert_same(from_folder, SparseAdapter.from_peft(model))  # the live PeftModel
    # Without base: shapes from K = r*(m+n) and the largest row and column, no fingerprints, float32.
    no_base = SparseAdapter.from_peft(folder)
    _assert_same(
        SparseAdapter({n: dataclasses.replace(d, fingerprint="") for n, d in from_folder.deltas.items()}), no_base
    )


def test_from_peft_asks_for_base_when_the_shape_is_not_fixed(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(make_llama(), peft.ShiraConfig(r=1, target_modules=["q_proj"], random_seed=0))
    for module in (model.base_model.model.model.layers[i].self_attn.q_proj for i in range(2)):
        flat = torch.arange(64)  # rows 0 and 1 only: m + n = 64, yet 2 rows + 32 columns = 34
        module.shira_indices["default"] = torch.stack([flat // 32, flat % 32]).int()
    model.save_pretrained(tmp_path / "out")
    with pytest.raises(
        ShiraError,
        match=r"module 'model.layers.0.self_attn.q_proj': the folder does not record .* pass base=<the base model>",
    ):
        SparseAdapter.from_peft(tmp_path / "out")
    adapter = SparseAdapter.from_peft(tmp_path / "out", base=make_llama())
    assert adapter.deltas["model.layers.0.self_attn.q_proj.weight"].indices.tolist() == list(range(64))


def test_from_peft_rejects_what_is_not_a_peft_shira_adapter(peft_trained, tmp_path):
    model, folder = peft_trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = peft.get_peft_model(make_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(ShiraError, match=r"adapter_config.json: peft_type 'LORA', not 'SHIRA'"):
        SparseAdapter.from_peft(tmp_path / "lora")
    with pytest.raises(ShiraError, match=r"adapter 'default' is a LORA adapter, not SHIRA"):
        SparseAdapter.from_peft(lora)

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(folder / "adapter_config.json", config_only)
    with pytest.raises(
        ShiraError, match=r"no adapter_model.safetensors \(found \['adapter_config.json'\]\); pass the folder"
    ):
        SparseAdapter.from_peft(config_only)
    (config_only / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ShiraError, match=r"it is a pickle, .* save_pretrained\(folder, safe_serialization=True\)"):
        SparseAdapter.from_peft(config_only)
    weights_only = tmp_path / "weights_only"
    weights_only.mkdir()
    shutil.copy(folder / "adapter_model.safetensors", weights_only)
    with pytest.raises(
        ShiraError, match=r"not a PEFT adapter folder, no adapter_config.json \(found \['adapter_model.safetensors'\]\)"
    ):
        SparseAdapter.from_peft(weights_only)
    with pytest.raises(ShiraError, match=r"adapter_model.safetensors is a file; pass the folder"):
        SparseAdapter.from_peft(folder / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError):
        SparseAdapter.from_peft(tmp_path / "nowhere")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        heads = peft.get_peft_model(
            make_llama(), peft.ShiraConfig(r=1, target_modules=["q_proj"], modules_to_save=["lm_head"])
        )
    with pytest.raises(ShiraError, match=r"modules_to_save=\['lm_head'\] .* which a sparse adapter cannot hold"):
        SparseAdapter.from_peft(heads)
    heads.save_pretrained(tmp_path / "heads")
    with pytest.raises(ShiraError, match=r"modules_to_save=\['lm_head'\] .* which a sparse adapter cannot hold"):
        SparseAdapter.from_peft(tmp_path / "heads")


def test_from_peft_rejects_a_base_that_does_not_fit(peft_trained):
    from transformers import LlamaConfig, LlamaForCausalLM

    model, folder = peft_trained
    wider = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    )
    with pytest.raises(
        ShiraError,
        match=r"module 'model.layers.0.mlp.down_proj' holds 192 entries \(r=2, so m\+n = 96\), but the base's weight has shape \[48, 64\]; pass the base model",
    ):
        SparseAdapter.from_peft(folder, base=wider)
    with pytest.raises(
        ShiraError, match=r"the base model has no module 'model.layers.0.mlp.down_proj'; pass the base model"
    ):
        SparseAdapter.from_peft(folder, base=make_convnet())
    with pytest.raises(ShiraError, match=r"base= is only for a folder"):
        SparseAdapter.from_peft(model, base=make_llama())
    with pytest.raises(ShiraError, match=r"got a LlamaForCausalLM, not a peft.PeftModel"):
        SparseAdapter.from_peft(make_llama())
    merged = _load_peft(folder)
    merged.merge_adapter()
    with pytest.raises(
        ShiraError,
        match=r"module 'model.layers.0.self_attn.q_proj' has adapter 'default' merged .* peft_model.unmerge_adapter\(\) first",
    ):
        SparseAdapter.from_peft(merged)


def test_importing_shira_hooks_does_not_import_peft():
    code = "import sys, shira_hooks; print('peft' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
