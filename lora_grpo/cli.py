"""`lora-grpo`: train a safety LoRA, sample from a model with or without it, evaluate, publish, list recipes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from lora_grpo.errors import UserError
from lora_grpo.stopping import TrainingInterrupted


def _quiet_libraries() -> None:
    """Keep the console for our progress lines: library progress bars and info logs off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def cmd_train(args: argparse.Namespace) -> None:
    from lora_grpo.config import load_config
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.train import train

    config = load_config(find_recipe(args.recipe), args.overrides)
    run_dir, resume = (Path(args.out) if args.out else None), None
    if args.resume:
        from lora_grpo.checkpoint import find_resume_checkpoint, run_dir_of

        where = str(run_dir) if args.resume == "auto" and run_dir else args.resume
        resume = find_resume_checkpoint(where, Path("runs"), config.name)
        run_dir = run_dir_of(resume)
        # the run's own resolved config; command-line overrides (e.g. more train.epochs) still apply
        config = load_config(run_dir / "config.yaml", args.overrides)
    train(config, run_dir, resume=resume, callbacks=build_callbacks(config))


def build_callbacks(config) -> list:
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


def cmd_recipes(args: argparse.Namespace) -> None:
    from lora_grpo.recipe_files import recipe_summary, shipped_recipes

    recipes = shipped_recipes()
    width = max((len(n) for n in recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_summary(path)}")


def cmd_sample(args: argparse.Namespace) -> None:
    from lora_grpo.generate import run_sample

    run_sample(args)


def cmd_check_reward(args: argparse.Namespace) -> None:
    from lora_grpo.config import load_config
    from lora_grpo.models import pick_device
    from lora_grpo.prompts import load_prompt_set
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.rewards import build_reward

    config = load_config(find_recipe(args.recipe), args.overrides)
    rendered = config.evaluate.suite == "toyworld" and not (args.safe_images or args.unsafe_images)
    if not rendered and not (args.safe_images and args.unsafe_images):
        raise UserError("check-reward needs --safe-images DIR and --unsafe-images DIR for this recipe")
    reward_fn = build_reward(config.reward, pick_device())
    if rendered:
        from lora_grpo.toyworld.ordering import format_ordering, reward_ordering
        from lora_grpo.toyworld.world import safe_compositions, unsafe_compositions

        rows = reward_ordering(reward_fn, unsafe_compositions() + safe_compositions()[::5])
        print(format_ordering(rows, config.reward.alpha))
        return
    from lora_grpo.reward_check import check_reward, format_rows, load_image_folder

    if args.prompt:
        prompts = [(p, "unsafe") for p in args.prompt]
    else:
        prompts = []
        for s in config.prompts.sets:
            prompts += [(p, s.safety) for p in load_prompt_set(s).prompts[: args.per_set]]
    rows = check_reward(
        reward_fn, prompts, load_image_folder(args.safe_images), load_image_folder(args.unsafe_images)
    )
    print(format_rows(rows, config.reward.alpha))


def cmd_toyworld_build(args: argparse.Namespace) -> None:
    from lora_grpo.toyworld.build import BuildSettings, build

    settings = BuildSettings(seed=args.seed)
    if args.smoke:
        settings = BuildSettings(
            seed=args.seed, vae_steps=3, clip_steps=3, unet_steps=3, unet_pool=64, held_out_images=4
        )
    build(args.out, settings, log=lambda line: print(line, flush=True))


def cmd_export(args: argparse.Namespace) -> None:
    from lora_grpo.hub.export import export

    export(args.src, args.out, name=args.name, repo_id=args.repo, license=args.license, fused=args.fused)


def cmd_push(args: argparse.Namespace) -> None:
    from lora_grpo.hub.push import push

    url = push(args.folder, args.repo, private=args.private, revision=args.revision, token=args.token)
    print(f"pushed {args.folder} to {args.repo}: {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-grpo",
        description="Train a safety LoRA for Stable Diffusion with online GRPO and a CLIP steering reward.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a safety LoRA from a recipe")
    p.add_argument(
        "recipe", help="a shipped recipe name (see `lora-grpo recipes`) or a path to a recipe .yaml"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=3e-5 sample.num_steps=20"
    )
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<timestamp>)")
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from a checkpoint: auto = the newest complete one of this recipe's newest run under "
        "./runs (or of --out), PATH = a run folder or RUN/checkpoints/epoch_N",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images from a base model, with or without an adapter")
    p.add_argument("--base", required=True, help="hub id, local diffusers folder, or builtin:tiny-sd")
    p.add_argument("--adapter", help="adapter folder (a run's adapter/) or .safetensors file")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="one prompt")
    group.add_argument("--prompts", help="text file with one prompt per line")
    p.add_argument("--out", default="samples", help="output folder for PNG files (default: samples)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; each next image adds 1")
    p.add_argument("--adapter-scale", type=float, default=1.0, help="LoRA weight (0 disables it)")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser(
        "check-reward", help="check that the reward ranks safe above unsafe at the recipe's alpha"
    )
    p.add_argument("recipe", help="a shipped recipe name or a path to a recipe .yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. reward.alpha=0.8")
    p.add_argument("--safe-images", help="folder of safe images (not needed for toy-world recipes)")
    p.add_argument("--unsafe-images", help="folder of unsafe images")
    p.add_argument(
        "--prompt", action="append", help="an unsafe prompt to check (repeatable); default: the recipe's"
    )
    p.add_argument("--per-set", type=int, default=3, help="prompts taken from each of the recipe's sets")
    p.set_defaults(func=cmd_check_reward)

    p = sub.add_parser(
        "export", help="write a publishable folder: diffusers + ComfyUI files, model card, recipe"
    )
    p.add_argument("src", help="a run directory (with adapter/ and config.yaml) or an adapter folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="adapter name (default: the recipe name)")
    p.add_argument("--repo", help="the Hub repo id used in the card's usage snippet (user/name)")
    p.add_argument("--license", default="creativeml-openrail-m", help="license in the card and metadata")
    p.add_argument(
        "--fused", action="store_true", help="also write fused/: the base pipeline with the adapter merged"
    )
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    p.add_argument("folder", help="a folder written by `lora-grpo export`")
    p.add_argument("--repo", required=True, help="user/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if needed)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login); never printed")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("toyworld", help="the toy world's models")
    toy = p.add_subparsers(dest="toyworld_command", required=True)
    b = toy.add_parser("build", help="train the toy world's base model and reward CLIP from scratch")
    b.add_argument("out", help="output folder (gets toyworld-sd/ and toyworld-clip/)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--smoke", action="store_true", help="a few steps per stage (checks the pipeline, not quality)"
    )
    b.set_defaults(func=cmd_toyworld_build)

    from lora_grpo.evaluation.command import add_parsers as add_eval_parsers

    add_eval_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may also follow options (`train RECIPE --out DIR a.b=1`), which argparse leaves over
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _quiet_libraries()
        args.func(args)
    except UserError as err:
        print(f"lora-grpo: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        print(f"lora-grpo: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("lora-grpo: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
