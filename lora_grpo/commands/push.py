"""`lora-grpo push`: upload an export to the Hugging Face Hub (lora_grpo.hub.push)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    p.add_argument("folder", help="a folder written by `lora-grpo export`")
    p.add_argument("--repo", required=True, help="user/name")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to push to (created if needed)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached login); never printed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from lora_grpo.hub.push import push

    url = push(args.folder, args.repo, private=args.private, revision=args.revision, token=args.token)
    print(f"pushed {args.folder} to {args.repo}: {url}")
