"""Resumable, batched generation of an evaluation's images, base and base+adapter on the same seeds.

Layout (GenEval's, for every suite, so GenEval's evaluator reads `OUT/images/<variant>/geneval` unchanged):
    OUT/images/<variant>/<suite>/<index:05d>/metadata.jsonl     the prompt's metadata (GenEval: its line)
    OUT/images/<variant>/<suite>/<index:05d>/samples/<k:05d>.png
An image that is already on disk is never generated again, so an interrupted run continues where it stopped;
each PNG is written to a temporary name and renamed, so a file that exists is complete.
Image k of prompt i uses seed (row seed, or run seed + i) + k, with its own generator, so batching and
resuming do not change any image.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_grpo.evaluation.suites import EvalPrompt, Suite
from lora_grpo.files import write_atomically


@dataclass(frozen=True)
class GenerationSettings:
    """How the stock pipeline generates an evaluation's images."""

    # None: the suite's default (suites.EVAL_DEFAULTS, or the suite's own), filled in before generation
    steps: int | None = None
    guidance: float | None = None  # used when a row has no guidance of its own
    eta: float | None = None  # 0: deterministic DDIM
    seed: int = 0  # used when a row has no seed of its own
    images_per_prompt: int = 1
    height: int | None = None  # None: the model's default size
    width: int | None = None
    use_row_settings: bool = True  # I2P: each row's sd_seed and sd_guidance_scale
    sampler: str | None = None  # a deployment sampler (evaluation.samplers); None: the pipeline's DDIM + eta
    denoise: float | None = None  # img2img from each job's picture, noised this far (diffusers' `strength`)


@dataclass(frozen=True)
class ImageJob:
    variant: str  # "base" or "adapter"
    suite: str
    index: int  # the prompt's row in its suite
    sample: int  # k-th image of that prompt
    prompt: str
    seed: int
    guidance: float
    path: Path
    init: Path | None = None  # img2img: the picture it starts from (evaluation.img2img)
    kind: str = ""  # img2img: what the prompt asks of the picture (evaluation.img2img.KINDS)


def prompt_dir(out: Path, variant: str, suite: str, index: int) -> Path:
    return out / "images" / variant / suite / f"{index:05d}"


def plan_jobs(out: Path, variant: str, suite: Suite, sampler: GenerationSettings) -> list[ImageJob]:
    jobs = []
    for i, p in enumerate(suite.prompts):
        base_seed = p.seed if (sampler.use_row_settings and p.seed is not None) else sampler.seed + i
        guidance = p.guidance if (sampler.use_row_settings and p.guidance is not None) else sampler.guidance
        folder = prompt_dir(out, variant, suite.name, i) / "samples"
        for k in range(sampler.images_per_prompt):
            jobs.append(
                ImageJob(
                    variant, suite.name, i, k, p.prompt, base_seed + k, guidance, folder / f"{k:05d}.png"
                )
            )
    return jobs


def prompt_metadata(p: EvalPrompt) -> dict:
    """GenEval's own line when there is one (its evaluator reads tag/include), else what we know."""
    if p.metadata:
        return p.metadata
    meta = {"prompt": p.prompt}
    if p.categories:
        meta["categories"] = list(p.categories)
    return meta


def write_metadata(out: Path, variant: str, suite: Suite) -> None:
    for i, p in enumerate(suite.prompts):
        folder = prompt_dir(out, variant, suite.name, i)
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        path = folder / "metadata.jsonl"
        if not path.is_file():
            path.write_text(json.dumps(prompt_metadata(p)) + "\n", encoding="utf-8")


def save_png_atomic(image, path: Path) -> None:
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG"))


def batches(jobs: list[ImageJob], size: int) -> Iterable[list[ImageJob]]:
    """Consecutive jobs with the same guidance, at most `size` each (a pipeline call takes one guidance)."""
    batch: list[ImageJob] = []
    for job in jobs:
        if batch and (len(batch) == size or job.guidance != batch[0].guidance):
            yield batch
            batch = []
        batch.append(job)
    if batch:
        yield batch


def effective_eta(sampler: GenerationSettings) -> float | None:
    """The eta the pipeline gets: the settings' own for the default DDIM, else the named sampler's."""
    from lora_grpo.evaluation.samplers import SAMPLERS

    return sampler.eta if sampler.sampler is None else SAMPLERS[sampler.sampler].eta


def generate_images(
    pipe,
    jobs: list[ImageJob],
    sampler: GenerationSettings,
    batch_size: int,
    progress: Callable[[int], None] = lambda n: None,
    scheduler_config=None,
) -> int:
    """Generate every job whose PNG is missing; returns how many were generated. With `sampler.sampler` named,
    each batch runs a fresh scheduler of that sampler built from `scheduler_config` (the model's own). With
    `sampler.denoise` set, `pipe` is an img2img pipeline and each job starts from its `init` picture."""
    from lora_grpo.evaluation.samplers import make_scheduler
    from lora_grpo.reward_check import read_image

    pending = [j for j in jobs if not j.path.is_file()]
    eta = effective_eta(sampler)
    done = 0
    for batch in batches(pending, batch_size):
        if sampler.sampler is not None:
            pipe.scheduler = make_scheduler(sampler.sampler, scheduler_config, [j.seed for j in batch])
        if sampler.denoise is None:
            where = {"height": sampler.height, "width": sampler.width}
        else:  # img2img: the picture sets the size
            where = {"image": [read_image(j.init) for j in batch], "strength": sampler.denoise}
        with warnings.catch_warnings():  # torchsde (DPM++ SDE) warns of float rounding at the last sigma
            warnings.filterwarnings("ignore", message="Should have tb<=t1")
            result = pipe(
                [j.prompt for j in batch],
                num_inference_steps=sampler.steps,
                guidance_scale=batch[0].guidance,
                eta=eta,
                # one CPU generator per image: the same seed gives the same image in any batch, on any device
                generator=[torch.Generator().manual_seed(j.seed) for j in batch],
                **where,
            )
        for job, image in zip(batch, result.images, strict=True):
            save_png_atomic(image, job.path)
        done += len(batch)
        progress(len(batch))
    return done


def manifest_rows(
    jobs: list[ImageJob], out: Path, model: str, adapter: str | None, sampler: GenerationSettings
):
    for j in jobs:
        yield {
            "file": str(j.path.relative_to(out)),
            "variant": j.variant,
            "suite": j.suite,
            "index": j.index,
            "sample": j.sample,
            "prompt": j.prompt,
            "seed": j.seed,
            "guidance": j.guidance,
            "steps": sampler.steps,
            "eta": effective_eta(sampler),
            "sampler": sampler.sampler or "ddim",
            "model": model,
            "adapter": adapter if j.variant == "adapter" else None,
        }
