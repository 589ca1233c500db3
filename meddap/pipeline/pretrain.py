"""Pretraining the `tiny` Stable Diffusion from scratch on the captioned shapes domain.

This is SD v1's recipe (Rombach et al. 2022, arXiv 2112.10752) at toy scale,
with the same modules, code paths and checkpoint layout as SD v1.4:

1. the KL autoencoder (LDM Sec. 3.1): L = ||x - D(z)||^2 + w_KL KL(q(z|x) || N(0, I)),
   z ~ q(z|x); trained on random crops (the network is fully convolutional,
   so crops are cheap and the model then runs at any size);
2. latent calibration: SD multiplies latents by 0.18215 so that they have about
   unit variance (LDM Sec. 4.3.2 / Appendix G). The tiny base keeps that same
   constant (`SD_LATENT_SCALE`) and instead rescales its own latent space,
   exactly and without changing the autoencoder's function: the encoder's mean
   is multiplied by c, its log-variance shifted by 2 ln c, and `post_quant_conv`
   divided by c, with c chosen so that std(0.18215 z) = 1;
3. the text tower and the UNet, jointly, with the eps-prediction loss
   E ||eps - eps_theta(z_t, t, tau(y))||^2 (LDM Eq. 2; MEDDAP Eq. 1), t ~ U{0..999},
   z = 0.18215 x posterior sample; captions are replaced by the empty prompt with
   probability `caption_dropout` so that classifier-free guidance works (Ho &
   Salimans 2022, arXiv 2207.12598, Sec. 3.2);
4. save in SD v1 checkpoint layout (safetensors, fp16), loadable by
   `meddap.models.stable_diffusion.load_stable_diffusion` like SD v1.4 itself.

Every stage checkpoints into a work folder and resumes where it stopped; the
seed fixes the data (shapes.caption_and_image(seed, k)) and all random draws.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meddap.io import atomic_path
from meddap.models.config import SD_LATENT_SCALE
from meddap.models.stable_diffusion import StableDiffusion, build_stable_diffusion, save_stable_diffusion
from meddap.pipeline import shapes
from meddap.progress import Progress, progress
from meddap.sampling.schedule import NoiseSchedule


@dataclass(frozen=True)
class PretrainConfig:
    seed: int = 0
    size: int = 64                  # demo resolution: 64 px images, 8 x 8 latents
    vae_steps: int = 900
    vae_batch: int = 16
    vae_crop: int = 32              # training crop side (px); evaluation runs at `size`
    vae_lr: float = 1e-3
    kl_weight: float = 1e-5         # per-element KL weight (LDM uses 1e-6 beside a perceptual loss)
    latent_images: int = 2000       # shapes encoded once for stage 3
    unet_steps: int = 1500
    unet_batch: int = 16
    unet_lr: float = 1e-3
    warmup_steps: int = 50
    caption_dropout: float = 0.1
    checkpoint_every: int = 50

    def __post_init__(self):
        if self.size % 8:
            raise ValueError(f"size {self.size} must be a multiple of 8 (the autoencoder downsamples by 8).")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _save_state(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _lr(cfg: PretrainConfig, step: int, base: float) -> float:
    """Linear warm-up, then cosine decay to 10% (a common small-model schedule)."""
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    total = max(1, cfg.unet_steps - cfg.warmup_steps)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / total)))


class _Log:
    """Appends (stage, step, loss, lr) rows to work/log.csv."""

    def __init__(self, path: Path):
        self.path = path

    def resume(self, stage: str, step: int) -> None:
        """Drop the rows of `stage` past `step` (logged after the checkpoint a run resumes from)."""
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            keep = [ln for ln in lines[1:] if not (ln.startswith(stage + ",") and int(ln.split(",")[1]) > step)]
            self.path.write_text(lines[0] + "".join(keep), encoding="utf-8")

    def row(self, stage: str, step: int, loss: float, lr: float) -> None:
        new = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["stage", "step", "loss", "lr"])
            w.writerow([stage, step, f"{loss:.6f}", f"{lr:.3g}"])


def train_vae(sd: StableDiffusion, cfg: PretrainConfig, work: Path, log: _Log) -> None:
    """Stage 1: the autoencoder on random crops of shapes images (resumable)."""
    vae, path = sd.vae, work / "vae.pt"
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    step = 0
    if path.exists():
        state = torch.load(path, weights_only=True)
        vae.load_state_dict(state["model"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    log.resume("vae", step)
    gen = torch.Generator()
    bar = Progress(total=cfg.vae_steps, desc="1/3 autoencoder", initial=step)
    vae.train()
    while step < cfg.vae_steps:
        gen.manual_seed(cfg.seed * 1_000_003 + step)          # step-keyed: resume = no resume
        _, images = shapes.batch(cfg.seed, step * cfg.vae_batch, cfg.vae_batch, cfg.size)
        x = _to_tensor(images)                                                  # (B, 3, S, S)
        i, j = torch.randint(0, cfg.size - cfg.vae_crop + 1, (2,), generator=gen).tolist()
        x = x[:, :, i:i + cfg.vae_crop, j:j + cfg.vae_crop]                     # (B, 3, c, c)
        mean, logvar = vae.encode(x)                                            # (B, 4, c/8, c/8)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)
        recon = F.mse_loss(vae.decode(z), x)
        # KL(N(m, s^2) || N(0, 1)) per element = (m^2 + s^2 - 1 - ln s^2) / 2
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = recon + cfg.kl_weight * kl
        for g in opt.param_groups:
            g["lr"] = cfg.vae_lr * min(1.0, (step + 1) / cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        bar.update(1, postfix=f"mse {recon.item():.4f} kl {kl.item():.2f}")
        log.row("vae", step, recon.item(), opt.param_groups[0]["lr"])
        if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
            _save_state(path, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step})
    bar.close()
    vae.eval()


@torch.no_grad()
def calibrate_latent_scale(sd: StableDiffusion, cfg: PretrainConfig, n: int = 512) -> float:
    """Stage 2: rescale the latent space so that std(0.18215 z) = 1; returns c.

    The autoencoder's function is unchanged: mean' = c mean, logvar' = logvar + 2 ln c
    (so z' = c z in law), and D'(z') = D(z' / c) via post_quant_conv's weight / c.
    """
    vae = sd.vae
    _, images = shapes.batch(cfg.seed + 1, 0, n, cfg.size)
    mean, logvar = vae.encode(_to_tensor(images))                               # (n, 4, h, w)
    z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=torch.Generator().manual_seed(cfg.seed))
    c = 1.0 / (SD_LATENT_SCALE * z.std().item())
    e = vae.quant_conv.out_channels // 2                                        # moments = [mean | logvar]
    vae.quant_conv.weight[:e] *= c
    vae.quant_conv.bias[:e] *= c
    vae.quant_conv.bias[e:] += 2.0 * math.log(c)
    vae.post_quant_conv.weight /= c
    return c


@torch.no_grad()
def encode_latents(sd: StableDiffusion, cfg: PretrainConfig, work: Path) -> dict:
    """Posterior (mean, logvar) of `latent_images` shapes images, with their token ids (cached)."""
    path = work / "latents.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    means, logvars, tokens = [], [], []
    chunk = 64
    for start in progress(range(0, cfg.latent_images, chunk), desc="2/3 encode latents"):
        captions, images = shapes.batch(cfg.seed, 10_000_000 + start, min(chunk, cfg.latent_images - start), cfg.size)
        mean, logvar = sd.vae.encode(_to_tensor(images))
        means.append(mean), logvars.append(logvar), tokens.append(sd.text_encoder.tokenize(captions))
    data = {"mean": torch.cat(means), "logvar": torch.cat(logvars), "tokens": torch.cat(tokens)}
    _save_state(path, data)
    return data


def train_unet(sd: StableDiffusion, cfg: PretrainConfig, data: dict, work: Path, log: _Log) -> None:
    """Stage 3: text tower + UNet with the eps-prediction loss (MEDDAP Eq. 1), resumable."""
    unet, text, path = sd.unet, sd.text_encoder, work / "unet.pt"
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.01)
    step = 0
    if path.exists():
        state = torch.load(path, weights_only=True)
        unet.load_state_dict(state["unet"]), text.load_state_dict(state["text"]), opt.load_state_dict(state["opt"])
        step = state["step"]
    log.resume("unet", step)
    schedule = NoiseSchedule.sd_v1()
    empty = text.tokenize([""])                                                 # (1, 77)
    n = data["mean"].shape[0]
    gen = torch.Generator()
    bar = Progress(total=cfg.unet_steps, desc="3/3 text encoder + UNet", initial=step)
    unet.train(), text.train()
    while step < cfg.unet_steps:
        gen.manual_seed(cfg.seed * 1_000_003 + 7 + step)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        mean, logvar = data["mean"][idx], data["logvar"][idx]                   # (B, 4, h, w)
        z0 = SD_LATENT_SCALE * (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen))
        if torch.rand((), generator=gen) < 0.5:                                 # flips keep captions true
            z0 = z0.flip(-1)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        tokens = torch.where(drop[:, None], empty, data["tokens"][idx])         # (B, 77)
        t = torch.randint(0, schedule.num_timesteps, (cfg.unet_batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        z_t = schedule.q_sample(z0, t, eps)
        loss = F.mse_loss(unet(z_t, t, text(tokens)), eps)                      # MEDDAP Eq. 1
        lr = _lr(cfg, step, cfg.unet_lr)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1, postfix=f"loss {loss.item():.4f}")
        log.row("unet", step, loss.item(), lr)
        if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
            _save_state(path, {"unet": unet.state_dict(), "text": text.state_dict(),
                               "opt": opt.state_dict(), "step": step})
    bar.close()
    unet.eval(), text.eval()


def pretrain_tiny(cfg: PretrainConfig, work: str | Path, out: str | Path) -> Path:
    """Run stages 1-4 (each resumes from `work`) and write the fp16 checkpoint `out`."""
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)                      # module initialisation
    sd = build_stable_diffusion("tiny")
    log = _Log(work / "log.csv")
    train_vae(sd, cfg, work, log)
    c = calibrate_latent_scale(sd, cfg)
    data = encode_latents(sd, cfg, work)
    train_unet(sd, cfg, data, work, log)
    sd = sd.to(torch.float16)
    meta = {f"pretrain_{k}": str(v) for k, v in asdict(cfg).items()}
    meta.update(pretrain_domain="meddap.pipeline.shapes (procedural shapes; no ultrasound)",
                latent_rescale=f"{c:.6f}", latent_scale=str(SD_LATENT_SCALE))
    save_stable_diffusion(sd, out, metadata=meta)
    return out
