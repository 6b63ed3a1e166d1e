"""Tiny, randomly initialised models built from configs, fully offline.

They stand in for Stable Diffusion and CLIP in tests and in the `tiny-test` recipe. Each is written as the
same folder format the real models use (a diffusers pipeline folder, a transformers CLIPModel folder), so
everything downstream loads them through the same `from_pretrained` path users take.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-sd", "tiny-sdxl", "tiny-clip")  # built on first use
SHIPPED_MODELS = (
    "toyworld-sd",
    "toyworld-clip",
    "toyworld-sd-outline",
    "toyworld-sd-small",
    "toyworld-sd-shaded",
    "toyworld-rich-sd",
    "toyworld-rich-clip",
)  # trained by `lora-grpo toyworld build` and `toyworld variants`, shipped as package data
# Bump when a builder changes, so cached folders built by an older version are rebuilt.
BUILTIN_VERSION = "2"
TINY_MERGES = 500
# 256 byte symbols, the same with "</w>", the merged tokens, then <|startoftext|> and <|endoftext|>.
TINY_VOCAB = 2 * 256 + TINY_MERGES + 2
TINY_BOS, TINY_EOS = TINY_VOCAB - 2, TINY_VOCAB - 1


def write_clip_tokenizer(out_dir: str | Path, num_merges: int = 500) -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) from the BPE table open_clip ships.

    Keeping the first `num_merges` merges gives a small vocabulary with the same special tokens and the same
    tokenisation rules as OpenAI CLIP (with all 48894 merges the ids are identical).
    """
    import open_clip.tokenizer as oc_tok

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with gzip.open(oc_tok.default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    symbols = list(oc_tok.bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    merge_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (out_dir / "merges.txt").write_text(merge_text, encoding="utf-8")


def tiny_text_config(hidden: int, layers: int = 2) -> dict:
    """A CLIP text-tower config over the tiny BPE vocabulary (SD-style 77-token context)."""
    return {
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "vocab_size": TINY_VOCAB,
        "max_position_embeddings": 77,
        "bos_token_id": TINY_BOS,
        "eos_token_id": TINY_EOS,
        "pad_token_id": TINY_EOS,
    }


def tiny_clip_config(hidden: int, vision_layers: int, patch_size: int, image_size: int = 32):
    """A small transformers CLIPConfig: text and vision towers of width `hidden`, projection `hidden`."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=tiny_text_config(hidden),
        vision_config={
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        projection_dim=hidden,
    )


def _tokenizer(tmp: Path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(tmp, num_merges=TINY_MERGES)
    # model_max_length=77 as in SD; without it the pipeline overflows computing the max length.
    return CLIPTokenizer.from_pretrained(tmp, model_max_length=77)


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """A StableDiffusionPipeline from components, without the safety checker (none is trained here)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sd_ddim_scheduler(prediction_type: str = "epsilon"):
    """A DDIMScheduler with Stable Diffusion 1.x's noise schedule."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def tiny_unet(sample_size: int = 16, cross_attention_dim: int = 32):
    """A two-level UNet2DConditionModel with cross-attention at the top level (~1M parameters)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
    )


TINY_TIME_EMBED = 8  # SDXL: each of the 6 size/crop ids is embedded in this many dimensions


def tiny_unet_xl(sample_size: int = 16, text_dims: tuple[int, int] = (32, 48), pooled_dim: int = 48):
    """A two-level SDXL-family UNet (added text-time conditioning), ~1M parameters.

    Its cross-attention reads both text encoders' hidden states side by side (sum of their widths); the added
    embedding reads the pooled text embedding and the 6 size/crop ids, as SDXL base 1.0 does at full size.
    """
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=sample_size,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(text_dims),
        attention_head_dim=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED,
        projection_class_embeddings_input_dim=6 * TINY_TIME_EMBED + pooled_dim,
    )


def tiny_vae():
    """An AutoencoderKL for 32x32 images <-> 4x16x16 latents (two levels, 0.17M parameters)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny StableDiffusionPipeline folder (16x16 latents, 32x32 images)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = tiny_unet()
    vae = tiny_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(32)))
    scheduler = sd_ddim_scheduler(prediction_type)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp))
        pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
        pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_sdxl_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny StableDiffusionXLPipeline folder (16x16 latents, 32x32 images): two text encoders (the
    second with a projection, giving the pooled embedding) sharing the tiny tokenizer, the SDXL-family UNet."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    unet = tiny_unet_xl()
    vae = tiny_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(**tiny_text_config(32)))
    # two widths, as in SDXL (768 and 1280): single-file loading tells the encoders apart by their width
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**tiny_text_config(48), projection_dim=48))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp))
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=sd_ddim_scheduler(),
        )
        pipe.save_pretrained(out_dir)
    return out_dir


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny transformers CLIPModel folder (32x32 input) with its tokenizer and image processor."""
    from transformers import CLIPImageProcessor, CLIPModel

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    config = tiny_clip_config(32, vision_layers=2, patch_size=8)
    model = CLIPModel(config)
    model.save_pretrained(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        _tokenizer(Path(tmp)).save_pretrained(out_dir)
    CLIPImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        do_convert_rgb=True,
    ).save_pretrained(out_dir)
    return out_dir


def build_tiny_open_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny open_clip `local-dir:` folder (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "model_cfg": {
            "embed_dim": 32,
            "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
        },
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }
    (out_dir / "open_clip_config.json").write_text(json.dumps(config), encoding="utf-8")
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{out_dir}", load_weights=False)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, out_dir / "open_clip_model.safetensors"
    )
    return out_dir


def shipped_models_dir() -> Path:
    """Where the package ships the toy world's trained models."""
    return Path(__file__).resolve().parent / "toyworld" / "models"


def builtin_home() -> Path:
    """Where built-in models are cached: $LORA_GRPO_HOME or ~/.cache/lora_grpo."""
    return Path(os.environ.get("LORA_GRPO_HOME", Path.home() / ".cache" / "lora_grpo"))


def resolve_builtin(name: str) -> Path:
    """Return the folder of built-in model `name` (e.g. "tiny-sd"), building it on first use.

    The folder is built in a temporary sibling and renamed into place, so an interrupted build never leaves
    a half-written model behind. The toy-world models are shipped inside the package instead.
    """
    from lora_grpo.errors import UserError

    if name in SHIPPED_MODELS:
        folder = shipped_models_dir() / name
        if not folder.is_dir():
            raise UserError(
                f"the shipped model {BUILTIN_PREFIX}{name} is missing from this installation ({folder}): "
                "rebuild it with `lora-grpo toyworld build` and point the recipe at the result"
            )
        if (folder / FINE_TUNE_RECORD).is_file():  # a fine-tune shipped as its UNet alone
            return assembled_fine_tune(folder)
        return folder
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS + SHIPPED_MODELS)
        raise UserError(f"unknown built-in model '{BUILTIN_PREFIX}{name}': use one of {known}")
    builders = {
        "tiny-sd": build_tiny_pipeline,
        "tiny-sdxl": build_tiny_sdxl_pipeline,
        "tiny-clip": build_tiny_clip,
    }
    return cached_folder(builtin_home() / "builtin" / f"{name}-v{BUILTIN_VERSION}", builders[name])


FINE_TUNE_RECORD = (
    "fine_tune_of.json"  # {"base": "<shipped model>"}: the folder holds only the fine-tuned unet/
)


def assembled_fine_tune(folder: Path) -> Path:
    """A shipped UNet fine-tune as a whole pipeline folder: its base's components with this UNet, assembled
    once in the cache (keyed by the UNet's bytes, so a rebuilt fine-tune gets a fresh folder)."""
    import hashlib
    import json
    import shutil

    base = shipped_models_dir() / json.loads((folder / FINE_TUNE_RECORD).read_text())["base"]
    digest = hashlib.sha256()
    for f in sorted((folder / "unet").iterdir()):
        digest.update(f.read_bytes())

    def assemble(tmp: Path) -> None:
        shutil.copytree(base, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("unet"))
        shutil.copytree(folder / "unet", tmp / "unet")

    return cached_folder(builtin_home() / "builtin" / f"{folder.name}-{digest.hexdigest()[:12]}", assemble)


def cached_folder(target: Path, build: Callable[[Path], object]) -> Path:
    """`target`, built by `build(folder)` on first use in a temporary sibling and renamed into place, so an
    interrupted build never leaves a half-written folder behind."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():  # another process finished the same build first: use theirs
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
