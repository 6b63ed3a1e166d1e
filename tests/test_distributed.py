"""Two CPU processes (torchrun, gloo) against one process with the same global batch per optimizer step.

Prompt groups are keyed by their global slot, so 2 processes x 1 prompt per batch sample exactly the groups
1 process x 2 prompts samples, and the update's random choices (trained timesteps, which optimizer step a
trajectory lands in) are drawn per group from the same keys. The LoRA must then agree to float tolerance,
which also needs each rank's loss normalised by its own share and DDP averaging the gradients once per step.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from lora_grpo.tracking import read_jsonl

ADAPTER = "adapter/pytorch_lora_weights.safetensors"
# exact fp32 AdamW (8-bit quantisation is not continuous)
COMMON = [
    "train.optimizer=adamw",
    "train.batch_size=4",
    "sample.batches_per_epoch=2",
    "output.sample_grid_every=0",
]
# (settings for both, 1 process, 2 processes): the same global batch per optimizer step in each pair
SETUPS = {
    # one epoch, one optimizer step, every denoising step trained
    "one-step": (
        ["train.epochs=1", "train.timestep_fraction=1.0"],
        ["sample.prompts_per_batch=2", "train.gradient_accumulation_steps=4"],
        ["sample.prompts_per_batch=1", "train.gradient_accumulation_steps=2"],
    ),
    # tiny-test's own half of the steps drawn at random per trajectory, two optimizer steps of 8 trajectories
    # per epoch (2 minibatches of 4 each on one process, 1 per process on two), two epochs; one advantage
    # scale for the epoch's batch (train.advantage_std: batch), gathered from both processes
    "several-steps": (
        ["train.epochs=2", "train.timestep_fraction=0.5", "train.advantage_std=batch"],
        ["sample.prompts_per_batch=2", "train.gradient_accumulation_steps=2"],
        ["sample.prompts_per_batch=1", "train.gradient_accumulation_steps=1"],
    ),
    # the advantage-weighted matching objective: its fresh noise is keyed by each trajectory's group slot
    "awm": (
        ["train.epochs=2", "train.timestep_fraction=0.5", "train.objective=awm"],
        ["sample.prompts_per_batch=2", "train.gradient_accumulation_steps=2"],
        ["sample.prompts_per_batch=1", "train.gradient_accumulation_steps=1"],
    ),
    # nft: the sampling policy's predictions are computed on each process for its own trajectories
    "nft": (
        ["train.epochs=2", "train.timestep_fraction=0.5", "train.objective=nft"],
        ["sample.prompts_per_batch=2", "train.gradient_accumulation_steps=2"],
        ["sample.prompts_per_batch=1", "train.gradient_accumulation_steps=1"],
    ),
    # train.adversarial: the round (concept inversion against the policy) runs on the main process alone and
    # its prompts and token embedding reach every process before the epoch samples
    "adversarial": (
        ["train.epochs=2", "train.timestep_fraction=0.5", "train.adversarial.method=concept-inversion"]
        + ["train.adversarial.every=1", "train.adversarial.targets=2", "train.adversarial.steps=2"]
        + ["train.adversarial.ban=[nude]"],
        ["sample.prompts_per_batch=2", "train.gradient_accumulation_steps=2"],
        ["sample.prompts_per_batch=1", "train.gradient_accumulation_steps=1"],
    ),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_two_processes_match_one_process_with_the_same_global_batch(setup, tmp_path):
    both, single_args, ddp_args = SETUPS[setup]
    train = ["-m", "lora_grpo.cli", "train", "tiny-test"]
    # 1 process: 2 prompts x G 4 x 2 batches = 16 samples per epoch
    _run([sys.executable, *train, "--out", "single", *COMMON, *both, *single_args], tmp_path)
    # 2 processes: 1 prompt x G 4 x 2 batches = 8 samples each
    port = f"--master_port={_free_port()}"
    ddp_cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", port, *train]
    out = _run([*ddp_cmd, "--out", "ddp", *COMMON, *both, *ddp_args], tmp_path)
    assert out.count("adapter saved to") == 1  # only rank 0 writes files
    assert "samples 16" in out  # the logged epoch gathers both ranks' samples
    single = load_file(str(tmp_path / "single" / ADAPTER))
    ddp = load_file(str(tmp_path / "ddp" / ADAPTER))
    assert single.keys() == ddp.keys()
    moved = max((single[k] - 0).abs().max().item() for k in single if "lora_B" in k or "lora.up" in k)
    assert moved > 1e-4  # the step really changed the LoRA
    for key in single:  # Adam's first step is ~lr = 1e-3 per element; reductions run in another order
        torch.testing.assert_close(ddp[key], single[key], atol=1e-5, rtol=1e-3)
    # Adam's step hides a uniform gradient scale, so compare the gradient itself: its norm before clipping
    # (a rank summing instead of averaging, or normalising by the wrong count, shows here as a factor)
    rows = {run: read_jsonl(tmp_path / run / "metrics.jsonl") for run in ("single", "ddp")}
    norms = [[r["grad_norm"] for r in rows[run]] for run in ("single", "ddp")]
    assert norms[0][0] > 0
    assert norms[1] == pytest.approx(norms[0], rel=1e-4), norms
    assert [r["global_step"] for r in rows["ddp"]] == [r["global_step"] for r in rows["single"]]
    assert len(list((tmp_path / "ddp" / "checkpoints").glob("epoch_*/random_states_*.pkl"))) >= 2
