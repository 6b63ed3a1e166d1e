"""train.lr_schedule: the rates a run takes, by hand, on one and on two processes."""

from __future__ import annotations

import math

import pytest
import torch

from lora_grpo.config import load_config
from lora_grpo.policy import lr_schedule
from lora_grpo.recipe_files import find_recipe


def rates(overrides: list[str], num_processes: int) -> list[float]:
    """The rate after each optimizer step of a whole run, stepping the schedule as accelerate does (once a
    process per optimizer step)."""
    config = load_config(find_recipe("tiny-test"), overrides)
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.train.learning_rate)
    schedule = lr_schedule(optimizer, config, num_processes)
    # tiny-test: 2 prompts x 4 images x 2 batches = 16 samples, minibatches of 4, 2 a step: 2 steps an epoch
    steps = config.train.epochs * 2
    out = []
    for _ in range(steps):
        optimizer.step()
        for _ in range(num_processes):
            schedule.step()
        out.append(optimizer.param_groups[0]["lr"])
    return out


@pytest.mark.parametrize("num_processes", [1, 2])
def test_the_cosine_schedule_reaches_zero_at_the_last_step_of_the_run(num_processes):
    lr, epochs = 1e-3, 3
    got = rates(["train.lr_schedule=cosine", f"train.epochs={epochs}"], num_processes)
    total = epochs * 2
    assert got == pytest.approx([lr * 0.5 * (1 + math.cos(math.pi * k / total)) for k in range(1, total + 1)])
    assert got[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_the_warm_up_counts_optimizer_steps_on_any_number_of_processes(num_processes):
    lr = 1e-3
    cosine = rates(["train.lr_schedule=cosine", "train.lr_warmup_steps=2", "train.epochs=3"], num_processes)
    # 2 warm-up steps, then a half cosine over the other 4 of the run's 6
    expected = [lr * 1 / 2, lr] + [lr * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)]
    assert cosine == pytest.approx(expected)
    constant = rates(["train.lr_warmup_steps=2", "train.epochs=3"], num_processes)
    assert constant == pytest.approx([lr / 2] + [lr] * 5)


def test_an_unknown_schedule_is_refused_in_one_line():
    from lora_grpo.errors import UserError

    with pytest.raises(UserError, match="train.lr_schedule"):
        load_config(find_recipe("tiny-test"), ["train.lr_schedule=linear"])
