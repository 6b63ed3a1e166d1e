"""Load a Stable Diffusion pipeline (hub id, local folder or built-in tiny model), add and save the LoRA;
the model-level helpers everything else shares: the device choice, prompt encoding, VAE decoding and the
adapter-disabled reference policy.

LoRA mechanics follow diffusers + peft exactly: `unet.add_adapter(LoraConfig)`, saved with
`save_lora_weights(..., unet_lora_adapter_metadata=...)` so a LoRA with alpha != rank reloads at the right
scale, loaded with `pipe.load_lora_weights`.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_grpo.config import LoraSettings, ModelConfig
from lora_grpo.errors import UserError, first_line, hub_load_error
from lora_grpo.tiny import BUILTIN_PREFIX, resolve_builtin

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model_ref(ref: str) -> str:
    """A local folder (absolute path), a built-in model's folder, or a hub id, checked for obvious mistakes."""
    if ref.startswith(BUILTIN_PREFIX):
        return str(resolve_builtin(ref[len(BUILTIN_PREFIX) :]))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"base model folder {path} has no model_index.json: point model.base at a diffusers pipeline "
                "folder (the one holding unet/, vae/, text_encoder/, tokenizer/, scheduler/)"
            )
        return str(path.resolve())
    if ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise UserError(
            f"base model path does not exist: {ref} (give a local diffusers folder or a hub id like CompVis/stable-diffusion-v1-4)"
        )
    return ref


def portable_model_name(ref: str) -> str:
    """How to name a model outside this machine: a hub id or `builtin:NAME` as it is, a built-in model's folder
    as `builtin:NAME`, any other local folder by its folder name (never an absolute path)."""
    from lora_grpo.tiny import BUILTIN_MODELS, SHIPPED_MODELS, builtin_home, shipped_models_dir

    if ref.startswith(BUILTIN_PREFIX) or "://" in ref:
        return ref
    path = Path(ref).expanduser()
    if not path.exists() and _HUB_ID.match(ref):
        return ref
    resolved = path.resolve()
    for name in SHIPPED_MODELS:
        if resolved == (shipped_models_dir() / name).resolve():
            return BUILTIN_PREFIX + name
    for name in BUILTIN_MODELS:
        if resolved.parent == (builtin_home() / "builtin").resolve() and resolved.name.startswith(
            f"{name}-v"
        ):
            return BUILTIN_PREFIX + name
    return resolved.name


def load_pipeline(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """Load the base pipeline without its safety checker, with a DDIM scheduler from the model's config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ref = resolve_model_ref(cfg.base)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            ref,
            revision=cfg.revision,
            variant=cfg.variant,
            torch_dtype=dtype,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=Path(ref).is_dir(),
        )
    except Exception as err:  # hub, file and format errors of many types: the user needs one line
        if Path(ref).is_dir():
            raise UserError(
                f"could not load base model folder {ref}: {first_line(err)} (a damaged or incomplete "
                "diffusers folder: copy or download it again)"
            ) from None
        raise hub_load_error("base model", cfg.base, err) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pick_device(requested: str | None = None) -> torch.device:
    """The device to run on: `requested` (checked), else the GPU when there is one, else the CPU."""
    if requested is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UserError(f"unknown device '{requested}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device '{requested}' asked for, but no CUDA GPU is visible: use --device cpu")
    return device


def freeze(pipe) -> None:
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)


@dataclass(frozen=True)
class PromptEncoder:
    """The pipeline's text encoder as a function: prompts -> embeddings [N, L, D] on `device` in `dtype`.

    `encoder_device` is where the frozen text encoder runs (the CPU when it is offloaded).
    """

    pipe: Any
    encoder_device: torch.device
    device: torch.device
    dtype: torch.dtype

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompts, self.encoder_device, 1, False)
        return embeds.to(self.device, dtype=self.dtype)


def decode_latents(vae, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """VAE decode in slices of `chunk` latents; [N, C, h, w] -> [N, 3, H, W] in [0, 1], fp32."""
    dtype = next(vae.parameters()).dtype
    out = []
    with torch.no_grad():
        for i in range(0, latents.shape[0], chunk):
            z = latents[i : i + chunk].to(dtype) / vae.config.scaling_factor
            out.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


@contextlib.contextmanager
def adapter_disabled(unet):
    """The reference policy: the same UNet with the LoRA switched off (no second copy in memory)."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def peft_lora_config(cfg: LoraSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the adapter starts as the identity
        target_modules=list(cfg.target_modules),
    )


def add_lora(unet, cfg: LoraSettings) -> list[torch.nn.Parameter]:
    """Add the LoRA adapter to the UNet attention layers; return its parameters, upcast to fp32."""
    try:
        unet.add_adapter(peft_lora_config(cfg))
    except ValueError as err:
        raise UserError(
            f"lora.target_modules {cfg.target_modules} do not fit this UNet: {first_line(err)}"
        ) from None
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        # fp32 master weights for the trainable part, whatever the frozen base is stored in
        p.data = p.data.float()
    return params


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights in diffusers format (keys without the `unet.` prefix)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def base_architecture(unet_config) -> str:
    """A short fingerprint of the UNet an adapter fits: family plus the shapes LoRA weights depend on.

    `sd1` (cross-attention 768), `sd2` (1024), else `custom`; e.g. `sd1:cross768:blocks320-640-1280-1280`.
    """
    cross = unet_config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    blocks = "-".join(str(c) for c in unet_config.block_out_channels)
    family = {768: "sd1", 1024: "sd2"}.get(cross, "custom") if blocks == "320-640-1280-1280" else "custom"
    return f"{family}:cross{cross}:blocks{blocks}"


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for a truncated or foreign file
        raise UserError(
            f"adapter file {path} is not a readable .safetensors file ({first_line(err)})"
        ) from None


def nonfinite_keys(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [k for k, v in tensors.items() if not torch.isfinite(v).all()]


def adapter_weights_file(adapter: str | Path) -> Path:
    """The weights file of an adapter (a folder holding pytorch_lora_weights.safetensors, or a .safetensors
    file), checked before any model loads: it exists, reads as safetensors and holds only finite weights."""
    from safetensors.torch import load_file

    path = Path(adapter).expanduser()
    if path.is_dir():
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise UserError(f"adapter folder {path} has no {ADAPTER_WEIGHTS}: give the run's adapter/ folder")
        path = path / ADAPTER_WEIGHTS
    elif not path.is_file():
        raise UserError(f"adapter not found: {path}")
    try:
        tensors = load_file(str(path))
    except Exception as err:
        raise UserError(
            f"adapter file {path} is not a readable .safetensors file ({first_line(err)}): give the "
            "pytorch_lora_weights.safetensors of a run's adapter/ folder"
        ) from None
    bad = nonfinite_keys(tensors)
    if bad:
        raise UserError(
            f"adapter {path} holds non-finite weights ({bad[0]}): it comes from a run that diverged; use the "
            "adapter of an earlier checkpoint (RUN/checkpoints/epoch_N/adapter)"
        )
    return path


def add_adapter_metadata(path: str | Path, extra: dict[str, str]) -> None:
    """Rewrite a .safetensors file with more metadata keys (tensors unchanged), atomically."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    tensors = load_file(str(path))
    metadata = {**read_adapter_metadata(path), **extra}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


def save_adapter(unet, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` with adapter metadata (rank, alpha, targets) for
    `load_lora_weights`, plus the base model's id and architecture so a mismatched base is refused."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    state = {k: v.detach().float().contiguous().cpu() for k, v in lora_state_dict(unet).items()}
    if nonfinite_keys(state):  # never write weights that would only produce noise
        raise UserError(
            f"not saving the adapter to {out_dir}: its weights are non-finite ({nonfinite_keys(state)[0]}); "
            "lower train.learning_rate and resume from the last good checkpoint"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        out_dir,
        unet_lora_layers=state,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    path = out_dir / ADAPTER_WEIGHTS
    extra = {"lora_grpo.base_architecture": base_architecture(unet.config)}
    if base_model:
        extra["lora_grpo.base_model"] = portable_model_name(base_model)
    add_adapter_metadata(path, extra)
    return path


def load_adapter(pipe, adapter: str | Path) -> None:
    """Load a saved adapter (folder or .safetensors file) into a pipeline with diffusers' own loader."""
    path = Path(adapter).expanduser()
    weights = adapter_weights_file(path)
    args, kwargs = (str(weights.parent),), {"weight_name": weights.name}
    if weights.suffix == ".safetensors":
        expected = read_adapter_metadata(weights).get("lora_grpo.base_architecture")
        actual = base_architecture(pipe.unet.config)
        if expected and expected != actual:
            trained_on = read_adapter_metadata(weights).get("lora_grpo.base_model", "another model")
            raise UserError(
                f"adapter {path} was trained for a {expected} UNet ({trained_on}) but this base model is {actual}: "
                "load it into the base model it was trained on"
            )
    try:
        pipe.load_lora_weights(*args, **kwargs)
    except (ValueError, RuntimeError, KeyError, OSError) as err:
        raise UserError(f"could not load adapter {path} into this base model: {first_line(err)}") from None


def load_lora_state(unet, adapter_dir: str | Path) -> None:
    """Put the LoRA weights saved by `save_adapter` back into `unet`'s existing adapter, exactly (resume)."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise UserError(f"checkpoint adapter {path} is missing: resume from another checkpoint")
    state = {k.removeprefix("unet."): v for k, v in load_file(str(path)).items()}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(state), adapter_name="default")
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    if unexpected:
        raise UserError(
            f"checkpoint adapter {path} does not fit this model's LoRA ({unexpected[0]}): resume with the "
            "recipe and lora settings the run was started with"
        )
