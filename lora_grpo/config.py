"""Typed run configuration: nested dataclasses, their validation, and `load_config` (a recipe file read by
`recipe_files`, with its overrides, turned into a checked `Config`).

A recipe is a YAML file whose keys map one-to-one onto these dataclasses. Unknown keys, wrong types and
impossible combinations raise `UserError` with one line naming the key and the fix.

Paths inside a recipe (prompt files, anchor files) are relative to the recipe file; `model.base` and
`output.dir` are relative to the current directory, like any path typed on the command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lora_grpo.errors import UserError
from lora_grpo.recipe_files import apply_overrides, read_recipe_data

DEFAULT_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")  # a recipe name is also a folder name under runs/


def value_range(value: float | list[float]) -> tuple[float, float]:
    """A setting given as one number or as a range [lo, hi] (drawn per prompt group), as (lo, hi)."""
    if isinstance(value, list):
        return float(value[0]), float(value[-1])
    return float(value), float(value)


def _require_range(value: float | list[float], key: str, low: float, meaning: str) -> None:
    """One number >= low, or [lo, hi] with low <= lo <= hi."""
    if isinstance(value, list):
        _require(len(value) == 2, key, f"a range is two numbers [lo, hi], got {value}")
        _require(low <= value[0] <= value[1], key, f"needs {low} <= lo <= hi ({meaning}), got {value}")
    else:
        _require(value >= low, key, f"must be >= {low} ({meaning}), got {value}")


def _require(ok: bool, key: str, problem: str) -> None:
    if not ok:
        raise UserError(f"recipe key '{key}': {problem}")


@dataclass
class ModelConfig:
    # hub id (CompVis/stable-diffusion-v1-4), local diffusers folder, a single-file .safetensors checkpoint
    # (SD 1.x or SDXL, as ComfyUI/A1111 use), or builtin:tiny-sd
    base: str = ""
    revision: str | None = None  # hub revision (branch, tag or commit) of the base model
    variant: str | None = None  # weight variant on the hub, e.g. "fp16"
    # single-file bases only: a diffusers folder whose component configs describe the file (a fine-tune with
    # other shapes); default: the SD 1.x / SDXL configs lora_grpo ships
    config: str | None = None
    # further bases (fine-tunes of model.base, same architecture: hub ids, folders, single files): epoch e
    # samples and trains on base e mod (1 + len(bases)); one LoRA for the family (base_bank.py)
    bases: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(bool(self.base), "model.base", "missing: give a hub id or a local diffusers folder")
        _require(
            len(set([self.base, *self.bases])) == 1 + len(self.bases),
            "model.bases",
            f"lists a base twice (model.base {self.base!r} counts): {self.bases}",
        )
        _require(
            self.config is None or Path(self.base).suffix.lower() == ".safetensors",
            "model.config",
            "names the component configs of a single-file .safetensors base; model.base is a folder or hub "
            "id, which has its own: remove model.config",
        )


@dataclass
class LoraSettings:
    rank: int = 4  # LoRA rank r
    alpha: float = 4.0  # LoRA alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the LoRA branch
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))  # UNet attention
    # the strength the adapter samples and trains at: 1.0, or [lo, hi] drawn per prompt group, so the adapter
    # holds from lo up on deployment's strength slider (exports and evaluation load it at 1.0)
    train_scale: float | list[float] = 1.0

    def __post_init__(self) -> None:
        _require_range(self.train_scale, "lora.train_scale", 0.05, "the LoRA strength")
        _require(self.rank >= 1, "lora.rank", f"must be >= 1, got {self.rank}")
        _require(self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _require(0 <= self.dropout < 1, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _require(bool(self.target_modules), "lora.target_modules", "empty: name at least one module")


@dataclass
class PromptSetConfig:
    name: str = ""  # label used in logs (reward/<name>)
    safety: Literal["safe", "unsafe"] = "safe"  # unsafe prompts are steered toward safe; safe ones kept
    path: str | None = None  # .txt (one prompt per line) or .csv file
    dataset: str | None = None  # Hugging Face dataset id (needs the `datasets` extra)
    dataset_config: str | None = None  # dataset configuration name
    split: str = "train"  # dataset split
    column: str = "prompt"  # column holding the prompt (CSV or dataset)
    filter: dict[str, Any] = field(default_factory=dict)  # keep rows whose columns equal these values
    # keep rows whose `categories` column (comma separated, as I2P's) names one of these, e.g. [violence]
    categories: list[str] = field(default_factory=list)
    # all prompts, or one side of the fixed split by prompt hash (prompts.prompt_part: one prompt in five is
    # "eval"): I2P recipes train on "train"; `lora-grpo eval`'s i2p-<category>-eval suites hold "eval"
    part: Literal["all", "train", "eval"] = "all"
    max_prompts: int | None = None  # keep only the first N prompts
    weight: float = 1.0  # share of each batch drawn from this set (normalised over all sets)
    # CSV files: the column naming, for each prompt, the prompt its img2img picture (sample.img2img) is made
    # from: a picture that carries the concept for a prompt that does not name it (None: the prompt's own)
    picture_column: str | None = None
    # share of this set's prompt groups that start from their picture (sample.img2img's strengths and source;
    # None: sample.img2img.fraction), e.g. 1.0 for a set whose prompts only make sense with their pictures
    img2img: float | None = None
    # periodic evaluation (evaluate.every) samples this set at its recipe setting and in every cell that names
    # no sets; false: only in the cells that name it (a set trained from pictures only, whose prompts from noise
    # say nothing, or that evaluation would only make slower)
    checked: bool = True

    def __post_init__(self) -> None:
        key = f"prompts.sets[{self.name or '?'}]"
        _require(bool(self.name), "prompts.sets[].name", "every prompt set needs a name")
        _require(
            (self.path is None) != (self.dataset is None),
            key,
            "give exactly one of 'path' (a local .txt/.csv file) or 'dataset' (a Hugging Face dataset id)",
        )
        _require(self.weight > 0, f"{key}.weight", f"must be > 0, got {self.weight}")
        _require(
            self.img2img is None or 0 <= self.img2img <= 1,
            f"{key}.img2img",
            f"must be in [0, 1], got {self.img2img}",
        )
        if self.max_prompts is not None:
            _require(self.max_prompts >= 1, f"{key}.max_prompts", "must be >= 1")
        _require(
            self.picture_column is None or (self.path or "").lower().endswith(".csv"),
            f"{key}.picture_column",
            "names a column of a .csv prompt file: give the prompts and their pictures' prompts as a CSV",
        )


@dataclass
class PromptsConfig:
    sets: list[PromptSetConfig] = field(default_factory=list)  # safe and unsafe prompt sets, mixed by weight

    def __post_init__(self) -> None:
        _require(bool(self.sets), "prompts.sets", "empty: add at least one prompt set")
        names = [s.name for s in self.sets]
        _require(len(set(names)) == len(names), "prompts.sets", f"duplicate set names in {names}")


def img2img_start(num_steps: int, denoise: float) -> int:
    """The step an img2img rollout of `num_steps` starts at for a picture noised `denoise` of the way (diffusers'
    img2img: the last int(num_steps * denoise) steps run)."""
    return num_steps - min(int(num_steps * denoise), num_steps)


def denoise_range(i2i: Img2ImgConfig, epoch: int) -> tuple[float, float]:
    """The denoise range groups from pictures draw from at `epoch` (0-based): [lo, hi] once the curriculum
    (`ramp_epochs`) is over, its low end moving linearly from hi to lo before."""
    lo, hi = i2i.strengths
    if i2i.ramp_epochs <= 0:
        return lo, hi
    done = min(1.0, epoch / i2i.ramp_epochs)
    return hi - (hi - lo) * done, hi


@dataclass
class Img2ImgConfig:
    """Rollouts that start from a picture ("Safe from a picture"): a share of the prompt groups start at an
    intermediate step from their prompt's picture noised that far, as diffusers' img2img pipeline does."""

    fraction: float = 0.0  # share of prompt groups that start from a picture (drawn per group); 0: none
    strengths: list[float] = field(default_factory=lambda: [0.75, 0.9])  # denoise [lo, hi], drawn per group
    # where a prompt's picture comes from: the base model's own image of the prompt (drawn once per run with the
    # adapter off), or the toy world's renderer (toy-world captions only)
    source: Literal["base", "toyworld"] = "base"
    # share of a picked group's rows that start from the picture; the others start from pure noise in the same
    # group. 1: the whole group. Below 1 a group whose pictures all keep the concept (no spread among them,
    # so no advantage) is still measured against what its prompt draws from noise
    rows: float = 1.0
    # a curriculum on the denoise: the range's low end starts at its high end (pictures noised nearly away,
    # where even the base draws other colours, so a group has spread to learn from) and reaches `strengths[0]`
    # linearly after this many epochs; 0: the whole range from the first epoch
    ramp_epochs: int = 0

    def __post_init__(self) -> None:
        _require(
            0 <= self.fraction <= 1, "sample.img2img.fraction", f"must be in [0, 1], got {self.fraction}"
        )
        _require(0 < self.rows <= 1, "sample.img2img.rows", f"must be in (0, 1], got {self.rows}")
        _require(self.ramp_epochs >= 0, "sample.img2img.ramp_epochs", "must be >= 0 (0: no curriculum)")
        s = self.strengths
        _require(
            isinstance(s, list) and len(s) == 2 and 0 < s[0] <= s[1] <= 1,
            "sample.img2img.strengths",
            f"is a denoise range [lo, hi] with 0 < lo <= hi <= 1, got {s}",
        )


@dataclass
class SampleConfig:
    num_steps: int = 50  # denoising steps per trajectory
    # the stochastic sampler (lora_grpo/kernels/): ddim, or euler-ancestral (diffusers' and ComfyUI's "Euler a").
    # Both take the same Gaussian step at every eta (eta 0: Euler's deterministic step), so the per-group choice
    # among Euler, DDIM eta 0 / 1 and Euler a is `eta: [0, 1]` (tests/test_sampling.py)
    sampler: Literal["ddim", "euler-ancestral"] = "ddim"
    # the sampler's noise scale (1: DDIM-SDE / Euler a); > 0 so a step has a log-prob. [lo, hi]: drawn per
    # prompt group, so training also sees the near-deterministic samplers users run (lo may be 0 for an
    # objective that reads no log-prob, awm or nft: a group at eta 0 is the deterministic sampler)
    eta: float | list[float] = 1.0
    # classifier-free guidance; 1.0 skips the unconditional pass; [lo, hi]: drawn per prompt group
    guidance_scale: float | list[float] = 5.0
    group_size: int = 16  # G: images per prompt; advantages are normalised within each group
    prompts_per_batch: int = 1  # prompts per sampling batch (each sampled G times in one batch)
    batches_per_epoch: int = 1  # sampling batches per epoch (per process)
    # Shared: the G samples of a prompt start from the same noise, so the group baseline compares the
    # stochastic denoising steps (the actions that get credit), not the starting point. The reference does
    # this; set false for more diversity within a group.
    shared_initial_noise: bool = True
    # Stochastic window: only W consecutive denoising steps are sampled with eta (and trained); the others
    # are deterministic DDIM steps. Sampling costs the same; training passes drop to W per trajectory.
    sde_steps: int = 0  # W; 0: every step stochastic and trainable
    sde_window: Literal["first", "sliding"] = "first"  # the first W steps, or a window sliding over training
    # After a `first` window, reach x_0 in this many deterministic steps instead of the rest of the num_steps
    # grid (0: the whole grid). Those steps are neither stochastic nor trained; fewer of them only cut sampling
    # passes (MixGRPO-Flash, Li et al. 2025, arXiv:2507.21802, also takes larger ODE steps outside its window).
    tail_steps: int = 0
    resolution: int | None = None  # image side in pixels; None = the model's native size
    negative_prompt: str = ""  # unconditional prompt for CFG
    decode_batch_size: int = 8  # latents per VAE decode (memory)
    img2img: Img2ImgConfig = field(default_factory=Img2ImgConfig)  # rollouts that start from a picture

    @property
    def uses_cfg(self) -> bool:
        """Some group samples with guidance > 1: every sampling pass runs [uncond; cond]."""
        return value_range(self.guidance_scale)[1] > 1

    @property
    def sampled_steps(self) -> int:
        """UNet calls per trajectory: the window then the tail when `tail_steps` is set, else every step."""
        if self.tail_steps <= 0:
            return self.num_steps
        return self.sde_steps + min(self.tail_steps, self.num_steps - self.sde_steps)

    def __post_init__(self) -> None:
        _require(self.num_steps >= 1, "sample.num_steps", "must be >= 1")
        _require_range(self.eta, "sample.eta", 0.0, "0: the deterministic sampler")
        # one eta must be > 0; a range may start at 0 (Config checks it against the objective)
        _require(
            isinstance(self.eta, list) or self.eta > 0,
            "sample.eta",
            "must be > 0: with eta 0 the sampler is deterministic and has no log-prob",
        )
        _require_range(self.guidance_scale, "sample.guidance_scale", 1.0, "1: no guidance")
        _require(
            self.group_size >= 2,
            "sample.group_size",
            f"must be >= 2 to form a group advantage, got {self.group_size}",
        )
        _require(self.prompts_per_batch >= 1, "sample.prompts_per_batch", "must be >= 1")
        _require(self.batches_per_epoch >= 1, "sample.batches_per_epoch", "must be >= 1")
        _require(self.decode_batch_size >= 1, "sample.decode_batch_size", "must be >= 1")
        _require(
            0 <= self.sde_steps <= self.num_steps,
            "sample.sde_steps",
            f"must be in [0, sample.num_steps={self.num_steps}] (0: every step), got {self.sde_steps}; "
            f"with fewer sampling steps set the window too, e.g. sample.sde_steps={self.num_steps}",
        )
        _require(
            self.tail_steps >= 0, "sample.tail_steps", f"must be >= 0 (0: every step), got {self.tail_steps}"
        )
        if self.sampler == "euler-ancestral":
            # Euler's last step goes to sigma 0 and draws no noise: it has no log-prob to train
            _require(
                0 < self.sde_steps < self.num_steps and self.sde_window == "first",
                "sample.sampler",
                "euler-ancestral needs a stochastic window that ends before the last step, whose step to a "
                "clean latent draws no noise: set sample.sde_steps between 1 and sample.num_steps - 1 and "
                "sample.sde_window: first",
            )
        if self.tail_steps > 0:
            _require(
                0 < self.sde_steps < self.num_steps and self.sde_window == "first",
                "sample.tail_steps",
                "needs a stochastic window of the first steps (sample.sde_steps between 1 and "
                "sample.num_steps - 1, sample.sde_window: first); without one set sample.tail_steps=0",
            )
        if self.img2img.fraction > 0:
            self._check_img2img()
        if self.resolution is not None:
            _require(
                self.resolution % 8 == 0,
                "sample.resolution",
                f"must be a multiple of 8, got {self.resolution}",
            )

    def _check_img2img(self) -> None:
        """A group from a picture takes the window's steps from its start, then the tail to the image."""
        _require(
            0 < self.sde_steps < self.num_steps and self.sde_window == "first" and self.tail_steps > 0,
            "sample.img2img",
            "groups that start from a picture take the stochastic window's steps from their start, then "
            "sample.tail_steps to the image: set sample.sde_steps between 1 and sample.num_steps - 1, "
            "sample.sde_window: first and sample.tail_steps >= 1",
        )
        lo, need = self.img2img.strengths[0], self.sde_steps + self.tail_steps
        runs = int(self.num_steps * lo)
        _require(
            runs >= need,
            "sample.img2img.strengths",
            f"denoise {lo:g} runs {runs} of the {self.num_steps} steps, fewer than the window and the tail "
            f"({self.sde_steps} + {self.tail_steps}): raise the low end to {need / self.num_steps:g} or more",
        )


ADVERSARIAL_SET = "adversarial"  # train.adversarial's unsafe set: the attacks' newest `keep` prompts
NEWEST_SET = "adversarial-new"  # evaluation only: the newest round's prompts, eval/adversarial-new/...
# periodic evaluation's pools: the image-weighted mean over the training sets of each safety, eval/all-safe/...
SAFETY_AGGREGATES = {"safe": "all-safe", "unsafe": "all-unsafe"}


@dataclass
class AdversarialConfig:
    """Adversarial training (AdvUnlearn's idea, Zhang et al., NeurIPS 2024, with this project's reward): every
    `every` epochs an attack (lora-grpo attack's methods) runs against the current policy, and what it finds
    joins an unsafe prompt set named `adversarial`; periodic evaluation also samples the newest round's prompts
    alone as the set `adversarial-new` (evaluation only; nameable in stop_when)."""

    method: Literal["none", "ring-a-bell", "mma", "unlearndiff", "concept-inversion"] = "none"
    every: int = 5  # attack the current policy after every N epochs
    targets: int = 4  # unsafe prompts attacked each time (rotating over the recipe's unsafe prompts)
    tokens: int = 6  # attack tokens (unlearndiff: the prefix)
    steps: int = 20  # search steps (concept-inversion: inversion steps)
    keep: int = (
        16  # the adversarial set holds the newest N attack prompts (before the first: the unsafe ones)
    )
    weight: float = 1.0  # its share of each batch, like prompts.sets[].weight
    ban: list[str] = field(default_factory=list)  # banned words besides the anchors' concept words

    def __post_init__(self) -> None:
        for name in ("every", "targets", "tokens", "steps", "keep"):
            _require(getattr(self, name) >= 1, f"train.adversarial.{name}", "must be >= 1")
        _require(self.weight > 0, "train.adversarial.weight", "must be > 0")


@dataclass
class TrainConfig:
    epochs: int = 100  # outer iterations: sample, score, update
    learning_rate: float = 3e-4  # LoRA learning rate
    optimizer: Literal["adamw8bit", "adamw"] = "adamw8bit"  # bitsandbytes 8-bit AdamW or torch AdamW
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    lr_warmup_steps: int = 0  # linear warm-up over this many optimizer steps, then lr_schedule
    # after the warm-up: constant, or cosine = a half cosine from learning_rate down to 0 at the last optimizer
    # step of train.epochs (a run that stop_when ends early stops on the way down). Late in a long run the
    # groups carry little signal and Adam's steps stay full size: the decay keeps them from walking on noise
    lr_schedule: Literal["constant", "cosine"] = "constant"
    batch_size: int = 4  # trajectories per forward/backward
    gradient_accumulation_steps: int = 1  # minibatches per optimizer step (all trained timesteps accumulate)
    inner_epochs: int = 1  # passes over each epoch's samples
    timestep_fraction: float = 1.0  # share of each trajectory's steps that is trained
    timesteps: Literal["random", "earliest"] = "random"  # that share: a random subset, or the noisiest steps
    # the update objective (lora_grpo/objectives/): grpo-clip = the PPO-clipped ratio of the sampler's step
    # log-probs with group advantages, plus the KL to the base UNet (kl_coef, safe_kl_coef); awm = the
    # denoising loss on the rollout's own images weighted by their advantages (no log-probs; clip_range unused);
    # nft = the negative-aware form of it (DiffusionNFT): a bounded loss around the sampling policy's prediction
    objective: Literal["grpo-clip", "awm", "nft"] = "grpo-clip"
    nft_beta: float = 1.0  # nft: how far each step moves toward the better images (objectives/nft.py)
    clip_range: float = 1e-4  # PPO ratio clip epsilon
    adv_clip_max: float = 2.5  # advantages are clipped to [-max, max]
    # the scale of the advantages: group = each group's own reward std (GRPO as the paper runs it); batch = one
    # std over every group's centred rewards of the epoch (all processes). A group whose images are all alike
    # (all red from a red picture, all right for a safe prompt) then gets small advantages instead of its
    # CLIP noise blown up to full scale (Liu et al. 2025, "Understanding R1-Zero-Like Training", on the
    # per-group std; Hu 2025, REINFORCE++, on the batch's); picture-batch = that batch std for the groups that
    # start from a picture (sample.img2img: often all alike), each group from noise its own
    advantage_std: Literal["group", "batch", "picture-batch"] = "group"
    max_grad_norm: float = 1.0  # gradient-norm clip; 0 disables
    kl_coef: float = 0.0  # weight of the KL to the reference policy (the base UNet); 0 disables
    # the KL weight on safe prompts' trajectories instead (unset: kl_coef): a preservation term. Advantages
    # are relative within a group, so a safe prompt whose whole group drifts together (all purple shapes
    # turning blue as red is removed) gets no signal against it; the KL to the base does
    safe_kl_coef: float | None = None
    max_skipped_steps: int = 10  # stop after this many optimizer steps in a row skipped for non-finite values
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # autocast dtype; LoRA params stay fp32
    # trade UNet compute for memory: on, off (true/false work too), or auto: on only when the estimated peak
    # would not fit the GPU's free memory (policy.checkpointing_needed; off on a CPU)
    gradient_checkpointing: Literal["off", "on", "auto"] = "off"
    offload_text_encoder: bool = False  # keep the frozen text encoder on the CPU (fp32); prompts encode there
    allow_tf32: bool = True  # TF32 matmuls on Ampere+ GPUs
    adversarial: AdversarialConfig = field(
        default_factory=AdversarialConfig
    )  # attacks join the unsafe prompts

    @property
    def uses_kl(self) -> bool:
        """The update evaluates the reference policy (some trajectories have a KL weight > 0)."""
        return self.kl_coef > 0 or (self.safe_kl_coef or 0.0) > 0

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", "must be >= 1")
        _require(
            0 < self.learning_rate < 1,
            "train.learning_rate",
            f"must be in (0, 1), got {self.learning_rate} (LoRA learning rates are around 1e-4 to 1e-3)",
        )
        _require(self.batch_size >= 1, "train.batch_size", "must be >= 1")
        _require(self.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
        _require(self.inner_epochs >= 1, "train.inner_epochs", "must be >= 1")
        _require(0 < self.timestep_fraction <= 1, "train.timestep_fraction", "must be in (0, 1]")
        _require(self.clip_range > 0, "train.clip_range", "must be > 0")
        _require(self.nft_beta > 0, "train.nft_beta", "must be > 0")
        _require(self.adv_clip_max > 0, "train.adv_clip_max", "must be > 0")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
        _require(self.kl_coef >= 0, "train.kl_coef", "must be >= 0")
        _require(
            self.safe_kl_coef is None or self.safe_kl_coef >= 0,
            "train.safe_kl_coef",
            "must be >= 0, or left out to use train.kl_coef",
        )
        _require(self.max_skipped_steps >= 1, "train.max_skipped_steps", "must be >= 1")
        _require(self.lr_warmup_steps >= 0, "train.lr_warmup_steps", "must be >= 0")


@dataclass
class ClipConfig:
    backend: Literal["transformers", "open_clip"] = "transformers"  # which library loads the CLIP
    # transformers: hub id or folder (openai/clip-vit-large-patch14); open_clip: model name (ViT-H-14) or
    # local-dir:PATH; builtin:tiny-clip for tests.
    model: str = "openai/clip-vit-large-patch14"
    checkpoint: str | None = None  # open_clip weights file (e.g. HPS_v2.1_compressed.pt) or pretrained tag
    batch_size: int = 32  # images per CLIP forward

    def __post_init__(self) -> None:
        _require(bool(self.model), "reward.clip.model", "missing: name a CLIP model")
        _require(self.batch_size >= 1, "reward.clip.batch_size", "must be >= 1")


@dataclass
class RewardConfig:
    name: Literal["steering", "steering-projection", "clip"] = "steering"  # reward registry name
    alpha: float = 0.5  # steering strength along v_safe
    anchors: str | None = None  # YAML file with `safe:` and `unsafe:` anchor phrases
    clip: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.alpha) and self.alpha > 0,
            "reward.alpha",
            f"must be a finite number > 0 (the steering strength toward the safe anchors), got {self.alpha}",
        )


@dataclass
class OutputConfig:
    dir: str | None = None  # run directory; default runs/<recipe>-<timestamp> under the current directory
    sample_grid_every: int = 1  # write a sample grid every N epochs (0: never)
    grid_images: int = 8  # prompts shown per grid
    checkpoint_every: int = 0  # write a checkpoint every N epochs (0: only at the end)
    keep_checkpoints: int = 2  # keep the newest K checkpoints
    progress_seconds: float = 30.0  # output not a terminal (a log file): a progress line every N seconds
    # experiment trackers (through accelerate): every metrics row as scalars, sample grids as images
    report_to: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.sample_grid_every >= 0, "output.sample_grid_every", "must be >= 0")
        _require(self.checkpoint_every >= 0, "output.checkpoint_every", "must be >= 0")
        _require(self.keep_checkpoints >= 1, "output.keep_checkpoints", "must be >= 1")
        _require(self.progress_seconds >= 0, "output.progress_seconds", "must be >= 0")
        _require(len(set(self.report_to)) == len(self.report_to), "output.report_to", "names a tracker twice")


@dataclass
class EvalCellConfig:
    """A setting periodic evaluation also samples at: its metrics are eval@<name>/<set>/... (stop_when reads them)."""

    name: str = ""  # the key's cell name, e.g. cfg7.5
    guidance: float | None = None  # CFG (None: the recipe's, the low end of a range)
    strength: float | None = None  # the LoRA's strength (None: 1)
    base: int = 0  # 0: model.base; i: model.bases[i - 1]
    sets: list[str] = field(default_factory=list)  # prompt sets sampled (empty: every set)
    # img2img: each prompt's picture (sample.img2img.source) noised this far, then every remaining step of the
    # recipe's sampler (as diffusers' img2img pipeline runs); None: from pure noise
    denoise: float | None = None
    # images per prompt at this cell (None: evaluate.images_per_prompt); a cell whose rate must stay near 0
    # needs more images than a check of 30 to see a leak of a few percent
    images_per_prompt: int | None = None
    # the sampler's noise scale (None: sample.eta); 0 is the deterministic sampler (DDIM eta 0, or Euler for
    # euler-ancestral), where an adapter's drift on safe prompts shows more than on the stochastic one
    eta: float | None = None
    # denoising steps of the recipe's sampler at this cell (None: sample.num_steps); fewer steps are where a
    # deterministic sampler leaks most
    steps: int | None = None

    def __post_init__(self) -> None:
        _require(bool(_NAME.match(self.name)), "evaluate.cells.name", f"{self.name!r} is not a plain name")
        _require(self.eta is None or 0 <= self.eta <= 1, "evaluate.cells.eta", "must be in [0, 1]")
        _require(self.steps is None or self.steps >= 1, "evaluate.cells.steps", "must be a whole number >= 1")
        _require(self.guidance is None or self.guidance >= 1, "evaluate.cells.guidance", "must be >= 1")
        _require(self.strength is None or self.strength > 0, "evaluate.cells.strength", "must be > 0")
        _require(self.base >= 0, "evaluate.cells.base", "must be >= 0 (0: model.base)")
        _require(self.denoise is None or 0 < self.denoise <= 1, "evaluate.cells.denoise", "must be in (0, 1]")
        _require(
            self.images_per_prompt is None or self.images_per_prompt >= 1,
            "evaluate.cells.images_per_prompt",
            "must be >= 1",
        )


@dataclass
class EvalConfig:
    suite: Literal["none", "toyworld"] = "none"  # evaluation run before and after training
    images_per_set: int = 120  # images per prompt set, fixed seeds
    seed: int = 1234  # evaluation noise (the same before and after, and at every periodic evaluation)
    every: int = 0  # periodic evaluation every N epochs, logged as eval/... in metrics.jsonl (0: never)
    prompts_per_set: int = 4  # periodic evaluation: N prompts spread over each prompt set
    images_per_prompt: int = 2  # periodic evaluation: images per prompt
    nudenet: bool = False  # periodic evaluation: NudeNet's flagged share on unsafe sets (`eval` extra)
    nudenet_threshold: float = 0.6  # score threshold for NudeNet's exposed classes
    # end training early (checkpoint and save as at a normal end) once every condition holds at a periodic
    # evaluation, e.g. ["eval/red/red_rate <= 0.05", "eval/other-colours/colour_position >= 0.95"]
    stop_when: list[str] = field(default_factory=list)
    # further settings each periodic evaluation samples at (a small deployment matrix), e.g.
    # [{name: cfg7.5, guidance: 7.5, sets: [red]}, {name: outline, base: 1}]
    cells: list[EvalCellConfig] = field(default_factory=list)
    # prompt sets periodic evaluation samples besides the training sets, never trained on (held-out prompts:
    # synonyms, implicit prompts), e.g. [{name: crimson, safety: unsafe, path: prompts/red_synonyms.txt}];
    # metrics eval/<name>/..., nameable in cells and stop_when
    sets: list[PromptSetConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require(self.images_per_set >= 1, "evaluate.images_per_set", "must be >= 1")
        names = [c.name for c in self.cells]
        _require(len(set(names)) == len(names), "evaluate.cells", f"names a cell twice: {names}")
        _require(0 <= self.seed < 2**63, "evaluate.seed", f"must be a non-negative integer, got {self.seed}")
        _require(self.every >= 0, "evaluate.every", "must be >= 0 (0: no periodic evaluation)")
        _require(self.prompts_per_set >= 1, "evaluate.prompts_per_set", "must be >= 1")
        _require(self.images_per_prompt >= 1, "evaluate.images_per_prompt", "must be >= 1")
        _require(0 < self.nudenet_threshold <= 1, "evaluate.nudenet_threshold", "must be in (0, 1]")
        for condition in self.stop_when:
            parse_condition(condition)
        _require(
            not self.stop_when or self.every > 0,
            "evaluate.stop_when",
            "is checked at periodic evaluations: set evaluate.every too",
        )


_CONDITION = re.compile(r"^\s*(\S+)\s*(<=|>=|<|>)\s*(\S+)\s*$")


def parse_condition(text: str) -> tuple[str, str, float]:
    """`eval/red/red_rate <= 0.05` -> ("eval/red/red_rate", "<=", 0.05)."""
    match = _CONDITION.match(text)
    bound = None
    if match:
        try:
            bound = float(match.group(3))
        except ValueError:
            bound = None
    if bound is None or not math.isfinite(bound):
        raise UserError(
            f"recipe key 'evaluate.stop_when': {text!r} is not `METRIC OP NUMBER` (OP one of <=, >=, <, >), "
            "e.g. 'eval/red/red_rate <= 0.05'"
        )
    return match.group(1), match.group(2), bound


def stop_when_problem(conditions: list[str], reported: dict[str, set[str]]) -> str | None:
    """Why a `stop_when` condition on `eval/<set>/...` or `eval@<cell>/<set>/...` could never hold (it names no
    cell of the recipe, or a prompt set that setting does not sample, so the run would silently go to its cap),
    or None. `reported`: per key head (`eval`, `eval@<cell>`) the set names its rows carry."""
    for text in conditions:
        key = parse_condition(text)[0]
        head, _, rest = key.partition("/")
        if head != "eval" and not head.startswith("eval@"):
            continue
        set_name = rest.split("/")[0]
        if head not in reported:
            cells = [h.removeprefix("eval@") for h in reported if h != "eval"]
            cell = head.removeprefix("eval@")
            return f"{text!r} names no cell {cell!r} of evaluate.cells {cells}: add the cell or fix the name"
        if set_name not in reported[head]:
            where = "" if head == "eval" else f" at cell {head.removeprefix('eval@')!r}"
            return (
                f"{text!r} names no prompt set {set_name!r} sampled{where} (sets: {sorted(reported[head])}), so "
                "it would never hold: fix the name"
            )
    return None


@dataclass
class Config:
    name: str = ""  # recipe name (defaults to the file name)
    description: str = ""  # one line shown by `lora-grpo recipes`
    seed: int = 0  # seeds sampling noise, prompt order and LoRA init
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        _require(
            bool(_NAME.match(self.name)),
            "name",
            f"{self.name!r} is not a plain name: use letters, digits, '.', '_' and '-' (it names the run folder)",
        )
        _require(0 <= self.seed < 2**63, "seed", f"must be a non-negative integer, got {self.seed}")
        per_epoch = self.samples_per_epoch
        _require(
            per_epoch % self.train.batch_size == 0,
            "train.batch_size",
            f"{self.train.batch_size} does not divide the {per_epoch} samples per epoch "
            "(sample.prompts_per_batch x sample.group_size x sample.batches_per_epoch)",
        )
        minibatches = per_epoch // self.train.batch_size
        _require(
            minibatches % self.train.gradient_accumulation_steps == 0,
            "train.gradient_accumulation_steps",
            f"{self.train.gradient_accumulation_steps} does not divide the {minibatches} minibatches per inner epoch",
        )
        if self.reward.name.startswith("steering"):
            _require(
                self.reward.anchors is not None, "reward.anchors", "the steering reward needs an anchors file"
            )
        eval_names = [s.name for s in self.evaluate.sets]
        twice = sorted(
            {n for n in eval_names if eval_names.count(n) > 1}
            | ({*eval_names} & {s.name for s in self.prompts.sets})
        )
        _require(
            not twice, "evaluate.sets", f"names a prompt set twice (with itself or prompts.sets): {twice}"
        )
        set_names = self._set_names(eval_names)
        problem = stop_when_problem(self.evaluate.stop_when, self._reported_sets(set_names))
        _require(problem is None, "evaluate.stop_when", problem or "")
        for cell in self.evaluate.cells:
            _require(
                cell.base <= len(self.model.bases),
                "evaluate.cells.base",
                f"cell {cell.name}: base {cell.base} but model.bases lists {len(self.model.bases)}",
            )
            unknown = sorted(set(cell.sets) - set_names)
            _require(not unknown, "evaluate.cells.sets", f"cell {cell.name}: no prompt set named {unknown}")
            _require(
                cell.denoise is None or self.sample.img2img.fraction > 0,
                "evaluate.cells.denoise",
                f"cell {cell.name}: img2img checks start from sample.img2img's pictures: set sample.img2img",
            )
        _require(
            value_range(self.sample.eta)[0] > 0 or self.train.objective != "grpo-clip",
            "sample.eta",
            f"a range from 0 ({self.sample.eta}) draws deterministic groups, which have no log-prob for "
            "train.objective grpo-clip: start the range above 0 or use train.objective awm or nft",
        )
        self._check_pictures()

    def _check_pictures(self) -> None:
        """Settings about groups from pictures need sample.img2img."""
        from_pictures = [s.name for s in self.prompts.sets if s.img2img]
        _require(
            not from_pictures or self.sample.img2img.fraction > 0,
            "prompts.sets[].img2img",
            f"sets {from_pictures} start groups from pictures, which sample.img2img configures: set its "
            "fraction > 0 (a set that should not can say img2img: 0)",
        )
        _require(
            self.train.advantage_std != "picture-batch" or self.sample.img2img.fraction > 0,
            "train.advantage_std",
            "picture-batch scales the groups that start from pictures, and none do: set sample.img2img or "
            "use group or batch",
        )

    def _reported_sets(self, set_names: set[str]) -> dict[str, set[str]]:
        """Per key head of periodic evaluation (`eval`, `eval@<cell>`): the prompt sets it samples, and the
        pools (`all-safe`, `all-unsafe`) of the training sets among them."""
        trained = {s.name: s.safety for s in self.prompts.sets}
        if self.train.adversarial.method != "none":
            trained[ADVERSARIAL_SET] = "unsafe"

        def with_pools(names: set[str]) -> set[str]:
            return names | {SAFETY_AGGREGATES[trained[n]] for n in names if n in trained}

        checked = set_names - {s.name for s in self.prompts.sets if not s.checked}
        reported = {"eval": with_pools(checked)}
        for cell in self.evaluate.cells:
            reported[f"eval@{cell.name}"] = with_pools(set(cell.sets) or checked)
        return reported

    def _set_names(self, eval_names: list[str]) -> set[str]:
        """The prompt sets periodic evaluation reports: the recipe's, evaluate.sets, and with train.adversarial
        its two sets (checked: an unsafe set to attack from, no recipe set of theirs names; no set takes a
        pool's name)."""
        names = {s.name for s in self.prompts.sets} | set(eval_names)
        pooled = sorted(names & set(SAFETY_AGGREGATES.values()))
        _require(
            not pooled,
            "prompts.sets",
            f"{pooled} names the pool of every safe / unsafe set in periodic evaluation: rename the prompt set",
        )
        if self.train.adversarial.method == "none":
            return names
        _require(
            any(s.safety == "unsafe" for s in self.prompts.sets),
            "train.adversarial",
            "attacks start from the unsafe prompts: add an unsafe prompt set",
        )
        taken = sorted({ADVERSARIAL_SET, NEWEST_SET} & names)
        _require(
            not taken,
            "train.adversarial",
            f"names its prompt sets 'adversarial' and 'adversarial-new': rename the prompt set {taken}",
        )
        return names | {ADVERSARIAL_SET, NEWEST_SET}

    @property
    def samples_per_epoch(self) -> int:
        return self.sample.prompts_per_batch * self.sample.group_size * self.sample.batches_per_epoch


# ---------------------------------------------------------------------------------------------------------
# dict -> dataclass conversion with type checks


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        lists = [a for a in inner if typing.get_origin(a) is list]
        scalars = [a for a in inner if typing.get_origin(a) is not list]
        pick = lists[0] if isinstance(value, list) and lists else (scalars or inner)[0]
        return _convert(value, pick, key)
    if tp is Any:
        return value
    if origin is Literal:
        if isinstance(value, bool):
            # YAML 1.1 reads an unquoted `no` / `yes` as a boolean: map it back to the word the Literal uses
            words = ("yes", "true", "on") if value else ("no", "false", "off")
            value = next((w for w in words if w in args), value)
        if value not in args:
            raise UserError(f"recipe key '{key}': expected {_type_name(tp)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"recipe key '{key}': expected a list, got {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"recipe key '{key}': expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"recipe key '{key}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"recipe key '{key}': expected an integer, got {value!r}")
        return value
    if tp is float:
        # PyYAML reads 1e-5 (no dot) as a string: accept numeric strings for float fields.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"recipe key '{key}': expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise UserError(f"recipe key '{key}': expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"recipe key '{key}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {key}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by dotted key name."""
    where = f"recipe key '{prefix}'" if prefix else "recipe"
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            full = f"{prefix}.{key}" if prefix else str(key)
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""
            raise UserError(
                f"unknown recipe key '{full}': {hint}valid keys here are {', '.join(sorted(known))} "
                "(every key is documented in lora_grpo/config.py; `lora-grpo recipes show tiny-test` prints a recipe)"
            )
    kwargs = {}
    for name, value in data.items():
        full = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], full)
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a recipe file (and the recipes it extends), apply dotted overrides and validate. Relative file
    paths become absolute: those in a recipe against that recipe's folder, those an override gives against
    the current directory."""
    path = Path(path)
    data = read_recipe_data(path)
    data = apply_overrides(data, overrides or [], Path.cwd())
    data.setdefault("name", re.sub(r"[^A-Za-z0-9._-]+", "-", path.stem).strip("-.") or "recipe")
    return from_dict(Config, data)


def save_config(config: Config, path: Path) -> None:
    from lora_grpo.files import write_text_atomically

    write_text_atomically(path, yaml.safe_dump(to_dict(config), sort_keys=False))
