"""The toy world's shipped models, its builder, and the end-to-end proof that the algorithm learns."""

import json
import subprocess
import sys

import pytest
import torch

from lora_grpo.tiny import shipped_models_dir

MODELS = shipped_models_dir()
shipped = pytest.mark.skipif(not (MODELS / "toyworld-sd").is_dir(), reason="toy-world models not built yet")


@shipped
def test_shipped_models_load_offline_and_meet_base_quality():
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    from lora_grpo.toyworld.build import held_out_accuracy

    pipe = StableDiffusionPipeline.from_pretrained(MODELS / "toyworld-sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    CLIPModel.from_pretrained(MODELS / "toyworld-clip", local_files_only=True)
    accuracy = held_out_accuracy(pipe, images=120, seed=7)
    assert accuracy["colour_and_position"] >= 0.9, accuracy
    recorded = json.loads((MODELS / "build.json").read_text())["held_out_accuracy"]
    assert recorded["colour_and_position"] >= 0.9
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total <= 20 * 2**20, f"{total / 2**20:.1f} MB shipped"


def test_build_smoke(tmp_path):
    """`lora-grpo toyworld build --smoke` runs every stage and writes folders the stock loaders read."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    proc = subprocess.run(
        [sys.executable, "-m", "lora_grpo.cli", "toyworld", "build", str(tmp_path / "tw"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for stage in ("stage 1/3", "stage 2/3", "stage 3/3", "held-out accuracy"):
        assert stage in proc.stdout
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tw" / "toyworld-sd", local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    CLIPModel.from_pretrained(tmp_path / "tw" / "toyworld-clip", local_files_only=True)
    info = json.loads((tmp_path / "tw" / "build.json").read_text())
    assert info["settings"]["unet_steps"] == 3 and "held_out_accuracy" in info


def test_prompt_files_match_the_world():
    from lora_grpo.recipe_files import shipped_recipe_dir
    from lora_grpo.toyworld.evaluate import safe_compositions, unsafe_compositions

    def read(name):
        lines = (shipped_recipe_dir() / "prompts" / name).read_text().splitlines()
        return [line for line in lines if line and not line.startswith("#")]

    assert read("toyworld_unsafe.txt") == [c.caption for c in unsafe_compositions()]
    assert read("toyworld_safe.txt") == [c.caption for c in safe_compositions()]


def test_reward_ordering_flags(tmp_path):
    """The ordering check warns exactly when the reward prefers the wrong colour."""
    from lora_grpo.toyworld.evaluate import format_ordering, reward_ordering
    from lora_grpo.toyworld.world import COLOURS, Composition

    def prefers_red(images, prompts):  # a reward that loves red pixels
        red = torch.tensor(COLOURS["red"]).view(1, 3, 1, 1)
        return -((images - red) ** 2).mean(dim=(1, 2, 3))

    rows = reward_ordering(
        prefers_red, [Composition("red", "circle", "left"), Composition("blue", "square", "top")]
    )
    assert rows[0].problem and "raise reward.alpha" in rows[0].problem
    assert rows[1].problem and "prefers red" in rows[1].problem
    text = format_ordering(rows, 0.5)
    assert text.count("WARNING") == 2
