"""Noise schedule, samplers (DDPM, DDIM, PLMS), text-to-image, and the one generation
path of every command (generation.py: config, model loading, resumable image writing)."""
from meddap.sampling.samplers import Sampler, denoise

__all__ = ["Sampler", "denoise"]
