"""DDPM, DDIM and PLMS against diffusers' schedulers configured as SD v1.4 (test-only oracle).

Both sides get the same deterministic ε-function, the same x_T and, for the
stochastic samplers, identically seeded generators (both draw the step noise
in float32 on the CPU, one draw per step after the ε evaluation).
"""
import inspect

import pytest
import torch

from meddap.errors import MeddapError
from meddap.sampling import Sampler, denoise
from meddap.sampling.samplers import (draw_noise, leading_timesteps, pndm_transfer,
                                      visited_timesteps)
from meddap.sampling.schedule import NoiseSchedule

# CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json (PNDMScheduler).
SD_V1_4_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                         skip_prk_steps=True, clip_sample=False)
REL_TOL = 1e-5
NOISE_SEED = 5


def _scheduler(name):
    from diffusers import DDIMScheduler, DDPMScheduler, PNDMScheduler
    cls = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "ddpm": DDPMScheduler}[name]
    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in SD_V1_4_SCHEDULER.items() if k in params})


class RecordingEps:
    """ε(x, t) = √(1 − ᾱ_t) · M x + 0.1 sin(t / 37): a fixed channel-mixing map (the
    ideal ε for N(0, I) data when M = I) plus a t-dependent term; records each t."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.mix = torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g)   # (4, 4)
        self.ab = NoiseSchedule.sd_v1().alphas_cumprod
        self.visited = []

    def __call__(self, x, t):
        assert t.dtype == torch.int64 and t.shape == (x.shape[0],)
        self.visited.append(int(t[0]))
        scale = (1 - self.ab[t]).sqrt().float().view(-1, 1, 1, 1)       # (B, 1, 1, 1)
        mixed = torch.einsum("ij,bjhw->bihw", self.mix, x)               # (B, 4, H, W)
        return scale * mixed + 0.1 * torch.sin(t.float() / 37).view(-1, 1, 1, 1)


def _x_T(batch=2):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _run_diffusers(name, n, x, eta=0.0, generator=None):
    sched = _scheduler(name)
    sched.set_timesteps(n)
    eps_fn = RecordingEps()
    for t in sched.timesteps:
        eps = eps_fn(x, torch.full((x.shape[0],), int(t)))
        kwargs = {"eta": eta, "generator": generator} if name == "ddim" else \
            {"generator": generator} if name == "ddpm" else {}
        x = sched.step(eps, t, x, **kwargs).prev_sample
    return x, eps_fn.visited


def _run_ours(name, n, x, eta=0.0, generator=None):
    eps_fn = RecordingEps()
    return denoise(eps_fn, x, scheduler=name, num_steps=n, eta=eta, generator=generator), \
        eps_fn.visited


def _assert_rel_close(ours, ref):
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < REL_TOL, f"relative error {rel:.2e}"


CASES = ([("pndm", n, 0.0) for n in (1, 2, 3, 4, 5, 10, 30, 50)]
         + [("ddim", n, 0.0) for n in (1, 2, 10, 30, 50)]
         + [("ddim", n, eta) for n in (1, 10, 50) for eta in (0.5, 1.0)]
         + [("ddpm", n, 0.0) for n in (1, 2, 10, 50, 100)])


@pytest.mark.parametrize("name,n,eta", CASES)
def test_matches_diffusers_sd_v1_4(name, n, eta):
    stochastic = name == "ddpm" or eta > 0
    gen = (lambda: torch.Generator().manual_seed(NOISE_SEED)) if stochastic else (lambda: None)
    ref, ref_visited = _run_diffusers(name, n, _x_T(), eta, gen())
    ours, our_visited = _run_ours(name, n, _x_T(), eta, gen())
    assert our_visited == ref_visited == visited_timesteps(name, n)
    _assert_rel_close(ours, ref)


@pytest.mark.parametrize("name,eta", [("ddim", 1.0), ("ddpm", 0.0)])
def test_per_row_generators_match_diffusers_and_are_batch_independent(name, eta):
    seeds = [11, 12, 13]
    gens = lambda: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    x_T = _x_T(batch=3)
    ref, _ = _run_diffusers(name, 10, x_T.clone(), eta, gens())
    ours, _ = _run_ours(name, 10, x_T.clone(), eta, gens())
    _assert_rel_close(ours, ref)
    # Row k sampled alone with its own generator is bitwise the same as in the batch.
    for k, seed in enumerate(seeds):
        alone, _ = _run_ours(name, 10, x_T[k:k + 1].clone(), eta,
                             [torch.Generator().manual_seed(seed)])
        assert torch.equal(alone[0], ours[k])


def test_known_timesteps():
    assert leading_timesteps(50)[:3] == [981, 961, 941] and leading_timesteps(50)[-1] == 1
    assert leading_timesteps(1) == [1]
    # 30 steps: ⌊1000/30⌋ = 33, t = 29·33 + 1 = 958, ...; PLMS visits t_{n-2} twice.
    assert visited_timesteps("pndm", 30)[:4] == [958, 925, 925, 892]
    assert len(visited_timesteps("pndm", 30)) == 31
    # 1000 steps: the offset would reach t = 1000; we visit 999..0 instead.
    assert leading_timesteps(1000) == list(range(999, -1, -1))
    ours, visited = _run_ours("ddim", 1000, _x_T(1))
    assert visited == list(range(999, -1, -1)) and torch.isfinite(ours).all()


def test_pndm_transfer_is_the_deterministic_ddim_step():
    """PNDM Eq. 9 equals DDIM Eq. 12 with σ = 0 (closed form, float64)."""
    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(2, 5, generator=g, dtype=torch.float64).unbind()
    ab_t, ab_prev = 0.3, 0.7
    ddim = ab_prev ** 0.5 * (x - (1 - ab_t) ** 0.5 * eps) / ab_t ** 0.5 + (1 - ab_prev) ** 0.5 * eps
    torch.testing.assert_close(pndm_transfer(x, eps, ab_t, ab_prev), ddim, rtol=1e-12, atol=1e-12)


def test_noise_is_drawn_on_the_generator_device_in_float32():
    like = torch.zeros(2, 4, 3, 3, dtype=torch.float16)
    z = draw_noise(like, torch.Generator().manual_seed(0))
    assert z.dtype == torch.float16
    expected = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0)).half()
    assert torch.equal(z, expected)


def test_sampler_names_and_bad_input():
    assert Sampler.parse("DDIM") is Sampler.DDIM and Sampler.parse(Sampler.PNDM) is Sampler.PNDM
    eps_fn = RecordingEps()
    with pytest.raises(MeddapError, match=r"unknown sampler 'euler'.*ddpm, ddim, pndm"):
        denoise(eps_fn, _x_T(), scheduler="euler")
    for steps in (0, 1001, 2.5):
        with pytest.raises(MeddapError, match=r"choose an integer from 1 to 1000"):
            denoise(eps_fn, _x_T(), scheduler="ddim", num_steps=steps)
    with pytest.raises(MeddapError, match=r"eta=0.5 applies to the ddim sampler only"):
        denoise(eps_fn, _x_T(), scheduler="pndm", num_steps=2, eta=0.5)
    with pytest.raises(MeddapError, match=r"got 1 generators for a batch of 2"):
        denoise(eps_fn, _x_T(), scheduler="ddpm", num_steps=2,
                generator=[torch.Generator().manual_seed(0)])
