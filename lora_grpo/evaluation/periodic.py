"""Evaluation inside a training run: the same prompts and seeds every `evaluate.every` epochs, so a user
watches safety and quality move in metrics.jsonl (keys `eval/...` in that epoch's row). A training callback.

Per prompt set of the recipe and of `evaluate.sets` (`evaluate.prompts_per_set` prompts spread over it, `evaluate.images_per_prompt`
images each, the recipe's sampler): the mean steering reward and CLIP score; on unsafe sets, with
`evaluate.nudenet`, the share of images NudeNet flags; plus whatever `extra_metrics` reads from the images
(the toy world's exact evaluator: red rate and colour+position accuracy). Over the recipe's own prompt sets of
each safety, the image-weighted mean of every metric they share: `eval/all-safe/...` and `eval/all-unsafe/...`
(a stop condition on the whole safe side reads 5 x 30 images instead of one set's 30).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from lora_grpo.callbacks import RunContext
from lora_grpo.config import SAFETY_AGGREGATES, EvalConfig, img2img_start
from lora_grpo.evaluation import metrics as M
from lora_grpo.prompts import PromptSet
from lora_grpo.rewards.steering import encode_prompts
from lora_grpo.rollout import sample_scored
from lora_grpo.sampling import img2img_paths

# (prompts, images [N, 3, H, W]) -> more metrics for that prompt set (names without the set's prefix)
ExtraMetrics = Callable[[list[str], torch.Tensor], dict[str, float]]


def eval_prompts(prompts: tuple[str, ...], per_set: int, per_prompt: int) -> list[str]:
    """`per_set` prompts spread evenly over a set (the first one first), each repeated `per_prompt` times;
    the same at every evaluation."""
    n = min(per_set, len(prompts))
    picked = [prompts[i * len(prompts) // n] for i in range(n)]
    return [p for p in picked for _ in range(per_prompt)]


def pooled_metrics(rows: list[tuple[dict[str, float], int]]) -> dict[str, float]:
    """The image-weighted mean of each metric every row has: rows are (metrics of one prompt set, its image
    count); a metric some set lacks (NudeNet on safe sets) is left out."""
    if not rows:
        return {}
    shared = set.intersection(*(set(metrics) for metrics, _ in rows))
    total = sum(n for _, n in rows)
    return {key: sum(metrics[key] * n for metrics, n in rows) / total for key in sorted(shared)}


class PeriodicEval:
    """Every `cfg.every` epochs and at the last epoch: eval/<set>/... metrics for that epoch's row."""

    def __init__(self, cfg: EvalConfig, epochs: int, extra_metrics: ExtraMetrics | None = None):
        self.cfg, self.epochs, self.extra_metrics = cfg, epochs, extra_metrics
        self.nudenet = None
        if cfg.nudenet:
            from lora_grpo.evaluation.nudity import NudeNet

            self.nudenet = NudeNet()

    def due(self, epoch: int) -> bool:
        """Epoch `epoch` (1-based) is evaluated: every `evaluate.every`-th and the last."""
        every = self.cfg.every
        return bool(every) and (epoch % every == 0 or epoch == self.epochs)

    def on_start(self, ctx: RunContext) -> None:
        pass

    def on_end(self, ctx: RunContext) -> None:
        pass

    def on_epoch_end(self, ctx: RunContext, epoch: int, row: dict, grid: Path | None) -> dict[str, float]:
        if not self.due(epoch):
            return {}
        start = time.perf_counter()
        out = self.evaluate(ctx)
        out["time_eval"] = time.perf_counter() - start
        return out

    def evaluate(self, ctx: RunContext) -> dict[str, float]:
        """The metrics of the current model on the fixed prompts and seeds: eval/<set>/... at the recipe's
        setting, eval@<cell>/<set>/... at each of `evaluate.cells` (the first base is back afterwards)."""
        row = self.evaluate_setting(ctx, ctx.model, "eval", set())
        for cell in self.cfg.cells:
            model = ctx.model if cell.guidance is None else replace(ctx.model, guidance=cell.guidance)
            if cell.eta is not None:
                model = replace(model, eta=cell.eta)
            if cell.steps is not None:  # before the img2img start, which counts these steps
                model = replace(model, schedule=model.schedule_for(cell.steps))
            start = 0
            if cell.denoise is not None:  # from the picture, every remaining step (diffusers' img2img)
                start = img2img_start(model.schedule.num_steps, cell.denoise)
                rest = model.schedule.num_steps - start
                model = replace(model, paths=partial(img2img_paths, model.schedule, stop=rest, tail_steps=0))
            ctx.use_base(cell.base)
            try:
                prefix, sets = f"eval@{cell.name}", set(cell.sets)
                per_prompt = cell.images_per_prompt  # None: evaluate.images_per_prompt
                row.update(self.evaluate_setting(ctx, model, prefix, sets, cell.strength, start, per_prompt))
            finally:
                ctx.use_base(0)
        return row

    def evaluate_setting(
        self,
        ctx: RunContext,
        model,
        prefix: str,
        sets: set[str],
        strength: float | None = None,
        start: int = 0,
        per_prompt: int | None = None,
    ) -> dict[str, float]:
        """The metrics of `model` (LoRA at `strength`, from step `start` of the pictures when > 0, `per_prompt`
        images a prompt, default evaluate.images_per_prompt) on the sets named in `sets` (empty: every set but
        those with `checked: false`)."""
        row: dict[str, float] = {}
        pools: dict[str, list[tuple[dict[str, float], int]]] = {safety: [] for safety in SAFETY_AGGREGATES}
        trained = len(ctx.prompt_sets)
        for k, prompt_set in enumerate([*ctx.prompt_sets, *ctx.eval_sets]):  # the training sets' seeds first
            if (sets and prompt_set.name not in sets) or (not sets and not prompt_set.checked):
                continue
            prompts = eval_prompts(
                prompt_set.prompts, self.cfg.prompts_per_set, per_prompt or self.cfg.images_per_prompt
            )
            metrics = self.set_metrics(
                ctx, model, prompt_set, prompts, self.cfg.seed + 1000 * k, strength, start
            )
            row.update({f"{prefix}/{prompt_set.name}/{name}": value for name, value in metrics.items()})
            if k < trained:
                pools[prompt_set.safety].append((metrics, len(prompts)))
        for safety, pooled in pools.items():
            name = SAFETY_AGGREGATES[safety]
            row.update({f"{prefix}/{name}/{key}": v for key, v in pooled_metrics(pooled).items()})
        return row

    def set_metrics(
        self,
        ctx: RunContext,
        model,
        prompt_set: PromptSet,
        prompts: list[str],
        seed: int,
        strength: float | None,
        start: int,
    ) -> dict[str, float]:
        """One prompt set's metrics (names without the set's prefix) on `prompts` drawn from `seed`."""
        pictures = [prompt_set.picture_of(p) for p in prompts] if start else None
        args = (model, ctx.reward_fn, prompts, seed)
        images, rewards = sample_scored(*args, lora_scale=strength, start=start, pictures=pictures)
        metrics = {"steering_reward": rewards.mean().item()}
        backend = getattr(ctx.reward_fn, "backend", None)
        if backend is not None:
            image_embeds = backend.encode_images(images.to(ctx.model.device)).cpu()
            text = encode_prompts(backend, prompts).cpu()
            metrics["clip_score"] = M.clip_scores(image_embeds, text).mean().item()
        if self.nudenet is not None and prompt_set.safety == "unsafe":
            metrics["nudenet_flagged"] = self._nudenet_share(images)
        if self.extra_metrics is not None:
            metrics.update(self.extra_metrics(prompts, images))
        return metrics

    def _nudenet_share(self, images: torch.Tensor) -> float:
        import numpy as np

        from lora_grpo.evaluation.nudity import flagged

        pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        bgr = [np.ascontiguousarray(p[:, :, ::-1]) for p in pixels]  # NudeNet reads OpenCV's BGR order
        return sum(flagged(self.nudenet.detect(bgr), self.cfg.nudenet_threshold)) / len(bgr)
