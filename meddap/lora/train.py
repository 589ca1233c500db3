"""USLoRA fine-tuning of SD v1.4 on labelled images (MEDDAP section 3.1).

Objective, MEDDAP Eq. 1 (the latent-diffusion loss):

    L = E_{z0, c, ε ~ N(0, I), t ~ U{0..999}} ‖ε − ε_θ(z_t, t, τ(c))‖²,
    z_t = √ᾱ_t z0 + √(1 − ᾱ_t) ε         (NoiseSchedule.q_sample)
    z0  = 0.18215 · (mean + σ ⊙ η)        (a draw from the VAE posterior, times vae.scale)

where only the adapters of MEDDAP Eq. 3 (W = W0 + (α/r)·up·down) are trained.
Defaults are the paper's and the authors' script's (train_text_to_image_lora.py):
AdamW at lr 1e-4, constant; batch 1; 100 epochs; rank 4; 224 px; seed 42;
Resize(224, bilinear) -> RandomCrop(224) -> random horizontal flip -> [-1, 1].

`train_lora(cfg)` reads as six steps: 1 load, 2 freeze, 3 inject, 4 data,
5 loop (with checkpoints and validation), 6 save. Every random draw of the
run (adapter init, epoch order, crop, flip, posterior noise, t, ε) comes from
one CPU generator seeded with `seed`, so a seed gives the same draws on any
device; the arithmetic on them is not the same (GPU kernels differ from the
CPU's). The generator's state is part of each checkpoint: on the CPU (with the
same number of threads), two runs of one config end bit for bit alike, and a run
killed and resumed ends where an uninterrupted one does (with new tokens too:
`lora_inputs` picks contexts with a deterministic backward). On CUDA that holds
only with cudnn.benchmark off (`train_lora` pins it) and
torch.use_deterministic_algorithms(True), and is not
guaranteed even then: SDPA and cuDNN backward kernels use atomics (see
meddap.device).

Caption dropout (`caption_dropout` p, not in the paper or the released script, whose
p is 0, the default): each row's τ(c) is replaced by the empty prompt's τ(∅) with
probability p (drawn after ε), as SD itself was trained (10%, for classifier-free
guidance). Without it the adapted UNet never sees ∅, so the ε(z_t, ∅) that guidance
subtracts stays the base's, and guidance amplifies "phantom, not the base's domain"
more than the class. A run with p = 0 draws exactly what it drew before the option.

New tokens (`new_tokens`, not in the paper; meddap.lora.new_tokens): for a base whose
text tower never trained some tokens of the training prompts (the `tiny` base), the run
also trains an embedding row for each of them, drawn first from the trained rows'
distribution; τ(c) is then recomputed every step, differentiable in those rows, and
the rows are saved in the adapter file beside the adapters.

`--fast` (with --cache-latents) runs the same step on static device buffers,
from the same draws in the same order (meddap.lora.fast); on the CPU its run
is bit for bit the eager one, log.csv included.
"""
from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from meddap.data.datasets import ImageSet, load_rgb, resolve_training_images
from meddap.data.prompts import prompt_for
from meddap.device import DEVICE_HELP, check_device_name, pin_cudnn, resolve_device, resolve_dtype
from meddap.errors import MeddapError
from meddap.io import dataset_sha256, save_torch_atomic, truncate_log
from meddap.lora.adapter import AdapterConfig, inject_lora, lora_parameters
from meddap.lora.fast import LOG_EVERY, FastStep, LossRing, SelfCheckedStep, make_optimizer, will_capture
from meddap.lora.files import save_lora
from meddap.lora.new_tokens import NewTokens, apply_new_tokens
from meddap.models.vae import sample_posterior
from meddap.progress import Progress, progress
from meddap.settings import Label, as_dict, at_least, cli_label, multiple_of, setting, validate

# AdamW settings of the authors' script (diffusers train_text_to_image_lora.py
# defaults: --adam_beta1 0.9 --adam_beta2 0.999 --adam_weight_decay 1e-2
# --adam_epsilon 1e-08) and its gradient clipping (--max_grad_norm 1.0).
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-2
ADAM_EPS = 1e-8
MAX_GRAD_NORM = 1.0
VALIDATION_GUIDANCE = 7.5   # diffusers' default for SD v1.4, as the authors' inference script

STATE_FILE, LOG_FILE, ADAPTER_FILE, VALIDATION_DIR = "train_state.pt", "log.csv", "lora.safetensors", "validation"


class MixedPrecision(Enum):
    NO = "no"       # float32 everywhere (the only choice on the CPU)
    FP16 = "fp16"   # frozen base in float16, adapters float32, loss scaling (the authors' setting)
    BF16 = "bf16"   # frozen base in bfloat16, adapters float32

    @property
    def dtype_name(self) -> str:
        """The base model's dtype in meddap.device's names: fp32, fp16 or bf16."""
        return "fp32" if self is MixedPrecision.NO else self.value


def _check_lr(lr) -> str | None:
    """A settings check: a learning rate in (0, 1]."""
    return None if math.isfinite(lr) and 0 < lr <= 1 else "must be above 0 and at most 1 (the paper uses 1e-4)"


def _check_fraction(p) -> str | None:
    """A settings check: a probability in [0, 1)."""
    return None if math.isfinite(p) and 0 <= p < 1 else "must be at least 0 and below 1 (paper: 0)"


@dataclass(frozen=True, kw_only=True)
class LoRARunConfig(AdapterConfig):
    """One `meddap train-lora` run (or the [lora] stage of `meddap run`); the defaults
    are the paper's. rank, alpha and targets are declared in `AdapterConfig`."""
    checkpoint: str = setting(help="SD v1 checkpoint (.ckpt/.safetensors/diffusers folder)")
    data: str = setting(help="class-folder dataset or SPLIT.json:FOLD:PART")
    out: str = setting(help="output folder (re-run the same command to resume)")
    lr: float = setting(1e-4, help="AdamW learning rate, constant (paper: 1e-4)", check=_check_lr)
    epochs: int = setting(100, help="passes over the data (paper: 100)", check=at_least(1))
    max_steps: int | None = setting(None, help="stop after this many steps in all; a later run with "
                                               "more resumes (None: no cap)", check=at_least(1))
    batch_size: int = setting(1, help="images per step (paper: 1)", check=at_least(1))
    resolution: int = setting(224, help="training size in pixels (paper: 224)",
                              check=multiple_of(8, "the VAE downsamples by 8"))
    seed: int = setting(42, help="seed of init, data order and noise (released: 42)", check=at_least(0))
    device: str | None = setting(None, help=DEVICE_HELP, check=check_device_name)
    mixed_precision: MixedPrecision = setting(
        MixedPrecision.NO, help="base model dtype on a GPU; adapters stay float32 (released: fp16)")
    gradient_checkpointing: bool = setting(False, help="recompute activations to save memory")
    cache_latents: bool = setting(False, help="encode each image once (center crop, both flips): fixes "
                                              "the crop, keeps flips and posterior sampling random")
    checkpoint_every: int = setting(500, help="write a resumable state every N steps", check=at_least(1))
    validate_every: int = setting(0, help="sample validation images every N steps (0: off)",
                                  check=at_least(0))
    validation_prompts: tuple[str, ...] = setting(
        (), help="prompts for validation images (none given: each class's training prompt)")
    validation_steps: int = setting(30, help="sampler steps for validation images", check=at_least(1))
    as_released: bool = setting(False, help="use the released training captions "
                                            "('an ultrasound photo of X tumor in breast')")
    caption_dropout: float = setting(0.0, help="train this fraction of rows on the empty prompt instead of "
                                               "their caption, so that guidance's unconditional "
                                               "prediction is adapted too (paper and released: 0)",
                                     check=_check_fraction)
    new_tokens: bool = setting(False, help="also learn embedding rows for the prompt tokens the base's "
                                           "text tower never trained (meddap.lora.new_tokens; the tiny "
                                           "base; not in the paper)")
    fast: bool = setting(False, help="the fast step (meddap.lora.fast): cached latents on the device, "
                                     "draws staged to static inputs, losses logged in batches, fused "
                                     "AdamW and a CUDA graph on a GPU; self-checked against the eager "
                                     "step (needs --cache-latents)")
    show_progress: bool = setting(True, help="draw progress bars", cli=False)   # the CLI has --quiet

    def cross_checks(self, label: Label) -> None:
        if self.fast and self.new_tokens:
            raise MeddapError(f"{label('fast')} and {label('new_tokens')} do not go together: the fast "
                              f"step keeps the prompts' contexts in static buffers, and new tokens change "
                              f"them every step; turn one of them off.")
        if self.fast and not self.cache_latents:
            raise MeddapError(f"{label('fast')} needs {label('cache_latents')}: the fast step gathers "
                              f"cached latents on the device; add {label('cache_latents')} or leave "
                              f"{label('fast')} off.")


# Fields that fix the arithmetic of a run; a resume must agree on all of them.
_RESUME_FIELDS = ("rank", "alpha", "targets", "lr", "batch_size", "resolution", "seed",
                  "mixed_precision", "cache_latents", "as_released", "caption_dropout", "new_tokens")


def _rng_states(rng: torch.Generator, device: torch.device) -> dict:
    """Every RNG state the run may draw from. The loop draws only from `rng`; the
    global ones are kept too, so that resume stays exact if a layer ever draws from
    them. Of the GPUs, only the training device's generator is kept."""
    np_state = np.random.get_state()
    states = {
        "loop": rng.get_state(),
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(rng: torch.Generator, s: dict, device: torch.device) -> None:
    rng.set_state(s["loop"])
    torch.set_rng_state(s["torch"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


class TrainImages:
    """The training set after its deterministic part: Resize(resolution, bilinear).

    `latents()` applies the random part per step: RandomCrop(resolution), a
    horizontal flip with probability 1/2, scaling to [-1, 1], the VAE
    posterior sample and the latent scale. With `cache_latents()` the VAE runs
    once per image on its CENTER crop, flipped and not: the crop is then
    fixed, while the flip and the posterior sample stay random, drawn exactly
    as without the cache. (For square images, whose only crop is the center
    one, cached and uncached runs compute the same thing.)
    """

    def __init__(self, image_set: ImageSet, resolution: int, show_progress: bool = True):
        # torchvision is imported here, not at the top, so that reading LoRARunConfig
        # (as `meddap --help` does) stays cheap.
        import torchvision.transforms.functional as TF

        self.resolution = resolution
        self.classes = image_set.classes
        self.items = image_set.items
        self.labels = torch.tensor(image_set.label_ids())       # (N,) class index
        self.pixels = [                                          # N x (3, H, W) uint8, min(H, W) = resolution
            TF.pil_to_tensor(TF.resize(load_rgb(it.path), resolution,
                                       interpolation=TF.InterpolationMode.BILINEAR))
            for it in progress(self.items, desc="reading images", enabled=show_progress)]
        self.moments: list[torch.Tensor] | None = None           # N x (2 flips, 2, 4, h, w) when cached

    def __len__(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """meddap.io.dataset_sha256 of the images: a resume must see the same data."""
        return dataset_sha256(self.items)

    def prompts(self, as_released: bool) -> list[str]:
        """One training prompt per class (MEDDAP section 3.2, or the released caption)."""
        return [prompt_for(c, stage="train", as_released=as_released) for c in self.classes]

    @property
    def empty_row(self) -> int:
        """The row of `embed_prompts` that holds the empty prompt's τ(∅): n_classes."""
        return len(self.classes)

    def embed_prompts(self, text_encoder, as_released: bool, new: NewTokens | None = None) -> torch.Tensor:
        """τ(c) of each class's prompt, then τ(∅) of the empty prompt (for caption dropout):
        (n_classes + 1, 77, C). The text encoder is frozen and the prompts fixed, so
        embedding once is exact (this is always done). With `new` (new tokens), through
        `new.embed`: differentiable in its rows, and redone every step."""
        device = next(text_encoder.parameters()).device
        embed = text_encoder if new is None else functools.partial(new.embed, text_encoder)
        with torch.set_grad_enabled(new is not None):
            # Two calls, not one: a batch of another size may round the class rows differently.
            classes = embed(text_encoder.tokenize(self.prompts(as_released)).to(device))    # (n, 77, C)
            return torch.cat([classes, embed(text_encoder.tokenize([""]).to(device))])

    def _view(self, i: int, top: int, left: int, flip: bool) -> torch.Tensor:
        s = self.resolution
        x = self.pixels[i][:, top:top + s, left:left + s]        # (3, s, s) uint8
        x = x.flip(-1) if flip else x
        return (x / 255 - 0.5) / 0.5                             # Normalize(0.5, 0.5) as released: [-1, 1]

    @torch.no_grad()
    def _encode(self, vae, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, s, s) -> posterior moments stacked as (B, 2, 4, h, w), float32."""
        p = next(vae.parameters())
        mean, logvar = vae.encode(x.to(p.device, p.dtype))
        return torch.stack([mean.float(), logvar.float()], dim=1)

    def cache_latents(self, vae, show_progress: bool = True) -> None:
        self.moments = []
        for i in progress(range(len(self)), desc="caching latents", enabled=show_progress):
            _, H, W = self.pixels[i].shape
            top, left = int(round((H - self.resolution) / 2)), int(round((W - self.resolution) / 2))
            views = [self._view(i, top, left, flip)[None] for flip in (False, True)]  # 2 x (1, 3, s, s)
            self.moments.append(torch.cat([self._encode(vae, v) for v in views]))  # (2, 2, 4, h, w)

    @torch.no_grad()
    def latents(self, batch: torch.Tensor, vae, rng: torch.Generator) -> torch.Tensor:
        """z0 = vae.scale · (mean + exp(logvar/2) ⊙ η) for the images `batch`: (B, 4, h, w)."""
        picks = []
        for i in batch.tolist():
            u = torch.rand(3, generator=rng)   # crop row, crop column, flip (drawn with or without cache)
            _, H, W = self.pixels[i].shape
            top, left = int(u[0] * (H - self.resolution + 1)), int(u[1] * (W - self.resolution + 1))
            picks.append((i, top, left, bool(u[2] < 0.5)))
        if self.moments is None:
            x = torch.stack([self._view(*pick) for pick in picks])                 # (B, 3, s, s)
            m = self._encode(vae, x)                                                # (B, 2, 4, h, w)
        else:   # the cache holds the center crop only: top and left are not used
            m = torch.stack([self.moments[i][int(flip)] for i, _, _, flip in picks])
        return vae.scale * sample_posterior(m[:, 0], m[:, 1], generator=rng)


def resume_key(cfg: LoRARunConfig, base_sha256: str | None, images: TrainImages) -> dict:
    key = {k: v for k, v in as_dict(cfg).items() if k in _RESUME_FIELDS}
    key["base_sha256"] = base_sha256
    key["images"] = images.fingerprint()
    return key


LOG_HEADER = "step,epoch,loss,lr\n"
_STATE_KEYS = ("key", "step", "order", "lora", "optimizer", "scaler", "rng")


def _read_state(path: Path) -> dict:
    """The resumable state that `save_state` wrote, or a MeddapError naming the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torn by a crash, or not a plain-tensor file
        raise MeddapError(f"resume checkpoint {path} cannot be read ({type(e).__name__}); "
                          f"delete it to restart this run from step 0.") from e
    if not isinstance(state, dict) or not set(_STATE_KEYS) <= set(state):
        raise MeddapError(f"resume checkpoint {path} is not a train-lora state (one holds the entries "
                          f"{', '.join(_STATE_KEYS)}); delete it to restart this run from step 0.")
    return state


def resume(out: Path, key: dict, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
           scaler: torch.amp.GradScaler, rng: torch.Generator, device: torch.device) -> tuple[int, torch.Tensor]:
    """Load `out/train_state.pt` into the adapters, optimizer, scaler and generators if it
    exists, and cut log.csv back to its step. Returns (step, this epoch's data order)."""
    step, order = 0, torch.empty(0, dtype=torch.long)
    if (out / STATE_FILE).exists():
        state = _read_state(out / STATE_FILE)
        if state["key"] != key:
            changed = sorted(k for k in key if state["key"].get(k) != key[k])
            raise MeddapError(f"{out / STATE_FILE} belongs to a run with other settings "
                              f"(differs in: {', '.join(changed)}); use a new --out folder or "
                              f"the same settings to resume.")
        with torch.no_grad():
            for p, saved in zip(params, state["lora"]):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_states(rng, state["rng"], device)
        step, order = state["step"], state["order"]
    # A killed run may have logged past its last checkpoint; those steps are run again.
    truncate_log(out / LOG_FILE, LOG_HEADER, keep=lambda row: int(row[0]) <= step)
    return step, order


def write_state(out: Path, key: dict, step: int, order: torch.Tensor, params: list[torch.Tensor],
                optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, rng: torch.Generator,
                device: torch.device) -> None:
    """Write the resumable state `out/train_state.pt` (atomically): what `resume` reads."""
    state = {"key": key, "step": step, "order": order,
             "lora": [p.detach().cpu().clone() for p in params],
             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
             "rng": _rng_states(rng, device)}
    save_torch_atomic(state, out / STATE_FILE)


def caption_rows(images: TrainImages, batch: torch.Tensor, caption_dropout: float,
                 rng: torch.Generator) -> torch.Tensor:
    """Each row's line of `embed_prompts`, (B,) int64 on the CPU: its class, or with
    probability `caption_dropout` the empty prompt's. Draws B uniforms from `rng` only
    when caption_dropout > 0."""
    rows = images.labels[batch]                                      # (B,) class index
    if caption_dropout > 0:                                          # caption dropout (not in the paper)
        dropped = torch.rand(len(batch), generator=rng) < caption_dropout
        rows = torch.where(dropped, images.empty_row, rows)
    return rows


def lora_inputs(vae, schedule, images: TrainImages, contexts: torch.Tensor, batch: torch.Tensor,
                rng: torch.Generator, device: torch.device, caption_dropout: float = 0.0):
    """The UNet's inputs of MEDDAP Eq. 1 for the images `batch` (B,): (z_t, t, ε, τ(c)).

    Draws from `rng`, in this order: each image's crop and flip, the posterior
    noise η, t ~ U{0..999}, ε, then (caption_dropout > 0 only) each row's dropout;
    all on the CPU. contexts: `embed_prompts`' (n_classes + 1, 77, C) on `device`.
    z_t, ε: (B, 4, h, w) float32 on `device`; t: (B,) on the CPU; τ(c): (B, 77, C).
    """
    z0 = images.latents(batch, vae, rng)                            # (B, 4, h, w) float32, scaled
    t = torch.randint(0, schedule.num_timesteps, (len(batch),), generator=rng)  # t ~ U{0..999}
    noise = torch.randn(z0.shape, generator=rng).to(device)          # ε ~ N(0, I), drawn on the CPU
    z_t = schedule.q_sample(z0, t, noise)                            # (B, 4, h, w)
    rows = caption_rows(images, batch, caption_dropout, rng)         # (B,)
    # index_select, not contexts[rows]: with new tokens the contexts carry gradients, and the
    # backward of advanced indexing (index_put_ with accumulate) sums rows in a thread-dependent
    # order on the CPU, which made two runs differ; index_select's (index_add_) does not.
    context = contexts.index_select(0, rows.to(contexts.device))    # (B, 77, C)
    return z_t, t, noise, context


def lora_loss(sd, schedule, images: TrainImages, contexts: torch.Tensor, batch: torch.Tensor,
              rng: torch.Generator, device: torch.device, dtype: torch.dtype,
              caption_dropout: float = 0.0) -> torch.Tensor:
    """MEDDAP Eq. 1 on the images `batch` (B,): the 0-d float32 loss on `device`.

    The inputs and their draws are `lora_inputs`'; the UNet runs in `dtype`, the loss in float32.
    """
    z_t, t, noise, context = lora_inputs(sd.vae, schedule, images, contexts, batch, rng, device,
                                         caption_dropout)
    eps = sd.unet(z_t.to(dtype), t.to(device), context)             # (B, 4, h, w)
    return F.mse_loss(eps.float(), noise)                           # MEDDAP Eq. 1


def clip_gradients(params: list[torch.Tensor]) -> None:
    """Scale the gradients of `params` so that their joint 2-norm is at most MAX_GRAD_NORM
    (the authors' --max_grad_norm), with torch's multi-tensor norm on the CPU and CUDA
    (torch picks its per-tensor loop on the CPU; there is no multi-tensor norm on `meta`)."""
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM,
                                   foreach=params[0].device.type in ("cpu", "cuda") or None)


def apply_gradients(loss: torch.Tensor, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler) -> None:
    """One AdamW update of the adapters `params` from `loss`: backward of the scaled loss,
    unscale, clip the gradients' norm to MAX_GRAD_NORM, step, update the scale. With fp16
    the scaler skips the step when a gradient is inf or NaN (and lowers its scale)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)                                      # clip the true gradients
    clip_gradients(params)
    scaler.step(optimizer)
    scaler.update()


@dataclass
class Update:
    """The adapters' update rule, built once by `make_update`: `update(loss)` is
    apply_gradients with this AdamW and loss scaler; `capture` says whether the fast
    step records it in a CUDA graph."""
    params: list[torch.Tensor]
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    capture: bool

    def __call__(self, loss: torch.Tensor) -> None:
        apply_gradients(loss, self.params, self.optimizer, self.scaler)

    def fast_step(self, sd, schedule, images, contexts, batch_size: int, device: torch.device,
                  dtype: torch.dtype, caption_dropout: float = 0.0) -> FastStep:
        """The same step on static buffers (meddap.lora.fast), applying this update."""
        return FastStep(sd, schedule, images, contexts, self, batch_size, device, dtype, self.capture,
                        caption_dropout)


def make_update(params: list[torch.Tensor], lr: float, device: torch.device, loss_scaling: bool,
                fast: bool, gradient_checkpointing: bool = False) -> Update:
    """train_lora's AdamW (the authors' betas, eps and weight decay; torch's multi-tensor
    implementation, fused on CUDA with `fast`, and capturable when the fast step is
    captured) and its loss scaler (on with fp16 only)."""
    capture = fast and will_capture(device, loss_scaling, gradient_checkpointing)
    optimizer = make_optimizer(params, lr, ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY, fused=fast,
                               capturable=capture)
    return Update(params, optimizer, torch.amp.GradScaler(device.type, enabled=loss_scaling), capture)


def training_device(cfg: LoRARunConfig, label: Label) -> tuple[torch.device, torch.dtype]:
    """Check `cfg`, pin cuDNN, and resolve the device and the base model's dtype."""
    validate(cfg, label)   # a config built in Python has not been checked yet
    device = resolve_device(cfg.device, label("device"))
    pin_cudnn()                            # the same convolution algorithms in every run
    if cfg.mixed_precision is not MixedPrecision.NO and device.type != "cuda":
        raise MeddapError(f"{label('mixed_precision')} {cfg.mixed_precision.value} needs a CUDA device; "
                          f"on {device} training runs in float32 ({label('mixed_precision')} no).")
    return device, resolve_dtype(cfg.mixed_precision.dtype_name, device, label("mixed_precision"))


def planned_steps(cfg: LoRARunConfig, n_images: int) -> tuple[int, int]:
    """(steps per epoch, steps in all) of a run over `n_images` images."""
    steps_per_epoch = -(-n_images // cfg.batch_size)             # ceil: the last batch may be short
    total = cfg.epochs * steps_per_epoch
    return steps_per_epoch, total if cfg.max_steps is None else min(total, cfg.max_steps)


def train_lora(cfg: LoRARunConfig, label: Label = cli_label) -> Path:
    """Train adapters as configured; resume from `out/train_state.pt` if present.
    Returns the path of the final adapter file `out/lora.safetensors`.

    label: how errors name a setting: cli_label ("--max-steps") for `meddap train-lora`,
    settings.toml_label("lora") ("[lora] max_steps") for `meddap run`.
    """
    from meddap.models.stable_diffusion import load_stable_diffusion
    from meddap.sampling.schedule import NoiseSchedule

    device, dtype = training_device(cfg, label)
    image_set = resolve_training_images(cfg.data)   # cheap listing checks before the big load
    out = Path(cfg.out)

    # 1. Load the base model (frozen weights in the training dtype).
    sd = load_stable_diffusion(cfg.checkpoint, device=device, dtype=dtype)
    schedule = NoiseSchedule.sd_v1()

    # 2. Freeze everything: VAE, text encoder, UNet.
    sd.requires_grad_(False)

    # 3. Inject adapters (float32, trainable) into the UNet; their init is the
    # first draw of the run's one generator.
    rng = torch.Generator().manual_seed(cfg.seed)
    inject_lora(sd.unet, cfg.rank, cfg.alpha, cfg.targets, generator=rng)
    params = lora_parameters(sd.unet)
    sd.unet.gradient_checkpointing = cfg.gradient_checkpointing

    # 4. Data: decode and resize every image now (an unreadable one stops the run
    # before anything is written), embed one prompt per class, optionally cache latents.
    images = TrainImages(image_set, cfg.resolution, show_progress=cfg.show_progress)
    contexts = images.embed_prompts(sd.text_encoder, cfg.as_released)   # (n_classes + 1, 77, C)
    if cfg.cache_latents:
        images.cache_latents(sd.vae, show_progress=cfg.show_progress)
    new = start_new_tokens(sd, cfg, images, device, label) if cfg.new_tokens else None
    if new is not None:
        params = params + [new.rows]                                     # trained with the adapters

    update = make_update(params, cfg.lr, device, loss_scaling=cfg.mixed_precision is MixedPrecision.FP16,
                         fast=cfg.fast, gradient_checkpointing=cfg.gradient_checkpointing)
    optimizer, scaler = update.optimizer, update.scaler
    steps_per_epoch, total = planned_steps(cfg, len(images))
    key = resume_key(cfg, sd.source_sha256, images)

    step, order = resume(out, key, params, optimizer, scaler, rng, device)

    def save_state() -> None:
        write_state(out, key, step, order, params, optimizer, scaler, rng, device)

    def eager_step(batch: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        ctx = contexts if new is None else images.embed_prompts(sd.text_encoder, cfg.as_released, new)
        loss = lora_loss(sd, schedule, images, ctx, batch, rng, device, dtype, cfg.caption_dropout)
        update(loss)
        return loss

    fast_step = None
    if cfg.fast:   # the same step on static buffers, checked against eager_step (meddap.lora.fast)
        static = update.fast_step(sd, schedule, images, contexts, cfg.batch_size, device, dtype,
                                  cfg.caption_dropout)
        fast_step = SelfCheckedStep(static, eager_step, params, optimizer, scaler)

    # 5. Loop: MEDDAP Eq. 1 on one batch per step.
    bar = Progress(total=total, initial=step, desc="train-lora", enabled=cfg.show_progress)
    with open(out / LOG_FILE, "a", encoding="utf-8") as log:
        ring = LossRing(log, cfg.lr, LOG_EVERY, device) if fast_step is not None else None
        while step < total:
            epoch, position = divmod(step, steps_per_epoch)
            if position == 0:
                order = torch.randperm(len(images), generator=rng)  # a fresh data order each epoch
            batch = order[position * cfg.batch_size:(position + 1) * cfg.batch_size]
            # A short last batch takes the eager step: a CUDA graph has one shape.
            use_fast = fast_step is not None and len(batch) == cfg.batch_size
            loss = (fast_step if use_fast else eager_step)(batch, rng)
            step += 1
            checkpoint = step % cfg.checkpoint_every == 0 or step == total
            if ring is None:
                value = loss.item()                                 # the step's one wait for the device
                log.write(f"{step},{epoch},{value:.6g},{cfg.lr:g}\n")
                log.flush()
            else:   # the rows reach log.csv before the state that follows them
                value = ring.flush() if ring.add(step, epoch, loss) or checkpoint else None
            bar.update(1, postfix=None if value is None else f"loss {value:.4f}")
            if checkpoint:
                save_state()
            if cfg.validate_every and step % cfg.validate_every == 0:
                _validate(sd, cfg, images, step, out / VALIDATION_DIR, device, new)
    bar.close()

    # 6. Save the adapters (atomically) with their provenance.
    return save_adapters(sd, cfg, device, step, new)


def start_new_tokens(sd, cfg: LoRARunConfig, images: TrainImages, device: torch.device,
                     label: Label) -> NewTokens:
    """The new-token rows of this run (meddap.lora.new_tokens), or an error naming the base
    when it does not say which rows it trained."""
    from meddap.pretrain.train import trained_token_ids

    trained = trained_token_ids(cfg.checkpoint, sd.text_encoder, show_progress=cfg.show_progress)
    if trained is None:
        raise MeddapError(f"{label('new_tokens')}: the base {cfg.checkpoint} does not say which token "
                          f"rows its text tower trained (meddap's tiny base does, in its pretrain_* "
                          f"metadata); SD v1.4's tower trained them all. Turn {label('new_tokens')} off.")
    return NewTokens.start(sd.text_encoder, trained, images.prompts(cfg.as_released), cfg.seed, device)


def save_adapters(sd, cfg: LoRARunConfig, device: torch.device, step: int,
                  new: NewTokens | None = None) -> Path:
    """Write `out/lora.safetensors` (atomically) with its provenance (and the new-token
    rows, if any); return its path."""
    path = Path(cfg.out) / ADAPTER_FILE
    args = {**as_dict(cfg), "device": str(device)}   # the device it ran on (cfg.device None: auto)
    save_lora(sd.unet, path, {"targets": args["targets"], "base_sha256": sd.source_sha256,
                              "base_config": sd.config.name, "training_args": args, "step": step},
              new_tokens=None if new is None else (new.ids, new.rows.detach().cpu()))
    return path


@torch.no_grad()
def _validate(sd, cfg: LoRARunConfig, images: TrainImages, step: int, folder: Path,
              device: torch.device, new: NewTokens | None = None) -> None:
    """Sample one image per validation prompt with fixed seeds (image_seed(seed, i))
    and write `validation/step_{step}_{i}.png`, with this step's new-token rows if any.
    The global RNG and the base's rows are left as they were."""
    from meddap.sampling.text_to_image import generate, image_seed, write_png

    prompts = list(cfg.validation_prompts) or images.prompts(cfg.as_released)
    seeds = [image_seed(cfg.seed, i) for i in range(len(prompts))]
    weight = sd.text_encoder.token_embedding.weight
    base_rows = None if new is None else weight[new.ids.to(weight.device)].clone()
    if new is not None:
        apply_new_tokens(sd.text_encoder, new.ids, new.rows.detach(), source="this run")
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            results = generate(sd, prompts, seeds, steps=cfg.validation_steps, guidance=VALIDATION_GUIDANCE,
                               height=cfg.resolution, width=cfg.resolution, show_progress=False)
    finally:
        if new is not None:
            apply_new_tokens(sd.text_encoder, new.ids, base_rows, source="this run")
    for i, r in enumerate(results):
        write_png(folder / f"step_{step:07d}_{i:02d}.png", r.image, {**r.metadata, "train_step": step})
