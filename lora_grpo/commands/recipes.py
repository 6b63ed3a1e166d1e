"""`lora-grpo recipes [show NAME]`: the shipped recipes (light: imports neither torch nor diffusers)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("recipes", help="list the shipped recipes (`recipes show NAME` prints one)")
    shows = p.add_subparsers(dest="recipes_command")
    show = shows.add_parser("show", help="print a recipe's YAML and where it lives, to copy and edit")
    show.add_argument("name", help="a shipped recipe name or a path to a recipe .yaml")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
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
