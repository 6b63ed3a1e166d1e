"""Single-file checkpoints: one original-layout `.safetensors` (as ComfyUI and A1111 users have them) as the
base model, loaded offline.

The family comes from the file's keys (SD 1.x: `cond_stage_model.transformer.*`; SDXL:
`conditioner.embedders.1.model.*`), the component configs from `families.config_folder` (or the diffusers
folder `model.config` names, for fine-tunes with other shapes), and the weights go through diffusers'
`from_single_file` with no hub call. A run names the file by its name and sha256, never its path.
Pickled checkpoints (`.ckpt`, `.pt`, `.bin`) are refused: loading them would run code from the file.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_grpo.errors import UserError, first_line

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
UNET_PREFIX = "model.diffusion_model."
FAMILY_KEYS = (  # the first prefix found decides
    ("conditioner.embedders.1.model.", "sdxl"),
    ("conditioner.embedders.0.model.", "sdxl-refiner"),
    ("cond_stage_model.transformer.", "sd1"),
    ("cond_stage_model.model.", "sd2"),
)
PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
}


@dataclass(frozen=True)
class CheckpointFile:
    path: Path
    family: str  # sd1, sd2 or sdxl

    @property
    def name(self) -> str:
        return self.path.name


def is_checkpoint_file(ref: str) -> bool:
    """Whether `model.base` names a file (a single-file checkpoint) rather than a folder or hub id."""
    path = Path(ref).expanduser()
    return path.is_file() or path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES)


def family_of(keys: list[str]) -> str | None:
    for prefix, family in FAMILY_KEYS:
        if any(k.startswith(prefix) for k in keys):
            return family
    return None


def inspect_checkpoint(ref: str) -> CheckpointFile:
    """Check a single-file checkpoint before anything loads: a readable safetensors file holding an SD 1.x,
    SD 2.x or SDXL UNet and text encoder. One-line errors otherwise."""
    from safetensors import safe_open

    path = Path(ref).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"model.base {path.name} is a pickled checkpoint; lora_grpo never unpickles files (they can run "
            "code): use the .safetensors version of this model"
        )
    if not path.is_file():
        raise UserError(f"model.base file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise UserError(
            f"model.base {path.name} is not a readable .safetensors checkpoint ({first_line(err)}): a "
            "truncated download or another format; download it again"
        ) from None
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise UserError(
            f"model.base {path.name} holds no Stable Diffusion UNet ({UNET_PREFIX}* weights): give a full "
            "SD 1.x or SDXL checkpoint, not a LoRA, VAE or text encoder file"
        )
    family = family_of(keys)
    if family not in PIPELINES:
        what = "an SDXL refiner" if family == "sdxl-refiner" else "a checkpoint of an unknown family"
        raise UserError(
            f"model.base {path.name} is {what}: lora_grpo trains SD 1.x, SD 2.x and SDXL base checkpoints"
        )
    return CheckpointFile(path.resolve(), family)


def file_sha256(path: Path) -> str:
    """The file's sha256, computed once per (path, size, modification time) in a process: every checkpoint
    of a run records it, and a 7 GB SDXL file takes tens of seconds to hash."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_source(checkpoint: CheckpointFile, config: str | None) -> Path:
    """The diffusers folder whose component configs describe `checkpoint`: `model.config` when given (checked
    against the file's family), else the configs lora_grpo ships."""
    from lora_grpo.families import FAMILIES, config_folder, pipeline_class_name

    if config is None:
        if checkpoint.family not in FAMILIES:
            raise UserError(
                f"model.base {checkpoint.name} is an SD 2.x checkpoint and lora_grpo ships configs for SD 1.x "
                "and SDXL only: set model.config to a diffusers SD 2.x folder (e.g. a local copy of "
                "stabilityai/stable-diffusion-2-1) whose configs fit it"
            )
        return config_folder(checkpoint.family)
    folder = Path(config).expanduser()
    index = folder / "model_index.json"
    if not index.is_file():
        raise UserError(f"model.config {folder} is not a diffusers folder (no model_index.json)")
    expected = PIPELINES[checkpoint.family]
    found = pipeline_class_name(str(folder))
    if found != expected:
        raise UserError(
            f"model.config {folder.name} is a {found} but {checkpoint.name} holds a {checkpoint.family} "
            f"checkpoint: give a {expected} folder"
        )
    return folder.resolve()


def load_single_file(checkpoint: CheckpointFile, config: str | None, dtype: torch.dtype):
    """The pipeline of a single-file checkpoint, offline, with every component's weights from the file."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = config_source(checkpoint, config)
    xl = checkpoint.family == "sdxl"
    cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
    extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(
            str(checkpoint.path), config=str(folder), local_files_only=True, torch_dtype=dtype, **extra
        )
    except Exception as err:  # diffusers and safetensors raise many types; the user needs one line
        raise UserError(
            f"could not load {checkpoint.name} with the {checkpoint.family} configs of {folder.name}: "
            f"{first_line(err)} (a fine-tune with other shapes needs model.config=<its diffusers folder>)"
        ) from None
    left_empty = [
        name
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module) and any(p.is_meta for p in module.parameters())
    ]
    if left_empty:
        raise UserError(
            f"{checkpoint.name} does not fill the {left_empty[0]} of the {checkpoint.family} configs in "
            f"{folder.name}: set model.config to a diffusers folder whose shapes fit this checkpoint"
        )
    return pipe
