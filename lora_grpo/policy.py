"""Set up what a run trains: the accelerator, the frozen pipeline with its LoRA, the optimizer and LR schedule,
the frozen rollout view of the model, and LoRA-only checkpoints. Each step is a function of its own.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from lora_grpo.checkpoint import ADAPTER_DIR
from lora_grpo.config import Config, ModelConfig, SampleConfig, TrainConfig, value_range
from lora_grpo.errors import UserError
from lora_grpo.models import (
    PromptEncoder,
    add_lora,
    freeze,
    is_sdxl,
    load_lora_state,
    load_pipeline,
    save_adapter,
    text_encoders,
)
from lora_grpo.rollout import RolloutModel
from lora_grpo.sampling import coarse_tail, img2img_paths, step_schedule
from lora_grpo.update import Learner

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def setup_accelerator(cfg: TrainConfig, seed: int):
    """An accelerate `Accelerator` (DDP when launched with several processes) with the recipe's precision."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cpu = not torch.cuda.is_available()
    if cpu and cfg.mixed_precision == "fp16":
        raise UserError("train.mixed_precision=fp16 needs a GPU; use bf16 or no on a CPU")
    try:
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu)
    except ValueError as err:
        if "already been initialized" not in str(err):
            raise
        raise UserError(
            f"this process already trained with another train.mixed_precision; accelerate keeps one per "
            f"process, so start a new process for mixed_precision={cfg.mixed_precision}"
        ) from None
    if cfg.allow_tf32 and accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(seed)
    return accelerator


def frozen_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """The frozen modules' dtype: the mixed-precision dtype on a GPU, fp32 on the CPU (autocast still applies)."""
    return DTYPES[cfg.mixed_precision] if device.type == "cuda" else torch.float32


def setup_pipeline(config: Config, device: torch.device):
    """The base pipeline, frozen, on `device` in `frozen_dtype`; the text encoder optionally on the CPU."""
    tcfg = config.train
    pipe = load_pipeline(config.model, dtype=frozen_dtype(tcfg, device))
    freeze(pipe)
    pipe.to(device)
    if tcfg.offload_text_encoder:  # frees its GPU memory; prompts are few per epoch, the CPU is enough
        for encoder in text_encoders(pipe):
            encoder.to("cpu", dtype=torch.float32)
    upcast_sdxl_vae(pipe)
    return pipe


def upcast_sdxl_vae(pipe) -> None:
    """SDXL's VAE overflows in fp16: keep it in fp32 then, as diffusers' SDXL pipeline does (`force_upcast` in
    its config; an fp16-fix VAE sets it false and stays in fp16). bf16 and SD 1.x's VAE are left as they are."""
    if is_sdxl(pipe.unet.config) and pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)


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


def apply_optimizer_settings(learner: Learner, cfg: TrainConfig) -> None:
    """After a checkpoint loaded, give the optimizer and LR schedule the recipe's values where they differ
    (a resume with changed settings): the loaded state would otherwise keep the old learning rate, betas, eps
    and weight decay. The schedule's position is kept: the rate is the new base times its current factor."""
    optimizer = getattr(learner.optimizer, "optimizer", learner.optimizer)
    schedule = getattr(learner.lr_scheduler, "scheduler", learner.lr_scheduler)
    for i, group in enumerate(optimizer.param_groups):
        if schedule.base_lrs[i] != cfg.learning_rate:
            factor = schedule.lr_lambdas[i](schedule.last_epoch)
            schedule.base_lrs[i] = group["initial_lr"] = cfg.learning_rate
            group["lr"] = cfg.learning_rate * factor
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["eps"], group["weight_decay"] = cfg.adam_epsilon, cfg.adam_weight_decay
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


# Activation memory of one UNet row (one image at one step, forward kept for backward) without gradient
# checkpointing, measured on an H200 with SD 1.5 at 512 px in bf16 (benchmarks/RESULTS.md, 2026-11-27):
# peak 12.51 GiB without checkpointing, 5.86 GiB with, train batch 4 x CFG 2 = 8 rows -> 0.83 GiB a row.
ACTIVATION_GIB_PER_ROW_SD15 = (12.51 - 5.86) / 8
SD15_UNET_PARAMS, SD15_LATENT = 859_520_964, 64


def checkpointing_needed(unet_params: int, latent_size: int, train_rows: int, free_bytes: int) -> bool:
    """The `auto` rule: turn gradient checkpointing on when the activations a training forward keeps
    (the SD 1.5 measurement scaled by UNet size and latent area, times the rows of a minibatch) would take
    more than 90% of the GPU memory still free after loading the models."""
    scale = (unet_params / SD15_UNET_PARAMS) * (latent_size / SD15_LATENT) ** 2
    activations = ACTIVATION_GIB_PER_ROW_SD15 * 2**30 * scale * train_rows
    return activations > 0.9 * free_bytes


def latent_side(pipe, config: Config) -> int:
    """The latent side in pixels of the latent grid: sample.resolution (or the model's size) / VAE factor."""
    scale = pipe.vae_scale_factor
    return (config.sample.resolution or pipe.unet.config.sample_size * scale) // scale


def checkpointing_choice(config: Config, unet_params: int, latent_size: int, free_bytes: int | None) -> bool:
    """train.gradient_checkpointing resolved: on / off as written; auto by `checkpointing_needed` for a
    minibatch's UNet rows (batch x 2 with CFG), off without a GPU (`free_bytes` None)."""
    mode = config.train.gradient_checkpointing
    if mode != "auto":
        return mode == "on"
    if free_bytes is None:
        return False
    rows = config.train.batch_size * (2 if config.sample.uses_cfg else 1)
    return checkpointing_needed(unet_params, latent_size, rows, free_bytes)


def use_checkpointing(pipe, config: Config, device: torch.device) -> bool:
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    params = sum(p.numel() for p in pipe.unet.parameters())
    return checkpointing_choice(config, params, latent_side(pipe, config), free)


def lr_schedule(optimizer, config: Config, num_processes: int):
    """diffusers' schedule for train.lr_warmup_steps and train.lr_schedule. accelerate steps a prepared schedule
    once a process per optimizer step, so its lengths count in those ticks: a run's rates are the same on any
    number of processes."""
    from diffusers.optimization import get_scheduler

    from lora_grpo.tracking import epoch_work

    tcfg = config.train
    warmup = tcfg.lr_warmup_steps * num_processes
    if tcfg.lr_schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
    total = tcfg.epochs * epoch_work(config)["optimizer_steps"] * num_processes
    return get_scheduler(
        "cosine", optimizer, num_warmup_steps=warmup, num_training_steps=max(total, warmup + 1)
    )


def setup_learner(accelerator, pipe, config: Config, trainable: Callable = add_lora) -> Learner:
    """Add the trained parameters (`trainable(unet, lora_settings)`: the LoRA unless a benchmark swaps it),
    build the optimizer and LR schedule and hand them to accelerate."""
    tcfg = config.train
    checkpointing = use_checkpointing(pipe, config, accelerator.device)  # before the LoRA: base size
    torch.manual_seed(config.seed)  # LoRA init
    params = trainable(pipe.unet, config.lora)
    if checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    optimizer = make_optimizer(params, tcfg)
    lr_scheduler = lr_schedule(optimizer, config, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(pipe.unet, optimizer, lr_scheduler)
    return Learner(accelerator, unet, params, optimizer, lr_scheduler)


def base_bank(pipe, learner: Learner, config: Config):
    """The frozen UNets of model.base and model.bases (None without further bases)."""
    from lora_grpo.base_bank import BaseBank

    if not config.model.bases:
        return None
    dtype = frozen_dtype(config.train, learner.accelerator.device)
    extra = [ModelConfig(base=b) for b in config.model.bases]
    return BaseBank(learner.accelerator.unwrap_model(learner.unet), extra, dtype)


def rollout_model(pipe, learner: Learner, config: Config) -> RolloutModel:
    """The frozen view a rollout samples from: the learner's UNet (unwrapped), with the recipe's sampler."""
    acc, s = learner.accelerator, config.sample
    text_device = torch.device("cpu") if config.train.offload_text_encoder else acc.device
    side = latent_side(pipe, config)
    pixels = side * pipe.vae_scale_factor
    dtype = frozen_dtype(config.train, acc.device)
    encode = PromptEncoder(pipe, text_device, acc.device, dtype, size=(pixels, pixels))
    return RolloutModel(
        unet=acc.unwrap_model(learner.unet),
        vae=pipe.vae,
        schedule=step_schedule(pipe.scheduler, s.num_steps, s.sampler),
        # its own copy of the scheduler: set_timesteps for another step count leaves the pipeline's alone
        schedule_for=partial(step_schedule, copy.deepcopy(pipe.scheduler), sampler=s.sampler),
        encode=encode,
        uncond=encode.negative(s.negative_prompt),  # 1 row; unused at CFG 1
        latent_size=side,
        # a range: training draws per group; evaluation takes CFG's low end and eta's high end (the stochastic
        # sampler the checks have always read)
        guidance=value_range(s.guidance_scale)[0],
        eta=value_range(s.eta)[1],
        decode_batch_size=s.decode_batch_size,
        device=acc.device,
        autocast=acc.autocast,
    )


def training_sampler(model: RolloutModel, sample: SampleConfig) -> RolloutModel:
    """What training rollouts sample with: `model`, its schedule's steps after a first stochastic window
    replaced by `sample.tail_steps` larger deterministic ones when set. The window's steps (the only ones
    trained) are unchanged; evaluation (periodic and before/after) keeps the model's whole schedule."""
    coarse = coarse_tail(model.schedule, sample.sde_steps, sample.tail_steps)
    if sample.img2img.fraction <= 0:
        return replace(model, schedule=coarse)
    # groups may start from pictures: every row takes its own steps (a row from step 0: the coarse schedule's)
    paths = partial(img2img_paths, model.schedule, stop=sample.sde_steps, tail_steps=sample.tail_steps)
    return replace(model, schedule=coarse, paths=paths)


def save_lora_only_checkpoints(accelerator, base_model: str) -> None:
    """accelerate's save/load_state keep the LoRA only (it would otherwise write the whole frozen UNet)."""

    def save(models, weights, output_dir) -> None:
        if accelerator.is_main_process:
            unet = accelerator.unwrap_model(models[0])
            save_adapter(unet, Path(output_dir) / ADAPTER_DIR, base_model=base_model)
        weights.clear()

    def load(models, input_dir) -> None:
        load_lora_state(accelerator.unwrap_model(models[0]), Path(input_dir) / ADAPTER_DIR)
        models.clear()

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)
