"""`lora-grpo`: train a safety LoRA, sample from a model with or without it, evaluate, publish, list recipes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

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


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser; each subcommand's module adds its own (lora_grpo/commands/)."""
    from lora_grpo.commands import COMMANDS

    parser = argparse.ArgumentParser(
        prog="lora-grpo",
        description="Train a safety LoRA for Stable Diffusion with online GRPO and a CLIP steering reward.",
    )
    parser.add_argument("--version", action="version", version=f"lora-grpo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
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
