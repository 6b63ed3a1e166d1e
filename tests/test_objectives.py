"""Update objectives, checked by hand: every term of the loss, from numbers written out here."""

from __future__ import annotations

import math

import pytest
import torch

from lora_grpo.config import TrainConfig
from lora_grpo.objectives import GrpoClip, StepBatch, build_objective


def _batch(log_prob, old, adv, mean, ref_mean, std, weights, calls):
    def policy():
        calls.append("policy")
        return torch.tensor(log_prob), torch.tensor(mean), torch.tensor(std)

    def reference_mean():
        calls.append("reference")
        return torch.tensor(ref_mean)

    return StepBatch(policy, reference_mean, torch.tensor(old), torch.tensor(adv), torch.tensor(weights))


def test_grpo_clip_is_the_clipped_surrogate_plus_the_weighted_kl():
    """Two trajectories, latents of two elements. By hand:
    ratios r = exp(0.1) = 1.10517, exp(-0.2) = 0.81873; eps 0.05 clips them to 1.05 and 0.95.
    row 1 (A = 1):  max(-1.10517, -1.05) = -1.05
    row 2 (A = -1): max(0.81873, 0.95) = 0.95          -> surrogate = mean = -0.05
    KL per element with equal std s: (mu - mu_ref)^2 / (2 s^2); row 1: s = 0.5, diffs 0.1 and 0.3 ->
    (0.01 + 0.09) / 2 / (2 * 0.25) = 0.1; row 2: s = 1, diffs 0 and 0.2 -> (0 + 0.04) / 2 / 2 = 0.01.
    Weights 0.5 and 2: mean(0.5 * 0.1, 2 * 0.01) = 0.035. Loss = -0.05 + 0.035 = -0.015."""
    calls = []
    batch = _batch(
        [0.1, -0.2], [0.0, 0.0], [1.0, -1.0],
        mean=[[1.0, 2.0], [0.0, 0.5]], ref_mean=[[0.9, 1.7], [0.0, 0.3]], std=[[0.5, 0.5], [1.0, 1.0]],
        weights=[0.5, 2.0], calls=calls,
    )  # fmt: skip
    loss, metrics = GrpoClip(clip_range=0.05, with_kl=True).loss(batch)
    assert loss.item() == pytest.approx(-0.015, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx((0.1 + 0.01) / 2, abs=1e-6)
    assert metrics["ratios"].tolist() == pytest.approx([math.exp(0.1), math.exp(-0.2)])
    assert metrics["clip_fraction"].item() == 1.0 and calls == ["policy", "reference"]


def test_grpo_clip_without_kl_runs_no_reference_pass_and_starts_at_ratio_one():
    calls = []
    batch = _batch(
        [0.3, 0.3], [0.3, 0.3], [2.0, -2.0], [[0.0]] * 2, [[9.0]] * 2, [[1.0]] * 2, [1.0, 1.0], calls
    )
    loss, metrics = GrpoClip(clip_range=1e-4, with_kl=False).loss(batch)
    assert loss.item() == 0.0  # ratio exactly 1: -A averages to zero over the group
    assert metrics["ratios"].tolist() == [1.0, 1.0] and "kl" not in metrics and calls == ["policy"]


def test_the_recipe_names_the_objective():
    objective = build_objective(TrainConfig(clip_range=0.02, kl_coef=0.0, safe_kl_coef=0.3))
    assert objective == GrpoClip(clip_range=0.02, with_kl=True)


def test_awm_is_the_advantage_weighted_denoising_error_plus_the_weighted_drift():
    """Two trajectories, predictions of two elements. By hand:
    errors (mean over elements of (f - target)^2): row 1 ((0.5)^2 + (0.1)^2) / 2 = 0.13, row 2 (1 + 0) / 2 = 0.5;
    advantages 1 and -0.5: mean(0.13, -0.25) = -0.06.
    drift to the reference: row 1 ((0.2)^2 + 0) / 2 = 0.02, row 2 (0 + (0.4)^2) / 2 = 0.08; weights 1 and 0.5:
    mean(0.02, 0.04) = 0.03. Loss = -0.03."""
    from lora_grpo.objectives import AdvantageWeightedMatching

    calls = []
    prediction = torch.tensor([[0.5, 0.1], [1.0, 0.0]])

    def denoise():
        calls.append("policy")
        return prediction, torch.zeros(2, 2)

    def denoise_reference():
        calls.append("reference")
        return torch.tensor([[0.3, 0.1], [1.0, 0.4]])

    unused = lambda: pytest.fail("awm needs no log-probs")  # noqa: E731
    batch = StepBatch(
        unused,
        unused,
        torch.zeros(2),
        torch.tensor([1.0, -0.5]),
        torch.tensor([1.0, 0.5]),
        denoise,
        denoise_reference,
    )
    loss, metrics = AdvantageWeightedMatching(with_kl=True).loss(batch)
    assert loss.item() == pytest.approx(-0.03, abs=1e-6)
    assert metrics["kl"].item() == pytest.approx(0.05, abs=1e-6) and "ratios" not in metrics
    assert metrics["matching_error"].item() == pytest.approx((0.13 + 0.5) / 2, abs=1e-6)
    assert calls == ["policy", "reference"]
    assert build_objective(TrainConfig(objective="awm", kl_coef=0.0)) == AdvantageWeightedMatching(
        with_kl=False
    )


def test_nft_is_the_bounded_mix_of_the_policy_and_the_sampling_policy():
    """Two trajectories, predictions of two elements, target 0, beta 0.5, A_max 2.5. By hand:
    advantages 2.5 and -1.25 -> r = 1 and (1 - 0.5) / 2 = 0.25.
    row 1: f = (0.5, 0.1), f_old = (0.3, 0.1): f+ = (0.4, 0.1), mse 0.085; r = 1 -> 0.085.
    row 2: f = (1, 0), f_old = (0.6, 0.2): f+ = (0.8, 0.1), mse 0.325; f- = 1.5 f_old - 0.5 f = (0.4, 0.3),
    mse 0.125; 0.25 * 0.325 + 0.75 * 0.125 = 0.175. Loss = mean = 0.13 (no KL term)."""
    from lora_grpo.objectives import NegativeAwareFineTuning

    calls = []

    def denoise():
        calls.append("policy")
        return torch.tensor([[0.5, 0.1], [1.0, 0.0]]), torch.zeros(2, 2)

    def denoise_old():
        calls.append("old")
        return torch.tensor([[0.3, 0.1], [0.6, 0.2]])

    unused = lambda: pytest.fail("nft needs no log-probs and, without a KL weight, no reference")  # noqa: E731
    batch = StepBatch(
        unused,
        unused,
        torch.zeros(2),
        torch.tensor([2.5, -1.25]),
        torch.zeros(2),
        denoise,
        unused,
        denoise_old,
    )
    loss, metrics = NegativeAwareFineTuning(beta=0.5, adv_max=2.5, with_kl=False).loss(batch)
    assert loss.item() == pytest.approx(0.13, abs=1e-6)
    assert calls == ["policy", "old"] and "kl" not in metrics and "ratios" not in metrics
    assert build_objective(
        TrainConfig(objective="nft", nft_beta=0.5, kl_coef=0.1)
    ) == NegativeAwareFineTuning(beta=0.5, adv_max=2.5, with_kl=True)


@pytest.mark.parametrize("r", [1.0, 0.75, 0.5, 0.1, 0.0])
def test_nft_loss_is_bounded_where_awm_is_not(r):
    """The per-row loss is a quadratic in f with its minimum at f_old + (2r - 1)(target - f_old) / beta
    (gradient zero there, by autograd), and at f = f_old its gradient is awm's direction (f_old - target)
    times 2 beta (2r - 1): a rejected image (r < 1/2) pushes a bounded way, never without end."""
    from lora_grpo.objectives.nft import nft_loss

    torch.manual_seed(0)
    old, target, beta = torch.randn(1, 6), torch.randn(1, 6), 0.7
    optimum = (old + (2 * r - 1) * (target - old) / beta).requires_grad_(True)
    nft_loss(optimum, old, target, torch.tensor([r]), beta).sum().backward()
    assert optimum.grad.abs().max().item() < 1e-6
    at_old = old.clone().requires_grad_(True)
    nft_loss(at_old, old, target, torch.tensor([r]), beta).sum().backward()
    expected = 2 * beta * (2 * r - 1) * (old - target) / old.shape[1]  # d/df of the element mean
    assert torch.allclose(at_old.grad, expected, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noising_and_targets_match_the_diffusers_scheduler(prediction_type):
    """x_t and the target against DDIMScheduler's own add_noise and get_velocity at three timesteps."""
    from diffusers import DDIMScheduler

    from lora_grpo.sampling import denoising_target, noised_latents

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([999, 500, 10])
    alpha = scheduler.alphas_cumprod[t]
    assert torch.allclose(noised_latents(x0, noise, alpha), scheduler.add_noise(x0, noise, t), atol=1e-5)
    expected = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}
    assert torch.allclose(
        denoising_target(x0, noise, alpha, prediction_type), expected[prediction_type], atol=1e-5
    )


@pytest.mark.parametrize("objective, reference", [("awm", 48), ("nft", 96)])
def test_a_denoising_run_trains_the_lora_without_log_probs(objective, reference, tmp_path):
    """tiny-test with train.objective=awm or nft: two epochs move the LoRA, every loss is finite, the KL term
    runs (tiny-test's kl_coef), no first-ratio check is logged (there is no ratio) and the counted passes are
    the recipe's arithmetic (nft adds one forward without gradient a trained step: the sampling policy's
    prediction, counted with the reference passes)."""
    import json

    from safetensors.torch import load_file

    from lora_grpo.config import load_config
    from lora_grpo.recipe_files import find_recipe
    from lora_grpo.train import Trainer

    config = load_config(
        find_recipe("tiny-test"), [f"train.objective={objective}", "train.epochs=2", "evaluate.every=0"]
    )
    trainer = Trainer(config, tmp_path, log=lambda line: None)
    before = {k: v.detach().clone() for k, v in trainer.learner.unet.named_parameters() if v.requires_grad}
    trainer.run()
    after = load_file(str(tmp_path / "adapter" / "pytorch_lora_weights.safetensors"))
    assert len(after) == len(before) and all(torch.isfinite(v).all() for v in after.values())
    moved = [
        k
        for k, v in trainer.learner.unet.named_parameters()
        if v.requires_grad and not torch.equal(v, before[k])
    ]
    assert moved
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) and r["kl"] > 0 and "first_ratio_mean" not in r for r in rows), [
        (r["loss"], r.get("kl"), r.get("first_ratio_mean")) for r in rows
    ]
    # the denoising pass is the conditional prediction alone: 16 samples x 3 trained steps x 1 image, where
    # grpo-clip's guided step takes 2 (test_unet_passes_are_counted_as_they_happen: 96); sampling keeps CFG
    from lora_grpo.tracking import epoch_work

    work = epoch_work(config)
    assert (work["sampling_passes"], work["training_passes"], work["reference_passes"]) == (
        256,
        48,
        reference,
    )
    assert all(
        (r["unet_passes_sampling"], r["unet_passes_training"], r["unet_passes_reference"])
        == (256, 48, reference)
        for r in rows
    )
