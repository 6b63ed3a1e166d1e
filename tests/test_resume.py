"""Exact resume, atomic checkpoints, graceful stop and non-finite values (scale and reliability issue)."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import train_process
from safetensors.torch import load_file

from lora_grpo.checkpoint import COMPLETE_MARKER, complete_checkpoints, read_trainer_state
from lora_grpo.config import load_config
from lora_grpo.errors import UserError
from lora_grpo.recipe_files import find_recipe
from lora_grpo.rewards import build_reward
from lora_grpo.runs import find_resume_checkpoint
from lora_grpo.train import Trainer

ADAPTER = "adapter/pytorch_lora_weights.safetensors"


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared:\n{proc.stdout.read()}"
        assert time.monotonic() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a)), load_file(str(b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """tiny-test from the CLI, start to finish (it checkpoints every epoch and runs 3)."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    proc = train_process(cwd, "--out", "runs/full")
    out = _finish(proc)
    assert proc.returncode == 0, out
    return cwd / "runs/full"


@pytest.mark.slow
def test_tiny_test_checkpoints_every_epoch_and_keeps_the_last_k(uninterrupted):
    kept = complete_checkpoints(uninterrupted)
    assert [p.name for p in kept] == ["epoch_000002", "epoch_000003"]  # keep_checkpoints: 2 of 3
    for path in kept:
        assert (path / COMPLETE_MARKER).is_file()
        assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json"} <= {
            p.name for p in path.iterdir()
        }
        # only the LoRA is stored, never the frozen UNet
        assert not list(path.glob("model*.safetensors"))
    assert read_trainer_state(kept[-1])["next_epoch"] == 3
    # the last checkpoint's LoRA is the final adapter
    assert _same_weights(kept[-1] / ADAPTER, uninterrupted / ADAPTER)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(uninterrupted, tmp_path):
    proc = train_process(tmp_path)  # default run dir runs/tiny-test-<time>, found again by --resume auto
    _wait_for_glob(tmp_path, "runs/tiny-test-*/checkpoints/epoch_000001/COMPLETE", proc)
    run_dir = next(tmp_path.glob("runs/tiny-test-*"))
    # kill while epoch 2 is under way: its progress shows as sample grids being written after sampling
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / ADAPTER).exists(), "the run finished before it could be killed"
    # an interrupted save leaves a folder without its marker: --resume auto must ignore it
    fake = run_dir / "checkpoints" / "epoch_000009"
    fake.mkdir()
    (fake / "trainer_state.json").write_text('{"next_epoch": 9}')

    resumed = train_process(tmp_path, "--resume", "auto")
    out = _finish(resumed)
    assert resumed.returncode == 0, out
    assert "resumed from" in out and "epoch_000009" not in out
    assert _same_weights(run_dir / ADAPTER, uninterrupted / ADAPTER)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]  # the killed epoch's row (if any) was replaced, not duplicated


def _wait_for_glob(root: Path, pattern: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.monotonic()
    while not list(root.glob(pattern)):
        assert proc.poll() is None, f"run ended early:\n{proc.stdout.read()}"
        assert time.monotonic() - start < timeout, f"{pattern} did not appear"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigterm_checkpoints_the_epoch_and_exits(uninterrupted, tmp_path):
    # checkpoints only at the end, so the checkpoint after epoch 1 can only come from the SIGTERM
    proc = train_process(tmp_path, "--out", "run", "output.checkpoint_every=0")
    _wait_for(tmp_path / "run" / "metrics.jsonl", proc)  # epoch 1 finished; epoch 2 is running
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc)
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "SIGTERM received" in out and "--resume" in out
    saved = complete_checkpoints(tmp_path / "run")
    # the signal lands in epoch 2, or (on a slow machine) just before epoch 1's stop check: one checkpoint
    # at that epoch boundary either way, and none at the end of training
    assert len(saved) == 1 and read_trainer_state(saved[0])["next_epoch"] in (1, 2), saved
    assert not (tmp_path / "run" / ADAPTER).exists()
    stop = json.loads((tmp_path / "run" / "run.json").read_text())["stop"]
    assert stop == {
        "reason": "signal",
        "epoch": read_trainer_state(saved[0])["next_epoch"],
        "stop_when_held": None,
    }
    # the printed command works as pasted
    command = shlex.split(out.split("continue with `", 1)[1].split("`", 1)[0])
    assert command[:2] == ["lora-grpo", "train"] and "--resume" in command
    resumed = subprocess.Popen(
        [sys.executable, "-m", "lora_grpo.cli", *command[1:]],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = _finish(resumed)
    assert resumed.returncode == 0, out
    assert _same_weights(tmp_path / "run" / ADAPTER, uninterrupted / ADAPTER)
    stop = json.loads((tmp_path / "run" / "run.json").read_text())["stop"]
    assert stop["reason"] == "epoch cap"  # the resumed run's own end replaces the signal's record


def test_resume_auto_without_a_run_is_one_line(tmp_path):
    with pytest.raises(UserError, match="no run of recipe 'tiny-test'"):
        find_resume_checkpoint("auto", "tiny-test", root=tmp_path / "runs")
    incomplete = tmp_path / "runs" / "tiny-test-1" / "checkpoints" / "epoch_000001"
    incomplete.mkdir(parents=True)
    (incomplete / "trainer_state.json").write_text("{}")
    with pytest.raises(UserError, match="no run of recipe"):
        find_resume_checkpoint("auto", "tiny-test", root=tmp_path / "runs")
    with pytest.raises(UserError, match="no COMPLETE marker"):
        find_resume_checkpoint(str(incomplete), "tiny-test")
    proc = subprocess.run(
        [sys.executable, "-m", "lora_grpo.cli", "train", "tiny-test", "--resume", "auto"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ in process
def _trainer(run_dir: Path, *overrides: str, **seams) -> Trainer:
    config = load_config(find_recipe("tiny-test"), list(overrides))
    return Trainer(config, run_dir, log=lambda line: None, **seams)


def test_8bit_optimizer_state_round_trips_through_a_checkpoint(tmp_path):
    from accelerate.state import AcceleratorState

    trainer = _trainer(tmp_path / "run")
    trainer.start()
    trainer.run_epoch(0)
    path = trainer.checkpoint(1)
    saved = [_copy_state(trainer.learner.optimizer.state[p]) for p in trainer.learner.params]
    lora = [p.detach().clone() for p in trainer.learner.params]
    AcceleratorState._reset_state()

    fresh = _trainer(tmp_path / "run")
    assert fresh.resume(path) == 1
    for i, p in enumerate(fresh.learner.params):
        state = fresh.learner.optimizer.state[p]
        assert state["state1"].dtype == torch.uint8  # still 8-bit after loading
        assert saved[i].keys() == state.keys()
        assert _copy_state(state).keys() == saved[i].keys()
        for k, v in _copy_state(state).items():
            assert torch.equal(v, saved[i][k]) if isinstance(v, torch.Tensor) else v == saved[i][k]
        assert torch.equal(lora[i], p.detach())


def _copy_state(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


class _NanReward:
    """Wraps a reward: NaN for the first group of every batch (groups=1) or for everything (groups=None)."""

    def __init__(self, inner, group_size: int, from_call: int, groups: int | None):
        self.inner, self.group_size, self.from_call, self.groups = inner, group_size, from_call, groups
        self.calls = 0

    def __call__(self, images, prompts):
        rewards = self.inner(images, prompts).clone()
        self.calls += 1
        if self.calls > self.from_call:
            if self.groups is None:
                rewards[:] = float("nan")
            else:
                rewards[: self.groups * self.group_size] = float("nan")
        return rewards


def test_a_nan_group_is_skipped_and_counted_while_the_rest_trains(tmp_path):
    config = load_config(find_recipe("tiny-test"))
    nan_reward = _NanReward(build_reward(config.reward), config.sample.group_size, 0, groups=1)
    trainer = _trainer(tmp_path / "run", reward_fn=nan_reward)
    before = [p.detach().clone() for p in trainer.learner.params]
    trainer.start()
    row = trainer.run_epoch(0)
    batches = trainer.config.sample.batches_per_epoch
    assert row["nonfinite_reward_groups"] == batches  # one group per batch
    assert row["optimizer_steps"] > 0 and trainer.skips.total == 0
    assert all(torch.isfinite(p).all() for p in trainer.learner.params)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainer.learner.params, strict=True))
    assert row["reward_mean"] == row["reward_mean"]  # logged over the finite rewards: not NaN


@pytest.mark.slow
def test_all_nan_rewards_stop_with_the_last_good_checkpoint_intact(tmp_path):
    config = load_config(find_recipe("tiny-test"))
    batches = config.sample.batches_per_epoch
    nan_reward = _NanReward(build_reward(config.reward), config.sample.group_size, batches, groups=None)
    trainer = _trainer(tmp_path / "run", "train.epochs=5", "train.max_skipped_steps=3", reward_fn=nan_reward)
    with pytest.raises(UserError, match=r"optimizer steps in a row were skipped.*epoch_000001"):
        trainer.run()
    kept = complete_checkpoints(tmp_path / "run")
    assert [p.name for p in kept] == ["epoch_000001"]  # epochs 2 and 3 changed nothing and saved nothing
    good = load_file(str(kept[0] / ADAPTER))
    from lora_grpo.models import lora_state_dict

    now = lora_state_dict(trainer.model.unet)
    assert all(
        torch.equal(good[f"unet.{k}"] if f"unet.{k}" in good else good[k], v.cpu()) for k, v in now.items()
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["optimizer_steps"] == 0 and rows[1]["skipped_steps_total"] == 2


def test_nonfinite_loss_skips_the_optimizer_step(tmp_path):
    from lora_grpo.grpo import clipped_policy_loss

    def poisoned(*args, **kwargs):
        loss, stats = clipped_policy_loss(*args, **kwargs)
        return loss * float("nan"), stats

    trainer = _trainer(tmp_path / "run", "train.max_skipped_steps=100", "train.kl_coef=0", loss_fn=poisoned)
    before = [p.detach().clone() for p in trainer.learner.params]
    trainer.start()
    row = trainer.run_epoch(0)
    assert row["optimizer_steps"] == 0 and trainer.skips.total == 2  # 16 samples / (4 x 2 accumulation)
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, trainer.learner.params, strict=True))


def test_only_complete_checkpoints_count_and_prune_keeps_the_newest(tmp_path):
    from lora_grpo.checkpoint import checkpoint_path, prune

    for epoch in (1, 2, 3, 10):
        path = checkpoint_path(tmp_path, epoch)
        path.mkdir(parents=True)
        (path / COMPLETE_MARKER).write_text("")
    (tmp_path / "checkpoints" / ".tmp-epoch_000011").mkdir()  # a save that was killed half-way
    (tmp_path / "checkpoints" / "epoch_000012").mkdir()  # no marker
    assert [p.name for p in complete_checkpoints(tmp_path)] == [
        "epoch_000001",
        "epoch_000002",
        "epoch_000003",
        "epoch_000010",  # numeric order, not string order
    ]
    prune(tmp_path, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["epoch_000003", "epoch_000010"]
    assert find_resume_checkpoint(str(tmp_path), "x").name == "epoch_000010"


def test_offloaded_text_encoder_stays_on_the_cpu_in_fp32_and_encodes_the_same(tmp_path):
    from accelerate.state import AcceleratorState

    plain = _trainer(tmp_path / "a")
    reference = plain.model.encode(["a photo of a cat", ""])
    AcceleratorState._reset_state()
    offloaded = _trainer(tmp_path / "b", "train.offload_text_encoder=true")
    assert {p.device.type for p in offloaded.pipe.text_encoder.parameters()} == {"cpu"}
    assert {p.dtype for p in offloaded.pipe.text_encoder.parameters()} == {torch.float32}
    torch.testing.assert_close(offloaded.model.encode(["a photo of a cat", ""]).hidden, reference.hidden)
