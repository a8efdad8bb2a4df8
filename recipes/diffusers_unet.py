"""SHiRA on a diffusers UNet: two style adapters, switched in the middle of a denoising loop.

    python recipes/diffusers_unet.py                  # a 3.2M-parameter UNet2DConditionModel, 16x16 latents (about 30 s on 2 CPU cores)
    python recipes/diffusers_unet.py --tiny           # a 0.8M-parameter one, 8x8 latents, seconds (the tests run this)
    python recipes/diffusers_unet.py --mode sparse    # the Linear layers only (attention, feed-forward, time embedding), mode="sparse"

Needs: pip install -e ".[diffusers]". Nothing is downloaded: the UNet and the schedulers are built
from configs (seeded random weights stand in for a pretrained UNet) and the data is generated.

1. Builds a UNet2DConditionModel with Stable Diffusion's block types and converts it to
   channels_last, as diffusers users do.
2. Trains two adapters, "a" and "b", from the same base, one per synthetic style (a style is a fixed
   per-channel mean of the latents plus a fixed prompt embedding), with the DDPM epsilon-prediction
   loss and AdamW(weight_decay=0.1). Targets: every nn.Conv2d and nn.Linear weight (the convs stored
   channels_last; the attention projections, feed-forward, time embedding, conv_in and conv_out);
   with --mode sparse, the nn.Linear weights only. SNIP masks at 1%, scored on the style's own
   batches. verify() must be empty.
3. Saves both adapters, loads them into an AdapterBank on the base UNet, checks that each reproduces
   the UNet it was trained in, reports the held-out loss of each on both styles, runs a DDIM loop with "a" active
   for the first half of the steps and "b" for the rest (twice: the two samples must agree bit for
   bit), times the switches, and deactivates: every weight must be the base again, bit for bit, in
   the same channels_last layout.
Exits 1 if an exactness check fails.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from torch.nn import functional as F

import shira_hooks

# Everything that differs between --tiny and the default run, in one place.
SIZES = {
    "tiny": dict(
        unet=dict(block_out_channels=(32, 64), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8),
        latent_size=8,
        prompt_tokens=4,
        batch_size=4,
        steps=12,
        lr=1e-2,
        eval_batches=2,
        denoise_steps=4,
    ),
    "default": dict(
        unet=dict(block_out_channels=(64, 128), cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16),
        latent_size=16,
        prompt_tokens=8,
        batch_size=4,
        steps=80,
        lr=1e-2,
        eval_batches=4,
        denoise_steps=10,
    ),
}
LATENT_CHANNELS = 4
# Stable Diffusion v1's noise schedule, without clipping (the synthetic latents are not in [-1, 1]).
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
)
# A synthetic "style": the per-channel mean of its latents, and the seed of its prompt embedding and data.
STYLES = {"a": dict(offset=(1.0, -1.0, 1.0, -1.0), seed=1), "b": dict(offset=(-1.0, 1.0, -1.0, 1.0), seed=2)}
SWITCH_REPEATS = 20  # timed a -> b -> a round trips after the denoising loop
MAX_GAP = 1e-5  # an adapter applied from its file vs the UNet it was trained in (channels_last convs)


def build_unet(size: dict) -> UNet2DConditionModel:
    """A two-level UNet, cross-attention in the outer level; the same seeded weights on every run."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=size["latent_size"],
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **size["unet"],
    )
    return unet.to(memory_format=torch.channels_last)


def make_style(offset: tuple, seed: int, size: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "offset": torch.tensor(offset),  # (C,)
        "prompt": torch.randn(size["prompt_tokens"], size["unet"]["cross_attention_dim"], generator=g),  # (L, D)
    }


def make_batch(style: dict, size: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Latents of the style, the noise to add, the timesteps and the prompt, all drawn now from ``g``."""
    b, s = size["batch_size"], size["latent_size"]
    latents = style["offset"].view(1, -1, 1, 1) + 0.5 * torch.randn(
        b, LATENT_CHANNELS, s, s, generator=g
    )  # (B, C, H, W)
    return {
        "latents": latents.to(memory_format=torch.channels_last),
        "noise": torch.randn(b, LATENT_CHANNELS, s, s, generator=g).to(memory_format=torch.channels_last),
        "timesteps": torch.randint(0, NOISE_SCHEDULE["num_train_timesteps"], (b,), generator=g),  # (B,)
        "prompt": style["prompt"].expand(b, -1, -1),  # (B, L, D)
    }


def predict_noise(unet: nn.Module, scheduler: DDPMScheduler, batch: dict) -> torch.Tensor:
    noisy = scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])  # (B, C, H, W)
    return unet(noisy, batch["timesteps"], encoder_hidden_states=batch["prompt"]).sample


def diffusion_loss(unet: nn.Module, scheduler: DDPMScheduler, batch: dict) -> torch.Tensor:
    """DDPM epsilon prediction: the MSE between the noise added and the noise the UNet predicts."""
    return F.mse_loss(predict_noise(unet, scheduler, batch), batch["noise"])


def denoise(
    unet: nn.Module, bank: shira_hooks.AdapterBank, styles: dict, size: dict, switch_times: list[float]
) -> torch.Tensor:
    """DDIM sampling of one latent: "a" (and its prompt) for the first half of the steps, "b" for the rest."""
    steps = size["denoise_steps"]
    scheduler = DDIMScheduler(**NOISE_SCHEDULE)
    scheduler.set_timesteps(steps)
    s = size["latent_size"]
    latents = torch.randn(1, LATENT_CHANNELS, s, s, generator=torch.Generator().manual_seed(7))
    latents = latents.to(memory_format=torch.channels_last)  # (1, C, H, W)
    for i, t in enumerate(scheduler.timesteps):
        name = "a" if i < steps // 2 else "b"
        if bank.active != [name]:
            start = time.perf_counter()
            bank.activate(name)  # restores the previous adapter's entries, writes this one's
            switch_times.append(time.perf_counter() - start)
        with torch.no_grad():
            noise = unet(latents, t, encoder_hidden_states=styles[name]["prompt"][None]).sample
        latents = scheduler.step(noise, t, latents).prev_sample
    return latents


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float32 tensor, so that equality is bit for bit (-0.0 != 0.0)."""
    return t.detach().view(torch.int32)


@dataclass
class Trained:
    """One adapter's training (what the recipe prints for it, as values)."""

    targets: dict[str, int]  # layer class name -> how many the UNet has (the target kinds)
    weights: int  # target weights
    num_trainable: int
    losses: dict[int, float]  # step -> training loss, for the steps it prints
    changed_outside: list[str]  # shira.verify()
    path: Path


@dataclass
class Result:
    """What one run measured and wrote; ``failures`` lists the exactness checks that failed (exit status 1)."""

    parameters: int
    channels_last: tuple[int, int]  # (conv weights stored channels_last, conv weights)
    adapters: dict[str, Trained] = field(default_factory=dict)
    shared_fraction: float = 0.0  # share of entries the two adapters have in common
    held_out_loss: dict[str, list[float]] = field(default_factory=dict)  # "base", "a", "b" active -> loss on style a, b
    reproduction_gap: dict[str, float] = field(
        default_factory=dict
    )  # adapter -> largest |difference| from the trained UNet
    samples_identical: bool = False  # two denoising runs with switches, bit for bit
    switch_ms_median: float = 0.0
    changed_after_deactivate: list[str] = field(default_factory=list)  # weights not the base bit for bit
    layout_changed: list[str] = field(default_factory=list)  # weights whose strides changed
    failures: list[str] = field(default_factory=list)


def run(argv: list[str] | None = None) -> Result:
    """Train, switch and check as the module docstring says; prints its progress and returns what it measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument(
        "--mode",
        default="dense",
        choices=["dense", "sparse"],
        help="dense: every Conv2d and Linear weight; sparse: the Linear weights only, mode='sparse'",
    )
    parser.add_argument("--sparsity", type=float, default=0.01)
    parser.add_argument("--mask", default="snip", choices=shira_hooks.MASK_KINDS)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/diffusers_unet"))
    args = parser.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "default"]
    steps, lr = args.steps or size["steps"], args.lr or size["lr"]
    targets = [nn.Conv2d, nn.Linear] if args.mode == "dense" else [nn.Linear]
    torch.set_num_threads(2)

    unet = build_unet(size)
    base = {name: p.detach().clone() for name, p in unet.named_parameters()}  # clone keeps channels_last
    convs = [m.weight for m in unet.modules() if isinstance(m, nn.Conv2d)]
    result = Result(
        sum(p.numel() for p in unet.parameters()),
        (sum(w.is_contiguous(memory_format=torch.channels_last) for w in convs), len(convs)),
    )
    failures = result.failures
    print(
        f"UNet2DConditionModel: {result.parameters:,} parameters, {size['latent_size']}x{size['latent_size']} latents, "
        f"{result.channels_last[0]}/{result.channels_last[1]} conv weights channels_last"
    )
    train_scheduler = DDPMScheduler(**NOISE_SCHEDULE)

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:  # the training loss, and attach's for the SNIP scores
        return diffusion_loss(model, train_scheduler, batch)

    styles = {name: make_style(**style, size=size) for name, style in STYLES.items()}
    held_out = {
        name: [
            make_batch(styles[name], size, torch.Generator().manual_seed(100 + i)) for i in range(size["eval_batches"])
        ]
        for name in styles
    }

    # ---------------------------------------------------------------- two adapters from one base
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths, trained_predictions = {}, {}
    for name, style in styles.items():
        unet.load_state_dict(base)  # copies in place: same parameters, still channels_last
        g = torch.Generator().manual_seed(10 * STYLES[name]["seed"])
        batches = [make_batch(style, size, g) for _ in range(steps)]
        shira = shira_hooks.attach(
            unet,
            args.sparsity,
            args.mask,
            target_modules=targets,
            mode=args.mode,
            progress=False,
            calibration=batches[:2] if args.mask in shira_hooks.masks.CALIBRATED_KINDS else None,
            loss_fn=loss_fn,
        )
        counts = {kind.__name__: sum(isinstance(m, kind) for m in unet.modules()) for kind in targets}
        layers = " + ".join(f"{count} {kind}" for kind, count in counts.items())
        print(
            f"adapter {name!r}: mode={args.mode!r}, mask={args.mask!r}, sparsity={args.sparsity:g}, "
            f"targets {layers} ({len(shira.target_names)} weights), trainable entries: {shira.num_trainable:,}"
        )
        optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
        start, step_losses = time.perf_counter(), {}
        for step, batch in enumerate(batches, 1):
            loss = loss_fn(unet, batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step == 1 or step % max(1, steps // 4) == 0:
                step_losses[step] = loss.item()
                print(f"  step {step}: loss {step_losses[step]:.4f}")
        print(f"  {steps} steps in {time.perf_counter() - start:.1f} s")
        outside = shira.verify()
        print(f"  entries changed outside the masks: {outside or 'none'}")
        failures += [f"adapter {name!r}: {weight} changed outside its mask" for weight in outside]
        with torch.no_grad():
            trained_predictions[name] = predict_noise(unet, train_scheduler, held_out[name][0])
        paths[name] = shira.extract().save(args.output_dir / f"{name}.safetensors")
        result.adapters[name] = Trained(
            counts, len(shira.target_names), shira.num_trainable, step_losses, outside, paths[name]
        )
        shira.detach()
        print(f"  adapter: {paths[name]} ({paths[name].stat().st_size:,} bytes)")
    unet.load_state_dict(base)

    # ---------------------------------------------------------------- the bank on the base UNet
    bank = shira_hooks.AdapterBank(unet, paths)  # loads the two files
    result.shared_fraction = shira_hooks.overlap(bank.adapters["a"], bank.adapters["b"]).shared_fraction
    print(f"adapters a and b share {100 * result.shared_fraction:.1f}% of their entries")
    print(f"held-out loss   {'style a':>10}  {'style b':>10}")
    for active in [None, *styles]:
        start = time.perf_counter()
        bank.activate([active] if active else [])  # the first activation of an adapter checks the base's fingerprint
        first_activation = time.perf_counter() - start
        with torch.no_grad():
            losses = [statistics.fmean(loss_fn(unet, b).item() for b in held_out[name]) for name in styles]
        result.held_out_loss[active or "base"] = losses
        print(f"  {'base' if active is None else 'adapter ' + active:<12}  " + "  ".join(f"{v:>10.4f}" for v in losses))
        if active is not None:
            with torch.no_grad():
                gap = (
                    (predict_noise(unet, train_scheduler, held_out[active][0]) - trained_predictions[active])
                    .abs()
                    .max()
                    .item()
                )
            result.reproduction_gap[active] = gap
            print(
                f"  {'':<12}  first activation {1e3 * first_activation:.1f} ms; "
                f"reproduces the UNet it was trained in: max |difference| {gap:.2e}"
            )
            if gap > MAX_GAP:
                failures.append(f"adapter {active!r} applied from its file differs from the trained UNet by {gap:.2e}")
    bank.deactivate()

    switch_times: list[float] = []
    sample = denoise(unet, bank, styles, size, switch_times)
    again = denoise(unet, bank, styles, size, switch_times)
    same = result.samples_identical = torch.equal(bits(sample), bits(again))
    half = size["denoise_steps"] // 2
    print(
        f"DDIM, {size['denoise_steps']} steps, 'a' for steps 1-{half} and 'b' for steps {half + 1}-{size['denoise_steps']}, "
        f"run twice: samples identical bit for bit: {same}"
    )
    if not same:
        failures.append("two identical denoising runs with switches gave different samples")
    for _ in range(SWITCH_REPEATS):
        for name in ["a", "b"]:
            start = time.perf_counter()
            bank.activate(name)
            switch_times.append(time.perf_counter() - start)
    entries = bank.adapters["a"].num_entries, bank.adapters["b"].num_entries
    result.switch_ms_median = 1e3 * statistics.median(switch_times)
    print(
        f"switch a <-> b ({entries[0]:,} and {entries[1]:,} entries), {len(switch_times)} switches: median "
        f"{result.switch_ms_median:.3f} ms (min {1e3 * min(switch_times):.3f}, max {1e3 * max(switch_times):.3f})"
    )

    bank.deactivate()
    params = dict(unet.named_parameters())
    changed = result.changed_after_deactivate = [
        name for name, p in params.items() if not torch.equal(bits(p), bits(base[name]))
    ]
    moved = result.layout_changed = [name for name, p in params.items() if p.stride() != base[name].stride()]
    print(
        f"after bank.deactivate(): weights that differ from the base bit for bit: {changed or 'none'}; "
        f"weights whose layout changed: {moved or 'none'}"
    )
    failures += [f"{name} is not the base after deactivate()" for name in changed]
    failures += [f"{name} changed its memory layout" for name in moved]
    for failure in failures:
        print(f"FAILED: {failure}")
    print("all exactness checks passed" if not failures else f"{len(failures)} exactness check(s) failed")
    return result


def main(argv: list[str] | None = None) -> int:
    """The command line: exits 1 if an exactness check fails."""
    return 1 if run(argv).failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
