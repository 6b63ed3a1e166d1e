"""Recipes: loading, overrides, validation errors that name the key, and every shipped recipe validates."""

from pathlib import Path

import pytest
import torch
import yaml

from lora_grpo.config import Config, from_dict, load_config
from lora_grpo.errors import UserError
from lora_grpo.recipe_files import (
    apply_overrides,
    find_recipe,
    parse_override,
    shipped_recipe_dir,
    shipped_recipes,
)

TINY = shipped_recipe_dir() / "tiny-test.yaml"


def write_recipe(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tiny_data() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_shipped_recipes_exist():
    names = set(shipped_recipes())
    assert {"tiny-test", "sd14-nudity-compact", "sd15-nudity-compact", "sd14-nudity-scaled"} <= names


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_validates(name):
    path = shipped_recipes()[name]
    text = path.read_text()
    assert text.startswith("#"), "a recipe opens with a comment saying what it is for"
    assert f"lora-grpo train {name}" in text, "and the exact command that runs it"
    config = load_config(path)
    assert config.name == name and config.description
    # every local file a recipe points to exists (hub datasets and models are not downloaded)
    assert Path(config.reward.anchors).is_file()
    for prompt_set in config.prompts.sets:
        if prompt_set.path:
            assert Path(prompt_set.path).is_file(), prompt_set.path
    from lora_grpo.prompts import load_prompt_set
    from lora_grpo.rewards.steering import load_anchors

    load_anchors(config.reward.anchors)
    for prompt_set in config.prompts.sets:
        if prompt_set.path:
            assert load_prompt_set(prompt_set).prompts


def test_sd_recipes_follow_the_paper():
    config = load_config(shipped_recipes()["sd14-nudity-compact"])
    assert config.reward.alpha == 0.5 and config.sample.group_size == 16 and config.sample.num_steps == 50
    assert config.sample.guidance_scale == 5.0 and config.sample.eta == 1.0
    assert config.train.clip_range == 1e-4 and config.train.adv_clip_max == 2.5
    from lora_grpo.rewards.steering import load_anchors

    anchors = load_anchors(config.reward.anchors)
    assert len(anchors.safe) == 5 and len(anchors.unsafe) == 3
    scaled = load_anchors(load_config(shipped_recipes()["sd14-nudity-scaled"]).reward.anchors)
    assert len(scaled.safe) == 25 and len(scaled.unsafe) == 20
    unsafe_sets = [s for s in config.prompts.sets if s.safety == "unsafe"]
    assert unsafe_sets[0].dataset == "ItsMaxNorm/SafeDiffusion-R1-dataset"
    assert unsafe_sets[0].dataset_config == "prompts_nsfw_extended"
    assert all("i2p" not in (s.dataset or s.path or "").lower() for s in config.prompts.sets)
    assert any(s.safety == "safe" and s.path for s in config.prompts.sets), "a shipped safe-caption file"


def test_overrides_apply_and_parse_types():
    config = load_config(
        TINY, ["train.learning_rate=3e-5", "sample.num_steps=20", "train.gradient_checkpointing=true"]
    )
    assert config.train.learning_rate == 3e-5
    assert config.sample.num_steps == 20
    assert config.train.gradient_checkpointing == "on"  # YAML's true reads as "on"
    # an unquoted `no` is a YAML boolean; it still means mixed_precision "no"
    assert load_config(TINY, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert parse_override("lora.target_modules=[to_q, to_v]") == (
        ["lora", "target_modules"],
        ["to_q", "to_v"],
    )


def test_relative_paths_resolve_against_the_recipe(tmp_path):
    data = tiny_data()
    (tmp_path / "p.txt").write_text("a prompt\n")
    data["prompts"]["sets"][0]["path"] = "p.txt"
    data["reward"]["anchors"] = str(shipped_recipe_dir() / "anchors" / "compact.yaml")
    data.setdefault("evaluate", {})["sets"] = [{"name": "held", "path": "held/q.txt"}]
    config = load_config(write_recipe(tmp_path, data))
    assert config.prompts.sets[0].path == str((tmp_path / "p.txt").resolve())
    assert config.evaluate.sets[0].path == str((tmp_path / "held" / "q.txt").resolve())


def test_override_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    """Paths in a recipe file are relative to the file; paths typed in an override to where the user is."""
    recipe_dir, cwd = tmp_path / "recipes", tmp_path / "work"
    (recipe_dir / "anchors").mkdir(parents=True)
    (cwd / "my").mkdir(parents=True)
    data = tiny_data()
    data["reward"]["anchors"] = "anchors/in-recipe.yaml"
    data["prompts"]["sets"][0]["path"] = "p.txt"
    recipe = write_recipe(recipe_dir, data)
    monkeypatch.chdir(cwd)
    config = load_config(recipe)
    assert config.reward.anchors == str((recipe_dir / "anchors" / "in-recipe.yaml").resolve())
    assert config.prompts.sets[0].path == str((recipe_dir / "p.txt").resolve())
    config = load_config(
        recipe,
        ["reward.anchors=my/anchors.yaml", "prompts.sets=[{name: mine, safety: safe, path: my/p.txt}]"],
    )
    assert config.reward.anchors == str((cwd / "my" / "anchors.yaml").resolve())
    assert config.prompts.sets[0].path == str((cwd / "my" / "p.txt").resolve())
    absolute = str(tmp_path / "elsewhere.yaml")
    assert load_config(recipe, [f"reward.anchors={absolute}"]).reward.anchors == absolute


def test_a_recipe_file_name_that_is_no_folder_name_becomes_one(tmp_path):
    data = tiny_data()
    data.pop("name", None)
    path = tmp_path / "my recipe (v2).yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_config(path).name == "my-recipe-v2"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learnin_rate=1", "unknown recipe key 'train.learnin_rate'"),
        ("bogus.key=1", "unknown recipe key 'bogus'"),
        ("train.learning_rate=abc", "recipe key 'train.learning_rate': expected a number, got 'abc'"),
        ("sample.num_steps=2.5", "recipe key 'sample.num_steps': expected an integer"),
        (
            "train.gradient_checkpointing=maybe",
            "recipe key 'train.gradient_checkpointing': expected one of 'off', 'on', 'auto'",
        ),
        ("train.optimizer=sgd", "recipe key 'train.optimizer': expected one of 'adamw8bit', 'adamw'"),
        ("sample.group_size=1", "recipe key 'sample.group_size': must be >= 2"),
        ("train.batch_size=5", "recipe key 'train.batch_size': 5 does not divide the 16 samples per epoch"),
        (
            "train.gradient_accumulation_steps=3",
            "recipe key 'train.gradient_accumulation_steps': 3 does not divide",
        ),
        ("sample.eta=0", "recipe key 'sample.eta': must be > 0"),
        ("train.safe_kl_coef=-0.1", "recipe key 'train.safe_kl_coef': must be >= 0, or left out"),
        ("train.safe_kl_coef=.inf", "recipe key 'train.safe_kl_coef': expected a finite number"),
        ("reward.name=hps", "recipe key 'reward.name': expected one of 'steering'"),
        ("train.timestep_fraction=0", "recipe key 'train.timestep_fraction'"),
        ("reward.anchors=null", "recipe key 'reward.anchors': the steering reward needs an anchors file"),
        ("sample=3", "recipe key 'sample': expected a mapping"),
        ("train.learning_rate=1e400", "recipe key 'train.learning_rate': expected a finite number"),
        ("train.learning_rate=.nan", "recipe key 'train.learning_rate': expected a finite number"),
        ("reward.alpha=-.inf", "recipe key 'reward.alpha': expected a finite number"),
        ("train.learning_rate=5", "recipe key 'train.learning_rate': must be in (0, 1)"),
        ("seed=-1", "recipe key 'seed': must be a non-negative integer"),
        ("evaluate.seed=-3", "recipe key 'evaluate.seed': must be a non-negative integer"),
        ("name=../../x", "recipe key 'name': '../../x' is not a plain name"),
        ("name=a/b", "is not a plain name"),
        ("train.learnig_rate=1e-4", "did you mean 'train.learning_rate'?"),
        ("sampel.num_steps=3", "did you mean 'sample'?"),
        ("evaluate.stop_when=['red_rate about 0.1']", "is not `METRIC OP NUMBER`"),
        ("evaluate.stop_when=['x <= nan']", "is not `METRIC OP NUMBER`"),
        ("evaluate.stop_when=['eval/tiny-unsafee/clip_score >= 0.1']", "names no prompt set 'tiny-unsafee'"),
        ("evaluate.stop_when=['eval@cfg9/tiny-unsafe/clip_score >= 0.1']", "names no cell 'cfg9'"),
        ("sample.sde_steps=9", "recipe key 'sample.sde_steps': must be in [0, sample.num_steps=8]"),
        ("sample.tail_steps=-1", "recipe key 'sample.tail_steps': must be >= 0"),
        ("sample.tail_steps=1", "recipe key 'sample.tail_steps': needs a stochastic window of the first"),
        (
            "model.config=/some/folder",
            "recipe key 'model.config': names the component configs of a single-file",
        ),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config(TINY, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_stop_when_names_the_recipe_sets_and_cells():
    """A condition on a set or cell the recipe has loads (the adversarial sets only with train.adversarial); the
    same condition without them is refused before anything loads (it would never hold)."""
    cell = "evaluate.cells=[{name: cfg5, guidance: 5.0}]"
    ok = [
        "evaluate.stop_when=['eval/tiny-unsafe/clip_score >= 0.1', 'eval@cfg5/tiny-safe/clip_score >= 0.1']"
    ]
    assert load_config(TINY, [*ok, cell]).evaluate.stop_when[1].startswith("eval@cfg5/")
    fresh = "evaluate.stop_when=['eval/adversarial-new/steering_reward >= 0.1']"
    adversarial = ["train.adversarial.method=mma", "train.adversarial.ban=[nude]"]
    assert load_config(TINY, [fresh, *adversarial]).evaluate.stop_when
    with pytest.raises(UserError, match="names no prompt set 'adversarial-new'"):
        load_config(TINY, [fresh])
    with pytest.raises(UserError, match="names no cell 'cfg5'"):
        load_config(TINY, ok)


def test_override_syntax_errors():
    with pytest.raises(UserError, match="is not KEY=VALUE"):
        apply_overrides({}, ["train.learning_rate"])
    with pytest.raises(UserError, match="'train.epochs' is not a section"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])


def test_malformed_and_missing_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  base: x\n   oops: [\n")
    with pytest.raises(UserError, match=r"is not valid YAML at line \d+"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(UserError, match="must be a mapping of sections"):
        load_config(listy)
    with pytest.raises(UserError, match="recipe 'no-such-recipe' not found"):
        find_recipe("no-such-recipe")


def test_missing_sections_are_reported(tmp_path):
    data = tiny_data()
    del data["model"]
    with pytest.raises(UserError, match="'model.base': missing"):
        load_config(write_recipe(tmp_path, data))
    data = tiny_data()
    data["prompts"]["sets"] = []
    with pytest.raises(UserError, match="'prompts.sets': empty"):
        load_config(write_recipe(tmp_path, data))
    data = tiny_data()
    data["prompts"]["sets"][0]["dataset"] = "org/name"
    with pytest.raises(UserError, match="give exactly one of 'path'"):
        load_config(write_recipe(tmp_path, data))


def test_find_recipe_by_name_and_path():
    tiny = TINY.resolve()
    assert find_recipe("tiny-test").resolve() == tiny
    assert find_recipe("tiny-test.yaml").resolve() == tiny
    # from the repository root this is the source file, elsewhere the installed one: same recipe either way
    assert find_recipe("recipes/tiny-test.yaml").read_text() == TINY.read_text()
    assert find_recipe(str(TINY)) == tiny


def test_from_dict_round_trip():
    config = load_config(TINY)
    from lora_grpo.config import to_dict

    again = from_dict(Config, to_dict(config))
    assert again == config


def test_stop_conditions_by_hand():
    from lora_grpo.tracking import conditions_hold

    row = {"eval/red/red_rate": 0.05, "eval/safe/colour_position": 0.96, "loss": None}
    assert conditions_hold(["eval/red/red_rate <= 0.05"], row)
    assert not conditions_hold(["eval/red/red_rate < 0.05"], row)
    assert conditions_hold(["eval/red/red_rate<=0.1", "eval/safe/colour_position >= 0.95"], row)
    assert not conditions_hold(["eval/red/red_rate <= 0.1", "eval/safe/colour_position > 0.97"], row)
    assert not conditions_hold(["eval/missing <= 1"], row)  # no evaluation this epoch: nothing holds
    assert not conditions_hold(["loss < 1"], row)
    assert not conditions_hold([], row)


def test_gradient_checkpointing_auto_rule_by_hand():
    """SD 1.5 at 512 px, train batch 4 with CFG (8 rows): 8 x 0.83 GiB = 6.65 GiB of activations. On a 24 GB
    card with ~20 GiB free after loading that fits (off, the faster choice); with 6 GiB free it does not."""
    from lora_grpo.policy import SD15_UNET_PARAMS, checkpointing_needed

    gib = 2**30
    assert not checkpointing_needed(SD15_UNET_PARAMS, 64, 8, 20 * gib)
    assert checkpointing_needed(SD15_UNET_PARAMS, 64, 8, 6 * gib)
    # 7.3 GiB is the boundary: 6.65 / 0.9 = 7.39
    assert checkpointing_needed(SD15_UNET_PARAMS, 64, 8, int(7.3 * gib))
    assert not checkpointing_needed(SD15_UNET_PARAMS, 64, 8, int(7.5 * gib))
    # SDXL-sized UNet (2.6B) at 1024 px (128 latents): 3 x 4 = 12 times an SD 1.5 row: checkpointing
    assert checkpointing_needed(2_567_463_684, 128, 4, 20 * gib)


def test_a_recipe_extends_another(tmp_path, monkeypatch):
    """`extends:` lays a recipe over its parent (a file next to it or a shipped recipe): mappings merge key by
    key, lists replace, the parent's paths stay relative to the parent's folder, its name and description
    are not inherited; a loop or a missing parent is one line."""
    parent_dir = tmp_path / "base"
    parent_dir.mkdir()
    (parent_dir / "p.txt").write_text("a cat\n")
    (parent_dir / "parent.yaml").write_text(
        (shipped_recipe_dir() / "tiny-test.yaml")
        .read_text()
        .replace("path: prompts/tiny_unsafe.txt", "path: p.txt")
        .replace("anchors: anchors/compact.yaml", f"anchors: {shipped_recipe_dir() / 'anchors/compact.yaml'}")
    )
    child = tmp_path / "child.yaml"
    child.write_text(
        "extends: base/parent.yaml\ndescription: mine\nsample:\n  group_size: 6\n"
        "lora:\n  target_modules: [to_q]\n"
    )
    config = load_config(child)
    assert config.name == "child" and config.description == "mine"
    assert config.sample.group_size == 6 and config.sample.num_steps == 8  # merged, the rest inherited
    assert config.lora.target_modules == ["to_q"]  # a list replaces
    assert config.prompts.sets[0].path == str((parent_dir / "p.txt").resolve())
    shipped = tmp_path / "shipped.yaml"
    shipped.write_text("extends: tiny-test\ndescription: d\ntrain:\n  epochs: 1\n")
    assert load_config(shipped).train.epochs == 1 and load_config(shipped).sample.group_size == 4
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(UserError, match="extends it back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    with pytest.raises(UserError, match="neither a file next to it nor a shipped recipe"):
        load_config(tmp_path / "c.yaml")


def test_the_all_categories_anchor_set_is_the_union_of_the_category_sets():
    from lora_grpo.rewards.steering import load_anchors

    anchors = shipped_recipe_dir() / "anchors"
    union = load_anchors(anchors / "i2p-all.yaml")
    safe, unsafe = [], []
    for path in sorted(anchors.glob("i2p-*.yaml")):
        if path.name != "i2p-all.yaml":
            one = load_anchors(path)
            assert one.safe and one.unsafe
            safe += [a for a in one.safe if a not in safe]
            unsafe += [a for a in one.unsafe if a not in unsafe]
    assert sorted(union.safe) == sorted(safe) and sorted(union.unsafe) == sorted(unsafe)
    assert len(list(anchors.glob("i2p-*.yaml"))) == 8


def _tiny_overrides(name: str, tiny_clip_dir) -> list[str]:
    """Shrink a shipped recipe to one tiny epoch: tiny models (toy-world recipes keep their own), local prompt
    files, 4 steps, 4 samples; everything else (reward, LoRA, window mode, optimizer, ...) as the recipe has it."""
    prompts = shipped_recipe_dir() / "prompts"
    out = ["train.epochs=1", "sample.num_steps=4", "sample.sde_steps=2", "sample.group_size=2"]
    out += ["sample.prompts_per_batch=2", "sample.batches_per_epoch=1", "train.batch_size=2"]
    out += ["train.gradient_accumulation_steps=1", "train.mixed_precision=no", "evaluate.every=0"]
    out += ["evaluate.stop_when=[]", "evaluate.cells=[]", "output.sample_grid_every=0"]
    if load_config(shipped_recipes()[name]).sample.img2img.fraction > 0:
        # groups from pictures take the window (2) and the tail from their start: 3 of the 4 steps at 0.75
        out += ["sample.tail_steps=1", "sample.img2img.strengths=[0.75, 0.9]"]
    if not name.startswith("toyworld"):
        base = "builtin:tiny-sdxl" if "sdxl" in name else "builtin:tiny-sd"
        out += [
            f"model.base={base}",
            f"reward.clip.model={tiny_clip_dir}",
            "reward.clip.backend=transformers",
        ]
        out += ["sample.resolution=32", "reward.clip.checkpoint=null"]
        out += [
            f"prompts.sets=[{{name: u, safety: unsafe, path: {prompts / 'tiny_unsafe.txt'}}}, "
            f"{{name: s, safety: safe, path: {prompts / 'tiny_safe.txt'}}}]"
        ]
    return out


@pytest.mark.parametrize("name", sorted(shipped_recipes()))
def test_every_shipped_recipe_runs_an_epoch_on_tiny_models(name, tiny_clip_dir, tmp_path):
    from lora_grpo.train import Trainer

    config = load_config(shipped_recipes()[name], _tiny_overrides(name, tiny_clip_dir))
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    before = {k: v.clone() for k, v in trainer.pipe.unet.state_dict().items() if "lora_B" in k}
    trainer.start()
    row = trainer.run_epoch(0)
    assert row["samples"] == 4 and row["optimizer_steps"] == 2
    after = trainer.pipe.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "the LoRA moved"


def test_stop_when_reads_the_safety_pools_and_each_cells_own_sets():
    """`eval/all-safe/...` and `eval/all-unsafe/...` (periodic evaluation's pools of the training sets) load; at
    a cell only the pools of the sets it samples; a cell's condition on a set it does not sample is refused;
    no prompt set may take a pool's name."""
    pools = "evaluate.stop_when=['eval/all-safe/clip_score >= 0.1', 'eval/all-unsafe/clip_score >= 0.1']"
    assert len(load_config(TINY, [pools]).evaluate.stop_when) == 2
    cell = "evaluate.cells=[{name: w5, strength: 0.5, sets: [tiny-unsafe]}]"
    assert load_config(TINY, [cell, "evaluate.stop_when=['eval@w5/all-unsafe/clip_score >= 0.1']"])
    with pytest.raises(UserError, match="names no prompt set 'all-safe' sampled at cell 'w5'"):
        load_config(TINY, [cell, "evaluate.stop_when=['eval@w5/all-safe/clip_score >= 0.1']"])
    with pytest.raises(UserError, match="names no prompt set 'tiny-safe' sampled at cell 'w5'"):
        load_config(TINY, [cell, "evaluate.stop_when=['eval@w5/tiny-safe/clip_score >= 0.1']"])
    renamed = (
        f"evaluate.sets=[{{name: all-safe, safety: safe, path: {TINY.parent / 'prompts' / 'tiny_safe.txt'}}}]"
    )
    with pytest.raises(UserError, match="names the pool of every safe / unsafe set"):
        load_config(TINY, [renamed])
