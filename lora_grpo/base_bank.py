"""Several bases in one run (`model.bases`): one LoRA trained over a family of fine-tunes of one architecture.

Only the UNet differs between bases (a community fine-tune's text encoder and VAE are taken as the first
base's). The bank keeps every base's frozen UNet weights on the CPU in the base dtype and copies one base's
into the training UNet when its turn comes; the LoRA weights are never touched, and the reference policy
(the UNet with the adapter disabled) is always the base in use. One UNet sits on the GPU whatever the count.
"""

from __future__ import annotations

import torch

from lora_grpo.config import ModelConfig
from lora_grpo.errors import UserError


def frozen_names(unet) -> dict[str, str]:
    """The training UNet's frozen tensors -> their names in a plain UNet's state dict (peft keeps a wrapped
    layer's own weight under `base_layer`)."""
    return {
        name: name.replace(".base_layer", "")
        for name, _ in [*unet.named_parameters(), *unet.named_buffers()]
        if "lora_" not in name
    }


def base_for_epoch(epoch: int, count: int) -> int:
    """Epoch e samples and trains on base e mod count: every base as often, in a fixed order."""
    return epoch % count


class BaseBank:
    def __init__(self, unet, extra: list[ModelConfig], dtype: torch.dtype):
        from lora_grpo.models import base_architecture, load_pipeline

        self.unet = unet
        self.names = frozen_names(unet)
        tensors = dict([*unet.named_parameters(), *unet.named_buffers()])
        first = {plain: tensors[name].detach().to("cpu", copy=True) for name, plain in self.names.items()}
        self.weights = [first]
        wanted = base_architecture(unet.config)
        for cfg in extra:
            other = load_pipeline(cfg, dtype=dtype).unet
            if base_architecture(other.config) != wanted or set(other.state_dict()) != set(first):
                raise UserError(
                    f"model.bases: {cfg.base} is not the architecture of model.base ({wanted}): one LoRA "
                    "trains over fine-tunes of one base model; list only those"
                )
            state = other.state_dict()
            self.weights.append({plain: state[plain].to(dtype) for plain in first})
            del other
        self.current = 0

    def __len__(self) -> int:
        return len(self.weights)

    @torch.no_grad()
    def use(self, index: int) -> None:
        """Put base `index`'s frozen weights into the training UNet."""
        if index == self.current:
            return
        tensors = dict([*self.unet.named_parameters(), *self.unet.named_buffers()])
        for name, plain in self.names.items():
            tensors[name].copy_(self.weights[index][plain])
        self.current = index
