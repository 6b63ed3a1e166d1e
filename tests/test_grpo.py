"""GRPO math against hand-computed numbers and torch.distributions."""

import math

import pytest
import torch

from lora_grpo.grpo import (
    batch_std,
    centred_rewards,
    clip_advantages,
    clipped_policy_loss,
    finite_group_advantages,
    gaussian_kl,
    group_advantages,
    group_scales,
    picture_groups,
    stratified_order,
    subsample_timesteps,
)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.5, 0.5, 0.5, 0.5]])
    adv = group_advantages(rewards)
    # group 0: mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
    s = math.sqrt(3.5)
    assert torch.allclose(adv[0], torch.tensor([-2 / s, -1 / s, 0.0, 3 / s]), atol=1e-6)
    # all-equal group: no preference, zero advantage, not NaN
    assert torch.equal(adv[1], torch.zeros(4))


def test_group_advantages_are_per_group():
    rewards = torch.tensor([[0.0, 1.0], [10.0, 30.0]])
    # each group of two normalises to -1, +1 regardless of scale
    assert torch.allclose(group_advantages(rewards), torch.tensor([[-1.0, 1.0], [-1.0, 1.0]]))


def test_one_std_for_the_batch_hand_computed():
    """train.advantage_std: batch: each group centred on its own mean, every group scaled by one std."""
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 4.0, 7.0, 0.5, 0.5, 0.5])
    centred, kept = centred_rewards(rewards, 3)
    assert torch.allclose(centred, torch.tensor([-1.0, 0.0, 1.0, -1.0, -1.0, 2.0, 0.0, 0.0, 0.0]))
    assert kept.all()
    # population std of the nine centred values: sqrt((1 + 0 + 1 + 1 + 1 + 4 + 0) / 9)
    std = batch_std(centred, kept)
    assert std.item() == pytest.approx(math.sqrt(8 / 9), abs=1e-7)
    adv, finite, flat = finite_group_advantages(rewards, 3, max_abs=2.5, std=std)
    s = math.sqrt(8 / 9)
    expected = [-1 / s, 0.0, 1 / s, -1 / s, -1 / s, 2 / s, 0.0, 0.0, 0.0]
    assert torch.allclose(adv, torch.tensor(expected), atol=1e-6)
    assert flat.tolist() == [False, False, True] and finite.all()
    # a near-flat group stays small, where its own std would blow it up to +-1.22
    nearly = torch.tensor([0.500, 0.501, 0.502, 0.0, 1.0, 0.5])
    centred, kept = centred_rewards(nearly, 3)
    adv, _, _ = finite_group_advantages(nearly, 3, max_abs=2.5, std=batch_std(centred, kept))
    assert adv[:3].abs().max() < 0.01 and adv[3:].abs().max() > 1.0
    assert finite_group_advantages(nearly, 3, max_abs=2.5)[0][:3].abs().max() > 1.2


def test_picture_groups_take_the_batch_std_and_noise_groups_their_own_hand_computed():
    """train.advantage_std: picture-batch: a near-flat group from a picture is scaled by the batch's std (and
    stays small), a group from noise by its own (and reaches +-1 as in GRPO)."""
    rewards = torch.tensor([0.0, 2.0, 0.50, 0.52])  # group 0 from noise, group 1 from a picture
    centred, kept = centred_rewards(rewards, 2)
    std = batch_std(centred, kept)  # sqrt((1 + 1 + 0.01^2 + 0.01^2) / 4)
    assert std.item() == pytest.approx(math.sqrt(2.0002 / 4), abs=1e-6)
    scales = group_scales(rewards.view(2, 2), torch.tensor([False, True]), std)
    assert scales.shape == (2, 1) and scales[0, 0].item() == pytest.approx(1.0)  # group 0's own std
    assert scales[1, 0].item() == pytest.approx(std.item())
    adv, _, _ = finite_group_advantages(rewards, 2, max_abs=2.5, std=scales)
    s = math.sqrt(2.0002 / 4)
    # which groups came from pictures: any row with a start step > 0 (img2img.rows < 1 mixes them)
    assert picture_groups(torch.tensor([0, 0, 0, 7, 0, 0, 5, 5]), 2, 8).tolist() == [False, True, False, True]
    assert picture_groups(None, 2, 8).tolist() == [False] * 4
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, -0.01 / s, 0.01 / s]), atol=1e-5)


def test_the_batch_std_leaves_out_non_finite_groups_and_ignores_order():
    rewards = torch.tensor([1.0, 3.0, float("nan"), 5.0, 2.0, 2.0, 0.0, 4.0])
    centred, kept = centred_rewards(rewards, 2)
    assert kept.tolist() == [True, True, False, False, True, True, True, True]
    assert batch_std(centred, kept).item() == pytest.approx(math.sqrt((1 + 1 + 0 + 0 + 4 + 4) / 6), abs=1e-7)
    adv, finite, _ = finite_group_advantages(rewards, 2, max_abs=2.5, std=batch_std(centred, kept))
    assert finite.tolist() == [True, False, True, True] and torch.equal(adv[2:4], torch.zeros(2))
    # the same values gathered from two processes in another order give the same bits
    g = torch.Generator().manual_seed(0)
    values = torch.randn(64, generator=g) * 1e-3 + torch.linspace(0, 3, 64)
    centred, kept = centred_rewards(values, 8)
    order = torch.randperm(64, generator=g)
    assert torch.equal(batch_std(centred, kept), batch_std(centred[order], kept[order]))


def test_clip_advantages():
    assert torch.equal(
        clip_advantages(torch.tensor([-4.0, -1.0, 2.5, 3.0]), 2.5), torch.tensor([-2.5, -1.0, 2.5, 2.5])
    )


def test_clipped_loss_hand_computed_both_signs_and_boundaries():
    eps = 0.2
    # ratios: 1.5 (above 1+eps), 0.5 (below 1-eps), 1.1 (inside), 1.5, 0.5
    ratios = torch.tensor([1.5, 0.5, 1.1, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, -2.0, -1.0, -1.0])
    old = torch.zeros(5)
    new = torch.log(ratios)
    loss, m = clipped_policy_loss(new, old, adv, eps)
    # per sample max(-A r, -A clip(r)):
    # A=+1, r=1.5: max(-1.5, -1.2) = -1.2      (gain capped at the upper boundary)
    # A=+1, r=0.5: max(-0.5, -0.8) = -0.5      (a worse ratio is not clipped: pessimistic)
    # A=-2, r=1.1: max(2.2, 2.2)  = 2.2        (inside the range)
    # A=-1, r=1.5: max(1.5, 1.2)  = 1.5        (negative advantage, ratio too high: unclipped)
    # A=-1, r=0.5: max(0.5, 0.8)  = 0.8        (negative advantage, ratio too low: capped at 1-eps)
    expected = (-1.2 - 0.5 + 2.2 + 1.5 + 0.8) / 5
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["clip_fraction"].item() == pytest.approx(4 / 5)
    assert m["ratio_max"].item() == pytest.approx(1.5)
    assert m["ratio_min"].item() == pytest.approx(0.5)
    assert m["approx_kl"].item() == pytest.approx(0.5 * (torch.log(ratios) ** 2).mean().item(), rel=1e-6)


def test_clipped_loss_gradient_zero_when_clipped():
    # A > 0 and ratio above 1 + eps: the clipped term wins and carries no gradient
    new = torch.tensor([math.log(1.5)], requires_grad=True)
    loss, _ = clipped_policy_loss(new, torch.zeros(1), torch.ones(1), 0.2)
    loss.backward()
    assert new.grad.item() == 0.0
    # inside the range the gradient is -A * ratio
    new = torch.tensor([math.log(1.1)], requires_grad=True)
    loss, _ = clipped_policy_loss(new, torch.zeros(1), torch.tensor([2.0]), 0.2)
    loss.backward()
    assert new.grad.item() == pytest.approx(-2.0 * 1.1, rel=1e-6)


def test_ratio_one_gives_minus_mean_advantage():
    lp = torch.tensor([-1.3, -0.2, -5.0])
    adv = torch.tensor([0.5, -1.5, 2.0])
    loss, m = clipped_policy_loss(lp, lp.clone(), adv, 1e-4)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert m["ratio_mean"].item() == 1.0 and m["clip_fraction"].item() == 0.0


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mp, mq = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    sp, sq = torch.rand(3, 1, 1, 1) + 0.1, torch.rand(3, 1, 1, 1) + 0.1
    ours = gaussian_kl(mp, sp, mq, sq)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, sp), torch.distributions.Normal(mq, sq)
    )
    assert torch.allclose(ours, ref.mean(dim=(1, 2, 3)), atol=1e-5)
    # same std: ||mp - mq||^2 / (2 std^2), averaged
    same = gaussian_kl(mp, sp, mq, sp)
    assert torch.allclose(same, ((mp - mq) ** 2 / (2 * sp**2)).mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(gaussian_kl(mp, sp, mp, sp), torch.zeros(3))


def test_subsample_timesteps():
    g = torch.Generator().manual_seed(0)
    idx = subsample_timesteps(6, 10, 0.5, g)
    assert idx.shape == (6, 5)
    for row in idx:
        assert len(set(row.tolist())) == 5 and row.min() >= 0 and row.max() < 10
    # the subsets differ between trajectories
    assert len({tuple(sorted(r.tolist())) for r in idx}) > 1
    full = subsample_timesteps(2, 7, 1.0, g)
    assert sorted(full[0].tolist()) == list(range(7))
    assert subsample_timesteps(1, 7, 0.01, g).shape == (1, 1)


def test_subsample_earliest_timesteps_trains_the_noisiest_steps():
    """earliest: every trajectory trains exactly steps 0..k-1 (step 0 is the first, noisiest denoising step)."""
    g = torch.Generator().manual_seed(0)
    idx = subsample_timesteps(5, 20, 0.4, g, earliest=True)
    assert idx.shape == (5, 8)
    for row in idx:
        assert sorted(row.tolist()) == list(range(8))
    assert len({tuple(r.tolist()) for r in idx}) > 1  # each in its own order
    assert subsample_timesteps(2, 20, 0.01, g, earliest=True).tolist() == [[0], [0]]


def test_stratified_order_by_hand():
    """Two groups of 4, 2 optimizer steps: step 0 holds the members ranked 0-1 of each group, step 1 the
    members ranked 2-3, each step in noise order."""
    # rows 0-3 are group A, rows 4-7 group B; ranks are a permutation within each group
    ranks = torch.tensor([2, 0, 3, 1, 1, 3, 0, 2])
    noise = torch.tensor([0.9, 0.5, 0.1, 0.7, 0.3, 0.2, 0.8, 0.4])
    order = stratified_order(ranks, group_size=4, steps=2, noise=noise)
    # step 0: ranks 0,1 -> rows 1 (A, noise .5), 3 (A, .7), 4 (B, .3), 6 (B, .8); sorted by noise: 4, 1, 3, 6
    # step 1: ranks 2,3 -> rows 0 (.9), 2 (.1), 5 (.2), 7 (.4); sorted by noise: 2, 5, 7, 0
    assert order.tolist() == [4, 1, 3, 6, 2, 5, 7, 0]
    # one step: the whole epoch in noise order
    assert stratified_order(ranks, 4, 1, noise).tolist() == torch.argsort(noise).tolist()


def test_stratified_steps_do_not_depend_on_how_groups_are_split():
    """The set of trajectories each optimizer step holds is the same whether one process holds all groups
    or two processes hold half each (steps dividing G): the N-process = 1-process property."""
    gen = torch.Generator().manual_seed(0)
    groups, size, steps = 6, 4, 2
    ranks = torch.cat([torch.randperm(size, generator=gen) for _ in range(groups)])
    noise = torch.rand(groups * size, generator=gen)
    ids = torch.arange(groups * size)

    def step_sets(rows: torch.Tensor) -> list[set[int]]:
        order = rows[stratified_order(ranks[rows], size, steps, noise[rows])]
        return [set(chunk.tolist()) for chunk in order.chunk(steps)]

    whole = step_sets(ids)
    halves = [step_sets(ids[:12]), step_sets(ids[12:])]
    assert [halves[0][s] | halves[1][s] for s in range(steps)] == whole


def test_kl_weights_put_the_safe_weight_on_safe_prompts_rows():
    from lora_grpo.grpo import kl_weights

    safety = ["unsafe", "safe"]
    set_index = torch.tensor([0, 0, 1, 1, 1, 0])
    weights = kl_weights(safety, set_index, 0.1, 0.5)
    assert torch.allclose(weights, torch.tensor([0.1, 0.1, 0.5, 0.5, 0.5, 0.1]))
    assert torch.allclose(kl_weights(safety, set_index, 0.1, None), torch.full((6,), 0.1))  # unset: kl_coef
    assert torch.equal(kl_weights(safety, set_index, 0.0, 0.0), torch.zeros(6))
