"""Training across deployment settings: CFG and LoRA strength drawn per prompt group (`sample.guidance_scale:
[lo, hi]`, `lora.train_scale: [lo, hi]`), sampled and trained at each group's own values."""

from __future__ import annotations

import pytest
import torch

from lora_grpo.config import load_config
from lora_grpo.errors import UserError
from lora_grpo.recipe_files import find_recipe


@pytest.fixture(scope="module")
def lora_unet(tiny_sd_dir):
    """The tiny UNet with a LoRA far from zero (so its strength matters) and its text conditioning."""
    from lora_grpo.config import LoraSettings, ModelConfig
    from lora_grpo.models import PromptEncoder, add_lora, load_pipeline

    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    for p in add_lora(pipe.unet, LoraSettings(rank=2, alpha=2.0)):
        with torch.no_grad():
            p.add_(0.5 * torch.randn_like(p))
    encode = PromptEncoder(pipe, torch.device("cpu"), torch.device("cpu"), torch.float32, size=(32, 32))
    return pipe.unet, encode


def test_each_row_runs_the_lora_at_its_own_strength(lora_unet):
    """Row r under row_scaled equals the whole UNet at diffusers' own LoRA scale s_r (the strength slider),
    with and without classifier-free guidance's doubled batch."""
    from lora_grpo.conditioning import concat as concat_conditioning
    from lora_grpo.lora_scale import row_scaled
    from lora_grpo.sampling import guided_model_output

    unet, encode = lora_unet
    scales = torch.tensor([0.25, 1.0, 1.5])
    x = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900, 500, 100])
    cond, uncond = encode(["a cat", "a dog", "a bird"]), encode.negative("").expand(3)
    both = concat_conditioning([uncond, cond])
    for guidance in (1.0, torch.tensor([1.0, 3.0, 7.5])):
        with row_scaled(unet, scales):
            ours = guided_model_output(unet, x, t, cond, uncond, guidance)
        for r, s in enumerate(scales.tolist()):
            scale = {"cross_attention_kwargs": {"scale": s}}
            with torch.no_grad():  # the same batch at diffusers' scale s (batch shape changes CPU rounding)
                if isinstance(guidance, float):
                    one = unet(x, t, **cond.unet_kwargs(), **scale).sample[r]
                else:
                    free, full = unet(
                        torch.cat([x, x]), torch.cat([t, t]), **both.unet_kwargs(), **scale
                    ).sample.chunk(2)
                    one = free[r] + guidance[r] * (full[r] - free[r])
            assert torch.allclose(ours[r], one, atol=1e-5), (guidance, r)
    with torch.no_grad():
        plain = unet(x, t, **cond.unet_kwargs()).sample
    assert (ours - plain).abs().max() > 1e-3  # the strengths did change the output
    with row_scaled(unet, None):
        assert torch.equal(unet(x, t, **cond.unet_kwargs()).sample, plain)  # no hooks left behind


def test_group_draws_are_keyed_by_slot_within_range_and_absent_for_one_value():
    from lora_grpo.rollout import draw_conditions

    config = load_config(
        find_recipe("tiny-test"),
        ["sample.guidance_scale=[1.5, 7.5]", "lora.train_scale=[0.5, 1.0]", "sample.eta=[0.2, 0.9]"],
    )
    a = draw_conditions(config, epoch=3, slots=[0, 1, 2, 3])
    b = draw_conditions(config, epoch=3, slots=[2, 9])
    assert a.guidance.shape == (4,) and torch.equal(a.guidance[2], b.guidance[0])  # a group's draw is its own
    assert torch.equal(a.lora_scale[2], b.lora_scale[0]) and torch.equal(a.eta[2], b.eta[0])
    assert ((a.eta >= 0.2) & (a.eta <= 0.9)).all() and len(set(a.eta.tolist())) == 4
    assert not torch.equal(a.eta, a.guidance) and not torch.equal(a.eta, a.lora_scale)  # streams apart
    assert ((a.guidance >= 1.5) & (a.guidance <= 7.5)).all() and (
        (a.lora_scale >= 0.5) & (a.lora_scale <= 1)
    ).all()
    assert len(set(a.guidance.tolist())) == 4
    assert not torch.equal(a.guidance, draw_conditions(config, epoch=4, slots=[0, 1, 2, 3]).guidance)
    plain = draw_conditions(load_config(find_recipe("tiny-test")), epoch=3, slots=[0, 1])
    assert plain.guidance is None and plain.lora_scale is None and plain.eta is None
    rows = a.rows(3, torch.device("cpu"))
    assert torch.equal(rows.guidance, a.guidance.repeat_interleave(3))
    assert torch.equal(rows.eta, a.eta.repeat_interleave(3))


@pytest.mark.parametrize(
    "override, needle",
    [
        ("sample.guidance_scale=[7.5, 1.0]", "needs 1.0 <= lo <= hi"),
        ("sample.guidance_scale=[0.5, 2.0]", "needs 1.0 <= lo <= hi"),
        ("sample.guidance_scale=[1.0, 2.0, 3.0]", "a range is two numbers"),
        ("sample.guidance_scale=[1.0, .nan]", "finite"),
        ("lora.train_scale=[0.0, 1.0]", "lora.train_scale"),
        ("lora.train_scale=high", "expected a number"),
        ("sample.eta=0.0", "must be > 0"),
        ("sample.eta=[-0.5, 1.0]", "needs 0.0 <= lo <= hi"),
        # a group at eta 0 has no log-prob for the clipped ratio (tiny-test trains grpo-clip)
        ("sample.eta=[0.0, 1.0]", "start the range above 0 or use train.objective awm or nft"),
    ],
)
def test_bad_ranges_are_one_line(override, needle):
    with pytest.raises(UserError) as err:
        load_config(find_recipe("tiny-test"), [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow
def test_a_run_with_ranges_trains_each_group_at_its_own_cfg_and_strength(
    tiny_sd_dir, tiny_clip_dir, tmp_path
):
    """With a LoRA far from zero, the update re-evaluates each stored step at its row's CFG, strength and eta:
    the importance ratios are exactly 1 before the first optimizer step (at strength 1, the recipe's low CFG
    or eta 1 they would not be), and the groups' values are constant within a group and differ between
    groups."""
    from lora_grpo.train import Trainer

    config = load_config(
        find_recipe("tiny-test"),
        [
            f"model.base={tiny_sd_dir}",
            f"reward.clip.model={tiny_clip_dir}",
            "train.epochs=1",
            "train.optimizer=adamw",
            "output.sample_grid_every=0",
            "sample.guidance_scale=[1.0, 6.0]",
            "lora.train_scale=[0.3, 1.0]",
            "sample.eta=[0.3, 1.0]",
        ],
    )
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in trainer.learner.params:
            p.add_(0.3 * torch.randn_like(p))
    seen = []
    sample = trainer.sample_epoch
    trainer.sample_epoch = lambda epoch: seen.append(sample(epoch)) or seen[-1]
    before = [p.detach().clone() for p in trainer.learner.params]
    row = trainer.run_epoch(0)
    assert abs(row["first_ratio_min"] - 1) <= 1e-6 and abs(row["first_ratio_max"] - 1) <= 1e-6
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.learner.params, strict=True))
    rollout, G = seen[0].rollout, config.sample.group_size
    for values in (rollout.guidance, rollout.lora_scale, rollout.eta):
        groups = values.view(-1, G)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0].tolist())) == groups.shape[0]
