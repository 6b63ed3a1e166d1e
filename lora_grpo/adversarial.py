"""train.adversarial: attacks against the current policy feed an unsafe prompt set (AdvUnlearn's idea, Zhang et
al., NeurIPS 2024, "Defensive Unlearning with Adversarial Training for Robust Concept Erasure", here with the
steering reward instead of a classifier).

At the end of every `every`-th epoch (after its update, before its check) the main process runs the configured
attack (lora_grpo.attacks) on `targets` of the recipe's unsafe prompts (a window rotating round by round) against
the UNet as it is now, LoRA on; the attack prompts found join the set `adversarial` (its newest `keep`), which the
epochs after draw like any unsafe set. The newest round's prompts alone are also an evaluation-only set,
`adversarial-new`: the check right after a round reads that fresh attack undiluted by the older rounds.
concept-inversion learns a token embedding instead, a new token each round ("<concept-1>", "<concept-2>", ...),
and installs it in the pipeline's tokenizer and text encoder, so its prompts ("a <concept-2> circle on the left")
condition the UNet as the attack's embedding does: the set holds a pool of the newest rounds' tokens, not only
the last one (one token overwritten each round left the adapter chasing the newest embedding: a fresh 200-step
inversion still reached 0.21 on a seed-0 adapter that stopped on a fresh round's 0.03). The found prompts and
the embeddings live in the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lora_grpo.attacks.methods import (
    PICTURES_PER_TARGET,
    SEARCHES,
    TEXT_ONLY,
    AttackModels,
    AttackSettings,
    Target,
    concept_inversion,
)
from lora_grpo.attacks.words import candidate_tokens, concept_words, without_banned
from lora_grpo.config import ADVERSARIAL_SET, NEWEST_SET, AdversarialConfig, Config
from lora_grpo.errors import UserError
from lora_grpo.prompts import PromptSet


@dataclass
class Adversary:
    """What the attacks found so far (checkpointed): the prompts, and concept-inversion's token embeddings."""

    found: list[str] = field(default_factory=list)
    embeddings: dict[str, list[float]] = field(default_factory=dict)  # token -> its vector, round by round
    rounds: int = 0

    def state(self) -> dict:
        return {"found": list(self.found), "embeddings": dict(self.embeddings), "rounds": self.rounds}

    @classmethod
    def from_state(cls, state: dict | None) -> Adversary:
        state = state or {}
        embeddings = dict(state.get("embeddings", {}))
        if state.get("embedding") is not None:  # a checkpoint written before each round had its own token
            embeddings = {"<concept>": state["embedding"]}
        return cls(list(state.get("found", [])), embeddings, int(state.get("rounds", 0)))


TOKEN_PREFIX = "<concept-"


def round_token(round_index: int) -> str:
    """concept-inversion's token of round `round_index` (from 0): each round learns its own."""
    return f"{TOKEN_PREFIX}{round_index + 1}>"


def banned_words(config: Config) -> list[str]:
    """The anchors' concept words plus train.adversarial.ban (before any model loads)."""
    from lora_grpo.rewards.steering import load_anchors

    words = sorted(
        {
            *concept_words(load_anchors(config.reward.anchors)),
            *(w.lower() for w in config.train.adversarial.ban),
        }
    )
    if not words:
        raise UserError(
            "recipe key 'train.adversarial.ban': the anchors name no concept word an attack prompt must avoid: "
            "list the concept's words there"
        )
    return words


def adversarial_set(cfg: AdversarialConfig, unsafe: list[str], adversary: Adversary) -> PromptSet:
    """The set the attacks feed: their newest `keep` prompts; before the first attack, the unsafe prompts."""
    prompts = tuple(adversary.found[-cfg.keep :]) or tuple(unsafe)
    return PromptSet(ADVERSARIAL_SET, "unsafe", prompts, cfg.weight)


def newest_set(cfg: AdversarialConfig, unsafe: list[str], adversary: Adversary) -> PromptSet:
    """The newest round's prompts alone (evaluation only; before the first round, the unsafe prompts): its
    check reads a fresh attack on the policy it checks, which the set's pool of `keep` dilutes with older
    rounds the policy has already trained on."""
    per_round = min(cfg.targets, len(unsafe))  # every round finds one prompt a target
    prompts = tuple(adversary.found[-per_round:]) if adversary.rounds else tuple(unsafe)
    return PromptSet(NEWEST_SET, "unsafe", prompts, cfg.weight)


def round_targets(unsafe: list[str], count: int, round_index: int) -> list[str]:
    """Round r attacks `count` unsafe prompts from position r * count on (wrapping)."""
    n = len(unsafe)
    return [unsafe[(round_index * count + i) % n] for i in range(min(count, n))]


def round_passes(config: Config, targets: int) -> int:
    """UNet passes of one round on `targets` prompts, counted as PassCounter counts them (one image through the
    UNet at one step): the concept pictures the base draws (rendered in the toy world: none), then the attack's
    denoising losses (concept-inversion: one gradient a step; unlearndiff: one gradient and `batch` scored
    swaps a step and target). Text-only attacks run no UNet."""
    cfg = config.train.adversarial
    if cfg.method == "none" or cfg.method in TEXT_ONLY:
        return 0
    s = AttackSettings(cfg.method, tokens=cfg.tokens, steps=cfg.steps)
    rows = PICTURES_PER_TARGET * s.noise_draws  # one denoising loss: every picture at its draws
    guided = 2 if config.sample.uses_cfg else 1
    pictures = 0 if config.evaluate.suite == "toyworld" else targets * PICTURES_PER_TARGET
    drawn = pictures * config.sample.num_steps * guided
    if cfg.method == "concept-inversion":
        return drawn + s.steps * rows
    return drawn + targets * s.steps * rows * (1 + s.batch)


def install_token(pipe, token: str, vector: torch.Tensor) -> None:
    """Put `token` with embedding `vector` [1, D] into the pipeline's tokenizer and text encoder (added once,
    overwritten after), as diffusers' load_textual_inversion does for a one-vector embedding."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
        encoder.resize_token_embeddings(len(tokenizer))
    table = encoder.get_input_embeddings().weight
    with torch.no_grad():
        table[tokenizer.convert_tokens_to_ids(token)] = vector.reshape(-1).to(table.device, table.dtype)


def attack_round(
    pipe, unet, cfg: AdversarialConfig, targets: list[Target], banned: list[str], seed: int, token: str
) -> tuple[list[str], torch.Tensor | None]:
    """One attack on the policy as it is now: (the prompts found, concept-inversion's embedding of `token` or
    None)."""
    settings = AttackSettings(cfg.method, tokens=cfg.tokens, steps=cfg.steps, seed=seed, token=token)
    models = AttackModels(pipe.tokenizer, pipe.text_encoder, unet, pipe.scheduler)
    candidates = candidate_tokens(pipe.tokenizer, [*banned, TOKEN_PREFIX])  # never an earlier round's token
    noop = lambda step, value: None  # noqa: E731
    if cfg.method == "concept-inversion":
        prompts, vector, _ = concept_inversion(models, targets, banned, candidates, settings, noop)
        return prompts, vector
    search = SEARCHES[cfg.method]
    return [
        search(models, targets, i, banned, candidates, settings, noop)[0] for i in range(len(targets))
    ], None


def targets_of(
    prompts: list[str], banned: list[str], latents: torch.Tensor | None, per_target: int
) -> list[Target]:
    """Targets for `prompts`, with their pictures' latents [N * per_target, ...] when the method needs them."""
    return [
        Target(
            p,
            without_banned(p, banned),
            None if latents is None else latents[i * per_target : (i + 1) * per_target],
        )
        for i, p in enumerate(prompts)
    ]


class AdversarialTraining:
    """The trainer's side of train.adversarial: the adversarial prompt set, its rounds and its checkpoint state."""

    def __init__(self, config: Config, unsafe: list[str]):
        self.cfg, self.seed, self.unsafe = config.train.adversarial, config.seed, unsafe
        self.banned = banned_words(config)
        self.toyworld = config.evaluate.suite == "toyworld"  # its concept pictures are rendered
        self.adversary = Adversary()

    def prompt_set(self) -> PromptSet:
        return adversarial_set(self.cfg, self.unsafe, self.adversary)

    def newest_set(self) -> PromptSet:
        return newest_set(self.cfg, self.unsafe, self.adversary)

    def due(self, epochs_done: int) -> bool:
        """A round at the end of every `every`-th epoch (before that epoch's check)."""
        return epochs_done > 0 and epochs_done % self.cfg.every == 0

    def pictures(self, model, reward_fn, prompts: list[str]) -> torch.Tensor | None:
        """Images of the concept for `prompts`, encoded, as `lora-grpo attack` makes them: rendered in the toy
        world, else the base model's own (adapter off); None for text-only methods."""
        from lora_grpo.attacks.methods import TEXT_ONLY, rendered_pictures
        from lora_grpo.models import adapter_disabled, encode_images
        from lora_grpo.rollout import sample_scored

        if self.cfg.method in TEXT_ONLY:
            return None
        if self.toyworld:
            return encode_images(model.vae, rendered_pictures(prompts, self.seed + 77_777)).cpu()
        asked = [p for p in prompts for _ in range(PICTURES_PER_TARGET)]
        with adapter_disabled(model.unet):
            images, _ = sample_scored(model, reward_fn, asked, self.seed + 77_777)
        return encode_images(model.vae, images).cpu()

    def run_round(self, pipe, model, reward_fn, accelerator, log) -> None:
        """Attack the policy as it is now (main process), share the result with every process, and grow the
        set (and install concept-inversion's token)."""
        from accelerate.utils import broadcast_object_list

        result = [None]
        token = round_token(self.adversary.rounds)
        if accelerator.is_main_process:
            prompts = round_targets(self.unsafe, self.cfg.targets, self.adversary.rounds)
            targets = targets_of(
                prompts, self.banned, self.pictures(model, reward_fn, prompts), PICTURES_PER_TARGET
            )
            found, vector = attack_round(
                pipe, model.unet, self.cfg, targets, self.banned, self.seed + self.adversary.rounds, token
            )
            result = [(found, None if vector is None else vector.reshape(-1).tolist())]
            log(f"adversarial round {self.adversary.rounds + 1} ({self.cfg.method}): " + "; ".join(found))
        found, embedding = broadcast_object_list(result)[0]
        self.adversary.found += found
        self.adversary.rounds += 1
        if embedding is not None:
            self.adversary.embeddings[token] = embedding
            install_token(pipe, token, torch.tensor(embedding))

    def state(self) -> dict:
        return self.adversary.state()

    def restore(self, state: dict | None, pipe) -> None:
        self.adversary = Adversary.from_state(state)
        for token, embedding in self.adversary.embeddings.items():
            install_token(pipe, token, torch.tensor(embedding))
