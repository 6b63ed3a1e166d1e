"""`lora-grpo attack`: adversarial prompts and embeddings against a safety adapter (lora_grpo.attacks)."""

from __future__ import annotations

import argparse

METHODS = ("ring-a-bell", "mma", "unlearndiff", "concept-inversion")  # lora_grpo.attacks.methods.METHODS


def add_parser(sub) -> None:
    p = sub.add_parser(
        "attack",
        help="search prompts (or a token embedding) that bring the recipe's concept back; ASR on base and adapter",
    )
    p.add_argument(
        "--base", required=True, help="hub id, diffusers folder, single-file checkpoint or builtin:NAME"
    )
    p.add_argument("--adapter", help="the safety adapter attacked (a run's adapter/ or a .safetensors file)")
    p.add_argument(
        "--recipe",
        required=True,
        help="the recipe the adapter was trained with: its unsafe prompts "
        "are the targets, its anchors' concept words are banned",
    )
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--out", required=True, help="output folder (a rerun with the same settings continues it)")
    p.add_argument("--ban", nargs="*", default=[], help="more words an attack prompt must not contain")
    p.add_argument("--targets", type=int, default=8, help="unsafe prompts attacked (default 8)")
    p.add_argument("--tokens", type=int, default=6, help="attack tokens (unlearndiff: the prefix)")
    p.add_argument(
        "--steps",
        type=int,
        help="search steps or generations (default 40), inversion steps (concept-inversion: default 200)",
    )
    p.add_argument(
        "--images-per-prompt", type=int, help="images a prompt for the ASR (default: toy world 16, SD 4)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--learning-rate", type=float, default=5e-3, help="concept-inversion: Adam's step on the embedding"
    )
    p.add_argument(
        "--candidates",
        type=int,
        default=16,
        help="mma and unlearndiff: token swaps scored a step (default 16)",
    )
    p.add_argument(
        "--lowest-timestep",
        type=float,
        default=0.3,
        help="concept-inversion: train on timesteps from this share of T up (default 0.3: the noisy end)",
    )
    p.add_argument(
        "--sample-steps", type=int, help="ASR sampler steps (default: the protocol's: toy world 20, SD 50)"
    )
    p.add_argument(
        "--guidance", type=float, help="ASR sampler CFG (default: the protocol's: toy world 1, SD 7.5)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="images a pipeline call")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument("--overwrite", action="store_true", help="delete --out first and start again")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from lora_grpo.attacks.methods import AttackSettings
    from lora_grpo.attacks.run import AttackJob, run_attack

    settings = AttackSettings(
        method=args.method,
        tokens=args.tokens,
        steps=args.steps or (200 if args.method == "concept-inversion" else 40),
        seed=args.seed,
        learning_rate=args.learning_rate,
        lowest_timestep=args.lowest_timestep,
        batch=args.candidates,
    )
    job = AttackJob(
        base=args.base,
        adapter=args.adapter,
        recipe=args.recipe,
        out=Path(args.out),
        settings=settings,
        ban=tuple(args.ban),
        targets=args.targets,
        images_per_prompt=args.images_per_prompt,
        batch=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        sample_steps=args.sample_steps,
        guidance=args.guidance,
    )
    run_attack(job, log=lambda line: print(line, flush=True))
