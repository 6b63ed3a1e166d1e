"""The GRPO training loop: sample -> score -> advantages -> update -> log -> save.

Each epoch (one "iteration" of SafeDiffusion-R1, arXiv:2605.18719, Alg. 1):
  1. SAMPLE    G trajectories per prompt with the stochastic DDIM sampler, keeping latents and step log-probs.
  2. SCORE     decode the final latents and score them with the reward (the CLIP steering reward).
  3. ADVANTAGE normalise rewards within each prompt's group, clip.
  4. UPDATE    steps of the recipe's objective (`objectives/`; PPO-clipped log-prob ratios + KL) (`update`).
  5. LOG       metrics.jsonl row, console line, sample grid, callbacks (evaluation, trackers).
Only the LoRA parameters train; the UNet, VAE and text encoder stay frozen. Setting up the models lives in
`policy`, sampling in `rollout`, the update in `update`, the math in `grpo`; this file orchestrates.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import torch

from lora_grpo import policy
from lora_grpo.adversarial import AdversarialTraining
from lora_grpo.base_bank import base_for_epoch
from lora_grpo.callbacks import Callback, RunContext
from lora_grpo.checkpoint import load_training_state, save_training_state
from lora_grpo.config import Config
from lora_grpo.errors import UserError
from lora_grpo.grpo import (
    batch_std,
    centred_rewards,
    clipped_policy_loss,
    finite_group_advantages,
    finite_groups,
    group_scales,
    kl_weights,
    picture_groups,
)
from lora_grpo.models import add_lora, is_sdxl, resolve_model_ref, save_adapter
from lora_grpo.objectives import Surrogate, build_objective
from lora_grpo.pictures import PictureSource, base_pictures, rendered_pictures
from lora_grpo.prompts import load_prompt_set, long_prompt_note
from lora_grpo.rewards import RewardFn, build_reward
from lora_grpo.rollout import EpochSamples, sample_epoch
from lora_grpo.runs import default_run_dir, record_changes, record_stop, write_run_config
from lora_grpo.sampling import sde_window
from lora_grpo.stopping import StopRequests, TrainingInterrupted, agreed_max, agreed_signal
from lora_grpo.toyworld.language import composition_of, render_caption
from lora_grpo.tracking import (
    EpochProgress,
    MetricsLog,
    PassCounter,
    PhaseTimer,
    RunClock,
    conditions_hold,
    console_line,
    epoch_reward_stats,
    grid_due,
    no_progress,
    save_group_grid,
    unmet_conditions,
    utc_now,
)
from lora_grpo.update import SkipCounter, ppo_update, skipped_update


def adversarial_training(config: Config, prompt_sets: list, eval_sets: list) -> AdversarialTraining | None:
    """train.adversarial: its trainer side, with the adversarial set appended to `prompt_sets` and its newest
    round's set to `eval_sets` (None: off)."""
    if config.train.adversarial.method == "none":
        return None
    unsafe = [p for s in prompt_sets if s.safety == "unsafe" for p in s.prompts]
    adversarial = AdversarialTraining(config, unsafe)
    prompt_sets.append(adversarial.prompt_set())
    eval_sets.append(adversarial.newest_set())  # last: the other sets keep their evaluation seeds
    return adversarial


def check_picture_prompts(config: Config, prompt_sets) -> None:
    """Before a model loads: sample.img2img.source toyworld renders full toy-world captions only (any other
    picture's prompt fails here)."""
    i2i = config.sample.img2img
    if i2i.fraction <= 0 or i2i.source != "toyworld":
        return
    for prompt_set in prompt_sets:
        made_from = prompt_set.pictures or prompt_set.prompts  # the prompts the pictures are rendered for
        other = next((p for p in made_from if composition_of(p) is None), None)
        if other is not None:
            raise UserError(
                f"recipe key 'sample.img2img.source': toyworld renders toy-world captions only, and prompt set "
                f"'{prompt_set.name}' has {other!r}: use source base (the base model draws each picture)"
            )


class Trainer:
    """Holds the models and state of one run; `run()` executes the loop (start, epochs, save).

    Seams: `trainable(unet, lora_settings)` makes the trained parameters (the LoRA), `reward_fn` replaces the
    recipe's reward, `loss_fn` the objective's clipped surrogate, and `callbacks` run around training (see callbacks.py).
    """

    def __init__(
        self,
        config: Config,
        run_dir: Path | None = None,
        log: Callable[[str], None] = print,
        trainable: Callable = add_lora,
        reward_fn: RewardFn | None = None,
        loss_fn: Surrogate = clipped_policy_loss,
        callbacks: Sequence[Callback] = (),
        recipe_source: str | None = None,
    ):
        self.config, self.log, self.callbacks = config, log, list(callbacks)
        self.objective = build_objective(config.train, loss_fn)  # train.objective; loss_fn: its surrogate
        self.recipe_source = recipe_source  # recorded in RUN/run.json: how to name the recipe to resume
        self.run_dir = Path(run_dir or config.output.dir or default_run_dir(config))
        self.prompt_sets = [load_prompt_set(s) for s in config.prompts.sets]  # bad prompt files fail first
        self.eval_sets = [load_prompt_set(s) for s in config.evaluate.sets]  # held out: evaluation only
        for prompt_set in self.prompt_sets + self.eval_sets:
            if note := long_prompt_note(f"set '{prompt_set.name}'", prompt_set.prompts):
                log(note)
        check_picture_prompts(config, self.prompt_sets + self.eval_sets)
        self.adversarial = adversarial_training(config, self.prompt_sets, self.eval_sets)  # None: off
        self.accelerator = policy.setup_accelerator(config.train, config.seed)
        self.device = self.accelerator.device
        self.base_ref = resolve_model_ref(config.model.base)
        self.pipe = policy.setup_pipeline(config, self.device)
        if self.adversarial is not None and is_sdxl(self.pipe.unet.config):
            raise UserError(
                "recipe key 'train.adversarial': the attacks search SD 1.x's text encoder, not SDXL's"
            )
        self.learner = policy.setup_learner(self.accelerator, self.pipe, config, trainable)
        self.bases = policy.base_bank(self.pipe, self.learner, config)  # None with one base
        self.reward_fn = reward_fn or build_reward(config.reward, self.device)
        self.model = policy.rollout_model(self.pipe, self.learner, config)
        if config.sample.img2img.fraction > 0:  # some groups start from their prompt's picture
            self.model = replace(self.model, pictures=self.picture_source())
        self.sampler = policy.training_sampler(self.model, config.sample)  # the model, with sample.tail_steps
        policy.save_lora_only_checkpoints(self.accelerator, config.model.base)
        self.skips = SkipCounter(config.train.max_skipped_steps)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.timer = PhaseTimer(self.device)
        self.progress = no_progress()
        self.clock = RunClock(config.train.epochs)
        self.global_step = 0  # optimizer steps taken over the whole run
        self.passes = PassCounter(self.model.unet, self.timer)
        self.targets_met = False  # evaluate.stop_when held at this epoch's evaluation (main process)
        self.last_evaluation: dict = {}  # the newest metrics row with a periodic evaluation (main process)
        use = self.bases.use if self.bases is not None else (lambda index: None)
        self.context = RunContext(
            config, self.model, self.reward_fn, self.prompt_sets, self.run_dir, log, use, self.eval_sets
        )

    def picture_source(self) -> PictureSource:
        """sample.img2img.source: the toy world's renderer, or the base model's own images (on the first base)."""
        if self.config.sample.img2img.source == "toyworld":
            return rendered_pictures(self.model, render_caption)

        @contextlib.contextmanager
        def on_first_base():
            if self.bases is None:
                yield
                return
            current = self.bases.current
            self.bases.use(0)
            try:
                yield
            finally:
                self.bases.use(current)

        return base_pictures(self.model, self.config.seed, on_first_base)

    # ---------------------------------------------------------------- one epoch
    def sample_epoch(self, epoch: int) -> EpochSamples:
        """SAMPLE + SCORE this process's prompt groups of the epoch."""
        acc, on_step = self.accelerator, self.progress.update
        where = (epoch, acc.process_index, acc.num_processes, self.window(epoch))
        args = (self.sampler, self.reward_fn, self.prompt_sets, self.config, *where)
        return sample_epoch(*args, on_step=on_step, timer=self.timer)

    def update(self, samples: EpochSamples, advantages: torch.Tensor, epoch: int):
        """UPDATE: trained timesteps and visiting order are drawn per prompt group, keyed by its global slot."""
        key = (self.config.seed, epoch, 7919)
        learner, model, cfg = self.learner, self.model, self.config.train
        args = (learner, model, samples.rollout, advantages, cfg, key, samples.group_slots, self.skips)
        safety = [s.safety for s in self.prompt_sets]
        weights = kl_weights(safety, samples.set_index, cfg.kl_coef, cfg.safe_kl_coef)
        on_pass, window = self.progress.update, self.window(epoch)
        return ppo_update(*args, self.objective, on_pass=on_pass, window=window, kl_weights=weights)

    def use_base(self, epoch: int | None) -> None:
        """The base epoch `epoch` samples and trains on (model.bases); None: the first."""
        if self.bases is not None:
            self.bases.use(0 if epoch is None else base_for_epoch(epoch, len(self.bases)))

    def window(self, epoch: int) -> tuple[int, int]:
        """The stochastic (and trained) denoising steps of `epoch`."""
        s = self.config.sample
        return sde_window(s.num_steps, s.sde_steps, s.sde_window, epoch, self.config.train.epochs)

    def advantage_scale(self, rewards: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor | None:
        """train.advantage_std: None (each group its own std), the batch's std over every process, or that std
        for the groups from pictures (a row with `start` > 0) and each other group's own."""
        mode, G = self.config.train.advantage_std, self.config.sample.group_size
        if mode == "group":
            return None
        centred, kept = centred_rewards(rewards, G)
        acc = self.accelerator
        std = batch_std(acc.gather(centred), acc.gather(kept))
        if mode == "batch":
            return std
        pictures = picture_groups(start, G, rewards.numel()).to(rewards.device)
        return group_scales(finite_groups(rewards, G)[0], pictures, std)

    def adversarial_round(self, epochs_done: int) -> None:
        """train.adversarial's round when one is due: at the end of every `every`-th epoch, after its update
        and before its check, so the check measures prompts found against the very policy it checks (a stop
        on the adversarial set means a fresh attack failed); its passes and time in that epoch's row, its
        finds in that epoch's checkpoint (a resumed run attacks exactly as one run does)."""
        if self.adversarial is None or not self.adversarial.due(epochs_done):
            return
        with self.timer("adversarial"):
            self.adversarial.run_round(self.pipe, self.model, self.reward_fn, self.accelerator, self.log)
        self.show_adversarial_sets()

    def show_adversarial_sets(self) -> None:
        """The adversarial sets as the attacks left them, in the lists the context shares."""
        self.prompt_sets[-1] = self.adversarial.prompt_set()
        self.eval_sets[-1] = self.adversarial.newest_set()

    def run_epoch(self, epoch: int) -> dict:
        """One GRPO iteration; returns (and logs) its metrics row."""
        cfg, acc = self.config, self.accelerator
        start = time.perf_counter()
        self.timer.seconds.clear()
        self.passes.reset()
        self.progress = EpochProgress(cfg, epoch, self.clock, self.log, enabled=acc.is_main_process)
        self.use_base(epoch)
        samples = self.sample_epoch(epoch)
        # ---- ADVANTAGES (whole groups live on one process, so local normalisation is exact; a batch std is
        # gathered from every process)
        G = cfg.sample.group_size
        std = self.advantage_scale(samples.rewards, samples.rollout.start)
        advantages, finite, flat = finite_group_advantages(
            samples.rewards, G, cfg.train.adv_clip_max, std=std
        )
        counts = torch.tensor([float((~finite).sum()), float(finite.sum()), float(flat.sum())])
        bad, good, zero = (int(v) for v in acc.reduce(counts.to(self.device), "sum").tolist())
        with self.timer("train"):
            if good > 0:
                stats = self.update(samples, advantages, epoch)
            else:
                n, why = len(samples.prompts), "every reward was non-finite"
                stats = skipped_update(self.learner, n, cfg.train, self.skips, why, self.log)
        self.use_base(None)  # evaluation and checkpoints see the first base
        self.adversarial_round(epoch + 1)
        # ---- LOG (rewards gathered from every rank)
        rewards, set_index = acc.gather(samples.rewards), acc.gather(samples.set_index)
        self.global_step += stats.optimizer_steps
        row = dict(epoch=epoch + 1, global_step=self.global_step, time=utc_now(), samples=rewards.numel())
        row.update(epoch_reward_stats(rewards, set_index, self.prompt_sets), **stats.row())
        row.update(zero_advantage_groups=zero / max(1, good), nonfinite_reward_groups=bad)
        row["skipped_steps_total"] = self.skips.total
        passes = acc.reduce(torch.tensor(list(self.passes.counts.values()), device=self.device), "sum")
        row.update(
            {f"unet_passes_{k}": int(v) for k, v in zip(self.passes.counts, passes.tolist(), strict=True)}
        )
        row.update({f"time_{k}": v for k, v in self.timer.seconds.items()})
        row["time_epoch"] = time.perf_counter() - start
        self.progress.close()
        if acc.is_main_process:
            grid = self.save_grid(epoch + 1, samples)
            for callback in self.callbacks:  # evaluation first, then trackers: see build_callbacks
                row.update(callback.on_epoch_end(self.context, epoch + 1, row, grid))
            self.targets_met = conditions_hold(cfg.evaluate.stop_when, row)
            if any(key.startswith("eval/") for key in row):
                self.last_evaluation = row
            self.metrics.write(row)
            self.clock.add(time.perf_counter() - start)  # evaluation included: it is part of the wait
            self.log(console_line(row, cfg.train.epochs, self.clock.eta_text(epoch)))
        return row

    def save_grid(self, number: int, samples: EpochSamples) -> Path | None:
        if not grid_due(number, self.config.output.sample_grid_every, self.config.train.epochs):
            return None
        safety = [self.prompt_sets[i].safety for i in samples.set_index.tolist()]
        path = self.run_dir / "samples" / f"epoch_{number:04d}.png"
        G, count = self.config.sample.group_size, self.config.output.grid_images
        save_group_grid(path, samples.rollout.images, samples.prompts, safety, samples.rewards, G, count)
        return path

    # ---------------------------------------------------------------- run, save, checkpoints
    def save(self) -> Path:
        """Write the adapter in diffusers format (with its metadata) to RUN_DIR/adapter."""
        acc = self.accelerator
        acc.wait_for_everyone()
        adapter_dir = self.run_dir / "adapter"
        if acc.is_main_process:
            save_adapter(self.model.unet, adapter_dir, base_model=self.config.model.base)
            self.log(f"adapter saved to {adapter_dir}")
        return adapter_dir

    def checkpoint(self, next_epoch: int) -> Path:
        """Write RUN/checkpoints/epoch_<next_epoch> atomically (all ranks take part)."""
        keep = self.config.output.keep_checkpoints
        counters = {**self.skips.state(), "global_step": self.global_step}
        if self.adversarial is not None:
            counters["adversarial"] = self.adversarial.state()
        path = save_training_state(self.accelerator, self.run_dir, next_epoch, counters, keep)
        self.skips.last_checkpoint = path
        return path

    def resume(self, checkpoint: Path) -> int:
        """Load a checkpoint (LoRA, optimizer, LR scheduler, every RNG); returns the epoch to continue from."""
        state = load_training_state(self.accelerator, checkpoint, self.log)
        self.skips.restore(state, checkpoint)
        self.global_step = int(state.get("global_step", 0))
        if self.adversarial is not None:
            self.adversarial.restore(state.get("adversarial"), self.pipe)
            self.show_adversarial_sets()
        done = int(state["next_epoch"])  # epochs completed
        if self.accelerator.is_main_process:
            self.metrics.truncate(done)
        self.log(f"resumed from {checkpoint} after epoch {done} of {self.config.train.epochs}")
        return done

    def _notify(self, event: str) -> None:
        if self.accelerator.is_main_process:
            for callback in self.callbacks:
                getattr(callback, event)(self.context)

    def start(self) -> None:
        """Create the run folder and write the resolved config."""
        if self.accelerator.is_main_process:
            write_run_config(self.run_dir, self.config, self.base_ref, self.recipe_source)
            n = self.config.samples_per_epoch
            self.log(f"run dir {self.run_dir}  base {self.base_ref}  {n} samples/epoch")

    def record_stop(self, reason: str, epoch: int, held: bool) -> None:
        """run.json's `stop` record; at a normal end, say so last when the recipe's target never held."""
        if not self.accelerator.is_main_process:
            return
        conditions = self.config.evaluate.stop_when
        record_stop(self.run_dir, reason, epoch, held if conditions else None)
        if conditions and not held and reason == "epoch cap":
            last = self.last_evaluation
            seen = f"at the last evaluation (epoch {last['epoch']}): " if last else "no evaluation ran: "
            unmet = "; ".join(unmet_conditions(conditions, last))
            self.log(
                f"warning: the target was not reached: evaluate.stop_when never held and the run ended at its "
                f"epoch cap ({epoch} epochs); {seen}{unmet}"
            )

    def run(self, resume: Path | None = None, changes: Sequence[tuple] = ()) -> Path:
        """Train (continuing from checkpoint `resume`; `changes`: the settings that resume changes, as
        runs.setting_changes lists them, applied to the optimizer and recorded in run.json)."""
        # a resume that fails leaves the run folder as it was: nothing is written before it loaded
        first_epoch = self.resume(resume) if resume else 0
        if changes:
            policy.apply_optimizer_settings(self.learner, self.config.train)
        self.start()
        if changes and self.accelerator.is_main_process:
            record_changes(self.run_dir, first_epoch, list(changes))
            said = "; ".join(f"{k} {a!r} -> {b!r}" for k, a, b in changes)
            self.log(f"settings changed from epoch {first_epoch + 1}: {said} (recorded in run.json)")
        self._notify("on_start")
        epochs, every = self.config.train.epochs, self.config.output.checkpoint_every
        held, epoch = False, first_epoch - 1
        with StopRequests(self.log) as stop:
            for epoch in range(first_epoch, epochs):
                self.run_epoch(epoch)
                signum = agreed_signal(self.accelerator, stop)
                held = agreed_max(self.accelerator, float(self.targets_met)) > 0
                done = held or epoch == epochs - 1
                # while steps are being skipped the last good checkpoint stays the newest one
                due = (every and (epoch + 1) % every == 0) or done
                if signum or (due and self.skips.in_a_row == 0):
                    path = self.checkpoint(epoch + 1)
                    if signum and not done:
                        self.record_stop("signal", epoch + 1, held)
                        message = f"stopped after epoch {epoch + 1}/{epochs}; checkpoint {path}"
                        raise TrainingInterrupted(signum, message)
                if done:
                    if epoch < epochs - 1:
                        self.log(f"evaluate.stop_when held after epoch {epoch + 1}: training ends early")
                    break
        adapter_dir = self.save()
        self._notify("on_end")
        self.record_stop("stop_when" if held else "epoch cap", epoch + 1, held)
        return adapter_dir


def train(
    config: Config,
    run_dir: Path | None = None,
    log: Callable[[str], None] = print,
    resume: Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> Path:
    """Train a safety LoRA with `config` (continuing from checkpoint `resume`); return the adapter folder."""
    return Trainer(config, run_dir, log, callbacks=callbacks).run(resume)
