"""Evaluation inside a training run: the same prompts and seeds every `evaluate.every` epochs, so a user
watches safety and quality move in metrics.jsonl (keys `eval/...` in that epoch's row).

Per prompt set of the recipe (`evaluate.prompts_per_set` prompts spread over it, `evaluate.images_per_prompt`
images each, the recipe's sampler): the mean steering reward and CLIP score; on unsafe sets, with
`evaluate.nudenet`, the share of images NudeNet flags; in the toy world, the exact evaluator's red rate
(unsafe sets) and colour+position accuracy (safe sets).
"""

from __future__ import annotations

import torch

from lora_grpo.evaluation import metrics as M
from lora_grpo.rewards.steering import encode_prompts


def sample_images(
    trainer, prompts: list[str], seed: int, batch: int = 40
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 3, H, W] and steering rewards [N] from the trainer's current model with its recipe sampler.

    Seeds are fixed per (seed, batch index), so calling this at different points of training compares the
    models on the same noise.
    """
    from lora_grpo.sampling import sample_trajectories
    from lora_grpo.train import _generator, decode_images

    cfg, acc = trainer.config, trainer.accelerator
    unet = acc.unwrap_model(trainer.unet)
    was_training = unet.training
    unet.eval()
    images, rewards = [], []
    for b in range(0, len(prompts), batch):
        texts = prompts[b : b + batch]
        gen = _generator(seed, b)
        noise = torch.randn(
            (len(texts), unet.config.in_channels, trainer.latent_size, trainer.latent_size), generator=gen
        )
        cond = trainer.encode(texts)
        uncond = trainer.uncond.expand(len(texts), -1, -1) if trainer.uncond is not None else None
        with acc.autocast():
            traj = sample_trajectories(
                unet,
                trainer.schedule,
                cond,
                uncond,
                noise.to(trainer.device),
                cfg.sample.guidance_scale,
                cfg.sample.eta,
                gen,
            )
        decoded = decode_images(trainer.pipe.vae, traj.latents[:, -1], cfg.sample.decode_batch_size)
        images.append(decoded.cpu())
        rewards.append(trainer.reward_fn(decoded, texts).float().cpu())
    unet.train(was_training)
    return torch.cat(images), torch.cat(rewards)


def eval_prompts(prompts: tuple[str, ...], per_set: int, per_prompt: int) -> list[str]:
    """`per_set` prompts spread evenly over a set (the first one first), each repeated `per_prompt` times;
    the same at every evaluation."""
    n = min(per_set, len(prompts))
    picked = [prompts[i * len(prompts) // n] for i in range(n)]
    return [p for p in picked for _ in range(per_prompt)]


class PeriodicEval:
    def __init__(self, trainer):
        self.trainer = trainer
        self.cfg = trainer.config.evaluate
        self.nudenet = None
        if self.cfg.nudenet:
            from lora_grpo.evaluation.nudity import NudeNet

            self.nudenet = NudeNet()

    def due(self, epoch: int) -> bool:
        every = self.cfg.every
        return bool(every) and ((epoch + 1) % every == 0 or epoch == self.trainer.config.train.epochs - 1)

    def run(self, epoch: int) -> dict[str, float]:
        trainer = self.trainer
        backend = getattr(trainer.reward_fn, "backend", None)
        row: dict[str, float] = {}
        for k, prompt_set in enumerate(trainer.prompt_sets):
            prompts = eval_prompts(prompt_set.prompts, self.cfg.prompts_per_set, self.cfg.images_per_prompt)
            images, rewards = sample_images(trainer, prompts, self.cfg.seed + 1000 * k)
            key = f"eval/{prompt_set.name}"
            row[f"{key}/steering_reward"] = rewards.mean().item()
            if backend is not None:
                image_embeds = backend.encode_images(images.to(trainer.device)).cpu()
                text = encode_prompts(backend, prompts).cpu()
                row[f"{key}/clip_score"] = M.clip_scores(image_embeds, text).mean().item()
            if self.nudenet is not None and prompt_set.safety == "unsafe":
                row[f"{key}/nudenet_flagged"] = self._nudenet_share(images)
            if trainer.config.evaluate.suite == "toyworld":
                row.update(toyworld_row(key, prompts, images))
        return row

    def _nudenet_share(self, images: torch.Tensor) -> float:
        import numpy as np

        from lora_grpo.evaluation.nudity import flagged

        pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        bgr = [np.ascontiguousarray(p[:, :, ::-1]) for p in pixels]  # NudeNet reads OpenCV's BGR order
        return sum(flagged(self.nudenet.detect(bgr), self.cfg.nudenet_threshold)) / len(bgr)


def toyworld_row(key: str, prompts: list[str], images: torch.Tensor) -> dict[str, float]:
    from lora_grpo.toyworld.evaluate import composition_readings
    from lora_grpo.toyworld.evaluator import read_images
    from lora_grpo.toyworld.world import UNSAFE_COLOUR

    pairs = composition_readings(prompts, read_images(images))
    if not pairs:
        return {}
    return {
        f"{key}/red_rate": sum(r.colour == UNSAFE_COLOUR for _, r in pairs) / len(pairs),
        f"{key}/colour_position": sum(r.colour == c.colour and r.position == c.position for c, r in pairs)
        / len(pairs),
    }
