"""`lora-grpo new-recipe`: a recipe folder for any concept, written whole or not at all, that validates and
trains; on the toy world, the new anchors order rendered images the right way (shapes, not colours)."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from lora_grpo.cli import main
from lora_grpo.config import load_config
from lora_grpo.new_recipe import TEMPLATES
from lora_grpo.toyworld.world import COLOURS, POSITIONS, Composition, render_composition


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_an_object_recipe_from_templates(tmp_path, capsys):
    code, out, _ = run(
        [
            "new-recipe",
            "no-cars",
            "--remove",
            "a car",
            "cars",
            "--instead",
            "a bicycle",
            "an empty road",
            "--out",
            tmp_path,
        ],
        capsys,
    )
    folder = tmp_path / "no-cars"
    assert code == 0 and f"train it: lora-grpo train {folder / 'no-cars.yaml'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no-cars"]  # no temporary folder left
    config = load_config(folder / "no-cars.yaml")
    parent = load_config(Path(__file__).resolve().parents[1] / "recipes" / "sd15-nudity-compact.yaml")
    assert config.name == "no-cars" and config.sample == parent.sample and config.train == parent.train
    anchors = yaml.safe_load((folder / "anchors.yaml").read_text())
    assert anchors["unsafe"] == ["a car", "cars"] and anchors["safe"] == ["a bicycle", "an empty road"]
    assert config.reward.anchors == str(folder / "anchors.yaml")
    unsafe, *safe = config.prompts.sets
    lines = (folder / "prompts" / "unsafe.txt").read_text().splitlines()
    assert unsafe.safety == "unsafe" and unsafe.path == str(folder / "prompts" / "unsafe.txt")
    assert len(lines) == 2 * len(TEMPLATES) and "a photo of a car" in lines and "a painting of cars" in lines
    assert [s.name for s in safe] == ["coco-captions", "everyday"]  # the parent's safe sets, kept
    assert Path(safe[1].path).parent == folder / "prompts"  # its local file copied next to the recipe
    # the folder is never written over
    before = sorted(p.name for p in folder.rglob("*"))
    code, _, err = run(
        ["new-recipe", "no-cars", "--remove", "x", "--instead", "y", "--out", tmp_path], capsys
    )
    assert code == 2 and "already exists" in err and err.count("\n") == 1
    assert sorted(p.name for p in folder.rglob("*")) == before


@pytest.mark.parametrize(
    "args, needle",
    [
        (["bad/name", "--remove", "a", "--instead", "b"], "plain folder name"),
        (["ok", "--remove", " ", "--instead", "b"], "at least one --remove phrase"),
        (["ok", "--remove", "a", "--instead", "b", "--from", "nope"], "recipe 'nope' not found"),
        (["ok", "--remove", "a", "--instead", "b", "--prompts", "missing.txt"], "not found"),
        (["ok", "--remove", "a", "--instead", "b", "--safe-images", "x"], "both --safe-images"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, needle):
    code, _, err = run(["new-recipe", *args, "--out", tmp_path / "out"], capsys)
    assert code == 2 and needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _save(images, folder: Path) -> Path:
    folder.mkdir()
    for i, image in enumerate(images):
        array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:03d}.png")
    return folder


def test_a_toy_shape_recipe_orders_rendered_images_and_trains(tmp_path, capsys):
    """Remove triangles in the toy world: new-recipe from `toyworld` with the user's toy prompts; at the
    parent's alpha the reward prefers rendered circles and squares to triangles for every checked triangle
    prompt, and the recipe runs an epoch."""
    from lora_grpo.train import Trainer

    colours = [c for c in COLOURS if c != "red"]
    triangles = [Composition(c, "triangle", p) for c in colours for p in POSITIONS]
    others = [Composition(c, s, p) for c in colours for s in ("circle", "square") for p in POSITIONS]
    (tmp_path / "triangles.txt").write_text("\n".join(c.caption for c in triangles) + "\n")
    (tmp_path / "others.txt").write_text("\n".join(c.caption for c in others) + "\n")
    rng = np.random.default_rng(0)
    unsafe_dir = _save([render_composition(c, rng) for c in triangles[::3]], tmp_path / "unsafe")
    safe_dir = _save([render_composition(c, rng) for c in others[::6]], tmp_path / "safe")
    code, out, err = run(
        [
            "new-recipe",
            "no-triangles",
            "--from",
            "toyworld",
            "--remove",
            "a triangle",
            "--instead",
            "a circle",
            "a square",
            "--prompts",
            tmp_path / "triangles.txt",
            "--safe-prompts",
            tmp_path / "others.txt",
            "--safe-images",
            safe_dir,
            "--unsafe-images",
            unsafe_dir,
            "--out",
            tmp_path,
        ],
        capsys,
    )
    assert code == 0, err
    assert "ok: every unsafe prompt prefers the safe images" in out and "WARNING" not in out
    recipe = tmp_path / "no-triangles" / "no-triangles.yaml"
    config = load_config(
        recipe,
        [
            "train.epochs=1",
            "evaluate.every=0",
            "evaluate.stop_when=[]",
            "output.sample_grid_every=0",
            "sample.num_steps=4",
            "sample.sde_steps=2",
        ],
    )
    assert config.model.base == "builtin:toyworld-sd" and config.reward.name == "steering-projection"
    # a parent's stop conditions name its own sets (toyworld: eval/red/...): cleared, never inherited
    from lora_grpo.new_recipe import ConceptSpec, write_recipe

    spec = ConceptSpec("from-toy", ("a triangle",), ("a circle",), parent="toyworld")
    child = write_recipe(spec, tmp_path / "child")
    assert load_config(child).evaluate.stop_when == [] and "stop_when is cleared" in child.read_text()
    # the parent's unsafe : safe mix (toyworld: red 2, five safe colour sets of 1)
    assert [s.weight for s in config.prompts.sets] == [2.0, 5.0]
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    trainer.start()
    assert trainer.run_epoch(0)["samples"] == config.samples_per_epoch
