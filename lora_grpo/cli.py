"""`lora-grpo`: train a safety LoRA, sample from a model with or without it, evaluate, publish, list recipes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from lora_grpo import __version__
from lora_grpo.errors import UserError, write_failure
from lora_grpo.stopping import TrainingInterrupted

# Commands that never load a model: they import neither torch nor diffusers, and answer at once.
LIGHT_COMMANDS = ("recipes",)


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
    from lora_grpo.train_command import run_train

    run_train(args)


def cmd_recipes(args: argparse.Namespace) -> None:
    from lora_grpo.recipe_files import find_recipe, recipe_summary, shipped_recipes

    if args.recipes_command == "show":
        path = find_recipe(args.name)
        print(f"# {path}  (copy it, edit it, run: lora-grpo train my-recipe.yaml)")
        print(path.read_text(encoding="utf-8"), end="")
        return
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
    from lora_grpo.reward_check import check_recipe_images

    print(
        check_recipe_images(
            config, reward_fn, args.safe_images, args.unsafe_images, args.per_set, args.prompt
        )
    )


def cmd_new_recipe(args: argparse.Namespace) -> None:
    from lora_grpo.new_recipe import ConceptSpec, write_recipe

    spec = ConceptSpec(
        name=args.name,
        remove=tuple(args.remove),
        instead=tuple(args.instead),
        prompts=Path(args.prompts) if args.prompts else None,
        safe_prompts=Path(args.safe_prompts) if args.safe_prompts else None,
        base=args.base,
        parent=args.parent,
    )
    if bool(args.safe_images) != bool(args.unsafe_images):
        raise UserError("new-recipe checks the reward with both --safe-images DIR and --unsafe-images DIR")
    recipe = write_recipe(spec, Path(args.out))
    print(f"wrote {recipe.parent}/ ({recipe.name}, anchors.yaml, prompts/)")
    from lora_grpo.prompts import long_prompt_note, read_prompt_lines

    for prompt_file in sorted((recipe.parent / "prompts").glob("*.txt")):
        if note := long_prompt_note(f"{prompt_file.name}", read_prompt_lines(prompt_file)):
            print(note)
    if args.safe_images:
        from lora_grpo.config import load_config
        from lora_grpo.models import pick_device
        from lora_grpo.reward_check import check_recipe_images
        from lora_grpo.rewards import build_reward

        config = load_config(recipe)
        reward_fn = build_reward(config.reward, pick_device())
        print(check_recipe_images(config, reward_fn, args.safe_images, args.unsafe_images))
    print(f"train it: lora-grpo train {recipe}")


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

    export(
        args.src,
        args.out,
        name=args.name,
        repo_id=args.repo,
        license=args.license,
        fused=args.fused,
        overwrite=args.overwrite,
        checkpoint=args.checkpoint,
    )


def cmd_push(args: argparse.Namespace) -> None:
    from lora_grpo.hub.push import push

    url = push(args.folder, args.repo, private=args.private, revision=args.revision, token=args.token)
    print(f"pushed {args.folder} to {args.repo}: {url}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-grpo",
        description="Train a safety LoRA for Stable Diffusion with online GRPO and a CLIP steering reward.",
    )
    parser.add_argument("--version", action="version", version=f"lora-grpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "train",
        help="train a safety LoRA from a recipe",
        description="Train a safety LoRA from a recipe. Every recipe key is documented, one comment per "
        "field, in lora_grpo/config.py (the README's Recipes section shows a whole recipe); "
        "`lora-grpo recipes show NAME` prints a shipped recipe to copy and edit.",
    )
    p.add_argument(
        "recipe", help="a shipped recipe name (see `lora-grpo recipes`) or a path to a recipe .yaml"
    )
    p.add_argument(
        "overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=3e-5 sample.num_steps=20"
    )
    p.add_argument("--out", help="run directory (default: runs/<recipe>-<timestamp>); must be new or empty")
    p.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue from a checkpoint: auto = the newest complete one of the run of this recipe created "
        "last under ./runs (or of --out), PATH = a run folder or RUN/checkpoints/epoch_N",
    )
    p.add_argument("--overwrite", action="store_true", help="delete the run in --out first and start again")
    p.add_argument(
        "--change-settings",
        action="store_true",
        help="with --resume: train on with overrides of settings other than the epoch cap and the logging, "
        "checkpoint and evaluation cadence (applied to the optimizer too; recorded in run.json)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check the recipe, paths and output folder, print the resolved config and the work per epoch, "
        "load nothing",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="generate images from a base model, with or without an adapter")
    p.add_argument(
        "--base",
        required=True,
        help="hub id, local diffusers folder, single-file .safetensors checkpoint, or builtin:tiny-sd",
    )
    p.add_argument("--adapter", help="adapter folder (a run's adapter/) or .safetensors file")
    p.add_argument("--config", help="single-file --base only: a diffusers folder whose configs fit it")
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
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("recipes", help="list the shipped recipes (`recipes show NAME` prints one)")
    shows = p.add_subparsers(dest="recipes_command")
    show = shows.add_parser("show", help="print a recipe's YAML and where it lives, to copy and edit")
    show.add_argument("name", help="a shipped recipe name or a path to a recipe .yaml")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser(
        "new-recipe",
        help="write a recipe folder that removes a concept you name (object, style, person, harm category)",
    )
    p.add_argument("name", help="the recipe's name: writes OUT/NAME/NAME.yaml, anchors.yaml, prompts/")
    p.add_argument("--remove", nargs="+", required=True, help='the concept, one or more phrases ("a car")')
    p.add_argument(
        "--instead", nargs="+", required=True, help='what to draw in its place ("a bicycle", "an empty road")'
    )
    p.add_argument(
        "--prompts", help="unsafe prompts, one per line (default: templates around the --remove phrases)"
    )
    p.add_argument(
        "--safe-prompts", help="safe prompts, one per line (default: the parent recipe's safe sets)"
    )
    p.add_argument("--base", help="model.base for the recipe (default: the parent recipe's)")
    p.add_argument(
        "--from",
        dest="parent",
        default="sd15-nudity-compact",
        help="the recipe it extends, for every other setting (default: sd15-nudity-compact)",
    )
    p.add_argument("--out", default=".", help="folder to write NAME/ into (default: the current folder)")
    p.add_argument("--safe-images", help="with --unsafe-images: check the new reward orders these right")
    p.add_argument("--unsafe-images", help="images showing the concept")
    p.set_defaults(func=cmd_new_recipe)

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
    p.add_argument(
        "src", nargs="?", help="a run directory (with adapter/ and config.yaml) or an adapter folder"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--name", help="adapter name (default: the recipe name)")
    p.add_argument("--repo", help="the Hub repo id used in the card's usage snippet (user/name)")
    p.add_argument("--license", default="creativeml-openrail-m", help="license in the card and metadata")
    p.add_argument(
        "--fused", action="store_true", help="also write fused/: the base pipeline with the adapter merged"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier export in --out whole (none of its files stay)",
    )
    p.add_argument(
        "--checkpoint",
        metavar="RUN/checkpoints/epoch_N",
        help="export this complete checkpoint (of a run that may still be training) instead of SRC",
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
        # the usage of the command that was typed, not the top level's
        command = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        command.choices[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command not in LIGHT_COMMANDS:
            _quiet_libraries()  # imports diffusers and transformers: only for commands that load them
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
    except BrokenPipeError:  # `lora-grpo recipes | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:  # a storage failure no command named a path for: still one line
        cause = write_failure(err)
        if cause is None:
            raise
        where = f" writing {err.filename}" if getattr(err, "filename", None) else ""
        print(
            f"lora-grpo: error: {cause}{where}: free space (or fix the mount), then run it again",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
