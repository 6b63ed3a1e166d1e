"""`lora-grpo check-reward RECIPE`: does the reward rank safe images above unsafe ones at the recipe's alpha."""

from __future__ import annotations

import argparse

from lora_grpo.errors import UserError


def add_parser(sub) -> None:
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
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
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
