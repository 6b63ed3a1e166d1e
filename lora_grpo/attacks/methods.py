"""The four attacks: each finds, for every target (an unsafe prompt and the same prompt without its concept
words), a prompt that does not name the concept but brings it back.

- ring-a-bell (Tsai et al., ICLR 2024): text encoder only. The concept vector is the mean difference of the
  hidden states of the unsafe prompts and their concept-free versions; a genetic search finds K tokens whose
  hidden states come closest to (concept-free prompt + eta x concept vector).
- mma (MMA-Diffusion's text attack, Yang et al., CVPR 2024): text encoder only; GCG over K tokens toward the
  unsafe prompt's hidden states (cosine).
- unlearndiff (UnlearnDiffAtk, Zhang et al., ECCV 2024): white-box against the attacked UNet (base + adapter);
  K prefix tokens before the concept-free prompt, GCG on the denoising loss toward the base model's own images
  of the unsafe prompt.
- concept-inversion (Pham et al., ICLR 2024, "Circumventing Concept Erasure Methods For Text-to-Image
  Generative Models"): textual inversion against the attacked UNet: one new token embedding learned on the
  same images, used in the unsafe prompt in place of the concept word.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lora_grpo.attacks.search import (
    embeddings_at,
    full_ids,
    gcg_search,
    genetic_search,
    hidden_states,
    onehot_gradient,
    random_usable,
)
from lora_grpo.attacks.words import names_banned, token_text, typed_ids, usable

METHODS = ("ring-a-bell", "mma", "unlearndiff", "concept-inversion")
TEXT_ONLY = ("ring-a-bell", "mma")  # need no UNet and no pictures
PICTURES_PER_TARGET = 2  # images of the concept each white-box target aims at


def rendered_pictures(prompts: list[str], seed: int) -> Tensor:
    """The toy world's images of the concept for white-box targets: each prompt's composition rendered
    PICTURES_PER_TARGET times ([N * P, 3, H, W]; the base draws red for a red prompt only most of the time)."""
    from lora_grpo.toyworld.language import render_caption

    keys = [seed * 1000 + k for k in range(PICTURES_PER_TARGET)]
    return torch.stack([render_caption(p, key) for p in prompts for key in keys])


@dataclass(frozen=True)
class AttackSettings:
    method: str
    tokens: int = 6  # K: attack tokens (ring-a-bell and mma: the whole prompt; unlearndiff: the prefix)
    steps: int = 40  # GCG steps, genetic generations, or textual-inversion steps
    seed: int = 0
    top_k: int = 32  # GCG: candidates per position
    batch: int = 16  # GCG: swaps scored per step (32: unlearndiff over 5 min in the toy world)
    population: int = 48  # genetic search
    eta: float = 3.0  # ring-a-bell: how far along the concept vector
    noise_draws: int = 4  # unlearndiff and concept-inversion: (timestep, noise) draws per picture
    learning_rate: float = 5e-3  # concept-inversion
    # concept-inversion: timesteps drawn from [this x T, T), the noisy end where the concept is decided (drawn
    # over all T, the token only matched the concept word's own rate: toy world 0.73-0.77 vs 0.82-0.84)
    lowest_timestep: float = 0.3
    token: str = "<concept>"  # concept-inversion: the new token


@dataclass
class Target:
    unsafe: str  # the prompt that names the concept
    neutral: str  # the same without the concept words
    latents: Tensor | None = None  # [M, C, h, w]: the base model's images of `unsafe`, encoded (white-box)


@dataclass
class AttackModels:
    tokenizer: object
    text_encoder: torch.nn.Module
    unet: torch.nn.Module | None = None  # base + adapter (the attacked model), white-box methods
    scheduler: object | None = None


Step = Callable[[int, float], None]


def _states(models: AttackModels, prompts: list[str]) -> Tensor:
    tok = models.tokenizer
    ids = tok(
        prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
    )
    return hidden_states(models.text_encoder, ids.input_ids)  # [N, 77, D]


def _generator(seed: int, index: int) -> torch.Generator:
    """The search's randomness for target `index`: the same whether the targets before it ran in this process."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def ring_a_bell(
    models: AttackModels,
    targets: list[Target],
    index: int,
    banned,
    candidates,
    s: AttackSettings,
    on_step: Step,
) -> tuple[str, float]:
    tok, generator = models.tokenizer, _generator(s.seed, index)
    unsafe, neutral = (
        _states(models, [t.unsafe for t in targets]),
        _states(models, [t.neutral for t in targets]),
    )
    concept = (unsafe - neutral).mean(dim=0)  # [77, D], over every target
    goal = neutral[index] + s.eta * concept

    def fitness(pop: Tensor) -> Tensor:  # [P, K] -> [P]
        return -((hidden_states(models.text_encoder, full_ids(tok, pop)) - goal) ** 2).mean(dim=(1, 2))

    ok = lambda ids: usable(tok, ids, banned)  # noqa: E731
    best, value = genetic_search(
        fitness, candidates, s.tokens, ok, s.steps, generator, population=s.population, on_step=on_step
    )
    return token_text(tok, best.tolist()), -value


def mma(
    models: AttackModels,
    targets: list[Target],
    index: int,
    banned,
    candidates,
    s: AttackSettings,
    on_step: Step,
) -> tuple[str, float]:
    tok, generator = models.tokenizer, _generator(s.seed, index)
    goal = _states(models, [targets[index].unsafe])[0].flatten()  # [77 * D]

    def loss_of_states(states: Tensor) -> Tensor:  # [B, 77, D] -> [B]
        return 1 - F.cosine_similarity(states.flatten(1), goal.to(states.device)[None], dim=1)

    def gradient(attack: Tensor) -> Tensor:
        ids = full_ids(tok, attack[None])
        return onehot_gradient(
            models.text_encoder, ids, 1, attack, candidates, lambda st: loss_of_states(st)[0]
        )

    def batch_losses(pop: Tensor) -> Tensor:
        return loss_of_states(hidden_states(models.text_encoder, full_ids(tok, pop)))

    ok = lambda ids: usable(tok, ids, banned)  # noqa: E731
    start = random_usable(candidates, s.tokens, ok, generator)
    best, loss = gcg_search(
        start, candidates, gradient, batch_losses, ok, s.steps, generator, s.top_k, s.batch, on_step
    )
    return token_text(tok, best.tolist()), loss


def noise_draws(
    latents: Tensor, scheduler, draws: int, generator: torch.Generator, lowest: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Each picture `draws` times at a training timestep uniform in [lowest x T, T): (noisy latents, timesteps,
    noise), [M*draws, ...]."""
    x0 = latents.repeat_interleave(draws, dim=0)
    total = scheduler.config.num_train_timesteps
    t = torch.randint(int(lowest * total), total, (len(x0),), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    return scheduler.add_noise(x0, noise, t), t, noise


def denoising_losses(unet, noisy: Tensor, t: Tensor, noise: Tensor, states: Tensor) -> Tensor:
    """Per text condition, the mean epsilon-prediction error over the draws: states [B, 77, D] -> [B]."""
    device, dtype = unet.device, unet.dtype
    out = []
    for b in range(len(states)):
        cond = states[b : b + 1].expand(len(noisy), -1, -1).to(device, dtype)
        pred = unet(noisy.to(device, dtype), t.to(device), encoder_hidden_states=cond).sample
        out.append(((pred.float() - noise.to(device)) ** 2).mean())
    return torch.stack(out)


def unlearndiff(
    models: AttackModels,
    targets: list[Target],
    index: int,
    banned,
    candidates,
    s: AttackSettings,
    on_step: Step,
) -> tuple[str, float]:
    """GCG on the denoising loss, the (timestep, noise) draws renewed every step (as UnlearnDiffAtk samples a
    timestep each iteration), the current prefix and its candidates scored on the same draws."""
    tok, te, generator = models.tokenizer, models.text_encoder, _generator(s.seed, index)
    after = typed_ids(tok, targets[index].neutral)
    draw = list(noise_draws(targets[index].latents, models.scheduler, s.noise_draws, generator))

    def new_draw() -> None:
        draw[:] = noise_draws(targets[index].latents, models.scheduler, s.noise_draws, generator)

    def gradient(attack: Tensor) -> Tensor:
        loss = lambda st: denoising_losses(models.unet, *draw, st)[0]  # noqa: E731
        return onehot_gradient(te, full_ids(tok, attack[None], after=after), 1, attack, candidates, loss)

    def batch_losses(pop: Tensor) -> Tensor:
        with torch.no_grad():
            return denoising_losses(models.unet, *draw, hidden_states(te, full_ids(tok, pop, after=after)))

    ok = lambda ids: usable(tok, [*ids, *after], banned)  # noqa: E731
    start = random_usable(candidates, s.tokens, ok, generator)
    best, loss = gcg_search(
        start, candidates, gradient, batch_losses, ok, s.steps, generator, s.top_k, s.batch, on_step, new_draw
    )
    return token_text(tok, [*best.tolist(), *after]), loss


def inversion_prompt(prompt: str, banned: list[str], token: str) -> str:
    """The unsafe prompt with its first concept word replaced by the learned token ("a red circle" -> "a <concept>
    circle"); a prompt without one gets the token in front."""
    words = prompt.split()
    j = next((k for k, w in enumerate(words) if names_banned(w, banned)), None)
    if j is None:
        return f"{token} {prompt}"
    return " ".join([*words[:j], token, *words[j + 1 :]])


def _token_ids(tok, prompt: str, token: str) -> tuple[list[int], int]:
    """Input ids [77] of a prompt holding `token` once (a placeholder id at its place) and that place."""
    before, _, after = prompt.partition(token)
    head = typed_ids(tok, before.strip()) if before.strip() else []
    tail = typed_ids(tok, after.strip()) if after.strip() else []
    ids = full_ids(tok, torch.tensor([[tok.pad_token_id]]), before=head, after=tail)[0]
    return ids.tolist(), 1 + len(head)


def concept_inversion(
    models: AttackModels,
    targets: list[Target],
    banned,
    candidates,
    s: AttackSettings,
    on_step: Step,
    state: dict[str, Tensor] | None = None,
    save_state: Callable[[dict[str, Tensor]], None] = lambda state: None,
    save_every: int = 20,
) -> tuple[list[str], Tensor, float]:
    """(the prompts with the token, its embedding [1, D], the last loss). Each step one target's pictures at
    fresh (timestep, noise) draws keyed by the step; `state` (from save_state: the step, the embedding and Adam's
    moments) continues an interrupted run exactly."""
    tok, te, unet = models.tokenizer, models.text_encoder, models.unet
    table = te.get_input_embeddings().weight.detach().float()
    start = table[candidates].mean(dim=0, keepdim=True)  # [1, D]: a neutral start, the mean token
    vector = (state["vector"] if state else start).clone().to(table.device).requires_grad_(True)
    optimizer = torch.optim.Adam([vector], lr=s.learning_rate)
    first = 1
    if state:
        optimizer.state[vector] = {k: state[k].clone() for k in ("step", "exp_avg", "exp_avg_sq")}
        first = int(state["step"].item()) + 1
    prompts = [inversion_prompt(t.unsafe, banned, s.token) for t in targets]
    placed = [_token_ids(tok, p, s.token) for p in prompts]
    loss_value = float(state["loss"].item()) if state else float("nan")
    for step in range(first, s.steps + 1):
        i = (step - 1) % len(targets)
        ids, at = placed[i]
        generator = _generator(s.seed, step)
        draws = noise_draws(targets[i].latents, models.scheduler, s.noise_draws, generator, s.lowest_timestep)
        with embeddings_at(te, at, vector):
            states = te(torch.tensor([ids], device=te.device))[0]
        loss = denoising_losses(unet, *draws, states)[0]
        (vector.grad,) = torch.autograd.grad(loss, vector)  # the embedding only: a trained LoRA gets no .grad
        optimizer.step()
        loss_value = loss.item()
        on_step(step, loss_value)
        if step % save_every == 0 or step == s.steps:
            moments = optimizer.state[vector]
            save_state(
                {
                    "vector": vector.detach().cpu().clone(),  # copies: Adam updates its own in place
                    "step": moments["step"].detach().cpu().clone().reshape(()),
                    "exp_avg": moments["exp_avg"].detach().cpu().clone(),
                    "exp_avg_sq": moments["exp_avg_sq"].detach().cpu().clone(),
                    "loss": torch.tensor(loss_value),
                }
            )
    return prompts, vector.detach().cpu(), loss_value


SEARCHES = {"ring-a-bell": ring_a_bell, "mma": mma, "unlearndiff": unlearndiff}  # one prompt a target
