"""The sampler kernels' steps with log-prob against diffusers' own schedulers and torch.distributions."""

import math

import pytest
import torch

from lora_grpo.conditioning import TextConditioning, sdxl_time_ids
from lora_grpo.kernels import step_mean_std
from lora_grpo.sampling import (
    block_noise,
    coarse_tail,
    gaussian_log_prob,
    guided_model_output,
    sample_trajectories,
    sde_window,
    seeded_generator,
    step_log_prob,
    step_schedule,
)
from lora_grpo.tiny import sd_ddim_scheduler, tiny_unet, tiny_unet_xl


def _scheduler(prediction_type):
    return sd_ddim_scheduler(prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_step_matches_diffusers_scheduler(prediction_type, eta):
    """mean + std * z equals DDIMScheduler.step(..., variance_noise=z) at every step of the schedule."""
    sched = _scheduler(prediction_type)
    schedule = step_schedule(sched, 10)
    torch.manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        x = torch.randn(2, 4, 8, 8)
        out = torch.randn(2, 4, 8, 8)
        z = torch.randn(2, 4, 8, 8)
        ref = sched.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        mean, std = step_mean_std(
            "ddim", out, x, schedule.alpha_prod[i], schedule.alpha_prod_prev[i], eta, schedule.prediction_type
        )
        assert torch.allclose(mean + std * z, ref, atol=1e-5), f"step {i}"
        assert schedule.timesteps[i] == t


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_euler_ancestral_step_matches_diffusers_scheduler(prediction_type):
    """mean + std * z, in DDIM coordinates, equals EulerAncestralDiscreteScheduler.step with the same noise z
    (drawn by the scheduler from a seeded generator), mapped back: x_euler = x / sqrt(a) in, x_prev =
    sqrt(a_prev) x_euler_prev out. The UNet sees the same input either way (diffusers scales its x_euler by
    1 / sqrt(sigma^2 + 1) = sqrt(a)); the last step goes to sigma 0 with std 0."""
    from diffusers import EulerAncestralDiscreteScheduler

    ddim_sched = _scheduler(prediction_type)
    # on the schedule's own timesteps (the base scheduler's DDIM "leading" spacing; diffusers' Euler a
    # defaults to "linspace" when a config does not name one)
    sched = EulerAncestralDiscreteScheduler.from_config(ddim_sched.config, timestep_spacing="leading")
    schedule = step_schedule(ddim_sched, 10, "euler-ancestral")
    sched.set_timesteps(10)
    assert torch.equal(schedule.timesteps, sched.timesteps.long())
    torch.manual_seed(0)
    for i, t in enumerate(sched.timesteps):
        a_t, a_prev = schedule.alpha_prod[i], schedule.alpha_prod_prev[i]
        x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        x_euler = x / a_t.sqrt()
        assert torch.allclose(sched.scale_model_input(x_euler, t), x, atol=1e-5)
        ref = sched.step(out, t, x_euler, generator=torch.Generator().manual_seed(i)).prev_sample
        z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i))
        mean, std = step_mean_std("euler-ancestral", out, x, a_t, a_prev, 1.0, prediction_type)
        assert torch.allclose(mean + std * z, a_prev.sqrt() * ref, atol=1e-5), f"step {i}"
    assert float(schedule.alpha_prod_prev[-1]) == 1.0 and float(std.abs().max()) == 0.0
    # eta 0 is the plain Euler step: x_euler + eps (sigma_next - sigma), no noise
    eps = out if prediction_type == "epsilon" else a_t.sqrt() * out + (1 - a_t).sqrt() * x
    sigma, sigma_next = ((1 - a_t) / a_t).sqrt(), ((1 - a_prev) / a_prev).sqrt()
    mean, std = step_mean_std("euler-ancestral", out, x, a_t, a_prev, 0.0, prediction_type)
    assert torch.allclose(mean, a_prev.sqrt() * (x_euler + eps * (sigma_next - sigma)), atol=1e-5)
    assert float(std.abs().max()) == 0.0


def test_log_prob_matches_torch_normal():
    torch.manual_seed(0)
    mean = torch.randn(3, 4, 8, 8)
    std = torch.tensor([0.3, 0.7, 1.1]).view(3, 1, 1, 1)
    x = mean + std * torch.randn(3, 4, 8, 8)
    ours = gaussian_log_prob(x, mean, std)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).mean(dim=(1, 2, 3))
    assert torch.allclose(ours, ref, atol=1e-6)
    # golden value: x == mean gives -log(std) - 0.5 log(2 pi)
    at_mean = gaussian_log_prob(mean, mean, std)
    assert torch.allclose(at_mean, -torch.log(std.flatten()) - 0.5 * math.log(2 * math.pi))


def test_log_prob_is_fp32_for_half_inputs():
    x = torch.randn(2, 4, 4, 4).bfloat16()
    out = gaussian_log_prob(x, x * 0.5, torch.tensor(0.5))
    assert out.dtype == torch.float32


def _text(n: int) -> TextConditioning:
    return TextConditioning(torch.randn(n, 5, 16))


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    return tiny_unet(sample_size=8, cross_attention_dim=16).eval()


def test_batched_cfg_equals_two_forwards():
    unet = _tiny_unet()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor(500)
    cond, uncond = _text(2), _text(2)
    with torch.no_grad():
        guided = guided_model_output(unet, x, t, cond, uncond, 3.0)
        c = unet(x, t, **cond.unet_kwargs()).sample
        u = unet(x, t, **uncond.unet_kwargs()).sample
    assert torch.allclose(guided, u + 3.0 * (c - u), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(guided_model_output(unet, x, t, cond, uncond, 1.0), c, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_trajectories_reevaluate_to_ratio_exactly_one(prediction_type):
    unet = _tiny_unet()
    schedule = step_schedule(_scheduler(prediction_type), 6)
    cond, uncond = _text(3), _text(3)
    x_T = torch.randn(3, 4, 8, 8)
    traj = sample_trajectories(unet, schedule, cond, uncond, x_T, 2.0, 1.0, torch.Generator().manual_seed(1))
    assert traj.latents.shape == (3, 7, 4, 8, 8) and traj.log_probs.shape == (3, 6)
    assert torch.equal(traj.latents[:, 0], x_T)
    assert traj.log_probs.dtype == torch.float32
    # same generator seed: same trajectories
    again = sample_trajectories(unet, schedule, cond, uncond, x_T, 2.0, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(traj.latents, again.latents)
    # each stored step, re-evaluated per sample (shuffled step indices) with the unchanged model: ratio 1
    for j in range(6):
        idx = torch.tensor([j, (j + 2) % 6, (j + 4) % 6])
        ratio = _stored_step_ratio(unet, schedule, traj, idx, cond, uncond, eta=1.0)
        assert torch.equal(ratio, torch.ones(3)), ratio


def _stored_step_ratio(unet, schedule, traj, idx, cond, uncond, eta):
    """exp(new log-prob - stored log-prob) of stored step idx[r] of each row r, the model unchanged (CFG 2)."""
    rows = torch.arange(len(idx))
    with torch.no_grad():
        lp, _, _ = step_log_prob(
            unet, schedule, idx, traj.latents[rows, idx], traj.latents[rows, idx + 1], cond, uncond, 2.0, eta
        )
    return torch.exp(lp - traj.log_probs[rows, idx])


def test_stored_log_probs_match_independent_normal():
    """The recorded log-prob is log N(x_prev; mean, std) recomputed with torch.distributions."""
    unet = _tiny_unet()
    sched = _scheduler("epsilon")
    schedule = step_schedule(sched, 4)
    cond = _text(2)
    traj = sample_trajectories(
        unet, schedule, cond, None, torch.randn(2, 4, 8, 8), 1.0, 1.0, torch.Generator().manual_seed(0)
    )
    for i in range(4):
        x = traj.latents[:, i]
        with torch.no_grad():
            out = unet(x, schedule.timesteps[i], **cond.unet_kwargs()).sample
        prev_t = int(schedule.timesteps[i]) - 1000 // 4
        a_t = sched.alphas_cumprod[int(schedule.timesteps[i])]
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
        x0 = (x - (1 - a_t).sqrt() * out) / a_t.sqrt()
        mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * out
        ref = (
            torch.distributions.Normal(mean, var.sqrt()).log_prob(traj.latents[:, i + 1]).mean(dim=(1, 2, 3))
        )
        assert torch.allclose(traj.log_probs[:, i], ref, atol=1e-4)


def test_sde_window_by_hand():
    assert sde_window(20, 0, "first", 5, 50) == (0, 20)  # 0: every step
    assert sde_window(20, 20, "sliding", 5, 50) == (0, 20)
    assert sde_window(20, 4, "first", 37, 50) == (0, 4)
    # sliding: start = round(epoch * (20 - 4) / 49): 0 at the first epoch, 16 at the last
    assert [sde_window(20, 4, "sliding", e, 50) for e in (0, 1, 24, 49)] == [
        (0, 4),
        (0, 4),
        (8, 12),
        (16, 20),
    ]
    assert sde_window(20, 4, "sliding", 0, 1) == (0, 4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_window_steps_are_ddim_eta_zero_outside_and_stochastic_inside(prediction_type):
    """Outside the window a step is DDIMScheduler.step with eta 0; inside, with eta and the same noise the
    fully stochastic sampler draws there. Deterministic steps store no log-prob (NaN); the window's steps
    re-evaluate to ratio exactly 1."""
    unet = _tiny_unet()
    sched = _scheduler(prediction_type)
    schedule = step_schedule(sched, 6)
    cond, uncond = _text(2), _text(2)
    x_T = torch.randn(2, 4, 8, 8)
    eta, window = 0.8, (2, 4)
    traj = sample_trajectories(
        unet, schedule, cond, uncond, x_T, 2.0, eta, seeded_generator(3), window=window
    )
    gen = seeded_generator(3)
    x = x_T
    for i, t in enumerate(sched.timesteps):
        with torch.no_grad():
            out = guided_model_output(unet, x, t, cond, uncond, 2.0)
        z = block_noise(x.shape, gen)  # drawn at every step, used only inside the window
        inside = window[0] <= i < window[1]
        x = sched.step(out, t, x, eta=eta if inside else 0.0, variance_noise=z).prev_sample
        torch.testing.assert_close(traj.latents[:, i + 1], x, atol=1e-5, rtol=1e-5)
        x = traj.latents[:, i + 1]  # follow the stored trajectory (no drift from accumulated rounding)
    assert torch.isnan(traj.log_probs[:, [0, 1, 4, 5]]).all()
    assert torch.isfinite(traj.log_probs[:, 2:4]).all()
    for j in (2, 3):
        ratio = _stored_step_ratio(unet, schedule, traj, torch.full((2,), j), cond, uncond, eta)
        assert torch.equal(ratio, torch.ones(2))
    # the window's steps use the same noise as the fully stochastic sampler: its first step is identical
    full = sample_trajectories(
        unet, schedule, cond, uncond, x_T, 2.0, eta, seeded_generator(3), window=(0, 1)
    )
    everywhere = sample_trajectories(unet, schedule, cond, uncond, x_T, 2.0, eta, seeded_generator(3))
    assert torch.equal(full.latents[:, 1], everywhere.latents[:, 1])


def test_eta_zero_is_ddim_eta_zero_at_every_step_whatever_the_step_noise():
    """eta 0 (an evaluation cell's deterministic sampler): every step is DDIMScheduler.step with eta 0, no step
    has a log-prob, and the step noise (another generator) changes nothing."""
    unet = _tiny_unet()
    sched = _scheduler("epsilon")
    schedule = step_schedule(sched, 5)
    cond, uncond = _text(2), _text(2)
    x_T = torch.randn(2, 4, 8, 8)
    traj = sample_trajectories(unet, schedule, cond, uncond, x_T, 2.0, 0.0, seeded_generator(3))
    other = sample_trajectories(unet, schedule, cond, uncond, x_T, 2.0, 0.0, seeded_generator(4))
    assert torch.equal(traj.latents, other.latents)
    assert torch.isnan(traj.log_probs).all()
    x = x_T
    for i, t in enumerate(sched.timesteps):
        with torch.no_grad():
            out = guided_model_output(unet, x, t, cond, uncond, 2.0)
        x = sched.step(out, t, x, eta=0.0).prev_sample
        torch.testing.assert_close(traj.latents[:, i + 1], x, atol=1e-5, rtol=1e-5)
        x = traj.latents[:, i + 1]


def test_each_row_at_its_own_eta_is_that_rows_trajectory_at_that_eta():
    """eta [N] (a per-group draw): each row's latents and log-probs are those of the same rows sampled with
    its eta for the whole batch (same generator, so the same step noise); a row at eta 0 is the deterministic
    sampler with NaN log-probs, and the window still bounds the stochastic steps."""
    unet = _tiny_unet()
    schedule = step_schedule(_scheduler("epsilon"), 5)
    cond, uncond = _text(3), _text(3)
    x_T = torch.randn(3, 4, 8, 8)
    etas = [1.0, 0.0, 0.4]
    for window in (None, (1, 3)):
        mixed = sample_trajectories(
            unet, schedule, cond, uncond, x_T, 2.0, torch.tensor(etas), seeded_generator(5), window=window
        )
        for r, eta in enumerate(etas):
            alone = sample_trajectories(
                unet, schedule, cond, uncond, x_T, 2.0, eta, seeded_generator(5), window=window
            )
            torch.testing.assert_close(mixed.latents[r], alone.latents[r], atol=1e-6, rtol=0)
            torch.testing.assert_close(
                mixed.log_probs[r], alone.log_probs[r], atol=1e-5, rtol=0, equal_nan=True
            )
    assert torch.isnan(mixed.log_probs[1]).all() and torch.isnan(mixed.log_probs[:, [0, 3, 4]]).all()
    assert torch.isfinite(mixed.log_probs[[0, 2]][:, 1:3]).all()
    assert (mixed.latents[0] - mixed.latents[2]).abs().max() > 1e-3  # the etas did differ


def test_coarse_tail_by_hand():
    """The first `stop` steps as they were; the tail keeps every (20 - 6) / 4-th remaining timestep, each
    step going to the next kept one and the last to the scheduler's final alpha."""
    sched = _scheduler("epsilon")
    schedule = step_schedule(sched, 20)
    assert schedule.timesteps[:8].tolist() == [951, 901, 851, 801, 751, 701, 651, 601]
    tail = coarse_tail(schedule, 6, 4)
    # kept indices 6 + (j * 14) // 4 = 6, 9, 13, 16 -> timesteps 651, 501, 301, 151
    assert tail.timesteps.tolist() == [951, 901, 851, 801, 751, 701, 651, 501, 301, 151]
    alphas = sched.alphas_cumprod
    expected_prev = [alphas[t] for t in (901, 851, 801, 751, 701, 651, 501, 301, 151)]
    expected_prev.append(sched.final_alpha_cumprod)
    torch.testing.assert_close(tail.alpha_prod_prev, torch.stack(expected_prev).float())
    torch.testing.assert_close(tail.alpha_prod, alphas[tail.timesteps].float())
    assert torch.equal(tail.alpha_prod_prev[:6], schedule.alpha_prod_prev[:6])
    assert coarse_tail(schedule, 6, 0) is schedule and coarse_tail(schedule, 6, 14) is schedule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_coarse_tail_steps_are_ddim_steps_of_the_larger_stride(prediction_type):
    """A window of the first 10 of 20 steps (eta 0.8), then 5 tail steps: the window is DDIMScheduler.step
    at 20 steps with the same noise, each tail step is its eta-0 step at a stride of 100 (as at 10 steps),
    the last one to the final alpha; only the window has log-probs and they re-evaluate to ratio 1."""
    unet = _tiny_unet()
    sched = _scheduler(prediction_type)
    schedule = coarse_tail(step_schedule(sched, 20), 10, 5)
    cond, uncond = _text(2), _text(2)
    x_T = torch.randn(2, 4, 8, 8)
    eta = 0.8
    traj = sample_trajectories(
        unet, schedule, cond, uncond, x_T, 2.0, eta, seeded_generator(5), window=(0, 10)
    )
    assert traj.latents.shape[1] == 16 and traj.log_probs.shape[1] == 15
    gen, x = seeded_generator(5), x_T
    timesteps = [951 - 50 * i for i in range(10)] + [451, 351, 251, 151, 51]
    for i, t in enumerate(timesteps):
        sched.num_inference_steps = 20 if i < 10 else 10  # DDIMScheduler.step goes to t - 1000 // this
        with torch.no_grad():
            out = guided_model_output(unet, x, torch.tensor(t), cond, uncond, 2.0)
        z = block_noise(x.shape, gen)
        x = sched.step(out, t, x, eta=eta if i < 10 else 0.0, variance_noise=z).prev_sample
        torch.testing.assert_close(traj.latents[:, i + 1], x, atol=1e-5, rtol=1e-5)
        x = traj.latents[:, i + 1]
    assert torch.isfinite(traj.log_probs[:, :10]).all() and torch.isnan(traj.log_probs[:, 10:]).all()
    for j in (0, 9):
        ratio = _stored_step_ratio(unet, schedule, traj, torch.full((2,), j), cond, uncond, eta)
        assert torch.equal(ratio, torch.ones(2))


def test_sdxl_step_with_added_conditioning_is_ddim_step_of_the_stock_unet():
    """An SDXL-family UNet: each stochastic step equals DDIMScheduler.step(eta, variance_noise=z) fed the UNet's
    own CFG output with added_cond_kwargs (pooled text embeds, size ids) passed as diffusers passes them; the
    stored steps re-evaluate to ratio exactly 1."""
    torch.manual_seed(0)
    unet = tiny_unet_xl(sample_size=8).eval()
    sched = _scheduler("epsilon")
    schedule = step_schedule(sched, 4)

    def text(n):
        return TextConditioning(torch.randn(n, 5, 80), torch.randn(n, 48), sdxl_time_ids(64, 64, n))

    cond, uncond = text(2), text(2)
    x_T = torch.randn(2, 4, 8, 8)
    eta = 1.0
    traj = sample_trajectories(unet, schedule, cond, uncond, x_T, 2.0, eta, seeded_generator(5))
    gen, x = seeded_generator(5), x_T
    for i, t in enumerate(sched.timesteps):
        with torch.no_grad():
            both = unet(
                torch.cat([x, x]),
                t,
                encoder_hidden_states=torch.cat([uncond.hidden, cond.hidden]),
                added_cond_kwargs={
                    "text_embeds": torch.cat([uncond.pooled, cond.pooled]),
                    "time_ids": torch.cat([uncond.time_ids, cond.time_ids]),
                },
            ).sample
        u, c = both.chunk(2)
        z = block_noise(x.shape, gen)
        x = sched.step(u + 2.0 * (c - u), t, x, eta=eta, variance_noise=z).prev_sample
        torch.testing.assert_close(traj.latents[:, i + 1], x, atol=1e-5, rtol=1e-5)
        x = traj.latents[:, i + 1]
    for j in range(4):
        ratio = _stored_step_ratio(unet, schedule, traj, torch.full((2,), j), cond, uncond, eta)
        assert torch.equal(ratio, torch.ones(2))
    # the added conditioning is used: other size ids give another trajectory
    other = TextConditioning(cond.hidden, cond.pooled, sdxl_time_ids(32, 48, 2))
    moved = sample_trajectories(unet, schedule, other, uncond, x_T, 2.0, eta, seeded_generator(5))
    assert not torch.allclose(moved.latents[:, -1], traj.latents[:, -1])


def test_text_conditioning_rows_repeat_expand_and_concat():
    from lora_grpo.conditioning import concat

    a = TextConditioning(
        torch.arange(6.0).view(3, 2, 1), torch.arange(3.0).view(3, 1), sdxl_time_ids(8, 16, 3)
    )
    assert len(a) == 3
    assert a.rows(torch.tensor([2, 0])).pooled.flatten().tolist() == [2.0, 0.0]
    assert a.repeat_interleave(2).pooled.flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
    one = a.rows(slice(0, 1)).expand(4)
    assert one.hidden.shape == (4, 2, 1) and one.time_ids.tolist() == [[8.0, 16.0, 0.0, 0.0, 8.0, 16.0]] * 4
    both = concat([a, one])
    assert len(both) == 7 and torch.equal(both.time_ids[:3], a.time_ids)
    assert set(a.unet_kwargs()) == {"encoder_hidden_states", "added_cond_kwargs"}
    assert set(TextConditioning(a.hidden).unet_kwargs()) == {"encoder_hidden_states"}
    assert concat([TextConditioning(a.hidden), TextConditioning(a.hidden)]).pooled is None


def test_ddim_and_euler_ancestral_take_the_same_gaussian_step_at_every_eta():
    """In DDIM coordinates both kernels step to the DDPM posterior at eta 1: std sqrt((1 - a_prev) / (1 - a_t) *
    (1 - a_t / a_prev)) (hand formula); both stds are linear in eta and both means are sqrt(a_prev) x0 +
    sqrt(1 - a_prev - std^2) eps, so they agree at every eta (eta 0: DDIM's deterministic step is Euler's). A
    rollout cannot tell them apart, so a per-group eta range (`sample.eta: [0, 1]`) is the per-group choice
    among Euler, DDIM eta 0 / 1 and Euler a (the deployment matrix shows the same images for both)."""
    from lora_grpo.kernels import step_mean_std

    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    a_t, a_prev = torch.tensor([0.05, 0.3, 0.7]), torch.tensor([0.1, 0.6, 0.9])
    for prediction in ("epsilon", "v_prediction"):
        for eta in (0.0, 0.4, 1.0):
            m1, s1 = step_mean_std("ddim", out, x, a_t, a_prev, eta, prediction)
            m2, s2 = step_mean_std("euler-ancestral", out, x, a_t, a_prev, eta, prediction)
            assert torch.allclose(m1, m2, atol=1e-5) and torch.allclose(s1, s2, atol=1e-6)
    expected = ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    assert torch.allclose(s1.flatten(1)[:, 0], expected, atol=1e-6)


def test_img2img_paths_by_hand():
    """Each row's own steps: from its start s, the window's `stop` steps of the fine grid, then `tail` steps
    spread over the rest (coarse_tail of the grid from s); a row from 0 takes coarse_tail's steps exactly."""
    from lora_grpo.sampling import img2img_paths

    sched = _scheduler("epsilon")
    fine = step_schedule(sched, 10)
    paths = img2img_paths(fine, torch.tensor([0, 3]), stop=2, tail_steps=2)
    coarse = coarse_tail(fine, 2, 2)
    assert torch.equal(paths.timesteps[0], coarse.timesteps) and torch.equal(
        paths.alpha_prod_prev[0], coarse.alpha_prod_prev
    )
    # row 1: fine steps 3, 4 (window), then 5 + j * 5 // 2 for j = 0, 1: steps 5 and 7, the last to the end
    assert paths.timesteps[1].tolist() == fine.timesteps[[3, 4, 5, 7]].tolist()
    assert torch.equal(paths.alpha_prod_prev[1][:3], fine.alpha_prod[[4, 5, 7]])
    assert paths.alpha_prod_prev[1][3] == fine.alpha_prod_prev[-1]
    assert torch.equal(paths.rows(torch.tensor([1])).timesteps[0], paths.timesteps[1])
    with pytest.raises(ValueError, match="fewer than"):
        img2img_paths(fine, torch.tensor([7]), stop=2, tail_steps=2)


def test_a_row_on_its_own_path_steps_by_hand():
    """Two rows on their own paths in one batch: row 1's first step is the DDIM step from its latent at its own
    timestep to its own next one (computed here by hand), with its generator's first noise."""
    from lora_grpo.sampling import img2img_paths

    unet = _tiny_unet()
    sched = _scheduler("epsilon")
    paths = img2img_paths(step_schedule(sched, 10), torch.tensor([0, 4]), stop=2, tail_steps=2)
    cond = _text(2)
    x_start = torch.randn(2, 4, 8, 8)
    gens = [torch.Generator().manual_seed(10), torch.Generator().manual_seed(11)]
    traj = sample_trajectories(unet, paths, cond, None, x_start, 1.0, 1.0, gens, window=(0, 2))
    assert torch.isfinite(traj.log_probs[:, :2]).all() and torch.isnan(traj.log_probs[:, 2:]).all()
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    x = x_start[1:2]
    t = int(paths.timesteps[1, 0])
    with torch.no_grad():
        eps = unet(x, t, **cond.rows(torch.tensor([1])).unet_kwargs()).sample
    a_t, a_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[int(paths.timesteps[1, 1])]
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - var).sqrt() * eps
    assert torch.allclose(traj.latents[1, 1], (mean + var.sqrt() * noise)[0], atol=1e-5)
    ref = torch.distributions.Normal(mean, var.sqrt()).log_prob(traj.latents[1:2, 1]).mean(dim=(1, 2, 3))
    assert torch.allclose(traj.log_probs[1, 0], ref[0], atol=1e-4)
    # the re-evaluated step under the unchanged model: ratio exactly 1, on each row's own path
    idx = torch.tensor([1, 0])
    rows = torch.arange(2)
    with torch.no_grad():
        lp, _, _ = step_log_prob(
            unet, paths, idx, traj.latents[rows, idx], traj.latents[rows, idx + 1], cond, None, 1.0, 1.0
        )
    assert torch.equal(torch.exp(lp - traj.log_probs[rows, idx]), torch.ones(2))
