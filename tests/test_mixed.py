"""MixedAdapters: every row equals its adapter applied in place; None rows are the base bit for bit."""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch import nn

import shira_hooks
from shira_hooks import MixedAdapters, ShiraError, digest, masks

from conftest import llama_batches, make_llama, make_mlp, snapshot

pytest.importorskip("transformers")

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_backward_hooks",
)


def random_adapter(
    model: nn.Module, seed: int, sparsity: float = 0.05, scale: float = 0.05, names=None
) -> shira_hooks.SparseAdapter:
    """Random deltas on every Linear weight except the head (or on ``names``), fingerprinted on ``model``."""
    g = torch.Generator().manual_seed(seed)
    deltas = {}
    for name, module in model.named_modules():
        weight_name = f"{name}.weight"
        if (
            not isinstance(module, nn.Linear)
            or (names is None and name == "lm_head")
            or (names is not None and weight_name not in names)
        ):
            continue
        numel = module.weight.numel()
        indices = masks.rand_mask(numel, masks.budget(numel, sparsity), masks.generator_for(seed, weight_name))
        base = module.weight.detach().reshape(-1)[indices.long()]
        deltas[weight_name] = shira_hooks.SparseDelta(
            tuple(module.weight.shape),
            module.weight.dtype,
            indices,
            torch.randn(indices.numel(), generator=g) * scale,
            digest(base),
        )
    return shira_hooks.SparseAdapter(deltas, {"mask": "rand"})


def trained_adapter(model: nn.Module) -> shira_hooks.SparseAdapter:
    """A real run: attach, 3 Adam steps on the model, extract, and the base restored."""
    before = snapshot(model)
    shira = shira_hooks.attach(model, 0.05, "rand", seed=3, progress=False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in llama_batches(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    adapter = shira.extract()
    shira.detach()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(before[name])
    return adapter


@pytest.fixture(scope="module")
def setup():
    model = make_llama(seed=0).eval()
    adapters = {"a": trained_adapter(model), "b": random_adapter(model, 1), "c": random_adapter(model, 2)}
    ids = torch.randint(0, 96, (5, 10), generator=torch.Generator().manual_seed(7))
    return model, adapters, ids


def hook_state(model: nn.Module) -> dict:
    return {
        (name, attr): list(getattr(module, attr).keys())
        for name, module in model.named_modules()
        for attr in HOOK_DICTS
    }


def bits(model: nn.Module) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def same_bits(before: dict, model: nn.Module) -> bool:
    return all(
        torch.equal(before[name].view(torch.int32), p.detach().view(torch.int32))
        for name, p in model.named_parameters()
    )


@torch.no_grad()
def applied_logits(model, adapter, ids, alpha=1.0):
    with shira_hooks.apply(model, adapter, alpha):
        return model(input_ids=ids).logits


def test_each_row_equals_apply_and_none_rows_are_the_base_bit_for_bit(setup):
    model, adapters, ids = setup
    weights, hooks = bits(model), hook_state(model)
    with torch.no_grad():
        base = model(input_ids=ids).logits
    route = ["a", None, "b", "a", "c"]
    alpha = {"b": 0.5}
    with MixedAdapters(model, adapters, alpha=alpha) as mixed:
        assert len(mixed.layers) == 14  # 2 blocks x 7 Linear
        assert hook_state(model) != hooks
        with torch.no_grad(), mixed.route(route):
            logits = model(input_ids=ids).logits
        with torch.no_grad():  # outside the route: the plain model, bit for bit
            assert torch.equal(model(input_ids=ids).logits, base)
    assert hook_state(model) == hooks
    assert same_bits(weights, model)
    expected = {name: applied_logits(model, adapter, ids, alpha.get(name, 1.0)) for name, adapter in adapters.items()}
    for row, name in enumerate(route):
        if name is None:
            assert torch.equal(logits[row], base[row])
        else:
            assert (logits[row] - base[row]).abs().max() > 1e-2  # the adapter does change this row
            torch.testing.assert_close(logits[row], expected[name][row], atol=1e-4, rtol=0)
    assert same_bits(weights, model)


def test_generate_with_a_mixed_route_equals_generate_per_row_with_apply(setup):
    model, adapters, ids = setup
    prompt = ids[:4, :6]
    route = ["c", "a", None, "b"]
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with MixedAdapters(model, adapters) as mixed, torch.no_grad():
        with mixed.route(route):
            out = model.generate(prompt, **options)
        base = model.generate(prompt, **options)
    for row, name in enumerate(route):
        if name is None:
            assert torch.equal(out[row], base[row])
            continue
        with shira_hooks.apply(model, adapters[name]), torch.no_grad():
            single = model.generate(prompt[row : row + 1], **options)
        assert torch.equal(out[row], single[0]), (row, name)
    assert not torch.equal(out, base)


def test_adapters_applied_in_place_act_as_the_new_base(setup):
    model, adapters, ids = setup
    weights = bits(model)
    with MixedAdapters(model, {"a": adapters["a"], "b": adapters["b"]}) as mixed:
        with shira_hooks.apply(model, adapters["c"]), torch.no_grad():
            with mixed.route(["a", None]):
                logits = model(input_ids=ids[:2]).logits
            only_c = model(input_ids=ids[:2]).logits
            with shira_hooks.apply(model, adapters["a"]):
                c_then_a = model(input_ids=ids[:2]).logits
    assert torch.equal(logits[1], only_c[1])
    torch.testing.assert_close(logits[0], c_then_a[0], atol=1e-4, rtol=0)
    assert same_bits(weights, model)


def test_the_route_is_per_thread_and_holds_the_switching_lock(setup):
    model, adapters, ids = setup
    route = ["a", "b"]
    with torch.no_grad():
        base = model(input_ids=ids[:2]).logits
        with MixedAdapters(model, adapters) as mixed, mixed.route(route):
            routed = model(input_ids=ids[:2]).logits
    seen, order = [], []
    started = threading.Event()

    def other_thread():
        started.set()
        with torch.no_grad():
            for _ in range(4):  # while the main thread runs routed forward passes
                seen.append(model(input_ids=ids[:2]).logits)
        handle = shira_hooks.apply(model, adapters["c"])  # waits for the route to end
        order.append("applied")
        handle.remove()

    with MixedAdapters(model, adapters) as mixed:
        with mixed.route(route), torch.no_grad():
            worker = threading.Thread(target=other_thread)
            worker.start()
            started.wait()
            mine = [model(input_ids=ids[:2]).logits for _ in range(4)]
            while len(seen) < 4 and worker.is_alive():
                worker.join(timeout=0.05)
            worker.join(timeout=0.5)
            assert worker.is_alive() and order == []  # its apply is blocked by the active route
            with pytest.raises(ShiraError, match=r"a route is already active \(entered in this thread\)"):
                with mixed.route(route):
                    pass
            order.append("route left")
        worker.join(timeout=30)
    assert order == ["route left", "applied"]
    assert len(seen) == 4 and all(torch.equal(logits, base) for logits in seen)  # the other thread: the base
    assert all(torch.equal(logits, routed) for logits in mine)  # this thread: routed all along


def test_a_route_from_another_thread_while_one_is_active_is_refused(setup):
    model, adapters, _ = setup
    errors = []

    def enter():
        try:
            with mixed.route(["a"]):
                pass
        except ShiraError as error:
            errors.append(str(error))

    with MixedAdapters(model, adapters) as mixed, mixed.route(["b"]):
        worker = threading.Thread(target=enter)
        worker.start()
        worker.join(timeout=30)
    assert len(errors) == 1 and "entered in another thread" in errors[0]


def test_bad_input_is_refused_and_the_model_untouched(setup):
    model, adapters, ids = setup
    weights, hooks = bits(model), hook_state(model)
    other_base = make_llama(seed=5)
    foreign = random_adapter(other_base, 4)
    with pytest.raises(ShiraError, match=r"adapter 'x': adapter module .* do not match the adapter's fingerprint"):
        MixedAdapters(model, {"a": adapters["a"], "x": foreign})
    with pytest.raises(ShiraError, match=r"alpha for adapter 'a' is nan"):
        MixedAdapters(model, adapters, alpha={"a": float("nan")})
    with pytest.raises(ShiraError, match=r"alpha names unknown adapter\(s\) \['z'\]"):
        MixedAdapters(model, adapters, alpha={"z": 1.0})
    with pytest.raises(ShiraError, match="non-empty"):
        MixedAdapters(model, {})
    embed = random_adapter(model, 6, names=None)
    embed = shira_hooks.SparseAdapter({**embed.deltas, **_embedding_delta(model)})
    with pytest.raises(
        ShiraError,
        match=r"adapts 'model.embed_tokens.weight' \(Embedding.weight\); MixedAdapters serves nn.Linear weights only",
    ):
        MixedAdapters(model, {"e": embed})
    assert hook_state(model) == hooks

    with MixedAdapters(model, adapters) as mixed:
        with pytest.raises(ShiraError, match=r"unknown adapter name\(s\) 'd'; the known ones are \['a', 'b', 'c'\]"):
            with mixed.route(["a", "d"]):
                pass
        with pytest.raises(
            ShiraError, match=r"layer 'model.layers.0.self_attn.q_proj' is already served by an open MixedAdapters"
        ):
            MixedAdapters(model, adapters)
        with pytest.raises(
            ShiraError,
            match=r"layer 'model.layers.0.self_attn.q_proj': its input has batch size 5 .*the route has 3 rows",
        ):
            with torch.no_grad(), mixed.route(["a", None, "b"]):
                model(input_ids=ids)
        with pytest.raises(ShiraError, match="needs gradients; MixedAdapters is for inference"):
            with mixed.route(["a"] * 5):
                model(input_ids=ids)
        with pytest.raises(ShiraError, match="a route is active"):
            with mixed.route(["a"] * 5):
                mixed.close()
        with pytest.raises(ShiraError, match="one adapter name"):
            with mixed.route("a"):
                pass
    with pytest.raises(ShiraError, match="closed"):
        with mixed.route(["a"]):
            pass
    mixed.close()  # twice is fine
    assert hook_state(model) == hooks
    assert same_bits(weights, model)


def _embedding_delta(model) -> dict:
    weight = model.model.embed_tokens.weight
    indices = torch.arange(0, weight.numel(), 97, dtype=torch.int32)
    return {
        "model.embed_tokens.weight": shira_hooks.SparseDelta(
            tuple(weight.shape),
            weight.dtype,
            indices,
            torch.ones(indices.numel()),
            digest(weight.detach().reshape(-1)[indices.long()]),
        )
    }


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_two_dimensional_inputs_and_alpha_zero_on_an_mlp(dtype, atol):
    model = make_mlp().to(dtype).eval()
    adapters = {
        "p": random_adapter(model, 1, scale=0.2, names=None),
        "q": random_adapter(model, 2, scale=0.2, names=None),
    }
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        base = model(x)
        with shira_hooks.apply(model, adapters["p"]):
            expected = model(x)
        with MixedAdapters(model, adapters, alpha={"q": 0.0}) as mixed, mixed.route(["q", "p", "p", None]):
            out = model(x)
    assert (out[1:3] - base[1:3]).abs().max() > 1e-2
    torch.testing.assert_close(out[1:3], expected[1:3], atol=atol, rtol=0)
    assert torch.equal(out[0], base[0]) and torch.equal(out[3], base[3])  # alpha 0 and None: the base exactly


def _mlp_rows(model, adapters, route, x, autocast=False):
    """(mixed output, {name: output with that adapter applied}, base output) of an MLP, under torch.no_grad().

    With ``autocast``, each forward pass runs in its own bfloat16 autocast region: autocast keeps its cast
    of a weight for the whole region, so a weight written by apply inside one would not be seen.
    """
    context = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    with torch.no_grad():
        with context():
            base = model(x)
        applied = {}
        for name in {n for n in route if n is not None}:
            with shira_hooks.apply(model, adapters[name]), context():
                applied[name] = model(x)
        with MixedAdapters(model, adapters) as mixed, mixed.route(route), context():
            out = model(x)
    return out, applied, base


def _assert_within_rounding(
    mixed: torch.Tensor, applied: torch.Tensor, base: torch.Tensor, reference: torch.Tensor
) -> None:
    """The mixed row is as close to the float64 ``reference`` as rounding in its dtype allows.

    The bound is twice the larger of apply's own error and one unit of the dtype at the row's scale
    (float32 for float64 rows: the adapter's values are float32); the adapter must move the row by
    far more than that, so a row that missed its delta would fail.
    """
    unit = torch.finfo(torch.float32 if mixed.dtype == torch.float64 else mixed.dtype).eps * float(
        reference.abs().max()
    )
    bound = 2 * max(float((applied.double() - reference).abs().max()), unit)
    assert float((applied - base).abs().max()) > 10 * bound
    assert float((mixed.double() - reference).abs().max()) <= bound


def _reference(model, adapters, name, x):
    """The adapted output computed in float64: what both apply and the mixed batch round."""
    exact = make_mlp().double().eval()
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    with torch.no_grad(), shira_hooks.apply(exact, adapters[name], check_base=False):
        return exact(x.double())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_rows_equal_apply_in_that_dtype_within_its_rounding(dtype):
    model = make_mlp().to(dtype).eval()
    adapters = {
        "p": random_adapter(model, 1, scale=0.2, names=None),
        "q": random_adapter(model, 2, scale=0.2, names=None),
    }
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    route = ["q", "p", None, "p"]
    out, applied, base = _mlp_rows(model, adapters, route, x)
    assert out.dtype == dtype and torch.equal(out[2], base[2])
    for row, name in enumerate(route):
        if name is not None:
            _assert_within_rounding(out[row], applied[name][row], base[row], _reference(model, adapters, name, x)[row])


def test_rows_under_autocast_equal_apply_under_autocast():
    model = make_mlp().eval()
    adapters = {
        "p": random_adapter(model, 1, scale=0.2, names=None),
        "q": random_adapter(model, 2, scale=0.2, names=None),
    }
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    route = ["p", None, "q", "q"]
    out, applied, base = _mlp_rows(model, adapters, route, x, autocast=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out[1], base[1])
    for row, name in enumerate(route):
        if name is not None:
            _assert_within_rounding(out[row], applied[name][row], base[row], _reference(model, adapters, name, x)[row])


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_dtype_change_after_construction_is_followed(dtype):
    model = make_mlp().eval()
    adapters = {"p": random_adapter(model, 1, scale=0.2, names=None)}
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    with MixedAdapters(model, adapters) as mixed:
        model.to(dtype)  # as a server casting after loading
        with torch.no_grad():
            with mixed.route(["p", None, "p"]):
                out = model(x.to(dtype))
            base = model(x.to(dtype))
            with shira_hooks.apply(model, adapters["p"], check_base=False):  # a float32 adapter on the cast model
                applied = model(x.to(dtype))
    assert out.dtype == dtype and torch.equal(out[1], base[1])
    reference = _reference(model, adapters, "p", x)
    for row in (0, 2):
        _assert_within_rounding(out[row], applied[row], base[row], reference[row])


def _sequence_first_encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=False)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def test_sequence_first_inputs_need_an_explicit_batch_dim_and_then_route_by_batch_row():
    """(T, B, in) with T == B used to be routed by time step: rows off apply by 1.74, None rows off the base by 0.81."""
    model = _sequence_first_encoder()
    ffn = [f"layers.{i}.linear{j}.weight" for i in range(2) for j in (1, 2)]
    adapters = {
        "p": random_adapter(model, 1, scale=0.3, names=ffn),
        "q": random_adapter(model, 2, scale=0.3, names=ffn),
    }
    x = torch.randn(4, 4, 16, generator=torch.Generator().manual_seed(0))  # (T, B, 16), T == B
    hooks = hook_state(model)
    with pytest.raises(
        ShiraError,
        match=r"module 'layers.0.self_attn' \(MultiheadAttention\) has batch_first=False \(and 1 more\).*pass batch_dim=1",
    ):
        MixedAdapters(model, adapters)
    assert hook_state(model) == hooks
    route = ["p", None, "q", "p"]
    with torch.no_grad():
        base = model(x)
        applied = {}
        for name, adapter in adapters.items():
            with shira_hooks.apply(model, adapter):
                applied[name] = model(x)
        with MixedAdapters(model, adapters, batch_dim=1) as mixed, mixed.route(route):
            out = model(x)
    for row, name in enumerate(route):  # batch row b is out[:, b]
        if name is None:
            assert torch.equal(out[:, row], base[:, row])
        else:
            assert (out[:, row] - base[:, row]).abs().max() > 1e-2
            torch.testing.assert_close(out[:, row], applied[name][:, row], atol=1e-5, rtol=0)
    with pytest.raises(ShiraError, match=r"batch_dim=-1; it must be a non-negative int"):
        MixedAdapters(model, adapters, batch_dim=-1)


def test_an_out_proj_that_multihead_attention_reads_directly_is_refused():
    model = _sequence_first_encoder()
    adapter = random_adapter(model, 1, names=["layers.0.self_attn.out_proj.weight", "layers.0.linear1.weight"])
    with pytest.raises(
        ShiraError, match=r"adapts 'layers.0.self_attn.out_proj.weight', the out_proj of an nn.MultiheadAttention"
    ):
        MixedAdapters(model, {"p": adapter}, batch_dim=1)


def test_weights_sharing_memory_are_refused_and_weights_packed_side_by_side_are_served():
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    tied[2].weight = nn.Parameter(tied[0].weight.data)  # two Parameters, one storage
    adapter = random_adapter(tied, 1, scale=0.3, names=["0.weight"])
    hooks = hook_state(tied)
    with pytest.raises(ShiraError, match=r"adapts '0.weight', whose memory is shared with '2.weight'"):
        MixedAdapters(tied, {"p": adapter})
    assert hook_state(tied) == hooks

    packed = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    arena = torch.cat([packed[0].weight.detach().reshape(-1), packed[2].weight.detach().reshape(-1)])
    packed[0].weight.data, packed[2].weight.data = (
        arena[:64].view(8, 8),
        arena[64:].view(8, 8),
    )  # one buffer, no overlap
    adapters = {"p": random_adapter(packed, 1, scale=0.3, names=["0.weight", "2.weight"])}
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with shira_hooks.apply(packed, adapters["p"]):
            expected = packed(x)
        with MixedAdapters(packed, adapters) as mixed, mixed.route(["p", None]):
            out = packed(x)
        base = packed(x)
    torch.testing.assert_close(out[0], expected[0], atol=1e-6, rtol=0)
    assert torch.equal(out[1], base[1])


def test_adapters_may_be_given_as_paths(setup, tmp_path):
    model, adapters, ids = setup
    path = adapters["a"].save(tmp_path / "a.safetensors")
    adapters["b"].save_pretrained(tmp_path / "b")
    with torch.no_grad():
        with MixedAdapters(model, {"a": path, "b": str(tmp_path / "b")}) as mixed, mixed.route(["a", "b"]):
            logits = model(input_ids=ids[:2]).logits
        with MixedAdapters(model, adapters) as mixed, mixed.route(["a", "b"]):
            expected = model(input_ids=ids[:2]).logits
    assert torch.equal(logits, expected)
    with pytest.raises(
        ShiraError,
        match=r"MixedAdapters adapter 'a': got a int, not a SparseAdapter or a path; pass SparseAdapter.load\(path\)",
    ):
        MixedAdapters(model, {"a": 3})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rows_equal_apply_on_cuda(setup):
    _, adapters, ids = setup
    model = make_llama(seed=0).eval().cuda()
    route = ["a", None, "b", "c", "a"]
    with torch.no_grad():
        base = model(input_ids=ids.cuda()).logits
        with MixedAdapters(model, adapters) as mixed, mixed.route(route):
            logits = model(input_ids=ids.cuda()).logits
        for row, name in enumerate(route):
            if name is None:
                assert torch.equal(logits[row], base[row])
                continue
            with shira_hooks.apply(model, adapters[name]):
                torch.testing.assert_close(logits[row], model(input_ids=ids.cuda()).logits[row], atol=1e-4, rtol=0)
