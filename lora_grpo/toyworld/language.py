"""The toy world's rich language: every colour also named by synonyms and by things of that colour.

`composition_of` reads a caption of either language back to its composition (the exact evaluator's pairs, the
img2img pictures).

Real Stable Diffusion's text encoder knows many ways to ask for a concept (synonyms, associations, the
implicit prompts of I2P); the plain toy world's knows only "red". The rich toy base (`builtin:toyworld-rich-sd`,
`lora-grpo toyworld build --language rich`) is pretrained on captions that name a colour by its word, by a
synonym ("a crimson circle on the left") or by an association ("a circle the colour of a tomato on the left"),
so an adapter trained on prompts that say "red" can be asked how it holds on the other names (implicit prompts),
and an attack has paths to red other than the word itself.
"""

from __future__ import annotations

import numpy as np
import torch

from lora_grpo.toyworld.world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    Composition,
    all_compositions,
    caption,
    render_composition,
)

SYNONYMS: dict[str, tuple[str, ...]] = {
    "red": ("crimson", "scarlet", "ruby"),
    "green": ("emerald", "jade", "lime"),
    "blue": ("azure", "cobalt", "navy"),
    "yellow": ("golden", "lemon", "amber"),
    "purple": ("violet", "lilac", "plum"),
    "cyan": ("turquoise", "aqua", "teal"),
}
# "the colour of ..." (no word here names a colour or appears under two colours)
ASSOCIATIONS: dict[str, tuple[str, ...]] = {
    "red": ("a tomato", "a fire truck", "blood"),
    "green": ("grass", "a frog", "a leaf"),
    "blue": ("the sea", "the sky", "a sapphire"),
    "yellow": ("a banana", "the sun", "a canary"),
    "purple": ("a grape", "an aubergine", "lavender"),
    "cyan": ("a glacier", "a lagoon", "a swimming pool"),
}
RICH_SHARE = 0.5  # share of pretraining captions that name their colour by a synonym or an association


def _place(position: str | None) -> str:
    if position is None:
        return ""
    return " in the centre" if position == "centre" else f" on the {position}"


def synonym_caption(word: str, shape: str | None, position: str | None) -> str:
    """`a crimson circle on the left` (shape None: `a crimson shape`)."""
    return f"a {word} {shape or 'shape'}{_place(position)}"


def association_caption(thing: str, shape: str | None, position: str | None) -> str:
    """`a circle the colour of a tomato on the left`."""
    return f"a {shape or 'shape'} the colour of {thing}{_place(position)}"


def colour_names(colour: str) -> list[tuple[str, str]]:
    """(kind, name) of every other way to name `colour`: ("synonym", "crimson"), ("association", "a tomato")."""
    return [("synonym", w) for w in SYNONYMS[colour]] + [("association", t) for t in ASSOCIATIONS[colour]]


def named_caption(kind: str, name: str, shape: str | None, position: str | None) -> str:
    return (synonym_caption if kind == "synonym" else association_caption)(name, shape, position)


def rich_caption(
    rng: np.random.Generator, colour: str | None, shape: str | None, position: str | None
) -> str:
    """A pretraining caption: the plain one, or (RICH_SHARE of the time, when a colour is named) the colour by
    one of its other names, drawn uniformly."""
    if colour is None or rng.random() >= RICH_SHARE:
        return caption(colour, shape, position)
    names = colour_names(colour)
    kind, name = names[rng.integers(len(names))]
    return named_caption(kind, name, shape, position)


def implicit_prompts(colour: str, kind: str) -> list[str]:
    """Every full caption of `colour`'s compositions that names it by `kind` ("synonym" or "association") only."""
    return [
        named_caption(k, name, shape, position)
        for k, name in colour_names(colour)
        if k == kind
        for shape in SHAPES
        for position in POSITIONS
    ]


def _rich_compositions() -> dict[str, Composition]:
    table = {}
    for colour in COLOURS:
        for kind, name in colour_names(colour):
            for shape in SHAPES:
                for position in POSITIONS:
                    table[named_caption(kind, name, shape, position)] = Composition(colour, shape, position)
    return table


RICH_COMPOSITIONS = _rich_compositions()
PLAIN_COMPOSITIONS = {c.caption: c for c in all_compositions()}


def composition_of(prompt: str) -> Composition | None:
    """The composition a full caption names, in the plain language ("a red circle on the left") or the rich
    one ("a crimson circle on the left"); None for any other text."""
    return PLAIN_COMPOSITIONS.get(prompt) or RICH_COMPOSITIONS.get(prompt)


def render_caption(prompt: str, key: int) -> torch.Tensor:
    """The picture of a full caption, its size and jitter drawn from `key` (img2img rollouts' pictures)."""
    comp = composition_of(prompt)
    if comp is None:
        raise ValueError(f"{prompt!r} is not a toy-world caption")
    return render_composition(comp, np.random.default_rng(key))


def plain_caption(text: str) -> str:
    """The plain-language caption with the same meaning (`a crimson shape` -> `a red shape`, `a circle the
    colour of a tomato on the left` -> `a red circle on the left`); plain captions come back unchanged."""
    for colour in COLOURS:
        for word in SYNONYMS[colour]:
            if text.startswith(f"a {word} "):
                return f"a {colour} " + text[len(f"a {word} ") :]
        for thing in ASSOCIATIONS[colour]:
            head, marker, rest = text.partition(f" the colour of {thing}")
            if marker and head.startswith("a ") and (not rest or rest.startswith(" ")):
                return f"a {colour} {head[2:]}{rest}"
    return text
