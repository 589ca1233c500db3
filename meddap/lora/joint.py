"""All folds' USLoRA runs in one pass over one frozen base model.

`train_lora_joint(cfgs)` trains the runs `cfgs` (one per fold: the same
settings but data, out and seed) together. The frozen SD weights are loaded
once; each adapted layer becomes a `MultiLoRALinear` that holds every fold's
adapters, and each row of a batch goes through its own fold's:

    y_b = W0 x_b + b0 + (α/r) · up_{f(b)} down_{f(b)} x_b        MEDDAP Eq. 3, per row

    code       symbol     shape
    x          x_b        (B, N, k)   B = the rows of all folds, fold by fold
    rows       f(b)       (B,)        the fold of each row
    down       down_f     (F, r, k)   every fold's lora_down, stacked
    up         up_f       (F, d, r)   every fold's lora_up, stacked

A step sums the folds' losses (MEDDAP Eq. 1, each over its own rows) and runs
one backward: the rows share no adapter, so fold f's gradient is the gradient
of its own loss. Everything else is per fold, as in its own `train_lora` run:
the generator (seeded with the fold's seed; it draws the adapter init, the
data order and every step's numbers in the same order), the AdamW state, the
clipping of the gradient norm, log.csv, train_state.pt (the same file, so a
fold may be resumed by either command) and lora.safetensors. Folds of
different sizes end at different steps; the others go on without them.

What is not the same: the UNet runs once on the batch of all folds, whose
kernels need not round as the batch of one fold does, so the adapters agree
with separate runs to float32 rounding, not bit for bit (the tests measure it).
Not supported (a clear error): --fast, fp16 loss scaling, validation images, new tokens.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from meddap.data.datasets import resolve_training_images
from meddap.errors import MeddapError
from meddap.lora.adapter import LoRALinear, find_targets
from meddap.lora.train import (LOG_FILE, LoRARunConfig, MixedPrecision, TrainImages, clip_gradients,
                               lora_inputs, make_update, planned_steps, resume, resume_key, save_adapters,
                               training_device, write_state)
from meddap.progress import Progress
from meddap.settings import Label, as_dict, cli_label

# The settings that may differ between the folds of one joint run.
PER_FOLD = ("data", "out", "seed")


class MultiLoRALinear(nn.Module):
    """The adapters of several folds around one frozen linear layer; row b uses fold rows[b]'s.

    x: (B, N, k) -> (B, N, d). Fold f's `LoRALinear` (its parameters, its init)
    is `folds[f]`; set `rows` (B,) before each forward (`set_rows`).
    """

    def __init__(self, folds: list[LoRALinear]):
        super().__init__()
        self.weight, self.bias = folds[0].weight, folds[0].bias   # W0, b0: shared, frozen
        self.folds = nn.ModuleList(folds)
        self.scaling = folds[0].scaling                          # α/r, formed in LoRALinear
        self.rows: torch.Tensor | None = None                    # (B,) fold of each row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)                                  # (B, N, d)
        down = torch.stack([m.lora_down for m in self.folds])[self.rows]        # (B, r, k)
        up = torch.stack([m.lora_up for m in self.folds])[self.rows]            # (B, d, r)
        h = torch.einsum("bnk,brk->bnr", x.float(), down)                       # (B, N, r)
        delta = torch.einsum("bnr,bdr->bnd", h, up)                             # (B, N, d)
        return y + (self.scaling * delta).to(y.dtype)     # float32 branch, as LoRALinear.forward


def set_rows(unet: nn.Module, rows: torch.Tensor) -> None:
    """Tell every MultiLoRALinear the fold of each row of the next batch, rows: (B,)."""
    for m in unet.modules():
        if isinstance(m, MultiLoRALinear):
            m.rows = rows


@contextmanager
def single_fold(unet: nn.Module, f: int):
    """While open, each MultiLoRALinear is replaced by fold f's LoRALinear (to save its adapters)."""
    multi = {n: m for n, m in unet.named_modules() if isinstance(m, MultiLoRALinear)}
    for name, m in multi.items():
        unet.set_submodule(name, m.folds[f])
    try:
        yield
    finally:
        for name, m in multi.items():
            unet.set_submodule(name, m)


def check_folds(cfgs: list[LoRARunConfig], label: Label) -> None:
    """The runs must differ only in PER_FOLD settings, write to distinct folders, and avoid
    what the joint step does not do."""
    if not cfgs:
        raise MeddapError("train_lora_joint needs at least one run config (one per fold).")
    shared = {k: v for k, v in as_dict(cfgs[0]).items() if k not in PER_FOLD}
    for i, cfg in enumerate(cfgs[1:], start=1):
        changed = sorted(k for k, v in as_dict(cfg).items() if k not in PER_FOLD and shared[k] != v)
        if changed:
            raise MeddapError(f"fold {i} ({cfg.out}) differs from fold 0 in: {', '.join(changed)}; the folds "
                              f"of one joint run share every setting but {', '.join(PER_FOLD)}.")
    outs = [str(Path(c.out).resolve()) for c in cfgs]
    if len(set(outs)) < len(outs):
        raise MeddapError(f"the folds of one joint run need distinct output folders; got {outs}.")
    cfg = cfgs[0]
    for name, unsupported in (("fast", cfg.fast), ("validate_every", cfg.validate_every > 0),
                              ("new_tokens", cfg.new_tokens),
                              ("mixed_precision", cfg.mixed_precision is MixedPrecision.FP16)):
        if unsupported:
            raise MeddapError(f"{label(name)} = {as_dict(cfg)[name]!r} is not supported when training "
                              f"folds jointly; train the folds one by one (meddap train-lora) for it.")


class Fold:
    """One fold's own part of a joint run: data, generator, adapters, optimizer, progress."""

    def __init__(self, cfg: LoRARunConfig, sd, names: list[str], base: dict[str, nn.Linear], device):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        # The init draws of inject_lora: one LoRALinear per target, in module order.
        self.layers = [LoRALinear(base[n], cfg.rank, cfg.alpha, self.rng) for n in names]
        self.params = [p for m in self.layers for p in (m.lora_down, m.lora_up)]
        self.images = TrainImages(resolve_training_images(cfg.data), cfg.resolution,
                                  show_progress=cfg.show_progress)
        self.contexts = self.images.embed_prompts(sd.text_encoder, cfg.as_released)  # (n_classes + 1, 77, C)
        if cfg.cache_latents:
            self.images.cache_latents(sd.vae, show_progress=cfg.show_progress)
        update = make_update(self.params, cfg.lr, device, loss_scaling=False, fast=False)   # check_folds
        self.optimizer, self.scaler = update.optimizer, update.scaler
        self.steps_per_epoch, self.total = planned_steps(cfg, len(self.images))
        self.key = resume_key(cfg, sd.source_sha256, self.images)
        self.step, self.order = resume(self.out, self.key, self.params, self.optimizer, self.scaler,
                                       self.rng, device)

    def next_batch(self) -> tuple[int, torch.Tensor]:
        """(epoch, image indices) of this fold's next step; a new epoch draws its order."""
        epoch, position = divmod(self.step, self.steps_per_epoch)
        if position == 0:
            self.order = torch.randperm(len(self.images), generator=self.rng)
        b = self.cfg.batch_size
        return epoch, self.order[position * b:(position + 1) * b]


def attach_folds(sd, cfgs: list[LoRARunConfig], device: torch.device) -> list[Fold]:
    """Steps 3 and 4 of a joint run: every fold's adapters (each drawn from its fold's
    generator, in module order) around the shared base layers, as MultiLoRALinear, and
    each fold's data, optimizer and resumed state."""
    names = find_targets(sd.unet, cfgs[0].targets)
    base = {n: sd.unet.get_submodule(n) for n in names}
    folds = [Fold(c, sd, names, base, device) for c in cfgs]
    for i, name in enumerate(names):
        sd.unet.set_submodule(name, MultiLoRALinear([fold.layers[i] for fold in folds]))
    return folds


def detach_folds(unet: nn.Module) -> None:
    """Undo attach_folds' wrapping: each MultiLoRALinear gives its place back to fold 0's
    LoRALinear (around the same base layer), which remove_lora can then take out."""
    for name, m in [(n, m) for n, m in unet.named_modules() if isinstance(m, MultiLoRALinear)]:
        unet.set_submodule(name, m.folds[0])


def joint_step(sd, schedule, folds: list[Fold], active: list[int], device: torch.device,
               dtype: torch.dtype) -> tuple[dict[int, int], dict[int, torch.Tensor]]:
    """One step of the folds `active`: one UNet call on all their rows, then each fold's
    clip and AdamW step on its own loss's gradient. Returns each fold's (epoch, loss)."""
    epochs, inputs = {}, {}
    for k in active:                                   # each fold draws from its own generator
        epochs[k], batch = folds[k].next_batch()
        inputs[k] = lora_inputs(sd.vae, schedule, folds[k].images, folds[k].contexts, batch,
                                folds[k].rng, device, folds[k].cfg.caption_dropout)
    z_t, t, _, context = (torch.cat([inputs[k][j] for k in active]) for j in range(4))
    rows = torch.cat([torch.full((len(inputs[k][1]),), k) for k in active]).to(device)   # (B,)
    set_rows(sd.unet, rows)
    eps = sd.unet(z_t.to(dtype), t.to(device), context)                              # (B, 4, h, w)
    losses, start = {}, 0
    for k in active:                                   # MEDDAP Eq. 1, each fold over its rows
        n = len(inputs[k][1])
        losses[k] = F.mse_loss(eps[start:start + n].float(), inputs[k][2])
        start += n
    for k in active:
        folds[k].optimizer.zero_grad(set_to_none=True)
    torch.stack(list(losses.values())).sum().backward()   # fold f's gradient: its own loss's
    for k in active:                                   # apply_gradients' clip and step, per fold
        clip_gradients(folds[k].params)
        folds[k].optimizer.step()
        folds[k].step += 1
    return epochs, losses


def train_lora_joint(cfgs: list[LoRARunConfig], label: Label = cli_label) -> list[Path]:
    """Train every fold's adapters in one pass (see the module docstring); resume each fold
    from its `out/train_state.pt`. Returns each fold's `out/lora.safetensors`, in order."""
    from meddap.models.stable_diffusion import load_stable_diffusion
    from meddap.sampling.schedule import NoiseSchedule

    check_folds(cfgs, label)
    devices = [training_device(cfg, label) for cfg in cfgs]   # validates each fold's config
    device, dtype = devices[0]

    # 1. Load the shared base model; 2. freeze it.
    cfg = cfgs[0]
    sd = load_stable_diffusion(cfg.checkpoint, device=device, dtype=dtype)
    schedule = NoiseSchedule.sd_v1()
    sd.requires_grad_(False)

    # 3. Inject every fold's adapters (each drawn from its fold's generator), then
    # 4. each fold's data, optimizer and resumable state.
    folds = attach_folds(sd, cfgs, device)
    sd.unet.gradient_checkpointing = cfg.gradient_checkpointing

    # 5. Loop: one UNet call on the rows of every fold that has steps left.
    bar = Progress(total=sum(f.total for f in folds), initial=sum(f.step for f in folds),
                   desc="train-lora (joint)", enabled=cfg.show_progress)
    logs = [open(f.out / LOG_FILE, "a", encoding="utf-8") for f in folds]
    try:
        while any(f.step < f.total for f in folds):
            active = [k for k, f in enumerate(folds) if f.step < f.total]
            epochs, losses = joint_step(sd, schedule, folds, active, device, dtype)
            for k in active:
                fold = folds[k]
                value = losses[k].item()
                logs[k].write(f"{fold.step},{epochs[k]},{value:.6g},{fold.cfg.lr:g}\n")
                logs[k].flush()
                if fold.step % fold.cfg.checkpoint_every == 0 or fold.step == fold.total:
                    write_state(fold.out, fold.key, fold.step, fold.order, fold.params, fold.optimizer,
                                fold.scaler, fold.rng, device)
            bar.update(len(active))
    finally:
        for log in logs:
            log.close()
    bar.close()

    # 6. Save each fold's adapters, as its own run would.
    paths = []
    for k, fold in enumerate(folds):
        with single_fold(sd.unet, k):
            paths.append(save_adapters(sd, fold.cfg, device, fold.step))
    return paths
