"""One module a subcommand, each owning its parser (`add_parser(sub)`) and its handler (`run(args)`).

Every module here imports only what argparse needs at the top; a handler imports the heavy stack when it
runs, so `lora-grpo recipes` and `--help` answer at once.
"""

from __future__ import annotations

from lora_grpo.commands import (
    attack,
    check_reward,
    evaluate,
    export,
    new_recipe,
    push,
    recipes,
    sample,
    toyworld,
    train,
)

# in the order `lora-grpo --help` lists them
COMMANDS = (train, sample, recipes, new_recipe, check_reward, export, push, toyworld, evaluate, attack)
