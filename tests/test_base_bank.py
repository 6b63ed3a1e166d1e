"""Several bases in one run (`model.bases`): each epoch samples and trains one LoRA on its base, the others
wait on the CPU, and the first base is back for evaluation and checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lora_grpo.config import load_config
from lora_grpo.errors import UserError
from lora_grpo.recipe_files import find_recipe


@pytest.fixture(scope="module")
def fine_tuned_dir(tiny_sd_dir, tmp_path_factory):
    """A 'fine-tune' of the tiny base: every UNet weight moved a little, everything else the same."""
    from lora_grpo.config import ModelConfig
    from lora_grpo.models import load_pipeline

    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    out = tmp_path_factory.mktemp("fine-tune") / "tiny-ft"
    pipe.save_pretrained(out)
    return out


def _overrides(tiny_sd_dir, tiny_clip_dir, *extra):
    base = [f"model.base={tiny_sd_dir}", f"reward.clip.model={tiny_clip_dir}", "train.optimizer=adamw"]
    return [*base, "output.sample_grid_every=0", "evaluate.every=0", *extra]


def _probe(unet, encode):
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return unet(x, torch.tensor([500, 100]), **encode(["a cat", "a dog"]).unet_kwargs()).sample


@pytest.mark.slow
def test_each_epoch_trains_on_its_base_and_the_first_comes_back(
    tiny_sd_dir, tiny_clip_dir, fine_tuned_dir, tmp_path
):
    from lora_grpo.config import ModelConfig
    from lora_grpo.models import load_pipeline, lora_state_dict
    from lora_grpo.train import Trainer

    config = load_config(
        find_recipe("tiny-test"),
        _overrides(tiny_sd_dir, tiny_clip_dir, f"model.bases=[{fine_tuned_dir}]", "train.epochs=2"),
    )
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    unet, encode = trainer.model.unet, trainer.model.encode
    with torch.no_grad():
        for p in trainer.learner.params:  # a LoRA far from zero, so base and LoRA both show in the output
            p.add_(0.2 * torch.randn_like(p))
    first = _probe(unet, encode)

    # base 1 in the training UNet == the fine-tune loaded from disk with the same LoRA weights
    trainer.bases.use(1)
    other = load_pipeline(ModelConfig(base=str(fine_tuned_dir))).unet
    from lora_grpo.config import LoraSettings
    from lora_grpo.models import add_lora

    add_lora(other, LoraSettings(rank=config.lora.rank, alpha=config.lora.alpha))
    from peft.utils import set_peft_model_state_dict

    set_peft_model_state_dict(other, {k: v for k, v in unet.state_dict().items() if "lora_" in k})
    assert torch.allclose(_probe(unet, encode), _probe(other, encode), atol=1e-6)
    assert (_probe(unet, encode) - first).abs().max() > 1e-3
    trainer.bases.use(0)
    assert torch.equal(_probe(unet, encode), first)  # exactly the first base again

    # epoch e samples on base e mod 2; after each epoch the first base is in place
    probe_weight = next(n for n, _ in unet.named_parameters() if "lora_" not in n and n.endswith("weight"))
    seen = []
    sample = trainer.sample_epoch
    trainer.sample_epoch = lambda epoch: (
        seen.append(unet.get_parameter(probe_weight).clone()),
        sample(epoch),
    )[1]
    lora_before = {k: v.clone() for k, v in lora_state_dict(unet).items()}
    for epoch in (0, 1):
        trainer.run_epoch(epoch)
        assert torch.equal(
            unet.get_parameter(probe_weight),
            trainer.bases.weights[0][probe_weight.replace(".base_layer", "")],
        )
    plain = probe_weight.replace(".base_layer", "")
    assert torch.equal(seen[0], trainer.bases.weights[0][plain])
    assert torch.equal(seen[1], trainer.bases.weights[1][plain])
    assert any(
        not torch.equal(a, b)
        for a, b in zip(lora_before.values(), lora_state_dict(unet).values(), strict=True)
    )


def test_bases_of_another_architecture_or_listed_twice_are_one_line(
    tiny_sd_dir, tiny_sdxl_dir, tiny_clip_dir, tmp_path
):
    from lora_grpo.train import Trainer

    config = load_config(
        find_recipe("tiny-test"), _overrides(tiny_sd_dir, tiny_clip_dir, f"model.bases=[{tiny_sdxl_dir}]")
    )
    with pytest.raises(UserError, match="is not the architecture of model.base"):
        Trainer(config, tmp_path, log=lambda line: None)
    with pytest.raises(UserError, match="lists a base twice"):
        load_config(
            find_recipe("tiny-test"), _overrides(tiny_sd_dir, tiny_clip_dir, f"model.bases=[{tiny_sd_dir}]")
        )


@pytest.mark.slow
def test_evaluation_cells_sample_at_their_cfg_strength_and_base(
    tiny_sd_dir, tiny_clip_dir, fine_tuned_dir, tmp_path
):
    """evaluate.cells: eval@<cell>/<set>/... is the reward of the model at the cell's CFG, LoRA strength, base,
    eta, step count or denoise (img2img from the prompts' pictures, every step left after diffusers' start), on
    the same prompts and seeds as eval/<set>/... (at the cell's own images a prompt when it names them); the
    first base is back afterwards."""
    from dataclasses import replace
    from functools import partial

    from lora_grpo.evaluation.periodic import PeriodicEval, eval_prompts
    from lora_grpo.rollout import sample_scored
    from lora_grpo.sampling import img2img_paths
    from lora_grpo.train import Trainer

    cells = "[{name: hi, guidance: 3.0, strength: 0.5, sets: [tiny-unsafe], images_per_prompt: 3}, {name: ft, base: 1}"
    cells += ", {name: pic, denoise: 0.75, sets: [tiny-unsafe]}, {name: det, eta: 0.0, sets: [tiny-unsafe]}"
    cells += ", {name: four, steps: 4, eta: 0.0, sets: [tiny-unsafe]}]"
    # groups from pictures (the base's own) give the img2img cell its pictures
    img2img = ["sample.sde_steps=2", "sample.sde_window=first", "sample.tail_steps=2"]
    img2img += ["sample.img2img.fraction=0.5", "sample.img2img.strengths=[0.5, 0.9]"]
    config = load_config(
        find_recipe("tiny-test"),
        _overrides(
            tiny_sd_dir, tiny_clip_dir, f"model.bases=[{fine_tuned_dir}]", f"evaluate.cells={cells}", *img2img
        ),
    )
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    with torch.no_grad():
        for p in trainer.learner.params:
            p.add_(0.2 * torch.randn_like(p))
    row = PeriodicEval(config.evaluate, 3).evaluate(trainer.context)
    assert "eval@hi/tiny-unsafe/steering_reward" in row and "eval@hi/tiny-safe/steering_reward" not in row
    assert {"eval@ft/tiny-unsafe/steering_reward", "eval@ft/tiny-safe/steering_reward"} <= set(row)
    assert trainer.bases.current == 0

    model, reward = trainer.model, trainer.reward_fn
    unsafe = trainer.prompt_sets[0]
    prompts = eval_prompts(unsafe.prompts, config.evaluate.prompts_per_set, config.evaluate.images_per_prompt)
    seed = config.evaluate.seed
    thrice = eval_prompts(unsafe.prompts, config.evaluate.prompts_per_set, 3)
    assert config.evaluate.images_per_prompt != 3 and len(thrice) > len(prompts)
    _, hi = sample_scored(replace(model, guidance=3.0), reward, thrice, seed, lora_scale=0.5)
    assert row["eval@hi/tiny-unsafe/steering_reward"] == pytest.approx(hi.mean().item(), abs=1e-6)
    trainer.bases.use(1)
    _, ft = sample_scored(model, reward, prompts, seed)
    trainer.bases.use(0)
    assert row["eval@ft/tiny-unsafe/steering_reward"] == pytest.approx(ft.mean().item(), abs=1e-6)
    _, plain = sample_scored(model, reward, prompts, seed)
    assert row["eval/tiny-unsafe/steering_reward"] == pytest.approx(plain.mean().item(), abs=1e-6)
    # denoise 0.75 of 8 steps: start at step 2 (diffusers' 8 - int(6)), then the 6 steps left
    from_picture = replace(model, paths=partial(img2img_paths, model.schedule, stop=6, tail_steps=0))
    _, pic = sample_scored(from_picture, reward, prompts, seed, start=2)
    assert row["eval@pic/tiny-unsafe/steering_reward"] == pytest.approx(pic.mean().item(), abs=1e-6)
    # eta 0: the deterministic sampler (no step noise) on the same initial noise
    _, det = sample_scored(replace(model, eta=0.0), reward, prompts, seed)
    assert row["eval@det/tiny-unsafe/steering_reward"] == pytest.approx(det.mean().item(), abs=1e-6)
    # steps 4: SD's DDIM at 4 steps (1000 training steps, "leading" spacing, offset 1: 250 apart, by hand); a
    # scheduler of its own, so the recipe's schedule is unchanged
    from diffusers import DDIMScheduler

    from lora_grpo.sampling import step_schedule

    four_steps = step_schedule(DDIMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler"), 4)
    assert four_steps.timesteps.tolist() == [751, 501, 251, 1]
    assert model.schedule.num_steps == config.sample.num_steps != 4
    _, four = sample_scored(replace(model, eta=0.0, schedule=four_steps), reward, prompts, seed)
    assert row["eval@four/tiny-unsafe/steering_reward"] == pytest.approx(four.mean().item(), abs=1e-6)
    means = (hi.mean().item(), ft.mean().item(), plain.mean().item(), pic.mean().item(), det.mean().item())
    means += (four.mean().item(),)
    assert len({round(v, 6) for v in means}) == 6


def test_evaluation_sets_are_sampled_by_evaluation_only(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """evaluate.sets: a held-out set gets eval/<set>/... (and its cells) from its own prompts at the seed after
    the training sets', the training sets' checks keep their prompts and seeds, and training never draws it (the
    trainer's sets are the recipe's prompts.sets)."""
    from lora_grpo.evaluation.periodic import PeriodicEval, eval_prompts
    from lora_grpo.rollout import sample_scored
    from lora_grpo.train import Trainer

    held = tmp_path / "held.txt"
    held.write_text("a purple elephant\na tiny robot\n", encoding="utf-8")
    sets = f"[{{name: held, safety: unsafe, path: {held}}}]"
    cells = "[{name: hi, guidance: 3.0, sets: [held]}]"
    config = load_config(
        find_recipe("tiny-test"),
        _overrides(tiny_sd_dir, tiny_clip_dir, f"evaluate.sets={sets}", f"evaluate.cells={cells}"),
    )
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    assert [s.name for s in trainer.prompt_sets] == ["tiny-unsafe", "tiny-safe"]
    row = PeriodicEval(config.evaluate, 3).evaluate(trainer.context)
    assert {"eval/held/steering_reward", "eval@hi/held/steering_reward"} <= set(row)
    assert not any(k.startswith("eval@hi/tiny") for k in row)
    model, reward, ev = trainer.model, trainer.reward_fn, config.evaluate
    prompts = eval_prompts(("a purple elephant", "a tiny robot"), ev.prompts_per_set, ev.images_per_prompt)
    _, rewards = sample_scored(model, reward, prompts, ev.seed + 1000 * 2)
    assert row["eval/held/steering_reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    safe = trainer.prompt_sets[1]
    prompts = eval_prompts(safe.prompts, ev.prompts_per_set, ev.images_per_prompt)
    _, rewards = sample_scored(model, reward, prompts, ev.seed + 1000 * 1)
    assert row["eval/tiny-safe/steering_reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)


def test_a_training_set_with_checked_false_is_sampled_only_by_the_cells_naming_it(
    tiny_sd_dir, tiny_clip_dir, tmp_path
):
    """prompts.sets[].checked false: the set trains, the default check and the cells that name no sets skip
    it (and its pool leaves it out), a cell that names it samples it at the seed of its place in the sets;
    a stop condition on it at the default check is refused."""
    from lora_grpo.evaluation.periodic import PeriodicEval, eval_prompts
    from lora_grpo.recipe_files import shipped_recipe_dir
    from lora_grpo.rollout import sample_scored
    from lora_grpo.train import Trainer

    prompts = shipped_recipe_dir() / "prompts"
    sets = (
        f"prompts.sets=[{{name: tiny-unsafe, safety: unsafe, path: {prompts / 'tiny_unsafe.txt'}}}, "
        f"{{name: tiny-safe, safety: safe, path: {prompts / 'tiny_safe.txt'}, checked: false}}]"
    )
    cells = "evaluate.cells=[{name: hi, guidance: 3.0}, {name: named, guidance: 3.0, sets: [tiny-safe]}]"
    config = load_config(find_recipe("tiny-test"), _overrides(tiny_sd_dir, tiny_clip_dir, sets, cells))
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    assert [s.checked for s in trainer.prompt_sets] == [True, False]  # trained on
    row = PeriodicEval(config.evaluate, 3).evaluate(trainer.context)
    assert "eval/tiny-unsafe/steering_reward" in row and "eval@hi/tiny-unsafe/steering_reward" in row
    assert not any("tiny-safe" in k or "all-safe" in k for k in row if not k.startswith("eval@named/"))
    ev, safe = config.evaluate, trainer.prompt_sets[1]
    at_cfg3 = dataclasses.replace(trainer.model, guidance=3.0)
    chosen = eval_prompts(safe.prompts, ev.prompts_per_set, ev.images_per_prompt)
    _, rewards = sample_scored(at_cfg3, trainer.reward_fn, chosen, ev.seed + 1000 * 1)
    assert row["eval@named/tiny-safe/steering_reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)
    with pytest.raises(UserError, match="names no prompt set 'tiny-safe'"):
        stop = "evaluate.stop_when=['eval/tiny-safe/clip_score >= 0.1']"
        load_config(find_recipe("tiny-test"), [sets, "evaluate.every=1", stop])


@pytest.mark.parametrize(
    "sets, needle",
    [
        ("[{name: tiny-safe, path: x.txt}]", "names a prompt set twice"),
        ("[{name: a, path: x.txt}, {name: a, path: y.txt}]", "names a prompt set twice"),
        ("[{name: a}]", "give exactly one of 'path'"),
    ],
)
def test_bad_evaluation_sets_are_one_line(sets, needle):
    with pytest.raises(UserError) as err:
        load_config(find_recipe("tiny-test"), [f"evaluate.sets={sets}"])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "cells, needle",
    [
        ("[{name: a, base: 1}]", "base 1 but model.bases lists 0"),
        ("[{name: a, sets: [nope]}]", "no prompt set named ['nope']"),
        ("[{name: a}, {name: a}]", "names a cell twice"),
        ("[{name: 'a b'}]", "is not a plain name"),
        ("[{name: a, guidance: 0.5}]", "evaluate.cells.guidance"),
        ("[{name: a, denoise: 0.75}]", "img2img checks start from sample.img2img's pictures"),
        ("[{name: a, denoise: 1.5}]", "evaluate.cells.denoise"),
        ("[{name: a, eta: -0.5}]", "evaluate.cells.eta"),
        ("[{name: a, steps: 0}]", "evaluate.cells.steps"),
        ("[{name: a, images_per_prompt: 0}]", "evaluate.cells.images_per_prompt"),
    ],
)
def test_bad_evaluation_cells_are_one_line(cells, needle):
    with pytest.raises(UserError) as err:
        load_config(find_recipe("tiny-test"), [f"evaluate.cells={cells}"])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_the_robust_sd_recipe_runs_an_epoch_on_tiny_models(
    tiny_sd_dir, tiny_clip_dir, fine_tuned_dir, tmp_path
):
    """sd15-nudity-robust's own settings (CFG and strength ranges, evaluation cells) with a second base, at
    tiny size; its SDXL twin validates with the same keys."""
    from lora_grpo.recipe_files import shipped_recipe_dir
    from lora_grpo.train import Trainer

    prompts = shipped_recipe_dir() / "prompts"
    sets = (
        f"[{{name: nsfw-extended, safety: unsafe, path: {prompts / 'tiny_unsafe.txt'}}}, "
        f"{{name: coco-captions, safety: safe, path: {prompts / 'safe_captions.txt'}}}, "
        f"{{name: everyday, safety: safe, path: {prompts / 'tiny_safe.txt'}}}, "
        f"{{name: nudity-pictures, safety: unsafe, path: {prompts / 'nudity_pictures.csv'}, "
        "picture_column: unsafe, img2img: 1.0, checked: false}, "
        f"{{name: clothed-pictures, safety: safe, path: {prompts / 'nudity_pictures.csv'}, "
        "picture_column: safe, img2img: 1.0, checked: false}]"
    )
    config = load_config(
        find_recipe("sd15-nudity-robust"),
        [
            f"model.base={tiny_sd_dir}",
            f"model.bases=[{fine_tuned_dir}]",
            f"reward.clip.model={tiny_clip_dir}",
            "sample.resolution=32",
            "sample.num_steps=6",
            "sample.sde_steps=2",
            "sample.tail_steps=2",
            "sample.group_size=4",
            "train.epochs=1",
            "train.mixed_precision=no",
            "train.gradient_accumulation_steps=1",
            "evaluate.every=1",
            "evaluate.prompts_per_set=1",
            "evaluate.images_per_prompt=1",
            f"prompts.sets={sets}",
            "sample.img2img.fraction=1.0",  # every group from its picture (the recipe: a quarter), drawn on
            "sample.img2img.strengths=[0.9, 0.95]",  # the first base; 0.9 of 6 steps starts inside the window
        ],
    )
    assert config.lora.train_scale == [0.5, 1.0] and config.sample.guidance_scale == [4.0, 9.0]
    assert config.sample.eta == [0.0, 1.0]  # groups at eta 0 (deterministic) ride the img2img paths too
    assert load_config(find_recipe("sd15-nudity-robust")).sample.img2img.fraction == 0.25
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    from lora_grpo.evaluation.periodic import PeriodicEval

    trainer.callbacks = [PeriodicEval(config.evaluate, config.train.epochs)]
    (tmp_path / "run").mkdir(exist_ok=True)
    row = trainer.run_epoch(1)  # epoch 1 samples on the second base; the pictures are the first base's
    assert row["samples"] == 32 and len(trainer.bases) == 2
    make, prompt = trainer.model.pictures.make, "a photo"
    trainer.bases.use(1)
    on_second = make([prompt])
    assert trainer.bases.current == 1  # switched back after drawing
    trainer.bases.use(0)
    assert torch.allclose(on_second, make([prompt]), atol=1e-5)
    from lora_grpo.models import adapter_disabled
    from lora_grpo.pictures import PICTURE_KEY, prompt_key
    from lora_grpo.rollout import rollout
    from lora_grpo.sampling import seeded_generator

    trainer.bases.use(1)
    with adapter_disabled(trainer.model.unet):
        gen = [seeded_generator(config.seed, PICTURE_KEY, prompt_key(prompt))]
        second_own = rollout(trainer.model, [prompt], gen).latents[:, -1]
    assert (second_own.cpu() - on_second).abs().max() > 1e-3  # the second base would have drawn another
    assert {"eval@cfg9/nsfw-extended/steering_reward", "eval@half/nsfw-extended/steering_reward"} <= set(row)
    assert "eval@cfg9/everyday/steering_reward" not in row
    # the plain captions start from a nude picture in one set and a clothed one in the other; only the img2img
    # cell, which names the first, samples them
    nude, clothed = trainer.prompt_sets[3:]
    caption = nude.prompts[0]
    assert caption in clothed.prompts and nude.picture_of(caption) != clothed.picture_of(caption)
    assert "eval@i2i0.75/nudity-pictures/steering_reward" in row
    assert not [k for k in row if "pictures/" in k and not k.startswith("eval@i2i0.75/")], sorted(row)
    xl = load_config(find_recipe("sdxl-nudity-robust"))
    assert xl.sample.eta == [0.0, 1.0] and xl.train.advantage_std == "batch"
    assert xl.lora.train_scale == [0.5, 1.0]
    assert [c.name for c in xl.evaluate.cells] == ["cfg9", "half", "i2i0.75"]
    assert [s.name for s in xl.prompts.sets][-2:] == ["nudity-pictures", "clothed-pictures"]
