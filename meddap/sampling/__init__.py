"""Noise schedule, samplers (DDPM, DDIM, PLMS) and text-to-image generation."""
from meddap.sampling.samplers import Sampler, denoise

__all__ = ["Sampler", "denoise"]
