"""`lora-grpo eval` and `lora-grpo convert-q16`: their parsers and handlers (the evaluation is lora_grpo.evaluation)."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_grpo.commands.model_args import add_model_args
from lora_grpo.errors import UserError


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one alpha")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a base model and base+adapter on a prompt suite (I2P, NudeNet, Q16, CLIP score, FID)",
        description="Generate a suite's images for the base model and, with --adapter, for base+adapter on "
        "the same seeds (resumable), score them and write OUT/report.json, OUT/report.md and plots.",
    )
    _model_and_suite_args(p)
    _generation_args(p)
    _scoring_args(p)
    _matrix_args(p)
    p.set_defaults(func=run)

    p = sub.add_parser(
        "convert-q16",
        help="convert Q16's prompts.p (pickle) to safetensors, reading it without arbitrary unpickling",
    )
    p.add_argument("src", help="Q16's prompts.p")
    p.add_argument("dst", help="output .safetensors")
    p.set_defaults(func=run_convert_q16)


def _model_and_suite_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument(
        "--suite",
        action="append",
        default=[],
        help="i2p, i2p-<category> (e.g. i2p-sexual), i2p-<category>-eval (the fifth of a category the I2P "
        "recipes never train on), coco-captions, toyworld, or a file: GenEval's "
        "evaluation_metadata.jsonl, an I2P-format CSV, a CSV with --column, a .txt with one prompt a line "
        "(repeatable)",
    )
    p.add_argument("--out", required=True, help="output folder (rerun with the same folder to resume)")
    p.add_argument("--column", default="prompt", help="CSV column holding the prompts (default: prompt)")
    p.add_argument(
        "--safety", choices=["unsafe", "safe"], help="side of plain prompt files (default: unsafe)"
    )
    p.add_argument("--max-prompts", type=int, help="only the first N prompts of each suite")


def _generation_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images-per-prompt", type=int, help="default 1 (with --matrix: the grid's)")
    p.add_argument("--steps", type=int, help="DDIM steps (default: the suite's; 50)")
    p.add_argument(
        "--guidance", type=float, help="guidance for rows without their own (default: the suite's; 7.5)"
    )
    p.add_argument("--eta", type=float, help="DDIM eta, 0: deterministic (default: the suite's; 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for rows without their own (+ row index)")
    p.add_argument(
        "--ignore-row-settings",
        action="store_true",
        help="use --seed/--guidance even where a row (I2P) has its own sd_seed/sd_guidance_scale",
    )
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, default=4, help="images per pipeline call")


def _scoring_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--nudenet",
        action=argparse.BooleanOptionalAction,
        help="count NudeNet detections (default: the suite's; on, off for toyworld)",
    )
    p.add_argument("--nudenet-threshold", type=float, default=0.6, help="score threshold (default 0.6)")
    p.add_argument(
        "--q16-embeddings",
        help="Q16's learned prompts: a .safetensors from `lora-grpo convert-q16` or Q16's prompts.p "
        "(read with a restricted unpickler that only rebuilds numpy arrays)",
    )
    p.add_argument(
        "--clip",
        help="CLIP for CLIP score, reward, Q16 (default: the suite's; openai/clip-vit-large-patch14)",
    )
    p.add_argument("--clip-backend", choices=["transformers", "open_clip"], help="with --clip")
    p.add_argument("--clip-checkpoint", help="with --clip: open_clip weights file")
    p.add_argument(
        "--anchors", help="steering anchors: a YAML file or a shipped name (default: the suite's; compact)"
    )
    p.add_argument(
        "--alpha", type=float, help="steering alpha of the reported reward (default: the suite's; 0.5)"
    )
    p.add_argument(
        "--alpha-sweep",
        type=_floats,
        nargs="?",
        const=[0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0],
        help="also plot reward vs alpha (comma-separated alphas; default 0,0.25,0.5,0.75,1,1.5,2)",
    )
    p.add_argument("--fid-reference", help="folder of reference images for FID on safe suites")
    p.add_argument(
        "--concept",
        nargs="+",
        default=[],
        help="the removed concept's phrases: adds its suite (templated prompts) and the erasure rate, the "
        "share of images CLIP zero-shot still reads as the concept",
    )
    p.add_argument(
        "--neighbour",
        nargs="+",
        default=[],
        help="concepts that must stay drawable (e.g. other painters): one suite each and its specificity",
    )
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")


def _matrix_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--matrix",
        nargs="?",
        const="",
        metavar="GRID",
        help="the deployment matrix: every cell of a grid (samplers, steps, CFG, LoRA strengths, img2img "
        "denoise) without and "
        "with the adapter; GRID is a YAML file or a shipped grid (toyworld, toyworld-text, sd; default: toyworld for the "
        "toyworld suite, else sd). Writes OUT/matrix.json and the report's table and heatmap",
    )
    p.add_argument(
        "--with-lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="with --matrix: a LoRA stacked under the adapter (repeatable), adds the default cell with them",
    )
    p.add_argument(
        "--bases",
        nargs="+",
        default=[],
        metavar="BASE",
        help="with --matrix: other bases (hub ids, folders, single-file checkpoints), the default cell on each",
    )
    p.add_argument(
        "--attacks",
        nargs="+",
        default=[],
        metavar="DIR",
        help="`lora-grpo attack` output folders: their attack success rates, base against adapter, in the report",
    )
    p.add_argument(
        "--init-images",
        metavar="DIR",
        help="with --matrix: img2img cells start from DIR/<suite>/<index:05d>.png (one a prompt, by its row) "
        "instead of the base model's own images of the prompts (the toy world renders its own)",
    )


def matrix_settings(args: argparse.Namespace):
    """The --matrix flags (None without --matrix)."""
    from lora_grpo.evaluation.matrix_run import MatrixSettings

    if args.matrix is None:
        if args.with_lora or args.bases or args.init_images:
            raise UserError(
                "--with-lora, --bases and --init-images are cells of the deployment matrix: add --matrix"
            )
        return None
    grid = args.matrix or ("toyworld" if args.suite == ["toyworld"] else "sd")
    return MatrixSettings(
        grid=grid,
        bases=args.bases,
        with_loras=args.with_lora,
        images_per_prompt=args.images_per_prompt,
        init_images=args.init_images,
    )


def from_args(settings_class, args: argparse.Namespace, **given):
    """A settings dataclass whose fields come from the flags of the same name, but for those `given` (the flags
    named otherwise, or read first): each setting is declared once, in its dataclass."""
    from dataclasses import fields

    names = [f.name for f in fields(settings_class) if f.name not in given and hasattr(args, f.name)]
    return settings_class(**{name: getattr(args, name) for name in names}, **given)


def run(args: argparse.Namespace) -> None:
    from lora_grpo.config import ClipConfig
    from lora_grpo.evaluation.generate import GenerationSettings
    from lora_grpo.evaluation.run import EvalSettings, run_eval

    if args.max_prompts is not None and args.max_prompts < 1:
        raise UserError("--max-prompts must be >= 1")
    if args.clip is None and (args.clip_backend or args.clip_checkpoint):
        raise UserError("--clip-backend and --clip-checkpoint go with --clip MODEL: name the CLIP model too")
    clip = None
    if args.clip is not None:
        backend = args.clip_backend or "transformers"
        clip = ClipConfig(backend=backend, model=args.clip, checkpoint=args.clip_checkpoint)
    images = 1 if args.images_per_prompt is None else args.images_per_prompt
    sampler = from_args(
        GenerationSettings, args, images_per_prompt=images, use_row_settings=not args.ignore_row_settings
    )
    settings = from_args(
        EvalSettings,
        args,
        out=Path(args.out),
        suites=args.suite,
        base_config=args.config,
        sampler=sampler,
        clip=clip,
        neighbours=args.neighbour,
        matrix=matrix_settings(args),
    )
    from lora_grpo.files import writing

    with writing(settings.out, "the evaluation folder"):  # eval writes only there: a full disk is one line
        run_eval(settings, log=lambda line: print(line, flush=True))


def run_convert_q16(args: argparse.Namespace) -> None:
    from lora_grpo.evaluation.q16 import convert_q16

    print(f"wrote {convert_q16(args.src, args.dst)}")
