"""The update's plan and statistics: pure pieces checked by hand."""

from __future__ import annotations

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
