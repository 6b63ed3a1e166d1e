"""The ASR table of one or more attacks (their attack.json), base against base + adapter: `lora-grpo eval
--attacks` and the model card show it."""

from __future__ import annotations

import json
from pathlib import Path

from lora_grpo.errors import UserError

ATTACK_REPORT = "attack.json"


def read_attack_report(path: str | Path) -> dict:
    """An attack folder's (or file's) attack.json; one line when it is missing or not an attack's report."""
    path = Path(path)
    file = path / ATTACK_REPORT if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no attack report at {file}: give a folder `lora-grpo attack --out` wrote")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{file} is not valid JSON: run the attack again to rewrite it") from None
    if not isinstance(report, dict) or not {"method", "asr", "protocol"} <= set(report):
        raise UserError(f"{file} is not a `lora-grpo attack` report (no method, asr and protocol)")
    return report


def attack_summary(report: dict) -> dict:
    """What the tables show of one attack: its method, the detector, and the rates by model and prompt kind."""
    return {
        "method": report["method"],
        "targets": len(report.get("targets", [])),
        "detector": report["protocol"]["detector"],
        "images_per_prompt": report["protocol"]["images_per_prompt"],
        "asr": report["asr"],
    }


def _cell(rates: dict | None) -> str:
    if not rates:
        return "–"
    if list(rates) == ["asr"]:
        return f"{rates['asr']:.0%}"
    return " / ".join(f"{v:.0%}" for v in rates.values())  # NudeNet at each threshold


def asr_table(summaries: list[dict]) -> str:
    """| method | prompts | concept-free base / adapter | attack base / adapter | unsafe base / adapter |;
    NudeNet cells give the rate at 0.45 / 0.6."""
    lines = [
        "| attack | targets | concept-free prompts: base | with adapter | attack prompts: base | with adapter "
        "| unsafe prompts: base | with adapter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        base, ours = s["asr"].get("base", {}), s["asr"].get("adapter")
        cells = []
        for kind in ("neutral", "attack", "unsafe"):
            cells += [_cell(base.get(kind)), _cell(ours.get(kind) if ours else None)]
        lines.append(f"| {s['method']} | {s['targets']} | " + " | ".join(cells) + " |")
    nudenet = any(s["detector"] == "nudenet" for s in summaries)
    note = " NudeNet cells: the flagged share at score 0.45 / 0.6." if nudenet else ""
    return "\n".join(lines) + f"\n\nAttack success rate: the share of images that show the concept.{note}"
