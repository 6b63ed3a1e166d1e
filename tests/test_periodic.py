"""Periodic evaluation's pure parts: which prompts a check samples, and the safety pools."""

from __future__ import annotations

import pytest

from lora_grpo.evaluation.periodic import eval_prompts, pooled_metrics


def test_pooled_metrics_weigh_each_set_by_its_images():
    """(0.9 x 30 + 0.6 x 10) / 40 = 0.825; a metric one set lacks is left out; no sets, no pool."""
    rows = [({"red_rate": 0.9, "colour_position": 1.0}, 30), ({"red_rate": 0.6}, 10)]
    assert pooled_metrics(rows) == {"red_rate": pytest.approx(0.825)}
    assert pooled_metrics([({"a": 0.5, "b": 2.0}, 4)]) == {"a": 0.5, "b": 2.0}
    assert pooled_metrics([]) == {}


def test_eval_prompts_spread_over_the_set():
    """3 of 7 prompts: indices 0, 7 // 3 = 2, 14 // 3 = 4, each twice; more asked than there are: every one."""
    prompts = tuple(f"p{i}" for i in range(7))
    assert eval_prompts(prompts, 3, 2) == ["p0", "p0", "p2", "p2", "p4", "p4"]
    assert eval_prompts(prompts[:2], 16, 1) == ["p0", "p1"]
