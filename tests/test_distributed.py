"""Two CPU processes (torchrun, gloo) against one process with the same global batch.

Prompt groups are keyed by their global slot, so 2 processes x 1 prompt per batch sample exactly the groups
1 process x 2 prompts samples. With one optimizer step per epoch the LoRA after the epoch must then agree to
float tolerance, which holds only if each rank's loss is normalised by its own share and DDP averages the
gradients once per optimizer step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

ADAPTER = "adapter/pytorch_lora_weights.safetensors"
# one epoch, every denoising step trained, exact fp32 AdamW (8-bit quantisation is not continuous)
COMMON = [
    "train.epochs=1",
    "train.timestep_fraction=1.0",
    "train.optimizer=adamw",
    "train.batch_size=4",
    "sample.batches_per_epoch=2",
    "output.sample_grid_every=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], cwd) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    train = ["-m", "lora_grpo.cli", "train", "tiny-test"]
    # 1 process: 2 prompts x G 4 x 2 batches = 16 samples, 4 minibatches of 4 accumulated into 1 step
    _run(
        [
            sys.executable,
            *train,
            "--out",
            "single",
            *COMMON,
            "sample.prompts_per_batch=2",
            "train.gradient_accumulation_steps=4",
        ],
        tmp_path,
    )
    # 2 processes: 1 prompt x G 4 x 2 batches = 8 samples each, 2 minibatches accumulated into 1 step
    out = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            *train,
            "--out",
            "ddp",
            *COMMON,
            "sample.prompts_per_batch=1",
            "train.gradient_accumulation_steps=2",
        ],
        tmp_path,
    )
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
    norms = [
        json.loads((tmp_path / run / "metrics.jsonl").read_text())["grad_norm"] for run in ("single", "ddp")
    ]
    assert norms[0] > 0
    assert abs(norms[1] - norms[0]) <= 1e-4 * norms[0], norms
    assert (
        list((tmp_path / "ddp" / "checkpoints" / "epoch_000001").glob("random_states_*.pkl")).__len__() == 2
    )
