"""SDXL end to end on a tiny SDXL-family pipeline built from configs: the trainer's conditioning equals the
stock pipeline's, training moves only the LoRA, and the export loads into a stock StableDiffusionXLPipeline
(diffusers file and kohya/ComfyUI file) with the trained model's image."""

import re

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from lora_grpo.config import load_config
from lora_grpo.hub.export import export
from lora_grpo.models import base_architecture
from lora_grpo.recipe_files import find_recipe
from lora_grpo.rollout import rollout
from lora_grpo.sampling import block_noise, seeded_generator
from lora_grpo.train import Trainer


@pytest.fixture(scope="module")
def trained(tiny_sdxl_dir, tiny_clip_dir, tmp_path_factory):
    """tiny-test on the tiny SDXL pipeline for 2 epochs (CFG 2, a sliding stochastic window, KL on)."""
    run_dir = tmp_path_factory.mktemp("run")
    config = load_config(
        find_recipe("tiny-test"),
        [
            f"model.base={tiny_sdxl_dir}",
            f"reward.clip.model={tiny_clip_dir}",
            "train.epochs=2",
            "evaluate.every=0",
        ],
    )
    trainer = Trainer(config, run_dir, log=lambda line: None)
    before = {k: v.detach().clone() for k, v in trainer.pipe.unet.state_dict().items()}
    adapter_dir = trainer.run()
    trainer.pipe.unet.eval()
    out = tmp_path_factory.mktemp("export")
    export(run_dir, out, name="tiny-xl-safety", log=lambda line: None)
    return trainer, before, adapter_dir, out


def fresh(folder) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def image(pipe, **kwargs):
    gen = torch.Generator().manual_seed(3)
    return pipe(
        "a photo of a cat",
        num_inference_steps=4,
        guidance_scale=2.0,
        generator=gen,
        output_type="np",
        height=32,
        width=32,
        **kwargs,
    ).images


def test_the_family_is_detected_and_loaded_as_sdxl(trained):
    trainer = trained[0]
    assert isinstance(trainer.pipe, StableDiffusionXLPipeline)
    assert base_architecture(trainer.pipe.unet.config) == "sdxl:cross80:blocks32-64"
    assert trainer.model.uncond is not None and trainer.model.uncond.pooled is not None


def test_deterministic_rollout_equals_the_stock_pipeline(trained):
    """With every step deterministic (an empty stochastic window), the trainer's sampler, prompt encoding
    (both text encoders, pooled embeds, size ids) and CFG reproduce StableDiffusionXLPipeline(eta=0)."""
    from accelerate import Accelerator

    trainer = trained[0]
    Accelerator(mixed_precision="no")  # the autouse fixture reset accelerate's state after the run
    prompts = ["a photo of a cat", "a red circle"]
    gens = [seeded_generator(11, k) for k in range(2)]
    ours = rollout(trainer.model, prompts, gens, window=(0, 0))
    x_T = block_noise((2, 4, 16, 16), [seeded_generator(11, k) for k in range(2)])
    with torch.no_grad():
        stock = trainer.pipe(
            prompts,
            latents=x_T,
            num_inference_steps=trainer.config.sample.num_steps,
            guidance_scale=trainer.config.sample.guidance_scale,
            eta=0.0,
            output_type="latent",
            height=32,
            width=32,
        ).images
    assert torch.isnan(ours.log_probs).all()
    torch.testing.assert_close(ours.latents[:, -1], stock, atol=1e-5, rtol=1e-5)


def test_lora_changes_and_base_does_not(trained):
    trainer, before, *_ = trained
    after = trainer.pipe.unet.state_dict()
    lora_keys = [k for k in before if "lora_" in k]
    assert lora_keys and any(not torch.equal(before[k], after[k]) for k in lora_keys if "lora_B" in k)
    assert all(torch.equal(before[k], after[k]) for k in before if "lora_" not in k)
    for module in (trainer.pipe.vae, trainer.pipe.text_encoder, trainer.pipe.text_encoder_2):
        assert not any(p.requires_grad for p in module.parameters())


def test_stock_sdxl_pipeline_reproduces_the_trained_model(trained, tiny_sdxl_dir):
    trainer, _, adapter_dir, out = trained
    in_memory = image(trainer.pipe)
    pipe = fresh(tiny_sdxl_dir)
    base = image(pipe)
    assert abs(in_memory - base).max() > 1e-3, "training changed the model's output"
    pipe.load_lora_weights(str(adapter_dir))
    assert abs(image(pipe) - in_memory).max() < 1e-5
    comfy = fresh(tiny_sdxl_dir)
    comfy.load_lora_weights(str(out), weight_name="tiny-xl-safety_comfyui.safetensors")
    assert abs(image(comfy) - in_memory).max() < 1e-5


def test_kohya_keys_cover_every_lora_module(trained):
    trainer, _, _, out = trained
    with safe_open(str(out / "tiny-xl-safety_comfyui.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    pattern = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in keys)
    modules = {n.rsplit(".lora_A", 1)[0] for n, _ in trainer.pipe.unet.named_parameters() if ".lora_A" in n}
    names = {k.split(".")[0] for k in keys}
    assert names == {"lora_unet_" + m.replace(".", "_") for m in modules} and len(keys) == 3 * len(modules)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_card_is_sdxl(trained):
    card = (trained[3] / "README.md").read_text()
    front = card.split("---")[1]
    assert "- stable-diffusion-xl" in front and "- sdxl" in front
    assert "from diffusers import StableDiffusionXLPipeline" in card


def test_an_sd_adapter_meets_an_sdxl_base_in_one_line(trained, tiny_sd_dir, tmp_path, capsys):
    """The wrong family: an adapter trained on SD 1.x-style tiny UNet loaded into the SDXL base."""
    from lora_grpo.cli import main
    from lora_grpo.config import LoraSettings, ModelConfig
    from lora_grpo.models import add_lora, load_pipeline, save_adapter

    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    add_lora(pipe.unet, LoraSettings(rank=2, alpha=2.0))
    save_adapter(pipe.unet, tmp_path / "sd-adapter", base_model=str(tiny_sd_dir))
    capsys.readouterr()
    args = ["sample", "--base", str(trained[0].base_ref), "--adapter", str(tmp_path / "sd-adapter")]
    code = main([*args, "--prompt", "a cat", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "trained for a custom UNet (custom:cross32" in err and "an SDXL UNet (sdxl:cross80" in err


def test_the_sdxl_recipe_runs_an_epoch_on_the_tiny_sdxl_model(tiny_sdxl_dir, tiny_clip_dir, tmp_path):
    """sdxl-nudity-compact's own settings (window, batch 1 with accumulation, both text encoders offloaded,
    decode one at a time) at tiny size: the recipe's shapes are one code path with SD's."""
    from lora_grpo.recipe_files import shipped_recipe_dir

    prompts = shipped_recipe_dir() / "prompts"
    config = load_config(
        find_recipe("sdxl-nudity-compact"),
        [
            f"model.base={tiny_sdxl_dir}",
            f"reward.clip.model={tiny_clip_dir}",
            "sample.resolution=32",
            "sample.num_steps=6",
            "sample.sde_steps=2",
            "sample.batches_per_epoch=2",
            "train.epochs=1",
            "train.mixed_precision=no",
            f"prompts.sets=[{{name: unsafe, safety: unsafe, path: {prompts / 'tiny_unsafe.txt'}}}, "
            f"{{name: safe, safety: safe, path: {prompts / 'safe_captions.txt'}}}]",
        ],
    )
    assert config.train.offload_text_encoder and config.train.batch_size == 1
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    for encoder in (trainer.pipe.text_encoder, trainer.pipe.text_encoder_2):
        assert {p.device.type for p in encoder.parameters()} == {"cpu"}
    row = trainer.run_epoch(0)
    assert row["samples"] == 16 and row["optimizer_steps"] == 1  # 16 minibatches of 1, accumulated 16
    # awm: one trained step of the window a trajectory, the conditional prediction alone (no CFG), and the
    # safe drift penalty's reference forward at each of them
    assert row["unet_passes_training"] == 16 * 1 * 1 and row["unet_passes_reference"] == 16


def test_the_sdxl_vae_is_kept_in_fp32_when_the_base_is_fp16(tiny_sdxl_dir, tiny_sd_dir):
    """SDXL in fp16: the VAE is upcast (it overflows in fp16) unless its config says it need not be (the
    fp16-fix VAE); SD 1.x's VAE stays fp16."""
    from diffusers import StableDiffusionPipeline

    from lora_grpo.policy import upcast_sdxl_vae

    xl = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_dir, torch_dtype=torch.float16, local_files_only=True
    )
    upcast_sdxl_vae(xl)
    assert xl.vae.dtype == torch.float32 and xl.unet.dtype == torch.float16
    fixed = StableDiffusionXLPipeline.from_pretrained(
        tiny_sdxl_dir, torch_dtype=torch.float16, local_files_only=True
    )
    fixed.vae.register_to_config(force_upcast=False)
    upcast_sdxl_vae(fixed)
    assert fixed.vae.dtype == torch.float16
    sd = StableDiffusionPipeline.from_pretrained(
        tiny_sd_dir, torch_dtype=torch.float16, local_files_only=True
    )
    upcast_sdxl_vae(sd)
    assert sd.vae.dtype == torch.float16
