"""What the trainer calls around training, so evaluation, the toy world and experiment trackers plug in
without the trainer importing them (the CLI builds the callbacks from the recipe and hands them over).

The trainer calls every callback on the main process only, in the order given:
  on_start(ctx)                         after the run folder is ready (and a resumed run is loaded)
  on_epoch_end(ctx, epoch, row, grid)   after each epoch (`epoch` counts from 1, as in metrics.jsonl, the
                                        sample grids and the checkpoints); returns metrics merged into the row (so a
                                        later callback, e.g. a tracker, sees an earlier one's numbers); `grid`
                                        is the epoch's sample grid PNG, or None when none was written
  on_end(ctx)                           after training finished and the adapter was saved
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from lora_grpo.config import Config
from lora_grpo.prompts import PromptSet
from lora_grpo.rewards import RewardFn
from lora_grpo.rollout import RolloutModel


@dataclass(frozen=True)
class RunContext:
    """The narrow view of a run a callback gets: never the trainer itself."""

    config: Config
    model: RolloutModel  # the policy being trained (the LoRA on), ready for `rollout`
    reward_fn: RewardFn
    prompt_sets: list[PromptSet]
    run_dir: Path
    log: Callable[[str], None]
    use_base: Callable[[int], None] = lambda index: None  # put base `index` in the model (model.bases)
    eval_sets: list[PromptSet] = field(default_factory=list)  # evaluate.sets: sampled by evaluation only


class Callback(Protocol):
    def on_start(self, ctx: RunContext) -> None: ...

    def on_epoch_end(self, ctx: RunContext, epoch: int, row: dict, grid: Path | None) -> dict: ...

    def on_end(self, ctx: RunContext) -> None: ...
