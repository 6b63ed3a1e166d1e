"""The pictures img2img rollouts start from (`sample.img2img.source`): one a prompt, as latents, made once per
run and kept (the same on every process and after a resume: each is keyed by its prompt alone).

- `base`: the base model's own image of the prompt (the adapter off; its final latent, so no VAE round trip),
  sampled on noise keyed by (seed, the prompt): no dataset is needed, and an unsafe prompt's picture shows
  what the base draws for it;
- a renderer (the toy world's, passed in by the trainer): prompt -> image [3, H, W] in [0, 1], VAE-encoded.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor

from lora_grpo.models import adapter_disabled, encode_images
from lora_grpo.rollout import RolloutModel, rollout
from lora_grpo.sampling import seeded_generator

PICTURE_KEY = 15_485_863  # keys the pictures' noise apart from every training and evaluation stream


def prompt_key(prompt: str) -> int:
    return zlib.crc32(prompt.encode("utf-8"))


class PictureSource:
    """prompts -> their pictures' latents [P, C, h, w] (CPU, fp32), each made once by `make` (a prompt set
    that starts a prompt from another's picture asks for that one: PromptSet.picture_of)."""

    def __init__(self, make: Callable[[list[str]], Tensor]):
        self.make = make
        self.cache: dict[str, Tensor] = {}

    def __call__(self, prompts: list[str]) -> Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if missing:
            for prompt, latent in zip(missing, self.make(missing), strict=True):
                self.cache[prompt] = latent.detach().float().cpu()
        return torch.stack([self.cache[p] for p in prompts])


def base_pictures(
    model: RolloutModel,
    seed: int,
    on_first_base: Callable[[], AbstractContextManager] = nullcontext,
) -> PictureSource:
    """The base model's own image of each prompt (`model`'s sampler and CFG, the adapter off), drawn on the
    first base (`on_first_base`: with model.bases, a context that switches to it and back)."""

    def make(prompts: list[str]) -> Tensor:
        gens = [seeded_generator(seed, PICTURE_KEY, prompt_key(p)) for p in prompts]
        with on_first_base(), adapter_disabled(model.unet):
            return rollout(model, prompts, gens).latents[:, -1]

    return PictureSource(make)


def rendered_pictures(model: RolloutModel, render: Callable[[str, int], Tensor]) -> PictureSource:
    """`render(prompt, key)` -> image [3, H, W] in [0, 1], VAE-encoded."""

    def make(prompts: list[str]) -> Tensor:
        images = torch.stack([render(p, prompt_key(p)) for p in prompts])
        return encode_images(model.vae, images)

    return PictureSource(make)
