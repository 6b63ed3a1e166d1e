"""Model loading errors and LoRA placement."""

import pytest
import torch

from lora_grpo.config import LoraSettings, ModelConfig
from lora_grpo.errors import UserError
from lora_grpo.models import add_lora, load_adapter, load_pipeline, resolve_model_ref, save_adapter


def test_resolve_model_ref(tmp_path, tiny_sd_dir):
    assert resolve_model_ref(str(tiny_sd_dir)) == str(tiny_sd_dir.resolve())
    assert resolve_model_ref("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    with pytest.raises(UserError, match="has no model_index.json"):
        resolve_model_ref(str(tmp_path))
    with pytest.raises(UserError, match="base model path does not exist: ./models/sd15"):
        resolve_model_ref("./models/sd15")
    with pytest.raises(UserError, match="unknown built-in model 'builtin:huge'"):
        resolve_model_ref("builtin:huge")


def test_hub_id_offline_gives_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        load_pipeline(ModelConfig(base="no-such-org/no-such-model"))
    message = str(info.value)
    assert "base model 'no-such-org/no-such-model'" in message and "HF_HUB_OFFLINE=1" in message
    assert "stacktrace" not in message and "\n" not in message


def test_lora_only_on_attention_projections(tiny_sd_dir):
    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    pipe.unet.requires_grad_(False)
    targets = [
        name
        for name, module in pipe.unet.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.split(".")[-1] in ("to_q", "to_k", "to_v")
        or name.endswith("to_out.0")
    ]
    params = add_lora(pipe.unet, LoraSettings(rank=2, alpha=4.0))
    assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
    # one lora_A and one lora_B per targeted projection, nothing else trainable
    assert len(params) == 2 * len(targets) and len(targets) > 0
    trainable = [n for n, p in pipe.unet.named_parameters() if p.requires_grad]
    assert all(".attn" in n and "lora_" in n for n in trainable)


def test_bad_target_modules(tiny_sd_dir):
    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    with pytest.raises(UserError, match="do not fit this UNet"):
        add_lora(pipe.unet, LoraSettings(target_modules=["no_such_layer"]))


def test_adapter_round_trip_alpha_not_rank(tiny_sd_dir, tmp_path):
    """alpha != rank: without the saved metadata the reload would silently use scale 1 instead of 3."""
    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    params = add_lora(pipe.unet, LoraSettings(rank=2, alpha=6.0))
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.2)  # make lora_B non-zero
    save_adapter(pipe.unet, tmp_path / "adapter")

    def image(p):
        return p(
            "a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images

    trained = image(pipe)
    fresh = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    base = image(fresh)
    load_adapter(fresh, tmp_path / "adapter")
    assert abs(trained - base).max() > 1e-3
    assert abs(image(fresh) - trained).max() < 1e-5


def test_load_adapter_errors(tiny_sd_dir, tmp_path):
    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    with pytest.raises(UserError, match="adapter not found"):
        load_adapter(pipe, tmp_path / "nope")
    with pytest.raises(UserError, match="has no pytorch_lora_weights.safetensors"):
        load_adapter(pipe, tmp_path)
