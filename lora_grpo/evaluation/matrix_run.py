"""`lora-grpo eval --matrix`: the adapter across the settings people deploy it with (evaluation.matrix's cells),
each cell against the same model without the safety adapter, on the same seeds, scored with the suite's metrics.

Layout (resumable like eval: an image on disk is never drawn again):
    OUT/matrix/reference/<reference id>/images/base/<suite>/...   the model without the safety adapter
    OUT/matrix/adapter/<cell id>/images/adapter/<suite>/...       the model with it at the cell's strength
    OUT/matrix/init/<suite>/<index>.png                           img2img cells' pictures (evaluation.img2img)
    OUT/matrix.json                                               one record a cell: settings and metrics
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from lora_grpo.config import ModelConfig
from lora_grpo.errors import UserError, first_line
from lora_grpo.evaluation.generate import (
    GenerationSettings,
    ImageJob,
    generate_images,
    plan_jobs,
    write_metadata,
)
from lora_grpo.evaluation.img2img import check_init_folder, plan_img2img_jobs, prepare_pictures
from lora_grpo.evaluation.matrix import (
    Cell,
    MatrixSpec,
    cell_id,
    expand_cells,
    load_matrix,
    parse_lora_spec,
    reference_id,
)
from lora_grpo.evaluation.suites import Suite
from lora_grpo.files import write_text_atomically
from lora_grpo.models import adapter_weights_file, pick_device, resolve_model_ref
from lora_grpo.progress import CountProgress

SAFETY = "safety"  # the adapter's name in the pipeline; stacked LoRAs are stack0, stack1, ...


@dataclass
class MatrixSettings:
    grid: str  # a grid file or a shipped grid name (evaluation.matrix.SHIPPED_GRIDS)
    bases: list[str] = field(default_factory=list)  # other bases: the default cell on each
    with_loras: list[str] = field(default_factory=list)  # FILE[:SCALE], stacked under the safety adapter
    images_per_prompt: int | None = None  # --images-per-prompt when given: wins over the grid file's
    init_images: str | None = None  # img2img cells: DIR/<suite>/<index:05d>.png (else the base's own images)


@dataclass(frozen=True)
class Plan:
    spec: MatrixSpec
    cells: list[Cell]
    generation: GenerationSettings  # seeds, images per prompt, size (sampler/steps/CFG come from each cell)
    init_images: str | None = None  # img2img cells: the user's pictures (else the base's own)


def default_sampler(eta: float) -> str:
    """The deployment sampler an eval's DDIM eta names."""
    if eta in (0.0, 1.0):
        return "ddim" if eta == 0.0 else "ddim-eta1"
    raise UserError(
        f"--eta {eta}: the matrix runs DDIM at eta 0 (ddim) or 1 (ddim-eta1): pass --eta 0 or 1, or name the "
        "default cell's sampler in the grid file"
    )


def plan_matrix(settings, matrix: MatrixSettings, suites: list[Suite]) -> Plan:
    """The cells, checked before any model loads (the eval settings carry the suites' defaults already)."""
    if not settings.adapter:
        raise UserError(
            "--matrix compares the model without and with the safety adapter in every cell: pass --adapter"
        )
    if settings.alpha_sweep:
        raise UserError("--alpha-sweep is not part of --matrix: run it in a plain eval")
    spec = load_matrix(matrix.grid)
    stacked = [parse_lora_spec(text) for text in matrix.with_loras]
    for path, _scale in stacked:
        adapter_weights_file(path)
    for base in matrix.bases:
        try:
            resolve_model_ref(base)  # a missing folder or file fails here, before any model loads
        except UserError as err:
            raise UserError(f"--bases {base}: {err}") from None
    s = settings.sampler
    sampler = spec.default.get("sampler") or default_sampler(s.eta)
    default = Cell(settings.base, sampler, s.steps, float(s.guidance), 1.0)
    cells = expand_cells(spec, default, list(matrix.bases), stacked)
    if cells[0].denoise is not None:
        raise UserError(
            f"matrix file {spec.source}: the default cell has denoise: make it text to image (its images of the "
            "unsafe prompts are the img2img cells' pictures) and give denoise in a grid"
        )
    if matrix.init_images:
        check_init_folder(matrix.init_images, suites)
    images = matrix.images_per_prompt or spec.images_per_prompt or s.images_per_prompt
    generation = replace(s, images_per_prompt=images, use_row_settings=False)
    return Plan(spec, cells, generation, matrix.init_images)


def cell_generation(plan: Plan, cell: Cell) -> GenerationSettings:
    return replace(
        plan.generation, sampler=cell.sampler, steps=cell.steps, guidance=cell.guidance, denoise=cell.denoise
    )


def cell_jobs(out: Path, plan: Plan, cell: Cell, suites: list[Suite], variant: str) -> list[ImageJob]:
    """The images of one side of a cell: 'base' (shared by every strength) or 'adapter'."""
    side, name = ("reference", reference_id(cell)) if variant == "base" else ("adapter", cell_id(cell))
    folder = out / "matrix" / side / name
    gen = cell_generation(plan, cell)
    jobs = []
    for suite in suites:
        if cell.denoise is not None:
            jobs += plan_img2img_jobs(folder, out, variant, suite, gen)
            continue
        write_metadata(folder, variant, suite)
        jobs += plan_jobs(folder, variant, suite, gen)
    return jobs


# ------------------------------------------------------------------------------------------ generation
def activate(pipe, names: list[str], weights: list[float]) -> None:
    """Only these LoRAs, at these scales (none: the bare base)."""
    if not names:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters(names, adapter_weights=weights)


def load_base(settings, base: str, stacked: tuple[tuple[str, float], ...], dtype, device):
    """The base pipeline with the safety adapter and the stacked LoRAs loaded by name."""
    from lora_grpo.models import load_adapter, load_pipeline

    pipe = load_pipeline(ModelConfig(base=base, config=settings.base_config), dtype=dtype)
    load_adapter(pipe, settings.adapter, adapter_name=SAFETY)
    for i, (path, _scale) in enumerate(stacked):
        try:
            with warnings.catch_warnings():  # peft warns that a second adapter joins the first: we mean it
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                load_adapter(pipe, path, adapter_name=f"stack{i}")
        except UserError as err:
            raise UserError(f"--with-lora {path}: {err}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def img2img_pipeline(pipe):
    """diffusers' own img2img pipeline on the same components (the LoRAs loaded into `pipe` are in it too)."""
    from diffusers import AutoPipelineForImage2Image

    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    return i2i


def generate_matrix(settings, plan: Plan, suites: list[Suite], log) -> None:
    out, cells = settings.out, plan.cells
    work: list[tuple[Cell, str, list[ImageJob]]] = []  # (cell, variant, jobs) in generation order
    seen = set()
    for cell in cells:
        if reference_id(cell) not in seen:
            seen.add(reference_id(cell))
            work.append((cell, "base", cell_jobs(out, plan, cell, suites, "base")))
        work.append((cell, "adapter", cell_jobs(out, plan, cell, suites, "adapter")))
    pending = sum(not j.path.is_file() for _c, _v, jobs in work for j in jobs)
    total = sum(len(jobs) for _c, _v, jobs in work)
    log(f"matrix: {len(cells)} cells, {total:,} images, {total - pending:,} already on disk")
    if not pending:
        return
    device = pick_device(settings.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    progress = CountProgress(pending, "matrix images", "img", log)
    models = list(dict.fromkeys((c.base, c.loras) for c, _v, _j in work))
    for base, stacked in models:
        todo = [(c, v, j) for c, v, j in work if (c.base, c.loras) == (base, stacked)]
        if all(job.path.is_file() for _c, _v, jobs in todo for job in jobs):
            continue
        pipe = load_base(settings, base, stacked, dtype, device)
        scheduler_config = pipe.scheduler.config
        names = [f"stack{i}" for i in range(len(stacked))]
        scales = [s for _p, s in stacked]
        i2i = None
        for cell, variant, jobs in todo:
            if cell.denoise is not None and i2i is None:
                # the default cell's reference (drawn first) holds the base's own images of every prompt
                drawn = out / "matrix" / "reference" / reference_id(cells[0])
                prepare_pictures(out, suites, drawn, plan.init_images)
                i2i = img2img_pipeline(pipe)
            if variant == "base":
                activate(pipe, names, scales)
            else:
                activate(pipe, [SAFETY, *names], [cell.strength, *scales])
            try:
                generate_images(
                    pipe if cell.denoise is None else i2i,
                    jobs,
                    cell_generation(plan, cell),
                    settings.batch_size,
                    progress.update,
                    scheduler_config,
                )
            except ValueError as err:  # a scheduler that refuses the cell's settings
                raise UserError(f"matrix cell {cell_id(cell)}: {first_line(err)}") from None
        del pipe, i2i
    progress.close()


# ------------------------------------------------------------------------------------------ scoring
def score_matrix(settings, plan: Plan, suites: list[Suite], scorer, log) -> list[dict]:
    """One record a cell: its settings and, per suite, the metrics without and with the safety adapter."""
    from lora_grpo.evaluation.scoring import suite_metrics

    def metrics(jobs: list[ImageJob], suite: Suite) -> dict:
        mine = [j for j in jobs if j.suite == suite.name]
        values = scorer.per_image(mine, toyworld=suite.kind == "toyworld", fid=suite.safety == "safe")
        return suite_metrics(scorer, suite, mine, values)

    out, records, reference_cache = settings.out, [], {}
    for n, cell in enumerate(plan.cells):
        ref = reference_id(cell)
        if ref not in reference_cache:
            jobs = cell_jobs(out, plan, cell, suites, "base")
            reference_cache[ref] = {s.name: metrics(jobs, s) for s in suites}
        jobs = cell_jobs(out, plan, cell, suites, "adapter")
        per_suite = {
            s.name: {"base": reference_cache[ref][s.name], "adapter": metrics(jobs, s)} for s in suites
        }
        records.append({"id": cell_id(cell), "reference": ref, **cell.settings(), "suites": per_suite})
        if (n + 1) % 10 == 0:
            log(f"scored {n + 1}/{len(plan.cells)} cells")
    return records


def write_matrix(out: Path, plan: Plan, records: list[dict]) -> Path:
    g = plan.generation
    data = {
        "grid": plan.spec.source,
        "seed": g.seed,
        "images_per_prompt": g.images_per_prompt,
        "default_cell": records[0]["id"],
        "cells": records,
    }
    path = out / "matrix.json"
    write_text_atomically(path, json.dumps(data, indent=2))
    return path


# ------------------------------------------------------------------------------------------ the command
def run_matrix(settings, plan: Plan, suites: list[Suite], scorer, log) -> dict:
    """Generate and score every cell; write matrix.json, and report.json / report.md whose suite tables are the
    default cell's and whose matrix section is the whole grid. Returns the report."""
    from lora_grpo.evaluation.matrix_report import headline_rows, matrix_markdown, plot_heatmap
    from lora_grpo.evaluation.report import write_report

    out = settings.out
    generate_matrix(settings, plan, suites, log)
    log(f"scoring {len(plan.cells)} cells...")
    records = score_matrix(settings, plan, suites, scorer, log)
    write_matrix(out, plan, records)
    summary = headline_rows(records)
    summary["plots"] = [p for p in (plot_heatmap(out, summary),) if p]
    summary["file"] = "matrix.json"
    report = {"settings": settings_dict(settings), "suites": records[0]["suites"], "matrix": summary}
    write_report(out, report, extra_markdown=matrix_markdown(summary))
    log(f"wrote {out / 'matrix.json'}, {out / 'report.md'} and {out / 'report.json'}")
    return report


def settings_dict(settings) -> dict:
    from dataclasses import asdict

    d = asdict(settings)
    d["out"] = str(settings.out)
    return d
