"""`lora-grpo export RUN_DIR_OR_ADAPTER --out DIR`: a folder ready to publish.

pytorch_lora_weights.safetensors   diffusers format with adapter metadata (pipe.load_lora_weights)
<name>_comfyui.safetensors         kohya keys + LoRA-manager metadata (ComfyUI's LoRA loader)
README.md                          model card (ModelCard), reward_curves.png next to it
recipe.yaml                        the resolved config that produced the adapter
fused/                             with --fused: a full diffusers pipeline with the adapter merged in
manifest.json                      every file's size and sha256, written last; `push` checks it

The folder is built beside OUT and renamed into place whole; an existing export is replaced only with
--overwrite, and then whole.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from lora_grpo.checkpoint import ADAPTER_DIR, COMPLETE_MARKER, complete_checkpoints, read_trainer_state
from lora_grpo.errors import UserError, first_line
from lora_grpo.files import folder_built_beside, writing
from lora_grpo.hub.card import build_card, reward_curves_png
from lora_grpo.hub.kohya import check_comfyui_coverage, to_kohya
from lora_grpo.hub.manifest import MANIFEST, write_manifest
from lora_grpo.models import (
    ADAPTER_WEIGHTS,
    adapter_weights_file,
    portable_model_name,
    read_adapter_metadata,
)
from lora_grpo.run_lock import hold_while_reading
from lora_grpo.runs import check_writable_folder, is_run_folder, run_dir_of, run_record
from lora_grpo.tracking import read_jsonl

REPORT_FILES = ("eval/report.json", "report.json", "toyworld_report.json")
CARD_PLOTS = ("ripple.png", "matrix_heatmap.png")  # an evaluation's plots the model card shows
SS_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


@dataclass(frozen=True)
class ExportSource:
    """What an export publishes: the weights, the run they come from and the settings that produced them."""

    weights: Path
    run_dir: Path
    config_file: Path
    through_epoch: int | None = None  # a checkpoint's last epoch: later metrics rows are not these weights'


def locate(src: str | Path) -> ExportSource:
    """The adapter and its run from a run dir, an adapter dir or a file."""
    src = Path(src).expanduser()
    candidates = [src / "adapter" / ADAPTER_WEIGHTS, src / ADAPTER_WEIGHTS, src]
    weights = next((c for c in candidates if c.is_file() and c.suffix == ".safetensors"), None)
    if weights is None:
        raise UserError(
            f"no adapter found at {src}: give a run directory (with adapter/) or an adapter folder"
        )
    run_dir = next(
        (d for d in (weights.parent, weights.parent.parent) if (d / "config.yaml").is_file()), None
    )
    if run_dir is None:
        raise UserError(f"no config.yaml next to {weights}: export the run directory that trained it")
    adapter_weights_file(weights)  # readable, finite: a diverged run's adapter is never published
    return ExportSource(weights, run_dir, run_dir / "config.yaml")


def locate_checkpoint(path: str | Path) -> ExportSource:
    """A complete checkpoint of a run (one that is still training, too): its adapter, the settings it was
    trained with (its own config.yaml; older checkpoints: the run's) and its epoch."""
    path = Path(path).expanduser()
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(
            f"--checkpoint {path} is not a complete checkpoint (no {COMPLETE_MARKER} marker): give "
            "RUN/checkpoints/epoch_N"
        )
    weights = path / ADAPTER_DIR / ADAPTER_WEIGHTS
    adapter_weights_file(weights)
    run_dir = run_dir_of(path)
    config_file = path / "config.yaml" if (path / "config.yaml").is_file() else run_dir / "config.yaml"
    if not config_file.is_file():
        raise UserError(f"no config.yaml in {path} or {run_dir}: export a checkpoint of a lora-grpo run")
    return ExportSource(weights, run_dir, config_file, int(read_trainer_state(path)["next_epoch"]))


def lora_shape(metadata: dict[str, str]) -> tuple[int, float]:
    """(rank, lora_alpha) from diffusers' adapter metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        raise UserError(
            "the adapter file has no lora_adapter_metadata: it was not saved by lora_grpo/diffusers"
        )
    meta = json.loads(raw)
    return int(meta["unet.r"]), float(meta["unet.lora_alpha"])


def check_repo_id(repo_id: str) -> None:
    """The ids `push` accepts: user/name, with the Hub's own rules for each part."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"--repo '{repo_id}' is not a Hub repo id: {first_line(err)}") from None
    if repo_id.count("/") != 1:
        raise UserError(f"--repo must be user/name, got '{repo_id}'")


def portable_recipe(config: dict, out: Path) -> dict:
    """The run's config made to work elsewhere: models named by hub id, `builtin:NAME` or folder name, no
    output folder, and the prompt and anchor files copied into OUT (prompts/, anchors/) and named relative
    to it, so `lora-grpo train OUT/recipe.yaml` runs the same recipe on another machine."""
    config = json.loads(json.dumps(config))  # a deep copy of plain data
    config["model"]["base"] = portable_model_name(config["model"]["base"])
    if config["model"].get("config"):
        config["model"]["config"] = portable_model_name(config["model"]["config"])
    clip = config["reward"]["clip"]
    clip["model"] = portable_model_name(clip["model"])
    if clip.get("checkpoint"):
        clip["checkpoint"] = Path(clip["checkpoint"]).name
    config["output"]["dir"] = None
    missing = [
        f
        for f in [*(s.get("path") for s in config["prompts"]["sets"]), config["reward"].get("anchors")]
        if f and not Path(f).is_file()
    ]
    if missing:
        raise UserError(f"the run's file {missing[0]} is gone: restore it so the export can carry it")
    for prompt_set in config["prompts"]["sets"]:
        if prompt_set.get("path"):
            source = Path(prompt_set["path"])
            target = Path("prompts") / f"{prompt_set['name']}{source.suffix}"
            (out / "prompts").mkdir(exist_ok=True)
            shutil.copyfile(source, out / target)
            prompt_set["path"] = target.as_posix()
    if config["reward"].get("anchors"):
        source = Path(config["reward"]["anchors"])
        (out / "anchors").mkdir(exist_ok=True)
        shutil.copyfile(source, out / "anchors" / source.name)
        config["reward"]["anchors"] = f"anchors/{source.name}"
    return config


def is_export_folder(path: Path) -> bool:
    """A folder `lora-grpo export` wrote: its manifest, or (older exports) the adapter beside recipe.yaml."""
    return (path / MANIFEST).is_file() or (
        (path / ADAPTER_WEIGHTS).is_file() and (path / "recipe.yaml").is_file()
    )


def check_export_target(out: Path, overwrite: bool) -> None:
    """A new export goes to a folder that does not exist or is empty; `--overwrite` replaces an earlier
    export whole and refuses any other folder."""
    check_writable_folder(out, "--out folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        what = "an export" if is_export_folder(out) else "files"
        raise UserError(
            f"--out {out} already holds {what}: choose another --out folder, or pass --overwrite to replace "
            "it whole (no file of the earlier export is kept)"
        )
    if not is_export_folder(out):
        raise UserError(
            f"--overwrite refuses to replace {out}: it is not a lora-grpo export (no {MANIFEST}); choose "
            "another --out folder"
        )


def comfyui_metadata(
    name: str, family: str, rank: int, alpha: float, license: str, metadata: dict, base_model: str
) -> dict:
    """LoRA-manager metadata of the kohya / ComfyUI file (kohya's ss_* keys and the modelspec keys)."""
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_base_model_version": SS_BASE_VERSION.get(family, family),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCH.get(family, f"{family}/lora"),
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.description": f"Safety LoRA for {base_model} trained with lora_grpo (SafeDiffusion-R1 steering reward)",
        "modelspec.date": date.today().isoformat(),
        "modelspec.license": license,
        "lora_grpo.base_architecture": metadata.get("lora_grpo.base_architecture", "unknown"),
        "lora_grpo.base_model": base_model,
    }
    if "lora_grpo.base_sha256" in metadata:
        meta["lora_grpo.base_sha256"] = metadata["lora_grpo.base_sha256"]
    return meta


def write_card(
    out: Path,
    source: ExportSource,
    config: dict,
    *,
    name: str,
    repo_id: str,
    license: str,
    comfy_name: str,
    metadata: dict,
) -> None:
    """README.md (the model card) with the run's metrics, evaluation report and how the run stopped."""
    anchors_path = config.get("reward", {}).get("anchors")
    if anchors_path and (out / anchors_path).is_file():
        anchors = yaml.safe_load((out / anchors_path).read_text(encoding="utf-8")) or {}
        config["anchors_used"] = {k: anchors.get(k) or [] for k in ("safe", "unsafe")}
    run_dir = source.run_dir
    metrics_file = run_dir / "metrics.jsonl"
    metrics = read_jsonl(metrics_file) if metrics_file.is_file() else []
    if source.through_epoch is not None:  # a checkpoint: its own rows only, and no "how the run ended"
        metrics = [row for row in metrics if row.get("epoch", 0) <= source.through_epoch]
    report_file = next((run_dir / f for f in REPORT_FILES if (run_dir / f).is_file()), None)
    report = json.loads(report_file.read_text()) if report_file else None
    for plot in CARD_PLOTS if report_file else ():  # plots the card shows
        if (report_file.parent / plot).is_file():
            shutil.copyfile(report_file.parent / plot, out / plot)
    curves = "reward_curves.png" if reward_curves_png(metrics, out / "reward_curves.png") else None
    attacks = (report or {}).get("attacks") or run_attacks(run_dir)
    record, upto = run_record(run_dir), source.through_epoch
    card = build_card(
        repo_id=repo_id,
        base_model=config["model"]["base"],
        license=license,
        config=config,
        metrics=metrics,
        report=report,
        weight_name=ADAPTER_WEIGHTS,
        comfy_name=comfy_name,
        curves=curves,
        family=metadata.get("lora_grpo.base_architecture", "unknown").split(":")[0],
        base_sha256=metadata.get("lora_grpo.base_sha256"),
        stop=record.get("stop") if upto is None else None,
        changes=[c for c in record.get("changes", []) if upto is None or c["from_epoch"] <= upto],
        attacks=attacks,
    )
    card.save(out / "README.md")


def run_attacks(run_dir: Path) -> list[dict]:
    """The ASR of the attacks saved in the run folder (RUN/attacks/<name>/attack.json), by folder name."""
    from lora_grpo.evaluation.attack_report import ATTACK_REPORT, attack_summary, read_attack_report

    return [
        attack_summary(read_attack_report(p))
        for p in sorted((run_dir / "attacks").glob(f"*/{ATTACK_REPORT}"))
    ]


def write_fused(out: Path, base: str, base_config: str | None) -> None:
    """fused/: the base pipeline with the adapter merged in."""
    from lora_grpo.config import ModelConfig
    from lora_grpo.models import load_adapter, load_pipeline

    pipe = load_pipeline(ModelConfig(base=base, config=base_config))
    load_adapter(pipe, out / ADAPTER_WEIGHTS)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    pipe.save_pretrained(out / "fused")


def export(
    src: str | Path | None,
    out: str | Path,
    *,
    name: str | None = None,
    repo_id: str | None = None,
    license: str = "creativeml-openrail-m",
    fused: bool = False,
    overwrite: bool = False,
    checkpoint: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Export a run's adapter (or, with `checkpoint`, a complete checkpoint of a run that may still be
    training). The run folder's lock is held while it is read, so a run being trained refuses, naming
    `--checkpoint`. The export is built in a hidden folder beside `out` and renamed into place when every
    file (the manifest last) is written: an interrupted or failed export leaves `out` as it was."""
    if repo_id is not None:
        check_repo_id(repo_id)
    if checkpoint is None and src is None:
        raise UserError("export needs a run folder (or an adapter), or --checkpoint RUN/checkpoints/epoch_N")
    out = Path(out)
    check_export_target(out, overwrite)
    lock = None if checkpoint is not None else _read_lock(Path(src).expanduser())
    try:
        source = locate_checkpoint(checkpoint) if checkpoint is not None else locate(src)
        name = write_export(source, out, name, repo_id, license, fused, overwrite)
    finally:
        if lock is not None:
            lock.release()
    log(f"exported {name} to {out}")
    return out


def _read_lock(src: Path):
    """Hold the lock of the run folder `src` (or of the run an adapter folder or file belongs to) while it is
    exported: a run being trained refuses, naming the checkpoint to export instead."""
    run_dir = next((d for d in (src, src.parent, src.parent.parent) if is_run_folder(d)), None)
    if run_dir is None:
        return None
    newest = complete_checkpoints(run_dir)
    hint = f" (the newest: {newest[-1]})" if newest else ""
    busy = f"it is still training: export a complete checkpoint with --checkpoint{hint}, or wait for it to finish"
    return hold_while_reading(run_dir, busy)


def write_export(
    source: ExportSource, out: Path, name, repo_id, license: str, fused: bool, overwrite: bool
) -> str:
    """Every file of the export, built beside `out` and renamed into place; returns the adapter's name."""
    config = yaml.safe_load(source.config_file.read_text(encoding="utf-8"))
    local_base = config["model"]["base"]  # for --fused, which loads it here
    local_config = config["model"].get("config")  # a single-file base's component configs, if given
    metadata = read_adapter_metadata(source.weights)
    rank, alpha = lora_shape(metadata)
    with writing(out, "the export"), folder_built_beside(out, replace=overwrite) as tmp:
        config = portable_recipe(config, tmp)
        name = name or config.get("name") or "safety-lora"
        repo_id = repo_id or f"your-username/{name}"
        family = metadata.get("lora_grpo.base_architecture", "unknown").split(":")[0]
        shutil.copyfile(source.weights, tmp / ADAPTER_WEIGHTS)  # unchanged bytes (adapter metadata included)
        comfy_name = f"{name}_comfyui.safetensors"
        comfy_meta = comfyui_metadata(name, family, rank, alpha, license, metadata, config["model"]["base"])
        weights = load_file(str(source.weights))
        check_comfyui_coverage(weights.keys(), family)
        save_file(to_kohya(weights, alpha), str(tmp / comfy_name), metadata=comfy_meta)
        header = f"# {name}: exported by `lora-grpo export`; run it again with: lora-grpo train recipe.yaml\n"
        (tmp / "recipe.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        card = dict(name=name, repo_id=repo_id, license=license, comfy_name=comfy_name, metadata=metadata)
        write_card(tmp, source, config, **card)
        if fused:
            write_fused(tmp, local_base, local_config)
        write_manifest(tmp)
    return name
