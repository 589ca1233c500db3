"""Peak GPU memory of each meddap stage, computed on the CPU: no GPU is needed, none is measured.

    python scripts/estimate_memory.py                      # SD v1.4 shapes, as in the README's table
    python scripts/estimate_memory.py --quick              # the tiny config (tests/test_estimate_memory.py)
    python scripts/estimate_memory.py --markdown table.md  # also write the Markdown table

How. The real meddap code runs on tensors without data: on torch's `meta` device,
or on a fake CUDA device (torch's FakeTensorMode; tensors carry shape, dtype and
device, every operator runs its shape function). `LiveMemory`, a dispatch mode,
sees every tensor an operator returns, adds the bytes of each storage the first
time it appears and subtracts them when the storage is freed (weakref.finalize on
the storage: views share one storage and are counted once; tensors that autograd
saves for the backward pass stay alive and stay counted). Each storage is rounded
up to 512 bytes, as PyTorch's CUDA caching allocator rounds its blocks, so `live`
is what torch.cuda.memory_allocated() would say and `peak` its maximum.

Not counted: the CUDA context and cuBLAS/cuDNN workspaces, the caching allocator's
cached-but-unused blocks and fragmentation, memory of other processes. A stage
FITS a card when peak · (1 + MARGIN_FRACTION) + MARGIN_BYTES ≤ the card's memory.

Stages (random weights of the config, built by meddap.models.stable_diffusion):
  lora_*      one `meddap train-lora` step: meddap.lora.train.lora_loss, then
              apply_gradients (backward, clipping, AdamW), run twice on the `meta`
              device so that the second step holds AdamW's state; the peak of the
              second step. The base in fp16 (adapters fp32) or fp32; GradScaler off
              (its state is two scalars). Exact: the backward pass runs here, with
              one exception: meddap.models.attention.GroupNorm32 picks its road by
              device type, and on `meta` it takes the CPU one, which in fp16 upcasts
              to float32 (two float32 temporaries, and the float32 copy saved for
              backward) where CUDA's kernel does not; the fp16 figures are therefore
              upper bounds. fp32 is the same road on both.
  generate_*  the UNet call of one guided sampler step (batch 2B) and the VAE decode
              of the B latents, on the fake CUDA device, the decode slices chosen by
              meddap's own rule (`AutoencoderKL.decode_slice_size`) with
              torch.cuda.mem_get_info answering a card's size minus CUDA_CONTEXT_BYTES
              minus what is live. The whole model (UNet, VAE, text encoder) is resident.
  classify_*  one `meddap classify train` step at 224 px, batch 32, fp16 autocast, on
              the fake CUDA device. The fake device cannot run a backward pass (the
              autograd engine asks the driver for the device), so the forward runs
              with grad enabled (live at the loss = weights + the activations kept for
              backward) and the rest is a stated estimate:
                  live at the loss + gradients (fp32, one per parameter value)
                  + Adam's exp_avg and exp_avg_sq (fp32, two per parameter value)
                  + 2 x the largest storage of the forward pass (the gradient leaving
                  and the gradient entering the largest layer of the backward)
              or, if larger, the forward peak + the last step's gradients + Adam's
              state (classify train clears the gradients after the forward). The `lora_*` stages report the same estimate beside their measured
              peak (`estimate_check`), which shows how close it comes.

Attention. On the fake and meta devices torch's scaled_dot_product_attention falls
back to its math kernel, which materialises softmax(QK^T) (B·heads·T² values). On a
CUDA GPU it picks a fused kernel that does not: flash attention for fp16/bf16 with a
head width of at most 256 (sm80 and newer), else memory-efficient attention. Patch
(inside `fused_attention` only): scaled_dot_product_attention is routed to those
kernels' own operators, whose shape functions return what the GPU kernels return
(the output and the per-row log-sum-exp), so the count is the GPU's.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import weakref
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

GiB = 2**30
CARDS_GIB = (8, 12, 16, 24, 80)
MARGIN_FRACTION = 0.10                  # allocator rounding to segments, fragmentation, workspaces
MARGIN_BYTES = GiB // 2                 # the CUDA context with cuBLAS and cuDNN loaded
CUDA_CONTEXT_BYTES = GiB // 2           # taken off a card before meddap's decode rule sees it
ALLOCATOR_BLOCK = 512                   # CUDACachingAllocator rounds every block up to 512 bytes
FLASH_MAX_HEAD_DIM = 256                # flash attention's largest head width (torch sdp_utils)

# The targets: busi-sd14 generation, batch 8 at 512 px, fits 8 GiB in fp16 and 12 GiB in fp32.
TARGETS = {"generate_512_b8_fp16": 8, "generate_512_b8_fp32": 12}


class LiveMemory(TorchDispatchMode):
    """Bytes of live tensor storage on one device type, and the peak since `reset_peak`.

    A storage is counted once, when an operator first returns a tensor on it, rounded
    up to a multiple of `block` bytes, and subtracted when it is freed. Storages made
    before the mode was entered are not seen. `largest` is the largest storage made
    since `reset_peak`.
    """

    def __init__(self, device_type: str, block: int = ALLOCATOR_BLOCK):
        super().__init__()
        self.device_type, self.block = device_type, block
        self.live = self.peak = self.largest = 0
        self._bytes: dict[int, int] = {}          # storage id -> bytes counted for it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = storage._cdata
        size = -(-storage.nbytes() // self.block) * self.block
        old = self._bytes.get(key)
        if old is None:
            weakref.finalize(storage, self._free, key)
        elif old == size:
            return
        self._bytes[key] = size                   # new, or resized in place (resize_)
        self.live += size - (old or 0)
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, size)

    def _free(self, key: int) -> None:
        self.live -= self._bytes.pop(key)

    def reset_peak(self) -> None:
        self.peak, self.largest = self.live, 0

    @contextlib.contextmanager
    def window(self):
        """Yields a dict that gets `peak` (the peak inside the block) and `largest`; the
        overall peak still sees the block."""
        outer_peak, outer_largest = self.peak, self.largest
        self.peak, self.largest = self.live, 0
        record = {"start": self.live}
        try:
            yield record
        finally:
            record.update(peak=self.peak, largest=self.largest, end=self.live)
            self.peak, self.largest = max(outer_peak, self.peak), max(outer_largest, self.largest)


class _RealCPU(TorchDispatchMode):
    """Above the fake mode: an operator whose inputs are all real and that names no CUDA
    device runs for real on the CPU (tokenizer ids, schedules, the training draws)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        names_cuda = any(isinstance(x, torch.device) and x.type == "cuda" for x in leaves)
        if not names_cuda and not any(isinstance(x, FakeTensor) for x in leaves):
            with _disable_current_modes():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


class fused_attention(TorchFunctionMode):
    """Patch: F.scaled_dot_product_attention as a CUDA GPU runs it (see the module docstring).

    q, k, v: (B, heads, T, d) -> (B, heads, T_q, d). fp16/bf16 with d ≤ 256: flash
    attention; otherwise memory-efficient attention (it keeps the log-sum-exp only
    when a gradient is needed). Both save q, k, v, the output and the log-sum-exp
    (B, heads, T_q) float32 for the backward pass; neither forms the T_q x T_kv matrix.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        if kwargs or len(args) != 3:
            raise NotImplementedError("fused_attention: only scaled_dot_product_attention(q, k, v), as "
                                      "meddap.models.attention calls it, is routed.")
        q, k, v = args
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= FLASH_MAX_HEAD_DIM:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]
        grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, grad)[0]


@contextlib.contextmanager
def fake_cuda():
    """A fake CUDA device (no driver); `card` patches what torch.cuda.mem_get_info answers."""
    with FakeTensorMode(allow_non_fake_inputs=True), _RealCPU():
        yield


@contextlib.contextmanager
def card(free_bytes: int, total_bytes: int):
    """torch.cuda.mem_get_info answers (free_bytes, total_bytes) inside the block."""
    with mock.patch("torch.cuda.mem_get_info", lambda device=None: (free_bytes, total_bytes)):
        yield


def cuda_autocast(dtype: torch.dtype) -> torch.autocast:
    """torch.autocast("cuda", dtype) although no driver is loaded (is_available() is patched
    to True while the context object is built, and only then)."""
    with mock.patch("torch.cuda.is_available", return_value=True):
        return torch.autocast("cuda", dtype=dtype)


def gib(n: int) -> float:
    return round(n / GiB, 3)


def record(peak: int, counted: str, **parts) -> dict:
    return {"bytes": peak, "gib": gib(peak), "counted": counted, **parts}


def fits(peak: int, card_gib: int) -> bool:
    return peak * (1 + MARGIN_FRACTION) + MARGIN_BYTES <= card_gib * GiB


# ---------------------------------------------------------------- stages

def build_sd(config: str, device: str, dtype: torch.dtype):
    """Random SD weights of `config` made on `device` in `dtype`, frozen: build_stable_diffusion's
    model, with `dtype` as the default dtype while it is made instead of a cast afterwards
    (Module.to cannot swap fake parameters, and a cast would hold an fp32 copy for a moment)."""
    from meddap.models.config import get_config
    from meddap.models.stable_diffusion import StableDiffusion

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            sd = StableDiffusion(get_config(config))
    finally:
        torch.set_default_dtype(previous)
    return sd.eval().requires_grad_(False)


def training_images(folder: Path, side: int):
    """TrainImages of one grey side x side image per class (the data's values do not matter)."""
    from meddap.data.datasets import resolve_training_images
    from meddap.lora.train import TrainImages

    for label in ("benign", "malignant", "normal"):
        (folder / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(folder / label / f"{label}.png")
    return TrainImages(resolve_training_images(str(folder)), side, show_progress=False)


def lora_step(config: str, side: int, dtype: torch.dtype, scratch: Path) -> dict:
    """Two train-lora steps on the meta device (batch 1, the paper's rank, alpha, targets, lr)."""
    from meddap.lora.adapter import inject_lora, lora_parameters
    from meddap.lora.train import (ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY, LoRARunConfig, apply_gradients,
                                   lora_loss)
    from meddap.sampling.schedule import NoiseSchedule

    paper = LoRARunConfig(checkpoint="", data="", out="")
    images = training_images(scratch / f"lora_{side}", side)
    meta = torch.device("meta")
    mem = LiveMemory("meta")
    with mem:
        sd = build_sd(config, "meta", dtype)
        rng = torch.Generator().manual_seed(paper.seed)
        inject_lora(sd.unet, paper.rank, paper.alpha, paper.targets, generator=rng)   # float32 adapters
        params = lora_parameters(sd.unet)
        mem.reset_peak()
        weights = mem.live
        contexts = images.embed_prompts(sd.text_encoder, as_released=False)          # (3, 77, D)
        optimizer = torch.optim.AdamW(params, lr=paper.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                      weight_decay=ADAM_WEIGHT_DECAY)
        scaler = torch.amp.GradScaler("meta", enabled=False)     # loss scaling reads values (.item())
        steps = []
        with fused_attention():
            for step in range(2):                                 # step 2 holds AdamW's state
                with mem.window() as whole:
                    with mem.window() as forward:      # lora_loss: VAE encode, UNet forward, loss
                        loss = lora_loss(sd, NoiseSchedule.sd_v1(), images, contexts, torch.tensor([step]),
                                         rng, meta, dtype)
                    at_loss = mem.live
                    apply_gradients(loss, params, optimizer, scaler)
                    del loss
                steps.append((whole, forward, at_loss))
        whole, forward, at_loss = steps[-1]
        adapter_bytes = sum(p.numel() * p.element_size() for p in params)
    optimizer_state = 2 * adapter_bytes
    estimate = at_loss + adapter_bytes + optimizer_state + 2 * forward["largest"]
    upper = (" (an upper bound: on `meta` GroupNorm32 upcasts fp16 to float32, as on the CPU; CUDA's kernel "
             "does not)") if dtype != torch.float32 else ""
    return record(
        whole["peak"], "measured: weights (UNet, VAE, text encoder; adapters fp32) + the step's peak: VAE "
        "encode, UNet forward with saved activations, backward, gradient clipping, AdamW with its state" + upper,
        weights_bytes=weights, adapter_bytes=adapter_bytes, adamw_state_bytes=optimizer_state,
        loss_peak_bytes=forward["peak"], live_at_loss_bytes=at_loss,
        estimate_check={"bytes": estimate, "gib": gib(estimate),
                        "formula": "live at the loss + gradients + AdamW state + 2 x largest forward storage"})


def generation(config: str, side: int, batches: tuple[int, ...], dtype: torch.dtype,
               cards: tuple[int, ...]) -> dict[int, dict]:
    """Per batch size B: the UNet call of one guided step and the sliced VAE decode, on the fake
    CUDA device, with one model."""
    mem = LiveMemory("cuda")
    with fake_cuda(), mem, torch.no_grad():
        sd = build_sd(config, "cuda", dtype)
        mem.reset_peak()
        with fused_attention():
            return {batch: _generation_batch(sd, mem, side, batch, cards) for batch in batches}


def _generation_batch(sd, mem: LiveMemory, side: int, batch: int, cards: tuple[int, ...]) -> dict:
    from meddap.sampling.text_to_image import encode_prompts, guided_eps

    weights = mem.live
    _, uncond = encode_prompts(sd, [""])                                     # (1, 77, D)
    _, cond = encode_prompts(sd, ["benign"] * batch)                         # (B, 77, D)
    eps_fn = guided_eps(sd.unet, uncond.expand(batch, -1, -1), cond, 7.5)
    z = torch.randn(batch, 4, side // 8, side // 8, device="cuda", dtype=torch.float32)  # (B, 4, h, w)
    t = torch.full((batch,), 981, device="cuda")
    with mem.window() as unet_step:
        eps = eps_fn(z, t)                                                   # (B, 4, h, w)
    z0 = z - eps                                                             # a sampler's update
    del eps
    decode_input = (z0 / sd.vae.scale).to(sd.dtype)       # as text_to_image.latents_to_images
    decodes, peak_of_slice = {}, {}
    for size in cards:
        free = size * GiB - CUDA_CONTEXT_BYTES - mem.live
        with card(max(free, 0), size * GiB):
            slice_size = sd.vae.decode_slice_size(decode_input)               # what decode(z) picks
            if slice_size not in peak_of_slice:
                with mem.window() as decode:
                    sd.vae.decode(decode_input).float()                        # (B, 3, H, W), dropped
                peak_of_slice[slice_size] = decode["peak"]
        peak = max(unet_step["peak"], peak_of_slice[slice_size])
        decodes[str(size)] = {"slice_size": slice_size, "decode_peak_bytes": peak_of_slice[slice_size],
                              "decode_peak_gib": gib(peak_of_slice[slice_size]), "stage_peak_bytes": peak,
                              "fits": fits(peak, size)}
    return record(
        max(d["stage_peak_bytes"] for d in decodes.values()),
        "measured: weights (UNet, VAE, text encoder) + text states + the larger of one guided UNet call on "
        "2B rows and the VAE decode; `bytes` on the largest card, `by_card` with the slices meddap picks "
        "on each card (PNDM's four stored eps, B x 4 x h x w float32 each, not counted)",
        weights_bytes=weights, unet_step_peak_bytes=unet_step["peak"], by_card=decodes)


def classifier_step(arch_name: str, side: int, batch: int, classes: int = 3) -> dict:
    """A classify-train forward under fp16 autocast with grad enabled, plus the stated estimate."""
    from meddap.classify.networks import build_network, parse_arch
    from meddap.classify.train import normalise

    mem = LiveMemory("cuda")
    with fake_cuda(), mem:
        model = build_network(parse_arch(arch_name), classes).to("cuda").train()
        param_bytes = sum(p.numel() * 4 for p in model.parameters())
        x_u8 = torch.zeros(batch, 3, side, side, dtype=torch.uint8, device="cuda")   # (B, 3, S, S)
        y = torch.zeros(batch, dtype=torch.long, device="cuda")
        mem.reset_peak()
        weights = mem.live
        with mem.window() as forward:                        # no attention in these networks
            with cuda_autocast(torch.float16):
                logits = model(normalise(x_u8))                                    # (B, k)
                loss = F.cross_entropy(logits.float(), y)
        at_loss = mem.live
        del loss, logits
    estimate = at_loss + param_bytes + 2 * param_bytes + 2 * forward["largest"]
    return record(
        max(estimate, forward["peak"] + 3 * param_bytes),
        "estimated, the larger of: measured live at the loss (weights, inputs, activations saved by autograd "
        "under fp16 autocast) + gradients + Adam state (fp32) + 2 x largest forward storage (the backward's "
        "transient); the measured forward peak + the last step's gradients + Adam state",
        weights_bytes=weights, forward_peak_bytes=forward["peak"], live_at_loss_bytes=at_loss,
        gradient_bytes=param_bytes, adam_state_bytes=2 * param_bytes)


# ---------------------------------------------------------------- the report

def estimate(quick: bool) -> dict:
    config = "tiny" if quick else "sd-v1.4"
    lora_sides, gen_side, gen_batches, cls_side, cls_batch = (
        ((64,), 64, (1, 2), 64, 2) if quick else ((224, 512), 512, (1, 8), 224, 32))
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="meddap_memory_") as scratch:
        for side in lora_sides:
            for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
                stages[f"lora_{side}_{name}"] = lora_step(config, side, dtype, Path(scratch))
    for name, dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
        for batch, stage in generation(config, gen_side, gen_batches, dtype, CARDS_GIB).items():
            stages[f"generate_{gen_side}_b{batch}_{name}"] = stage
    for arch in ("resnet34", "squeezenet1.1", "densenet121"):
        stages[f"classify_{arch}_{cls_side}_b{cls_batch}_fp16"] = classifier_step(arch, cls_side, cls_batch)
    targets = {f"{name} fits {size} GiB": stages[name]["by_card"][str(size)]["fits"]
               for name, size in TARGETS.items() if name in stages}
    return {"config": config, "quick": quick, "torch": torch.__version__, "computed_not_measured": True,
            "margin": {"fraction": MARGIN_FRACTION, "bytes": MARGIN_BYTES,
                       "rule": "fits when peak x (1 + fraction) + bytes <= card"},
            "cuda_context_bytes": CUDA_CONTEXT_BYTES, "cards_gib": list(CARDS_GIB),
            "stages": stages, "targets": targets}


def stage_peak(stage: dict, size: int) -> int:
    """A stage's peak on a card of `size` GiB (generation's decode slices depend on the card)."""
    return stage["by_card"][str(size)]["stage_peak_bytes"] if "by_card" in stage else stage["bytes"]


def markdown_table(report: dict) -> str:
    cards = report["cards_gib"]
    lines = ["| stage | peak GiB | " + " | ".join(f"{c} GiB card" for c in cards) + " |",
             "|---|---:|" + "---|" * len(cards)]
    for name, stage in report["stages"].items():
        cells = []
        for size in cards:
            ok = "yes" if fits(stage_peak(stage, size), size) else "no"
            if "by_card" in stage:
                ok += f" (slice {stage['by_card'][str(size)]['slice_size']}, {gib(stage_peak(stage, size))})"
            cells.append(ok)
        lines.append(f"| {name} | {stage['gib']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny config at small sizes (a test)")
    parser.add_argument("--markdown", type=Path, help="also write the fits-on-card table to this file")
    args = parser.parse_args(argv)
    report = estimate(args.quick)
    report["table"] = markdown_table(report)
    print(json.dumps(report, indent=2))
    if args.markdown is not None:
        args.markdown.write_text(report["table"], encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
