"""Pretraining the `tiny` Stable Diffusion from scratch on the captioned shapes domain.

This is SD v1's recipe (Rombach et al. 2022, arXiv 2112.10752) at toy scale,
with the same modules, code paths and checkpoint layout as SD v1.4:

1. the KL autoencoder (LDM Sec. 3.1): L = ||x - D(z)||^2 + w_KL KL(q(z|x) || N(0, I)),
   z ~ q(z|x); trained on random crops (the network is fully convolutional,
   so crops are cheap and the model then runs at any size); the domain is
   shapes and grey fields (`field_fraction` of them grey fields, shapes.py);
   the learning rate warms up, then decays by cosine to a tenth (`_lr`);
1b. the decoder alone on grey fields, the encoder frozen (`tune_decoder`: the
   decoder-only fine-tuning of sd-vae-ft-mse), so that grey scenes decode grey;
   the latent space does not move;
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
3b. (optional, off by default and in the shipped file) the token-embedding rows no
   stage-3 caption used are redrawn from N(μ, Σ), the mean and covariance of the rows the
   captions did use (`redraw_unseen_token_rows`);
4. save in SD v1 checkpoint layout (safetensors, fp16), loadable by
   `meddap.models.stable_diffusion.load_stable_diffusion` like SD v1.4 itself.

Stage 3b, and why it is off. SD v1.4's text tower (CLIP ViT-L/14) was trained on 400M
captions, so every word of a MEDDAP prompt has a trained embedding. The tiny tower
sees the ~55 tokens of the shapes captions; the other 49,350 rows stay at their init,
N(0, 0.02^2), which the tower maps to nearly one context: the benign and malignant
prompts differ by 8.8% (relative rms over the 77 x 64 context), trained word pairs
("red"/"blue", "large"/"small") by 31-42%. The base is deaf to the class words, and
USLoRA has to grow the class difference from almost nothing. Drawing the unseen rows
from the trained rows' distribution (the "multivariate" initialisation of new
vocabulary, Mundra et al. 2024, arXiv 2407.05841; Hewitt 2021 starts new words at the
mean plus a draw of N(0, 1e-5 Σ), which makes them nearly alike) gives each unseen word a typical
embedding of its own; no word is singled out and the MEDDAP words stay unseen. It
makes the base hear the class words, and the demo's adapted check rose (seeds 0/1/2:
86.1/82.8/81.1% against 65.0/67.8/61.7%), but the base then draws each class prompt
its own way, and how a real-only classifier names those drawings is a lottery of the
draw: the unadapted check went to 55.6/39.4/46.7% (over 8 draws, 18-56%; all three
seeds <= 45% in 5 of 8), and the adapted one depends on the draw too (52.8% at seed 2
for another draw). weights/tiny/README.md has the measurements.
`scripts/pretrain_tiny.py --redraw-tokens-of FILE` applies it to a finished file.

Every stage checkpoints into a work folder and resumes where it stopped; the
seed fixes the data (shapes.caption_and_image(seed, k)) and all random draws.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from meddap.errors import MeddapError
from meddap.io import save_torch_atomic, stream_seed, truncate_log
from meddap.models.config import SD_LATENT_SCALE
from meddap.models.stable_diffusion import (StableDiffusion, build_stable_diffusion, load_stable_diffusion,
                                             save_stable_diffusion)
from meddap.pretrain import shapes
from meddap.pretrain.evaluate import PROBE_IMAGES, noise_mean_error, probe_phantoms, vae_reconstruction
from meddap.progress import Progress, progress
from meddap.sampling.schedule import NoiseSchedule
from meddap.settings import above, as_dict, at_least, in_range, multiple_of, setting, validate

# Seed streams (meddap.io.stream_seed): stage 1's step s draws from stream s,
# stage 3's from stream UNET_STREAM + s, the rule the shipped file was trained
# with. The two ranges overlap; the stages draw different quantities from them.
# Stage 1b's step s draws from DECODER_STREAM + s and reads the shapes images
# from DECODER_IMAGES on, past every other stage's.
UNET_STREAM = 7
DECODER_STREAM = 5_000_000
TOKEN_ROWS_STREAM = 6_000_000     # stage 3b's one draw
DECODER_IMAGES = 20_000_000
LATENT_IMAGES = 10_000_000        # stage 3's images (and captions) are samples 10M .. 10M + latent_images - 1


@dataclass(frozen=True, kw_only=True)
class PretrainConfig:
    """The settings of the shipped tiny base (scripts/pretrain_tiny.py derives its flags from them)."""
    seed: int = setting(0, help="seed of the data, the initialisation and every draw", check=at_least(0))
    size: int = setting(64, help="image side (px); 64 px images have 8 x 8 latents",
                        check=multiple_of(8, "the autoencoder downsamples by 8"))
    vae_steps: int = setting(2400, help="stage 1 steps", check=at_least(0))
    vae_batch: int = setting(16, help="stage 1 images per step", check=at_least(1))
    vae_crop: int = setting(32, help="stage 1 training crop side (px); evaluation runs at --size",
                            check=multiple_of(8, "the autoencoder downsamples by 8"))
    vae_lr: float = setting(1e-3, help="stage 1 learning rate", check=above(0))
    kl_weight: float = setting(1e-5, check=at_least(0),
                               help="per-element KL weight (LDM uses 1e-6 beside a perceptual loss)")
    field_fraction: float = setting(0.8, check=in_range(0.0, 1.0),
                                    help="share of grey-field scenes in the shapes domain")
    decoder_steps: int = setting(200, check=at_least(0),
                                 help="stage 1b steps: the decoder alone on grey fields")
    decoder_lr: float = setting(1e-4, help="stage 1b peak learning rate", check=above(0))
    latent_images: int = setting(2000, help="shapes images encoded once for stage 3", check=at_least(1))
    unet_steps: int = setting(3000, help="stage 3 steps", check=at_least(0))
    unet_batch: int = setting(16, help="stage 3 latents per step", check=at_least(1))
    unet_lr: float = setting(1e-3, help="stage 3 peak learning rate", check=above(0))
    warmup_steps: int = setting(50, help="linear warm-up steps of both stages", check=at_least(1))
    caption_dropout: float = setting(0.1, help="probability of the empty caption (for guidance)",
                                     check=in_range(0.0, 1.0))
    redraw_unseen_tokens: bool = setting(False, help="stage 3b (off in the shipped file): draw the token "
                                         "rows no caption used from N(mean, cov) of the rows the captions used")
    checkpoint_every: int = setting(50, help="steps between checkpoints in the work folder",
                                    check=at_least(1))

    def cross_checks(self, label) -> None:
        if self.vae_crop > self.size:
            raise MeddapError(f"{label('vae_crop')} = {self.vae_crop} must be at most "
                              f"{label('size')} = {self.size} (a crop of the image).")


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _lr(cfg: PretrainConfig, step: int, base: float, steps: int) -> float:
    """Linear warm-up, then cosine decay to 10% at `steps` (a common small-model schedule)."""
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    total = max(1, steps - cfg.warmup_steps)
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / total)))


class _Log:
    """Appends (stage, step, loss, lr) rows to work/log.csv."""

    HEADER = "stage,step,loss,lr\n"

    def __init__(self, path: Path):
        self.path = path

    def resume(self, stage: str, step: int) -> None:
        """Drop the rows of `stage` past `step` (logged after the checkpoint a run resumes from)."""
        truncate_log(self.path, self.HEADER,
                     keep=lambda fields: not (fields[0] == stage and int(fields[1]) > step))

    def row(self, stage: str, step: int, loss: float, lr: float) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"{stage},{step},{loss:.6f},{lr:.3g}\n")


def _random_crop(x: torch.Tensor, crop: int, gen: torch.Generator) -> torch.Tensor:
    """(B, C, S, S) -> (B, C, crop, crop) at a uniform position (one draw of two ints)."""
    i, j = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=gen).tolist()
    return x[:, :, i:i + crop, j:j + crop]


def _posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """z ~ q(z|x) = N(mean, exp(logvar)) by reparametrisation."""
    return mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)


@dataclass
class _Step:
    """What one training step of a stage returns to `_run_stage`."""
    loss: torch.Tensor            # backpropagated
    logged: float                 # the log.csv value (stage 1 logs the reconstruction MSE alone)
    postfix: str                  # the progress bar's


def _run_stage(name: str, desc: str, steps: int, base_lr: float, path: Path,
               modules: dict[str, torch.nn.Module], opt: torch.optim.Optimizer,
               step_fn: Callable[[int], _Step], cfg: PretrainConfig, log: _Log,
               clip: float | None = None) -> None:
    """The loop every stage shares: resume from `path`, then per step the lr (`_lr`), the
    loss of `step_fn(step)` (whose draws are keyed by the step, so resuming draws what an
    uninterrupted run would), backward, optional gradient clipping, the optimizer step, a
    log row, and a checkpoint every `cfg.checkpoint_every` steps and at the end.

    The checkpoint holds each of `modules`' state under its key, "opt" and "step"."""
    step = 0
    if path.exists():
        state = torch.load(path, weights_only=True)
        for key, module in modules.items():
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        step = state["step"]
    log.resume(name, step)
    params = [p for g in opt.param_groups for p in g["params"]]
    bar = Progress(total=steps, desc=desc, initial=step)
    while step < steps:
        out = step_fn(step)
        lr = _lr(cfg, step, base_lr, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        step += 1
        bar.update(1, postfix=out.postfix)
        log.row(name, step, out.logged, lr)
        if step % cfg.checkpoint_every == 0 or step == steps:
            save_torch_atomic({**{key: module.state_dict() for key, module in modules.items()},
                               "opt": opt.state_dict(), "step": step}, path)
    bar.close()


def train_vae(sd: StableDiffusion, cfg: PretrainConfig, work: Path, log: _Log) -> None:
    """Stage 1: the autoencoder on random crops of shapes images (resumable)."""
    vae, gen = sd.vae, torch.Generator()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)

    def step_fn(step: int) -> _Step:
        gen.manual_seed(stream_seed(cfg.seed, step))
        _, images = shapes.batch(cfg.seed, step * cfg.vae_batch, cfg.vae_batch, cfg.size,
                                 cfg.field_fraction)
        x = _random_crop(_to_tensor(images), cfg.vae_crop, gen)                # (B, 3, c, c)
        mean, logvar = vae.encode(x)                                            # (B, 4, c/8, c/8)
        recon = F.mse_loss(vae.decode(_posterior_sample(mean, logvar, gen)), x)
        # KL(N(m, s^2) || N(0, 1)) per element = (m^2 + s^2 - 1 - ln s^2) / 2
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return _Step(recon + cfg.kl_weight * kl, recon.item(), f"mse {recon.item():.4f} kl {kl.item():.2f}")

    vae.train()
    _run_stage("vae", "1/3 autoencoder", cfg.vae_steps, cfg.vae_lr, work / "vae.pt",
               {"model": vae}, opt, step_fn, cfg, log)
    vae.eval()


def tune_decoder(sd: StableDiffusion, cfg: PretrainConfig, work: Path, log: _Log) -> None:
    """Stage 1b: the decoder alone on grey fields (resumable); the encoder is frozen.

    The decoder fine-tuning of Stability AI's sd-vae-ft-mse, at toy scale: only D and
    post_quant_conv train, so q(z|x), the latent space and everything trained on it
    later are those of stage 1, and D learns that grey scenes decode grey. Stage 1's
    mixed domain leaves a tint on grey inputs it never saw (phantoms: channel spread
    0.053 after stage 1 alone, seed 0, field fraction 0.8; see weights/tiny/README.md).
    """
    vae, gen = sd.vae, torch.Generator()
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)

    def step_fn(step: int) -> _Step:
        gen.manual_seed(stream_seed(cfg.seed, DECODER_STREAM + step))
        _, images = shapes.batch(cfg.seed, DECODER_IMAGES + step * cfg.vae_batch, cfg.vae_batch, cfg.size,
                                 field_fraction=1.0)
        x = _random_crop(_to_tensor(images), cfg.vae_crop, gen)                # (B, 3, c, c), grey
        with torch.no_grad():                                                   # q(z|x) fixed
            z = _posterior_sample(*vae.encode(x), gen)
        recon = F.mse_loss(vae.decode(z), x)        # the KL term has no decoder gradient
        return _Step(recon, recon.item(), f"mse {recon.item():.4f}")

    vae.eval()                                  # no dropout or norm statistics to switch
    _run_stage("decoder", "1b/3 decoder on grey fields", cfg.decoder_steps, cfg.decoder_lr,
               work / "decoder.pt", {"model": vae}, opt, step_fn, cfg, log)


@torch.no_grad()
def calibrate_latent_scale(sd: StableDiffusion, cfg: PretrainConfig, n: int = 512) -> float:
    """Stage 2: rescale the latent space so that std(0.18215 z) = 1; returns c.

    The autoencoder's function is unchanged: mean' = c mean, logvar' = logvar + 2 ln c
    (so z' = c z in law), and D'(z') = D(z' / c) via post_quant_conv's weight / c.
    """
    vae = sd.vae
    _, images = shapes.batch(cfg.seed + 1, 0, n, cfg.size, cfg.field_fraction)
    mean, logvar = vae.encode(_to_tensor(images))                               # (n, 4, h, w)
    z = _posterior_sample(mean, logvar, torch.Generator().manual_seed(cfg.seed))
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
        captions, images = shapes.batch(cfg.seed, LATENT_IMAGES + start, min(chunk, cfg.latent_images - start),
                                         cfg.size, cfg.field_fraction)
        mean, logvar = sd.vae.encode(_to_tensor(images))
        means.append(mean), logvars.append(logvar), tokens.append(sd.text_encoder.tokenize(captions))
    data = {"mean": torch.cat(means), "logvar": torch.cat(logvars), "tokens": torch.cat(tokens)}
    save_torch_atomic(data, path)
    return data


def train_unet(sd: StableDiffusion, cfg: PretrainConfig, data: dict, work: Path, log: _Log) -> None:
    """Stage 3: text tower + UNet with the eps-prediction loss (MEDDAP Eq. 1), resumable."""
    unet, text, gen = sd.unet, sd.text_encoder, torch.Generator()
    opt = torch.optim.AdamW(list(unet.parameters()) + list(text.parameters()), lr=cfg.unet_lr,
                            weight_decay=0.01)
    schedule = NoiseSchedule.sd_v1()
    empty = text.tokenize([""])                                                 # (1, 77)
    n = data["mean"].shape[0]

    def step_fn(step: int) -> _Step:
        gen.manual_seed(stream_seed(cfg.seed, UNET_STREAM + step))
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        z0 = SD_LATENT_SCALE * _posterior_sample(data["mean"][idx], data["logvar"][idx], gen)  # (B, 4, h, w)
        if torch.rand((), generator=gen) < 0.5:                                 # flips keep captions true
            z0 = z0.flip(-1)
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        tokens = torch.where(drop[:, None], empty, data["tokens"][idx])         # (B, 77)
        t = torch.randint(0, schedule.num_timesteps, (cfg.unet_batch,), generator=gen)
        eps = torch.randn(z0.shape, generator=gen)
        loss = F.mse_loss(unet(schedule.q_sample(z0, t, eps), t, text(tokens)), eps)   # MEDDAP Eq. 1
        return _Step(loss, loss.item(), f"loss {loss.item():.4f}")

    unet.train(), text.train()
    _run_stage("unet", "3/3 text encoder + UNet", cfg.unet_steps, cfg.unet_lr, work / "unet.pt",
               {"unet": unet, "text": text}, opt, step_fn, cfg, log, clip=1.0)
    unet.eval(), text.eval()


@torch.no_grad()
def redraw_unseen_token_rows(text: torch.nn.Module, seen: torch.Tensor, seed: int) -> int:
    """Stage 3b: every row of `text.token_embedding` whose token id is not in `seen`
    becomes a draw of N(μ, Σ), μ and Σ the mean and covariance of the `seen` rows;
    returns the number of rows drawn. The `seen` rows keep their bytes.

    The draw is μ + R z, (μ, R) by meddap.lora.new_tokens.row_law (the degenerate normal
    on the seen rows' affine span when they are fewer than the dimensions), z ~ N(0, I)
    from stream TOKEN_ROWS_STREAM.
    """
    from meddap.lora.new_tokens import row_law

    weight = text.token_embedding.weight                                        # (V, D)
    unseen = torch.ones(weight.shape[0], dtype=torch.bool)
    unseen[seen.cpu()] = False
    rows = weight.detach().cpu().double()
    mu, root = row_law(rows[~unseen])                                           # Σ = root rootᵀ
    gen = torch.Generator().manual_seed(stream_seed(seed, TOKEN_ROWS_STREAM))
    z = torch.randn(int(unseen.sum()), rows.shape[1], generator=gen, dtype=torch.float64)
    rows[unseen] = mu + z @ root.T
    weight.copy_(rows.to(weight.dtype))
    return int(unseen.sum())


def seen_tokens(data: dict, text: torch.nn.Module) -> torch.Tensor:
    """The token ids stage 3 trained: those of its captions and of the empty prompt."""
    return torch.unique(torch.cat([data["tokens"].flatten(), text.tokenize([""]).flatten()]))


# The settings that fix stage 3's captions, checked against a file's metadata by
# `redraw_file_token_rows`.
CAPTION_SETTINGS = ("seed", "size", "field_fraction", "latent_images")


def stage3_token_ids(cfg: PretrainConfig, text: torch.nn.Module, show_progress: bool = True) -> torch.Tensor:
    """The token ids stage 3 trained with settings `cfg`, its captions rebuilt (not stored)."""
    tokens = []
    for start in progress(range(0, cfg.latent_images, 256), desc="stage-3 captions", enabled=show_progress):
        captions, _ = shapes.batch(cfg.seed, LATENT_IMAGES + start, min(256, cfg.latent_images - start),
                                   cfg.size, cfg.field_fraction)
        tokens.append(text.tokenize(captions))
    return seen_tokens({"tokens": torch.cat(tokens)}, text)


def _file_metadata(path: Path) -> dict[str, str]:
    """The safetensors file's `__metadata__` ({} if none), from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def _caption_config(meta: dict, src: Path) -> PretrainConfig:
    """PretrainConfig with CAPTION_SETTINGS as a tiny base file's metadata stores them."""
    values = {}
    for key in CAPTION_SETTINGS:
        stored = meta.get(f"pretrain_{key}")
        kind = type(getattr(PretrainConfig(), key))
        try:
            values[key] = kind(stored)
        except (TypeError, ValueError):
            raise MeddapError(f"{src}: metadata pretrain_{key} = {stored!r} is not a {kind.__name__}; "
                              f"the file is not a readable meddap tiny base.") from None
    return PretrainConfig(**values)


def trained_token_ids(checkpoint: str | Path, text: torch.nn.Module,
                      show_progress: bool = True) -> torch.Tensor | None:
    """The token ids whose embedding rows a meddap-pretrained base trained (stage 3's
    captions, plus every id when stage 3b redrew the rest), or None for a file without
    `pretrain_*` metadata (SD v1.4: CLIP trained every row)."""
    path = Path(checkpoint)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    meta = _file_metadata(path)
    if f"pretrain_{CAPTION_SETTINGS[0]}" not in meta:
        return None
    if meta.get("pretrain_redraw_unseen_tokens") == "True":
        return torch.arange(text.token_embedding.num_embeddings)
    return stage3_token_ids(_caption_config(meta, path), text, show_progress)


def redraw_file_token_rows(cfg: PretrainConfig, src: str | Path, out: str | Path) -> Path:
    """Stage 3b alone, on a tiny base file made by stages 1-3 (`redraw_unseen_tokens` false,
    as the shipped file): its stage-3 captions are rebuilt from cfg,
    which must match the file's `pretrain_*` metadata for CAPTION_SETTINGS, and only
    token rows change. Writes `out` with the file's metadata plus the stage's."""
    from meddap.io import sha256_file

    validate(cfg)
    src, out = Path(src), Path(out)
    meta = _file_metadata(src)
    for key in CAPTION_SETTINGS:
        stored, wanted = meta.get(f"pretrain_{key}"), str(getattr(cfg, key))
        if stored != wanted:
            raise MeddapError(f"{src}: metadata pretrain_{key} = {stored!r}, but the settings say {wanted!r}; "
                              f"stage 3b rebuilds the stage-3 captions from {', '.join(CAPTION_SETTINGS)} "
                              f"and needs the values the file was trained with.")
    if meta.get("pretrain_redraw_unseen_tokens") == "True":
        raise MeddapError(f"{src}: its unseen token rows were already redrawn (metadata "
                          f"pretrain_redraw_unseen_tokens = True); start from a stage-3 file.")
    sd = load_stable_diffusion(src)
    n = redraw_unseen_token_rows(sd.text_encoder, stage3_token_ids(cfg, sd.text_encoder), cfg.seed)
    meta.update(pretrain_redraw_unseen_tokens="True", token_rows_redrawn=str(n),
                token_rows_redrawn_in=f"{src.name} (SHA-256 {sha256_file(src)})")
    save_stable_diffusion(sd.to(torch.float16), out, metadata=meta)
    return out


def pretrain_tiny(cfg: PretrainConfig, work: str | Path, out: str | Path) -> Path:
    """Run stages 1-4 (each resumes from `work`) and write the fp16 checkpoint `out`."""
    validate(cfg)
    work, out = Path(work), Path(out)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)                      # module initialisation
    sd = build_stable_diffusion("tiny")
    log = _Log(work / "log.csv")
    train_vae(sd, cfg, work, log)
    tune_decoder(sd, cfg, work, log)
    probe = vae_reconstruction(sd.vae, probe_phantoms())
    print(f"autoencoder on {PROBE_IMAGES} held-out phantoms: PSNR {probe.psnr_db:.2f} dB, "
          f"channel spread {probe.spread:.3f}", flush=True)
    c = calibrate_latent_scale(sd, cfg)
    data = encode_latents(sd, cfg, work)
    train_unet(sd, cfg, data, work, log)
    if cfg.redraw_unseen_tokens:
        n = redraw_unseen_token_rows(sd.text_encoder, seen_tokens(data, sd.text_encoder), cfg.seed)
        print(f"3b: {n} token rows no caption used redrawn from the trained rows' N(mean, cov)", flush=True)
    tracking = noise_mean_error(sd, probe_phantoms())
    print(f"UNet on the same phantoms' latents: noise-mean error {tracking:.3f} (1 = blind to it)", flush=True)
    sd = sd.to(torch.float16)
    meta = {f"pretrain_{k}": str(v) for k, v in as_dict(cfg).items()}
    scenes = "procedural shapes and grey fields" if cfg.field_fraction > 0 else "procedural shapes"
    meta.update(pretrain_domain=f"{shapes.__name__} ({scenes}; no ultrasound)",
                latent_rescale=f"{c:.6f}", latent_scale=str(SD_LATENT_SCALE),
                vae_probe_psnr_db=f"{probe.psnr_db:.3f}", vae_probe_spread=f"{probe.spread:.4f}",
                unet_probe_noise_mean_error=f"{tracking:.4f}")
    save_stable_diffusion(sd, out, metadata=meta)
    return out
