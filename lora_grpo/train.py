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
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch

from lora_grpo.config import Config, TrainConfig, save_config
from lora_grpo.errors import UserError
from lora_grpo.grpo import (
    clip_advantages,
    clipped_policy_loss,
    gaussian_kl,
    group_advantages,
    subsample_timesteps,
)
from lora_grpo.models import add_lora, freeze, load_pipeline, resolve_model_ref, save_adapter
from lora_grpo.prompts import PromptSet, epoch_prompts, load_prompt_set
from lora_grpo.rewards import build_reward
from lora_grpo.sampling import DdimSchedule, ddim_schedule, sample_trajectories, step_log_prob
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
        self.base_ref = resolve_model_ref(config.model.base)
        self.pipe = load_pipeline(config.model, dtype=weight_dtype)
        freeze(self.pipe)
        self.pipe.to(self.device)
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
            self.uncond = encode_prompts(self.pipe, [config.sample.negative_prompt], self.device)  # [1, L, D]
        scale = self.pipe.vae_scale_factor
        self.latent_size = (config.sample.resolution or self.pipe.unet.config.sample_size * scale) // scale
        self.timer = PhaseTimer(self.device)
        self.progress = _no_progress()
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")

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
            gen = _generator(cfg.seed, epoch, acc.process_index, b)
            n_noise = len(texts) if cfg.sample.shared_initial_noise else len(texts) * G
            noise = torch.randn((n_noise, channels, self.latent_size, self.latent_size), generator=gen)
            if cfg.sample.shared_initial_noise:
                noise = noise.repeat_interleave(G, dim=0)
            with self.timer("sampling"):
                cond = encode_prompts(self.pipe, texts, self.device).repeat_interleave(
                    G, dim=0
                )  # [P*G, L, D]
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
        for _ in range(tcfg.inner_epochs):
            perm = torch.randperm(n, generator=gen)
            steps = subsample_timesteps(n, self.schedule.num_steps, tcfg.timestep_fraction, gen)  # [N, k]
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
                    stats["grad_norm"].append(float(norm))
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    optimizer_steps += 1
        first = torch.cat(first_ratios)
        out = {name: sum(v) / len(v) for name, v in stats.items() if name not in ("ratio_min", "ratio_max")}
        out["ratio_max"] = max(stats["ratio_max"])
        out["ratio_min"] = min(stats["ratio_min"])
        out.update(
            first_ratio_mean=first.mean().item(),
            first_ratio_min=first.min().item(),
            first_ratio_max=first.max().item(),
            optimizer_steps=optimizer_steps,
            lr=self.lr_scheduler.get_last_lr()[0],
        )
        return out

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
        advantages = clip_advantages(group_advantages(grouped), cfg.train.adv_clip_max).flatten()  # [P*G]
        zero_adv = (grouped.std(dim=1, unbiased=False) < 1e-6).float().mean().item()
        # ---- UPDATE
        with self.timer("train"):
            update_stats = self.update(samples, advantages, epoch)
        # ---- LOG
        safety = [self.prompt_sets[i].safety for i in samples.set_index.tolist()]
        names = [s.name for s in self.prompt_sets]
        stats = reward_stats(samples.rewards, samples.set_index, safety, names)
        row = {"epoch": epoch, "samples": len(samples.prompts), **stats, **update_stats}
        row["zero_advantage_groups"] = zero_adv
        row.update({f"time_{k}": v for k, v in self.timer.seconds.items()})
        row["time_epoch"] = time.perf_counter() - start
        self.progress.close()
        if acc.is_main_process:
            self.metrics.write(row)
            self.log(console_line(row, cfg.train.epochs))
            every = cfg.output.sample_grid_every
            if every and (epoch % every == 0 or epoch == cfg.train.epochs - 1):
                firsts = list(range(0, len(samples.prompts), cfg.sample.group_size))[: cfg.output.grid_images]
                captions = [
                    f"[{safety[i]}] {samples.prompts[i]}  r={samples.rewards[i].item():.3f}" for i in firsts
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

    def run(self) -> Path:
        self.start()
        suite = self.eval_suite() if self.accelerator.is_main_process else None
        if suite:
            suite.before()
        for epoch in range(self.config.train.epochs):
            self.run_epoch(epoch)
        adapter_dir = self.save()
        if suite:
            suite.after()
        return adapter_dir


def train(config: Config, run_dir: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Train a safety LoRA with `config`; return the adapter folder."""
    return Trainer(config, run_dir, log).run()
