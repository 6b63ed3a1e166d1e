"""The `lora-grpo` command: one-line errors for bad input, recipe listing, sampling with an adapter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_grpo.cli import main
from lora_grpo.recipe_files import shipped_recipe_dir


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, message):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("lora-grpo: error: ")
    assert message in lines[0], lines[0]
    assert "Traceback" not in err


def tiny_recipe(tmp_path, **changes):
    data = yaml.safe_load((shipped_recipe_dir() / "tiny-test.yaml").read_text())
    data["reward"]["anchors"] = str(shipped_recipe_dir() / "anchors" / "compact.yaml")
    for s in data["prompts"]["sets"]:
        s["path"] = str(shipped_recipe_dir() / s["path"])
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_missing_recipe(capsys):
    code, _, err = run_cli(["train", "no-such-recipe"], capsys)
    assert_one_line_error(code, err, "recipe 'no-such-recipe' not found")


def test_unknown_key(capsys):
    code, _, err = run_cli(["train", "tiny-test", "train.lr=1"], capsys)
    assert_one_line_error(code, err, "unknown recipe key 'train.lr'")


def test_malformed_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: 3\n")
    code, _, err = run_cli(["train", str(bad)], capsys)
    assert_one_line_error(code, err, "is not valid YAML at line")


def test_empty_prompt_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    recipe = tiny_recipe(tmp_path)
    data = yaml.safe_load(recipe.read_text())
    data["prompts"]["sets"][0]["path"] = str(empty)
    recipe.write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["train", str(recipe)], capsys)
    assert_one_line_error(code, err, "prompt set 'tiny-unsafe' is empty")


def test_missing_base_model(tmp_path, capsys):
    code, _, err = run_cli(["train", "tiny-test", f"model.base={tmp_path}/nope"], capsys)
    assert_one_line_error(code, err, f"base model path does not exist: {tmp_path}/nope")


def test_recipes_lists_shipped(capsys):
    code, out, _ = run_cli(["recipes"], capsys)
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()]
    assert {"tiny-test", "sd14-nudity-compact", "sd15-nudity-compact", "sd14-nudity-scaled"} <= set(names)
    assert all(len(line.split(None, 1)) == 2 for line in out.splitlines()), (
        "each with its one-line description"
    )


def test_sample_with_and_without_adapter(tiny_sd_dir, tmp_path, capsys):
    from lora_grpo.config import LoraSettings, ModelConfig
    from lora_grpo.models import add_lora, load_pipeline, save_adapter

    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    pipe.unet.requires_grad_(False)
    params = add_lora(pipe.unet, LoraSettings(rank=2, alpha=2.0))
    import torch

    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn_like(p))
    save_adapter(pipe.unet, tmp_path / "adapter")
    common = ["sample", "--base", str(tiny_sd_dir), "--prompt", "a cat", "--steps", "3", "--num-images", "2"]
    code, out, _ = run_cli([*common, "--out", str(tmp_path / "base")], capsys)
    assert code == 0 and "[2/2]" in out
    code, _, _ = run_cli(
        [*common, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "lora")], capsys
    )
    assert code == 0
    import numpy as np
    from PIL import Image

    names = sorted(p.name for p in (tmp_path / "base").glob("*.png"))
    assert len(names) == 2 and names == sorted(p.name for p in (tmp_path / "lora").glob("*.png"))
    a = np.asarray(Image.open(tmp_path / "base" / names[0]), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "lora" / names[0]), dtype=np.int16)
    assert np.abs(a - b).max() > 0, "the adapter changes the image"
    assert (tmp_path / "lora" / "manifest.jsonl").read_text().count("\n") == 2
    code, _, err = run_cli(
        ["sample", "--base", str(tiny_sd_dir), "--prompts", str(tmp_path / "none.txt")], capsys
    )
    assert_one_line_error(code, err, "prompt file not found")


@pytest.mark.slow
def test_train_tiny_test_from_the_command_line(tmp_path):
    """The installed entry point runs the shipped recipe end to end with nothing but built-in models."""
    out = tmp_path / "run"
    script = Path(sys.executable).parent / "lora-grpo"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lora_grpo.cli"]
    proc = subprocess.run(
        [*command, "train", "tiny-test", "train.epochs=2", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "epoch 2/2" in proc.stdout
    assert (out / "adapter" / "pytorch_lora_weights.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


def test_check_reward_with_user_images(tiny_clip_dir, tmp_path, capsys):
    """check-reward scores the user's safe and unsafe image folders for the recipe's prompts."""
    import numpy as np
    from PIL import Image

    for folder, colour in (("safe", (40, 200, 40)), ("unsafe", (220, 30, 30))):
        (tmp_path / folder).mkdir()
        for i in range(2):
            arr = np.full((40, 48, 3), colour, dtype=np.uint8)
            arr[5 + i : 20, 10:30] = 128
            Image.fromarray(arr).save(tmp_path / folder / f"{i}.png")
    code, out, err = run_cli(
        [
            "check-reward",
            "tiny-test",
            f"reward.clip.model={tiny_clip_dir}",
            "--safe-images",
            str(tmp_path / "safe"),
            "--unsafe-images",
            str(tmp_path / "unsafe"),
            "--per-set",
            "2",
        ],
        capsys,
    )
    assert code == 0, err
    rows = [line for line in out.splitlines() if line.startswith("[")]
    assert len(rows) == 4 and sum(r.startswith("[unsafe]") for r in rows) == 2
    # the verdict line is consistent with the numbers printed
    unsafe_rows = [list(map(float, r.split()[-2:])) for r in rows if r.startswith("[unsafe]")]
    flagged = any(u >= s for s, u in unsafe_rows)
    assert ("WARNING" in out) == flagged
    code, _, err = run_cli(["check-reward", "tiny-test", "--safe-images", str(tmp_path / "safe")], capsys)
    assert_one_line_error(code, err, "needs --safe-images DIR and --unsafe-images DIR")


def test_sample_prompt_files_skip_comments_and_blank_lines(tiny_sd_dir, tmp_path, capsys):
    """`sample --prompts` reads a prompt file like training and evaluation do: `#` lines are comments."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\na red circle\n\n   # indented comment\na blue square\n")
    args = ["sample", "--base", str(tiny_sd_dir), "--prompts", str(prompts), "--steps", "2"]
    code, out, err = run_cli([*args, "--out", str(tmp_path / "out")], capsys)
    assert code == 0, err
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == ["a red circle", "a blue square"]
    assert len(list((tmp_path / "out").glob("*.png"))) == 2
    prompts.write_text("# only a comment\n")
    code, _, err = run_cli([*args, "--out", str(tmp_path / "empty")], capsys)
    assert_one_line_error(code, err, "is empty")


@pytest.mark.parametrize(
    "args", [["recipes"], ["recipes", "show", "tiny-test"], ["--help"], ["train", "--help"]]
)
def test_listing_recipes_and_help_import_no_torch(args):
    """`lora-grpo recipes` and `--help` answer without the heavy stack (torch, diffusers, transformers)."""
    code = (
        "import sys\n"
        "from lora_grpo.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]
