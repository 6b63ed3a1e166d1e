"""Single-file checkpoints: tiny SD 1.x and SDXL pipelines written as one original-layout .safetensors load
back through `model.base=FILE` offline with the same weights and outputs; the shipped configs describe the real
architectures; bad files stop with one line; runs, adapters and cards name the file by name and sha256."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from ldm_files import pipeline_to_ldm
from safetensors.torch import save_file

from lora_grpo.cli import main
from lora_grpo.config import ModelConfig
from lora_grpo.errors import UserError
from lora_grpo.models import load_pipeline
from lora_grpo.single_file import family_of

FAMILIES = {"sd1": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


@pytest.fixture(scope="module")
def files(tiny_sd_dir, tiny_sdxl_dir, tmp_path_factory):
    """family -> (diffusers folder, the same pipeline as one LDM-layout .safetensors file)."""
    out = tmp_path_factory.mktemp("single")
    result = {}
    for family, folder in (("sd1", tiny_sd_dir), ("sdxl", tiny_sdxl_dir)):
        pipe = FAMILIES[family].from_pretrained(folder, local_files_only=True)
        path = out / f"tiny-{family}.safetensors"
        save_file(pipeline_to_ldm(pipe), str(path))
        result[family] = (Path(folder), path)
    return result


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_the_ldm_writer_round_trips_through_diffusers_converters(files, family):
    """The test helper's layout is the original one: diffusers' own LDM -> diffusers converters give back
    every weight exactly."""
    folder, _ = files[family]
    pipe = FAMILIES[family].from_pretrained(folder, local_files_only=True)
    ldm = pipeline_to_ldm(pipe)
    unet = convert_ldm_unet_checkpoint(ldm, dict(pipe.unet.config))
    vae = convert_ldm_vae_checkpoint(ldm, dict(pipe.vae.config))
    for converted, module in ((unet, pipe.unet), (vae, pipe.vae)):
        ref = _state(module)
        assert set(converted) == set(ref)
        assert all(torch.equal(converted[k].reshape(ref[k].shape), ref[k]) for k in ref)
    if family == "sdxl":
        prefix = "conditioner.embedders.1.model."
        text = convert_open_clip_checkpoint(pipe.text_encoder_2, ldm, prefix=prefix)
        ref = _state(pipe.text_encoder_2)
        assert set(text) == set(ref) and all(torch.equal(text[k], ref[k]) for k in ref)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_single_file_loads_offline_with_the_folders_weights_and_output(files, family, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder, path = files[family]
    from_file = load_pipeline(ModelConfig(base=str(path), config=str(folder)))
    from_folder = load_pipeline(ModelConfig(base=str(folder)))
    assert type(from_file) is FAMILIES[family]
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in components:
        a, b = _state(getattr(from_file, name)), _state(getattr(from_folder, name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), name
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16), torch.tensor(500)
    cond = from_folder.encode_prompt(
        prompt=["a red circle", "a cat"],
        device="cpu",
        num_images_per_prompt=1,
        do_classifier_free_guidance=False,
    )
    kwargs = {"encoder_hidden_states": cond[0]}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": cond[2],
            "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2),
        }
    with torch.no_grad():
        out_file = from_file.unet(x, t, **kwargs).sample
        out_folder = from_folder.unet(x, t, **kwargs).sample
    assert (out_file - out_folder).abs().max() < 1e-5
    assert type(from_file.scheduler).__name__ == "DDIMScheduler"


def test_the_family_comes_from_the_keys():
    unet = ["model.diffusion_model.input_blocks.0.0.weight"]
    assert family_of([*unet, "cond_stage_model.transformer.text_model.final_layer_norm.weight"]) == "sd1"
    assert family_of([*unet, "cond_stage_model.model.ln_final.weight"]) == "sd2"
    sdxl = ["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"]
    assert family_of([*unet, *sdxl, "conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    assert family_of([*unet, "conditioner.embedders.0.model.ln_final.weight"]) == "sdxl-refiner"
    assert family_of(unet) is None


def test_the_shipped_configs_are_the_published_architectures(builtin_home):
    """Written offline from the configs lora_grpo ships: the UNets, VAE and text encoders have SD 1.5's and
    SDXL base 1.0's parameter counts, and the tokenizers give OpenAI CLIP's ids (checked against open_clip's
    own tokenizer); SDXL's second tokenizer pads with '!' as OpenCLIP does."""
    import open_clip
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from lora_grpo.families import config_folder

    counts = {
        ("sd1", "unet"): 859_520_964,
        ("sd1", "vae"): 83_653_863,
        ("sd1", "text_encoder"): 123_060_480,
        ("sdxl", "unet"): 2_567_463_684,
        ("sdxl", "vae"): 83_653_863,
        ("sdxl", "text_encoder"): 123_060_480,
        ("sdxl", "text_encoder_2"): 694_659_840,
    }
    classes = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    for (family, component), expected in counts.items():
        folder = config_folder(family)
        assert folder.is_relative_to(builtin_home)
        cls = classes[component]
        with init_empty_weights():
            if component in ("unet", "vae"):
                model = cls.from_config(cls.load_config(folder / component))
            else:
                model = cls(cls.config_class.from_pretrained(folder / component))
        assert sum(p.numel() for p in model.parameters()) == expected, (family, component)
    text = "a photo of an astronaut riding a horse"
    reference = open_clip.tokenizer.tokenize([text])[0].tolist()
    length = reference.index(49407) + 1
    for folder, pad in (("tokenizer", 49407), ("tokenizer_2", 0)):
        tok = CLIPTokenizer.from_pretrained(config_folder("sdxl") / folder)
        ids = tok(text, padding="max_length", max_length=77).input_ids
        assert ids[:length] == reference[:length] and ids[length:] == [pad] * (77 - length)


def test_a_fine_tune_with_other_shapes_asks_for_model_config(files):
    """The tiny file against the shipped SD 1.x configs: the shapes do not fit, one line names the fix."""
    _, path = files["sd1"]
    with pytest.raises(UserError, match="model.config=<its diffusers folder>") as err:
        load_pipeline(ModelConfig(base=str(path)))
    assert "\n" not in str(err.value)


def _truncated(path: Path, out: Path) -> Path:
    out.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return out


def _lora_file(out: Path) -> Path:
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(2, 2)}, str(out))
    return out


def _refiner(out: Path) -> Path:
    save_file(
        {
            "model.diffusion_model.out.2.weight": torch.zeros(1),
            "conditioner.embedders.0.model.ln_final.weight": torch.zeros(1),
        },
        str(out),
    )
    return out


def _unknown(out: Path) -> Path:
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(1)}, str(out))
    return out


@pytest.mark.parametrize(
    "make, name, needle",
    [
        (lambda p, t: _truncated(p, t / "cut.safetensors"), "cut.safetensors", "not a readable .safetensors"),
        (
            lambda p, t: _lora_file(t / "lora.safetensors"),
            "lora.safetensors",
            "holds no Stable Diffusion UNet",
        ),
        (lambda p, t: _refiner(t / "refiner.safetensors"), "refiner.safetensors", "is an SDXL refiner"),
        (lambda p, t: _unknown(t / "odd.safetensors"), "odd.safetensors", "unknown family"),
        (
            lambda p, t: (t / "model.ckpt").write_bytes(b"\x80\x04not read") and t / "model.ckpt",
            "model.ckpt",
            "never unpickles",
        ),
        (
            lambda p, t: (t / "text.safetensors").write_text("hello") and t / "text.safetensors",
            "text.safetensors",
            "not a readable",
        ),
    ],
)
def test_bad_checkpoint_files_are_one_line_before_anything_loads(files, tmp_path, capsys, make, name, needle):
    bad = make(files["sd1"][1], tmp_path)
    assert bad.name == name
    code = main(["train", "tiny-test", "--dry-run", "--out", str(tmp_path / "run"), f"model.base={bad}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert needle in lines[0] and name in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


def test_a_run_on_a_single_file_names_it_by_name_and_sha256(files, tiny_clip_dir, tmp_path, capsys):
    """Train one epoch from the file, export: run.json, the adapter, the ComfyUI file and the card carry the
    file's name and sha256 (hashed here independently) and never its folder."""
    from safetensors import safe_open

    folder, path = files["sd1"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    run = tmp_path / "run"
    args = ["train", "tiny-test", "--out", str(run), f"model.base={path}", f"model.config={folder}"]
    args += [f"reward.clip.model={tiny_clip_dir}", "train.epochs=1", "evaluate.every=0"]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((run / "run.json").read_text())
    assert record["base_model"] == path.name and record["base_sha256"] == digest
    with safe_open(str(run / "adapter" / "pytorch_lora_weights.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lora_grpo.base_model"] == path.name and meta["lora_grpo.base_sha256"] == digest
    out = tmp_path / "export"
    assert main(["export", str(run), "--out", str(out), "--name", "from-file", "--fused"]) == 0
    assert (out / "fused" / "model_index.json").is_file()  # the file + model.config loaded for fusing
    exported = yaml.safe_load((out / "recipe.yaml").read_text())["model"]
    assert exported == {**exported, "base": path.name, "config": folder.name}
    samples = tmp_path / "samples"
    args = ["sample", "--base", str(path), "--config", str(folder), "--adapter", str(run / "adapter")]
    assert main([*args, "--prompt", "a cat", "--steps", "2", "--out", str(samples)]) == 0
    assert len(list(samples.glob("*.png"))) == 1
    card = (out / "README.md").read_text()
    assert f"`{path.name}` (sha256 `{digest}`)" in card
    with safe_open(str(out / "from-file_comfyui.safetensors"), "pt") as f:
        assert f.metadata()["lora_grpo.base_sha256"] == digest
    for text in (card, (out / "recipe.yaml").read_text(), json.dumps(meta)):
        assert str(path.parent) not in text
