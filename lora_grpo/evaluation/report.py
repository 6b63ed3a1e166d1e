"""report.json (every number with its settings), report.md (base vs adapter with deltas) and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora_grpo.evaluation.nudity import EXPOSED_CLASSES
from lora_grpo.evaluation.suites import I2P_CATEGORIES
from lora_grpo.files import write_text_atomically

# (label, path into a suite's metrics, format, lower is better)
ROWS = [
    ("images", ("images",), "{:.0f}", None),
    ("inappropriate rate (Q16 or NudeNet)", ("inappropriate", "all", "rate"), "{:.2%}", True),
    ("Q16 inappropriate rate", ("q16", "rate"), "{:.2%}", True),
    ("NudeNet: images with exposed classes", ("nudenet", "images_flagged"), "{:.0f}", True),
    ("NudeNet: exposed detections", ("nudenet", "detections"), "{:.0f}", True),
    ("CLIP score", ("clip_score",), "{:.2f}", False),
    ("steering reward", ("steering_reward",), "{:.4f}", False),
    ("FID", ("fid",), "{:.2f}", True),
    ("toy world: red rate", ("toyworld", "red_rate"), "{:.2%}", True),
    ("toy world: colour+position accuracy (safe)", ("toyworld", "safe_colour_position"), "{:.2%}", False),
    ("zero-shot: read as the concept / this neighbour", ("zero_shot", "rate"), "{:.2%}", None),
]


def lookup(metrics: dict, path: tuple[str, ...]):
    node = metrics
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def table_rows(suite_metrics: dict[str, dict]) -> list[tuple[str, object, object, object]]:
    """[(label, base, adapter, delta)] for every row that has a base value; values unformatted."""
    base, adapter = suite_metrics.get("base", {}), suite_metrics.get("adapter")
    rows = []
    for label, path, _fmt, _lower in ROWS:
        b = lookup(base, path)
        if b is None:
            continue
        a = lookup(adapter, path) if adapter is not None else None
        delta = (a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append((label, b, a, delta))
    for category in I2P_CATEGORIES:
        b = lookup(base, ("inappropriate", category, "rate"))
        if b is None:
            continue
        a = lookup(adapter, ("inappropriate", category, "rate")) if adapter is not None else None
        rows.append((f"  inappropriate: {category}", b, a, (a - b) if a is not None else None))
    return rows


def _format_of(label: str) -> str:
    if label.startswith("  inappropriate"):
        return "{:.2%}"
    return next(f for lab, _p, f, _l in ROWS if lab == label)


def _fmt(value, label: str) -> str:
    return "–" if value is None else _format_of(label).format(value)


def _fmt_delta(value, label: str) -> str:
    """Signed difference; rates in percentage points."""
    if value is None:
        return "–"
    sign = "+" if value >= 0 else "−"
    fmt = _format_of(label)
    if fmt.endswith("%}"):
        return f"{sign}{abs(value) * 100:.2f} pt"
    return sign + fmt.format(abs(value))


def markdown(report: dict) -> str:
    s = report["settings"]
    # the harm classifiers read nothing in the toy world's coloured shapes: not even "not run" there
    harm = any(spec != "toyworld" for spec in s["suites"]) or bool(s.get("concept"))
    lines = [
        "# Evaluation report",
        "",
        f"- base model: `{s['base']}`",
        f"- adapter: `{s['adapter']}`" if s["adapter"] else "- adapter: none (base only)",
        f"- sampler: {s['sampler']['steps']} steps, eta {s['sampler']['eta']}, guidance "
        f"{s['sampler']['guidance']} (rows' own seeds and guidance: {s['sampler']['use_row_settings']}), "
        f"{s['sampler']['images_per_prompt']} image(s) per prompt",
        f"- NudeNet threshold: {s['nudenet_threshold']} (the 9 *_EXPOSED classes)"
        if s["nudenet"]
        else "- NudeNet: not run",
        f"- CLIP: {s['clip']['backend']} `{s['clip']['model']}`; steering alpha {s['alpha']}",
        f"- Q16 embeddings: `{s['q16_embeddings']}`" if s["q16_embeddings"] else "- Q16: not run",
        "",
    ]
    if not harm:
        lines = [line for line in lines if not line.endswith(": not run")]
    ripple = ripple_table(report)
    if ripple:
        lines += ["## What else moved (erasure and specificity)", "", ripple, ""]
    lines.append(suite_tables(report, level="##"))
    if report.get("attacks"):
        from lora_grpo.evaluation.attack_report import asr_table

        lines += ["## Attacks", "", asr_table(report["attacks"]), ""]
    if report.get("alpha_sweep"):
        lines += ["## Steering reward vs alpha", "", "![alpha sweep](alpha_sweep.png)", ""]
    for name in report.get("plots", []):
        if name != "alpha_sweep.png":
            lines.append(f"![{name}]({name})")
    return "\n".join(lines) + "\n"


def suite_tables(report: dict, level: str = "###") -> str:
    """One markdown table per suite: metric | base | adapter | delta (also used by the model card)."""
    lines = []
    for suite, per_variant in report["suites"].items():
        lines += [f"{level} {suite}", "", "| metric | base | adapter | Δ |", "|---|---|---|---|"]
        classifiers = lookup(per_variant.get("base", {}), ("inappropriate", "classifiers")) or []
        for label, b, a, d in table_rows(per_variant):
            shown = label.strip()
            if shown.startswith("inappropriate rate"):
                shown = f"inappropriate rate ({' or '.join(classifiers)})"
            delta = "–" if shown == "images" else _fmt_delta(d, label)
            lines.append(f"| {shown} | {_fmt(b, label)} | {_fmt(a, label)} | {delta} |")
        lines.append("")
    return "\n".join(lines)


def ripple_rows(report: dict) -> list[tuple[str, str, float, float | None]]:
    """[(suite, read as, base rate, adapter rate)] for the concept and neighbour suites, in report order."""
    rows = []
    for suite, per_variant in report["suites"].items():
        base = lookup(per_variant.get("base", {}), ("zero_shot",))
        if base is None:
            continue
        adapter = lookup(per_variant.get("adapter", {}), ("zero_shot", "rate"))
        rows.append((suite, " / ".join(base["read_as"]), base["rate"], adapter))
    return rows


def ripple_table(report: dict) -> str:
    """Erasure (the concept's suite) and specificity (each neighbour's) in one table, with the zero-shot
    labels stated (also used by the model card); '' when the evaluation had no --concept."""
    rows = ripple_rows(report)
    if not rows:
        return ""
    labels = next(
        v["base"]["zero_shot"]["labels"]
        for v in report["suites"].values()
        if "zero_shot" in v.get("base", {})
    )
    lines = [
        "| suite | share of images CLIP reads as | base | adapter | Δ |",
        "|---|---|---|---|---|",
    ]
    for suite, read_as, b, a in rows:
        delta = "–" if a is None else f"{'+' if a >= b else '−'}{abs(a - b) * 100:.2f} pt"
        shown_a = "–" if a is None else f"{a:.2%}"
        lines.append(f"| {suite} | {read_as} | {b:.2%} | {shown_a} | {delta} |")
    lines += ["", "Zero-shot labels (nearest by cosine): " + "; ".join(f"`{x}`" for x in labels) + "."]
    return "\n".join(lines)


def write_report(out: Path, report: dict, extra_markdown: str = "") -> None:
    """report.json, and report.md with `extra_markdown` (a further section) at its end."""
    write_text_atomically(out / "report.json", json.dumps(report, indent=2))
    text = markdown(report)
    write_text_atomically(out / "report.md", f"{text}\n\n{extra_markdown}\n" if extra_markdown else text)


# ----------------------------------------------------------------------------------------------- plots
def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(path: Path, title: str, labels: list[str], series: dict[str, list[float]], ylabel: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4))
    width = 0.8 / max(1, len(series))
    for k, (name, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, values, width=width, label=name)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_categories(out: Path, suite: str, per_variant: dict) -> str | None:
    cats = [
        c
        for c in ("all",) + I2P_CATEGORIES
        if lookup(per_variant["base"], ("inappropriate", c, "rate")) is not None
    ]
    if not cats:
        return None
    series = {
        v: [lookup(m, ("inappropriate", c, "rate")) or 0.0 for c in cats] for v, m in per_variant.items()
    }
    name = f"{suite}_inappropriate_by_category.png"
    _bars(out / name, f"{suite}: inappropriate rate (Q16 or NudeNet)", cats, series, "rate")
    return name


def plot_nudenet(out: Path, suite: str, per_variant: dict) -> str | None:
    if lookup(per_variant["base"], ("nudenet", "per_class")) is None:
        return None
    labels = [c.removesuffix("_EXPOSED").lower() for c in EXPOSED_CLASSES]
    series = {v: [m["nudenet"]["per_class"][c] for c in EXPOSED_CLASSES] for v, m in per_variant.items()}
    name = f"{suite}_nudenet_classes.png"
    threshold = per_variant["base"]["nudenet"]["threshold"]
    _bars(out / name, f"{suite}: NudeNet exposed detections (score >= {threshold})", labels, series, "count")
    return name


def plot_ripple(out: Path, report: dict) -> str | None:
    """Erasure and specificity, base vs adapter, one bar pair per concept / neighbour suite."""
    rows = ripple_rows(report)
    if not rows:
        return None
    series = {"base": [r[2] for r in rows]}
    if any(r[3] is not None for r in rows):
        series["adapter"] = [r[3] or 0.0 for r in rows]
    _bars(
        out / "ripple.png",
        "share of images CLIP reads as the suite's concept",
        [r[0] for r in rows],
        series,
        "rate",
    )
    return "ripple.png"


def plot_alpha_sweep(out: Path, sweep: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for variant, sides in sweep["curves"].items():
        for side, values in sides.items():
            style = "-" if side == "unsafe" else "--"
            ax.plot(sweep["alphas"], values, style, marker="o", label=f"{variant}, {side} prompts")
    ax.set_xlabel("alpha")
    ax.set_ylabel("mean steering reward")
    ax.set_title("steering reward vs alpha")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "alpha_sweep.png", dpi=110)
    plt.close(fig)
    return "alpha_sweep.png"


def image_grid(out: Path, pairs: list[tuple[str, torch.Tensor, torch.Tensor | None]]) -> str | None:
    """Matched base/adapter images (same prompt and seed): one column per prompt, base row over adapter row."""
    from lora_grpo.tracking import save_grid

    if not pairs:
        return None
    tiles, captions = [], []
    rows = [("base", 1)] + ([("adapter", 2)] if pairs[0][2] is not None else [])
    for label, idx in rows:
        for prompt, base_img, adapter_img in pairs:
            tiles.append(base_img if idx == 1 else adapter_img)
            captions.append(f"{label}: {prompt}")
    save_grid(torch.stack(tiles), captions, out / "matched_grid.png", cell=160, columns=len(pairs))
    return "matched_grid.png"
