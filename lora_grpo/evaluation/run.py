"""`lora-grpo eval`: generate a suite's images for the base model and base+adapter on the same seeds, score
them, and write OUT/report.json, OUT/report.md and the plots.

Phases: load suites (fail fast) -> generate (resumable) -> per-image values, streamed in chunks (NudeNet
detections, CLIP image embeddings, the toy world's pixel readings) -> aggregate -> report.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_grpo.config import ClipConfig, ModelConfig
from lora_grpo.errors import UserError
from lora_grpo.evaluation import metrics as M
from lora_grpo.evaluation.generate import (
    GenerationSettings,
    ImageJob,
    generate_images,
    manifest_rows,
    plan_jobs,
    write_metadata,
)
from lora_grpo.evaluation.matrix_run import MatrixSettings, plan_matrix, run_matrix, settings_dict
from lora_grpo.evaluation.nudity import DEFAULT_THRESHOLD
from lora_grpo.evaluation.report import (
    image_grid,
    plot_alpha_sweep,
    plot_categories,
    plot_nudenet,
    plot_ripple,
    write_report,
)
from lora_grpo.evaluation.ripple import ripple_suites
from lora_grpo.evaluation.scoring import (
    Scorer,
    anchors_path,
    reference_images,
    suite_metrics,
)
from lora_grpo.evaluation.suites import EVAL_DEFAULTS, Suite, load_suite
from lora_grpo.files import write_text_atomically
from lora_grpo.models import adapter_weights_file, pick_device
from lora_grpo.progress import CountProgress
from lora_grpo.prompts import long_prompt_note
from lora_grpo.reward_check import read_image
from lora_grpo.runs import check_writable_folder


@dataclass
class EvalSettings:
    base: str
    out: Path
    suites: list[str]
    adapter: str | None = None
    base_config: str | None = None  # a single-file base's component configs (model.config), if not shipped
    column: str = "prompt"  # CSV column holding the prompts (attack CSVs name theirs differently)
    safety: str | None = None  # force the suites' side (unsafe / safe) for plain prompt files
    max_prompts: int | None = None  # first N prompts of each suite (a quick look)
    sampler: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 4  # images per pipeline call
    # None below (and in `sampler`): the suites' default (suites.EVAL_DEFAULTS, or a suite's own defaults)
    nudenet: bool | None = None
    nudenet_threshold: float = DEFAULT_THRESHOLD
    q16_embeddings: str | None = None  # Q16's prompts (.safetensors or its pickle, read safely)
    clip: ClipConfig | None = None  # CLIP score, steering reward, Q16
    anchors: str | None = None  # steering anchors (a file or a shipped name)
    alpha: float | None = None
    alpha_sweep: list[float] | None = None
    # a removed concept's phrases: its suite and erasure rate; neighbours: specificity (evaluation.ripple)
    concept: list[str] = field(default_factory=list)
    neighbours: list[str] = field(default_factory=list)
    fid_reference: str | None = None  # folder of reference images (safe suites)
    device: str | None = None
    grid_prompts: int = 4
    matrix: MatrixSettings | None = None  # --matrix: the deployment matrix instead of one setting
    attacks: list[str] = field(
        default_factory=list
    )  # `lora-grpo attack` folders: their ASR table in the report


def load_suites(settings: EvalSettings) -> list[Suite]:
    if not settings.suites and not settings.concept:
        raise UserError("no suite given: pass --suite NAME or --suite PATH (e.g. --suite i2p), or --concept")
    if settings.neighbours and not settings.concept:
        raise UserError("--neighbour needs --concept: the neighbours are read against the removed concept")
    suites = []
    for spec in settings.suites:
        suite = load_suite(spec, settings.column, settings.safety)
        if settings.max_prompts:
            from dataclasses import replace

            suite = replace(suite, prompts=suite.prompts[: settings.max_prompts])
        suites.append(suite)
    if settings.concept:
        suites += ripple_suites(settings.concept, settings.neighbours)
    names = [s.name for s in suites]
    if len(set(names)) != len(names):
        raise UserError(f"two suites share the name {names}: rename one of the files")
    return suites


FLAGS = {key: f"--{key}" for key in EVAL_DEFAULTS}  # the flag that sets each suite default


def _given(settings: EvalSettings, key: str):
    """The value the user set for an EVAL_DEFAULTS key, or None."""
    if key in ("steps", "guidance", "eta"):
        return getattr(settings.sampler, key)
    if key == "clip":
        return settings.clip
    return getattr(settings, key)


def with_suite_defaults(settings: EvalSettings, suites: list[Suite]) -> EvalSettings:
    """Fill every setting the user left unset from the suites' defaults (a suite's own, else EVAL_DEFAULTS);
    suites that would be evaluated differently need the flags that settle it."""
    from dataclasses import replace

    chosen, conflicts, pair = {}, [], ""
    for key, fallback in EVAL_DEFAULTS.items():
        chosen[key] = _given(settings, key)
        if chosen[key] is not None:
            continue
        distinct: dict[str, tuple[str, object]] = {}  # each different default -> (first suite, value)
        for suite in suites:
            wanted = suite.defaults.get(key, fallback)
            distinct.setdefault(str(wanted), (suite.name, wanted))
        (first, value), *others = distinct.values()
        if others:
            pair = f"{first} and {others[0][0]}"
            conflicts.append(f"{FLAGS[key]} {value} vs {others[0][1]}")
        chosen[key] = ClipConfig(model=value) if key == "clip" else value
    if conflicts:
        raise UserError(
            f"suites {pair} are evaluated with different defaults ({'; '.join(conflicts)}): pass "
            f"{', '.join(c.split(' ')[0] for c in conflicts)} to evaluate them together, or evaluate them in "
            "separate runs"
        )
    sampler = replace(settings.sampler, steps=chosen["steps"], guidance=chosen["guidance"], eta=chosen["eta"])
    keep = {k: chosen[k] for k in ("clip", "anchors", "alpha", "nudenet")}
    return replace(settings, sampler=sampler, **keep)


def check_numbers(settings: EvalSettings) -> None:
    """Every numeric setting is in range and finite (a NaN guidance would only show after minutes)."""
    import math

    s = settings.sampler
    finite = {"--guidance": s.guidance, "--eta": s.eta, "--alpha": settings.alpha}
    finite.update({f"--alpha-sweep value {a}": a for a in settings.alpha_sweep or []})
    for flag, value in finite.items():
        if not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
    if s.guidance < 0 or s.eta < 0:
        raise UserError(f"--guidance and --eta must be >= 0, got {s.guidance} and {s.eta}")
    if settings.alpha <= 0:
        raise UserError(
            f"--alpha must be > 0 (the steering strength toward the safe anchors), got {settings.alpha}"
        )
    if s.steps < 1 or s.images_per_prompt < 1 or settings.batch_size < 1:
        raise UserError("--steps, --images-per-prompt and --batch-size must be >= 1")
    if s.seed < 0:
        raise UserError(f"--seed must be >= 0, got {s.seed}")
    for flag, size in (("--height", s.height), ("--width", s.width)):
        if size is not None and (size < 8 or size % 8):
            raise UserError(f"{flag} must be a multiple of 8 (the VAE's scale), got {size}")
    if not 0 < settings.nudenet_threshold <= 1:
        raise UserError(f"--nudenet-threshold must be in (0, 1], got {settings.nudenet_threshold}")


def check_inputs(settings: EvalSettings) -> None:
    """Everything that can be wrong with the user's files and numbers, before any model loads."""
    check_numbers(settings)
    check_writable_folder(settings.out, "--out folder")
    if settings.adapter:
        adapter_weights_file(settings.adapter)
    if settings.q16_embeddings:
        from lora_grpo.evaluation.q16 import load_q16_embeddings

        load_q16_embeddings(settings.q16_embeddings)
    if settings.fid_reference:
        reference_images(settings.fid_reference)
    anchors_path(settings.anchors)
    attack_summaries(settings)


def attack_summaries(settings: EvalSettings) -> list[dict]:
    """--attacks: each attack folder's ASR (read before any model loads, so a bad one stops at once)."""
    from lora_grpo.evaluation.attack_report import attack_summary, read_attack_report

    return [attack_summary(read_attack_report(path)) for path in settings.attacks]


# ------------------------------------------------------------------------------------------ generation
def generate_all(settings: EvalSettings, suites: list[Suite], log) -> dict[str, list[ImageJob]]:
    """Plan and generate every image; returns the jobs per variant."""
    from lora_grpo.models import load_adapter, load_pipeline

    out = settings.out
    variants = ["base"] + (["adapter"] if settings.adapter else [])
    jobs = {v: [j for s in suites for j in plan_jobs(out, v, s, settings.sampler)] for v in variants}
    pending = {v: sum(not j.path.is_file() for j in jobs[v]) for v in variants}
    for v in variants:
        done = len(jobs[v]) - pending[v]
        log(f"{v}: {len(jobs[v])} images, {done} already on disk, {pending[v]} to generate")
        for s in suites:
            write_metadata(out, v, s)
    if not any(pending.values()):
        return jobs
    device = pick_device(settings.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(ModelConfig(base=settings.base, config=settings.base_config), dtype=dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    progress = CountProgress(sum(pending.values()), "generating", "img", log)
    for v in variants:
        if v == "adapter":
            load_adapter(pipe, settings.adapter)
        if pending[v]:
            generate_images(pipe, jobs[v], settings.sampler, settings.batch_size, progress.update)
    progress.close()
    del pipe
    return jobs


# ------------------------------------------------------------------------------------------ the command
def log_plan(settings: EvalSettings, suites: list[Suite], log) -> None:
    """The suites and settings the run uses, and any prompt the text encoder cuts."""
    log(f"suites: {', '.join(f'{s.name} ({len(s.prompts)} prompts, {s.safety})' for s in suites)}")
    for suite in suites:
        if note := long_prompt_note(f"suite {suite.name}", [p.prompt for p in suite.prompts]):
            log(note)
    log(
        f"sampler: {settings.sampler.steps} steps, CFG {settings.sampler.guidance}, eta {settings.sampler.eta}; "
        f"CLIP {settings.clip.model}, anchors {settings.anchors} (alpha {settings.alpha}), "
        f"NudeNet {'on' if settings.nudenet else 'off'}"
    )


def run_eval(settings: EvalSettings, log=print) -> dict:
    started = time.perf_counter()
    suites = load_suites(settings)
    settings = with_suite_defaults(settings, suites)
    check_inputs(settings)
    plan = plan_matrix(settings, settings.matrix, suites) if settings.matrix else None
    device = pick_device(settings.device)
    scorer = Scorer(settings, device)  # CLIP, anchors, NudeNet, Q16 and FID files load before any image
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    log_plan(settings, suites, log)
    if plan is not None:
        return run_matrix(settings, plan, suites, scorer, log)
    jobs = generate_all(settings, suites, log)
    rows = [
        r
        for v, js in jobs.items()
        for r in manifest_rows(js, out, settings.base, settings.adapter, settings.sampler)
    ]
    write_text_atomically(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in rows))

    log("scoring...")
    results: dict[str, dict] = {s.name: {} for s in suites}
    embeds: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for variant, variant_jobs in jobs.items():
        for suite in suites:
            suite_jobs = [j for j in variant_jobs if j.suite == suite.name]
            values = scorer.per_image(
                suite_jobs, toyworld=suite.kind == "toyworld", fid=suite.safety == "safe"
            )
            results[suite.name][variant] = suite_metrics(scorer, suite, suite_jobs, values)
            embeds[(variant, suite.name)] = (values.image_embeds, values.text_embeds)

    report = {
        "settings": settings_dict(settings),
        "suites": {name: per_variant for name, per_variant in results.items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if settings.attacks:
        report["attacks"] = attack_summaries(settings)
    plots = []
    if settings.alpha_sweep:
        report["alpha_sweep"] = alpha_sweep(settings.alpha_sweep, suites, jobs, embeds, scorer.direction)
        plots.append(plot_alpha_sweep(out, report["alpha_sweep"]))
    for suite in suites:
        plots += [
            plot_categories(out, suite.name, results[suite.name]),
            plot_nudenet(out, suite.name, results[suite.name]),
        ]
    plots.append(plot_ripple(out, report))
    plots.append(image_grid(out, grid_pairs(suites, jobs, settings.grid_prompts)))
    report["plots"] = [p for p in plots if p]
    write_report(out, report)
    log(f"wrote {out / 'report.md'} and {out / 'report.json'} ({report['seconds']:.0f}s)")
    return report


def alpha_sweep(alphas, suites, jobs, embeds, direction) -> dict:
    curves: dict[str, dict[str, list[float]]] = {}
    for variant in jobs:
        for side in ("unsafe", "safe"):
            picked = [embeds[(variant, s.name)] for s in suites if s.safety == side]
            if not picked:
                continue
            image = torch.cat([p[0] for p in picked])
            text = torch.cat([p[1] for p in picked])
            curves.setdefault(variant, {})[side] = M.alpha_curve(image, text, direction, list(alphas))
    return {"alphas": list(alphas), "curves": curves}


def grid_pairs(suites: list[Suite], jobs: dict[str, list[ImageJob]], per_side: int):
    """A few prompts from the unsafe and the safe suites, first image of each, base and adapter."""
    pairs = []
    for side in ("unsafe", "safe"):
        picked = [
            j for s in suites if s.safety == side for j in jobs["base"] if j.suite == s.name and j.sample == 0
        ]
        step = max(1, len(picked) // per_side) if picked else 1
        for job in picked[::step][:per_side]:
            match = None
            if "adapter" in jobs:
                match = next(
                    a for a in jobs["adapter"] if (a.suite, a.index, a.sample) == (job.suite, job.index, 0)
                )
            pairs.append((job.prompt, read_image(job.path), read_image(match.path) if match else None))
    return pairs
