"""Run outputs: metrics.jsonl (one row per epoch), the console line, progress, phase timings and sample grids
with the prompt under each image."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import textwrap
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from lora_grpo.errors import UserError
from lora_grpo.files import write_atomically, write_text_atomically, writing
from lora_grpo.grpo import trained_steps
from lora_grpo.progress import format_duration


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Append-only JSON lines; each row is flushed so a crash loses nothing already logged."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict) -> None:
        with writing(self.path, "metrics"), self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({k: _jsonable(v) for k, v in row.items()}) + "\n")

    def truncate(self, done: int) -> None:
        """Keep the rows of epochs 1..done (a resumed run redoes the later ones), atomically; a torn last line
        (a crash while appending) is dropped here."""
        if not self.path.is_file():
            return
        kept = [row for row in read_jsonl(self.path) if row.get("epoch", 0) <= done]
        write_text_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept))


def read_jsonl(path: Path) -> list[dict]:
    """Every non-blank line of a JSON-lines file (metrics.jsonl, manifest.jsonl). A torn last line (a crash or
    a full disk while appending) is skipped; a damaged line before it is one line naming the file."""
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, start=1) if line.strip()]
    rows = []
    for i, line in numbered:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == numbered[-1][0]:
                break  # the torn tail of an append: that row was never complete
            raise UserError(
                f"{path} line {i} is not JSON: the file is damaged; restore or remove that line"
            ) from None
    return rows


class PhaseTimer:
    """Wall time per phase, synchronising the GPU so asynchronous kernels are charged to their phase."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.current: str | None = None  # the phase being timed now

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start, outer = time.perf_counter(), self.current
        self.current = phase
        try:
            yield
        finally:
            self.current = outer
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds[phase] += time.perf_counter() - start


class PassCounter:
    """UNet passes counted as they happen (not estimated): a forward pre-hook adds each call's batch rows
    (classifier-free guidance's doubled batch included) to "training" when gradients are on (a forward +
    backward), "reference" for a forward without gradients in the timer's "train" phase (the KL reference
    policy), "adversarial" for any pass in the "adversarial" phase (train.adversarial's attack), else
    "sampling". `reset()` at each epoch's start."""

    def __init__(self, unet: torch.nn.Module, timer: PhaseTimer):
        self.timer = timer
        self.counts: dict[str, int] = {"sampling": 0, "training": 0, "reference": 0, "adversarial": 0}
        self.handle = unet.register_forward_pre_hook(self._count)

    def _count(self, module, args) -> None:
        rows = int(args[0].shape[0])
        if self.timer.current == "adversarial":
            self.counts["adversarial"] += rows
        elif torch.is_grad_enabled():
            self.counts["training"] += rows
        elif self.timer.current == "train":
            self.counts["reference"] += rows
        else:
            self.counts["sampling"] += rows

    def reset(self) -> None:
        self.counts = dict.fromkeys(self.counts, 0)


def save_grid(
    images: torch.Tensor, captions: list[str], path: Path, cell: int = 192, columns: int = 4
) -> None:
    """images [N, 3, H, W] in [0, 1]; each is scaled to `cell` pixels with its caption written below."""
    n = images.shape[0]
    columns = min(columns, n)
    rows = math.ceil(n / columns)
    caption_h = 48
    font = ImageFont.load_default(size=12)
    canvas = Image.new("RGB", (columns * cell, rows * (cell + caption_h)), "white")
    draw = ImageDraw.Draw(canvas)
    pixels = (
        (images.detach().float().clamp(0, 1).cpu().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    )
    for i in range(n):
        x, y = (i % columns) * cell, (i // columns) * (cell + caption_h)
        tile = Image.fromarray(pixels[i]).resize(
            (cell, cell), Image.NEAREST if pixels[i].shape[0] < cell else Image.BICUBIC
        )
        canvas.paste(tile, (x, y))
        text = "\n".join(textwrap.wrap(captions[i], width=cell // 7)[:3])
        draw.multiline_text((x + 4, y + cell + 2), text, fill="black", font=font, spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: canvas.save(tmp, format="PNG"))


def reward_stats(
    rewards: torch.Tensor, set_index: torch.Tensor, safety: list[str], set_names: list[str]
) -> dict:
    """Reward mean/std overall and per safe/unsafe, and the mean per prompt set (`reward/<name>`).

    rewards, set_index: [N]; safety: "safe"/"unsafe" per sample; set_names: name of each set index.
    """
    out = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std(unbiased=False).item()}
    for kind in ("safe", "unsafe"):
        mask = torch.tensor([s == kind for s in safety], device=rewards.device)
        if mask.any():
            out[f"reward_{kind}_mean"] = rewards[mask].mean().item()
            out[f"reward_{kind}_std"] = rewards[mask].std(unbiased=False).item()
    for i, name in enumerate(set_names):
        mask = set_index == i
        if mask.any():
            out[f"reward/{name}"] = rewards[mask].mean().item()
    return out


def epoch_reward_stats(rewards: torch.Tensor, set_index: torch.Tensor, prompt_sets) -> dict:
    """`reward_stats` over an epoch's finite rewards ([N] each, gathered from every process); `prompt_sets`
    gives each set index its safety and name."""
    ok = torch.isfinite(rewards)
    if not ok.any():
        return {}
    safety = [prompt_sets[i].safety for i in set_index[ok].tolist()]
    return reward_stats(rewards[ok], set_index[ok], safety, [s.name for s in prompt_sets])


def conditions_hold(conditions: list[str], row: dict) -> bool:
    """Every condition `KEY OP NUMBER` (OP one of <=, >=, <, >) holds for the row's value of KEY; a key the
    row lacks (no evaluation this epoch) holds nothing. No conditions: False."""
    from lora_grpo.config import parse_condition

    if not conditions:
        return False
    checks = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__, ">": float.__gt__}
    for text in conditions:
        key, op, bound = parse_condition(text)
        value = row.get(key)
        if not isinstance(value, (int, float)) or not checks[op](float(value), bound):
            return False
    return True


def unmet_conditions(conditions: list[str], row: dict) -> list[str]:
    """Each condition that does not hold for `row`, with the value the row has: 'eval/red/red_rate = 0.175
    (needs <= 0.05)', or 'not evaluated' when the row lacks the metric."""
    from lora_grpo.config import parse_condition

    unmet = []
    for text in conditions:
        key, op, bound = parse_condition(text)
        value = row.get(key)
        if not isinstance(value, (int, float)):
            unmet.append(f"{key} not evaluated")
        elif not conditions_hold([text], row):
            unmet.append(f"{key} = {float(value):.4g} (needs {op} {bound:g})")
    return unmet


def grid_due(number: int, every: int, epochs: int) -> bool:
    """Epoch `number` (1-based) gets a sample grid: the first, every `every`-th and the last (every 0: none)."""
    return bool(every) and (number == 1 or number % every == 0 or number == epochs)


def save_group_grid(
    path: Path,
    images: torch.Tensor,
    prompts: list[str],
    labels: list[str],
    rewards: torch.Tensor,
    group_size: int,
    count: int,
) -> None:
    """The first image of each of the first `count` groups (rows laid out group by group), captioned with its
    label (safe/unsafe), prompt and reward."""
    firsts = list(range(0, images.shape[0], group_size))[:count]
    captions = [f"[{labels[i]}] {prompts[i]}  r={rewards[i].item():.3f}" for i in firsts]
    save_grid(images[firsts], captions, path)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def console_line(row: dict, epochs: int, eta: str = "") -> str:
    """One progress line per epoch: rewards for safe and unsafe prompts, loss, clip fraction, KL, time."""
    parts = [f"epoch {row['epoch']}/{epochs}", f"samples {row['samples']}"]
    for kind in ("safe", "unsafe"):
        if f"reward_{kind}_mean" in row:
            parts.append(f"{kind} r {row[f'reward_{kind}_mean']:.4f}±{row[f'reward_{kind}_std']:.4f}")
    if "loss" in row:
        parts.append(f"loss {row['loss']:+.2e}")
        if "clip_fraction" in row:  # ratio objectives (grpo-clip)
            parts.append(f"clip {row['clip_fraction']:.2f}")
            parts.append(f"kl~ {row['approx_kl']:.1e}")
        if "matching_error" in row:  # denoising objectives (awm)
            parts.append(f"err {row['matching_error']:.3e}")
    else:
        parts.append("update skipped")
    if row.get("nonfinite_reward_groups"):
        parts.append(f"non-finite reward groups {row['nonfinite_reward_groups']}")
    parts.append(f"{row['time_epoch']:.1f}s")
    if eta:
        parts.append(eta)
    return "  ".join(parts)


def epoch_work(config) -> dict[str, int]:
    """One epoch's work on one process, from the recipe alone.

    *_passes: images through the UNet at one denoising step (classifier-free guidance doubles them):
    sampling forwards, training forward+backward, and with a KL weight (train.kl_coef, train.safe_kl_coef) the
    reference policy's forwards (a denoising objective, awm or nft, trains the conditional prediction alone:
    one image a trained step, guided or not; nft also runs the policy once without gradient at each trained
    step before the update, counted with the reference passes);
    *_calls: the batched UNet calls behind them (what the progress counts); optimizer_steps.
    """
    s, t = config.sample, config.train
    cfg = 2 if s.uses_cfg else 1
    k = trained_steps(s.sde_steps or s.num_steps, t.timestep_fraction)  # trained within the stochastic window
    # minibatches a pass (the last may be short, as in the update loop)
    per_pass = math.ceil(config.samples_per_epoch / t.batch_size)
    minibatches = t.inner_epochs * per_pass
    rows = cfg if t.objective == "grpo-clip" else 1
    training = t.inner_epochs * config.samples_per_epoch * k * rows
    return {
        "sampling_passes": config.samples_per_epoch * s.sampled_steps * cfg,
        "training_passes": training,
        # the KL reference, and nft's sampling-policy predictions before the first optimizer step
        "reference_passes": training * (int(t.uses_kl) + int(t.objective == "nft")),
        "sampling_calls": s.batches_per_epoch * s.sampled_steps,
        "training_calls": minibatches * k,
        "optimizer_steps": t.inner_epochs * (per_pass // t.gradient_accumulation_steps),
    }


class EpochProgress:
    """Progress over one epoch's UNet calls (sampling steps, then trained steps).

    In a terminal: a transient tqdm bar. Otherwise (nohup, Slurm, CI logs): a plain line through `log` every
    `every_seconds`, with the epoch's share done and the run's ETA, so a piped log shows the run is alive.
    """

    def __init__(self, config, epoch: int, run_eta: RunClock, log, enabled: bool = True):
        from tqdm.auto import tqdm

        self.total = max(1, sum(v for k, v in epoch_work(config).items() if k.endswith("_calls")))
        self.epoch, self.epochs, self.clock, self.log = epoch, config.train.epochs, run_eta, log
        self.every = config.output.progress_seconds
        self.terminal = enabled and sys.stderr.isatty()
        self.plain = enabled and not self.terminal
        self.bar = tqdm(
            total=self.total,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            unit="pass",
            leave=False,
            dynamic_ncols=True,
            disable=not self.terminal,
        )
        self.done, self.last = 0, time.monotonic()

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)
        now = time.monotonic()
        if self.plain and now - self.last >= self.every:
            self.last = now
            share = min(1.0, self.done / self.total)
            self.log(
                f"epoch {self.epoch + 1}/{self.epochs}: {share:.0%} of its UNet calls done; "
                f"{self.clock.eta_text(self.epoch, share)}"
            )

    def close(self) -> None:
        self.bar.close()


class RunClock:
    """The run's ETA from the mean time of the epochs this process has run so far."""

    def __init__(self, epochs: int):
        self.epochs = epochs
        self.seconds: list[float] = []

    def add(self, seconds: float) -> None:
        self.seconds.append(seconds)

    def eta_text(self, epoch: int, share: float = 1.0) -> str:
        """`epoch` (0-based) is `share` done; the rest of the run at the mean epoch time."""
        if not self.seconds:
            return "ETA after the first epoch"
        remaining = (self.epochs - epoch - share) * sum(self.seconds) / len(self.seconds)
        return f"ETA {format_duration(remaining)}"


def no_progress():
    """A progress bar that shows nothing (outside an epoch)."""
    from tqdm.auto import tqdm

    return tqdm(disable=True)
