"""meddap: a hand-written implementation of MEDDAP (arXiv 2403.16335).

Where each part of the paper lives:
  meddap/models/    Stable Diffusion v1.4: UNet, KL autoencoder, CLIP text encoder, checkpoint loading
  meddap/sampling/  noise schedule (Eq. 1), DDPM/DDIM/PNDM samplers, text-to-image with guidance
  meddap/lora/      USLoRA adapters (section 3.1, Eq. 3), adapter files, the fine-tuning loop
  meddap/data/      BUSI-style datasets, leakage-safe splits, the ultrasound phantom, prompts, expansion
  meddap/fid/       FID/KID with a hand-written Inception v3, and the released code's quantity
  meddap/classify/  ResNet34 / SqueezeNet1.1 / DenseNet121 training, metrics, statistics, Grad-CAM, tables
  meddap/pipeline/  the whole protocol as one command (`meddap run`, `meddap demo`)
  meddap/pretrain/  the `tiny` base's pretraining on a captioned shapes domain (scripts/pretrain_tiny.py)
"""

__version__ = "0.1.0"


def load_stable_diffusion(path, device="cpu", dtype=None):
    """Load SD v1 (`.ckpt`, `.safetensors` or a diffusers folder); see meddap.models.stable_diffusion."""
    from meddap.models.stable_diffusion import load_stable_diffusion as _load
    return _load(path, device=device, dtype=dtype)


def build_stable_diffusion(config="sd-v1.4", device="cpu", dtype=None):
    """Random-weight SD of a named config ("sd-v1.4" or "tiny")."""
    from meddap.models.stable_diffusion import build_stable_diffusion as _build
    return _build(config, device=device, dtype=dtype)
