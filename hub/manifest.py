"""An export's manifest: every file's size and sha256, written last, so `push` can tell a complete export from
a damaged or partly written one before it contacts the Hub.

The model card (README.md) is meant to be edited before publishing: it is listed, but `push` only checks that
it is there, not empty, and opens with its metadata block.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lora_grpo.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "lora-grpo-export/1"
EDITABLE = ("README.md",)  # files the user may change after export


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder` except the manifest, as sorted POSIX paths relative to it."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(folder: Path) -> Path:
    """MANIFEST listing every file of `folder` (size, sha256)."""
    files = {
        name: {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
        for name in folder_files(folder)
    }
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, "files": files}, indent=2) + "\n", encoding="utf-8")
    return path


def read_manifest(folder: Path) -> dict[str, dict]:
    path = folder / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{folder} has no {MANIFEST}: it is not a complete export; run `lora-grpo export` again"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = data["files"]
        if data.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        raise UserError(f"{path} is damaged: run `lora-grpo export` again") from None
    return files


def verify_export(folder: Path) -> None:
    """Every file the manifest lists is there with its size and sha256 (the card: there, non-empty, with its
    metadata block). Files the user added (an example image for the card) are not checked."""
    listed = read_manifest(folder)
    redo = "run `lora-grpo export` again"
    for name, entry in listed.items():
        path = folder / name
        if not path.is_file():
            raise UserError(f"export {folder} is incomplete: {name} is missing; {redo}")
        if name in EDITABLE:
            text = path.read_text(encoding="utf-8", errors="replace")
            if not text.startswith("---"):
                raise UserError(
                    f"export {folder}: {name} is empty or lost its metadata block (the '---' lines at the top); "
                    f"restore it or {redo}"
                )
            continue
        if path.stat().st_size != entry.get("size") or sha256_of(path) != entry.get("sha256"):
            raise UserError(f"export {folder} is damaged: {name} differs from its manifest entry; {redo}")
