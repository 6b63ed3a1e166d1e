"""A tiny end-to-end run through the same from_pretrained path users take, checked from every side."""

import json
import os
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline

from lora_grpo.config import load_config
from lora_grpo.recipe_files import find_recipe
from lora_grpo.train import Trainer
from lora_grpo.train_command import build_callbacks


@pytest.fixture(scope="module")
def trained(tiny_sd_dir, tiny_clip_dir, tmp_path_factory):
    """tiny-test (3 epochs, periodic evaluation at epochs 2 and 3) with both experiment trackers on; W&B
    offline (nothing leaves the machine)."""
    run_dir = tmp_path_factory.mktemp("run")
    config = load_config(
        find_recipe("recipes/tiny-test.yaml"),
        [
            f"model.base={tiny_sd_dir}",
            f"reward.clip.model={tiny_clip_dir}",
            "output.report_to=[tensorboard, wandb]",
        ],
    )
    lines = []
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true")
    try:
        trainer = Trainer(config, run_dir, log=lines.append, callbacks=build_callbacks(config))
        before = {k: v.detach().clone() for k, v in trainer.pipe.unet.state_dict().items()}
        adapter_dir = trainer.run()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    return trainer, before, adapter_dir, run_dir, lines


def test_lora_changes_and_base_does_not(trained):
    trainer, before, *_ = trained
    after = trainer.pipe.unet.state_dict()
    lora_keys = [k for k in before if "lora_" in k]
    base_keys = [k for k in before if "lora_" not in k]
    assert lora_keys and base_keys
    assert any(not torch.equal(before[k], after[k]) for k in lora_keys if "lora_B" in k)
    assert all(torch.equal(before[k], after[k]) for k in base_keys)
    for module in (trainer.pipe.vae, trainer.pipe.text_encoder):
        assert not any(p.requires_grad for p in module.parameters())


def test_optimizer_state_is_8bit(trained):
    trainer = trained[0]
    states = [trainer.learner.optimizer.state[p] for p in trainer.learner.params]
    assert len(states) == len(trainer.learner.params)
    for state in states:
        assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8


def test_metrics_and_outputs(trained):
    trainer, _, adapter_dir, run_dir, lines = trained
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # epochs count from 1 everywhere: metrics rows, console, sample grids, checkpoints
    assert [r["epoch"] for r in rows] == list(range(1, trainer.config.train.epochs + 1))
    assert [r["global_step"] for r in rows] == [2, 4, 6]  # 2 optimizer steps per epoch
    assert all(r["time"].endswith("+00:00") for r in rows)
    for row in rows:
        assert row["samples"] == trainer.config.samples_per_epoch
        # before the first optimizer step of each epoch the policy is the sampling policy: ratio exactly 1
        assert abs(row["first_ratio_min"] - 1) <= 1e-6 and abs(row["first_ratio_max"] - 1) <= 1e-6
        for key in (
            "reward_safe_mean",
            "reward_unsafe_mean",
            "loss",
            "clip_fraction",
            "approx_kl",
            "grad_norm",
            "kl",
        ):
            assert key in row
        assert row["optimizer_steps"] == 2
    assert (run_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "epoch_0001.png",
        "epoch_0002.png",
        "epoch_0003.png",
    ]
    assert (adapter_dir / "pytorch_lora_weights.safetensors").is_file()
    # one console line an epoch (a slow epoch may add "epoch N/M: x% of its UNet calls done" progress lines)
    epoch_lines = [line for line in lines if re.match(r"epoch \d+/\d+  samples ", line)]
    assert len(epoch_lines) == trainer.config.train.epochs
    resolved = load_config(run_dir / "config.yaml")
    assert resolved.model.base == str(trainer.base_ref)


def test_periodic_evaluation_is_logged_and_reproducible(trained):
    """evaluate.every 2 in a 3-epoch run: eval/... keys at epochs 2 and 3 (the last), none at epoch 1; the
    logged numbers are the final model's on the fixed prompts and seeds (recomputed here independently)."""
    import torch.nn.functional as F
    from accelerate import Accelerator

    from lora_grpo.evaluation.periodic import eval_prompts
    from lora_grpo.rollout import sample_scored

    trainer, _, _, run_dir, _ = trained
    Accelerator(mixed_precision="no")  # the autouse fixture reset accelerate's state after the run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [any(k.startswith("eval/") for k in r) for r in rows] == [False, True, True]
    last = rows[-1]
    ecfg = trainer.config.evaluate
    for k, prompt_set in enumerate(trainer.prompt_sets):
        prompts = eval_prompts(prompt_set.prompts, ecfg.prompts_per_set, ecfg.images_per_prompt)
        assert len(prompts) == 4 and prompts[0] == prompts[1] == prompt_set.prompts[0]
        images, rewards = sample_scored(trainer.model, trainer.reward_fn, prompts, ecfg.seed + 1000 * k)
        key = f"eval/{prompt_set.name}"
        assert last[f"{key}/steering_reward"] == pytest.approx(rewards.mean().item(), abs=1e-6)
        backend = trainer.reward_fn.backend
        cos = F.cosine_similarity(backend.encode_images(images), backend.encode_text(prompts))
        assert last[f"{key}/clip_score"] == pytest.approx(100 * cos.clamp(min=0).mean().item(), abs=1e-4)
    assert rows[1]["eval/tiny-unsafe/steering_reward"] != last["eval/tiny-unsafe/steering_reward"]
    # one set of each safety: its pool is that set
    for pool, name in (("all-safe", "tiny-safe"), ("all-unsafe", "tiny-unsafe")):
        for metric in ("steering_reward", "clip_score"):
            assert last[f"eval/{pool}/{metric}"] == last[f"eval/{name}/{metric}"]


@pytest.mark.slow
def test_periodic_evaluation_does_not_change_training(trained, tiny_sd_dir, tiny_clip_dir, tmp_path):
    """The same recipe without periodic evaluation trains to the same LoRA, bit for bit."""
    from safetensors.torch import load_file

    adapter_with = trained[2]
    config = load_config(
        find_recipe("recipes/tiny-test.yaml"),
        [f"model.base={tiny_sd_dir}", f"reward.clip.model={tiny_clip_dir}", "evaluate.every=0"],
    )
    adapter_without = Trainer(
        config, tmp_path / "run", log=lambda line: None, callbacks=build_callbacks(config)
    ).run()
    a = load_file(str(adapter_with / "pytorch_lora_weights.safetensors"))
    b = load_file(str(adapter_without / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_saved_adapter_reproduces_in_memory_model(trained, tiny_sd_dir):
    """A fresh stock pipeline + load_lora_weights gives the trained model's image for the same seed."""
    trainer, _, adapter_dir, *_ = trained

    def image(pipe):
        gen = torch.Generator().manual_seed(3)
        return pipe(
            "a photo of a cat", num_inference_steps=4, guidance_scale=2.0, generator=gen, output_type="np"
        ).images

    trainer.pipe.unet.eval()
    in_memory = image(trainer.pipe)
    fresh = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None, local_files_only=True)
    fresh.set_progress_bar_config(disable=True)
    base = image(fresh)
    fresh.load_lora_weights(str(adapter_dir))
    reloaded = image(fresh)
    # training moved the output (measured ~5e-3 here) far more than the reload tolerance
    assert abs(in_memory - base).max() > 1e-3, "training changed the model's output"
    assert abs(reloaded - in_memory).max() < 1e-5


@pytest.mark.slow
def test_bf16_autocast_and_checkpointing_paths(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """Mixed precision (bf16 autocast on the CPU) and gradient checkpointing run, and still start at ratio 1."""
    config = load_config(
        find_recipe("tiny-test"),
        [
            f"model.base={tiny_sd_dir}",
            f"reward.clip.model={tiny_clip_dir}",
            "train.epochs=1",
            "train.mixed_precision=bf16",
            "train.gradient_checkpointing=true",
            "train.optimizer=adamw",
            "output.sample_grid_every=0",
        ],
    )
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    assert trainer.pipe.unet.is_gradient_checkpointing
    before = [p.detach().clone() for p in trainer.learner.params]
    row = trainer.run_epoch(0)
    assert abs(row["first_ratio_min"] - 1) <= 1e-6 and abs(row["first_ratio_max"] - 1) <= 1e-6
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.learner.params, strict=True))
    assert all(p.dtype == torch.float32 for p in trainer.learner.params)


def test_an_euler_ancestral_run_samples_and_trains_with_its_own_kernel(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """sample.sampler: euler-ancestral: rollouts step with the Euler a kernel (their latents differ from DDIM's
    with the same noise), the update re-evaluates their steps with the same kernel (importance ratios exactly
    1 before the first optimizer step) and the LoRA moves; a window reaching Euler's noiseless last step is
    refused in one line."""
    from lora_grpo.errors import UserError

    overrides = [
        f"model.base={tiny_sd_dir}",
        f"reward.clip.model={tiny_clip_dir}",
        "train.epochs=1",
        "train.optimizer=adamw",
        "output.sample_grid_every=0",
        "sample.sde_window=first",
    ]
    config = load_config(find_recipe("tiny-test"), [*overrides, "sample.sampler=euler-ancestral"])
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    assert trainer.model.schedule.sampler == "euler-ancestral"
    before = [p.detach().clone() for p in trainer.learner.params]
    row = trainer.run_epoch(0)
    assert abs(row["first_ratio_min"] - 1) <= 1e-6 and abs(row["first_ratio_max"] - 1) <= 1e-6
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.learner.params, strict=True))
    ddim_config = load_config(find_recipe("tiny-test"), overrides)
    assert ddim_config.sample.sampler == "ddim"
    with pytest.raises(
        UserError, match="euler-ancestral needs a stochastic window that ends before the last"
    ):
        load_config(
            find_recipe("tiny-test"), [*overrides, "sample.sampler=euler-ancestral", "sample.sde_steps=0"]
        )


def test_reward_stats_by_hand():
    from lora_grpo.tracking import reward_stats

    rewards = torch.tensor([1.0, 3.0, 2.0, 6.0])
    stats = reward_stats(
        rewards, torch.tensor([0, 0, 1, 1]), ["unsafe", "unsafe", "safe", "safe"], ["u", "s"]
    )
    assert stats["reward_unsafe_mean"] == 2.0 and stats["reward_unsafe_std"] == 1.0
    assert stats["reward_safe_mean"] == 4.0 and stats["reward_safe_std"] == 2.0
    assert stats["reward/u"] == 2.0 and stats["reward/s"] == 4.0 and stats["reward_mean"] == 3.0


def test_unet_passes_are_counted_as_they_happen(trained):
    """The counted passes equal the recipe's arithmetic (epoch_work): sampling every step, training the
    trained steps of the stochastic window, the KL reference once per trained pass."""
    from lora_grpo.tracking import epoch_work

    trainer, run_dir = trained[0], trained[3]
    work = epoch_work(trainer.config)
    assert (work["sampling_passes"], work["training_passes"], work["reference_passes"]) == (256, 96, 96)
    for row in _metrics(run_dir):
        assert row["unet_passes_sampling"] == work["sampling_passes"]
        assert row["unet_passes_training"] == work["training_passes"]
        assert row["unet_passes_reference"] == work["reference_passes"]


def test_tail_steps_cut_sampling_passes_and_nothing_else(tiny_sd_dir, tiny_clip_dir, tmp_path):
    """sample.tail_steps: training rollouts take the first window's steps then the tail (counted passes =
    epoch_work = the arithmetic by hand); training and the rest of the run keep the recipe's whole schedule."""
    from lora_grpo.tracking import epoch_work

    config = load_config(
        find_recipe("recipes/tiny-test.yaml"),
        [
            f"model.base={tiny_sd_dir}",
            f"reward.clip.model={tiny_clip_dir}",
            "train.epochs=1",
            "evaluate.every=0",
            "output.sample_grid_every=0",
            "sample.sde_window=first",
            "sample.sde_steps=3",
            "sample.tail_steps=2",
        ],
    )
    trainer = Trainer(config, tmp_path / "run", log=lambda line: None)
    trainer.run()
    assert trainer.sampler.schedule.num_steps == 5 and trainer.model.schedule.num_steps == 8
    # 2 batches x 2 prompts x G 4 = 16 samples; 3 window + 2 tail steps; CFG 2 doubles every pass
    work = epoch_work(config)
    assert work["sampling_passes"] == 16 * (3 + 2) * 2 and work["sampling_calls"] == 2 * 5
    # trained: int(3 * 0.5) = 1 step of the window per trajectory, the KL reference once per trained pass
    assert work["training_passes"] == work["reference_passes"] == 16 * 1 * 2
    (row,) = _metrics(tmp_path / "run")
    assert row["unet_passes_sampling"] == work["sampling_passes"]
    assert row["unet_passes_training"] == work["training_passes"]
    assert row["unet_passes_reference"] == work["reference_passes"]


def test_training_stops_early_once_the_targets_hold(tmp_path):
    """evaluate.stop_when: checked at each periodic evaluation; when every condition holds, training ends
    there, checkpoints and saves as at a normal end."""
    config = load_config(
        find_recipe("tiny-test"),
        [
            "train.epochs=3",
            "evaluate.every=1",
            "evaluate.stop_when=['eval/tiny-unsafe/steering_reward > -2', 'eval/tiny-safe/clip_score >= 0']",
            "output.sample_grid_every=0",
        ],
    )
    lines = []
    adapter = Trainer(config, tmp_path, log=lines.append, callbacks=build_callbacks(config)).run()
    rows = _metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [1]  # a cosine is always > -2: it holds at the first evaluation
    assert any("training ends early" in line for line in lines)
    assert (adapter / "pytorch_lora_weights.safetensors").is_file()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["epoch_000001"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_every_metrics_row_and_the_sample_grids(trained):
    """Read the event file back with TensorBoard's own reader: each logged series equals metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = trained[3]
    rows = _metrics(run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for key in ("reward_mean", "reward_unsafe_mean", "loss", "grad_norm", "time_epoch"):
        logged = events.Scalars(key)
        assert [e.step for e in logged] == [r["epoch"] for r in rows]
        # TensorBoard stores float32
        assert [e.value for e in logged] == pytest.approx([r[key] for r in rows], rel=1e-6)
    evaluated = events.Scalars("eval/tiny-unsafe/steering_reward")  # the periodic evaluation's numbers
    assert [e.step for e in evaluated] == [2, 3]
    assert [e.value for e in evaluated] == pytest.approx(
        [r["eval/tiny-unsafe/steering_reward"] for r in rows[1:]], rel=1e-6
    )
    grids = events.Images("samples")
    assert [e.step for e in grids] == [1, 2, 3]
    from PIL import Image

    png = Image.open(run_dir / "samples" / "epoch_0003.png")
    assert (grids[-1].width, grids[-1].height) == png.size


def _wandb_records(path):
    """The protobuf records of a W&B run file (a LevelDB-style log: 7-byte file header, 32 KiB blocks, each
    record a 7-byte header - crc32c, length, type - then its bytes; FIRST/MIDDLE/LAST pieces joined)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pieces, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        pieces += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def test_wandb_offline_run_holds_every_metrics_row(trained):
    run_dir = trained[3]
    (run_file,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    history = {}
    for record in _wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): item.value_json for item in record.history.item}
            history.setdefault(int(items["_step"]), {}).update({k: json.loads(v) for k, v in items.items()})
    rows = _metrics(run_dir)
    assert sorted(history) == [r["epoch"] for r in rows]
    for row in rows:
        logged = history[row["epoch"]]
        assert logged["reward_mean"] == pytest.approx(row["reward_mean"], rel=1e-9)
        assert logged["loss"] == pytest.approx(row["loss"], rel=1e-9)
        (grid,) = logged["samples/filenames"]  # the sample grid, as a W&B image of this step
        assert grid.startswith(f"media/images/samples_{row['epoch']}_")
    media = sorted((run_file.parent / "files" / "media" / "images").glob("samples_*.png"))
    assert len(media) == len(rows)


def test_a_missing_tracker_package_is_one_line(monkeypatch, capsys):
    import importlib.util

    from lora_grpo.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    code = main(["train", "tiny-test", "output.report_to=[wandb]"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "pip install wandb" in err and "output.report_to" in err


def test_gradient_checkpointing_auto_is_off_on_a_cpu(tmp_path):
    config = load_config(find_recipe("tiny-test"), ["train.gradient_checkpointing=auto"])
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    assert not trainer.pipe.unet.is_gradient_checkpointing
