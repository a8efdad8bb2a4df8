"""A diffusers UNet2DConditionModel built from a tiny config: channels_last convs and attention Linear layers.

Covers what diffusers users do: convert the UNet to channels_last, train with the DDPM epsilon loss and
AdamW(weight_decay>0), switch adapters inside a denoising loop, and go back to the base bit for bit.
"""

import pytest
import torch
from torch import nn

import shira_hooks
from shira_hooks import ShiraError

from conftest import assert_changes_within_masks, snapshot

diffusers = pytest.importorskip("diffusers")

UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
CONV_AND_LINEAR = [nn.Conv2d, nn.Linear]


def make_unet(channels_last: bool = True) -> nn.Module:
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    return unet.to(memory_format=torch.channels_last) if channels_last else unet


def unet_batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "latents": torch.randn(2, 4, 8, 8, generator=g).to(memory_format=torch.channels_last),  # (B, C, H, W)
            "noise": torch.randn(2, 4, 8, 8, generator=g).to(memory_format=torch.channels_last),
            "timesteps": torch.randint(0, 1000, (2,), generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),  # (B, L, D)
        }
        for _ in range(n)
    ]


SCHEDULER = diffusers.DDPMScheduler(num_train_timesteps=1000)


def predict_noise(unet: nn.Module, batch: dict) -> torch.Tensor:
    noisy = SCHEDULER.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
    return unet(noisy, batch["timesteps"], encoder_hidden_states=batch["encoder_hidden_states"]).sample


def diffusion_loss(unet: nn.Module, batch: dict) -> torch.Tensor:
    return nn.functional.mse_loss(predict_noise(unet, batch), batch["noise"])


def train(unet: nn.Module, batches: list[dict]) -> None:
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for batch in batches:
        diffusion_loss(unet, batch).backward()
        optimizer.step()
        optimizer.zero_grad()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int32)


def conv_strides(unet: nn.Module) -> dict[str, tuple]:
    return {name: m.weight.stride() for name, m in unet.named_modules() if isinstance(m, nn.Conv2d)}


def trained_adapter(seed: int, batches: list[dict]) -> tuple[shira_hooks.SparseAdapter, nn.Module]:
    """A rand-mask adapter over every Conv2d and Linear, and the channels_last UNet it was trained in."""
    unet = make_unet()
    shira = shira_hooks.attach(unet, 0.01, "rand", seed=seed, target_modules=CONV_AND_LINEAR)
    train(unet, batches)
    adapter = shira.extract()
    shira.detach()
    return adapter, unet


def test_dense_mode_on_a_channels_last_unet_is_exact_and_transfers_to_a_contiguous_one():
    unet = make_unet()
    strides = conv_strides(unet)
    assert all(
        m.weight.is_contiguous(memory_format=torch.channels_last) for m in unet.modules() if isinstance(m, nn.Conv2d)
    )
    before = snapshot(unet)
    batches = unet_batches(3, seed=1)
    shira = shira_hooks.attach(
        unet,
        0.01,
        "snip",
        target_modules=CONV_AND_LINEAR,
        calibration=batches[:1],
        loss_fn=diffusion_loss,
        progress=False,
    )
    layers = [m for m in unet.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert (
        len(shira.target_names) == len(layers) == 83
    )  # conv_in/out, resnets, proj_in/out, attention, ff, time embedding
    assert shira.num_trainable == sum(max(1, round(0.01 * m.weight.numel())) for m in layers) == 7851
    train(unet, batches)

    assert (
        assert_changes_within_masks(shira, before, unet) == shira.num_trainable
    )  # every masked entry moved, nothing else
    assert shira.verify() == []
    assert conv_strides(unet) == strides  # still channels_last
    batch = unet_batches(1, seed=9)[0]
    with torch.no_grad():
        trained = predict_noise(unet, batch)
    adapter = shira.extract()
    shira.detach()
    assert adapter.num_entries == 7851

    fresh = make_unet(channels_last=False)  # the same base in the default layout
    with torch.no_grad(), shira_hooks.apply(fresh, adapter):
        gap = (predict_noise(fresh, batch) - trained).abs().max().item()
    assert gap <= 1e-5
    for name, p in fresh.named_parameters():
        assert torch.equal(bits(p), bits(before[name])), name  # removed: the contiguous base again


def test_adapter_bank_switches_inside_a_denoising_loop_and_restores_the_base_bit_for_bit():
    batches = unet_batches(2, seed=1)
    a, _ = trained_adapter(1, batches)
    b, trained_b = trained_adapter(2, batches)
    unet = make_unet()
    base, strides = snapshot(unet), conv_strides(unet)
    bank = shira_hooks.AdapterBank(unet, {"a": a, "b": b})

    # After a -> b, the UNet holds exactly base + b: nothing of a is left behind.
    bank.activate("a")
    bank.activate("b")
    reference = make_unet()
    with shira_hooks.apply(reference, b):
        expected = dict(reference.named_parameters())
        for name, p in unet.named_parameters():
            assert torch.equal(bits(p), bits(expected[name])), name
    probe = unet_batches(1, seed=9)[0]
    with torch.no_grad():
        assert (predict_noise(unet, probe) - predict_noise(trained_b, probe)).abs().max().item() <= 1e-5

    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(4)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)).to(memory_format=torch.channels_last)
    prompt = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(4))
    for i, t in enumerate(scheduler.timesteps):
        bank.activate("ab"[i % 2])
        with torch.no_grad():
            latents = scheduler.step(unet(latents, t, encoder_hidden_states=prompt).sample, t, latents).prev_sample
        assert bank.active == ["ab"[i % 2]]
    assert torch.isfinite(latents).all()
    with torch.no_grad():  # the last step ran with b: the same prediction as the UNet b was trained in
        assert (predict_noise(unet, probe) - predict_noise(trained_b, probe)).abs().max().item() <= 1e-5

    bank.deactivate()
    for name, p in unet.named_parameters():
        assert torch.equal(bits(p), bits(base[name])), name
    assert conv_strides(unet) == strides


def test_sparse_mode_trains_the_unet_linear_layers_like_the_dense_mode():
    dense_unet, unet = make_unet(), make_unet()
    before = snapshot(unet)
    dense = shira_hooks.attach(dense_unet, 0.01, "wm", target_modules=nn.Linear)
    shira = shira_hooks.attach(unet, 0.01, "wm", target_modules=nn.Linear, mode="sparse")
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert len(trainable) == 50 and all(
        n.endswith(".shira_values") for n in trainable
    )  # to_q/k/v/out, ff, time embedding
    batches = unet_batches(3, seed=1)
    train(dense_unet, batches)
    train(unet, batches)

    assert assert_changes_within_masks(shira, before, unet) == shira.num_trainable == 2125
    assert shira.verify() == []
    trained = dict(unet.named_parameters())  # the weights, and each layer's shira_values
    for name, p in dense_unet.named_parameters():
        torch.testing.assert_close(trained[name], p, rtol=1e-5, atol=1e-6, msg=name)
    dense.detach()
    shira.detach()
    assert not any(name.endswith("shira_values") for name, _ in unet.named_parameters())


def test_sparse_mode_refuses_the_unet_convs_and_changes_nothing():
    unet = make_unet()
    flags = {name: p.requires_grad for name, p in unet.named_parameters()}
    with pytest.raises(
        ShiraError, match=r"mode='sparse' supports nn.Linear targets only; 'conv_in' is a Conv2d. Narrow target_modules"
    ):
        shira_hooks.attach(unet, 0.01, "wm", target_modules=CONV_AND_LINEAR, mode="sparse")
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == flags
