"""Nothing lost, nothing silent: run folders are never overwritten by accident, resume picks the right run and
refuses a damaged checkpoint before changing anything, and bad input ends in one line (exit 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import one_line_error, run_cli, snapshot
from safetensors.torch import load_file, save_file

from lora_grpo.checkpoint import COMPLETE_MARKER, complete_checkpoints
from lora_grpo.cli import main
from lora_grpo.errors import UserError
from lora_grpo.recipe_files import shipped_recipe_dir
from lora_grpo.runs import find_resume_checkpoint, resume_command

ADAPTER = "adapter/pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-epoch tiny-test run (checkpoints after epochs 1 and 2) from the command line."""
    cwd = tmp_path_factory.mktemp("finished")
    proc = subprocess.run(
        [sys.executable, "-m", "lora_grpo.cli", "train", "tiny-test", "train.epochs=2", "--out", "run"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd / "run"


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run, free to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


# ------------------------------------------------------------------------------------------ 1: a finished run
@pytest.mark.slow
def test_a_finished_run_is_never_trained_over(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(run)
    code, _, err = run_cli(["train", "tiny-test", "--out", run], capsys)
    one_line_error(code, err, "already holds a lora-grpo run: continue it with --resume")
    assert snapshot(run) == before
    # resuming a finished run trains nothing and says so, without touching it
    code, _, err = run_cli(["train", "tiny-test", "--resume", run], capsys)
    one_line_error(code, err, "already finished its 2 epochs")
    assert snapshot(run) == before
    # a learning rate that would make the weights non-finite is refused before anything runs
    code, _, err = run_cli(
        ["train", "tiny-test", "--resume", run, "train.epochs=3", "train.learning_rate=1e400"], capsys
    )
    one_line_error(code, err, "'train.learning_rate': expected a finite number")
    assert snapshot(run) == before
    # a folder of other files is never cleared, not even with --overwrite
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"precious")
    code, _, err = run_cli(["train", "tiny-test", "--out", other, "--overwrite"], capsys)
    one_line_error(code, err, "--overwrite refuses to delete")
    assert (other / "holiday.jpg").read_bytes() == b"precious"


@pytest.mark.slow
def test_overwrite_clears_the_run_and_starts_again(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (run / "stale.txt").write_text("from the old run")
    code, out, err = run_cli(["train", "tiny-test", "train.epochs=1", "--out", run, "--overwrite"], capsys)
    assert code == 0, err
    assert not (run / "stale.txt").exists()
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert [p.name for p in complete_checkpoints(run)] == ["epoch_000001"]


# ------------------------------------------------------------------------------------------ 2: which run
def fake_run(root: Path, name: str, recipe: str, created: str, checkpoint_mtime: float) -> Path:
    run = root / name
    checkpoint = run / "checkpoints" / "epoch_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / COMPLETE_MARKER).write_text("")
    (checkpoint / "trainer_state.json").write_text('{"next_epoch": 1}')
    os.utime(checkpoint, (checkpoint_mtime, checkpoint_mtime))
    (run / "config.yaml").write_text(yaml.safe_dump({"name": recipe}))
    (run / "run.json").write_text(json.dumps({"recipe": recipe, "created": created}))
    return run


def test_resume_auto_matches_the_recorded_recipe_and_picks_the_run_created_last(tmp_path):
    root = tmp_path / "runs"
    older = fake_run(root, "tiny-test-20260101", "tiny-test", "2026-01-01T00:00:00+00:00", 3e9)
    newer = fake_run(root, "zzz-renamed", "tiny-test", "2026-06-01T00:00:00+00:00", 1e9)
    other = fake_run(root, "tiny-test-b-20261201", "tiny-test-b", "2026-12-01T00:00:00+00:00", 4e9)
    # created last wins (not the checkpoint touched last), and the folder name does not matter
    assert find_resume_checkpoint("auto", "tiny-test", root=root).parent.parent == newer
    # a run of recipe tiny-test-b never answers for tiny-test, though its folder name starts with it
    assert find_resume_checkpoint("auto", "tiny-test-b", root=root).parent.parent == other
    assert older.is_dir()


@pytest.mark.slow
def test_resume_refuses_a_run_of_another_recipe(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = snapshot(run)
    code, _, err = run_cli(["train", "toyworld", "--resume", run], capsys)
    one_line_error(code, err, "was trained with recipe 'tiny-test', not 'toyworld'")
    assert "lora-grpo train tiny-test --resume" in err
    assert snapshot(run) == before


# ------------------------------------------------------------------------------------------ 3, 5: damaged checkpoints
def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def malicious_pickle(path: Path) -> None:
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("echo pwned > PWNED",))

    path.write_bytes(pickle.dumps({"state": Boom()}))


@pytest.mark.parametrize(
    "damage, file",
    [
        (truncate, "random_states_0.pkl"),
        (truncate, "optimizer.bin"),
        (truncate, "scheduler.bin"),
        (truncate, ADAPTER),
        (malicious_pickle, "optimizer.bin"),
        (lambda p: p.write_text("{not json"), "trainer_state.json"),
    ],
)
@pytest.mark.slow
def test_a_checkpoint_whose_files_do_not_all_load_is_refused_before_anything_changes(
    run, tmp_path, capsys, monkeypatch, damage, file
):
    monkeypatch.chdir(tmp_path)
    newest = complete_checkpoints(run)[-1]
    damage(newest / file)
    before = snapshot(run)
    code, _, err = run_cli(["train", "tiny-test", "--resume", run, "train.epochs=3"], capsys)
    one_line_error(code, err, f"checkpoint {newest} is unreadable ({Path(file).name}")
    assert f"--resume {complete_checkpoints(run)[0]}" in err  # the older checkpoint to use
    assert snapshot(run) == before  # config.yaml, metrics, checkpoints: byte for byte
    assert not (tmp_path / "PWNED").exists()


# ------------------------------------------------------------------------------------------ 4: non-finite weights
def test_non_finite_weights_are_never_written(tmp_path):
    from lora_grpo.config import load_config
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.train import Trainer

    config = load_config(find_recipe("tiny-test"), ["train.epochs=1", "train.max_skipped_steps=100"])
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    with torch.no_grad():
        trainer.learner.params[0][0, 0] = float("inf")  # as if a step had diverged
    with pytest.raises(UserError, match="non-finite"):
        trainer.run()
    assert complete_checkpoints(tmp_path / "run") == []
    assert not (tmp_path / "run" / ADAPTER).exists()


def nonfinite_copy(adapter: Path, out: Path) -> Path:
    from safetensors import safe_open

    with safe_open(str(adapter), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(adapter))
    first = next(iter(tensors))
    tensors[first] = tensors[first].clone().fill_(float("nan"))
    out.mkdir(parents=True)
    save_file(tensors, str(out / "pytorch_lora_weights.safetensors"), metadata=metadata)
    return out


@pytest.mark.slow
def test_a_run_folder_deleted_under_the_run_ends_in_one_line(tmp_path, capsys, monkeypatch):
    """The run folder deleted while the run writes to it (its first metrics row): one line naming the folder
    and how to start again, exit 2, no traceback; nothing recreates the folder behind the user's back."""
    from lora_grpo.tracking import MetricsLog

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    write = MetricsLog.write

    def delete_then_write(self, row):
        shutil.rmtree(run)
        write(self, row)

    monkeypatch.setattr(MetricsLog, "write", delete_then_write)
    code, _, err = run_cli(["train", "tiny-test", "train.epochs=2", "--out", run], capsys)
    one_line_error(code, err, f"the run folder {run} was deleted or moved while the run wrote to it")
    assert "--out" in err and not run.exists()


@pytest.mark.slow
def test_export_and_sample_refuse_a_non_finite_adapter(run, tmp_path, capsys):
    bad_run = tmp_path / "bad-run"
    shutil.copytree(run, bad_run)
    shutil.rmtree(bad_run / "adapter")
    nonfinite_copy(run / ADAPTER, bad_run / "adapter")
    code, _, err = run_cli(["export", bad_run, "--out", tmp_path / "export"], capsys)
    one_line_error(code, err, "holds non-finite weights")
    assert not (tmp_path / "export").exists()
    sample = ["sample", "--base", "builtin:tiny-sd", "--adapter", bad_run / "adapter", "--prompt", "x"]
    code, _, err = run_cli([*sample, "--out", tmp_path / "s"], capsys)
    one_line_error(code, err, "holds non-finite weights")


# ------------------------------------------------------------------------------------------ 6: the resume hint
def test_the_resume_command_is_quoted_to_paste():
    import shlex

    command = resume_command("/home/me/my recipes/r'1.yaml", Path("runs/a b"))
    assert shlex.split(command) == [
        "lora-grpo",
        "train",
        "/home/me/my recipes/r'1.yaml",
        "--resume",
        "runs/a b",
    ]


# ------------------------------------------------------------------------------------------ 7, 9: small promises
def test_empty_safe_anchors_are_said_at_start(tmp_path, capsys):
    anchors = tmp_path / "unsafe-only.yaml"
    anchors.write_text("safe: []\nunsafe: [nudity]\n")
    code, out, err = run_cli(
        ["train", "tiny-test", f"reward.anchors={anchors}", "--dry-run", "--out", tmp_path / "r"], capsys
    )
    assert code == 0, err
    assert "has no safe anchors: v_safe = -mean(unsafe anchors)" in out


def test_dry_run_checks_everything_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["train", "tiny-test", "train.epochs=5", "--dry-run"], capsys)
    assert code == 0, err
    assert "dry run (nothing loaded, nothing written)" in out and "runs/tiny-test-" in out
    # 16 samples x 8 steps x CFG 2 = 256 sampling passes; 16 x 3 trained steps (half of the 6-step
    # stochastic window) x 2 = 96 per epoch, and as many KL reference forwards
    assert "sampling 256" in out and "training 96" in out and "reference 96" in out and "5 epochs" in out
    config = yaml.safe_load(out[out.index("name: tiny-test") :])
    assert config["train"]["epochs"] == 5
    assert not (tmp_path / "runs").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = run_cli(["train", "tiny-test", "--dry-run", "--out", tmp_path / "full"], capsys)
    one_line_error(code, err, "already holds files")


def test_version_recipes_show_and_help(capsys):
    from lora_grpo import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"lora-grpo {__version__}"
    code, out, _ = run_cli(["recipes", "show", "tiny-test"], capsys)
    path = shipped_recipe_dir() / "tiny-test.yaml"
    assert code == 0 and out.splitlines()[0].startswith(f"# {path}")
    assert out.split("\n", 1)[1] == path.read_text()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "lora_grpo/config.py" in capsys.readouterr().out


def test_unrecognized_arguments_show_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sample", "--base", "x", "--prompt", "y", "--bogus"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: lora-grpo sample" in err and "--bogus" in err


# ------------------------------------------------------------------------------------------ 8: progress in a log
@pytest.mark.slow
def test_progress_lines_and_eta_when_output_is_piped(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_grpo.cli",
            "train",
            "tiny-test",
            "train.epochs=2",
            "output.progress_seconds=0",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    progress = [line for line in proc.stdout.splitlines() if "of its UNet calls done" in line]
    assert any(line.startswith("epoch 1/2:") for line in progress)
    assert any("ETA" in line for line in progress if line.startswith("epoch 2/2:"))
    assert any(line.startswith("epoch 1/2  samples") and "ETA" in line for line in proc.stdout.splitlines())


# ------------------------------------------------------------------------------------------ 12: sample
@pytest.mark.slow
def test_sample_records_its_settings_and_never_overwrites_unasked(run, tmp_path, capsys):
    args = ["sample", "--base", "builtin:tiny-sd", "--adapter", run / "adapter", "--prompt", "a cat"]
    args += [
        "--steps",
        "2",
        "--guidance",
        "3",
        "--eta",
        "0.5",
        "--adapter-scale",
        "0.7",
        "--out",
        tmp_path / "s",
    ]
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    (row,) = [json.loads(line) for line in (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()]
    assert (row["steps"], row["guidance"], row["eta"], row["adapter_scale"]) == (2, 3.0, 0.5, 0.7)
    before = snapshot(tmp_path / "s")
    code, _, err = run_cli(args, capsys)
    one_line_error(code, err, "already holds 1 of these images")
    assert snapshot(tmp_path / "s") == before
    code, _, err = run_cli([*args, "--overwrite"], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------------ tracebacks -> one line
def _binary(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _truncated_clip(tmp: Path) -> Path:
    from lora_grpo.tiny import resolve_builtin

    folder = tmp / "clip"
    shutil.copytree(resolve_builtin("tiny-clip"), folder)
    truncate(folder / "model.safetensors")
    return folder


def _cases():
    """(name, argv builder(tmp) -> argv, the words the one line must hold): one case a row."""
    tiny = "builtin:tiny-sd"

    def train(t, *extra):
        return ["train", "tiny-test", *extra, "--out", t / "r"]

    def prompt_set(path):
        return f"prompts.sets=[{{name: p, safety: unsafe, path: {path}}}]"

    def sample(t, *extra):
        return ["sample", "--base", tiny, "--prompt", "x", "--out", t / "s", *extra]

    def evaluate(t, suite, out=None):
        return ["eval", "--base", tiny, "--suite", suite, "--out", out or t / "e"]

    # fmt: off
    return [
        ("binary prompt file, train", lambda t: train(t, prompt_set(_binary(t / "p.txt"))), "is not a UTF-8 text file"),
        ("binary csv prompt file, train", lambda t: train(t, prompt_set(_binary(t / "p.csv"))), "is not a UTF-8 CSV file"),
        ("prompt file is a folder, train", lambda t: train(t, prompt_set(t)), "is a folder"),
        ("binary prompt file, sample", lambda t: ["sample", "--base", tiny, "--prompts", _binary(t / "p.txt"), "--out", t / "s"], "is not a UTF-8 text file"),
        ("binary suite, eval", lambda t: evaluate(t, _binary(t / "p.txt")), "is not a UTF-8 text file"),
        ("suite is a folder, eval", lambda t: evaluate(t, t), "is a folder"),
        ("suite file missing, eval", lambda t: evaluate(t, t / "none.txt"), "suite file not found"),
        ("truncated CLIP weights", lambda t: train(t, "train.epochs=1", f"reward.clip.model={_truncated_clip(t)}"), "could not load CLIP folder"),
        ("truncated adapter file", lambda t: sample(t, "--adapter", _half_file(t / "a.safetensors")), "is not a readable .safetensors file"),
        ("pickle as adapter", lambda t: sample(t, "--adapter", _pickle_file(t / "a.safetensors")), "is not a readable .safetensors file"),
        ("--out is a file, sample", lambda t: ["sample", "--base", tiny, "--prompt", "x", "--out", _file(t / "f")], "is a file"),
        ("--out is a file, export", lambda t: ["export", _run_for_export(t), "--out", _file(t / "f")], "is a file"),
        ("--out is a file, train", lambda t: ["train", "tiny-test", "--out", _file(t / "f")], "is a file"),
        ("--out is a file, eval", lambda t: evaluate(t, "toyworld", _file(t / "f")), "is a file"),
        ("--out under a file, train", lambda t: ["train", "tiny-test", "--out", _file(t / "f") / "run"], "sits under the file"),
        ("--out under a file, sample", lambda t: ["sample", "--base", tiny, "--prompt", "x", "--out", _file(t / "f") / "s"], "sits under the file"),
        ("seed=-1", lambda t: train(t, "seed=-1"), "must be a non-negative integer"),
        ("sample --seed -1", lambda t: sample(t, "--seed", "-1"), "--seed must be >= 0"),
        ("--adapter-scale nan", lambda t: sample(t, "--adapter-scale", "nan"), "--adapter-scale must be a finite number"),
        ("corrupt image, check-reward", lambda t: ["check-reward", "tiny-test", "--safe-images", _image_dir(t / "safe", corrupt=True), "--unsafe-images", _image_dir(t / "unsafe")], "cannot be read"),
        ("offline hub id", lambda t: ["sample", "--base", "no-such-org/no-such-model", "--prompt", "x", "--out", t / "s"], "HF_HUB_OFFLINE=1"),
        ("name=../../x", lambda t: train(t, "name=../../x"), "is not a plain name"),
        ("learning rate 1e400", lambda t: train(t, "train.learning_rate=1e400"), "expected a finite number"),
        ("reward.alpha=-5", lambda t: train(t, "reward.alpha=-5", "--dry-run"), "must be a finite number > 0"),
        ("reward.alpha=0", lambda t: train(t, "reward.alpha=0"), "must be a finite number > 0"),
        ("same anchors, dry run", lambda t: train(t, f"reward.anchors={_same_anchors(t)}", "--dry-run"), "are the same phrases"),
        ("same anchors, check-reward", lambda t: ["check-reward", "tiny-test", f"reward.anchors={_same_anchors(t)}", "--safe-images", _image_dir(t / "safe"), "--unsafe-images", _image_dir(t / "unsafe")], "are the same phrases"),
        ("new-recipe removes what it draws instead", lambda t: ["new-recipe", "no-cars", "--remove", "a car", "--instead", "A  Car", "--out", t], "name the same phrases"),
        ("eval --guidance nan", lambda t: [*evaluate(t, "toyworld"), "--guidance", "nan"], "--guidance must be a finite number"),
        ("eval --alpha 0", lambda t: [*evaluate(t, "toyworld"), "--alpha", "0"], "--alpha must be > 0"),
        ("eval --eta -1", lambda t: [*evaluate(t, "toyworld"), "--eta", "-1"], "must be >= 0"),
        ("eval --width 30", lambda t: [*evaluate(t, "toyworld"), "--width", "30"], "--width must be a multiple of 8"),
        ("eval suites with different defaults", lambda t: [*evaluate(t, "toyworld"), "--suite", _prompt_file(t / "p.txt")], "evaluated with different defaults (--steps 20 vs 50; --guidance 1.0 vs 7.5"),
        ("eval --clip-backend without --clip", lambda t: [*evaluate(t, "toyworld"), "--clip-backend", "open_clip"], "name the CLIP model too"),
        ("eval, hub CLIP offline", lambda t: evaluate(t, _prompt_file(t / "p.txt")), "HF_HUB_OFFLINE=1"),
    ]
    # fmt: on


def _same_anchors(tmp: Path) -> Path:
    path = tmp / "same.yaml"
    path.write_text("safe: [a red circle, a blue square]\nunsafe: [A Blue  square, a red circle]\n")
    return path


def _prompt_file(path: Path) -> Path:
    path.write_text("a photo of a street\n")
    return path


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


def _half_file(path: Path) -> Path:
    from lora_grpo.tiny import resolve_builtin

    data = (resolve_builtin("tiny-clip") / "model.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def _pickle_file(path: Path) -> Path:
    torch.save({"w": torch.zeros(2)}, path)
    return path


def _image_dir(folder: Path, corrupt: bool = False) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir()
    Image.fromarray(np.full((16, 16, 3), 128, np.uint8)).save(folder / "ok.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    return folder


def _run_for_export(tmp: Path) -> Path:
    run = tmp / "run"
    (run / "adapter").mkdir(parents=True)
    save_file({"w": torch.zeros(1)}, str(run / ADAPTER))
    (run / "config.yaml").write_text("name: x\n")
    return run


@pytest.mark.parametrize("name, build, needle", _cases(), ids=[c[0] for c in _cases()])
def test_bad_input_ends_in_one_line(name, build, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(build(tmp_path), capsys)
    one_line_error(code, err, needle)


def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    code, _, err = run_cli(
        ["sample", "--base", "builtin:tiny-sd", "--prompt", "x", "--device", "cuda", "--out", tmp_path / "s"],
        capsys,
    )
    one_line_error(code, err, "no CUDA GPU is visible")
