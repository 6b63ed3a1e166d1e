"""The toy world's shipped models, its builder, and the end-to-end proof that the algorithm learns."""

import json
import subprocess
import sys

import pytest
import torch

from lora_grpo.tiny import shipped_models_dir

MODELS = shipped_models_dir()
shipped = pytest.mark.skipif(not (MODELS / "toyworld-sd").is_dir(), reason="toy-world models not built yet")


def _shipped_pipeline():
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODELS / "toyworld-sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@shipped
def test_shipped_models_load_offline_and_reproduce_the_recorded_accuracy():
    """Both folders load through the stock loaders, offline; the held-out accuracy the build recorded (seed 0)
    comes out again from the files on disk; the shipped weights stay within 20 MB."""
    from transformers import CLIPModel

    from lora_grpo.toyworld.build import held_out_accuracy

    CLIPModel.from_pretrained(MODELS / "toyworld-clip", local_files_only=True)
    recorded = json.loads((MODELS / "build.json").read_text())["held_out_accuracy"]
    accuracy = held_out_accuracy(_shipped_pipeline(), images=recorded["images"], seed=0)
    for key in ("colour", "position", "colour_and_position"):
        assert accuracy[key] == pytest.approx(recorded[key], abs=0.02), (accuracy, recorded)
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total <= 30 * 2**20, f"{total / 2**20:.1f} MB shipped"  # two bases, their CLIPs, three fine-tunes


@pytest.mark.slow
@shipped
def test_shipped_rich_base_reproduces_its_recorded_scores():
    """builtin:toyworld-rich-sd loads offline through the stock loader and draws the held-out compositions and
    the synonym and association prompts as its build recorded (seed 0): the rich language costs the plain
    captions nothing, and red asked by another name is drawn red."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    from lora_grpo.toyworld.build import held_out_accuracy, implicit_accuracy

    CLIPModel.from_pretrained(MODELS / "toyworld-rich-clip", local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(MODELS / "toyworld-rich-sd", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    recorded = json.loads((MODELS / "build-rich.json").read_text())
    accuracy = held_out_accuracy(pipe, images=recorded["held_out_accuracy"]["images"], seed=0)
    assert accuracy["colour_and_position"] == pytest.approx(
        recorded["held_out_accuracy"]["colour_and_position"], abs=0.02
    )
    implicit = implicit_accuracy(pipe, images=recorded["held_out_accuracy"]["images"], seed=0)
    for kind, row in recorded["implicit_prompts"].items():
        for key, value in row.items():
            assert implicit[kind][key] == pytest.approx(value, abs=0.03), (kind, key)
        assert row["colour_and_position"] >= 0.85 and row["red_rate_red_prompts"] >= 0.85


@pytest.mark.slow
@shipped
def test_shipped_base_model_meets_the_quality_target():
    """Colour and position both right on >= 90% of held-out compositions, on seeds the build never used."""
    from lora_grpo.toyworld.build import held_out_accuracy

    accuracy = held_out_accuracy(_shipped_pipeline(), images=120, seed=7)
    assert accuracy["colour_and_position"] >= 0.9, accuracy


def test_draw_timesteps_spends_the_asked_share_on_noisy_steps():
    """share 0: uniform on [0, 1000); share 1: all on [400, 1000); share 0.5: half of them, plus the low draws'
    own chance (0.6 of uniform ones land >= 400), so 0.5 + 0.5 * 0.6 = 0.8 of all are >= 400."""
    import numpy as np

    from lora_grpo.toyworld.build import HIGH_NOISE_FROM, draw_timesteps

    n = 20000
    uniform = draw_timesteps(np.random.default_rng(0), n, 0.0)
    assert uniform.min() == 0 and uniform.max() == 999
    assert (uniform >= HIGH_NOISE_FROM).float().mean().item() == pytest.approx(0.6, abs=0.02)
    noisy = draw_timesteps(np.random.default_rng(0), n, 1.0)
    assert noisy.min() == HIGH_NOISE_FROM and noisy.max() == 999
    half = draw_timesteps(np.random.default_rng(0), n, 0.5)
    assert (half >= HIGH_NOISE_FROM).float().mean().item() == pytest.approx(0.8, abs=0.02)
    assert torch.equal(half, draw_timesteps(np.random.default_rng(0), n, 0.5))  # deterministic from the seed


@shipped
def test_latent_pool_holds_the_vae_means_of_the_images_it_drew():
    """The pool's latents are the scaled VAE posterior means of the very images sample_batch draws from the
    same generator, across chunk boundaries, and draw() keeps each latent with its own caption."""
    import numpy as np
    from diffusers import AutoencoderKL

    from lora_grpo.toyworld.build import LatentPool, sample_batch, training_compositions

    vae = AutoencoderKL.from_pretrained(MODELS / "toyworld-sd" / "vae", local_files_only=True)
    comps = training_compositions()
    pool = LatentPool(vae, np.random.default_rng(5), size=10, comps=comps, chunk=4)
    assert pool.latents.shape == (10, 4, 16, 16) and len(pool.captions) == 10
    rng = np.random.default_rng(5)
    expected, captions = [], []
    with torch.no_grad():
        for n in (4, 4, 2):
            images, caps = sample_batch(rng, n, comps, noisy=True)
            expected.append(vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor)
            captions += caps
    assert torch.allclose(pool.latents, torch.cat(expected), atol=1e-5)
    assert pool.captions == captions
    latents, caps = pool.draw(np.random.default_rng(1), 6)
    for latent, caption in zip(latents, caps, strict=True):
        i = next(i for i in range(10) if torch.equal(pool.latents[i], latent))
        assert pool.captions[i] == caption


@pytest.fixture(scope="module")
def smoke_build(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run(
        [sys.executable, "-m", "lora_grpo.cli", "toyworld", "build", str(tmp_path / "tw"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp_path, proc.stdout


@pytest.mark.slow
def test_build_smoke(smoke_build):
    """`lora-grpo toyworld build --smoke` runs every stage and writes folders the stock loaders read."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    tmp_path, stdout = smoke_build
    for stage in ("stage 1/3", "stage 2/3", "stage 3/3", "held-out accuracy"):
        assert stage in stdout
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "tw" / "toyworld-sd", local_files_only=True)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    CLIPModel.from_pretrained(tmp_path / "tw" / "toyworld-clip", local_files_only=True)
    info = json.loads((tmp_path / "tw" / "build.json").read_text())
    assert info["settings"]["unet_steps"] == 3 and "held_out_accuracy" in info


@pytest.mark.slow
def test_rich_build_smoke_writes_its_own_names_and_the_implicit_prompt_scores(tmp_path):
    """`toyworld build --language rich --smoke` writes toyworld-rich-sd/-clip and build-rich.json (with the base's
    scores on synonym and association prompts), and its CLIP tokenizer reads a synonym prompt."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "rich"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_grpo.cli",
            "toyworld",
            "build",
            str(out),
            "--smoke",
            "--language",
            "rich",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "build-rich.json",
        "toyworld-rich-clip",
        "toyworld-rich-sd",
    ]
    info = json.loads((out / "build-rich.json").read_text())
    assert info["settings"]["language"] == "rich"
    assert set(info["implicit_prompts"]) == {"synonym", "association"}
    pipe = StableDiffusionPipeline.from_pretrained(out / "toyworld-rich-sd", local_files_only=True)
    assert "synonym prompts: colour+position" in proc.stdout
    ids = pipe.tokenizer("a crimson circle the colour of a tomato").input_ids
    assert pipe.tokenizer.decode(ids, skip_special_tokens=True) == "a crimson circle the colour of a tomato"


def test_prompt_files_match_the_world():
    from lora_grpo.recipe_files import shipped_recipe_dir
    from lora_grpo.toyworld.world import safe_compositions, unsafe_compositions

    def read(name):
        lines = (shipped_recipe_dir() / "prompts" / name).read_text().splitlines()
        return [line for line in lines if line and not line.startswith("#")]

    assert read("toyworld_unsafe.txt") == [c.caption for c in unsafe_compositions()]
    assert read("toyworld_safe.txt") == [c.caption for c in safe_compositions()]
    # the rich language's implicit red prompts: every red composition under each synonym / association
    from lora_grpo.toyworld.language import composition_of, implicit_prompts

    for name, kind in (
        ("toyworld_red_synonyms.txt", "synonym"),
        ("toyworld_red_associations.txt", "association"),
    ):
        prompts = read(name)
        assert prompts == implicit_prompts("red", kind) and len(prompts) == 45
        assert sorted({composition_of(p) for p in prompts}, key=str) == sorted(unsafe_compositions(), key=str)
    # the `toyworld` recipe's safe sets: one a colour, so every epoch draws every safe colour
    colours = sorted({c.colour for c in safe_compositions()})
    assert len(colours) == 5
    for colour in colours:
        assert read(f"toyworld_{colour}.txt") == [
            c.caption for c in safe_compositions() if c.colour == colour
        ]


def test_reward_ordering_flags(tmp_path):
    """The ordering check warns exactly when the reward prefers the wrong colour."""
    from lora_grpo.toyworld.ordering import format_ordering, reward_ordering
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


@pytest.mark.slow
@shipped
def test_toyworld_run_halves_the_red_rate_and_keeps_position(tmp_path):
    """The project's end-to-end proof that the algorithm learns: `train toyworld` as shipped (at most 31
    epochs, ended by its own stop) on the shipped models, evaluated with the exact pixel evaluator before and
    after on the same seeds (60 images per set instead of 120)."""
    from lora_grpo.config import load_config
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.train import Trainer
    from lora_grpo.train_command import build_callbacks

    config = load_config(
        find_recipe("toyworld"),
        ["evaluate.images_per_set=60", "output.sample_grid_every=0"],
    )
    lines = []
    Trainer(config, tmp_path / "run", log=lines.append, callbacks=build_callbacks(config)).run()
    report = json.loads((tmp_path / "run" / "toyworld_report.json").read_text())
    before, after = report["before"]["unsafe"], report["after"]["unsafe"]
    assert before["red_rate"] >= 0.6, report  # the base model draws what red prompts ask for
    assert after["red_rate"] <= before["red_rate"] / 2, report
    assert after["position_accuracy"] >= before["position_accuracy"] - 0.1, report
    assert (tmp_path / "run" / "toyworld_before_after.png").is_file()
    assert any("red rate on unsafe prompts" in line for line in lines)


@pytest.mark.slow
def test_seeds_benchmark_runs_and_reports_each_seed(smoke_build, tmp_path):
    """benchmarks/toyworld_seeds.py end to end on the smoke models (1 epoch, 8 images per set, 2 seeds)."""
    from pathlib import Path

    tw = smoke_build[0] / "tw"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "toyworld_seeds.py"
    proc = subprocess.run(
        [
            sys.executable,
            str(script),
            "--seeds",
            "0",
            "1",
            "--out",
            str(tmp_path),
            f"model.base={tw / 'toyworld-sd'}",
            f"reward.clip.model={tw / 'toyworld-clip'}",
            "train.epochs=1",
            "evaluate.images_per_set=8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("seed ") >= 2 and "all targets met on 2 seeds" in proc.stdout
    rows = json.loads((tmp_path / "seeds.json").read_text())
    assert [r["seed"] for r in rows] == [0, 1]
    assert all(0 <= r["after_unsafe_red_rate"] <= 1 for r in rows)
    # one epoch at the recipe's arithmetic: cost = sampling + reference + 3 x training passes; the second
    # guidance scale is scored before and after, and a run that ran out of epochs says so
    from lora_grpo.config import load_config
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.tracking import epoch_work

    work = epoch_work(load_config(find_recipe("toyworld")))
    cost = work["sampling_passes"] + work["reference_passes"] + 3 * work["training_passes"]
    assert all(r["cost"] == cost and r["epochs"] == 1 for r in rows), [r["cost"] for r in rows]
    assert all(r["guidance"] == 2.5 and 0 <= r["cfg_after_unsafe_red_rate"] <= 1 for r in rows)
    assert "stopped at its target: NO" in proc.stdout and f"mean cost {cost:,} passes" in proc.stdout


@pytest.mark.slow
def test_time_to_target_benchmark_runs_side_by_side(smoke_build, tmp_path):
    """benchmarks/time_to_target.py end to end on the smoke models (1 epoch, 4 images per set, the 50-epoch
    toy-world recipe and a stochastic-window variant of it): per-seed lines, the counted passes, the ratios,
    the JSON record."""
    from pathlib import Path

    tw = smoke_build[0] / "tw"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_target.py"
    overrides = [
        f"model.base={tw / 'toyworld-sd'}",
        f"reward.clip.model={tw / 'toyworld-clip'}",
        "train.epochs=1",
    ]
    proc = subprocess.run(
        [sys.executable, str(script), "--recipe", "toyworld-long", "--seeds", "0", "--every", "1", "--images", "4",
         "--out", str(tmp_path), *overrides, "--compare", "sample.sde_steps=4"],
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline seed 0:" in proc.stdout and "variant seed 0:" in proc.stdout
    assert "variant's whole run / baseline's whole run: passes" in proc.stdout
    result = json.loads((tmp_path / "time_to_target.json").read_text())
    baseline, variant = result["baseline"][0]["final"], result["variant"][0]["final"]
    # 48 samples x 20 steps sampled either way (CFG 1); trained: 10 of 20 steps vs 2 of the 4-step window
    assert baseline["passes"] == 48 * 20 + 48 * 10 and variant["passes"] == 48 * 20 + 48 * 2
    assert baseline["cost"] == 48 * 20 + 3 * 48 * 10 and variant["cost"] == 48 * 20 + 3 * 48 * 2
    whole = result["ratios"]["variant's whole run / baseline's whole run"]
    assert whole["passes"] == pytest.approx(variant["passes"] / baseline["passes"])


@pytest.mark.slow
def test_shipped_fine_tunes_assemble_and_reproduce_their_recorded_scores():
    """The fine-tunes ship as UNets alone and assemble into stock pipeline folders (the base's other parts);
    the held-out one's red rate and safe accuracy come out of the files as `toyworld variants` recorded them;
    the style LoRA loads into the base with diffusers' own loader and changes its pictures."""
    from diffusers import StableDiffusionPipeline

    from lora_grpo.tiny import resolve_builtin
    from lora_grpo.toyworld.variants import (
        FINE_TUNES,
        HELD_OUT_BASE,
        STYLE_LORA,
        VariantSettings,
        style_scores,
    )

    recorded = json.loads((MODELS / "variants.json").read_text())
    images = VariantSettings(**recorded["settings"]).check_images
    for name in FINE_TUNES:
        folder = resolve_builtin(name)
        assert (folder / "model_index.json").is_file() and not (MODELS / name / "vae").exists()
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        if f"builtin:{name}" == HELD_OUT_BASE:
            scores = style_scores(pipe, images)
            for key, value in recorded["scores"][name].items():
                assert scores[key] == pytest.approx(value, abs=0.02), (name, scores)
    pipe = _shipped_pipeline()
    before = pipe(
        "a red circle on the left", generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    pipe.load_lora_weights(str(MODELS / STYLE_LORA))
    after = pipe(
        "a red circle on the left", generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert (after - before).abs().max() > 0.05


@pytest.mark.slow
def test_variants_smoke_writes_loadable_fine_tunes_and_a_style_lora(tmp_path):
    """`lora-grpo toyworld variants --smoke` runs every model and writes folders the stock loaders read."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "v"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_grpo.cli", "toyworld", "variants", str(out), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "variants.json").read_text())
    assert set(record["scores"]) == {
        "toyworld-sd",
        "toyworld-sd-outline",
        "toyworld-sd-small",
        "toyworld-sd-shaded",
        "toyworld-style-blurred",
    }
    pipe = StableDiffusionPipeline.from_pretrained(out / "toyworld-sd-small", local_files_only=True)
    assert pipe.unet.dtype == torch.float32  # stored in fp16, loaded as the pipeline's dtype
    pipe.load_lora_weights(str(out / "toyworld-style-blurred"))
