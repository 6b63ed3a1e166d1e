"""`lora-grpo attack`: find prompts (or a token embedding) that bring an erased concept back, then measure how
often they do, on the base model and on base + adapter.

OUT holds: settings.json (what was asked; a rerun with the same settings continues, other settings need
--overwrite), pictures.safetensors (the base's images of the targets, white-box methods), found.json (each
target's attack prompt, written as it is found), inversion_state.safetensors (concept-inversion, every 20 steps),
embedding.safetensors (concept-inversion: diffusers' `load_textual_inversion` format), prompts.csv (column
`prompt`: what `lora-grpo eval --suite` reads) and attack.json (settings, banned words, protocol, ASR).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from lora_grpo.attacks.measure import Protocol, concept_rates, draw, sd_protocol, toyworld_protocol
from lora_grpo.attacks.methods import (
    METHODS,
    PICTURES_PER_TARGET,
    SEARCHES,
    TEXT_ONLY,
    AttackModels,
    AttackSettings,
    Target,
    concept_inversion,
    rendered_pictures,
)
from lora_grpo.attacks.words import candidate_tokens, concept_words, without_banned
from lora_grpo.errors import UserError
from lora_grpo.files import write_atomically, write_text_atomically
from lora_grpo.progress import CountProgress


@dataclass(frozen=True)
class AttackJob:
    base: str
    adapter: str | None
    recipe: str
    out: Path
    settings: AttackSettings
    ban: tuple[str, ...] = ()
    targets: int = 8  # unsafe prompts attacked (spread over the recipe's unsafe sets)
    images_per_prompt: int | None = None  # ASR images a prompt (None: the protocol's)
    batch: int = 16
    device: str | None = None
    overwrite: bool = False
    sample_steps: int | None = None  # the ASR sampler's steps (None: the protocol's)
    guidance: float | None = None  # the ASR sampler's CFG (None: the protocol's)

    def record(self) -> dict:
        """What must match for a rerun to continue this folder."""
        return {
            "base": self.base,
            "adapter": self.adapter,
            "recipe": self.recipe,
            "ban": list(self.ban),
            "targets": self.targets,
            "images_per_prompt": self.images_per_prompt,
            "sample_steps": self.sample_steps,
            "guidance": self.guidance,
            "settings": asdict(self.settings),
        }


# ------------------------------------------------------------------------------------------------ checks
def check_numbers(job: AttackJob) -> None:
    s = job.settings
    if s.method not in METHODS:
        raise UserError(f"--method {s.method!r} is not an attack: use one of {', '.join(METHODS)}")
    for flag, value in (
        ("--tokens", s.tokens),
        ("--steps", s.steps),
        ("--candidates", s.batch),
        ("--targets", job.targets),
        ("--images-per-prompt", 1 if job.images_per_prompt is None else job.images_per_prompt),
    ):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if job.sample_steps is not None and job.sample_steps < 1:
        raise UserError(f"--sample-steps must be >= 1, got {job.sample_steps}")
    if job.guidance is not None and not (math.isfinite(job.guidance) and job.guidance >= 1):
        raise UserError(f"--guidance must be a finite number >= 1, got {job.guidance}")
    if not (math.isfinite(s.learning_rate) and s.learning_rate > 0):
        raise UserError(f"--learning-rate must be a finite number > 0, got {s.learning_rate}")
    if not (math.isfinite(s.lowest_timestep) and 0 <= s.lowest_timestep < 1):
        raise UserError(
            f"--lowest-timestep must be a share of the timesteps in [0, 1), got {s.lowest_timestep}"
        )
    if s.seed < 0:
        raise UserError(f"--seed must be >= 0, got {s.seed}")


def plan_targets(job: AttackJob) -> tuple[list[Target], list[str], str]:
    """Before any model loads: the targets (unsafe prompts and their concept-free versions), the banned
    words, and the detector ("toyworld" or "nudenet") the recipe implies."""
    from lora_grpo.config import load_config
    from lora_grpo.prompts import load_prompt_set
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.rewards.steering import load_anchors

    config = load_config(find_recipe(job.recipe))
    banned = sorted({*concept_words(load_anchors(config.reward.anchors)), *(w.lower() for w in job.ban)})
    if not banned:
        raise UserError(
            f"recipe {job.recipe}: its anchors name no concept word (unsafe words no safe anchor uses): pass "
            "--ban WORD for each word an attack prompt must not contain"
        )
    unsafe = [p for s in config.prompts.sets if s.safety == "unsafe" for p in load_prompt_set(s).prompts]
    if not unsafe:
        raise UserError(
            f"recipe {job.recipe} has no unsafe prompt set: attack a recipe that removes a concept"
        )
    n = min(job.targets, len(unsafe))
    picked = [unsafe[i * len(unsafe) // n] for i in range(n)]
    targets = [Target(p, without_banned(p, banned)) for p in picked]
    empty = next((t.unsafe for t in targets if not t.neutral), None)
    if empty is not None:
        raise UserError(
            f"unsafe prompt {empty!r} is nothing but banned words: attack a recipe with fuller prompts"
        )
    detector = "toyworld" if config.evaluate.suite == "toyworld" else "nudenet"
    return targets, banned, detector


# how the ASR is drawn, not what the search finds: a rerun with other values re-measures
MEASURING = ("images_per_prompt", "sample_steps", "guidance")


def _search_part(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in MEASURING}


def prepare_folder(job: AttackJob) -> None:
    """A new folder, or one holding this very attack (continued; other ASR settings re-measure what it found);
    other search settings need --overwrite."""
    from lora_grpo.runs import check_writable_folder

    check_writable_folder(job.out, "--out folder")
    recorded = job.out / "settings.json"
    if job.out.is_dir() and any(job.out.iterdir()):
        same = recorded.is_file() and _search_part(
            json.loads(recorded.read_text(encoding="utf-8"))
        ) == _search_part(job.record())
        if job.overwrite:
            shutil.rmtree(job.out)
        elif not same:
            raise UserError(
                f"--out folder {job.out} holds other files or another attack's settings: choose a new folder, or "
                "pass --overwrite to delete it and start again"
            )
    job.out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(recorded, json.dumps(job.record(), indent=2))


# ------------------------------------------------------------------------------------------------ models
def load_models(job: AttackJob):
    from lora_grpo.config import ModelConfig
    from lora_grpo.models import is_sdxl, load_adapter, load_pipeline, pick_device

    device = pick_device(job.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(ModelConfig(base=job.base), dtype=dtype)
    if is_sdxl(pipe.unet.config):
        raise UserError(
            "attacks search SD 1.x's single text encoder: give an SD 1.x base (SDXL is not supported)"
        )
    if job.adapter:
        load_adapter(pipe, job.adapter, adapter_name="safety")
    pipe.to(device)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False)
    return pipe


@contextlib.contextmanager
def adapter_off(pipe, has_adapter: bool):
    """The base model alone while active (a pipeline without an adapter is the base already)."""
    if not has_adapter:
        yield
        return
    pipe.disable_lora()
    try:
        yield
    finally:
        pipe.enable_lora()


def target_pictures(pipe, job: AttackJob, targets: list[Target], protocol: Protocol, log) -> torch.Tensor:
    """Images of the concept for each unsafe prompt, encoded [N * P, C, h, w], made once and kept in OUT: the
    toy world renders each prompt's composition (exactly the concept: the base draws it only most of the
    time); otherwise the base model's own images of the prompt."""
    from safetensors.torch import load_file, save_file

    from lora_grpo.models import encode_images

    path = job.out / "pictures.safetensors"
    if path.is_file():
        return load_file(path)["latents"]
    if protocol.detector == "toyworld":
        images = rendered_pictures([t.unsafe for t in targets], protocol.seed + 10_000)
    else:
        pictures = replace(protocol, images_per_prompt=PICTURES_PER_TARGET, seed=protocol.seed + 10_000)
        progress = CountProgress(len(targets) * PICTURES_PER_TARGET, "target pictures", "img", log)
        with adapter_off(pipe, job.adapter is not None):
            images = draw(pipe, [t.unsafe for t in targets], pictures, job.batch, progress.update)
        progress.close()
    latents = encode_images(pipe.vae, images.to(pipe.device)).cpu()
    write_atomically(path, lambda tmp: save_file({"latents": latents.contiguous()}, str(tmp)))
    return latents


# ------------------------------------------------------------------------------------------------ search
def search(pipe, job: AttackJob, targets: list[Target], banned: list[str], log) -> dict:
    """Each target's attack prompt (found.json, written target by target), or for concept-inversion the
    prompts and OUT/embedding.safetensors."""
    s = job.settings
    models = AttackModels(pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.scheduler)
    candidates = candidate_tokens(pipe.tokenizer, banned)
    found_path = job.out / "found.json"
    found = json.loads(found_path.read_text(encoding="utf-8")) if found_path.is_file() else {"targets": []}
    if s.method == "concept-inversion":
        return _invert(models, job, targets, banned, candidates, log)
    steps = CountProgress(len(targets) * s.steps, f"{s.method} search", "steps", log)
    steps.update(len(found["targets"]) * s.steps)
    for index in range(len(found["targets"]), len(targets)):
        prompt, loss = SEARCHES[s.method](
            models, targets, index, banned, candidates, s, lambda k, v: steps.update()
        )
        found["targets"].append(
            {**asdict(targets[index], dict_factory=_no_latents), "attack": prompt, "loss": loss}
        )
        write_text_atomically(found_path, json.dumps(found, indent=2))
        log(f"target {index + 1}/{len(targets)}: {targets[index].unsafe!r} -> {prompt!r} (loss {loss:.4f})")
    steps.close()
    return found


def _no_latents(items) -> dict:
    return {k: v for k, v in items if k != "latents"}


def _invert(models, job: AttackJob, targets, banned, candidates, log) -> dict:
    from safetensors.torch import load_file, save_file

    s, state_path = job.settings, job.out / "inversion_state.safetensors"
    state = load_file(state_path) if state_path.is_file() else None
    save = lambda st: write_atomically(state_path, lambda tmp: save_file(st, str(tmp)))  # noqa: E731
    steps = CountProgress(s.steps, "concept inversion", "steps", log)
    steps.update(int(state["step"].item()) if state else 0)
    prompts, vector, loss = concept_inversion(
        models, targets, banned, candidates, s, lambda k, v: steps.update(), state, save
    )
    steps.close()
    embedding = {s.token: vector.float().contiguous()}  # diffusers' format: the token names its embedding
    write_atomically(job.out / "embedding.safetensors", lambda tmp: save_file(embedding, str(tmp)))
    log(f"learned {s.token} (loss {loss:.4f}): {job.out / 'embedding.safetensors'}")
    rows = [
        {**asdict(t, dict_factory=_no_latents), "attack": p, "loss": loss}
        for t, p in zip(targets, prompts, strict=True)
    ]
    return {"targets": rows, "token": s.token}


# ------------------------------------------------------------------------------------------------ measure
def measure(pipe, job: AttackJob, found: dict, protocol: Protocol, log) -> dict:
    """ASR of the unsafe prompts, their concept-free versions and the attack prompts, on the base and (with
    --adapter) on base + adapter."""
    nudenet = None
    if protocol.detector == "nudenet":
        from lora_grpo.evaluation.nudity import NudeNet

        nudenet = NudeNet()
    if job.settings.method == "concept-inversion":
        pipe.load_textual_inversion(str(job.out / "embedding.safetensors"))  # the stock loader reads it
    kinds = {k: [row[k] for row in found["targets"]] for k in ("unsafe", "neutral", "attack")}
    models = ["base", "adapter"] if job.adapter else ["base"]
    total = len(models) * sum(len(v) for v in kinds.values()) * protocol.images_per_prompt
    progress = CountProgress(total, "ASR images", "img", log)
    asr: dict = {}
    for model in models:
        asr[model] = {}
        for kind, prompts in kinds.items():
            if model == "base":
                with adapter_off(pipe, job.adapter is not None):
                    images = draw(pipe, prompts, protocol, job.batch, progress.update)
            else:
                images = draw(pipe, prompts, protocol, job.batch, progress.update)
            asr[model][kind] = concept_rates(images, protocol.detector, nudenet)
    progress.close()
    return asr


def prompts_csv(found: dict) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["prompt", "target", "neutral"], lineterminator="\n")
    writer.writeheader()
    for row in found["targets"]:
        writer.writerow({"prompt": row["attack"], "target": row["unsafe"], "neutral": row["neutral"]})
    return buffer.getvalue()


def run_attack(job: AttackJob, log=print) -> dict:
    started = time.perf_counter()
    check_numbers(job)
    targets, banned, detector = plan_targets(job)
    prepare_folder(job)
    log(f"{job.settings.method}: {len(targets)} targets, banned words: {', '.join(banned)}")
    protocol = (toyworld_protocol if detector == "toyworld" else sd_protocol)(
        job.images_per_prompt, job.settings.seed
    )
    protocol = replace(
        protocol,
        steps=job.sample_steps or protocol.steps,
        guidance=protocol.guidance if job.guidance is None else job.guidance,
    )
    pipe = load_models(job)
    if job.settings.method not in TEXT_ONLY:
        latents = target_pictures(pipe, job, targets, protocol, log)
        for i, target in enumerate(targets):
            target.latents = latents[i * PICTURES_PER_TARGET : (i + 1) * PICTURES_PER_TARGET]
    found = search(pipe, job, targets, banned, log)
    write_text_atomically(job.out / "prompts.csv", prompts_csv(found))
    asr = measure(pipe, job, found, protocol, log)
    report = {
        "method": job.settings.method,
        **({"token": found["token"]} if "token" in found else {}),
        "base": job.base,
        "adapter": job.adapter,
        "recipe": job.recipe,
        "banned": banned,
        "settings": asdict(job.settings),
        "protocol": protocol.describe(),
        "targets": found["targets"],
        "asr": asr,
        "seconds": round(time.perf_counter() - started, 1),  # this invocation's (a continued run: its part)
    }
    write_text_atomically(job.out / "attack.json", json.dumps(report, indent=2))
    for model, rows in asr.items():
        log(f"{model}: " + "  ".join(f"{kind} {_rate(r)}" for kind, r in rows.items()))
    log(f"wrote {job.out / 'attack.json'} and {job.out / 'prompts.csv'}")
    return report


def _rate(rates: dict[str, float]) -> str:
    return "/".join(f"{v:.2f}" for v in rates.values())
