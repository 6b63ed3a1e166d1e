"""The benchmark scripts run end to end at tiny size and print their ratios."""

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def run(script, *args):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_epoch_breakdown_prints_overhead_ratio():
    out = run("epoch_breakdown.py", "--epochs", "2", "--repeats", "1")
    for phase in (
        "sampling",
        "decode",
        "reward",
        "train",
        "unet_sampling",
        "vae_decode",
        "clip_images",
        "unet_train",
    ):
        assert phase in out
    ratio = float(re.search(r"overhead ratio .*: ([0-9.]+)", out).group(1))
    assert 0.3 < ratio < 10


def test_gpu_memory_runs_at_tiny_size():
    out = run("gpu_memory.py", "--size", "tiny", "--epochs", "1")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("full ", "lora "))}
    assert set(rows) == {"full", "lora"}
    full_params = int(rows["full"][1].replace(",", ""))
    lora_params = int(rows["lora"][1].replace(",", ""))
    assert lora_params < full_params / 10
