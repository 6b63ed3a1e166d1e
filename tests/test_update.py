"""The update's plan and statistics: pure pieces checked by hand."""

from __future__ import annotations

import pytest
import torch

from lora_grpo.config import TrainConfig
from lora_grpo.update import UpdateStats, draw_update_plan, gather_step_stats


class OneProcess:
    """The two accelerate calls `gather_step_stats` makes, for a single process."""

    device = torch.device("cpu")

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


def test_update_plan_trains_only_the_stochastic_window():
    cfg = TrainConfig(batch_size=4, gradient_accumulation_steps=1, timestep_fraction=0.5)
    order, steps = draw_update_plan((0, 3, 7919, 0), [10, 11], 4, (3, 7), cfg)
    assert sorted(order.tolist()) == list(range(8))
    assert steps.shape == (8, 2)  # half of the 4 window steps
    assert ((steps >= 3) & (steps < 7)).all()
    cfg = TrainConfig(batch_size=4, timestep_fraction=0.5, timesteps="earliest")
    _, steps = draw_update_plan((0, 3, 7919, 0), [10, 11], 4, (3, 7), cfg)
    assert sorted(set(steps.flatten().tolist())) == [3, 4]  # the noisiest half of the window


def test_update_plan_of_a_group_does_not_depend_on_the_other_groups():
    """What a group draws (its trained steps) depends on its slot alone: the N-process = 1-process property."""
    cfg = TrainConfig(batch_size=4, timestep_fraction=0.5)
    _, both = draw_update_plan((1, 2, 7919, 0), [5, 9], 4, (0, 8), cfg)
    _, alone = draw_update_plan((1, 2, 7919, 0), [9], 4, (0, 8), cfg)
    assert torch.equal(both[4:], alone)
    _, other_epoch = draw_update_plan((1, 3, 7919, 0), [9], 4, (0, 8), cfg)
    assert not torch.equal(other_epoch, alone)


def test_step_statistics_reduce_by_their_rule():
    values = {"loss": [1.0, 2.0, 6.0], "ratio_min": [0.9, 0.7], "ratio_max": [1.1, 1.3], "kl": []}
    stats = gather_step_stats(OneProcess(), values)
    assert stats == {"loss": 3.0, "ratio_min": 0.699999988079071, "ratio_max": 1.2999999523162842}
    row = UpdateStats(optimizer_steps=2, lr=1e-3, **stats).row()
    assert "kl" not in row and "grad_norm" not in row  # not measured: left out of the metrics row
    assert row["optimizer_steps"] == 2 and row["loss"] == 3.0


def test_safe_kl_weighs_each_trajectory_by_its_prompt_set(tmp_path):
    """train.safe_kl_coef: the KL to the base UNet weighs only safe prompts' trajectories. One minibatch, zero
    advantages (no policy-gradient term) and a LoRA moved off zero: the update's loss must equal the mean over
    trained steps of (weight x KL) computed here independently, row by row, before the update moves the LoRA."""
    from accelerate.state import AcceleratorState

    from lora_grpo.config import load_config
    from lora_grpo.grpo import gaussian_kl
    from lora_grpo.models import adapter_disabled
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.sampling import step_log_prob
    from lora_grpo.train import Trainer
    from lora_grpo.update import draw_update_plan

    overrides = ["train.kl_coef=0", "train.safe_kl_coef=0.5", "train.batch_size=16"]
    overrides += ["train.gradient_accumulation_steps=1", "train.inner_epochs=1"]
    config = load_config(find_recipe("tiny-test"), overrides)
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    trainer.start()
    torch.manual_seed(0)
    for p in trainer.learner.params:  # LoRA B starts at zero: policy == reference, KL 0
        p.data.normal_(0.0, 0.05)
    samples = trainer.sample_epoch(0)
    safe = torch.tensor([trainer.prompt_sets[i].safety == "safe" for i in samples.set_index.tolist()])
    assert safe.any() and (~safe).any() and len(safe) == 16
    model, cfg, rollout = trainer.model, config.train, samples.rollout
    group = len(safe) // len(samples.group_slots)
    order, steps = draw_update_plan(
        (config.seed, 0, 7919, 0), samples.group_slots, group, trainer.window(0), cfg
    )
    unet = trainer.learner.unet
    expected_loss, expected_kl = [], []
    with torch.no_grad():
        for j in range(steps.shape[1]):
            idx = steps[order, j]  # [16] the step trained at pass j, per trajectory in visiting order
            x_t, x_prev = rollout.latents[order, idx], rollout.latents[order, idx + 1]
            cond, uncond = rollout.cond.rows(order), model.uncond_for(len(order))
            args = (model.schedule, idx, x_t, x_prev, cond, uncond)
            _, mean, std = step_log_prob(unet, *args, model.guidance, model.eta)
            with adapter_disabled(unet):
                _, ref_mean, _ = step_log_prob(unet, *args, model.guidance, model.eta)
            kl = gaussian_kl(mean, std, ref_mean, std)  # [16]
            expected_loss.append((0.5 * safe[order].float() * kl).mean().item())
            expected_kl.append(kl.mean().item())
    assert min(expected_kl) > 0
    stats = trainer.update(samples, torch.zeros(16), 0)
    assert stats.loss == pytest.approx(sum(expected_loss) / len(expected_loss), rel=1e-4)
    assert stats.kl == pytest.approx(sum(expected_kl) / len(expected_kl), rel=1e-4)
    # the unsafe rows carry no weight: the loss is below the same KL weighed on every row
    assert stats.loss < 0.5 * stats.kl
    AcceleratorState._reset_state()
