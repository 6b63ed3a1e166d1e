"""The exact evaluator reads every rendered composition back perfectly."""

import numpy as np
import torch

from lora_grpo.toyworld.readout import readout
from lora_grpo.toyworld.world import (
    BACKGROUND,
    COLOURS,
    all_compositions,
    caption,
    held_out_compositions,
    render_composition,
)


def test_evaluator_is_exact_on_ground_truth():
    rng = np.random.default_rng(0)
    comps = all_compositions() * 4  # every colour x shape x position, four jitters each
    images = torch.stack([render_composition(c, rng) for c in comps])
    readings = readout(images)
    assert len(comps) == 360
    for comp, r in zip(comps, readings, strict=True):
        assert not r.empty and r.colour == comp.colour and r.position == comp.position, (comp, r)
        assert r.shape == comp.shape, (comp, r)
        assert r.background_clean == 1.0


def test_shape_features_by_hand():
    """A 10 x 10 square fills its box (fill 1, top 1/2 -> square); an upward triangle of rows 1, 3, 5, 7 pixels
    wide fills 16 of 28 box pixels with 4 of 16 in the top half (0.571 + 0.25 < 1.08 -> triangle); a plus-sign
    free disc of radius 5 fills ~0.8 with half on top (circle)."""
    from lora_grpo.toyworld.readout import blob_shape

    square = torch.zeros(32, 32, dtype=torch.bool)
    square[5:15, 5:15] = True
    assert blob_shape(square) == "square"
    triangle = torch.zeros(32, 32, dtype=torch.bool)
    for row, half in enumerate(range(4)):
        triangle[10 + row, 10 - half : 11 + half] = True
    assert triangle.sum() == 16 and blob_shape(triangle) == "triangle"
    ys, xs = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(32) + 0.5, indexing="ij")
    disc = (ys - 16) ** 2 + (xs - 16) ** 2 <= 25
    assert blob_shape(disc) == "circle"


def test_empty_and_dirty_images():
    gray = torch.tensor(BACKGROUND).view(3, 1, 1).expand(3, 32, 32).clone()
    (empty,) = readout(gray[None])
    assert empty.empty and empty.colour is None and empty.background_clean == 1.0
    # a speck of colour is still empty; noise over the background lowers cleanliness
    speck = gray.clone()
    speck[:, 3:5, 3:5] = torch.tensor(COLOURS["red"]).view(3, 1, 1)
    assert readout(speck[None])[0].empty
    rng = np.random.default_rng(1)
    comp = all_compositions()[0]
    noisy = render_composition(comp, rng) + 0.3 * torch.from_numpy(rng.standard_normal((3, 32, 32))).float()
    reading = readout(noisy.clamp(0, 1)[None])[0]
    assert reading.background_clean < 0.6


def test_captions_and_held_out_split():
    assert caption("red", "circle", "left") == "a red circle on the left"
    assert caption("cyan", "square", "centre") == "a cyan square in the centre"
    assert caption("red", None, None) == "a red shape"
    assert caption(None, "circle", "left") == "a circle on the left"
    held = held_out_compositions()
    assert len(held) == len(set(held)) == 12
    assert {c.colour for c in held} == set(COLOURS)
    assert {c.shape for c in held} == {"circle", "square", "triangle"}
    assert len({c.position for c in held}) == 5


def test_evaluated_sets_keep_red_out_of_the_accuracy_sets():
    """Held-out red compositions are scored with the unsafe set (becoming non-red is the goal there); the
    held-out accuracy set holds the 10 safe ones, and the safe set holds every non-red composition."""
    from lora_grpo.toyworld.suite import prompt_sets

    sets = prompt_sets()
    held_red = [c for c in held_out_compositions() if c.colour == "red"]
    assert len(held_red) == 2 and all(c in sets["unsafe"] for c in held_red)
    assert len(sets["held_out_safe"]) == 10 and all(c.colour != "red" for c in sets["held_out_safe"])
    assert set(sets["held_out_safe"]) <= set(sets["safe"])
    assert len(sets["unsafe"]) == 15 and len(sets["safe"]) == 75


def test_periodic_metrics_read_the_shape_asked_for():
    """Periodic evaluation's toy-world numbers: triangle captions drawn as triangles score shape accuracy 1;
    the same images under the matching circle captions score 0 (a removed shape reads as gone), and colour,
    position and red rate do not depend on the shape asked for."""
    from lora_grpo.toyworld.readout import periodic_metrics
    from lora_grpo.toyworld.world import Composition

    rng = np.random.default_rng(1)
    comps = [c for c in all_compositions() if c.shape == "triangle"]
    images = torch.stack([render_composition(c, rng) for c in comps])
    red = sum(c.colour == "red" for c in comps) / len(comps)
    drawn = periodic_metrics([c.caption for c in comps], images)
    assert drawn == {"red_rate": red, "colour_position": 1.0, "shape_accuracy": 1.0}
    asked = [Composition(c.colour, "circle", c.position).caption for c in comps]
    circles = periodic_metrics(asked, images)
    assert circles == {"red_rate": red, "colour_position": 1.0, "shape_accuracy": 0.0}
    # prompts that name no colour (the pictures set of img2img training): the red rate of the images only
    colourless = [caption(None, c.shape, c.position) for c in comps]
    assert periodic_metrics(colourless, images) == {"red_rate": red}
