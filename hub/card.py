"""The model card (README.md) of an exported safety adapter, built with huggingface_hub's ModelCard."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

TAGS = [
    "lora",
    "safety",
    "stable-diffusion",
    "template:sd-lora",
    "diffusers",
    "text-to-image",
    "grpo",
    "safediffusion-r1",
]
FAMILY_TAGS = {"sdxl": ["stable-diffusion-xl", "sdxl"]}  # extra tags by base_architecture family
PIPELINE_CLASS = {"sdxl": "StableDiffusionXLPipeline"}  # the stock pipeline per family (default: SD 1.x/2.x)
CITATION = """@article{kumar2026safediffusionr1,
  title   = {Online Reward Steering for Safe Diffusion Post-Training},
  author  = {Kumar, Komal and Deria, Ankan and Basu, Abhishek and Shamshad, Fahad and Cholakkal, Hisham and Nandakumar, Karthik},
  journal = {arXiv preprint arXiv:2605.18719},
  year    = {2026}
}"""


def reward_curves_png(metrics: list[dict], path: Path) -> bool:
    """Reward mean per epoch for safe and unsafe prompts; False when there is nothing to plot."""
    series = {
        s: [(r["epoch"], r[f"reward_{s}_mean"]) for r in metrics if f"reward_{s}_mean" in r]
        for s in ("safe", "unsafe")
    }
    if not any(series.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for name, points in series.items():
        if points:
            ax.plot([p[0] + 1 for p in points], [p[1] for p in points], label=f"{name} prompts")
    ax.set_xlabel("epoch")
    ax.set_ylabel("steering reward (mean)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def usage_snippet(repo_id: str, base_model: str, weight_name: str, family: str = "sd1") -> str:
    pipeline = PIPELINE_CLASS.get(family, "StableDiffusionPipeline")
    return f'''```python
import torch
from diffusers import {pipeline}

pipe = {pipeline}.from_pretrained("{base_model}", torch_dtype=torch.float32)
pipe.load_lora_weights("{repo_id}", weight_name="{weight_name}", adapter_name="safety")
pipe.set_adapters(["safety"], adapter_weights=[1.0])  # lower the weight to soften the effect
image = pipe("a photo of a person on a beach", num_inference_steps=30).images[0]
```'''


def metrics_summary(metrics: list[dict]) -> str:
    if not metrics:
        return "No training metrics were found."
    first, last = metrics[0], metrics[-1]
    lines = ["| | first epoch | last epoch |", "|---|---:|---:|"]
    for key, label in (
        ("reward_unsafe_mean", "reward, unsafe prompts"),
        ("reward_safe_mean", "reward, safe prompts"),
    ):
        if key in first and key in last:
            lines.append(f"| {label} | {first[key]:.4f} | {last[key]:.4f} |")
    lines.append(f"| epochs | | {last['epoch']} |")
    return "\n".join(lines)


def stop_section(stop: dict | None, config: dict) -> str:
    """A warning when training ended without reaching the recipe's target (evaluate.stop_when)."""
    if not stop or stop.get("stop_when_held") is not False:
        return ""
    conditions = ", ".join(f"`{c}`" for c in config.get("evaluate", {}).get("stop_when", []))
    how = {"epoch cap": "at its epoch cap", "signal": "when it was interrupted"}.get(stop.get("reason"), "")
    return (
        f"\n> **The training target was not reached.** The run ended {how} after epoch {stop.get('epoch')} "
        f"while its target ({conditions}) had never held at a periodic evaluation: check the evaluation "
        "below before relying on this adapter.\n"
    )


def changes_text(changes: list[dict] | None) -> str:
    """The settings a resume changed (run.json), so the recipe's values are read with their history."""
    if not changes:
        return ""
    rows = "\n".join(
        f"- from epoch {c['from_epoch']}: `{c['key']}` {c['was']!r} -> {c['now']!r}" for c in changes
    )
    return f" Settings changed when training was resumed (`recipe.yaml` holds the last values):\n\n{rows}"


def eval_section(report: dict | None) -> str:
    if not report:
        return "No evaluation report was found in the run directory (run `lora-grpo eval` and export again)."
    if "before" in report and "after" in report:
        sets = sorted(set(report["before"]) & set(report["after"]))
        lines = ["| set | metric | base | with adapter |", "|---|---|---:|---:|"]
        for s in sets:
            for metric, value in report["after"][s].items():
                lines.append(f"| {s} | {metric} | {report['before'][s][metric]:.4f} | {value:.4f} |")
        return "\n".join(lines)
    if "suites" in report and "settings" in report:  # written by `lora-grpo eval`
        from lora_grpo.evaluation.report import ripple_table, suite_tables

        ripple = ripple_table(report)
        if ripple:
            plot = (
                "\n\n![erasure and specificity](ripple.png)"
                if "ripple.png" in report.get("plots", [])
                else ""
            )
            ripple = f"### What else moved (erasure and specificity)\n\n{ripple}{plot}\n\n"
        matrix = ""
        if report.get("matrix"):
            from lora_grpo.evaluation.matrix_report import matrix_markdown

            matrix = matrix_markdown(report["matrix"], level="###") + "\n\nThe default cell in detail:\n\n"
        return matrix + ripple + suite_tables(report)
    return "```json\n" + json.dumps(report, indent=2)[:4000] + "\n```"


def usage_sections(repo_id: str, base_model: str, weight_name: str, comfy_name: str, family: str) -> str:
    """How to load the adapter in diffusers and in ComfyUI."""
    return f"""## Use it with diffusers

{usage_snippet(repo_id, base_model, weight_name, family)}

## Use it in ComfyUI

Copy `{comfy_name}` into `ComfyUI/models/loras/` and add a **Load LoRA** node (`LoraLoaderModelOnly` is
enough: the adapter touches only the UNet) between the checkpoint loader and the sampler; strength 1.0."""


def attacks_section(attacks: list[dict] | None) -> str:
    """How the adapter held against `lora-grpo attack` (their ASR, base against adapter); '' without any."""
    if not attacks:
        return ""
    from lora_grpo.evaluation.attack_report import asr_table

    return f"\n\n## Attacks\n\n{asr_table(attacks)}"


def results_sections(
    metrics: list[dict], curves: str | None, report: dict | None, attacks: list[dict] | None = None
) -> str:
    """Training metrics (first vs last epoch, the reward curves), the evaluation, the attacks and the citation."""
    curves_md = f"![reward curves]({curves})" if curves else ""
    return f"""## Training metrics

{metrics_summary(metrics)}

{curves_md}

## Evaluation

{eval_section(report)}{attacks_section(attacks)}

## Citation

```bibtex
{CITATION}
```"""


def recipe_section(config: dict) -> str:
    """The settings that shaped the adapter: reward, anchors, sampler, LoRA, optimisation."""
    reward, sample, lora, train = config["reward"], config["sample"], config["lora"], config["train"]
    anchors = config.get("anchors_used", {})
    anchor_text = (
        f"- safe anchors ({len(anchors.get('safe', []))}): "
        + "; ".join(anchors.get("safe", []))
        + f"\n- unsafe anchors ({len(anchors.get('unsafe', []))}): "
        + "; ".join(anchors.get("unsafe", []))
        if anchors
        else f"- anchors file: `{reward.get('anchors')}`"
    )
    return f"""- reward: `{reward["name"]}`, alpha {reward["alpha"]}, CLIP `{reward["clip"]["model"]}` ({reward["clip"]["backend"]})
{anchor_text}
- group size G {sample["group_size"]}, {sample["num_steps"]} DDIM steps, eta {sample["eta"]}, CFG {sample["guidance_scale"]}
- LoRA rank {lora["rank"]}, alpha {lora["alpha"]} on {", ".join(lora["target_modules"])}
- {train["epochs"]} epochs, learning rate {train["learning_rate"]}, clip range {train["clip_range"]}, optimizer {train["optimizer"]}"""


def build_card(
    *,
    repo_id: str,
    base_model: str,
    license: str,
    config: dict,
    metrics: list[dict],
    report: dict | None,
    weight_name: str,
    comfy_name: str,
    curves: str | None,
    family: str = "sd1",
    base_sha256: str | None = None,
    stop: dict | None = None,
    changes: list[dict] | None = None,
    attacks: list[dict] | None = None,
) -> ModelCard:
    """The card; `family` (sd1, sd2, sdxl, custom: the adapter's base_architecture) picks the tags and the
    usage snippet's pipeline; `base_sha256` identifies a single-file base checkpoint; `stop` is run.json's
    record of how training ended (a missed target is said at the top), `changes` its settings changed on resume,
    `attacks` the ASR of `lora-grpo attack` runs against it."""
    data = ModelCardData(
        base_model=base_model,
        library_name="diffusers",
        pipeline_tag="text-to-image",
        license=license,
        tags=TAGS + FAMILY_TAGS.get(family, []),
    )
    base_file = (
        f"\nTrained on the single-file checkpoint `{base_model}` (sha256 `{base_sha256}`); load that file as the "
        "base model.\n"
        if base_sha256
        else ""
    )
    content = f"""---
{data.to_yaml()}
---

# {config.get("name", "safety adapter")}: a safety LoRA for `{base_model}`

A LoRA adapter trained with [lora_grpo](https://github.com/lora-grpo/lora_grpo) (online GRPO with the CLIP
steering reward of SafeDiffusion-R1). It steers unsafe prompts toward safe images with the same content and
leaves other prompts as the base model draws them.
{base_file}{stop_section(stop, config)}
{usage_sections(repo_id, base_model, weight_name, comfy_name, family)}

## Training recipe

{recipe_section(config)}

The full resolved config is `recipe.yaml`.{changes_text(changes)}

{results_sections(metrics, curves, report, attacks)}
"""
    return ModelCard(content)
