"""One update over a rollout: re-evaluate the stored steps under the current LoRA, the objective's loss, step.

Over `train.inner_epochs` passes, the rollout's trajectories are shuffled into minibatches; for each, the
trained denoising steps (a subset per trajectory, `grpo.subsample_timesteps`) are handed to the objective
(lora_grpo/objectives/: every term of the loss, the KL to the reference included), and the losses are
accumulated over steps and `train.gradient_accumulation_steps` minibatches into one optimizer step.
Gradients sync across processes once per optimizer step (`no_sync` elsewhere). A non-finite
loss or gradient norm skips the optimizer step on every process (`SkipCounter` stops the run after too many
in a row). The first optimizer step's importance ratios are kept: before any update they must be 1 (to float
rounding: the update batches steps in other shapes than the rollout, and a CPU kernel may round another shape
differently in the last bit).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from lora_grpo.config import TrainConfig
from lora_grpo.errors import UserError
from lora_grpo.grpo import stratified_order, subsample_timesteps
from lora_grpo.lora_scale import row_scaled
from lora_grpo.models import adapter_disabled
from lora_grpo.objectives import Objective, StepBatch
from lora_grpo.rollout import Rollout, RolloutModel
from lora_grpo.sampling import (
    base_dtype,
    denoising_target,
    guided_model_output,
    noised_latents,
    seeded_generator,
    step_log_prob,
)


@dataclass
class Learner:
    """What an update changes: the UNet as prepared by accelerate (DDP-wrapped under several processes),
    its trainable parameters, the optimizer and the LR schedule."""

    accelerator: object
    unet: torch.nn.Module
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object


@dataclass
class SkipCounter:
    """Optimizer steps skipped for non-finite values; after `limit` in a row the run stops with one line."""

    limit: int
    in_a_row: int = 0
    total: int = 0
    last_checkpoint: Path | None = None  # named in the stop message: where to resume from

    def state(self) -> dict[str, int]:
        """What a checkpoint keeps (`restore` puts it back)."""
        return {"skipped_in_a_row": self.in_a_row, "skipped_total": self.total}

    def restore(self, state: dict, checkpoint: Path) -> None:
        self.in_a_row, self.total = state["skipped_in_a_row"], state["skipped_total"]
        self.last_checkpoint = checkpoint

    def last_good(self) -> str:
        if self.last_checkpoint:
            return f"the last good checkpoint is {self.last_checkpoint}"
        return "no checkpoint was written"

    def count(self, why: str, steps: int = 1) -> None:
        self.in_a_row += steps
        self.total += steps
        if self.in_a_row >= self.limit:
            raise UserError(
                f"training stopped: {self.in_a_row} optimizer steps in a row were skipped ({why}); "
                f"{self.last_good()}. Check the reward model on these prompts or lower train.learning_rate"
            )


def _stat(reduce: str = "mean"):
    """A per-step statistic and how its values combine into one number (within and across processes)."""
    return field(default=None, metadata={"reduce": reduce})


@dataclass(frozen=True)
class UpdateStats:
    """One epoch's update, summarised over every trained step and every process. A field that is None was
    not measured (no KL term, no optimizer step taken, or the update was skipped) and is left out of the row.

    Per-step values are averaged, except ratio_min / ratio_max: the extremes (their `reduce` metadata).
    """

    optimizer_steps: int
    lr: float
    loss: float | None = _stat()
    ratio_mean: float | None = _stat()
    ratio_min: float | None = _stat("min")
    ratio_max: float | None = _stat("max")
    clip_fraction: float | None = _stat()
    approx_kl: float | None = _stat()
    matching_error: float | None = _stat()  # denoising objectives: the mean squared prediction error
    kl: float | None = _stat()  # KL to the reference policy (train.kl_coef or train.safe_kl_coef > 0)
    grad_norm: float | None = _stat()  # before clipping, over the optimizer steps taken
    first_ratio_mean: float | None = None  # importance ratios before the first optimizer step: 1
    first_ratio_min: float | None = None
    first_ratio_max: float | None = None

    def row(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


REDUCED = [f for f in fields(UpdateStats) if "reduce" in f.metadata]
_REDUCE = {"mean": lambda v: sum(v) / len(v), "min": min, "max": max}


def gather_step_stats(accelerator, values: dict[str, list[float]]) -> dict[str, float]:
    """Reduce each per-step series on this process, then over every process, with its field's rule."""
    names = [f.name for f in REDUCED if values.get(f.name)]
    rules = [_REDUCE[f.metadata["reduce"]] for f in REDUCED if values.get(f.name)]
    local = torch.tensor([rule(values[n]) for n, rule in zip(names, rules, strict=True)])
    every = accelerator.gather(local[None].to(accelerator.device))  # [world, K]
    return {n: rule(every[:, i].tolist()) for i, (n, rule) in enumerate(zip(names, rules, strict=True))}


def draw_update_plan(
    key: tuple[int, ...], group_slots: list[int], group_size: int, window: tuple[int, int], cfg: TrainConfig
) -> tuple[Tensor, Tensor]:
    """An inner epoch's random choices, drawn per prompt group from a generator keyed by `key` and the
    group's global slot (as its sampling noise is), so they do not depend on the process layout.

    Returns the visiting order [N] (`grpo.stratified_order`) and each trajectory's trained steps [N, k],
    chosen among the stochastic steps window[0] <= i < window[1] (of each row's own steps when groups start
    from pictures: the window's steps from its start).
    """
    ranks, noise, steps = [], [], []
    earliest, size = cfg.timesteps == "earliest", window[1] - window[0]
    for slot in group_slots:
        gen = seeded_generator(*key, slot)
        ranks.append(torch.randperm(group_size, generator=gen))
        noise.append(torch.rand(group_size, generator=gen))
        steps.append(window[0] + subsample_timesteps(group_size, size, cfg.timestep_fraction, gen, earliest))
    n = group_size * len(group_slots)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps  # trajectories per optimizer step
    order = stratified_order(torch.cat(ranks), group_size, max(1, n // per_step), torch.cat(noise))
    return order, torch.cat(steps)


@dataclass
class UpdateTally:
    """What an update gathers as it goes: each trained step's loss and metrics, the importance ratios before
    the first optimizer step, and the optimizer steps taken."""

    series: dict[str, list[float]] = field(default_factory=lambda: {f.name: [] for f in REDUCED})
    first_ratios: list[Tensor] = field(default_factory=list)
    optimizer_steps: int = 0

    def add_step(self, loss: Tensor, metrics: dict[str, Tensor]) -> None:
        self.series["loss"].append(loss.item())
        for name, value in metrics.items():
            if name in self.series:
                self.series[name].append(value.item())
        if self.optimizer_steps == 0 and "ratios" in metrics:
            self.first_ratios.append(metrics["ratios"])

    def add_optimizer_step(self, norm: float) -> None:
        self.series["grad_norm"].append(norm)
        self.optimizer_steps += 1

    def stats(self, learner: Learner) -> UpdateStats:
        acc = learner.accelerator
        first = {}  # an objective without ratios (awm) has no first-ratio check
        if self.first_ratios:
            ratios = acc.gather(torch.cat(self.first_ratios))
            first = {
                "first_ratio_mean": ratios.mean().item(),
                "first_ratio_min": ratios.min().item(),
                "first_ratio_max": ratios.max().item(),
            }
        return UpdateStats(
            optimizer_steps=self.optimizer_steps,
            lr=learner.lr_scheduler.get_last_lr()[0],
            **first,
            **gather_step_stats(acc, self.series),
        )


@dataclass(frozen=True)
class UpdatePass:
    """What every minibatch of one inner epoch shares."""

    learner: Learner
    model: RolloutModel
    rollout: Rollout
    advantages: Tensor  # [N]
    kl_weights: Tensor  # [N]
    objective: Objective
    cfg: TrainConfig
    noise_key: tuple[int, ...]  # keys the fresh noise of denoising objectives, with each row's group slot
    group_slots: list[int]
    group_size: int


def fresh_noise(p: UpdatePass, rows: Tensor, j: int) -> Tensor:
    """Noise for rows [b] at their j-th trained step, one generator per trajectory keyed by its group's slot and
    its place in the group (as its sampling noise is): the same draws under any process layout."""
    shape = p.rollout.latents.shape[2:]
    draws = [
        torch.randn(
            shape,
            generator=seeded_generator(*p.noise_key, p.group_slots[r // p.group_size], r % p.group_size, j),
        )
        for r in rows.tolist()
    ]
    return torch.stack(draws).to(p.model.device)


def noised_input(p: UpdatePass, rows: Tensor, idx: Tensor, j: int) -> tuple[Tensor, Tensor, Tensor]:
    """The denoising objectives' input at rows [b], steps idx [b], the j-th trained step: each row's final
    latent x0 noised to its step's timestep with its keyed fresh noise (the same draws on every call), the
    prediction target, and the timesteps [b]."""
    schedule, device = row_schedule(p, rows), p.model.device
    x0, alpha = p.rollout.latents[rows, -1], schedule.at(schedule.alpha_prod, idx, device)
    noise = fresh_noise(p, rows, j)
    target = denoising_target(x0, noise, alpha, schedule.prediction_type)
    return noised_latents(x0, noise, alpha), target, schedule.timestep(idx, device)


def row_schedule(p: UpdatePass, rows: Tensor):
    """The steps rows [b] took: their own when groups started from pictures, else the model's."""
    return p.model.schedule if p.rollout.schedule is None else p.rollout.schedule.rows(rows.cpu())


def conditional_prediction(unet, x: Tensor, t: Tensor, cond) -> Tensor:
    """The UNet's conditional prediction (no guidance): what the denoising objectives train."""
    return guided_model_output(unet, x.to(base_dtype(unet)), t, cond, None, 1.0)


def old_predictions(p: UpdatePass, steps: Tensor) -> Tensor:
    """[N, k, ...] the policy's conditional prediction at every trajectory's trained steps, before the inner
    epoch's first optimizer step (the sampling policy on the first), without gradient, in minibatches."""
    acc, unet, model = p.learner.accelerator, p.learner.unet, p.model
    out = []
    for rows in torch.arange(steps.shape[0]).split(p.cfg.batch_size):
        rows_d = rows.to(model.device)
        cond = p.rollout.cond.rows(rows_d)
        per_step = []
        for j in range(steps.shape[1]):
            x, _, t = noised_input(p, rows_d, steps[rows, j].to(model.device), j)
            with (
                torch.no_grad(),
                acc.autocast(),
                row_scaled(acc.unwrap_model(unet), row_strengths(p, rows_d)),
            ):
                per_step.append(conditional_prediction(unet, x, t, cond).float())
        out.append(torch.stack(per_step, dim=1))
    return torch.cat(out)


def step_batch(p: UpdatePass, rows: Tensor, idx: Tensor, j: int, cond, uncond, old=None) -> StepBatch:
    """The trajectories `rows` [b] at their steps `idx` [b], with the model passes an objective may run.
    `old` [b, ...]: the sampling policy's predictions there, for objectives that use them."""
    acc, unet, model, rollout = p.learner.accelerator, p.learner.unet, p.model, p.rollout
    x_t, x_prev = rollout.latents[rows, idx], rollout.latents[rows, idx + 1]
    guidance = model.guidance if rollout.guidance is None else rollout.guidance[rows]
    eta = model.eta if rollout.eta is None else rollout.eta[rows]
    step_args = (row_schedule(p, rows), idx, x_t, x_prev, cond, uncond, guidance, eta)
    noised: list[tuple[Tensor, Tensor, Tensor]] = []  # drawn once and shared by both denoising passes

    def policy() -> tuple[Tensor, Tensor, Tensor]:
        with acc.autocast():
            return step_log_prob(unet, *step_args)

    def reference_mean() -> Tensor:
        with torch.no_grad(), adapter_disabled(acc.unwrap_model(unet)), acc.autocast():
            return step_log_prob(unet, *step_args)[1]

    def noised_once() -> tuple[Tensor, Tensor, Tensor]:
        if not noised:
            noised.append(noised_input(p, rows, idx, j))
        return noised[0]

    def denoise() -> tuple[Tensor, Tensor]:
        x, target, t = noised_once()
        with acc.autocast():
            return conditional_prediction(unet, x, t, cond), target

    def denoise_reference() -> Tensor:
        x, _, t = noised_once()
        with torch.no_grad(), adapter_disabled(acc.unwrap_model(unet)), acc.autocast():
            return conditional_prediction(unet, x, t, cond)

    weights = (p.advantages[rows], p.kl_weights[rows])
    return StepBatch(
        policy,
        reference_mean,
        rollout.log_probs[rows, idx],
        *weights,
        denoise,
        denoise_reference,
        denoise_old=lambda: old,
    )


def accumulate_minibatch(
    p: UpdatePass, rows: Tensor, steps: Tensor, closes_step: bool, tally: UpdateTally, on_pass, old=None
) -> bool:
    """Forward and backward of the minibatch `rows` [b] at each of its trained steps `steps` [b, k] (`old`
    [b, k, ...]: the sampling policy's predictions there, or None), each row at the LoRA strength it was
    sampled at; gradients sync across processes only on the last pass of an optimizer step. Returns whether
    some loss was non-finite (its gradients are zero)."""
    acc, unet, model = p.learner.accelerator, p.learner.unet, p.model
    rows_d = rows.to(model.device)
    cond, uncond = p.rollout.cond.rows(rows_d), model.uncond_for(rows.shape[0])
    k, nonfinite = steps.shape[1], False
    with row_scaled(acc.unwrap_model(unet), row_strengths(p, rows_d)):  # forward and backward alike
        for j in range(k):
            idx = steps[:, j].to(model.device)  # [b] step index per trajectory
            batch = step_batch(p, rows_d, idx, j, cond, uncond, None if old is None else old[:, j])
            with contextlib.nullcontext() if closes_step and j == k - 1 else acc.no_sync(unet):
                loss, metrics = p.objective.loss(batch)
                if not torch.isfinite(loss):
                    # zero gradients through every LoRA parameter keep DDP's reducer in step
                    nonfinite = True
                    loss = torch.stack([(q * 0).sum() for q in p.learner.params]).sum()
                acc.backward(loss / (k * p.cfg.gradient_accumulation_steps))
            tally.add_step(loss, metrics)
            if on_pass is not None:
                on_pass()
    return nonfinite


def row_strengths(p: UpdatePass, rows: Tensor) -> Tensor | None:
    """The LoRA strength each row was sampled at (None: all at 1)."""
    return None if p.rollout.lora_scale is None else p.rollout.lora_scale[rows]


def ppo_update(
    learner: Learner,
    model: RolloutModel,
    rollout: Rollout,
    advantages: Tensor,
    cfg: TrainConfig,
    key: tuple[int, ...],
    group_slots: list[int],
    skips: SkipCounter,
    objective: Objective,
    on_pass: Callable[[], None] | None = None,
    window: tuple[int, int] | None = None,
    kl_weights: Tensor | None = None,
) -> UpdateStats:
    """`objective`'s steps on the stored trajectories of `rollout` (advantages [N]; rows group by group, the
    groups' global slots in `group_slots`), on steps of the stochastic `window` (default: all). Random
    choices come from generators keyed by `key`, the inner epoch and each group's slot. `kl_weights` [N]:
    each trajectory's weight on the KL to the reference (default: `cfg.kl_coef` for all)."""
    learner.unet.train()
    group_size = rollout.latents.shape[0] // len(group_slots)
    tally, nonfinite = UpdateTally(), False  # nonfinite: a non-finite loss in the current accumulation
    window = window or (0, model.schedule.num_steps)
    if kl_weights is None:
        kl_weights = torch.full_like(advantages, cfg.kl_coef)
    kl_weights = kl_weights.to(model.device)  # [N]
    for inner in range(cfg.inner_epochs):
        order, steps = draw_update_plan((*key, inner), group_slots, group_size, window, cfg)  # [N], [N, k]
        noise_key = (*key, inner, 104_729)
        p = UpdatePass(
            learner,
            model,
            rollout,
            advantages,
            kl_weights,
            objective,
            cfg,
            noise_key,
            group_slots,
            group_size,
        )
        old = old_predictions(p, steps) if objective.uses_old_predictions else None  # [N, k, ...]
        for m, rows in enumerate(order.split(cfg.batch_size)):
            closes_step = (m + 1) % cfg.gradient_accumulation_steps == 0
            row_old = None if old is None else old[rows]
            nonfinite = (
                accumulate_minibatch(p, rows, steps[rows], closes_step, tally, on_pass, row_old) or nonfinite
            )
            if closes_step:
                stepped, norm = _optimizer_step(learner, cfg, nonfinite, skips)
                if stepped:
                    tally.add_optimizer_step(norm)
                nonfinite = False
    return tally.stats(learner)


def _optimizer_step(learner: Learner, cfg: TrainConfig, nonfinite: bool, skips: SkipCounter):
    """Clip and step, or skip on every process when any of them saw a non-finite loss or gradient.
    Returns (stepped, gradient norm before clipping)."""
    acc = learner.accelerator
    if cfg.max_grad_norm > 0:
        norm = acc.clip_grad_norm_(learner.params, cfg.max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in learner.params if p.grad is not None])
        )
    # every rank takes the same decision: a flag summed over ranks
    flag = torch.tensor(float(nonfinite or not torch.isfinite(norm)), device=acc.device)
    if acc.reduce(flag, "sum").item() > 0:
        learner.optimizer.zero_grad(set_to_none=True)
        skips.count("a non-finite loss or gradient")
        return False, float("nan")
    learner.optimizer.step()
    learner.lr_scheduler.step()
    learner.optimizer.zero_grad(set_to_none=True)
    if not all(torch.isfinite(p).all() for p in learner.params):  # a finite gradient, too large a step
        raise UserError(
            f"training stopped: an optimizer step made the LoRA weights non-finite (train.learning_rate "
            f"{cfg.learning_rate} is too high for this run); {skips.last_good()}. Lower the learning rate"
        )
    skips.in_a_row = 0
    return True, float(norm)


def skipped_update(learner: Learner, num_samples: int, cfg: TrainConfig, skips: SkipCounter, why: str, log):
    """No usable sample this epoch: count the optimizer steps the update would have taken as skipped."""
    log(f"skipping this epoch's update: {why}")
    per_inner = math.ceil(num_samples / cfg.batch_size) // cfg.gradient_accumulation_steps
    skips.count(why, max(1, cfg.inner_epochs * per_inner))
    return UpdateStats(optimizer_steps=0, lr=learner.lr_scheduler.get_last_lr()[0])
