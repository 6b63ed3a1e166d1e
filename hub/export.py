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
from datetime import date
from pathlib import Path

import yaml
from safetensors.torch import load_file, save_file

from lora_grpo.errors import UserError, first_line
from lora_grpo.files import folder_built_beside
from lora_grpo.hub.card import build_card, reward_curves_png
from lora_grpo.hub.kohya import to_kohya
from lora_grpo.hub.manifest import MANIFEST, write_manifest
from lora_grpo.models import (
    ADAPTER_WEIGHTS,
    adapter_weights_file,
    portable_model_name,
    read_adapter_metadata,
)
from lora_grpo.runs import check_writable_folder, run_record
from lora_grpo.tracking import read_jsonl

REPORT_FILES = ("eval/report.json", "report.json", "toyworld_report.json")
SS_BASE_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCH = {
    "sd1": "stable-diffusion-v1/lora",
    "sd2": "stable-diffusion-v2-512/lora",
    "sdxl": "stable-diffusion-xl-v1-base/lora",
}


def locate(src: str | Path) -> tuple[Path, Path]:
    """(adapter weights file, run directory holding config.yaml) from a run dir, an adapter dir or a file."""
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
    return weights, run_dir


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
    run_dir: Path,
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
    metrics_file = run_dir / "metrics.jsonl"
    metrics = read_jsonl(metrics_file) if metrics_file.is_file() else []
    report_file = next((run_dir / f for f in REPORT_FILES if (run_dir / f).is_file()), None)
    report = json.loads(report_file.read_text()) if report_file else None
    if report_file and (report_file.parent / "ripple.png").is_file():  # the card shows the ripple plot
        shutil.copyfile(report_file.parent / "ripple.png", out / "ripple.png")
    curves = "reward_curves.png" if reward_curves_png(metrics, out / "reward_curves.png") else None
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
        stop=run_record(run_dir).get("stop"),
    )
    card.save(out / "README.md")


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
    src: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    repo_id: str | None = None,
    license: str = "creativeml-openrail-m",
    fused: bool = False,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Build the export in a hidden folder beside `out` and rename it into place when every file (and the
    manifest, last) is written: an interrupted or failed export leaves `out` as it was."""
    if repo_id is not None:
        check_repo_id(repo_id)
    weights, run_dir = locate(src)
    out = Path(out)
    check_export_target(out, overwrite)
    config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    local_base = config["model"]["base"]  # for --fused, which loads it here
    local_config = config["model"].get("config")  # a single-file base's component configs, if given
    metadata = read_adapter_metadata(weights)
    rank, alpha = lora_shape(metadata)
    with folder_built_beside(out, replace=overwrite) as tmp:
        config = portable_recipe(config, tmp)
        name = name or config.get("name") or "safety-lora"
        repo_id = repo_id or f"your-username/{name}"
        family = metadata.get("lora_grpo.base_architecture", "unknown").split(":")[0]
        shutil.copyfile(weights, tmp / ADAPTER_WEIGHTS)  # unchanged bytes (adapter metadata included)
        comfy_name = f"{name}_comfyui.safetensors"
        comfy_meta = comfyui_metadata(name, family, rank, alpha, license, metadata, config["model"]["base"])
        save_file(to_kohya(load_file(str(weights)), alpha), str(tmp / comfy_name), metadata=comfy_meta)
        header = f"# {name}: exported by `lora-grpo export`; run it again with: lora-grpo train recipe.yaml\n"
        recipe_text = header + yaml.safe_dump(config, sort_keys=False)
        (tmp / "recipe.yaml").write_text(recipe_text, encoding="utf-8")
        write_card(
            tmp,
            run_dir,
            config,
            name=name,
            repo_id=repo_id,
            license=license,
            comfy_name=comfy_name,
            metadata=metadata,
        )
        if fused:
            write_fused(tmp, local_base, local_config)
        write_manifest(tmp)
    log(f"exported {name} to {out}")
    return out
