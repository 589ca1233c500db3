"""The SD v1 noise schedule against diffusers and an independent float64 computation."""
import json

import numpy as np
import pytest
import torch

from meddap.sampling.schedule import NoiseSchedule, sd_checkpoint_buffers

# diffusers builds the same betas in float32 (linspace of square roots, squared),
# so its tables agree with ours to float32 round-off only.
DIFFUSERS_F32_RTOL = 2e-6


def _diffusers_ddpm():
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         num_train_timesteps=1000, clip_sample=False)


def _numpy_reference() -> dict[str, np.ndarray]:
    """Written independently of meddap: numpy float64, alternative algebraic forms."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    ab = np.exp(np.cumsum(np.log(alphas)))          # ∏ α_s via a sum of logs
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    # β̃_t = 1 / (1/(1-ᾱ_{t-1}) + α_t/β_t), the form noted in CompVis' register_schedule;
    # at t = 0 the first term is 1/0 = inf and β̃_0 = 0.
    with np.errstate(divide="ignore"):
        post_var = 1.0 / (1.0 / (1.0 - ab_prev) + alphas / betas)
    return {
        "betas": betas,
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ab),
        "log_one_minus_alphas_cumprod": np.log1p(-ab),
        "sqrt_recip_alphas_cumprod": 1.0 / np.sqrt(ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1.0 - ab) / ab),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": np.sqrt(ab_prev) * betas / (1.0 - ab),
        "posterior_mean_coef2": np.sqrt(alphas) * (1.0 - ab_prev) / (1.0 - ab),
    }


def test_schedule_matches_diffusers_scaled_linear():
    ours = NoiseSchedule.sd_v1()
    ref = _diffusers_ddpm()
    assert ours.betas.dtype == torch.float64 and ours.betas.shape == (1000,)
    torch.testing.assert_close(ours.betas.float(), ref.betas, rtol=DIFFUSERS_F32_RTOL, atol=0)
    torch.testing.assert_close(ours.alphas_cumprod.float(), ref.alphas_cumprod,
                               rtol=DIFFUSERS_F32_RTOL, atol=0)
    assert ours.betas[0].item() == pytest.approx(0.00085, rel=1e-12)
    assert ours.betas[-1].item() == pytest.approx(0.012, rel=1e-12)


def test_checkpoint_buffers_equal_independent_computation():
    ours = sd_checkpoint_buffers()
    ref = _numpy_reference()
    assert list(ours) == list(ref)
    for name, value in ours.items():
        assert value.dtype == torch.float32 and value.shape == (1000,), name
        expected = torch.from_numpy(ref[name]).float()
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=0, msg=name)


def test_posterior_variance_equals_diffusers_fixed_small():
    """diffusers computes β̃_t in float32 from 1 − ᾱ_t/ᾱ_{t−1}, losing ~4 digits to
    cancellation; our float64-built buffer agrees to that precision (t ≥ 1)."""
    ref = _diffusers_ddpm()
    ref.set_timesteps(1000)
    expected = torch.stack([ref._get_variance(t) for t in range(1, 1000)])
    torch.testing.assert_close(sd_checkpoint_buffers()["posterior_variance"][1:], expected,
                               rtol=2e-4, atol=0)


def test_buffer_names_are_the_checkpoint_schedule_keys(reference_dir):
    keys = json.loads((reference_dir / "sd_v1_checkpoint_keys.json").read_text())["optional"]
    # Schedule buffers: the [1000]-shaped optional keys, except LatentDiffusion's
    # `logvar`, which is a (learnable) loss weight initialised to 0, not a schedule.
    schedule_keys = {k for k, shape in keys.items() if shape == [1000] and k != "logvar"}
    assert set(sd_checkpoint_buffers()) == schedule_keys


def test_q_sample_closed_form_and_dtype():
    sched = NoiseSchedule.sd_v1()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    noise = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = sched.q_sample(x0, t, noise)
    ab = sched.alphas_cumprod[t].view(3, 1, 1, 1)
    expected = (ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double()).float()
    torch.testing.assert_close(xt, expected, rtol=1e-6, atol=1e-6)
    # diffusers' add_noise is the same forward process (float32 tables).
    torch.testing.assert_close(xt, _diffusers_ddpm().add_noise(x0, noise, t), rtol=1e-5, atol=1e-6)
    half = sched.q_sample(x0.half(), t, noise)
    assert half.dtype == torch.float16
