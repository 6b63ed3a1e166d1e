"""`lora-grpo toyworld build OUT`: train the toy world's models from scratch, deterministically from a seed.

Three stages, all on the CPU:
  1. vae   an AutoencoderKL (32x32 images <-> 4x16x16 latents), MSE + a small KL term;
  2. clip  the reward model: a transformers CLIPModel trained contrastively on images and full or partial
           captions (so colour-only phrases like "a red shape" mean something to it);
  3. unet  a UNet2DConditionModel trained as a latent diffusion model on the VAE's posterior means (epsilon
           prediction, min-SNR-5 weighting, 10% caption dropout, EMA; a pool of images encoded once, half of
           each batch at t >= 400), conditioned like Stable Diffusion 1.x
           on a frozen CLIP text tower: the reward CLIP's own (SD 1.x uses CLIP ViT-L/14's, the same model
           its reward uses).
Captions of every safe colour are always right. Captions of the unsafe colour (red) name red while the image
shows another colour 6% of the time, as a real model sometimes draws the safe version of an unsafe prompt:
GRPO can only learn from a group whose samples differ, so a red prompt must sometimes give a non-red image.
Held-out compositions are never rendered during pretraining.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora_grpo.tiny import (
    _tokenizer,
    assemble_pipeline,
    sd_ddim_scheduler,
    tiny_clip_config,
    tiny_text_config,
    tiny_vae,
)
from lora_grpo.toyworld.language import plain_caption, rich_caption
from lora_grpo.toyworld.styles import render_styled
from lora_grpo.toyworld.world import (
    COLOURS,
    UNSAFE_COLOUR,
    Composition,
    all_compositions,
    caption,
    held_out_compositions,
)

# Only the unsafe colour's captions carry this exploration noise (the safe colours stay clean); how the rate
# was chosen: benchmarks/RESULTS.md, "How the toy world's pretraining was tuned".
UNSAFE_SWAP_RATE = 0.06  # share of images captioned red that show another colour (diffusion pretraining only)


@dataclass
class BuildSettings:
    seed: int = 0
    vae_steps: int = 400
    vae_batch: int = 32
    clip_steps: int = 1000
    clip_batch: int = 128
    unet_steps: int = 2000
    unet_batch: int = 64
    unet_lr: float = 2e-3
    text_lr: float = 0.0  # > 0: fine-tune the CLIP-initialised text encoder with the UNet
    unet_pool: int = 32768  # pretraining images rendered and encoded once, then drawn at random
    high_noise_share: float = 0.5  # share of each batch with t >= HIGH_NOISE_FROM
    ema_decay: float = 0.999
    held_out_images: int = 120  # images for the recorded held-out accuracy
    language: str = "plain"  # "rich": colours also named by synonyms and associations (toyworld/language.py)


def training_compositions() -> list[Composition]:
    held = set(held_out_compositions())
    return [c for c in all_compositions() if c not in held]


def sample_batch(
    rng: np.random.Generator,
    n: int,
    comps: list[Composition],
    noisy: bool,
    style: str = "plain",
    language: str = "plain",
) -> tuple[torch.Tensor, list[str]]:
    """n pretraining images [n, 3, 32, 32] in [0, 1] and their captions (full or partial).

    noisy: red captions sometimes show another colour (diffusion pretraining); the reward CLIP and the VAE
    train on clean pairs. language "rich": a caption may name its colour by a synonym or an association.
    """
    name_caption = caption if language == "plain" else partial(rich_caption, rng)
    names = list(COLOURS)
    images, captions = [], []
    for _ in range(n):
        comp = comps[rng.integers(len(comps))]
        drawn = comp.colour
        if noisy and comp.colour == UNSAFE_COLOUR and rng.random() < UNSAFE_SWAP_RATE:
            drawn = names[(names.index(comp.colour) + 1 + rng.integers(len(names) - 1)) % len(names)]
        images.append(render_styled(comp, style, rng, colour=drawn))
        colour = comp.colour
        kind = rng.random()
        if kind < 0.7:
            captions.append(name_caption(colour, comp.shape, comp.position))
        elif kind < 0.8:
            captions.append(name_caption(colour, comp.shape, None))
        elif kind < 0.9:
            captions.append(name_caption(colour, None, None))
        else:
            captions.append(caption(None, comp.shape, comp.position))
    return torch.stack(images), captions


def _log_every(
    step: int, total: int, start: float, what: str, loss: float, log: Callable[[str], None]
) -> None:
    if step == 1 or step % max(1, total // 10) == 0 or step == total:
        log(f"  {what} step {step}/{total}  loss {loss:.4f}  {time.perf_counter() - start:.0f}s")


# ------------------------------------------------------------------------------------------------ stage 1
def train_vae(settings: BuildSettings, log: Callable[[str], None]):
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, 1])
    vae = tiny_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    comps = training_compositions()
    start = time.perf_counter()
    for step in range(1, settings.vae_steps + 1):
        images, _ = sample_batch(rng, settings.vae_batch, comps, noisy=True)
        x = images * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _log_every(step, settings.vae_steps, start, "vae", loss.item(), log)
    vae.eval().requires_grad_(False)
    # scale latents to unit variance, as Stable Diffusion's scaling_factor does
    with torch.no_grad():
        images, _ = sample_batch(rng, 256, comps, noisy=True)
        std = vae.encode(images * 2 - 1).latent_dist.mode().std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return vae


# ------------------------------------------------------------------------------------------------ stage 2
def train_clip(settings: BuildSettings, tokenizer, log: Callable[[str], None]):
    """Contrastive training where every pair in the batch whose captions mean the same counts as a positive."""
    from transformers import CLIPModel

    from lora_grpo.rewards.clip_backends import preprocess_tensor

    torch.manual_seed(settings.seed + 2)
    rng = np.random.default_rng([settings.seed, 2])
    model = CLIPModel(tiny_clip_config(64, vision_layers=3, patch_size=4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    comps = all_compositions()  # the reward model may see every composition: it is not the generator
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    start = time.perf_counter()
    for step in range(1, settings.clip_steps + 1):
        images, captions = sample_batch(
            rng, settings.clip_batch, comps, noisy=False, language=settings.language
        )
        tokens = tokenizer(
            captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        out = model(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            pixel_values=preprocess_tensor(images, 32, 32, mean, std),
        )
        meanings = [plain_caption(c) for c in captions]  # a synonym's caption is a positive, not a negative
        same = torch.tensor([[a == b for b in meanings] for a in meanings], dtype=torch.float32)
        targets = same / same.sum(dim=1, keepdim=True)
        logits = out.logits_per_image  # [N, N], symmetric targets
        loss = 0.5 * (
            -(targets * logits.log_softmax(dim=1)).sum(1).mean()
            - (targets * logits.t().log_softmax(dim=1)).sum(1).mean()
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _log_every(step, settings.clip_steps, start, "clip", loss.item(), log)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ stage 3
def toy_unet():
    from diffusers import UNet2DConditionModel

    # Three levels (16 -> 8 -> 4): at 4x4 every feature sees the image border, which is where a UNet without
    # positional embeddings learns absolute position ("on the left"); two levels learned colour but not place.
    # Attention only at the two lowest resolutions.
    return UNet2DConditionModel(
        sample_size=16,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def toy_text_encoder(clip):
    """A CLIPTextModel holding the reward CLIP's text tower, frozen: Stable Diffusion 1.x conditions on CLIP
    ViT-L/14's text tower the same way. Trained jointly from scratch instead, the text encoder never learned
    to tell positions apart (held-out position accuracy stayed at chance); fine-tuning the CLIP-initialised
    tower with the UNet (lr 3e-4) destroyed position again within 500 steps. The CLIP itself trained on every
    composition, as SD's text encoder comes from a CLIP trained far beyond SD's images; the UNet never sees a
    held-out composition."""
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(64)))
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.eval().requires_grad_(False)


# t >= 400 is SNR < 0.74 on Stable Diffusion's schedule: where a sample's colour and place are decided. The
# clean end (edges, flat background) is easy for this world, so half of every batch is spent on the noisy part.
HIGH_NOISE_FROM = 400


def draw_timesteps(rng: np.random.Generator, n: int, high_share: float, total: int = 1000) -> torch.Tensor:
    """n training timesteps: uniform on [0, total), except a `high_share` of them uniform on [HIGH_NOISE_FROM, total)."""
    uniform = rng.integers(0, total, n)
    high = rng.integers(HIGH_NOISE_FROM, total, n)
    return torch.from_numpy(np.where(rng.random(n) < high_share, high, uniform))


def denoising_loss(
    unet, scheduler, latents: torch.Tensor, cond: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The epsilon-prediction loss at timesteps t [N] with fresh noise, min-SNR-5 weighted (Hang et al. 2023)."""
    alphas = scheduler.alphas_cumprod
    noise = torch.randn_like(latents)
    pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond).sample
    snr = alphas[t] / (1 - alphas[t])
    weight = torch.clamp(snr, max=5.0) / snr
    return (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()


class LatentPool:
    """Pretraining images encoded once by the frozen VAE (posterior means, scaled), with their captions.

    Encoding every batch again costs a tenth of a UNet step; a pool of 32k images drawn at random covers this
    world's compositions, sizes and jitters many times over.
    """

    def __init__(
        self,
        vae,
        rng: np.random.Generator,
        size: int,
        comps: list[Composition],
        chunk: int = 256,
        style: str = "plain",
        language: str = "plain",
    ):
        latents, self.captions = [], []
        with torch.no_grad():
            for start in range(0, size, chunk):
                images, captions = sample_batch(
                    rng, min(chunk, size - start), comps, noisy=True, style=style, language=language
                )
                # the posterior mean: this small VAE's posterior noise is as large as its signal
                latents.append(vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor)
                self.captions += captions
        self.latents = torch.cat(latents)

    def draw(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, list[str]]:
        index = rng.integers(0, len(self.captions), n)
        return self.latents[torch.from_numpy(index)], [self.captions[i] for i in index]


class CaptionCache:
    """Text-encoder states of each distinct caption, computed once (the caption vocabulary is small)."""

    def __init__(self, text_encoder, tokenizer):
        self.text_encoder, self.tokenizer, self.states = text_encoder, tokenizer, {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = sorted({c for c in captions if c not in self.states})
        if missing:
            tokens = self.tokenizer(
                missing, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            with torch.no_grad():
                states = self.text_encoder(tokens.input_ids)[0]
            self.states.update(zip(missing, states, strict=True))
        return torch.stack([self.states[c] for c in captions])


def train_unet(settings: BuildSettings, vae, text_encoder, tokenizer, log: Callable[[str], None]):
    torch.manual_seed(settings.seed + 3)
    rng = np.random.default_rng([settings.seed, 3])
    unet = toy_unet()
    scheduler = sd_ddim_scheduler()
    params = list(unet.parameters())
    groups = [{"params": params, "lr": settings.unet_lr}]
    if settings.text_lr > 0:  # fine-tune the CLIP-initialised text encoder too
        text_encoder.train().requires_grad_(True)
        groups.append({"params": list(text_encoder.parameters()), "lr": settings.text_lr})
        params = params + groups[1]["params"]
        ema_text = copy.deepcopy(text_encoder).requires_grad_(False)

        def encode(captions):
            tokens = tokenizer(
                captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            return text_encoder(tokens.input_ids)[0]
    else:
        ema_text = text_encoder
        encode = CaptionCache(text_encoder, tokenizer)
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    warmup = 100
    lr_at = lambda s: min(1.0, s / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / settings.unet_steps)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(lr_at(s), 0.02))
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    start = time.perf_counter()
    pool = LatentPool(vae, rng, settings.unet_pool, training_compositions(), language=settings.language)
    log(f"  encoded {settings.unet_pool} pretraining images  {time.perf_counter() - start:.0f}s")
    for step in range(1, settings.unet_steps + 1):
        latents, captions = pool.draw(rng, settings.unet_batch)
        captions = ["" if rng.random() < 0.1 else c for c in captions]  # caption dropout for CFG
        cond = encode(captions)
        t = draw_timesteps(
            rng, len(captions), settings.high_noise_share, scheduler.config.num_train_timesteps
        )
        loss = denoising_loss(unet, scheduler, latents, cond, t)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            decay = min(settings.ema_decay, (1 + step) / (10 + step))
            pairs = [(ema_unet, unet)] + ([(ema_text, text_encoder)] if settings.text_lr > 0 else [])
            for ema, live in pairs:
                for pe, pl in zip(ema.parameters(), live.parameters(), strict=True):
                    pe.mul_(decay).add_(pl.detach(), alpha=1 - decay)
        _log_every(step, settings.unet_steps, start, "unet", loss.item(), log)
    return ema_unet.eval(), ema_text.eval().requires_grad_(False), scheduler


# ------------------------------------------------------------------------------------------------ check
EVAL_SAMPLER = {"num_inference_steps": 20, "eta": 1.0, "guidance_scale": 1.0}  # the toyworld recipe's sampler


def held_out_accuracy(pipe, images: int = 120, seed: int = 0, batch: int = 40) -> dict[str, float]:
    """Colour, position and both right, read by the exact evaluator, on held-out compositions; stock pipeline."""
    from lora_grpo.toyworld.readout import readout, score

    comps = [held_out_compositions()[i % len(held_out_compositions())] for i in range(images)]
    readings = []
    for b in range(0, images, batch):
        chunk = comps[b : b + batch]
        out = pipe(
            [c.caption for c in chunk],
            generator=torch.Generator().manual_seed(seed + b),
            output_type="pt",
            **EVAL_SAMPLER,
        ).images
        readings += readout(out)
    scores = score(list(zip(comps, readings, strict=True)))
    return {
        "images": images,
        "colour": scores.colour_accuracy,
        "position": scores.position_accuracy,
        "colour_and_position": scores.colour_position_accuracy,
    }


def ordering_check(clip_dir: Path, log: Callable[[str], None]) -> dict:
    """The toyworld recipe's reward-ordering check on the freshly trained CLIP, at the recipe's alpha."""
    from lora_grpo.config import load_config
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.rewards import build_reward
    from lora_grpo.toyworld.ordering import format_ordering, ordering_prompts, reward_ordering

    config = load_config(find_recipe("toyworld"), [f"reward.clip.model={clip_dir}"])
    rows = reward_ordering(build_reward(config.reward), ordering_prompts())
    log(format_ordering(rows, config.reward.alpha))
    return {"alpha": config.reward.alpha, "problems": [r.prompt for r in rows if r.problem]}


def implicit_accuracy(pipe, images: int = 120, seed: int = 0, batch: int = 40) -> dict[str, dict[str, float]]:
    """Per way of naming a colour ("synonym", "association"): colour+position on every colour's prompts that
    name it so, and the red rate on the red ones (the rich language's implicit prompts); stock pipeline."""
    from lora_grpo.toyworld.language import implicit_prompts
    from lora_grpo.toyworld.readout import caption_pairs, readout, score

    result = {}
    for kind in ("synonym", "association"):
        prompts = [p for colour in COLOURS for p in implicit_prompts(colour, kind)]
        asked = [prompts[(i * 7) % len(prompts)] for i in range(images)]  # spread over colours and names
        readings = []
        for b in range(0, images, batch):
            out = pipe(
                asked[b : b + batch],
                generator=torch.Generator().manual_seed(seed + b),
                output_type="pt",
                **EVAL_SAMPLER,
            ).images
            readings += readout(out)
        pairs = caption_pairs(asked, readings)
        red = [(c, r) for c, r in pairs if c.colour == UNSAFE_COLOUR]
        result[kind] = {
            "colour_and_position": score(pairs).colour_position_accuracy,
            "red_rate_red_prompts": score(red).red_rate,
        }
    return result


def implicit_report(pipe, settings: BuildSettings, log: Callable[[str], None]) -> dict | None:
    """The rich language's implicit-prompt scores, logged (None for the plain language)."""
    if settings.language == "plain":
        return None
    implicit = implicit_accuracy(pipe, images=settings.held_out_images)
    for kind, row in implicit.items():
        log(
            f"{kind} prompts: colour+position {row['colour_and_position']:.3f}  "
            f"red on red ones {row['red_rate_red_prompts']:.3f}"
        )
    return implicit


def model_names(language: str) -> tuple[str, str, str]:
    """The folders and the record a build writes: (pipeline, reward CLIP, build record)."""
    if language == "plain":
        return "toyworld-sd", "toyworld-clip", "build.json"
    return f"toyworld-{language}-sd", f"toyworld-{language}-clip", f"build-{language}.json"


# ------------------------------------------------------------------------------------------------ build
def build(
    out_dir: str | Path, settings: BuildSettings | None = None, log: Callable[[str], None] = print
) -> Path:
    """Train and write OUT/toyworld-sd (a StableDiffusionPipeline folder), OUT/toyworld-clip and OUT/build.json
    (language "rich": OUT/toyworld-rich-sd, OUT/toyworld-rich-clip, OUT/build-rich.json)."""
    from transformers import CLIPImageProcessor

    settings = settings or BuildSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(out_dir / ".tokenizer")
    started = time.perf_counter()
    stage_seconds = {}
    log("stage 1/3: autoencoder")
    vae = train_vae(settings, log)
    stage_seconds["vae"] = round(time.perf_counter() - started, 1)
    log("stage 2/3: reward CLIP")
    clip = train_clip(settings, tokenizer, log)
    stage_seconds["clip"] = round(time.perf_counter() - started - sum(stage_seconds.values()), 1)
    log("stage 3/3: UNet (conditioned on the reward CLIP's frozen text tower)")
    text_encoder = toy_text_encoder(clip)
    unet, text_encoder, scheduler = train_unet(settings, vae, text_encoder, tokenizer, log)
    stage_seconds["unet"] = round(time.perf_counter() - started - sum(stage_seconds.values()), 1)

    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    sd_name, clip_name, record_name = model_names(settings.language)
    pipe.save_pretrained(out_dir / sd_name)
    clip.save_pretrained(out_dir / clip_name)
    tokenizer.save_pretrained(out_dir / clip_name)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        out_dir / clip_name
    )
    train_seconds = round(time.perf_counter() - started, 1)
    pipe.set_progress_bar_config(disable=True)
    log("measuring held-out accuracy (compositions never seen in pretraining)...")
    accuracy = held_out_accuracy(pipe, images=settings.held_out_images)
    log(
        f"held-out accuracy: colour {accuracy['colour']:.3f}  position {accuracy['position']:.3f}  both {accuracy['colour_and_position']:.3f}"
    )
    implicit = implicit_report(pipe, settings, log)
    ordering = ordering_check(out_dir / clip_name, log)
    info = {
        "settings": asdict(settings),
        "unsafe_swap_rate": UNSAFE_SWAP_RATE,
        "stage_seconds": stage_seconds,
        "build_seconds": train_seconds,
        "held_out_accuracy": accuracy,
        **({"implicit_prompts": implicit} if implicit is not None else {}),
        "eval_sampler": EVAL_SAMPLER,
        "reward_ordering": ordering,
    }
    (out_dir / record_name).write_text(json.dumps(info, indent=2), encoding="utf-8")
    for p in (out_dir / ".tokenizer").iterdir():
        p.unlink()
    (out_dir / ".tokenizer").rmdir()
    log(f"trained in {train_seconds:.0f}s: {out_dir / sd_name}, {out_dir / clip_name}")
    return out_dir
