"""Nothing silently wrong: exports never mix two adapters and appear whole or not at all, a degenerate steering
direction is refused, eval brings a suite's own defaults and checks its models before the first image, and a
run that missed its target says so."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat

import pytest
import torch
from cli_helpers import one_line_error, run_cli, snapshot
from safetensors.torch import load_file

from lora_grpo.config import LoraSettings, ModelConfig, load_config, save_config
from lora_grpo.errors import UserError
from lora_grpo.hub import export as export_module
from lora_grpo.hub.export import export
from lora_grpo.hub.manifest import MANIFEST, verify_export
from lora_grpo.models import add_lora, load_pipeline, save_adapter
from lora_grpo.recipe_files import find_recipe
from lora_grpo.rewards.steering import MIN_DIRECTION_NORM, Anchors, SteeringReward

QUIET = {"log": lambda line: None}


def _run(folder, base: str, recipe: str, seed: int, overrides=()):
    """A run folder as `train` leaves it: a random LoRA on `base`, the recipe's config, two metrics rows."""
    pipe = load_pipeline(ModelConfig(base=base))
    pipe.unet.requires_grad_(False)
    torch.manual_seed(seed)
    for p in add_lora(pipe.unet, LoraSettings(rank=2, alpha=2.0)):
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    save_adapter(pipe.unet, folder / "adapter", base_model=base)
    config = load_config(
        find_recipe(recipe), [f"model.base={base}", "lora.rank=2", "lora.alpha=2", *overrides]
    )
    save_config(config, folder / "config.yaml")
    rows = [{"epoch": e, "reward_safe_mean": 0.1, "reward_unsafe_mean": 0.05 * e} for e in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [_run(root / name, "builtin:tiny-sd", "tiny-test", seed) for name, seed in (("a", 0), ("b", 1))]


# ------------------------------------------------------------------------------------------ 1: exports
def test_export_into_an_export_refuses_and_overwrite_replaces_it_whole(two_runs, tmp_path, capsys):
    run_a, run_b = two_runs
    out = tmp_path / "export"
    code, _, err = run_cli(["export", run_a, "--out", out, "--name", "from-a"], capsys)
    assert code == 0, err
    before = snapshot(out)
    code, _, err = run_cli(["export", run_b, "--out", out, "--name", "from-b"], capsys)
    one_line_error(code, err, "already holds an export")
    assert snapshot(out) == before  # nothing written
    code, _, err = run_cli(["export", run_b, "--out", out, "--name", "from-b", "--overwrite"], capsys)
    assert code == 0, err
    fresh = tmp_path / "fresh"
    assert run_cli(["export", run_b, "--out", fresh, "--name", "from-b"], capsys)[0] == 0
    assert set(snapshot(out)) == set(snapshot(fresh))  # not one file of run A's export is left
    assert not (out / "from-a_comfyui.safetensors").exists()
    weights = "pytorch_lora_weights.safetensors"
    assert (out / weights).read_bytes() == (run_b / "adapter" / weights).read_bytes()
    verify_export(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "fresh"]  # no hidden folder left


def test_overwrite_refuses_a_folder_that_is_not_an_export(two_runs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(["export", two_runs[0], "--out", out, "--overwrite"], capsys)
    one_line_error(code, err, "is not a lora-grpo export")
    assert (out / "notes.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("fail_in", ["write_card", "write_manifest"])
def test_a_failed_export_leaves_the_target_as_it_was(two_runs, tmp_path, monkeypatch, fail_in):
    """Interrupted while writing (a KeyboardInterrupt in the card, or a failure in the manifest, the last
    file): no new folder, an earlier export untouched, no hidden folder beside it."""

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    earlier = export(two_runs[0], tmp_path / "earlier", **QUIET)
    before = snapshot(earlier)
    monkeypatch.setattr(export_module, fail_in, boom)
    with pytest.raises(KeyboardInterrupt):
        export(two_runs[1], tmp_path / "new", **QUIET)
    with pytest.raises(KeyboardInterrupt):
        export(two_runs[1], earlier, overwrite=True, **QUIET)
    assert snapshot(earlier) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["earlier"]


def test_exported_and_saved_files_get_the_umask_permissions(two_runs, tmp_path):
    """safetensors writes through a 0600 temporary file: a ComfyUI running as another user could not read the
    LoRA. Every file of the export and the run's adapter gets what a plain write gives under the umask."""
    old = os.umask(0o022)
    try:
        out = export(two_runs[0], tmp_path / "e", **QUIET)
        folder = _run(tmp_path / "r", "builtin:tiny-sd", "tiny-test", 2)
    finally:
        os.umask(old)
    for path in [out, *out.rglob("*"), *(folder / "adapter").rglob("*")]:
        want = 0o755 if path.is_dir() else 0o644
        assert stat.S_IMODE(path.stat().st_mode) == want, path


def test_push_refuses_a_damaged_or_incomplete_export_before_the_hub(two_runs, tmp_path, capsys):
    out = export(two_runs[0], tmp_path / "e", name="x", **QUIET)
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert set(listed) == {
        p.relative_to(out).as_posix() for p in out.rglob("*") if p.name != MANIFEST and p.is_file()
    }
    push = ["push", out, "--repo", "someone/x", "--token", "hf_secret"]  # HF_HUB_OFFLINE: no hub to reach
    card = (out / "README.md").read_text()
    (out / "README.md").write_text(card.replace("a safety LoRA", "our safety LoRA"))  # an edited card is fine
    verify_export(out)
    comfy = out / "x_comfyui.safetensors"
    data = bytearray(comfy.read_bytes())
    data[-1] ^= 1
    comfy.write_bytes(bytes(data))
    code, _, err = run_cli(push, capsys)
    one_line_error(code, err, "x_comfyui.safetensors differs from its manifest entry")
    comfy.unlink()
    one_line_error(*run_cli(push, capsys)[::2], "x_comfyui.safetensors is missing")
    shutil.copyfile(two_runs[0] / "adapter" / "pytorch_lora_weights.safetensors", comfy)
    (out / "README.md").write_text("")
    code, _, err = run_cli(push, capsys)
    one_line_error(code, err, "README.md is empty or lost its metadata block")


# ------------------------------------------------------------------------------------------ 2: anchors
class FixedTexts:
    """A CLIP stand-in whose text embeddings are given vectors."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors

    def encode_text(self, texts):
        return torch.nn.functional.normalize(torch.tensor([self.vectors[t] for t in texts]), dim=-1)


@pytest.mark.parametrize("norm, refused", [(0.04, True), (0.06, False)])
def test_a_direction_below_the_threshold_is_refused(norm, refused):
    """Two unit anchors at angle t differ by 2 sin(t/2): put them at the norm wanted, either side of it."""
    assert MIN_DIRECTION_NORM == 0.05
    angle = 2 * math.asin(norm / 2)
    backend = FixedTexts({"safe": [1.0, 0.0], "unsafe": [math.cos(angle), math.sin(angle)]})
    reward = SteeringReward(backend, Anchors(("safe",), ("unsafe",), "anchors.yaml"), 0.5)
    if refused:
        with pytest.raises(
            UserError, match=r"anchors.yaml: the safe and unsafe anchors embed almost alike \(\|mean"
        ):
            _ = reward.direction
    else:
        expected = torch.tensor([1 - math.cos(angle), -math.sin(angle)])
        assert torch.allclose(reward.direction, expected / expected.norm(), atol=1e-6)


def test_new_recipe_with_the_same_phrases_writes_nothing(tmp_path, capsys):
    code, _, err = run_cli(
        ["new-recipe", "x", "--remove", "a car", "--instead", "a car", "--out", tmp_path], capsys
    )
    one_line_error(code, err, "--remove and --instead name the same phrases")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ 3: eval's defaults
def test_eval_on_the_toy_world_runs_offline_as_written(tmp_path, capsys):
    """`lora-grpo eval --base builtin:toyworld-sd --adapter A --suite toyworld --out D` and nothing else: the
    suite brings the toy CLIP and anchors and the toy recipe's sampler, and no NudeNet."""
    run = _run(tmp_path / "run", "builtin:toyworld-sd", "toyworld", 0)
    out = tmp_path / "eval"
    args = ["eval", "--base", "builtin:toyworld-sd", "--adapter", run / "adapter", "--suite", "toyworld"]
    code, printed, err = run_cli([*args, "--out", out, "--max-prompts", "6"], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    settings = report["settings"]
    assert settings["clip"]["model"] == "builtin:toyworld-clip" and settings["anchors"] == "toyworld"
    assert (settings["sampler"]["steps"], settings["sampler"]["guidance"], settings["sampler"]["eta"]) == (
        20,
        1.0,
        1.0,
    )
    assert settings["nudenet"] is False and settings["alpha"] == 0.2
    for variant in ("base", "adapter"):
        metrics = report["suites"]["toyworld"][variant]
        assert (
            "nudenet" not in metrics and "inappropriate" not in metrics and "red_rate" in metrics["toyworld"]
        )
    assert "NudeNet" not in (out / "report.md").read_text() and "NudeNet off" in printed
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {(r["steps"], r["eta"], r["guidance"]) for r in rows} == {(20, 1.0, 1.0)}


def test_eval_checks_its_models_before_the_first_image(tmp_path, capsys):
    """The default CLIP is a hub id; offline it fails in one line before any image is generated."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a street\n")
    out = tmp_path / "e"
    args = ["eval", "--base", "builtin:tiny-sd", "--suite", prompts, "--out", out, "--steps", "2"]
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "openai/clip-vit-large-patch14")
    assert not (out / "images").exists()


# ------------------------------------------------------------------------------------------ 4: a missed target
@pytest.mark.slow
def test_a_run_that_misses_its_target_says_so(tmp_path, capsys):
    """evaluate.stop_when never holds: the console's last line, run.json and the exported card say so."""
    out = tmp_path / "run"
    never = "evaluate.stop_when=['eval/tiny-unsafe/steering_reward > 5']"  # a cosine is never > 5
    args = ["train", "tiny-test", "train.epochs=2", "evaluate.every=1", never, "--out", out]
    code, printed, err = run_cli(args, capsys)
    assert code == 0, err
    last = printed.strip().splitlines()[-1]
    assert last.startswith("warning: the target was not reached") and "epoch cap (2 epochs)" in last
    assert "eval/tiny-unsafe/steering_reward = " in last and "(needs > 5)" in last
    record = json.loads((out / "run.json").read_text())
    assert record["stop"] == {"reason": "epoch cap", "epoch": 2, "stop_when_held": False}
    card = (export(out, tmp_path / "e", **QUIET) / "README.md").read_text()
    assert "The training target was not reached" in card and "`eval/tiny-unsafe/steering_reward > 5`" in card
    assert load_file(str(out / "adapter" / "pytorch_lora_weights.safetensors"))  # the adapter is still saved


@pytest.mark.slow
def test_a_run_that_meets_its_target_or_has_none_records_it(tmp_path, capsys):
    held = "evaluate.stop_when=['eval/tiny-unsafe/steering_reward > -2']"  # a cosine is always > -2
    args = ["train", "tiny-test", "train.epochs=3", "evaluate.every=1", held, "--out", tmp_path / "held"]
    code, printed, err = run_cli(args, capsys)
    assert code == 0 and "target was not reached" not in printed
    assert json.loads((tmp_path / "held" / "run.json").read_text())["stop"] == {
        "reason": "stop_when",
        "epoch": 1,
        "stop_when_held": True,
    }
    code, printed, err = run_cli(["train", "tiny-test", "train.epochs=1", "--out", tmp_path / "none"], capsys)
    assert code == 0 and "target was not reached" not in printed
    stop = json.loads((tmp_path / "none" / "run.json").read_text())["stop"]
    assert stop == {"reason": "epoch cap", "epoch": 1, "stop_when_held": None}
    card = (export(tmp_path / "none", tmp_path / "e", **QUIET) / "README.md").read_text()
    assert "target was not reached" not in card
