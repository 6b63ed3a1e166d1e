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

from lora_grpo.conditioning import TextConditioning, sdxl_time_ids
from lora_grpo.config import LoraSettings, ModelConfig
from lora_grpo.errors import UserError, first_line, hub_load_error
from lora_grpo.families import pipeline_class_name
from lora_grpo.files import folder_built_beside, writing
from lora_grpo.single_file import file_sha256, inspect_checkpoint, is_checkpoint_file, load_single_file
from lora_grpo.tiny import BUILTIN_PREFIX, resolve_builtin

ADAPTER_WEIGHTS = "pytorch_lora_weights.safetensors"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def resolve_model_ref(ref: str) -> str:
    """A local folder (absolute path), a built-in model's folder, or a hub id, checked for obvious mistakes."""
    if ref.startswith(BUILTIN_PREFIX):
        return str(resolve_builtin(ref[len(BUILTIN_PREFIX) :]))
    path = Path(ref).expanduser()
    if is_checkpoint_file(ref):
        return str(inspect_checkpoint(ref).path)
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
        if (
            resolved.parent == (builtin_home() / "builtin").resolve()
            and resolved.name.rpartition("-")[0] == name
        ):
            return BUILTIN_PREFIX + name  # a shipped fine-tune assembled in the cache
    for name in BUILTIN_MODELS:
        if resolved.parent == (builtin_home() / "builtin").resolve() and resolved.name.startswith(
            f"{name}-v"
        ):
            return BUILTIN_PREFIX + name
    return resolved.name


def base_model_record(ref: str) -> dict[str, str]:
    """How runs, adapters and cards name a base model: `base_model` (hub id, builtin:NAME, or a folder's or
    file's name, never a path) and, for a single-file checkpoint, its `base_sha256`."""
    record = {"base_model": portable_model_name(ref)}
    if is_checkpoint_file(ref) and Path(ref).expanduser().is_file():
        record["base_sha256"] = file_sha256(Path(ref).expanduser())
    return record


def load_pipeline(cfg: ModelConfig, dtype: torch.dtype = torch.float32):
    """Load the base pipeline (SD 1.x/2.x or SDXL, by its model index) without a safety checker, with a DDIM
    scheduler from the model's config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    ref = resolve_model_ref(cfg.base)
    if is_checkpoint_file(ref):
        pipe = load_single_file(inspect_checkpoint(ref), cfg.config, dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    try:
        xl = pipeline_class_name(ref, cfg.revision).startswith("StableDiffusionXL")
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        pipe = cls.from_pretrained(
            ref,
            revision=cfg.revision,
            variant=cfg.variant,
            torch_dtype=dtype,
            local_files_only=Path(ref).is_dir(),
            **extra,
        )
    except UserError:
        raise
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


def is_sdxl(unet_config) -> bool:
    """An SDXL-family UNet: it takes the pooled text embedding and size/crop ids as added conditioning."""
    return getattr(unet_config, "addition_embed_type", None) == "text_time"


def text_encoders(pipe) -> list[torch.nn.Module]:
    """The pipeline's text encoders (SDXL has two)."""
    return [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]


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
    for module in (pipe.unet, pipe.vae, *text_encoders(pipe)):
        module.requires_grad_(False)


@dataclass(frozen=True)
class PromptEncoder:
    """The pipeline's text encoder(s) as a function: prompts -> `TextConditioning` on `device` in `dtype`.

    SD 1.x/2.x: the hidden states. SDXL: both encoders' hidden states, the pooled embedding and the size ids
    of `size` (height, width) images. `encoder_device` is where the frozen text encoders run (the CPU when they
    are offloaded). `negative(text)` is the unconditional row for classifier-free guidance, as the stock
    pipeline builds it (SDXL: zeros for an empty negative prompt when the model asks for that).
    """

    pipe: Any
    encoder_device: torch.device
    device: torch.device
    dtype: torch.dtype
    size: tuple[int, int]

    def __call__(self, prompts: list[str]) -> TextConditioning:
        with torch.no_grad():
            out = self.pipe.encode_prompt(
                prompt=prompts,
                device=self.encoder_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=False,
            )
        return self._conditioning(out[0], out[2] if len(out) == 4 else None)

    def negative(self, text: str) -> TextConditioning:
        """[1 row] the negative prompt's conditioning."""
        if len(out := self._negative_outputs(text)) == 2:
            return self._conditioning(out[1], None)
        return self._conditioning(out[1], out[3])

    def _negative_outputs(self, text: str):
        with torch.no_grad():
            return self.pipe.encode_prompt(
                prompt=[""],
                device=self.encoder_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=True,
                negative_prompt=[text] if text else None,
            )

    def _conditioning(self, hidden: torch.Tensor, pooled: torch.Tensor | None) -> TextConditioning:
        time_ids = None if pooled is None else sdxl_time_ids(*self.size, hidden.shape[0])
        return TextConditioning(hidden, pooled, time_ids).to(self.device, self.dtype)


def decode_latents(vae, latents: torch.Tensor, chunk: int) -> torch.Tensor:
    """VAE decode in slices of `chunk` latents; [N, C, h, w] -> [N, 3, H, W] in [0, 1], fp32."""
    dtype = next(vae.parameters()).dtype
    out = []
    with torch.no_grad():
        for i in range(0, latents.shape[0], chunk):
            z = latents[i : i + chunk].to(dtype) / vae.config.scaling_factor
            out.append((vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
    return torch.cat(out)


def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """VAE encode [N, 3, H, W] in [0, 1] -> latents [N, C, h, w] (the posterior's mean, scaled), fp32."""
    dtype, device = next(vae.parameters()).dtype, next(vae.parameters()).device
    with torch.no_grad():
        posterior = vae.encode((images * 2 - 1).to(device, dtype)).latent_dist
    return posterior.mean.float() * vae.config.scaling_factor


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


FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "custom": "custom"}


def base_architecture(unet_config) -> str:
    """A short fingerprint of the UNet an adapter fits: family plus the shapes LoRA weights depend on.

    `sdxl` (added text-time conditioning), `sd1` (cross-attention 768), `sd2` (1024), else `custom`; e.g.
    `sd1:cross768:blocks320-640-1280-1280`, `sdxl:cross2048:blocks320-640-1280`.
    """
    cross = unet_config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    blocks = "-".join(str(c) for c in unet_config.block_out_channels)
    if is_sdxl(unet_config):
        family = "sdxl"
    elif blocks == "320-640-1280-1280":
        family = {768: "sd1", 1024: "sd2"}.get(cross, "custom")
    else:
        family = "custom"
    return f"{family}:cross{cross}:blocks{blocks}"


def describe_architecture(fingerprint: str) -> str:
    """`sdxl:cross2048:blocks320-640-1280` -> `an SDXL UNet (sdxl:cross2048:blocks320-640-1280)`."""
    family = FAMILY_NAMES.get(fingerprint.split(":")[0], "custom")
    article = "an" if family[0] in "S" else "a"
    return f"{article} {family} UNet ({fingerprint})"


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
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    out_dir = Path(out_dir)
    state = {k: v.detach().float().contiguous().cpu() for k, v in lora_state_dict(unet).items()}
    if nonfinite_keys(state):  # never write weights that would only produce noise
        raise UserError(
            f"not saving the adapter to {out_dir}: its weights are non-finite ({nonfinite_keys(state)[0]}); "
            "lower train.learning_rate and resume from the last good checkpoint"
        )
    writer = StableDiffusionXLPipeline if is_sdxl(unet.config) else StableDiffusionPipeline
    extra = {"lora_grpo.base_architecture": base_architecture(unet.config)}
    if base_model:
        extra.update({f"lora_grpo.{k}": v for k, v in base_model_record(base_model).items()})
    # built beside and renamed whole (umask permissions: safetensors leaves 0600, and a ComfyUI running as
    # another user must read it); a full disk leaves the earlier adapter, if any
    with writing(out_dir, "the adapter"), folder_built_beside(out_dir, replace=True) as tmp:
        writer.save_lora_weights(
            tmp,
            unet_lora_layers=state,
            unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
            safe_serialization=True,
        )
        add_adapter_metadata(tmp / ADAPTER_WEIGHTS, extra)
    return out_dir / ADAPTER_WEIGHTS


def load_adapter(pipe, adapter: str | Path, adapter_name: str | None = None) -> None:
    """Load a saved adapter (folder or .safetensors file) into a pipeline with diffusers' own loader, under
    `adapter_name` (diffusers names it when None)."""
    path = Path(adapter).expanduser()
    weights = adapter_weights_file(path)
    args, kwargs = (str(weights.parent),), {"weight_name": weights.name}
    if adapter_name is not None:
        kwargs["adapter_name"] = adapter_name
    if weights.suffix == ".safetensors":
        expected = read_adapter_metadata(weights).get("lora_grpo.base_architecture")
        actual = base_architecture(pipe.unet.config)
        if expected and expected != actual:
            trained_on = read_adapter_metadata(weights).get("lora_grpo.base_model", "another model")
            raise UserError(
                f"adapter {path} was trained for {describe_architecture(expected)}, base {trained_on}, but "
                f"this base model is {describe_architecture(actual)}: load it into the base model it was "
                "trained on"
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
