"""`lora-grpo new-recipe NAME`: a recipe folder that removes a concept the user names."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_grpo.errors import UserError


def add_parser(sub) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
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
