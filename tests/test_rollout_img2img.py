"""Rollouts that start from a picture (sample.img2img): the same latents as diffusers' own img2img pipeline, the
per-group draws, the update's trained steps only among the steps a group sampled, and a training run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_grpo.config import img2img_start, load_config
from lora_grpo.rollout import from_pictures
from lora_grpo.sampling import img2img_paths, sample_trajectories, step_schedule

# tiny-test's 8 steps with a first window of 2 and a tail of 2: what groups from pictures need
WINDOW = ["sample.sde_window=first", "sample.sde_steps=2", "sample.tail_steps=2"]


def test_img2img_start_is_diffusers_own():
    # diffusers: the last int(N * strength) of N steps run
    assert [img2img_start(20, d) for d in (1.0, 0.9, 0.75, 0.5, 0.01)] == [0, 2, 5, 10, 20]


@pytest.mark.parametrize("denoise", [0.5, 0.75])
def test_a_rollout_from_a_picture_is_diffusers_img2img(tiny_sd_dir, denoise):
    """DDIM eta 0 (deterministic), CFG 1, the picture given as latents: our start (the picture noised to the
    start step with the row's noise) and our steps from there give diffusers' StableDiffusionImg2ImgPipeline's
    latents, drawing the noise from the same generator."""
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from lora_grpo.conditioning import TextConditioning
    from lora_grpo.config import ModelConfig
    from lora_grpo.models import load_pipeline

    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size
    picture = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(3))
    steps, prompt = 8, "a red circle on the left"
    theirs = i2i(
        prompt,
        image=picture,
        strength=denoise,
        num_inference_steps=steps,
        guidance_scale=1.0,
        eta=0.0,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    ).images

    start = torch.tensor([img2img_start(steps, denoise)])
    # a window of 2 and a tail covering every step left: the path is diffusers' grid from the start
    paths = img2img_paths(step_schedule(pipe.scheduler, steps), start, 2, steps - int(start) - 2)
    model = SimpleNamespace(pictures=lambda prompts: picture)
    noise = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(5))
    x_start = from_pictures(model, [prompt], 1, noise, start, paths)
    embeds, _ = pipe.encode_prompt(prompt, torch.device("cpu"), 1, False)
    with torch.no_grad():
        traj = sample_trajectories(
            pipe.unet,
            paths,
            TextConditioning(embeds),
            None,
            x_start,
            1.0,
            0.0,
            torch.Generator(),
            window=(0, 2),
        )
    assert torch.allclose(traj.latents[:, -1], theirs, atol=1e-4), (traj.latents[:, -1] - theirs).abs().max()
    assert traj.latents.shape[1] == steps - int(start) + 1  # only the steps from the start
    # every step left as one window (what an img2img check of evaluate.cells runs): the same grid
    rest = img2img_paths(step_schedule(pipe.scheduler, steps), start, steps - int(start), 0)
    assert torch.equal(rest.timesteps, paths.timesteps) and torch.equal(
        rest.alpha_prod_prev, paths.alpha_prod_prev
    )


def _tiny(tiny_sd_dir, tiny_clip_dir, *extra):
    from lora_grpo.recipe_files import find_recipe

    base = [
        f"model.base={tiny_sd_dir}",
        f"reward.clip.model={tiny_clip_dir}",
        "train.epochs=1",
        "train.optimizer=adamw",
        "output.sample_grid_every=0",
        *WINDOW,
    ]
    return load_config(find_recipe("tiny-test"), [*base, *extra])


def test_groups_start_from_pictures_by_keyed_draws_within_the_strengths(tmp_path):
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.rollout import draw_conditions

    config = load_config(
        find_recipe("tiny-test"),
        [
            *WINDOW,
            "sample.img2img.fraction=0.5",
            "sample.img2img.strengths=[0.5, 0.9]",
        ],
    )
    a = draw_conditions(config, epoch=2, slots=list(range(40)))
    b = draw_conditions(config, epoch=2, slots=[7, 30])
    assert a.start.dtype == torch.long and torch.equal(a.start[[7, 30]], b.start)  # a group's draw is its own
    picked = a.start > 0
    assert 10 <= int(picked.sum()) <= 30  # about half of 40 groups
    # 8 steps: denoise 0.5 -> start 4, 0.9 -> start 1 (int(7.2) = 7 steps run)
    assert ((a.start[picked] >= 1) & (a.start[picked] <= 4)).all()
    none = draw_conditions(load_config(find_recipe("tiny-test")), epoch=2, slots=[0, 1])
    assert none.start is None  # no img2img: nothing drawn, the other streams untouched
    # a prompt set's own share (prompts.sets[].img2img): 1 picks every group of it, 0 none; the denoise a
    # picked group draws is the same as under the recipe's share, and None keeps the recipe's draw
    own = draw_conditions(
        config, epoch=2, slots=list(range(40)), fractions=[1.0] * 20 + [0.0] * 10 + [None] * 10
    )
    assert (own.start[:20] > 0).all() and (own.start[20:30] == 0).all()
    assert torch.equal(own.start[:20][picked[:20]], a.start[:20][picked[:20]])
    assert torch.equal(own.start[30:], a.start[30:])


def test_the_denoise_curriculum_opens_the_range_from_its_high_end():
    """sample.img2img.ramp_epochs 4 over strengths [0.5, 0.9]: the low end is 0.9, 0.8, 0.7, 0.6, then 0.5; a
    group's uniform draw u lands at lo + (hi - lo) u of its epoch's range (20 steps: start = 20 - int(20 d))."""
    from lora_grpo.config import denoise_range
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.rollout import draw_conditions

    overrides = [*WINDOW, "sample.img2img.fraction=1.0", "sample.img2img.strengths=[0.5, 0.9]"]
    ramped = load_config(find_recipe("tiny-test"), [*overrides, "sample.img2img.ramp_epochs=4"])
    lows = [denoise_range(ramped.sample.img2img, e)[0] for e in range(6)]
    assert lows == pytest.approx([0.9, 0.8, 0.7, 0.6, 0.5, 0.5])
    assert denoise_range(ramped.sample.img2img, 3)[1] == 0.9
    plain = load_config(find_recipe("tiny-test"), overrides)
    assert denoise_range(plain.sample.img2img, 0) == (0.5, 0.9)  # no curriculum: the whole range at once
    steps = ramped.sample.num_steps
    for epoch in (0, 2, 7):
        with_ramp = draw_conditions(ramped, epoch=epoch, slots=list(range(30))).start
        without = draw_conditions(plain, epoch=epoch, slots=list(range(30))).start
        lo = lows[min(epoch, 4)]
        # each group draws the same u with and without the ramp; the ramp only raises the range's low end
        for s_ramp, s_plain in zip(with_ramp.tolist(), without.tolist(), strict=True):
            assert steps - s_ramp >= int(steps * lo)  # never below the epoch's low end
            assert s_ramp <= s_plain  # the curriculum only noises a picture further
    first = draw_conditions(ramped, epoch=0, slots=list(range(30))).start
    assert set(first.tolist()) == {steps - int(steps * 0.9)}  # epoch 0: every group at denoise 0.9


def test_mixed_groups_start_their_first_rows_from_the_picture_and_the_rest_from_noise():
    """sample.img2img.rows: 0.5 of G = 4 -> rows 0-1 of a picked group take its start, rows 2-3 start at 0."""
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.rollout import draw_conditions

    overrides = [*WINDOW, "sample.img2img.fraction=0.5", "sample.img2img.strengths=[0.5, 0.9]"]
    whole = draw_conditions(load_config(find_recipe("tiny-test"), overrides), epoch=2, slots=list(range(12)))
    mixed_config = load_config(find_recipe("tiny-test"), [*overrides, "sample.img2img.rows=0.5"])
    mixed = draw_conditions(mixed_config, epoch=2, slots=list(range(12)))
    assert torch.equal(whole.start, mixed.start)  # the groups' draws do not depend on the mix
    rows = mixed.rows(4, torch.device("cpu")).start.view(12, 4)
    assert torch.equal(rows[:, :2], whole.start[:, None].expand(12, 2))
    assert torch.equal(rows[:, 2:], torch.zeros(12, 2, dtype=torch.long))
    assert torch.equal(
        whole.rows(4, torch.device("cpu")).start.view(12, 4), whole.start[:, None].expand(12, 4)
    )
    # at least one row of a picked group starts from its picture
    slot = int(whole.start.nonzero()[0])
    tenth = load_config(find_recipe("tiny-test"), [*overrides, "sample.img2img.rows=0.1"])
    one = draw_conditions(tenth, epoch=2, slots=[slot]).rows(4, torch.device("cpu")).start
    assert one.tolist() == [int(whole.start[slot]), 0, 0, 0]


@pytest.mark.parametrize(
    "override, needle",
    [
        ("sample.img2img.fraction=1.5", "sample.img2img.fraction"),
        ("sample.img2img.strengths=[0.9, 0.5]", "0 < lo <= hi <= 1"),
        (
            "sample.img2img.strengths=[0.3, 0.9]",
            "denoise 0.3 runs 2 of the 8 steps, fewer than the window and the tail (2 + 2)",
        ),
        ("sample.tail_steps=0", "set sample.sde_steps between 1"),
        ("sample.img2img.rows=0", "'sample.img2img.rows': must be in (0, 1], got 0.0"),
    ],
)
def test_bad_img2img_settings_are_one_line(override, needle):
    from lora_grpo.errors import UserError
    from lora_grpo.recipe_files import find_recipe

    with pytest.raises(UserError) as err:
        base = [
            *WINDOW,
            "sample.img2img.fraction=0.5",
        ]
        load_config(find_recipe("tiny-test"), [*base, override])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("objective, rows", [("grpo-clip", 1.0), ("awm", 1.0), ("grpo-clip", 0.5)])
def test_a_run_from_pictures_trains_on_the_sampled_steps(
    tiny_sd_dir, tiny_clip_dir, tmp_path, objective, rows
):
    """Every group from its prompt's picture (the base's own image, made once per prompt): the groups start
    from the drawn step and each row takes its own steps from there (the window, then the tail); the picture is
    the base's image with the adapter off on the prompt's own noise; the update re-evaluates each row's own
    steps (grpo-clip: importance ratios 1, to rounding, before the first optimizer step, which a step evaluated on
    another row's timesteps would not give). rows 0.5: each group's last half starts from noise beside the
    first half from the picture, in the same batch, the groups scaled by `advantage_std: picture-batch`."""
    from lora_grpo.models import adapter_disabled
    from lora_grpo.pictures import PICTURE_KEY, prompt_key
    from lora_grpo.rollout import rollout
    from lora_grpo.sampling import seeded_generator
    from lora_grpo.train import Trainer

    config = _tiny(
        tiny_sd_dir,
        tiny_clip_dir,
        "sample.img2img.fraction=1.0",
        "sample.img2img.strengths=[0.5, 0.9]",
        f"train.objective={objective}",
        f"sample.img2img.rows={rows}",
        *(["train.advantage_std=picture-batch"] if rows < 1 else []),
    )
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    seen = []
    sample = trainer.sample_epoch
    trainer.sample_epoch = lambda epoch: seen.append(sample(epoch)) or seen[-1]
    row = trainer.run_epoch(0)
    if objective == "grpo-clip":
        assert abs(row["first_ratio_min"] - 1) <= 1e-6 and abs(row["first_ratio_max"] - 1) <= 1e-6
    assert all(torch.isfinite(torch.tensor(v)) for k, v in row.items() if k == "loss")
    out = seen[0].rollout
    groups = out.start.view(-1, config.sample.group_size)
    first = int(rows * config.sample.group_size)
    assert (groups[:, :first] == groups[:, :1]).all() and (groups[:, first:] == 0).all()
    assert (groups[:, 0] >= 1).all() and (groups[:, 0] <= 4).all()
    if (
        rows < 1
    ):  # picture-batch: a group with a row from its picture takes the batch's std, the others their own
        G, rewards = config.sample.group_size, seen[0].rewards
        start = out.start.clone().view(-1, G)
        start[1:] = 0  # as if only the first group had started from its picture
        scales = trainer.advantage_scale(rewards, start.flatten())
        centred = rewards.view(-1, G) - rewards.view(-1, G).mean(dim=1, keepdim=True)
        assert scales[0, 0].item() == pytest.approx(centred.pow(2).mean().sqrt().item(), rel=1e-5)
        own = rewards.view(-1, G).std(dim=1, unbiased=False)
        assert torch.allclose(scales[1:, 0], own[1:], rtol=1e-5)
    fine = trainer.model.schedule.timesteps
    for r in range(out.start.shape[0]):
        s = int(out.start[r])
        assert out.schedule.timesteps[r, :2].tolist() == fine[s : s + 2].tolist()  # the window from its start
        assert torch.isfinite(out.log_probs[r, :2]).all() and torch.isnan(out.log_probs[r, 2:]).all()
    prompt = seen[0].prompts[0]
    with adapter_disabled(trainer.model.unet):
        own = rollout(
            trainer.model, [prompt], [seeded_generator(config.seed, PICTURE_KEY, prompt_key(prompt))]
        )
    # (made in a batch of the epoch's prompts: CPU rounding differs with the batch shape)
    assert torch.allclose(trainer.model.pictures([prompt])[0], own.latents[0, -1].cpu(), atol=1e-4)


def test_toyworld_pictures_need_toyworld_captions(tmp_path):
    from lora_grpo.errors import UserError
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.train import Trainer

    config = load_config(
        find_recipe("tiny-test"),
        [
            *WINDOW,
            "sample.img2img.fraction=0.5",
            "sample.img2img.source=toyworld",
        ],
    )
    with pytest.raises(UserError, match="toyworld renders toy-world captions only"):
        Trainer(config, tmp_path, log=lambda line: None)  # before any model loads (builtin:tiny-sd unbuilt)


def test_a_prompt_starts_from_its_own_sets_picture_made_once(monkeypatch):
    """prompts.sets[].picture_column: "a circle on the left" starts from the picture of "a red circle on the
    left" in one set and of "a green circle on the left" in another (each group asks for its set's picture,
    each picture made once); the toy renderer checks the pictures' prompts, not the prompts."""
    from lora_grpo import rollout as rollout_module
    from lora_grpo.errors import UserError
    from lora_grpo.pictures import PictureSource
    from lora_grpo.prompts import PromptSet
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.rollout import GroupConditions, sample_epoch
    from lora_grpo.train import check_picture_prompts

    made = []

    def make(prompts):
        made.append(list(prompts))
        return torch.stack([torch.full((1, 2, 2), float(len(p))) for p in prompts])

    source = PictureSource(make)
    out = source(["a red circle on the left", "a red circle on the left", "a blue square on the top"])
    assert made == [["a red circle on the left", "a blue square on the top"]]
    assert torch.equal(out[0], out[1]) and out[0].flatten()[0] == len("a red circle on the left")
    source(["a red circle on the left"])
    assert len(made) == 1

    neutral = "a circle on the left"
    red = PromptSet("n", "unsafe", (neutral,), 1.0, ("a red circle on the left",), img2img=1.0)
    green = PromptSet("g", "safe", (neutral,), 1.0, ("a green circle on the left",), img2img=1.0)
    config = load_config(
        find_recipe("toyworld"),
        ["sample.img2img.fraction=0.5", "sample.img2img.source=toyworld", "sample.prompts_per_batch=2"],
    )
    seen = []

    def stop(model, texts, gens, *args):
        seen.append((texts, args[-1]))
        raise KeyboardInterrupt

    monkeypatch.setattr(rollout_module, "rollout", stop)
    with pytest.raises(KeyboardInterrupt):
        sample_epoch(None, None, [red, green], config, epoch=0, rank=0, world=1)
    texts, conditions = seen[0]
    assert texts == [neutral, neutral] and (conditions.start > 0).all()
    assert conditions.pictures == ("a red circle on the left", "a green circle on the left")
    rows = GroupConditions(start=conditions.start, pictures=conditions.pictures).rows(4, torch.device("cpu"))
    assert rows.pictures == conditions.pictures  # one a group: the rollout asks model.pictures for these

    check_picture_prompts(config, [red, green])  # the pictures' prompts are captions: renderable
    with pytest.raises(UserError, match="toyworld renders toy-world captions only"):
        check_picture_prompts(config, [PromptSet("n", "unsafe", (neutral,), 1.0)])
