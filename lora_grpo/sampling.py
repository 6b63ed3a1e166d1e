"""Stochastic sampling that records each step's Gaussian log-probability, for any kernel (lora_grpo/kernels/).

A step from x_t to x_prev is a Gaussian whose mean and std the schedule's sampler computes (DDIM with eta,
Euler ancestral, ...). The log-prob of the step taken is the Gaussian log-density averaged over latent elements
(the DDPO / SafeDiffusion-R1 convention: with a per-element mean the PPO ratio stays near 1 and a clip range
like 1e-4 is meaningful).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_grpo.conditioning import TextConditioning
from lora_grpo.conditioning import concat as concat_conditioning
from lora_grpo.errors import UserError
from lora_grpo.kernels import ENDS_AT_CLEAN, step_mean_std
from lora_grpo.kernels.prediction import broadcast

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class StepSchedule:
    """Per-step quantities of an N-step schedule, shared by all samples, and the sampler that steps it."""

    # [T], or [N, T] when each row takes its own steps (img2img paths: `img2img_paths`)
    timesteps: Tensor  # long, from noisy to clean
    alpha_prod: Tensor  # alphas_cumprod at each timestep
    alpha_prod_prev: Tensor  # alphas_cumprod at the step's target timestep
    prediction_type: str
    sampler: str = "ddim"  # a name in kernels.KERNELS

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[-1])

    @property
    def per_row(self) -> bool:
        return self.timesteps.ndim == 2

    def at(self, table: Tensor, i, device: torch.device) -> Tensor:
        """`table`'s value at step `i` (an int, or [N] indices): one value, or [N] (each row its own)."""
        table = table.to(device)
        if table.ndim == 1:
            return table[i]
        if isinstance(i, int):
            return table[:, i]
        return table[torch.arange(table.shape[0], device=device), i.to(device)]

    def timestep(self, i, device: torch.device) -> Tensor:
        return self.at(self.timesteps, i, device)

    def rows(self, index: Tensor) -> StepSchedule:
        """The schedule of rows `index` (a schedule shared by every row: itself)."""
        if not self.per_row:
            return self
        index = index.to(self.timesteps.device)
        return StepSchedule(
            self.timesteps[index],
            self.alpha_prod[index],
            self.alpha_prod_prev[index],
            self.prediction_type,
            self.sampler,
        )

    def step_mean_std(self, i, model_output: Tensor, x: Tensor, eta: float | Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of step(s) `i` (an int, or [N] indices into the schedule) from x, by the sampler; eta
        one number or [N] (each row its own)."""
        a_t, a_prev = self.at(self.alpha_prod, i, x.device), self.at(self.alpha_prod_prev, i, x.device)
        if isinstance(eta, Tensor):
            eta = broadcast(eta, x)
        return step_mean_std(self.sampler, model_output, x, a_t, a_prev, eta, self.prediction_type)


def step_schedule(scheduler, num_steps: int, sampler: str = "ddim") -> StepSchedule:
    """Read the schedule from the base model's diffusers scheduler config (the same timesteps its DDIM
    `step` uses); `sampler` picks the kernel, and where its last step goes (DDIM: the scheduler's final
    alpha; Euler: sigma 0, a clean latent)."""
    cfg = scheduler.config
    if cfg.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise UserError(
            f"scheduler prediction_type '{cfg.prediction_type}' is not supported: use one of {PREDICTION_TYPES}"
        )
    if cfg.get("clip_sample", False) or cfg.get("thresholding", False):
        raise UserError(
            "the base model's scheduler clips or thresholds x0 (clip_sample/thresholding): set both false"
        )
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.long()
    prev = timesteps - cfg.num_train_timesteps // num_steps
    alphas = scheduler.alphas_cumprod.float()
    final = torch.as_tensor(
        1.0 if ENDS_AT_CLEAN[sampler] else scheduler.final_alpha_cumprod, dtype=torch.float32
    )
    alpha_prev = torch.where(prev >= 0, alphas[prev.clamp(min=0)], final)
    return StepSchedule(
        timesteps, alphas[timesteps], alpha_prev, cfg.get("prediction_type", "epsilon"), sampler
    )


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """log N(x; mean, std^2) per sample, averaged over the non-batch elements, in fp32."""
    x, mean, std = x.float(), mean.float(), std.float()
    log_density = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_density.mean(dim=tuple(range(1, log_density.ndim)))


def guided_model_output(
    unet,
    latents: Tensor,
    timesteps: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    guidance: float | Tensor,
) -> Tensor:
    """UNet prediction with classifier-free guidance in one batched forward ([uncond; cond]).

    latents [N, C, h, w]; timesteps [N] or scalar; cond/uncond N rows each; guidance one number or [N] (each
    row its own). guidance 1 (or no uncond) runs the conditional pass alone.
    """
    if uncond is None or (not isinstance(guidance, Tensor) and guidance == 1.0):
        return unet(latents, timesteps, **cond.unet_kwargs()).sample
    if isinstance(guidance, Tensor):
        guidance = guidance.to(latents.device).view(-1, *([1] * (latents.ndim - 1)))  # [N, 1, 1, 1]
    t = timesteps.expand(latents.shape[0]) if timesteps.ndim == 0 else timesteps
    both = concat_conditioning([uncond, cond])
    out = unet(torch.cat([latents, latents]), torch.cat([t, t]), **both.unet_kwargs()).sample
    out_uncond, out_cond = out.chunk(2)
    return out_uncond + guidance * (out_cond - out_uncond)


def noised_latents(x0: Tensor, noise: Tensor, alpha_prod: Tensor) -> Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (the forward process q(x_t | x0), DDPM eq. 4); alpha_prod
    [N] per row, x0 and noise [N, ...]. fp32."""
    a = alpha_prod.float().view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()


def denoising_target(x0: Tensor, noise: Tensor, alpha_prod: Tensor, prediction_type: str) -> Tensor:
    """What the UNet predicts at x_t = noised_latents(x0, noise, alpha_prod): the noise (epsilon), the velocity
    v = sqrt(abar) noise - sqrt(1 - abar) x0 (v_prediction, Salimans & Ho 2022), or x0 (sample). fp32."""
    if prediction_type == "epsilon":
        return noise.float()
    if prediction_type == "sample":
        return x0.float()
    a = alpha_prod.float().view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()


def base_dtype(unet) -> torch.dtype:
    """The dtype of the frozen base weights (LoRA weights are fp32 even when the base is bf16)."""
    frozen = next((p for p in unet.parameters() if not p.requires_grad), None)
    return (frozen if frozen is not None else next(unet.parameters())).dtype


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple (seed, epoch, slot, ...), so every draw keyed by it is replayable."""
    mixed = 0
    for k in key:
        mixed = (mixed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def block_noise(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator]) -> Tensor:
    """Standard normal noise of `shape` on the CPU (fp32); with K generators, each fills N/K consecutive rows."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    rows, rest = divmod(shape[0], len(generator))
    if rest:
        raise ValueError(f"{shape[0]} rows do not split over {len(generator)} generators")
    return torch.cat([torch.randn((rows, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])


@dataclass
class Trajectories:
    latents: Tensor  # [N, T+1, C, h, w]: x_T, ..., x_0 (fp32, on the sampling device)
    log_probs: Tensor  # [N, T]: log-prob of each step taken, fp32; NaN for a deterministic step (none)


def sde_window(num_steps: int, size: int, mode: str, epoch: int, epochs: int) -> tuple[int, int]:
    """The steps [start, stop) sampled stochastically (and trained) in `epoch` (0-based) of `epochs`.

    size 0 (or >= num_steps): every step. mode "first": the first `size` steps, the noisiest, every epoch.
    mode "sliding": a window that slides linearly over training from the first `size` steps to the last
    `size` (MixGRPO, Li et al. 2025, arXiv:2507.21802, moves its SDE window the same way).
    """
    if size <= 0 or size >= num_steps:
        return 0, num_steps
    start = 0
    if mode == "sliding" and epochs > 1:
        start = round(epoch * (num_steps - size) / (epochs - 1))
    return start, start + size


def coarse_tail(schedule: StepSchedule, stop: int, tail_steps: int) -> StepSchedule:
    """`schedule`'s steps [0, stop), then the rest of the way to x_0 in `tail_steps` deterministic steps.

    The tail's timesteps are every (n - stop) / tail_steps-th of the remaining ones, each step going to the
    next kept timestep (the last to the schedule's own final alpha), so the steps before `stop` are unchanged.
    tail_steps 0, or at least the remaining number of steps, keeps the schedule as it is.
    """
    n = schedule.num_steps
    if tail_steps <= 0 or stop + tail_steps >= n:
        return schedule
    keep = list(range(stop)) + [stop + (j * (n - stop)) // tail_steps for j in range(tail_steps)]
    alpha = schedule.alpha_prod[keep]
    alpha_prev = torch.cat([alpha[1:], schedule.alpha_prod_prev[-1:]])
    return StepSchedule(
        schedule.timesteps[keep], alpha, alpha_prev, schedule.prediction_type, schedule.sampler
    )


def img2img_paths(fine: StepSchedule, starts: Tensor, stop: int, tail_steps: int) -> StepSchedule:
    """Each row's own steps [N, stop + tail_steps]: from its start step s of the `fine` schedule (0: pure noise;
    s > 0: img2img, diffusers' start for its denoise), the `stop` steps s .. s + stop - 1 (the stochastic window),
    then the rest of the way to x_0 in `tail_steps` larger deterministic steps (`coarse_tail` of the schedule
    from s). A row from 0 takes exactly `coarse_tail(fine, stop, tail_steps)`'s steps."""
    rows = []
    for s in starts.tolist():
        if fine.num_steps - s < stop + tail_steps:
            raise ValueError(
                f"a start at step {s} of {fine.num_steps} leaves fewer than {stop} + {tail_steps} steps"
            )
        tail = slice(s, None)
        rest = StepSchedule(
            fine.timesteps[tail],
            fine.alpha_prod[tail],
            fine.alpha_prod_prev[tail],
            fine.prediction_type,
            fine.sampler,
        )
        rows.append(coarse_tail(rest, stop, tail_steps))
    return joined_schedules(rows, torch.stack)


def concat_schedules(schedules: Sequence[StepSchedule]) -> StepSchedule:
    """Per-row schedules of several batches as one, rows in batch order."""
    return joined_schedules(schedules, torch.cat)


def joined_schedules(schedules: Sequence[StepSchedule], join: Callable) -> StepSchedule:
    """One schedule whose tables are `join` (torch.stack: rows from shared schedules; torch.cat: of per-row
    ones) of the schedules' tables; the sampler and prediction type are the first's."""
    first = schedules[0]
    tables = [
        join([getattr(s, name) for s in schedules]) for name in ("timesteps", "alpha_prod", "alpha_prod_prev")
    ]
    return StepSchedule(*tables, first.prediction_type, first.sampler)


@torch.no_grad()
def sample_trajectories(
    unet,
    schedule: StepSchedule,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    initial_latents: Tensor,
    guidance: float | Tensor,
    eta: float | Tensor,
    generator: torch.Generator | Sequence[torch.Generator],
    on_step: Callable[[], None] | None = None,
    window: tuple[int, int] | None = None,
) -> Trajectories:
    """Run the schedule's stochastic sampler from `initial_latents`, keeping every latent and step log-prob.

    The step noise is drawn on the CPU and moved to the device, so a seed gives the same trajectories on any
    device. `generator` is one generator for the batch, or a list of K generators each drawing the noise of
    N/K consecutive rows (one per prompt group: a group's samples then do not depend on which batch or
    process it lands in). With `window` (start, stop), only steps start <= i < stop are stochastic (eta) and
    have a log-prob; the others (every step when eta is 0) are deterministic steps stored with a NaN log-prob.
    Noise is drawn at every step either way, so a window step uses the noise the fully stochastic sampler
    would. eta [N]: each row its own (a row at eta 0 is deterministic throughout, its log-probs NaN).
    A per-row `schedule` (img2img paths) steps each row along its own timesteps.
    """
    x = initial_latents.float()
    device = x.device
    latents, log_probs = [x], []
    model_dtype = base_dtype(unet)
    first, stop = window or (0, schedule.num_steps)
    for i in range(schedule.num_steps):
        t = schedule.timestep(i, device)
        out = guided_model_output(unet, x.to(model_dtype), t, cond, uncond, guidance)
        in_window = first <= i < stop
        step_eta = eta.to(device) * in_window if isinstance(eta, Tensor) else (eta if in_window else 0.0)
        x, log_prob = sampling_step(schedule, i, out, x, step_eta, generator)
        log_probs.append(log_prob)
        latents.append(x)
        if on_step is not None:
            on_step()
    return Trajectories(torch.stack(latents, dim=1), torch.stack(log_probs, dim=1))


def sampling_step(
    schedule: StepSchedule,
    i: int,
    out: Tensor,
    x: Tensor,
    eta: float | Tensor,
    generator: torch.Generator | Sequence[torch.Generator],
) -> tuple[Tensor, Tensor]:
    """One step of `sample_trajectories`: (x_prev, log-prob [N]). eta one number or [N] (each row its own); a
    row at eta 0 takes the deterministic step (the mean exactly) with a NaN log-prob. The step noise is drawn
    either way."""
    mean, std = schedule.step_mean_std(i, out, x, eta)
    noise = block_noise(x.shape, generator).to(x.device)
    if not isinstance(eta, Tensor):
        if eta > 0:
            x_prev = mean + std * noise
            return x_prev, gaussian_log_prob(x_prev, mean, std)
        return mean, torch.full((x.shape[0],), float("nan"), device=x.device)
    x_prev = mean + std * noise
    log_prob = gaussian_log_prob(x_prev, mean, torch.where(broadcast(eta, x) > 0, std, 1.0))
    return x_prev, torch.where(eta > 0, log_prob, float("nan"))


def step_log_prob(
    unet,
    schedule: StepSchedule,
    step_index: Tensor,
    latents: Tensor,
    next_latents: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    guidance: float | Tensor,
    eta: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Log-prob under the current UNet of stored steps latents -> next_latents (with gradient).

    step_index [N] picks each sample's step in the schedule. Returns (log_prob [N], mean, std).
    """
    device = latents.device
    t = schedule.timestep(step_index, device)  # [N]
    model_dtype = base_dtype(unet)
    out = guided_model_output(unet, latents.to(model_dtype), t, cond, uncond, guidance)
    mean, std = schedule.step_mean_std(step_index, out, latents, eta)
    return gaussian_log_prob(next_latents, mean, std), mean, std
