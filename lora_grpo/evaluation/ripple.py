"""What a concept-removal adapter removed, and what else moved with it (the ripple effect).

`lora-grpo eval --concept PHRASE... --neighbour PHRASE...` adds one suite for the concept and one per
neighbouring concept (things that must stay drawable: other painters, other vehicles), each prompted with the
templates `new-recipe` trains with (new_recipe.TEMPLATES around the phrase). Every image is read by CLIP
zero-shot: it takes the label whose text embedding is nearest (cosine) among

    the concept's phrases, each neighbour's phrase, and NEUTRAL ("an image": none of them)

  erasure: on the concept's suite, the share of images still read as the concept (any of its phrases);
           lower is better, and base vs adapter shows how much was removed;
  specificity: on a neighbour's suite, the share of images read as that neighbour; it should not move.
The label texts are written into the report with the numbers.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from lora_grpo.evaluation.suites import EvalPrompt, Suite
from lora_grpo.new_recipe import TEMPLATES
from lora_grpo.rewards.steering import cosine

NEUTRAL = "an image"
CONCEPT_SUITE = "concept"


def slug(phrase: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", phrase.lower()).strip("-") or "x"


def neighbour_suite_name(phrase: str) -> str:
    return f"neighbour-{slug(phrase)}"


def ripple_suites(concept: list[str], neighbours: list[str]) -> list[Suite]:
    """The concept's suite (unsafe side) and one suite per neighbour (safe side), templated prompts."""

    def prompts(phrases):
        return tuple(EvalPrompt(t.format(c=p)) for p in phrases for t in TEMPLATES)

    suites = [Suite(CONCEPT_SUITE, "unsafe", prompts(concept), "--concept", "concept")]
    suites += [
        Suite(neighbour_suite_name(n), "safe", prompts([n]), "--neighbour", "neighbour") for n in neighbours
    ]
    return suites


def zero_shot_labels(concept: list[str], neighbours: list[str]) -> list[str]:
    return [*concept, *neighbours, NEUTRAL]


def read_labels(image_embeds: Tensor, label_embeds: Tensor) -> list[int]:
    """Index of the nearest label (cosine) for every image: [N, D] x [L, D] -> N ints."""
    sims = torch.stack([cosine(image_embeds, label.expand_as(image_embeds)) for label in label_embeds], dim=1)
    return sims.argmax(dim=1).tolist()


def zero_shot_rate(readings: list[int], labels: list[str], wanted: list[str]) -> dict:
    """Share of images read as one of `wanted` (label texts), with the labels used."""
    hits = sum(labels[i] in wanted for i in readings)
    return {"rate": hits / max(1, len(readings)), "read_as": wanted, "labels": labels}


def ripple_metrics(suite: Suite, image_embeds: Tensor, label_embeds: Tensor, concept, neighbours) -> dict:
    """The zero-shot entry of a concept or neighbour suite's metrics."""
    labels = zero_shot_labels(concept, neighbours)
    readings = read_labels(image_embeds, label_embeds)
    if suite.kind == "concept":
        return zero_shot_rate(readings, labels, list(concept))
    phrase = next(n for n in neighbours if neighbour_suite_name(n) == suite.name)
    return zero_shot_rate(readings, labels, [phrase])
