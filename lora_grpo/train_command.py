"""`lora-grpo train`: everything that can be checked is checked before a model loads, then the run starts.

Order: recipe and overrides -> the run folder (a new one must be empty or cleared with --overwrite; a resumed
one must belong to this recipe and its checkpoint must load whole) -> the base model reference and the
output folder -> callbacks (a missing tracker package stops here) -> `--dry-run` prints the plan and stops,
else the trainer loads the models and trains.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lora_grpo.config import Config, load_config, to_dict
from lora_grpo.errors import UserError, WriteFailed, write_failure
from lora_grpo.run_lock import RunLock, take_lock
from lora_grpo.stopping import TrainingInterrupted


@dataclass
class RunPlan:
    config: Config
    run_dir: Path
    checkpoint: Path | None  # resume from here
    recipe_source: str  # how to name the recipe on a command line: a shipped name or the file's path
    lock: RunLock | None = None  # the run folder's lock, held until the process ends (None: a dry run)
    changes: list = field(default_factory=list)  # settings a resume changes with --change-settings


def recipe_source(recipe_arg: str, recipe_path: Path) -> str:
    """A shipped recipe keeps its name; a recipe file is named by its absolute path (works from any folder)."""
    from lora_grpo.recipe_files import shipped_recipes

    shipped = shipped_recipes()
    if not Path(recipe_arg).expanduser().is_file() and recipe_path in shipped.values():
        return recipe_path.stem
    return str(recipe_path.resolve())


def plan_run(args: argparse.Namespace) -> RunPlan:
    """Every check before a model loads; the returned plan holds the run folder's lock (released here when a
    later check fails)."""
    held: list[RunLock | None] = []
    try:
        return _plan_run(args, held)
    except BaseException:
        for lock in held:
            if lock is not None:
                lock.release()
        raise


def _plan_run(args: argparse.Namespace, held: list) -> RunPlan:
    from lora_grpo.checkpoint import check_checkpoint
    from lora_grpo.models import resolve_model_ref
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.runs import (
        RESUME_BUSY,
        check_resume_changes,
        check_same_recipe,
        default_run_dir,
        find_resume_checkpoint,
        prepare_new_run,
        run_dir_of,
        run_record,
        setting_changes,
    )

    recipe_path = find_recipe(args.recipe)
    config = load_config(recipe_path, args.overrides)
    source = recipe_source(args.recipe, recipe_path)
    out = Path(args.out) if args.out else None
    if args.resume:
        if args.overwrite:
            raise UserError("--resume continues a run and --overwrite deletes one: give only one of them")
        checkpoint = find_resume_checkpoint(args.resume, config.name, out)
        run_dir = run_dir_of(checkpoint)
        check_same_recipe(run_dir, config.name, args.recipe)
        lock = take_lock(run_dir, RESUME_BUSY, args.dry_run)
        held.append(lock)
        state = check_checkpoint(checkpoint)
        # the run's own resolved config; overrides apply as check_resume_changes allows
        config = load_config(run_dir / "config.yaml", args.overrides)
        done = int(state["next_epoch"])
        changed = setting_changes(load_config(run_dir / "config.yaml"), config)
        changes = check_resume_changes(run_dir, changed, args.change_settings, done)
        # a run whose last checkpoint is its end but whose adapter was never written (a full disk) resumes to
        # write it; a finished run only trains further with more epochs
        if done >= config.train.epochs and (run_dir / "adapter").is_dir():
            raise UserError(
                f"run {run_dir} already finished its {done} epochs: to train further, resume it with "
                f"train.epochs=N for some N > {done}"
            )
        source = run_record(run_dir).get("recipe_source") or source
    else:
        checkpoint, changes = None, []
        run_dir = out or (Path(config.output.dir) if config.output.dir else default_run_dir(config))
        lock = prepare_new_run(run_dir, args.overwrite, dry_run=args.dry_run)
        held.append(lock)
    for base in [config.model.base, *config.model.bases]:
        resolve_model_ref(base)  # a wrong folder or hub id fails here, not after minutes
    note_anchors(config)
    return RunPlan(config, run_dir, checkpoint, source, lock, changes)


def note_anchors(config: Config) -> None:
    """Read the anchor file now (a bad one fails before models load); say so when it has no safe anchors."""
    if config.reward.anchors is None:
        return
    from lora_grpo.rewards.steering import load_anchors

    if not load_anchors(config.reward.anchors).safe:
        print(
            f"note: anchor file {config.reward.anchors} has no safe anchors: v_safe = -mean(unsafe anchors), "
            "so the reward pushes away from the unsafe phrases without pulling toward safe ones",
            flush=True,
        )


def build_callbacks(config: Config) -> list:
    """What runs around training, from the recipe: periodic evaluation, the toy world's before/after suite,
    experiment trackers (in that order: a tracker logs the evaluation's numbers of the same epoch)."""
    callbacks = []
    toyworld = config.evaluate.suite == "toyworld"
    if config.evaluate.every:
        from lora_grpo.evaluation.periodic import PeriodicEval

        extra = None
        if toyworld:
            from lora_grpo.toyworld.readout import periodic_metrics as extra
        callbacks.append(PeriodicEval(config.evaluate, config.train.epochs, extra))
    if toyworld:
        from lora_grpo.toyworld.suite import ToyworldSuite

        callbacks.append(ToyworldSuite(config.evaluate.images_per_set, config.evaluate.seed))
    if config.output.report_to:
        from lora_grpo.trackers import ExperimentTrackers

        callbacks.append(ExperimentTrackers(config.output.report_to))
    return callbacks


def describe(plan: RunPlan) -> str:
    """The dry run's report: the resolved config, where the run goes, and the work of one epoch."""
    from lora_grpo.tracking import epoch_work

    c = plan.config
    work = epoch_work(c)
    rounds, per_round = adversarial_work(c)
    what = f"resume {plan.checkpoint}" if plan.checkpoint else "new run"
    lines = [
        f"# lora-grpo train {plan.recipe_source}: dry run (nothing loaded, nothing written)",
        f"# run folder: {plan.run_dir} ({what})",
        f"# per epoch and process: {c.samples_per_epoch} samples ({c.sample.prompts_per_batch} prompts x G "
        f"{c.sample.group_size} x {c.sample.batches_per_epoch} batches); UNet passes (one image through the "
        f"UNet at one step; CFG counts two): sampling {work['sampling_passes']}, training "
        f"{work['training_passes']} forward+backward, KL reference {work['reference_passes']} forward; "
        f"{work['optimizer_steps']} optimizer steps",
        *(
            [f"# train.adversarial: {rounds} rounds of up to {per_round} UNet passes each (the attack)"]
            if rounds
            else []
        ),
        f"# {c.train.epochs} epochs: "
        f"{c.train.epochs * sum(v for k, v in work.items() if k.endswith('_passes')) + rounds * per_round} "
        "UNet passes in all",
    ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(to_dict(c), sort_keys=False)


def adversarial_work(config: Config) -> tuple[int, int]:
    """(rounds, UNet passes a round at most) of train.adversarial: a round after every `every`-th epoch."""
    from lora_grpo.adversarial import round_passes

    cfg = config.train.adversarial
    if cfg.method == "none":
        return 0, 0
    return config.train.epochs // cfg.every, round_passes(config, cfg.targets)


def local_prompt_notes(config: Config) -> list[str]:
    """The long-prompt notes of the recipe's prompt files (a dry run downloads no dataset)."""
    from lora_grpo.prompts import load_prompt_set, long_prompt_note

    sets = [load_prompt_set(s) for s in config.prompts.sets + config.evaluate.sets if s.path is not None]
    notes = [long_prompt_note(f"set '{s.name}'", s.prompts) for s in sets]
    return [n for n in notes if n]


def after_write_failure(plan: RunPlan, overrides: list[str]) -> str:
    """What to do once a run could not write: resume from its newest complete checkpoint, or start again."""
    from lora_grpo.checkpoint import complete_checkpoints
    from lora_grpo.runs import resume_command

    run_dir = plan.run_dir.resolve()
    if complete_checkpoints(run_dir):
        return f"free space, then continue with `{resume_command(plan.recipe_source, run_dir)}`"
    return f"free space, then start again with `{start_again(plan, overrides, '--overwrite')}`"


def start_again(plan: RunPlan, overrides: list[str], *extra: str) -> str:
    """The command, quoted to paste, that starts this run again from scratch in its folder."""
    return shlex.join(
        ["lora-grpo", "train", plan.recipe_source, *overrides, "--out", str(plan.run_dir.resolve()), *extra]
    )


def folder_gone(plan: RunPlan, overrides: list[str]) -> str:
    """The one line for a run folder deleted or moved while its run wrote to it."""
    return (
        f"the run folder {plan.run_dir} was deleted or moved while the run wrote to it: put it back and resume, "
        f"or start again with `{start_again(plan, overrides)}`"
    )


def run_train(args: argparse.Namespace) -> None:
    from lora_grpo.runs import resume_command
    from lora_grpo.train import Trainer

    plan = plan_run(args)
    try:
        callbacks = build_callbacks(plan.config)
        if args.dry_run:
            for note in local_prompt_notes(plan.config):
                print(note)
            print(describe(plan), end="")
            return
        trainer = Trainer(plan.config, plan.run_dir, callbacks=callbacks, recipe_source=plan.recipe_source)
        trainer.run(plan.checkpoint, plan.changes)
    except TrainingInterrupted as stop:
        stop.args = (f"{stop}; continue with `{resume_command(plan.recipe_source, plan.run_dir.resolve())}`",)
        raise
    except Exception as err:  # a full disk, a quota, a read-only mount: one line with what to do next
        if isinstance(err, OSError) and not plan.run_dir.is_dir():
            raise UserError(folder_gone(plan, args.overrides)) from None
        cause = str(err) if isinstance(err, WriteFailed) else write_failure(err, plan.run_dir)
        if cause is None:
            raise
        if not isinstance(err, WriteFailed):
            cause = f"{cause} writing the run folder {plan.run_dir}"
        raise WriteFailed(f"{cause}; {after_write_failure(plan, args.overrides)}") from None
    finally:
        if plan.lock is not None:
            plan.lock.release()
