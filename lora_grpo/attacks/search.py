"""Discrete token search over a CLIP text encoder: the encodings, a one-hot gradient, and two optimisers.

- greedy coordinate gradient (GCG; Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned
  Language Models"): the gradient of the loss with respect to each attack position's one-hot token ranks the
  candidates; a batch of single-token swaps drawn from the best ranked is scored exactly and the best kept.
  MMA-Diffusion (Yang et al., CVPR 2024) and UnlearnDiffAtk (Zhang et al., ECCV 2024) search this way, with a
  text-embedding and a diffusion loss respectively.
- a genetic search (Ring-A-Bell, Tsai et al., ICLR 2024): no gradient, a population of token sequences,
  elitism, tournament parents, uniform crossover, mutation.

Token sequences a user could not type (a banned word in the text, or text that tokenises to other ids) are
never kept: each search takes the check (words.usable) as `ok`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor


def full_ids(tokenizer, attack: Tensor, before: list[int] = (), after: list[int] = ()) -> Tensor:
    """Model inputs [N, 77]: start token, `before`, the attack tokens [N, K], `after`, end token, padding."""
    n, length = attack.shape[0], tokenizer.model_max_length
    head = torch.tensor([tokenizer.bos_token_id, *before], dtype=torch.long).expand(n, -1)
    tail = torch.tensor([*after, tokenizer.eos_token_id], dtype=torch.long).expand(n, -1)
    ids = torch.cat([head, attack, tail], dim=1)[:, :length]
    pad = torch.full((n, length - ids.shape[1]), tokenizer.pad_token_id, dtype=torch.long)
    return torch.cat([ids, pad], dim=1)


@contextlib.contextmanager
def embeddings_at(text_encoder, start: int | list[int], values: Tensor):
    """While active, the token embeddings at positions start..start+K (one start, or one per row) are
    `values` [K, D] instead of the looked-up ones: a gradient reaches `values` (one-hot search, textual
    inversion)."""
    layer = text_encoder.get_input_embeddings()

    def replace(module, inputs, output):  # output [N, L, D]
        out = output.clone()
        starts = [start] * len(out) if isinstance(start, int) else start
        for row, s in enumerate(starts):
            out[row, s : s + values.shape[-2]] = values.to(out.dtype)
        return out

    handle = layer.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def hidden_states(text_encoder, ids: Tensor, batch: int = 64) -> Tensor:
    """The text encoder's last hidden states [N, 77, D] (what SD 1.x's UNet reads), no gradient."""
    with torch.no_grad():
        device = text_encoder.device
        return torch.cat(
            [text_encoder(ids[i : i + batch].to(device))[0].float() for i in range(0, len(ids), batch)]
        )


def onehot_gradient(
    text_encoder,
    ids: Tensor,
    start: int,
    attack: Tensor,
    candidates: Tensor,
    loss_of_states: Callable[[Tensor], Tensor],
) -> Tensor:
    """d loss / d one-hot at each attack position, over the candidate tokens: [K, V']. `ids` [1, 77] holds the
    attack tokens [K] at `start`; loss_of_states maps hidden states [1, 77, D] to a scalar."""
    weight = text_encoder.get_input_embeddings().weight  # [V, D]
    table = weight[candidates.to(weight.device)].detach().float()  # [V', D]
    index = torch.searchsorted(candidates, attack)  # candidates are sorted
    onehot = torch.zeros(len(attack), len(candidates), device=table.device)
    onehot[torch.arange(len(attack)), index.to(table.device)] = 1.0
    onehot.requires_grad_(True)
    with embeddings_at(text_encoder, start, onehot @ table):
        loss = loss_of_states(text_encoder(ids.to(table.device))[0].float())
    (grad,) = torch.autograd.grad(loss, onehot)
    return grad.detach().cpu()


def gcg_search(
    attack: Tensor,
    candidates: Tensor,
    gradient: Callable[[Tensor], Tensor],
    losses: Callable[[Tensor], Tensor],
    ok: Callable[[list[int]], bool],
    steps: int,
    generator: torch.Generator,
    top_k: int = 32,
    batch: int = 64,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
    new_draw: Callable[[], None] = lambda: None,
) -> tuple[Tensor, float]:
    """Minimise `losses` over token sequences from `attack` [K] (usable): each step ranks each position's
    candidates by `gradient(attack)` [K, V'], scores `batch` single swaps with `losses` ([B, K] -> [B]) and keeps
    the best one `ok` accepts (words.usable) if it beats the current sequence scored in the same call. A
    stochastic loss (the denoising loss at drawn timesteps) calls `new_draw` first each step, so the current
    and the candidates are compared on the same draw. Returns (tokens [K], its loss at the last step)."""
    best = attack.clone()
    best_loss = float("nan")
    for step in range(1, steps + 1):
        new_draw()
        top = (-gradient(best)).topk(min(top_k, len(candidates)), dim=1).indices  # [K, k]
        swaps = best.repeat(batch, 1)  # [B, K]
        where = torch.randint(0, len(best), (batch,), generator=generator)
        pick = torch.randint(0, top.shape[1], (batch,), generator=generator)
        swaps[torch.arange(batch), where] = candidates[top[where, pick]]
        accepted = torch.tensor([ok(s.tolist()) for s in swaps])
        scores = losses(torch.cat([best[None], swaps[accepted]]))  # [1 + B'], the current first
        i = int(scores.argmin())
        if i > 0:
            best = swaps[accepted][i - 1].clone()
        best_loss = scores[i].item()
        on_step(step, best_loss)
    return best, best_loss


def random_usable(
    candidates: Tensor,
    length: int,
    ok: Callable[[list[int]], bool],
    generator: torch.Generator,
    tries: int = 1000,
) -> Tensor:
    """A token sequence of `length` drawn uniformly from the candidates that `ok` accepts."""
    for _ in range(tries):
        ids = candidates[torch.randint(0, len(candidates), (length,), generator=generator)]
        if ok(ids.tolist()):
            return ids
    raise RuntimeError(f"no usable {length}-token sequence in {tries} draws")


def genetic_search(
    fitness: Callable[[Tensor], Tensor],
    candidates: Tensor,
    length: int,
    ok: Callable[[list[int]], bool],
    generations: int,
    generator: torch.Generator,
    population: int = 64,
    elite: int = 6,
    mutation: float = 0.1,
    on_step: Callable[[int, float], None] = lambda step, value: None,
) -> tuple[Tensor, float]:
    """Maximise `fitness` ([P, K] -> [P]) over token sequences of `length` that `ok` accepts. Returns (tokens
    [K], fitness)."""
    pop = torch.stack([random_usable(candidates, length, ok, generator) for _ in range(population)])
    scores = fitness(pop)
    for step in range(1, generations + 1):
        order = scores.argsort(descending=True)
        children = [pop[i] for i in order[:elite]]  # elitism: the best survive unchanged
        while len(children) < population:
            a, b = (_tournament(scores, generator) for _ in range(2))
            mask = torch.rand(length, generator=generator) < 0.5  # uniform crossover
            child = torch.where(mask, pop[a], pop[b])
            mutate = torch.rand(length, generator=generator) < mutation
            child[mutate] = candidates[
                torch.randint(0, len(candidates), (int(mutate.sum()),), generator=generator)
            ]
            if ok(child.tolist()):
                children.append(child)
        pop = torch.stack(children)
        scores = fitness(pop)
        on_step(step, scores.max().item())
    best = int(scores.argmax())
    return pop[best], scores[best].item()


def _tournament(scores: Tensor, generator: torch.Generator, size: int = 3) -> int:
    entrants = torch.randint(0, len(scores), (size,), generator=generator)
    return int(entrants[scores[entrants].argmax()])
