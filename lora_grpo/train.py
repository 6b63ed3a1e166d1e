"""The GRPO training loop: sample -> score -> advantages -> update -> log -> save.

Each epoch (one "iteration" of SafeDiffusion-R1, arXiv:2605.18719, Alg. 1):
  1. SAMPLE   G trajectories per prompt with the stochastic DDIM sampler, keeping latents and step log-probs.
  2. SCORE    decode the final latents and score them with the reward (the CLIP steering reward).
  3. ADVANTAGE normalise rewards within each prompt's group, clip.
  4. UPDATE   PPO-clipped steps on the per-step log-prob ratios over inner epochs and subsampled timesteps,
              accumulating gradients over timesteps and minibatches, then one optimizer step.
  5. LOG      metrics.jsonl row, console line, sample grid.
Only the LoRA parameters train; the UNet, VAE and text encoder stay frozen.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from lora_grpo.checkpoint import ADAPTER_DIR, read_trainer_state, write_checkpoint
from lora_grpo.config import Config, TrainConfig, save_config
from lora_grpo.errors import UserError
from lora_grpo.evaluation.periodic import PeriodicEval
from lora_grpo.grpo import (
    clip_advantages,
    clipped_policy_loss,
    gaussian_kl,
    group_advantages,
    subsample_timesteps,
)
from lora_grpo.models import (
    add_lora,
    freeze,
    load_lora_state,
    load_pipeline,
    resolve_model_ref,
    save_adapter,
)
from lora_grpo.prompts import PromptSet, epoch_prompts, first_slot, load_prompt_set
from lora_grpo.rewards import build_reward
from lora_grpo.sampling import (
    DdimSchedule,
    block_noise,
    ddim_schedule,
    sample_trajectories,
    step_log_prob,
)
from lora_grpo.stopping import StopRequests, TrainingInterrupted
from lora_grpo.tracking import MetricsLog, console_line, epoch_progress, reward_stats, save_grid

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW (default) or torch AdamW over the LoRA parameters."""
    kwargs = dict(
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.adam_weight_decay,
    )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    # min_8bit_size=0: rank-4 LoRA matrices are below the 4096-element default and would keep fp32 state.
    return bnb.optim.AdamW8bit(params, min_8bit_size=0, **kwargs)


def default_run_dir(config: Config) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.name}-{stamp}"


class PhaseTimer:
    """Wall time per phase, synchronising the GPU so asynchronous kernels are charged to their phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        yield
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - start


@dataclass
class Samples:
    """One epoch's samples on this process, flattened to [N = prompts * G]."""

    prompts: list[str]
    set_index: torch.Tensor  # [N] long
    cond: torch.Tensor  # [N, L, D] text embeddings
    latents: torch.Tensor  # [N, T+1, C, h, w]
    log_probs: torch.Tensor  # [N, T]
    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    rewards: torch.Tensor  # [N]


@contextlib.contextmanager
def adapter_disabled(unet):
    """The reference policy: the same UNet with the LoRA switched off (no second copy in memory)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def decode_images(vae, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """VAE decode in slices of `chunk` latents; [N, C, h, w] -> [N, 3, H, W] in [0, 1], fp32."""
    dtype = next(vae.parameters()).dtype
    out = []
    with torch.no_grad():
        for i in range(0, latents.shape[0], chunk):
            z = latents[i : i + chunk].to(dtype) / vae.config.scaling_factor
            out.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def encode_prompts(pipe, prompts: list[str], device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return embeds


def _no_progress():
    from tqdm.auto import tqdm

    return tqdm(disable=True)


def _summarise(name: str, values: list[float]) -> float:
    """How a per-step statistic becomes one number per epoch: extremes for ratio_min/max, else the mean."""
    if not values:
        return float("nan")
    if name == "ratio_min":
        return min(values)
    if name == "ratio_max":
        return max(values)
    return sum(values) / len(values)


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple (seed, epoch, rank, ...) so every epoch's randomness is replayable."""
    mixed = 0
    for k in key:
        mixed = (mixed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


class Trainer:
    """Holds the models and state of one run; `run()` executes the loop (start, epochs, save)."""

    def __init__(
        self,
        config: Config,
        run_dir: Path | None = None,
        log: Callable[[str], None] = print,
        trainable: Callable = add_lora,
    ):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config, self.log = config, log
        tcfg = config.train
        cpu = not torch.cuda.is_available()
        if cpu and tcfg.mixed_precision == "fp16":
            raise UserError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on a CPU")
        try:
            self.accelerator = Accelerator(mixed_precision=tcfg.mixed_precision, cpu=cpu)
        except ValueError as err:
            if "already been initialized" not in str(err):
                raise
            raise UserError(
                f"this process already trained with another train.mixed_precision; accelerate keeps one per "
                f"process, so start a new process for mixed_precision={tcfg.mixed_precision}"
            ) from None
        self.device = self.accelerator.device
        if tcfg.allow_tf32 and self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        set_seed(config.seed)

        self.run_dir = Path(run_dir or config.output.dir or default_run_dir(config))
        self.prompt_sets: list[PromptSet] = [load_prompt_set(s) for s in config.prompts.sets]

        # Frozen modules in the mixed-precision dtype on a GPU; fp32 on the CPU (autocast still applies).
        weight_dtype = DTYPES[tcfg.mixed_precision] if self.device.type == "cuda" else torch.float32
        self.weight_dtype = weight_dtype
        self.base_ref = resolve_model_ref(config.model.base)
        self.pipe = load_pipeline(config.model, dtype=weight_dtype)
        freeze(self.pipe)
        self.pipe.to(self.device)
        self.text_device = self.device
        if tcfg.offload_text_encoder:  # frees its GPU memory; prompts are few per epoch, the CPU is enough
            self.pipe.text_encoder.to("cpu", dtype=torch.float32)
            self.text_device = torch.device("cpu")
        torch.manual_seed(config.seed)  # LoRA init
        # `trainable(unet, lora_settings)` makes the trained parameters; add_lora unless a benchmark swaps it
        self.params = trainable(self.pipe.unet, config.lora)
        if tcfg.gradient_checkpointing:
            self.pipe.unet.enable_gradient_checkpointing()
        self.schedule: DdimSchedule = ddim_schedule(self.pipe.scheduler, config.sample.num_steps)

        from diffusers.optimization import get_scheduler

        optimizer = make_optimizer(self.params, tcfg)
        lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=tcfg.lr_warmup_steps)
        self.unet, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.pipe.unet, optimizer, lr_scheduler
        )
        self.reward_fn = build_reward(config.reward, self.device)

        self.uncond = None
        if config.sample.guidance_scale > 1:
            self.uncond = self.encode([config.sample.negative_prompt])  # [1, L, D]
        scale = self.pipe.vae_scale_factor
        self.latent_size = (config.sample.resolution or self.pipe.unet.config.sample_size * scale) // scale
        self.timer = PhaseTimer(self.device)
        self.progress = _no_progress()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.periodic = PeriodicEval(self) if config.evaluate.every else None
        # checkpoints hold the LoRA only (accelerate would otherwise write the whole frozen UNet)
        self.accelerator.register_save_state_pre_hook(self._save_lora_hook)
        self.accelerator.register_load_state_pre_hook(self._load_lora_hook)
        self.skipped_in_a_row = 0  # optimizer steps skipped for a non-finite loss, gradient or reward
        self.skipped_total = 0
        self.last_checkpoint: Path | None = None

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [N, L, D] on the training device, in the frozen modules' dtype."""
        embeds = encode_prompts(self.pipe, prompts, self.text_device)
        return embeds.to(self.device, dtype=self.weight_dtype)

    def _save_lora_hook(self, models, weights, output_dir) -> None:
        if self.accelerator.is_main_process:
            unet = self.accelerator.unwrap_model(models[0])
            save_adapter(unet, Path(output_dir) / ADAPTER_DIR, base_model=self.config.model.base)
        weights.clear()

    def _load_lora_hook(self, models, input_dir) -> None:
        load_lora_state(self.accelerator.unwrap_model(models[0]), Path(input_dir) / ADAPTER_DIR)
        models.clear()

    # ---------------------------------------------------------------- sampling
    def sample_epoch(self, epoch: int) -> Samples:
        cfg, acc = self.config, self.accelerator
        G = cfg.sample.group_size
        batches = epoch_prompts(
            self.prompt_sets,
            cfg.sample.prompts_per_batch,
            cfg.sample.batches_per_epoch,
            cfg.seed,
            epoch,
            acc.process_index,
            acc.num_processes,
        )
        unet = acc.unwrap_model(self.unet)
        unet.eval()
        channels = unet.config.in_channels
        parts = defaultdict(list)
        for b, batch in enumerate(batches):
            texts = [p for p, _ in batch]
            # one generator per prompt group, keyed by the group's global slot: a group's samples are the
            # same whichever batch or rank it lands in (1 process x 2P prompts == 2 processes x P)
            first = first_slot(
                epoch, b, acc.process_index, acc.num_processes, len(texts), cfg.sample.batches_per_epoch
            )
            gen = [_generator(cfg.seed, epoch, first + j) for j in range(len(texts))]
            n_noise = len(texts) if cfg.sample.shared_initial_noise else len(texts) * G
            noise = block_noise((n_noise, channels, self.latent_size, self.latent_size), gen)
            if cfg.sample.shared_initial_noise:
                noise = noise.repeat_interleave(G, dim=0)
            with self.timer("sampling"):
                cond = self.encode(texts).repeat_interleave(G, dim=0)  # [P*G, L, D]
                uncond = self.uncond.expand(cond.shape[0], -1, -1) if self.uncond is not None else None
                with acc.autocast():
                    traj = sample_trajectories(
                        unet,
                        self.schedule,
                        cond,
                        uncond,
                        noise.to(self.device),
                        cfg.sample.guidance_scale,
                        cfg.sample.eta,
                        gen,
                        on_step=self.progress.update,
                    )
            with self.timer("decode"):
                images = decode_images(self.pipe.vae, traj.latents[:, -1], cfg.sample.decode_batch_size)
            expanded = [t for t in texts for _ in range(G)]
            with self.timer("reward"):
                rewards = self.reward_fn(images, expanded).float().to(self.device)
            parts["prompts"].extend(expanded)
            parts["set_index"].append(
                torch.tensor([i for _, i in batch], device=self.device).repeat_interleave(G)
            )
            for name, value in (
                ("cond", cond),
                ("latents", traj.latents),
                ("log_probs", traj.log_probs),
                ("images", images),
                ("rewards", rewards),
            ):
                parts[name].append(value)
        cat = {k: torch.cat(v) for k, v in parts.items() if k != "prompts"}
        return Samples(prompts=parts["prompts"], **cat)

    # ---------------------------------------------------------------- update
    def update(self, samples: Samples, advantages: torch.Tensor, epoch: int) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        tcfg = cfg.train
        unet = self.unet
        unet.train()
        n = samples.latents.shape[0]
        gen = _generator(cfg.seed, epoch, acc.process_index, 7919)
        stats: dict[str, list[float]] = defaultdict(list)
        first_ratios: list[torch.Tensor] = []
        optimizer_steps = 0
        nonfinite = False  # a non-finite loss in the current accumulation window
        for _ in range(tcfg.inner_epochs):
            perm = torch.randperm(n, generator=gen)
            steps = subsample_timesteps(
                n, self.schedule.num_steps, tcfg.timestep_fraction, gen, tcfg.timesteps == "earliest"
            )  # [N, k]
            k = steps.shape[1]
            minibatches = perm.split(tcfg.batch_size)
            for m, rows in enumerate(minibatches):
                rows_d = rows.to(self.device)
                cond = samples.cond[rows_d]
                uncond = self.uncond.expand(rows.shape[0], -1, -1) if self.uncond is not None else None
                closes_step = (m + 1) % tcfg.gradient_accumulation_steps == 0
                for j in range(k):
                    idx = steps[rows, j].to(self.device)  # [b] step index per trajectory
                    x_t = samples.latents[rows_d, idx]
                    x_prev = samples.latents[rows_d, idx + 1]
                    sync = closes_step and j == k - 1
                    ctx = contextlib.nullcontext() if sync else acc.no_sync(unet)
                    step_args = (
                        self.schedule,
                        idx,
                        x_t,
                        x_prev,
                        cond,
                        uncond,
                        cfg.sample.guidance_scale,
                        cfg.sample.eta,
                    )
                    with ctx:
                        with acc.autocast():
                            log_prob, mean, std = step_log_prob(unet, *step_args)
                        loss, m_stats = clipped_policy_loss(
                            log_prob, samples.log_probs[rows_d, idx], advantages[rows_d], tcfg.clip_range
                        )
                        if tcfg.kl_coef > 0:
                            with torch.no_grad(), adapter_disabled(acc.unwrap_model(unet)), acc.autocast():
                                _, ref_mean, _ = step_log_prob(unet, *step_args)
                            kl = gaussian_kl(mean, std, ref_mean, std).mean()
                            loss = loss + tcfg.kl_coef * kl
                            stats["kl"].append(kl.item())
                        if not torch.isfinite(loss):
                            # zero gradients through every LoRA parameter keep DDP's reducer in step
                            nonfinite = True
                            loss = torch.stack([(p * 0).sum() for p in self.params]).sum()
                        acc.backward(loss / (k * tcfg.gradient_accumulation_steps))
                    stats["loss"].append(loss.item())
                    self.progress.update()
                    for name, value in m_stats.items():
                        stats[name].append(value.item())
                    if optimizer_steps == 0:
                        first_ratios.append(torch.exp(log_prob.detach() - samples.log_probs[rows_d, idx]))
                if closes_step:
                    if tcfg.max_grad_norm > 0:
                        norm = acc.clip_grad_norm_(self.params, tcfg.max_grad_norm)
                    else:
                        norm = torch.linalg.vector_norm(
                            torch.stack([p.grad.norm() for p in self.params if p.grad is not None])
                        )
                    # every rank takes the same decision: a flag summed over ranks
                    flag = torch.tensor(float(nonfinite or not torch.isfinite(norm)), device=self.device)
                    if acc.reduce(flag, "sum").item() > 0:
                        self.optimizer.zero_grad(set_to_none=True)
                        self._count_skip("a non-finite loss or gradient")
                    else:
                        stats["grad_norm"].append(float(norm))
                        self.optimizer.step()
                        self.lr_scheduler.step()
                        self.optimizer.zero_grad(set_to_none=True)
                        optimizer_steps += 1
                        self.skipped_in_a_row = 0
                    nonfinite = False
        out = self._gather_stats(stats)
        first = acc.gather(torch.cat(first_ratios)) if first_ratios else torch.full((1,), float("nan"))
        out.update(
            first_ratio_mean=first.mean().item(),
            first_ratio_min=first.min().item(),
            first_ratio_max=first.max().item(),
            optimizer_steps=optimizer_steps,
            lr=self.lr_scheduler.get_last_lr()[0],
        )
        return out

    def _gather_stats(self, stats: dict[str, list[float]]) -> dict[str, float]:
        """Per-epoch means over every rank (ratio_min/max: the extremes over every rank)."""
        names = sorted(stats)
        local = torch.tensor([_summarise(n, stats[n]) for n in names], device=self.device)
        every = self.accelerator.gather(local[None])  # [world, K]
        return {n: _summarise(n, every[:, i].tolist()) for i, n in enumerate(names)}

    def _count_skip(self, why: str, steps: int = 1) -> None:
        """Count skipped optimizer steps; stop after train.max_skipped_steps in a row."""
        self.skipped_in_a_row += steps
        self.skipped_total += steps
        limit = self.config.train.max_skipped_steps
        if self.skipped_in_a_row >= limit:
            kept = (
                f"the last good checkpoint is {self.last_checkpoint}"
                if self.last_checkpoint
                else "no checkpoint was written"
            )
            raise UserError(
                f"training stopped: {self.skipped_in_a_row} optimizer steps in a row were skipped ({why}); "
                f"{kept}. Check the reward model on these prompts or lower train.learning_rate"
            )

    def skip_update(self, num_samples: int, why: str) -> dict[str, float]:
        """No usable sample this epoch: skip the optimizer steps the update would have taken."""
        tcfg = self.config.train
        per_inner = math.ceil(num_samples / tcfg.batch_size) // tcfg.gradient_accumulation_steps
        self.log(f"skipping this epoch's update: {why}")
        self._count_skip(why, max(1, tcfg.inner_epochs * per_inner))
        return {"optimizer_steps": 0, "lr": self.lr_scheduler.get_last_lr()[0]}

    # ---------------------------------------------------------------- main loop
    def start(self) -> None:
        """Create the run directory and write the resolved config (the base model's actual folder or hub id)."""
        cfg = self.config
        if self.accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = copy.deepcopy(cfg)
            resolved.model.base = self.base_ref
            resolved.output.dir = str(self.run_dir.resolve())
            save_config(resolved, self.run_dir / "config.yaml")
            self.log(f"run dir {self.run_dir}  base {self.base_ref}  {cfg.samples_per_epoch} samples/epoch")

    def run_epoch(self, epoch: int) -> dict:
        """One GRPO iteration; returns (and logs) its metrics row."""
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        self.timer.seconds.clear()
        self.progress = epoch_progress(cfg, epoch, enabled=acc.is_main_process)
        # ---- SAMPLE + SCORE
        samples = self.sample_epoch(epoch)
        # ---- ADVANTAGES (whole groups live on one process, so local normalisation is exact)
        grouped = samples.rewards.view(-1, cfg.sample.group_size)  # [P, G]
        finite = torch.isfinite(grouped).all(dim=1)  # a group with a non-finite reward sits this epoch out
        safe_grouped = torch.where(finite[:, None], grouped, torch.zeros_like(grouped))
        advantages = clip_advantages(
            group_advantages(safe_grouped), cfg.train.adv_clip_max
        ).flatten()  # [P*G]
        spread = grouped[finite].std(dim=1, unbiased=False) if finite.any() else grouped.new_ones(0)
        zero_adv = (spread < 1e-6).float()
        counts = acc.reduce(
            torch.tensor(
                [float((~finite).sum()), float(finite.sum()), float(zero_adv.sum())], device=self.device
            ),
            "sum",
        )
        bad_groups, good_groups, zero_groups = (int(v) for v in counts.tolist())
        # ---- UPDATE
        with self.timer("train"):
            if good_groups > 0:
                update_stats = self.update(samples, advantages, epoch)
            else:
                update_stats = self.skip_update(samples.latents.shape[0], "every reward was non-finite")
        # ---- LOG (rewards gathered from every rank)
        rewards = acc.gather(samples.rewards)
        set_index = acc.gather(samples.set_index)
        ok = torch.isfinite(rewards)
        safety = [self.prompt_sets[i].safety for i in set_index[ok].tolist()]
        names = [s.name for s in self.prompt_sets]
        stats = reward_stats(rewards[ok], set_index[ok], safety, names) if ok.any() else {}
        row = {"epoch": epoch, "samples": int(rewards.numel()), **stats, **update_stats}
        row["zero_advantage_groups"] = zero_groups / max(1, good_groups)
        row["nonfinite_reward_groups"] = bad_groups
        row["skipped_steps_total"] = self.skipped_total
        row.update({f"time_{k}": v for k, v in self.timer.seconds.items()})
        row["time_epoch"] = time.perf_counter() - start
        self.progress.close()
        if acc.is_main_process and self.periodic is not None and self.periodic.due(epoch):
            # ---- EVALUATE (fixed prompts and seeds: the numbers move only because the model does)
            eval_start = time.perf_counter()
            row.update(self.periodic.run(epoch))
            row["time_eval"] = time.perf_counter() - eval_start
        if acc.is_main_process:
            self.metrics.write(row)
            self.log(console_line(row, cfg.train.epochs))
            every = cfg.output.sample_grid_every
            if every and (epoch % every == 0 or epoch == cfg.train.epochs - 1):
                firsts = list(range(0, len(samples.prompts), cfg.sample.group_size))[: cfg.output.grid_images]
                local_safety = [self.prompt_sets[i].safety for i in samples.set_index.tolist()]
                captions = [
                    f"[{local_safety[i]}] {samples.prompts[i]}  r={samples.rewards[i].item():.3f}"
                    for i in firsts
                ]
                save_grid(
                    samples.images[firsts], captions, self.run_dir / "samples" / f"epoch_{epoch:04d}.png"
                )
        return row

    def save(self) -> Path:
        """Write the adapter in diffusers format (with its metadata) to RUN_DIR/adapter."""
        acc = self.accelerator
        acc.wait_for_everyone()
        adapter_dir = self.run_dir / "adapter"
        if acc.is_main_process:
            save_adapter(acc.unwrap_model(self.unet), adapter_dir, base_model=self.config.model.base)
            self.log(f"adapter saved to {adapter_dir}")
        return adapter_dir

    def eval_suite(self):
        """The evaluation the recipe asks for around training, or None."""
        ecfg = self.config.evaluate
        if ecfg.suite == "toyworld":
            from lora_grpo.toyworld.evaluate import ToyworldSuite

            return ToyworldSuite(self, ecfg.images_per_set, ecfg.seed)
        return None

    # ---------------------------------------------------------------- checkpoints
    def checkpoint(self, next_epoch: int) -> Path:
        """Write RUN/checkpoints/epoch_<next_epoch> atomically (all ranks take part)."""
        state = {
            "next_epoch": next_epoch,  # the prompt cursor: epoch_prompts is a pure function of the epoch
            "world_size": self.accelerator.num_processes,
            "skipped_in_a_row": self.skipped_in_a_row,
            "skipped_total": self.skipped_total,
        }
        path = write_checkpoint(
            self.accelerator, self.run_dir, next_epoch, state, self.config.output.keep_checkpoints
        )
        self.last_checkpoint = path
        return path

    def resume(self, checkpoint: Path) -> int:
        """Load a checkpoint (LoRA, optimizer, LR scheduler, every RNG); returns the epoch to continue from."""
        state = read_trainer_state(checkpoint)
        if state.get("world_size") != self.accelerator.num_processes:
            self.log(
                f"warning: the checkpoint was written by {state.get('world_size')} processes and this run has "
                f"{self.accelerator.num_processes}: training continues, but not bit-identically"
            )
        self.accelerator.load_state(str(checkpoint))
        self.skipped_in_a_row = state["skipped_in_a_row"]
        self.skipped_total = state["skipped_total"]
        self.last_checkpoint = checkpoint
        next_epoch = int(state["next_epoch"])
        if self.accelerator.is_main_process:
            self.metrics.truncate(next_epoch)
        self.log(f"resumed from {checkpoint} at epoch {next_epoch + 1}/{self.config.train.epochs}")
        return next_epoch

    def _checkpoint_due(self, epoch: int) -> bool:
        every = self.config.output.checkpoint_every
        return bool(every) and (epoch + 1) % every == 0

    def _stop_agreed(self, stop: StopRequests) -> int:
        """The signal any rank received (0: none), agreed across ranks so all of them stop together."""
        flag = torch.tensor([float(stop.signum or 0)], device=self.device)
        return int(self.accelerator.gather(flag).max().item())

    def run(self, resume: Path | None = None) -> Path:
        self.start()
        first_epoch = self.resume(resume) if resume else 0
        suite = self.eval_suite() if self.accelerator.is_main_process else None
        if suite:
            suite.before()
        epochs = self.config.train.epochs
        with StopRequests(self.log) as stop:
            for epoch in range(first_epoch, epochs):
                self.run_epoch(epoch)
                signum = self._stop_agreed(stop)
                # while steps are being skipped the last good checkpoint stays the newest one
                due = self.skipped_in_a_row == 0 and (self._checkpoint_due(epoch) or epoch == epochs - 1)
                if signum or due:
                    path = self.checkpoint(epoch + 1)
                    if signum and epoch < epochs - 1:
                        raise TrainingInterrupted(
                            signum,
                            f"stopped after epoch {epoch + 1}/{epochs}; checkpoint {path}; continue with "
                            f"`lora-grpo train {self.config.name} --resume {self.run_dir}`",
                        )
        adapter_dir = self.save()
        if suite:
            suite.after()
        return adapter_dir


def train(
    config: Config,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
    resume: Path | None = None,
) -> Path:
    """Train a safety LoRA with `config` (continuing from checkpoint `resume`); return the adapter folder."""
    return Trainer(config, run_dir, log).run(resume)
