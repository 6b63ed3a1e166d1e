"""GRPO math as pure functions on tensors: group advantages, the PPO-clipped loss, the Gaussian KL.

Nothing here knows about models or configs; every function takes tensors and returns tensors (plus detached
metrics), so each is tested against hand-computed numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, eps: float = 1e-6, std: Tensor | None = None) -> Tensor:
    """Normalise rewards within each group: (r - mean) / std over the G samples of one prompt.

    rewards: [B, G]. The std is the population std (divide by G). A group whose std is below `eps` (all
    rewards equal) carries no preference and gets advantage 0, never NaN. `std` (a scalar, or [B, 1] a group)
    replaces each group's own std (`batch_std`, `group_scales`); the centring stays per group.
    """
    mean = rewards.mean(dim=1, keepdim=True)  # [B, 1]
    own = rewards.std(dim=1, unbiased=False, keepdim=True)  # [B, 1]
    scale = own if std is None else std.expand_as(own)
    flat = (own < eps) | (scale < eps)
    return torch.where(flat, torch.zeros_like(rewards), (rewards - mean) / torch.where(flat, 1.0, scale))


def batch_std(centred: Tensor, kept: Tensor) -> Tensor:
    """One advantage scale for a whole batch: the population std of every kept group's centred rewards.

    centred: [N] rewards minus their group's mean; kept: [N] bool (False for groups that sit the update out).
    The values are summed in sorted order in float64, so the same rewards give the same bits however they are
    split over processes and gathered.
    """
    values = centred[kept].double().pow(2).sort().values
    return (values.sum() / max(1, values.numel())).sqrt().to(centred.dtype)


def picture_groups(start: Tensor | None, group_size: int, rows: int) -> Tensor:
    """[rows / G] bool: the groups with a row that started from its picture (`start` [rows] > 0; None: none)."""
    if start is None:
        return torch.zeros(rows // group_size, dtype=torch.bool)
    return (start > 0).view(-1, group_size).any(dim=1)


def group_scales(rewards: Tensor, pooled: Tensor, std: Tensor) -> Tensor:
    """[P, 1] advantage scales for rewards [P, G]: `std` (a scalar) for the groups marked in `pooled` [P],
    each other group its own population std."""
    own = rewards.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(pooled[:, None], std.to(own.dtype).expand_as(own), own)


def clip_advantages(advantages: Tensor, max_abs: float) -> Tensor:
    """Clip advantages to [-max_abs, max_abs] (SafeDiffusion-R1 uses 2.5)."""
    return advantages.clamp(-max_abs, max_abs)


def finite_groups(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Rewards [P*G] as groups [P, G] with non-finite groups zeroed, and which groups were finite [P]."""
    grouped = rewards.view(-1, group_size)  # [P, G]
    finite = torch.isfinite(grouped).all(dim=1)
    return torch.where(finite[:, None], grouped, torch.zeros_like(grouped)), finite


def centred_rewards(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Each reward minus its group's mean [P*G] (0 in non-finite groups) and whether its group is kept [P*G]:
    what `batch_std` reads, gathered from every process."""
    kept, finite = finite_groups(rewards, group_size)
    centred = kept - kept.mean(dim=1, keepdim=True)
    return centred.flatten(), finite.repeat_interleave(group_size)


def finite_group_advantages(
    rewards: Tensor, group_size: int, max_abs: float, eps: float = 1e-6, std: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Clipped group advantages for rewards [P*G] laid out group by group, with non-finite groups masked.

    Returns advantages [P*G] (0 for every sample of a group holding a non-finite reward: it sits this
    update out), finite [P] (groups whose rewards are all finite) and flat [P] (finite groups whose rewards
    are all equal, so they carry no preference). `std`: one scale for every group (see `group_advantages`).
    """
    kept, finite = finite_groups(rewards, group_size)
    advantages = clip_advantages(group_advantages(kept, eps, std), max_abs).flatten()
    flat = finite & (kept.std(dim=1, unbiased=False) < eps)
    return advantages, finite, flat


def clipped_policy_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-clipped surrogate loss, mean over samples (Schulman et al. 2017, eq. 7, negated for descent).

    loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))),  ratio = exp(log_probs - old_log_probs).
    All inputs are [N]. Returns the loss and detached metrics: ratio mean/min/max, clip fraction (share of
    ratios outside the clip range) and the approximate KL 0.5 * mean((log_probs - old_log_probs)^2).
    """
    log_ratio = log_probs - old_log_probs  # [N]
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        metrics = {
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
            "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, metrics


def gaussian_kl(mean_p: Tensor, std_p: Tensor, mean_q: Tensor, std_q: Tensor) -> Tensor:
    """KL(N(mean_p, std_p^2) || N(mean_q, std_q^2)) per sample, averaged over the non-batch elements.

    Closed form per element: log(std_q / std_p) + (std_p^2 + (mean_p - mean_q)^2) / (2 std_q^2) - 1/2.
    The mean over elements matches the log-prob reduction, so the KL weight is on the same scale as the loss.
    Computed in fp32.
    """
    mean_p, mean_q = mean_p.float(), mean_q.float()
    var_p = std_p.float() ** 2
    var_q = std_q.float() ** 2
    kl = 0.5 * torch.log(var_q / var_p) + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5
    return kl.mean(dim=tuple(range(1, kl.ndim)))


def kl_weights(safety: list[str], set_index: Tensor, kl_coef: float, safe_kl_coef: float | None) -> Tensor:
    """Each trajectory's KL weight [N]: `safe_kl_coef` where its prompt set (`safety[set_index[i]]`) is safe
    (unset: `kl_coef`), `kl_coef` where it is unsafe."""
    safe = torch.tensor([s == "safe" for s in safety], dtype=torch.bool)[set_index.cpu()]  # [N]
    on_safe = kl_coef if safe_kl_coef is None else safe_kl_coef
    return torch.where(safe, torch.tensor(on_safe), torch.tensor(kl_coef)).float()


def trained_steps(num_steps: int, fraction: float) -> int:
    """How many denoising steps of each trajectory are trained: max(1, int(num_steps * fraction))."""
    return max(1, int(num_steps * fraction))


def subsample_timesteps(
    num_samples: int, num_steps: int, fraction: float, generator: torch.Generator, earliest: bool = False
) -> Tensor:
    """Which denoising steps to train: [N, k] step indices, k = `trained_steps(num_steps, fraction)`.

    earliest=False: an independent random subset per trajectory; fraction 1 trains every step (shuffled).
    earliest=True: the first k steps (the noisiest, where layout and colour are decided) of every trajectory,
    in a random order per trajectory.
    """
    k = trained_steps(num_steps, fraction)
    window = k if earliest else num_steps
    order = torch.stack([torch.randperm(window, generator=generator) for _ in range(num_samples)])
    return order[:, :k]  # [N, k]


def stratified_order(member_rank: Tensor, group_size: int, steps: int, noise: Tensor) -> Tensor:
    """The order an inner epoch visits trajectories in: [N] indices, chunked by the caller into minibatches
    and optimizer steps.

    member_rank [N]: each trajectory's rank within its prompt group (a random permutation of 0..G-1 per
    group); noise [N]: a random tie-break. Optimizer step s gets the members ranked in
    [s*G/steps, (s+1)*G/steps) of every group, in `noise` order: every step sees every prompt group, and
    which trajectories a step holds depends on nothing but the trajectories themselves (so N processes
    holding the groups between them take the same steps as one process) whenever `steps` divides G.
    """
    layer = member_rank * steps // group_size  # [N] the optimizer step of each trajectory
    by_noise = torch.argsort(noise)
    return by_noise[torch.argsort(layer[by_noise], stable=True)]
