"""Rollouts: prompts + seeded generators -> stochastic DDIM trajectories (with step log-probs) and images.

The one place images are sampled from the policy being trained. Training (`sample_epoch`), periodic
evaluation and the toy world's before/after suite (`sample_scored`) all call `rollout`, through
`RolloutModel`, a frozen view of just the model parts a rollout needs (not the trainer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from lora_grpo.conditioning import TextConditioning
from lora_grpo.conditioning import concat as concat_conditioning
from lora_grpo.config import Config, denoise_range, img2img_start, value_range
from lora_grpo.lora_scale import row_scaled
from lora_grpo.models import decode_latents
from lora_grpo.prompts import PromptSet, epoch_prompts, first_slot
from lora_grpo.sampling import (
    StepSchedule,
    block_noise,
    concat_schedules,
    noised_latents,
    sample_trajectories,
    seeded_generator,
)


@dataclass(frozen=True)
class RolloutModel:
    """What sampling needs: the UNet (LoRA included, unwrapped from DDP), the VAE, the DDIM schedule, prompt
    encoding, the recipe's sampler settings and the autocast context."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    schedule: StepSchedule
    encode: Callable[[list[str]], TextConditioning]  # prompts -> N rows on `device`, frozen modules' dtype
    uncond: TextConditioning | None  # 1 row: the negative prompt (used where guidance > 1)
    latent_size: int
    guidance: float
    eta: float
    decode_batch_size: int
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    # img2img rollouts: prompts -> their pictures' latents [P, C, h, w] (CPU, fp32), and each row's start step
    # [N] -> the rows' own schedules (sampling.img2img_paths); None: none configured
    pictures: Callable[[list[str]], Tensor] | None = None
    paths: Callable[[Tensor], StepSchedule] | None = None
    # num_steps -> the recipe sampler's schedule at that many steps (evaluation cells with `steps`)
    schedule_for: Callable[[int], StepSchedule] | None = None

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    def uncond_for(self, n: int) -> TextConditioning | None:
        """The unconditional conditioning repeated for a batch of `n` rows (None: no negative prompt)."""
        return self.uncond.expand(n) if self.uncond is not None else None


@dataclass(frozen=True)
class GroupConditions:
    """Per prompt group: the CFG, LoRA strength and sampler noise (eta) it samples (and trains) at, and the
    step it starts at from its prompt's picture (img2img; 0: from pure noise); None: the recipe's one value
    (no img2img)."""

    guidance: Tensor | None = None  # [P] or, from `rows`, [N]
    lora_scale: Tensor | None = None
    start: Tensor | None = None  # long
    # share of a group's rows (its first ones) that take its start; the rest start at 0
    picture_rows: float = 1.0
    eta: Tensor | None = None
    # per group: the prompt whose picture it starts from (its set's `picture_of`); None: its own prompt
    pictures: tuple[str, ...] | None = None

    def rows(self, group_size: int, device: torch.device) -> GroupConditions:
        """Each row's values ([P] -> [N = P x G]) on `device`."""

        def expand(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.repeat_interleave(group_size).to(device)

        start = expand(self.start)
        if start is not None:
            in_group = torch.arange(start.numel(), device=device) % group_size
            start = torch.where(in_group < picture_count(self.picture_rows, group_size), start, 0)
        scale, guidance, eta = expand(self.lora_scale), expand(self.guidance), expand(self.eta)
        return GroupConditions(guidance, scale, start, eta=eta, pictures=self.pictures)


def picture_count(share: float, group_size: int) -> int:
    """How many of a group's G rows start from its picture (sample.img2img.rows): at least one."""
    return max(1, round(share * group_size))


CONDITIONS_KEY = 7_919  # keys the per-group draws apart from every other stream of (seed, epoch, slot)


def draw_conditions(
    config: Config, epoch: int, slots: list[int], fractions: list[float | None] | None = None
) -> GroupConditions:
    """Each group's CFG, LoRA strength and eta, uniform over the recipe's ranges, and whether it starts from its
    picture (with probability `fractions[i]`, its prompt set's share; None: sample.img2img.fraction) and at
    which denoise (uniform over the epoch's `denoise_range`), from generators keyed by (seed, epoch, the
    group's slot): the same under any batch or process layout. A single value draws nothing."""

    def draw(setting, which: int) -> Tensor | None:
        lo, hi = value_range(setting)
        if not isinstance(setting, list):
            return None
        u = [
            torch.rand((), generator=seeded_generator(config.seed, epoch, slot, CONDITIONS_KEY, which))
            for slot in slots
        ]
        return lo + (hi - lo) * torch.stack(u)

    def starts() -> Tensor | None:
        i2i, n = config.sample.img2img, config.sample.num_steps
        if i2i.fraction <= 0:
            return None
        out, (lo, hi) = [], denoise_range(i2i, epoch)
        for slot, own in zip(slots, fractions or [None] * len(slots), strict=True):
            share = i2i.fraction if own is None else own
            gen = seeded_generator(config.seed, epoch, slot, CONDITIONS_KEY, 2)
            picked, u = torch.rand((), generator=gen) < share, torch.rand((), generator=gen)
            denoise = lo + (hi - lo) * float(u)
            out.append(img2img_start(n, denoise) if picked else 0)
        return torch.tensor(out, dtype=torch.long)

    guidance, scale = draw(config.sample.guidance_scale, 0), draw(config.lora.train_scale, 1)
    eta = draw(config.sample.eta, 3)
    return GroupConditions(guidance, scale, starts(), config.sample.img2img.rows, eta)


@dataclass
class Rollout:
    """N = prompts x group size sampled images and what the update needs to re-evaluate their steps."""

    cond: TextConditioning  # N rows of text conditioning
    latents: Tensor  # [N, T+1, C, h, w]: x_T ... x_0, fp32
    log_probs: Tensor  # [N, T] log-prob of each step taken, fp32
    images: Tensor  # [N, 3, H, W] in [0, 1]
    guidance: Tensor | None = None  # [N] each row's CFG when drawn per group (None: the model's one value)
    lora_scale: Tensor | None = None  # [N] each row's LoRA strength when drawn per group (None: 1)
    start: Tensor | None = (
        None  # [N] long: the fine step each row started at from its picture (None: all at 0)
    )
    schedule: StepSchedule | None = None  # each row's own steps when groups start from pictures (per-row)
    eta: Tensor | None = None  # [N] each row's eta when drawn per group (None: the model's one value)


def concat(rollouts: Sequence[Rollout]) -> Rollout:
    """Rollouts of several batches as one, rows in batch order."""
    parts = {f.name: [getattr(r, f.name) for r in rollouts] for f in fields(Rollout)}
    cond = concat_conditioning(parts.pop("cond"))
    schedules = parts.pop("schedule")
    schedule = None if schedules[0] is None else concat_schedules(schedules)
    joined = {name: None if values[0] is None else torch.cat(values) for name, values in parts.items()}
    return Rollout(cond=cond, schedule=schedule, **joined)


def _no_timer(phase: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def rollout(
    model: RolloutModel,
    prompts: list[str],
    generators: torch.Generator | Sequence[torch.Generator],
    group_size: int = 1,
    shared_initial_noise: bool = False,
    on_step: Callable[[], None] | None = None,
    timer: Callable[[str], contextlib.AbstractContextManager] = _no_timer,
    window: tuple[int, int] | None = None,
    conditions: GroupConditions | None = None,
) -> Rollout:
    """Sample `group_size` images for each prompt: rows [p0 x G, p1 x G, ...].

    `generators`: one generator for the whole batch, or one per prompt (its group's initial noise and step
    noise then depend on nothing else: the same group comes out whichever batch or process it lands in).
    `shared_initial_noise`: the G samples of a prompt start from the same noise (the group baseline then
    compares the stochastic denoising steps). `timer(phase)` wraps the "sampling" and "decode" phases.
    `window` (start, stop): only those steps are stochastic (`sampling.sample_trajectories`).
    `conditions`: each prompt's own CFG and LoRA strength (default: the model's CFG, strength 1) and start
    step: with starts, every row takes its own steps (`model.paths`); a group with start s > 0 begins at x_s =
    the prompt's picture noised to step s with the group's initial noise (diffusers' img2img) and takes the
    window's steps from there, then the tail to the image.
    """
    unet = model.unet
    was_training = unet.training
    unet.eval()
    n = len(prompts) * group_size
    n_noise = len(prompts) if shared_initial_noise else n
    noise = block_noise((n_noise, model.latent_channels, model.latent_size, model.latent_size), generators)
    if shared_initial_noise:
        noise = noise.repeat_interleave(group_size, dim=0)
    rows = (conditions or GroupConditions()).rows(group_size, model.device)
    guidance = model.guidance if rows.guidance is None else rows.guidance
    eta = model.eta if rows.eta is None else rows.eta
    schedule, paths = model.schedule, None
    if rows.start is not None:
        schedule = paths = model.paths(rows.start.cpu())
        if bool((rows.start > 0).any()):
            made_from = list(rows.pictures or prompts)
            noise = from_pictures(model, made_from, group_size, noise, rows.start.cpu(), paths)
    with timer("sampling"):
        cond = model.encode(prompts).repeat_interleave(group_size)  # N rows
        with model.autocast(), row_scaled(unet, rows.lora_scale):
            traj = sample_trajectories(
                unet,
                schedule,
                cond,
                model.uncond_for(n),
                noise.to(model.device),
                guidance,
                eta,
                generators,
                on_step=on_step,
                window=window,
            )
    with timer("decode"):
        images = decode_latents(model.vae, traj.latents[:, -1], model.decode_batch_size)
    unet.train(was_training)
    kept = (rows.guidance, rows.lora_scale, rows.start, paths, rows.eta)
    return Rollout(cond, traj.latents, traj.log_probs, images, *kept)


def from_pictures(
    model: RolloutModel,
    prompts: list[str],
    group_size: int,
    noise: Tensor,
    start: Tensor,
    paths: StepSchedule,
) -> Tensor:
    """Initial latents [N, ...]: a row with start s > 0 gets the picture of its group's entry in `prompts` noised
    to its first step's timestep (fine step s) with the row's own noise (x_s = sqrt(abar) x0 + sqrt(1 - abar)
    noise), the others their noise."""
    if model.pictures is None:
        raise ValueError("img2img rollouts need RolloutModel.pictures")
    x0 = model.pictures(prompts).float().repeat_interleave(group_size, dim=0)
    noised = noised_latents(x0, noise, paths.alpha_prod[:, 0])
    return torch.where((start > 0).view(-1, *([1] * (noise.ndim - 1))), noised, noise)


def sample_scored(
    model: RolloutModel,
    reward_fn,
    prompts: list[str],
    seed: int,
    batch: int = 40,
    lora_scale: float | None = None,
    start: int = 0,
    pictures: list[str] | None = None,
) -> tuple[Tensor, Tensor]:
    """Images [N, 3, H, W] (CPU) and rewards [N] of `prompts` (one image each) on noise fixed by `seed`, with
    the LoRA at `lora_scale` (None: 1); from step `start` of each prompt's picture (img2img, `model.paths`;
    `pictures`: the prompt each picture is made from, default the prompt itself) when > 0.

    The noise of batch b comes from a generator keyed by (seed, b), so calls at different points of training
    compare the models on the same noise; evaluation draws nothing from the training streams.
    """
    images, rewards = [], []
    for b in range(0, len(prompts), batch):
        texts = prompts[b : b + batch]
        scale = None if lora_scale is None else torch.full((len(texts),), lora_scale)
        starts = torch.full((len(texts),), start, dtype=torch.long) if start else None
        made_from = None if pictures is None else tuple(pictures[b : b + batch])
        conditions = GroupConditions(lora_scale=scale, start=starts, pictures=made_from)
        out = rollout(model, texts, seeded_generator(seed, b), conditions=conditions)
        images.append(out.images.cpu())
        rewards.append(reward_fn(out.images, texts).float().cpu())
    return torch.cat(images), torch.cat(rewards)


@dataclass
class EpochSamples:
    """One epoch's scored samples on one process, [N = prompts * G] rows laid out group by group."""

    prompts: list[str]
    set_index: Tensor  # [N] long: which prompt set each row's prompt came from
    group_slots: list[int]  # [P] the global prompt slot of each group
    rollout: Rollout
    rewards: Tensor  # [N]


def sample_epoch(
    model: RolloutModel,
    reward_fn,
    prompt_sets: list[PromptSet],
    config: Config,
    epoch: int,
    rank: int,
    world: int,
    window: tuple[int, int] | None = None,
    on_step: Callable[[], None] | None = None,
    timer: Callable[[str], contextlib.AbstractContextManager] = _no_timer,
) -> EpochSamples:
    """Training's SAMPLE + SCORE: this process's prompt groups of `epoch`, G samples each, and their rewards.

    Each group draws from a generator keyed by (seed, epoch, its global slot): a group's samples are the same
    whichever batch or process it lands in (1 process x 2P prompts == 2 processes x P).
    """
    s, G = config.sample, config.sample.group_size
    batches = epoch_prompts(
        prompt_sets, s.prompts_per_batch, s.batches_per_epoch, config.seed, epoch, rank, world
    )
    prompts, set_index, rollouts, rewards, slots = [], [], [], [], []
    for b, batch in enumerate(batches):
        texts = [p for p, _ in batch]
        first = first_slot(epoch, b, rank, world, len(texts), s.batches_per_epoch)
        slots += [first + j for j in range(len(texts))]
        gens = [seeded_generator(config.seed, epoch, slot) for slot in slots[-len(texts) :]]
        fractions = [prompt_sets[i].img2img for _, i in batch]
        conditions = draw_conditions(config, epoch, slots[-len(texts) :], fractions)
        made_from = tuple(prompt_sets[i].picture_of(p) for p, i in batch)
        conditions = replace(conditions, pictures=made_from)
        out = rollout(model, texts, gens, G, s.shared_initial_noise, on_step, timer, window, conditions)
        expanded = [t for t in texts for _ in range(G)]
        with timer("reward"):
            rewards.append(reward_fn(out.images, expanded).float().to(model.device))
        prompts += expanded
        set_index.append(torch.tensor([i for _, i in batch], device=model.device).repeat_interleave(G))
        rollouts.append(out)
    return EpochSamples(prompts, torch.cat(set_index), slots, concat(rollouts), torch.cat(rewards))
