"""Rewards by name. Every reward is a callable `(images [N,3,H,W] in [0,1], prompts) -> rewards [N]`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, get_args, get_type_hints

import torch
from torch import Tensor

from lora_grpo.config import RewardConfig
from lora_grpo.rewards.clip_backends import load_clip
from lora_grpo.rewards.steering import SteeringReward, load_anchors


class RewardFn(Protocol):
    def __call__(self, images: Tensor, prompts: list[str]) -> Tensor: ...


def _steering(cfg: RewardConfig, device) -> RewardFn:
    return SteeringReward(
        load_clip(cfg.clip, device), load_anchors(cfg.anchors), cfg.alpha, "add", cfg.clip.batch_size
    )


def _steering_projection(cfg: RewardConfig, device) -> RewardFn:
    return SteeringReward(
        load_clip(cfg.clip, device), load_anchors(cfg.anchors), cfg.alpha, "project", cfg.clip.batch_size
    )


def _clip(cfg: RewardConfig, device) -> RewardFn:
    return SteeringReward(load_clip(cfg.clip, device), None, 0.0, "none", cfg.clip.batch_size)


REWARDS: dict[str, Callable[[RewardConfig, torch.device], RewardFn]] = {
    "steering": _steering,
    "steering-projection": _steering_projection,
    "clip": _clip,
}


def reward_names() -> tuple[str, ...]:
    """The names a recipe may use (the `reward.name` Literal), kept equal to the registry by a test."""
    return get_args(get_type_hints(RewardConfig)["name"])


def build_reward(cfg: RewardConfig, device: torch.device | str = "cpu") -> RewardFn:
    """The recipe's reward, ready to score: a steering reward's direction is computed (and checked) now."""
    reward = REWARDS[cfg.name](cfg, torch.device(device))
    if isinstance(reward, SteeringReward) and reward.anchors is not None:
        reward.direction  # noqa: B018 (degenerate anchors fail here, before any image is sampled)
    return reward
