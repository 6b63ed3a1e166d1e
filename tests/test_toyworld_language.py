"""The toy world's rich language: other names for each colour, read back to the composition they ask for."""

import numpy as np
import pytest
import torch

from lora_grpo.toyworld.language import (
    ASSOCIATIONS,
    RICH_SHARE,
    SYNONYMS,
    colour_names,
    composition_of,
    implicit_prompts,
    plain_caption,
    rich_caption,
)
from lora_grpo.toyworld.readout import caption_pairs, periodic_metrics, readout
from lora_grpo.toyworld.world import COLOURS, POSITIONS, SHAPES, all_compositions, render_composition


def test_every_other_name_reads_back_to_its_composition():
    """For every composition and every synonym or association of its colour, the full caption parses to that
    composition and its plain caption is the composition's own caption (15 x 6 x 6 = 540 captions)."""
    seen = set()
    for comp in all_compositions():
        for kind, name in colour_names(comp.colour):
            prompt = (
                f"a {name} {comp.shape}" if kind == "synonym" else f"a {comp.shape} the colour of {name}"
            ) + (" in the centre" if comp.position == "centre" else f" on the {comp.position}")
            assert composition_of(prompt) == comp, prompt
            assert plain_caption(prompt) == comp.caption, prompt
            seen.add(prompt)
    assert len(seen) == len(all_compositions()) * 6
    # partial captions keep their meaning: colour only, colour and shape
    assert plain_caption("a crimson shape") == "a red shape"
    assert plain_caption("a shape the colour of the sea") == "a blue shape"
    assert plain_caption("a triangle the colour of a grape") == "a purple triangle"
    # plain captions and text that names no colour come back unchanged
    assert plain_caption("a red circle on the left") == "a red circle on the left"
    assert plain_caption("a circle on the left") == "a circle on the left"
    assert composition_of("a circle on the left") is None


def test_no_other_name_says_a_colour_word_or_belongs_to_two_colours():
    """An implicit prompt must not contain any plain colour word (else it is not implicit), and no word of a
    name may be shared between colours (else the language is ambiguous)."""
    words_of = {
        colour: {w for name in SYNONYMS[colour] + ASSOCIATIONS[colour] for w in name.split()}
        - {"a", "an", "the"}
        for colour in COLOURS
    }
    for colour, words in words_of.items():
        assert not words & set(COLOURS), (colour, words & set(COLOURS))
        for other, other_words in words_of.items():
            if other != colour:
                assert not words & other_words, (colour, other, words & other_words)
    for colour in COLOURS:
        for kind in ("synonym", "association"):
            prompts = implicit_prompts(colour, kind)
            assert len(prompts) == 3 * len(SHAPES) * len(POSITIONS)
            assert all(not set(p.split()) & set(COLOURS) for p in prompts)


def test_rich_captions_name_a_colour_otherwise_at_the_stated_share():
    """Half of the captions that name a colour use another name, drawn uniformly over the six; a caption with
    no colour is never changed."""
    rng = np.random.default_rng(0)
    n = 12000
    texts = [rich_caption(rng, "red", "circle", "left") for _ in range(n)]
    plain = sum(t == "a red circle on the left" for t in texts) / n
    assert plain == pytest.approx(1 - RICH_SHARE, abs=0.015)
    for kind, name in colour_names("red"):
        expected = RICH_SHARE / 6
        share = sum(name in t and t != "a red circle on the left" for t in texts) / n
        assert share == pytest.approx(expected, abs=0.012), (kind, name, share)
    assert {plain_caption(t) for t in texts} == {"a red circle on the left"}
    assert rich_caption(rng, None, "circle", "left") == "a circle on the left"


def test_rich_prompts_are_scored_like_their_plain_captions():
    """The exact evaluator's pairs and the periodic metrics read a synonym prompt against its composition: a
    crimson prompt drawn red is red and right; drawn blue it is neither."""
    rng = np.random.default_rng(1)
    comps = [c for c in all_compositions() if c.colour == "red"][:4]
    drawn_red = torch.stack([render_composition(c, rng) for c in comps])
    blue = [type(c)("blue", c.shape, c.position) for c in comps]
    drawn_blue = torch.stack([render_composition(c, rng) for c in blue])
    prompts = [
        f"a crimson {c.shape}" + (" in the centre" if c.position == "centre" else f" on the {c.position}")
        for c in comps
    ]
    pairs = caption_pairs(prompts, readout(drawn_red))
    assert [c for c, _ in pairs] == comps
    red = periodic_metrics(prompts, drawn_red)
    assert red == {"red_rate": 1.0, "colour_position": 1.0, "shape_accuracy": 1.0}
    not_red = periodic_metrics(prompts, drawn_blue)
    assert not_red["red_rate"] == 0.0 and not_red["colour_position"] == 0.0
