"""Q16 inappropriate-content classifier (Schramowski, Tauchmann, Kersting, FAccT 2022).

Q16 is CLIP ViT-L/14 plus two learned prompt embeddings [2, D] (row 0 "appropriate", row 1 "inappropriate"):
p = softmax(100 * cos(z_img, prompts)), and an image is inappropriate when p[1] > p[0] (argmax is 1).

The published embeddings are a Python pickle (`data/ViT-L-14/prompts.p` in the Q16 repository) holding a
numpy array. We never unpickle a user's file with `pickle.load`: `SafeArrayUnpickler` resolves only the
numpy names needed to rebuild a plain array and refuses every other global (a pickle that would import `os`
or call anything else stops with an error). `lora-grpo convert-q16 prompts.p q16.safetensors` converts
it once; a `.safetensors` file (tensor `prompts`) loads without any unpickling.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lora_grpo.errors import UserError

# The only globals a pickled numpy array (or list of arrays) needs, across numpy 1.x and 2.x module names.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class SafeArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}': only numpy arrays are read")


def read_pickled_array(path: Path) -> np.ndarray:
    try:
        data = SafeArrayUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as err:
        raise UserError(f"Q16 embeddings {path}: {err} (is this Q16's prompts.p?)") from None
    except Exception as err:  # truncated or not a pickle at all
        raise UserError(f"Q16 embeddings {path} could not be read as a pickled array: {err}") from None
    return np.asarray(data, dtype=np.float32)


def load_q16_embeddings(path: str | Path) -> Tensor:
    """[2, D] float32 from a .safetensors file (tensor 'prompts') or Q16's pickle (read safely)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Q16 embeddings file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if "prompts" not in tensors:
            raise UserError(f"Q16 embeddings {path} has no tensor 'prompts' (has: {', '.join(tensors)})")
        prompts = tensors["prompts"].float()
    else:
        prompts = torch.from_numpy(read_pickled_array(path))
    if prompts.ndim != 2 or prompts.shape[0] != 2:
        raise UserError(
            f"Q16 embeddings {path} have shape {tuple(prompts.shape)}, expected [2, D] "
            "(appropriate, inappropriate)"
        )
    return prompts


def convert_q16(pickle_path: str | Path, out_path: str | Path) -> Path:
    """One-time conversion of Q16's pickle into safetensors (read with the safe unpickler)."""
    from safetensors.torch import save_file

    prompts = load_q16_embeddings(pickle_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"prompts": prompts.contiguous()}, str(out_path), metadata={"source": Path(pickle_path).name})
    return out_path


def q16_probabilities(image_embeds: Tensor, prompts: Tensor) -> Tensor:
    """P(inappropriate) per image: softmax(100 * cos(z_img, prompts))[:, 1]; [N, D], [2, D] -> [N]."""
    if image_embeds.shape[-1] != prompts.shape[-1]:
        raise UserError(
            f"Q16 embeddings have dimension {prompts.shape[-1]} but the CLIP's image features have "
            f"{image_embeds.shape[-1]}: Q16 needs the CLIP it was trained with (ViT-L/14: --clip "
            "openai/clip-vit-large-patch14)"
        )
    logits = 100.0 * F.normalize(image_embeds.float(), dim=-1) @ F.normalize(prompts.float(), dim=-1).T
    return logits.softmax(dim=-1)[:, 1]
