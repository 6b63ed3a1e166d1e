"""Run folders: where a run is written and the resolved config it records."""

from __future__ import annotations

import copy
from datetime import datetime
from pathlib import Path

from lora_grpo.config import Config, save_config


def default_run_dir(config: Config) -> Path:
    """runs/<recipe>-<timestamp> under the current directory."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.name}-{stamp}"


def write_run_config(run_dir: Path, config: Config, base_ref: str) -> None:
    """Create the run folder and write RUN/config.yaml: the config that actually runs, with the base model's
    resolved folder or hub id and the run folder itself."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = copy.deepcopy(config)
    resolved.model.base = base_ref
    resolved.output.dir = str(run_dir.resolve())
    save_config(resolved, run_dir / "config.yaml")
