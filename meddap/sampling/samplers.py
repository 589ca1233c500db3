"""Reverse-process samplers for ε-prediction models: DDPM, DDIM and PLMS (PNDM).

Each sampler runs x_T -> x_0 given `eps_fn(x, t) -> ε̂`, where x: (B, C, H, W) and
t: (B,) int64, and knows nothing about networks or prompts.

Index convention (see schedule.py): training timesteps are t ∈ {0..999}, t = 0 the
least noisy; a sampler visits a decreasing subsequence t_{n−1} > ... > t_0 and
`prev(t)` is the next entry of that list (the one after t_0 is "−1", the end).
Symbols shared by all samplers:

    code name   paper symbol
    ab_t        ᾱ_t   (α_t in DDIM's notation)
    ab_prev     ᾱ_prev, at the next timestep visited
    eps         ε_θ(x_t, t)
    x0_hat      predicted x_0 = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t     (DDPM Eq. 15, DDIM Eq. 12)

Timesteps and end points follow SD v1.4's released scheduler configuration
(diffusers `scheduler_config.json`: scaled_linear betas, clip_sample false,
set_alpha_to_one false, steps_offset 1, skip_prk_steps true), which is what
the MEDDAP authors sampled with. Sampler noise is drawn in float32 on each
generator's device and then moved to x's device (see `draw_noise`); DDPM and
DDIM with η > 0 draw the noise of all their steps before the first step, in
step order, and move it in one copy (`draw_step_noise`).
"""
from __future__ import annotations

import numbers
from enum import Enum
from typing import Callable, Sequence

import torch

from meddap.errors import MeddapError
from meddap.sampling.schedule import NoiseSchedule

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None

# SD v1.4 scheduler_config.json `steps_offset`: 'leading' timesteps are shifted up by 1.
SD_STEPS_OFFSET = 1


class Sampler(Enum):
    DDPM = "ddpm"
    DDIM = "ddim"
    PNDM = "pndm"

    @classmethod
    def parse(cls, name: "str | Sampler") -> "Sampler":
        """Accept an enum member or its name ("ddim", "pndm", "ddpm"), case-insensitive."""
        if isinstance(name, Sampler):
            return name
        try:
            return cls(str(name).lower())
        except ValueError:
            raise MeddapError(f"unknown sampler {name!r}; choose one of "
                              f"{', '.join(s.value for s in cls)}.") from None


def leading_timesteps(num_steps: int, num_train_timesteps: int = 1000,
                      offset: int = SD_STEPS_OFFSET) -> list[int]:
    """SD's 'leading' spacing, decreasing: t_i = i·⌊T/n⌋ + offset for i = n−1, ..., 0.

    For 50 steps: 981, 961, ..., 21, 1.
    Deviation: with n = T = 1000 the offset would reach t = 1000, past the table
    (diffusers raises IndexError there); we drop the offset in that one case, so
    1000 steps visit 999, ..., 0, the chain of DDPM's Algorithm 2.
    """
    ratio = num_train_timesteps // num_steps
    if (num_steps - 1) * ratio + offset >= num_train_timesteps:
        offset = 0
    return [i * ratio + offset for i in reversed(range(num_steps))]


def _draw(shape: torch.Size, generator: Generators) -> torch.Tensor:
    """float32 N(0, I) of `shape` (B, C, H, W) on the generator's device (see `draw_noise`)."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise MeddapError(f"got {len(generator)} generators for a batch of {shape[0]}; "
                          f"pass one generator per batch row, or a single generator.")
    rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=torch.float32)
            for g in generator]
    return torch.cat(rows)                                          # (B, C, H, W) on the generators' device


def draw_noise(like: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like `like` (B, C, H, W), in like's dtype and device.

    Drawn in float32 on the generator's device (the CPU for the default generator)
    and then moved, so a seed gives the same numbers on any accelerator. With a
    list of generators (all on one device), row b is drawn from generator b alone,
    shape (1, C, H, W): an image's noise then does not depend on the other rows of
    the batch. The rows are stacked where they were drawn and moved in one copy.
    """
    z = _draw(like.shape, generator)                                # (B, C, H, W)
    return z.to(device=like.device, dtype=like.dtype)               # one copy to the device


def draw_step_noise(like: torch.Tensor, generator: Generators, num_steps: int) -> torch.Tensor:
    """The noise z of `num_steps` sampler steps: (num_steps, B, C, H, W), in like's dtype and device.

    Entry i holds the numbers `draw_noise(like, generator)` would give at the i-th
    call, because the draws are made in that order, one step at a time, each of
    the shape a step draws (a tensor of another shape may be filled by another
    code path of torch's CPU normal sampler). All of them are moved in one copy,
    so a step uploads nothing. Memory: num_steps · B·C·H·W float32 values on each
    side (1000 DDPM steps of 8 SD latents of 4 x 64 x 64: 0.5 GB).
    """
    if num_steps == 0:
        return like.new_empty((0, *like.shape))                     # (0, B, C, H, W), nothing drawn
    steps = [_draw(like.shape, generator) for _ in range(num_steps)]   # num_steps x (B, C, H, W)
    return torch.stack(steps).to(device=like.device, dtype=like.dtype)   # one copy to the device


def _timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)  # (B,)


def ddpm(eps_fn: EpsFn, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int],
         generator: Generators = None) -> torch.Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, arXiv 2006.11239, Algorithm 2), strided.

    Each step samples the posterior q(x_prev | x_t, x̂_0) of DDPM Eqs. 6-7, with
    β replaced by the stride's effective β = 1 − ᾱ_t/ᾱ_prev:

        μ = √ᾱ_prev β / (1 − ᾱ_t) · x̂_0 + √(1 − β) (1 − ᾱ_prev) / (1 − ᾱ_t) · x_t    (Eq. 7)
        σ² = β̃ = (1 − ᾱ_prev) / (1 − ᾱ_t) · β      ("fixed small" variance, Eq. 7)
        x_prev = μ + σ z,  z ~ N(0, I)

    code: beta = β, post_var = σ², z[i] the z of step i (`draw_step_noise`, drawn
    before the first step). After the last step ᾱ_prev = 1 (x_{−1} is x_0 itself),
    so σ = 0 and no noise is drawn: x_0 = x̂_0 as in Algorithm 2; the n − 1 steps
    before it draw one z each. x̂_0 is not clipped (SD's clip_sample is false:
    latents are unbounded).
    """
    ab = schedule.alphas_cumprod.tolist()
    z = draw_step_noise(x, generator, len(timesteps) - 1)                       # (n − 1, B, C, H, W)
    for i, t in enumerate(timesteps):
        ab_t = ab[t]
        ab_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        beta = 1.0 - ab_t / ab_prev
        eps = eps_fn(x, _timestep_batch(t, x))
        x0_hat = (x - (1.0 - ab_t) ** 0.5 * eps) / ab_t ** 0.5                      # Eq. 15
        mean = ((ab_prev ** 0.5 * beta / (1.0 - ab_t)) * x0_hat
                + ((1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab_t)) * x)       # Eq. 7
        post_var = (1.0 - ab_prev) / (1.0 - ab_t) * beta
        x = mean
        if post_var > 0:
            x = x + post_var ** 0.5 * z[i]
    return x


def ddim(eps_fn: EpsFn, x: torch.Tensor, schedule: NoiseSchedule, timesteps: list[int],
         eta: float = 0.0, generator: Generators = None) -> torch.Tensor:
    """DDIM (Song et al. 2020, arXiv 2010.02502), generative process of Eq. 12:

        x_prev = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev − σ²) · ε + σ z                       (Eq. 12)
        σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev)                            (Eq. 16)

    code: sigma = σ_t(η), eta = η, z[i] the z of step i (`draw_step_noise`: when η > 0,
    one per step, all drawn before the first step).
    η = 0 is deterministic DDIM; η = 1 has DDPM's posterior variance.
    After the last step ᾱ_prev = ᾱ_0, not 1 (SD's set_alpha_to_one = false).
    """
    ab = schedule.alphas_cumprod.tolist()
    z = draw_step_noise(x, generator, len(timesteps) if eta > 0 else 0)       # (n or 0, B, C, H, W)
    for i, t in enumerate(timesteps):
        ab_t = ab[t]
        ab_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else ab[0]
        eps = eps_fn(x, _timestep_batch(t, x))
        x0_hat = (x - (1.0 - ab_t) ** 0.5 * eps) / ab_t ** 0.5
        sigma = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)) ** 0.5  # Eq. 16
        x = ab_prev ** 0.5 * x0_hat + (1.0 - ab_prev - sigma ** 2) ** 0.5 * eps       # Eq. 12
        if eta > 0:
            x = x + sigma * z[i]
    return x


def pndm_transfer(x: torch.Tensor, eps: torch.Tensor, ab_t: float, ab_prev: float) -> torch.Tensor:
    """The transfer part φ(x_t, ε_t, t, t−δ) of PNDM (Liu et al. 2022, arXiv 2202.09778) Eq. 9:

        x_{t−δ} = √(ᾱ_{t−δ}/ᾱ_t) x_t
                  − (ᾱ_{t−δ} − ᾱ_t) / (√ᾱ_t (√((1 − ᾱ_{t−δ}) ᾱ_t) + √((1 − ᾱ_t) ᾱ_{t−δ}))) ε_t

    Algebraically the deterministic DDIM step (η = 0); written as in the paper.
    """
    denom = ab_t ** 0.5 * (((1.0 - ab_prev) * ab_t) ** 0.5 + ((1.0 - ab_t) * ab_prev) ** 0.5)
    return (ab_prev / ab_t) ** 0.5 * x - ((ab_prev - ab_t) / denom) * eps


# Adams-Bashforth weights of the pseudo linear multi-step method, newest ε first:
# PNDM Eq. 12 uses the 4th-order ones; the 2nd/3rd-order ones start the history
# as in diffusers' PNDMScheduler.step_plms (skip_prk_steps = true).
_ADAMS_BASHFORTH = {
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def plms(eps_fn: EpsFn, x: torch.Tensor, schedule: NoiseSchedule,
         timesteps: list[int]) -> torch.Tensor:
    """PLMS: PNDM's pseudo linear multi-step method, as SD v1.4 runs it (no Runge-Kutta warm-up).

    1. First interval t_{n−1} -> t_{n−2}, pseudo improved Euler (2 ε evaluations):
           e_1 = ε(x, t_{n−1});  x' = φ(x, e_1, t_{n−1}, t_{n−2});  e_2 = ε(x', t_{n−2})
           x ← φ(x, (e_1 + e_2)/2, t_{n−1}, t_{n−2})
    2. Then at each t: e_t = ε(x, t) and, with the last k ≤ 4 stored e's (history
       starts with e_1; e_2 is not kept), the Adams-Bashforth combination
           e' = (55 e_t − 59 e_{t+δ} + 37 e_{t+2δ} − 9 e_{t+3δ}) / 24          (PNDM Eq. 12)
       (orders 2 and 3 while fewer are stored), then x ← φ(x, e', t, prev(t)) (Eq. 9).
    So n steps make n + 1 ε evaluations, t_{n−2} twice: diffusers' visiting order
    for skip_prk_steps = true. With n = 1 only φ(x, e_1, t_0, end) is taken.
    After the last step ᾱ_prev = ᾱ_0 (set_alpha_to_one = false).
    """
    ab = schedule.alphas_cumprod.tolist()

    def ab_after(i: int) -> float:
        return ab[timesteps[i + 1]] if i + 1 < len(timesteps) else ab[0]

    t_first = timesteps[0]
    e_1 = eps_fn(x, _timestep_batch(t_first, x))
    x_euler = pndm_transfer(x, e_1, ab[t_first], ab_after(0))
    if len(timesteps) == 1:
        return x_euler
    e_2 = eps_fn(x_euler, _timestep_batch(timesteps[1], x))
    x = pndm_transfer(x, (e_1 + e_2) / 2, ab[t_first], ab_after(0))

    history = [e_1]                                   # newest last, at most 4 kept
    for i in range(1, len(timesteps)):
        t = timesteps[i]
        history = history[-3:] + [eps_fn(x, _timestep_batch(t, x))]
        weights = _ADAMS_BASHFORTH[len(history)]
        e_prime = sum(w * e for w, e in zip(weights, reversed(history)))
        x = pndm_transfer(x, e_prime, ab[t], ab_after(i))
    return x


def visited_timesteps(sampler: "str | Sampler", num_steps: int) -> list[int]:
    """The timesteps at which `denoise` calls eps_fn, in order (PLMS repeats one)."""
    ts = leading_timesteps(check_num_steps(num_steps))
    if Sampler.parse(sampler) is Sampler.PNDM and len(ts) > 1:
        return [ts[0], ts[1]] + ts[1:]
    return ts


def check_num_steps(num_steps: int, num_train_timesteps: int = 1000) -> int:
    """`num_steps` as an int if it is a whole number from 1 to T, else a MeddapError."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, numbers.Integral) \
            or not 1 <= num_steps <= num_train_timesteps:
        raise MeddapError(f"number of sampling steps {num_steps!r} is out of range; "
                          f"choose an integer from 1 to {num_train_timesteps}.")
    return int(num_steps)


def check_eta(eta: float, sampler: Sampler) -> float:
    """DDIM's η: a finite number ≥ 0; the other samplers take none (η must stay 0)."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta < float("inf"):
        raise MeddapError(f"eta {eta!r} must be 0 or positive (0: deterministic DDIM, "
                          f"1: DDPM's variance).")
    if eta != 0.0 and sampler is not Sampler.DDIM:
        raise MeddapError(f"eta={eta} applies to the ddim sampler only; "
                          f"{sampler.value} takes no eta (leave it at 0).")
    return float(eta)


@torch.no_grad()
def denoise(eps_fn: EpsFn, x_T: torch.Tensor, scheduler: "str | Sampler" = "pndm",
            num_steps: int = 30, eta: float = 0.0, generator: Generators = None,
            schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """Run a sampler from x_T: (B, C, H, W) to x_0, in x_T's dtype and device.

    scheduler: "pndm" (PLMS, the default of SD v1.4 and of the MEDDAP authors,
    with 30 steps), "ddim" or "ddpm". eta: DDIM's η (0 for the others).
    generator: one torch.Generator, or one per batch row, for DDPM/DDIM noise.
    schedule: defaults to SD v1's (`NoiseSchedule.sd_v1()`).
    """
    sampler = Sampler.parse(scheduler)
    schedule = schedule if schedule is not None else NoiseSchedule.sd_v1()
    timesteps = leading_timesteps(check_num_steps(num_steps, schedule.num_timesteps),
                                  schedule.num_timesteps)
    check_eta(eta, sampler)
    if sampler is Sampler.DDPM:
        return ddpm(eps_fn, x_T, schedule, timesteps, generator)
    if sampler is Sampler.DDIM:
        return ddim(eps_fn, x_T, schedule, timesteps, eta, generator)
    return plms(eps_fn, x_T, schedule, timesteps)
