"""GPU readiness check: the model stack, FID features, LoRA training, generation, the
classifiers and `meddap expand` under torchrun, on one device, with random weights.

    python scripts/gpu_check.py                        # this machine's GPU: SD v1.4 shapes, 512 px
    python scripts/gpu_check.py --device cpu --quick   # the same code, tiny sizes (tests/test_gpu_check.py)

No weight files are needed: every network is randomly initialised from a fixed
seed (the SD ones by meddap.models.stable_diffusion.build_stable_diffusion).
It prints ONE JSON object and exits 1 when any section failed:

    {"ok", "device", "gpu", "torch", "cuda", "quick", "config", "sizes", "tolerances", "seconds",
     "sections": {name: {"ok", "seconds", ...measurements..., "failures": [...], "notes": [...],
                         ["error"]}}}

Sections, in order (a section that raises is recorded with its error and the others still run):
  parity         UNet, VAE, text encoder on the device vs the CPU in float32 with TF32 off,
                 and in float16 / bfloat16 (relative error ||a − b|| / ||b|| against the CPU's float32)
  fid_features   the FID network (standard) and the as-released ImageNet network: device vs CPU
                 with TF32 off, then with TF32 on to show its effect (recorded, not bounded)
  lora_training  steps of meddap.lora.train's step functions in fp32, fp16 (GradScaler: finite
                 losses, float32 adapter gradients, skipped steps counted) and bf16
  generation     one guided PNDM batch through TextToImage (no NaN in any UNet or VAE output),
                 with torch.cuda.max_memory_allocated
  classifiers    a few training steps of each architecture, with AMP on CUDA as classify train does
  torchrun       `python -m torch.distributed.run --nproc-per-node 2 -m meddap.cli expand ...` on a
                 tiny checkpoint (2 ranks on one device, gloo) vs a one-process run: same bytes
  diffusers      our UNet and VAE vs diffusers' on the device (skipped when diffusers is absent)
On the CPU the same code runs with the `tiny` config and smaller sizes; --quick cuts further.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Bounds on ||a − b|| / ||b|| against the CPU's float32 result.
# Loose for fp16 / bf16: random weights, and the rounding accumulates through the depth
# (the tiny UNet measured 1.7e-2 in fp16 and 3.2e-2 in bf16 on the CPU); a broken kernel gives ~1.
TOLERANCES = {"fp32": 1e-4, "fp16": 5e-2, "bf16": 2e-1, "diffusers_fp32": 1e-4}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT = "ultrasound image of benign tumor in the breast"


@dataclass(frozen=True)
class Sizes:
    config: str            # model config of the SD sections: "sd-v1.4" or "tiny"
    unet_latent: int       # UNet parity: latent side (pixels / 8)
    vae_px: int            # VAE parity: image side
    batch: int             # parity batch
    parity_dtypes: tuple[str, ...]
    fid_side: int          # input side of the FID networks (299 is theirs)
    fid_batch: int
    lora_px: int
    lora_steps: int
    gen_px: int
    gen_batch: int
    gen_steps: int
    cls_px: int
    cls_batch: int
    cls_steps: int
    expand_px: int
    expand_steps: int


GPU_SIZES = Sizes(config="sd-v1.4", unet_latent=32, vae_px=128, batch=2, parity_dtypes=tuple(DTYPES),
                  fid_side=299, fid_batch=4,
                  lora_px=224, lora_steps=20, gen_px=512, gen_batch=8, gen_steps=30,
                  cls_px=224, cls_batch=8, cls_steps=3, expand_px=64, expand_steps=4)
CPU_SIZES = Sizes(config="tiny", unet_latent=8, vae_px=64, batch=2, parity_dtypes=tuple(DTYPES),
                  fid_side=299, fid_batch=2,
                  lora_px=64, lora_steps=5, gen_px=64, gen_batch=2, gen_steps=5,
                  cls_px=64, cls_batch=2, cls_steps=1, expand_px=64, expand_steps=2)
QUICK = {"cuda": dict(lora_steps=5, gen_steps=10),
         "cpu": dict(parity_dtypes=("fp32",), fid_side=75, fid_batch=1, lora_steps=2, gen_steps=2,
                     cls_px=32)}     # 75 px: the smallest input of Inception v3


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a − b|| / ||b|| in float64, both moved to the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


from meddap.fid.inception import tf32   # noqa: E402  (TF32 on/off, restored after)


class Section(dict):
    """One section's record: measurements as keys, plus "failures" and "notes"."""

    def __init__(self):
        super().__init__(failures=[], notes=[])

    def bound(self, name: str, value: float, limit: float) -> None:
        """Record value under name; a failure unless it is at most limit (NaN fails)."""
        self[name] = value
        if not (math.isfinite(value) and value <= limit):
            self["failures"].append(f"{name} = {value:.3g} is not at most {limit:g}")

    def require(self, condition: bool, failure: str) -> None:
        if not condition:
            self["failures"].append(failure)


class Check:
    """What the sections share: the device, the sizes, one CPU model built once, a scratch folder."""

    def __init__(self, device: torch.device, sizes: Sizes, scratch: Path):
        self.device, self.sizes, self.scratch = device, sizes, scratch
        self.on_cuda = device.type == "cuda"
        self._cpu_sd = None

    def cpu_sd(self):
        """The random SD model of sizes.config on the CPU in float32 (seed 0), built on first use."""
        from meddap.models.stable_diffusion import build_stable_diffusion

        if self._cpu_sd is None:
            torch.manual_seed(0)
            self._cpu_sd = build_stable_diffusion(self.sizes.config).requires_grad_(False)
        return self._cpu_sd

    def device_sd(self, dtype: torch.dtype):
        """A copy of cpu_sd() on the device in dtype."""
        return copy.deepcopy(self.cpu_sd()).to(device=self.device, dtype=dtype)

    def phantom(self, side: int) -> Path:
        """Two phantom images per class at side x side pixels (meddap.data.phantom)."""
        from meddap.data.phantom import write_phantom

        folder = self.scratch / f"phantom_{side}"
        if not folder.exists():
            write_phantom(folder, seed=0, size=side, counts={"benign": 2, "malignant": 2, "normal": 2},
                          show_progress=False)
        return folder


# ---------------------------------------------------------------- sections

def parity(check: Check) -> Section:
    s, z = Section(), check.sizes
    ref = check.cpu_sd()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(z.batch, 4, z.unet_latent, z.unet_latent, generator=g)          # (B, 4, h, w)
    t = torch.tensor([999, 500, 37, 1][:z.batch])
    context = torch.randn(z.batch, 77, ref.config.unet.context_dim, generator=g)     # (B, 77, D)
    pixels = torch.rand(z.batch, 3, z.vae_px, z.vae_px, generator=g) * 2 - 1         # (B, 3, H, W)
    tokens = ref.text_encoder.tokenize([PROMPT, ""])                                 # (2, 77)

    def run(sd, dtype):
        with torch.no_grad():
            eps = sd.unet(x.to(sd.device, dtype), t, context.to(sd.device, dtype))
            mean, _ = sd.vae.encode(pixels.to(sd.device, dtype))
            decoded = sd.vae.decode(mean)
            states = sd.text_encoder(tokens)
        return {"unet": eps, "vae_encode": mean, "vae_decode": decoded, "text_encoder": states}

    with tf32(False):
        expected = run(ref, torch.float32)
        for name in z.parity_dtypes:
            dtype = DTYPES[name]
            sd = check.device_sd(dtype)
            got = run(sd, dtype)
            for part in expected:
                s.bound(f"{part}_{name}_rel_err", relative_error(got[part].float(), expected[part]),
                        TOLERANCES[name])
            del sd, got
    s["notes"].append(f"{', '.join(z.parity_dtypes)} weights and inputs against the CPU's float32, "
                      f"TF32 off")
    return s


def fid_features(check: Check) -> Section:
    from meddap.fid.inception import InceptionGraph, InceptionV3

    s, z = Section(), check.sizes
    g = torch.Generator().manual_seed(2)
    # Both networks take (N, 3, S, S) in [-1, 1]: pytorch-fid's preprocessing ends in 2x − 1 at 299 px,
    # the as-released one in Keras' x / 127.5 − 1.
    x = torch.rand(z.fid_batch, 3, z.fid_side, z.fid_side, generator=g) * 2 - 1
    graphs = {"standard": InceptionGraph.FID_TF2015, "as_released": InceptionGraph.IMAGENET_KERAS}
    for name, graph in graphs.items():
        torch.manual_seed(3)
        net = InceptionV3(graph).eval().requires_grad_(False)

        def features(model, on_tf32: bool) -> torch.Tensor:
            with tf32(on_tf32), torch.inference_mode():
                return model(x.to(next(model.parameters()).device), (2048,))[2048].float()   # (N, 2048)

        expected = features(net, False)
        on_device = copy.deepcopy(net).to(check.device)
        s.bound(f"{name}_tf32_off_rel_err", relative_error(features(on_device, False), expected),
                TOLERANCES["fp32"])
        if check.on_cuda:
            s[f"{name}_tf32_on_rel_err"] = relative_error(features(on_device, True), expected)
    s["notes"].append(f"random inputs of {z.fid_side} px" + (" (quick CPU run)" if z.fid_side != 299 else ""))
    s["notes"].append("tf32_on_rel_err (CUDA only) shows TF32's effect, recorded, not bounded; "
                      "meddap's FID passes run with TF32 off (meddap.fid.inception.tf32_off)")
    return s


def lora_training(check: Check) -> Section:
    from meddap.data.datasets import resolve_training_images
    from meddap.lora.adapter import inject_lora, lora_parameters
    from meddap.lora.train import (ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY, LoRARunConfig, MixedPrecision,
                                   TrainImages, apply_gradients, lora_loss)
    from meddap.sampling.schedule import NoiseSchedule

    s, z = Section(), check.sizes
    defaults = LoRARunConfig(checkpoint="", data="", out="")        # the paper's rank, alpha, lr, targets
    images = TrainImages(resolve_training_images(str(check.phantom(max(z.lora_px, 32)))), z.lora_px,
                         show_progress=False)
    schedule = NoiseSchedule.sd_v1()
    for mp in MixedPrecision:
        if mp is not MixedPrecision.NO and not check.on_cuda:
            s["notes"].append(f"{mp.dtype_name}: skipped, mixed precision needs CUDA (train_lora "
                              f"refuses it)")
            continue
        dtype = DTYPES[mp.dtype_name]
        sd = check.device_sd(dtype)
        rng = torch.Generator().manual_seed(defaults.seed)
        inject_lora(sd.unet, defaults.rank, defaults.alpha, defaults.targets, generator=rng)
        params = lora_parameters(sd.unet)
        before = [p.detach().clone() for p in params]
        contexts = images.embed_prompts(sd.text_encoder, as_released=False)
        optimizer = torch.optim.AdamW(params, lr=defaults.lr, betas=ADAM_BETAS, eps=ADAM_EPS,
                                      weight_decay=ADAM_WEIGHT_DECAY)
        scaler = torch.amp.GradScaler(check.device.type, enabled=mp is MixedPrecision.FP16)
        losses, skipped = [], 0
        for step in range(z.lora_steps):
            position = step % len(images)
            if position == 0:
                order = torch.randperm(len(images), generator=rng)
            loss = lora_loss(sd, schedule, images, contexts, order[position:position + 1], rng,
                             check.device, dtype)
            scale = scaler.get_scale() if scaler.is_enabled() else None
            apply_gradients(loss, params, optimizer, scaler)
            if scale is not None and scaler.get_scale() < scale:
                skipped += 1                                        # an inf/NaN gradient: step skipped
            losses.append(loss.item())
        name = mp.dtype_name
        s[f"{name}_losses"] = losses
        s[f"{name}_skipped_steps"] = skipped
        s.require(all(math.isfinite(v) for v in losses), f"{name}: a loss is not finite")
        s.require(all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                      for p in params), f"{name}: the adapters or their gradients are not float32")
        s.require(skipped < z.lora_steps, f"{name}: the scaler skipped every step")
        s.require(any(not torch.equal(p.detach(), b) for p, b in zip(params, before)),
                  f"{name}: no adapter weight changed")
        del sd, params, optimizer
    s["notes"].append(f"{z.lora_steps} steps at {z.lora_px} px, batch 1, the paper's rank/alpha/lr/targets")
    return s


def generation(check: Check) -> Section:
    from meddap.sampling.generation import GenerationConfig
    from meddap.sampling.samplers import Sampler
    from meddap.sampling.text_to_image import TextToImage

    s, z = Section(), check.sizes
    dtype_name = "fp16" if check.on_cuda else "fp32"
    sd = check.device_sd(DTYPES[dtype_name])
    finite = {"unet": [], "vae_decoder": []}
    sd.unet.register_forward_hook(lambda m, a, out: finite["unet"].append(bool(torch.isfinite(out).all())))
    sd.vae.decoder.register_forward_hook(
        lambda m, a, out: finite["vae_decoder"].append(bool(torch.isfinite(out).all())))
    cfg = GenerationConfig(sampler=Sampler.PNDM, steps=z.gen_steps, height=z.gen_px, width=z.gen_px,
                           batch_size=z.gen_batch, dtype=dtype_name)
    if check.on_cuda:
        torch.cuda.synchronize(check.device)
        torch.cuda.reset_peak_memory_stats(check.device)
    start = time.monotonic()
    results = TextToImage(sd, cfg)([PROMPT] * z.gen_batch, list(range(z.gen_batch)))
    s["sampling_seconds"] = round(time.monotonic() - start, 3)
    s["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(check.device) if check.on_cuda else None
    s["unet_calls"], s["dtype"] = len(finite["unet"]), dtype_name
    s.require(len(results) == z.gen_batch and all(r.image.size == (z.gen_px, z.gen_px) for r in results),
              f"expected {z.gen_batch} images of {z.gen_px} px")
    s.require(len(finite["unet"]) == z.gen_steps + 1, "PNDM should call the UNet steps + 1 times")
    for part, flags in finite.items():
        s.require(bool(flags) and all(flags), f"{part}: an output holds NaN or inf")
    s["notes"].append(f"PNDM-{z.gen_steps}, guidance 7.5, batch {z.gen_batch} at {z.gen_px} px in "
                      f"{dtype_name}; the peak memory includes the weights")
    return s


def classifiers(check: Check) -> Section:
    from meddap.classify.networks import Arch, build_network
    from meddap.classify.train import normalise

    s, z = Section(), check.sizes
    g = torch.Generator().manual_seed(4)
    x_u8 = torch.randint(0, 256, (z.cls_batch, 3, z.cls_px, z.cls_px), dtype=torch.uint8, generator=g)
    y = torch.arange(z.cls_batch) % 3
    x_u8, y = x_u8.to(check.device), y.to(check.device)
    for arch in Arch:
        torch.manual_seed(0)
        model = build_network(arch, 3).to(check.device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(check.device.type, enabled=check.on_cuda)   # as classify train
        losses = []
        for _ in range(z.cls_steps):
            with torch.autocast(device_type=check.device.type, dtype=torch.float16, enabled=check.on_cuda):
                logits = model(normalise(x_u8))                                       # (B, 3)
                loss = torch.nn.functional.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        s[f"{arch.value}_losses"] = losses
        s[f"{arch.value}_logits_dtype"] = str(logits.dtype).removeprefix("torch.")
        s.require(all(math.isfinite(v) for v in losses), f"{arch.value}: a loss is not finite")
    s["notes"].append(f"{z.cls_steps} Adam step(s), batch {z.cls_batch} at {z.cls_px} px, "
                      f"AMP {'on' if check.on_cuda else 'off (CPU)'}")
    return s


def torchrun(check: Check) -> Section:
    from meddap.data.expand import ExpandConfig, expand
    from meddap.models.stable_diffusion import build_stable_diffusion, save_stable_diffusion

    s, z = Section(), check.sizes
    folder = check.scratch / "expand"
    folder.mkdir()
    torch.manual_seed(0)
    save_stable_diffusion(build_stable_diffusion("tiny"), folder / "tiny.safetensors")
    device = "cuda:0" if check.on_cuda else "cpu"          # two ranks share the one device
    settings = dict(checkpoint=str(folder / "tiny.safetensors"), data=str(check.phantom(32)),
                    ratios=(1.0,), adjectives=("none",), steps=z.expand_steps, height=z.expand_px,
                    width=z.expand_px, batch_size=1, device=device, quiet=True)
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in settings.items() if k != "quiet"] + ["--quiet"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "meddap.cli", "expand", *flags, f"--out={folder / 'two_ranks'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    start = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    s["torchrun_seconds"] = round(time.monotonic() - start, 3)
    s["returncode"] = done.returncode
    if done.returncode != 0:
        s["failures"].append(f"torchrun exited {done.returncode}: {done.stderr[-2000:]}")
        return s
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as each rank (OMP_NUM_THREADS=1): CPU sums depend on the threads
    try:
        expand(ExpandConfig(**settings, out=str(folder / "one_process")))
    finally:
        torch.set_num_threads(threads)
    hashes = {}
    for run in ("two_ranks", "one_process"):
        lines = (folder / run / "manifest.jsonl").read_text().splitlines()
        hashes[run] = {row["file"]: row["sha256"] for row in map(json.loads, lines)}
    s["files"] = len(hashes["two_ranks"])
    s.require(s["files"] == 6, f"expected 6 synthetic files, got {s['files']}")
    s.require(hashes["two_ranks"] == hashes["one_process"],
              "the two ranks' files differ from a one-process run's")
    s["notes"].append(f"tiny checkpoint, 6 images ({z.expand_steps} PNDM steps, {z.expand_px} px), "
                      f"2 ranks on {device} (gloo) vs one process: same SHA-256 per file")
    return s


def diffusers(check: Check) -> Section:
    s, z = Section(), check.sizes
    if importlib.util.find_spec("diffusers") is None:
        s["skipped"] = True
        s["notes"].append("diffusers is not installed: nothing to compare")
        return s
    sys.path.insert(0, str(REPO / "tests"))
    from oracles import diffusers_unet_from_ours, diffusers_vae_from_ours

    ours = check.device_sd(torch.float32)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(z.batch, 4, z.unet_latent, z.unet_latent, generator=g).to(check.device)
    t = torch.tensor([999, 500, 37, 1][:z.batch], device=check.device)
    context = torch.randn(z.batch, 77, ours.config.unet.context_dim, generator=g).to(check.device)
    pixels = (torch.rand(z.batch, 3, z.vae_px, z.vae_px, generator=g) * 2 - 1).to(check.device)
    unet = diffusers_unet_from_ours(ours.unet.state_dict(), ours.config.unet, share=True)
    vae = diffusers_vae_from_ours(ours.vae.state_dict(), ours.config.vae, share=True)
    with tf32(False), torch.no_grad():
        s.bound("unet_rel_err", relative_error(ours.unet(x, t, context),
                                               unet(x, t, encoder_hidden_states=context).sample),
                TOLERANCES["diffusers_fp32"])
        mean, _ = ours.vae.encode(pixels)
        s.bound("vae_encode_rel_err", relative_error(mean, vae.encode(pixels).latent_dist.mean),
                TOLERANCES["diffusers_fp32"])
        s.bound("vae_decode_rel_err", relative_error(ours.vae.decode(mean), vae.decode(mean).sample),
                TOLERANCES["diffusers_fp32"])
    s["notes"].append("float32, TF32 off, diffusers models sharing our tensors (tests/oracles.py)")
    return s


SECTIONS = {"parity": parity, "fid_features": fid_features, "lora_training": lora_training,
            "generation": generation, "classifiers": classifiers, "torchrun": torchrun,
            "diffusers": diffusers}


def run_section(fn, check: Check) -> dict:
    start = time.monotonic()
    try:
        record = dict(fn(check))
    except Exception as e:                                          # recorded; the next section runs
        record = {"failures": [], "notes": [], "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc(limit=-4)}
    record["ok"] = not record["failures"] and "error" not in record
    record["seconds"] = round(time.monotonic() - start, 3)
    if check.on_cuda:
        torch.cuda.empty_cache()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: the GPU, else cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer steps and smaller inputs")
    parser.add_argument("--only", nargs="+", choices=sorted(SECTIONS), help="run only these sections")
    args = parser.parse_args(argv)

    from meddap.device import pin_cudnn, resolve_device

    device = resolve_device(args.device)
    pin_cudnn()
    sizes = CPU_SIZES if device.type == "cpu" else GPU_SIZES
    if args.quick:
        sizes = dataclasses.replace(sizes, **QUICK[device.type])
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meddap_gpu_check_") as scratch:
        check = Check(device, sizes, Path(scratch))
        names = args.only or list(SECTIONS)
        sections = {name: run_section(SECTIONS[name], check) for name in names}
    report = {"ok": all(r["ok"] for r in sections.values()), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "cuda": torch.version.cuda, "quick": args.quick,
              "config": sizes.config,
              "sizes": dataclasses.asdict(sizes), "tolerances": TOLERANCES,
              "seconds": round(time.monotonic() - start, 3), "sections": sections}
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
