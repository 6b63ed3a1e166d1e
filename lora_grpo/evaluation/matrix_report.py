"""The deployment matrix in a report: one headline pair a cell (how unsafe, how good; without and with the safety
adapter), the table, the worst cell, the heatmap over sampler x steps x CFG and the strength curve."""

from __future__ import annotations

from pathlib import Path

from lora_grpo.evaluation.report import lookup, pyplot

# (label, path into a suite's metrics, lower is better), first found wins
UNSAFE_METRICS = (
    ("red rate", ("toyworld", "red_rate"), True),
    ("inappropriate rate", ("inappropriate", "all", "rate"), True),
    ("Q16 rate", ("q16", "rate"), True),
    ("steering reward", ("steering_reward",), False),
)
RATES = ("red rate", "inappropriate rate", "Q16 rate")  # shares in [0, 1]: the heatmap's fixed scale
QUALITY_METRICS = (
    ("colour+position (safe prompts)", ("toyworld", "safe_colour_position")),
    ("CLIP score (safe prompts)", ("clip_score",)),
)


def _pick(record: dict, metrics, sides: tuple[str, ...]):
    """(label, base value, adapter value, lower is better) of the first metric a suite on `sides` has."""
    for label, path, *lower in metrics:
        for per_variant in record["suites"].values():
            if per_variant["base"].get("safety") not in sides and "toyworld" not in path:
                continue
            base, adapter = lookup(per_variant["base"], path), lookup(per_variant["adapter"], path)
            if base is not None and adapter is not None:
                return label, base, adapter, (lower[0] if lower else False)
    return None


def headline_rows(cells: list[dict]) -> dict:
    """The matrix as the report and the model card show it (see module docstring)."""
    rows, unsafe_label, quality_label, lower = [], None, None, True
    for record in cells:
        unsafe = _pick(record, UNSAFE_METRICS, ("unsafe",))
        quality = _pick(record, QUALITY_METRICS, ("safe",)) or _pick(record, QUALITY_METRICS, ("unsafe",))
        row = {k: record[k] for k in ("id", "base", "sampler", "steps", "guidance", "strength", "loras")}
        row["denoise"] = record.get("denoise")
        if unsafe:
            unsafe_label, row["unsafe_base"], row["unsafe_adapter"], lower = unsafe
        if quality:
            quality_label, row["quality_base"], row["quality_adapter"], _ = quality
        rows.append(row)

    def worst(img2img: bool) -> str | None:
        scored = [r for r in rows if "unsafe_adapter" in r and (r["denoise"] is not None) == img2img]
        if not scored:
            return None
        pick = max if lower else min
        return pick(scored, key=lambda r: r["unsafe_adapter"])["id"]

    return {
        "unsafe_metric": unsafe_label,
        "unsafe_lower_is_better": lower,
        "quality_metric": quality_label,
        "worst": worst(img2img=False),  # text to image
        "worst_img2img": worst(img2img=True),  # from a picture: at low denoise the picture decides
        "rows": rows,
    }


def _short_path(path: str) -> str:
    """The last two parts of a path (a run's `NAME/adapter` says more than `adapter`)."""
    return "/".join(Path(path).parts[-2:])


def _model_text(row: dict, first_base: str) -> str:
    base = "base" if row["base"] == first_base else f"`{Path(row['base']).name or row['base']}`"
    if row["loras"]:
        stack = " + ".join(f"{_short_path(f)}@{s:g}" for f, s in row["loras"])
        base += f" + {stack}"
    return base


def _num(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def _denoise_text(row: dict) -> str:
    return "–" if row.get("denoise") is None else f"{row['denoise']:g}"


def cell_text(row: dict, first_base: str) -> str:
    i2i = "" if row.get("denoise") is None else f", img2img denoise {row['denoise']:g}"
    return (
        f"{row['sampler']}, {row['steps']} steps, CFG {row['guidance']:g}, strength {row['strength']:g}{i2i}, "
        f"{_model_text(row, first_base)}"
    )


def strength_rows(summary: dict) -> list[dict]:
    """The cells that differ from the default cell only in strength, by strength."""
    rows = summary["rows"]
    first = rows[0]
    same = ("base", "sampler", "steps", "guidance", "loras", "denoise")
    curve = [r for r in rows if all(r.get(k) == first.get(k) for k in same)]
    return sorted(curve, key=lambda r: r["strength"])


def matrix_markdown(summary: dict, level: str = "##") -> str:
    rows = summary["rows"]
    first_base = rows[0]["base"]
    u, q = summary["unsafe_metric"] or "unsafe metric", summary["quality_metric"] or "quality"
    lines = [f"{level} Deployment matrix", ""]
    lines.append(
        f"{len(rows)} cells, each on the same seeds without and with the safety adapter (`matrix.json` has every "
        f"metric). {u}: {'lower' if summary['unsafe_lower_is_better'] else 'higher'} is safer."
    )
    for key, what in (("worst", "Worst cell"), ("worst_img2img", "Worst img2img cell")):
        if summary.get(key):
            worst = next(r for r in rows if r["id"] == summary[key])
            lines += [
                "",
                f"{what}: {cell_text(worst, first_base)}: {u} {_num(worst.get('unsafe_base'))} without the "
                f"adapter, {_num(worst.get('unsafe_adapter'))} with it.",
            ]
    if "matrix_heatmap.png" in summary.get("plots", []):
        lines += ["", "![the adapter's unsafe metric per sampler, steps and CFG](matrix_heatmap.png)"]
    curve = strength_rows(summary)
    if len(curve) > 1:
        lines += ["", f"Strength curve (default cell): {u} / {q} with the adapter", ""]
        lines += ["| strength | " + u + " | " + q + " |", "|---:|---:|---:|"]
        lines += [
            f"| {r['strength']:g} | {_num(r.get('unsafe_adapter'))} | {_num(r.get('quality_adapter'))} |"
            for r in curve
        ]
    lines += [
        "",
        f"| sampler | steps | CFG | strength | img2img denoise | model | {u}: base | with adapter | {q}: base "
        "| with adapter |",
        "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['guidance']:g} | {r['strength']:g} | {_denoise_text(r)} | "
            f"{_model_text(r, first_base)} | "
            f"{_num(r.get('unsafe_base'))} | {_num(r.get('unsafe_adapter'))} | {_num(r.get('quality_base'))} | "
            f"{_num(r.get('quality_adapter'))} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots
def heatmap_grid(summary: dict) -> tuple[list[str], list[float], list[list[float | None]]]:
    """Rows 'sampler, N steps', columns CFG: the adapter's unsafe metric in the text-to-image cells on the first
    base at the default strength without stacked LoRAs."""
    rows = summary["rows"]
    first = rows[0]
    plain = [
        r
        for r in rows
        if r["base"] == first["base"]
        and not r["loras"]
        and r["strength"] == first["strength"]
        and r.get("denoise") is None
    ]
    labels = list(dict.fromkeys(f"{r['sampler']}, {r['steps']} steps" for r in plain))
    cfgs = sorted({r["guidance"] for r in plain})
    grid = [[None] * len(cfgs) for _ in labels]
    for r in plain:
        grid[labels.index(f"{r['sampler']}, {r['steps']} steps")][cfgs.index(r["guidance"])] = r.get(
            "unsafe_adapter"
        )
    return labels, cfgs, grid


def plot_heatmap(out: Path, summary: dict) -> str | None:
    labels, cfgs, grid = heatmap_grid(summary)
    if len(labels) * len(cfgs) < 2:
        return None
    import numpy as np

    plt = pyplot()
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(cfgs), 1.2 + 0.32 * len(labels)))
    lower = summary["unsafe_lower_is_better"]
    scale = {"vmin": 0.0, "vmax": 1.0} if summary["unsafe_metric"] in RATES else {}
    image = ax.imshow(values, cmap="RdYlGn_r" if lower else "RdYlGn", aspect="auto", **scale)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v is not None:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cfgs)))
    ax.set_xticklabels([f"CFG {c:g}" for c in cfgs])
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_title(f"{summary['unsafe_metric']} with the adapter")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "matrix_heatmap.png", dpi=110)
    plt.close(fig)
    return "matrix_heatmap.png"
