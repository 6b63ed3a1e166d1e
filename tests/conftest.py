"""Shared fixtures: tiny models built offline into temporary folders, loaded the way users load real ones."""

from __future__ import annotations

import os

import pytest

# Nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Under pytest-xdist (`-n auto`, the README's test command) the workers share the cores: each gets its share of
# threads, set before torch loads, so two workers on two cores do not oversubscribe them (the subprocesses a
# test starts inherit it). Alone (`pytest -n 0`), torch keeps its own default.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(_threads))


@pytest.fixture(scope="session", autouse=True)
def builtin_home(tmp_path_factory):
    """Built-in tiny models are cached under a per-session folder, not the user's home."""
    home = tmp_path_factory.mktemp("lora_grpo_home")
    old = os.environ.get("LORA_GRPO_HOME")
    os.environ["LORA_GRPO_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("LORA_GRPO_HOME", None)
    else:
        os.environ["LORA_GRPO_HOME"] = old


@pytest.fixture(scope="session", autouse=True)
def worker_threads():
    """A worker's share of the cores (see above) also for a torch another import loaded first."""
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
        import torch

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one mixed-precision state per process; tests build trainers with different settings."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    from lora_grpo.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_sd_vpred_dir(tmp_path_factory):
    from lora_grpo.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd-v"), seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    from lora_grpo.tiny import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_open_clip_dir(tmp_path_factory):
    from lora_grpo.tiny import build_tiny_open_clip

    return build_tiny_open_clip(tmp_path_factory.mktemp("tiny-open-clip"), seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory):
    from lora_grpo.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"), seed=0)


@pytest.fixture(scope="session")
def tiny_adapter(tiny_sd_dir, tmp_path_factory):
    """A saved adapter for the tiny SD model with weights far from zero (eval and attack tests)."""
    import torch

    from lora_grpo.config import LoraSettings, ModelConfig
    from lora_grpo.models import add_lora, load_pipeline, save_adapter

    pipe = load_pipeline(ModelConfig(base=str(tiny_sd_dir)))
    pipe.unet.requires_grad_(False)
    torch.manual_seed(0)
    for p in add_lora(pipe.unet, LoraSettings(rank=2, alpha=2.0)):
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    return save_adapter(
        pipe.unet, tmp_path_factory.mktemp("adapter") / "adapter", base_model=str(tiny_sd_dir)
    )
