"""The component configs of the model families a single checkpoint file can hold, shipped with lora_grpo.

A `.safetensors` checkpoint as ComfyUI and A1111 users download it holds weights only. diffusers'
`from_single_file` needs each component's config next to it; lora_grpo ships them for Stable Diffusion 1.x
(SD 1.5's architecture) and SDXL (base 1.0's), and writes them once as a diffusers folder in its cache, with
the CLIP tokenizer built from the BPE table open_clip ships (all 48,894 merges: the same ids as OpenAI's).
Nothing is fetched from the hub. The numbers are the published architectures (Rombach et al. 2022; Podell
et al. 2023, arXiv:2307.01952, table 1); `benchmarks/gpu_memory.py` builds its random-weight models from them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from lora_grpo.errors import UserError, first_line

CONFIGS_VERSION = "1"  # bump when a config below changes, so cached folders are rewritten
FULL_BPE_MERGES = 48894  # OpenAI CLIP's vocabulary: 49,408 tokens

# the noise schedule every SD 1.x / SDXL checkpoint was trained with; lora_grpo samples with DDIM
SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

SD_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.18215,
}


def clip_text(hidden: int, layers: int, heads: int, act: str, projection: int | None = None) -> dict:
    """A CLIP text tower over the full vocabulary with SD's 77-token context."""
    config = {
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }
    if projection:
        config["projection_dim"] = projection
    return config


CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    **clip_text(768, 12, 12, "quick_gelu"),
}

FAMILIES: dict[str, dict] = {
    "sd1": {
        "model_index": {
            "_class_name": "StableDiffusionPipeline",
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        },
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 64,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "layers_per_block": 2,
            "attention_head_dim": 8,
            "cross_attention_dim": 768,
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
        },
        "vae": SD_VAE,
        "text_encoder": CLIP_L,  # OpenAI CLIP ViT-L/14's text tower in both families
        "tokenizers": {"tokenizer": "<|endoftext|>"},
    },
    "sdxl": {
        "model_index": {
            "_class_name": "StableDiffusionXLPipeline",
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "force_zeros_for_empty_prompt": True,
        },
        "unet": {
            "_class_name": "UNet2DConditionModel",
            "sample_size": 128,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,  # 6 size ids x 256 + the 1280-wide pooled text
            "norm_num_groups": 32,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
        },
        "vae": {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
        "text_encoder": CLIP_L,  # OpenAI CLIP ViT-L/14's text tower in both families
        "text_encoder_2": {
            "architectures": ["CLIPTextModelWithProjection"],
            "model_type": "clip_text_model",
            **clip_text(1280, 32, 20, "gelu", projection=1280),
        },
        # OpenCLIP pads with "!" (id 0); SDXL's second tokenizer does the same
        "tokenizers": {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"},
    },
}


def write_config_folder(family: str, out_dir: Path) -> Path:
    """Write the diffusers folder layout of `family` without weights: model_index.json, each component's
    config, the scheduler config and the tokenizer(s)."""
    from transformers import CLIPTokenizer

    from lora_grpo.tiny import write_clip_tokenizer

    spec = FAMILIES[family]
    out_dir.mkdir(parents=True, exist_ok=True)

    def dump(relative: str, data: dict) -> None:
        path = out_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2), encoding="utf-8")

    dump("model_index.json", spec["model_index"])
    dump("scheduler/scheduler_config.json", SCHEDULER)
    for component in ("unet", "vae"):
        dump(f"{component}/config.json", spec[component])
    for component in ("text_encoder", "text_encoder_2"):
        if component in spec:
            dump(f"{component}/config.json", spec[component])
    bpe = out_dir / "_bpe"
    write_clip_tokenizer(bpe, num_merges=FULL_BPE_MERGES)
    for folder, pad in spec["tokenizers"].items():
        CLIPTokenizer.from_pretrained(bpe, model_max_length=77, pad_token=pad).save_pretrained(
            out_dir / folder
        )
    shutil.rmtree(bpe)
    return out_dir


def config_folder(family: str) -> Path:
    """The cached config folder of `family` (sd1 or sdxl), written on first use (atomically)."""
    from lora_grpo.tiny import builtin_home, cached_folder

    target = builtin_home() / "configs" / f"{family}-v{CONFIGS_VERSION}"
    return cached_folder(target, lambda folder: write_config_folder(family, folder))


def pipeline_class_name(ref: str, revision: str | None = None) -> str:
    """The `_class_name` in a diffusers pipeline's model_index.json (a local folder, else fetched from the hub)."""
    index = Path(ref) / "model_index.json"
    if index.is_file():
        try:
            return str(json.loads(index.read_text())["_class_name"])
        except (ValueError, KeyError, TypeError) as err:
            raise UserError(
                f"{index} is not a diffusers model index ({first_line(err)}): copy the model folder again"
            ) from None
    from diffusers import DiffusionPipeline

    return str(DiffusionPipeline.load_config(ref, revision=revision)["_class_name"])
