"""`meddap bench`: throughput and peak memory of meddap's hot paths, and the wall
time of the whole busi-sd14 protocol that they imply on this machine.

    meddap bench                          # random SD v1.4-shaped weights, no files needed
    meddap bench --model tiny --device cpu --quick --json
    meddap bench --baseline diffusers     # also time diffusers (+ peft) in the same process

Every path runs once to warm up (kernel selection, allocator, lazy imports), then
`--repeats` times; its rate is `items / median(seconds per call)`. The paths, by
name (on `--model tiny` the pixel sizes shrink and each entry says its size):

    train_lora_224          one `meddap train-lora` step at 224 px, batch 1: VAE encode,
                            UNet forward and backward, AdamW (lora_loss + apply_gradients)
    train_lora_224_fast     one `train-lora --fast` step at 224 px: its FastStep on cached latents,
                            as it runs after SelfCheckedStep's first steps (a CUDA graph's replay
                            in bf16/fp32 on CUDA; uncaptured with fp16 loss scaling, the bench's
                            CUDA default, and on the CPU)
    train_lora_512_fast     the same at 512 px
    train_lora_224_5folds   one `train_lora_joint` step of the 5 folds at batch 1, cached latents:
                            one batch-5 UNet pass, then each fold's clip and AdamW (unit:
                            fold-steps; in fp16 without loss scaling, which train_lora_joint refuses)
    pndm30_b1_512           PNDM, 30 steps, batch 1, 512 px, guidance 7.5 (TextToImage)
    ddim50_b8_512           DDIM, 50 steps, batch 8, 512 px
    classify_resnet34_224   one ResNet34 training step, batch 32, 224 px (unit: images)
    fid_features            FID Inception features, batch 50 at 299 px (forward pass only)

Peak memory ("peak_gib"): on CUDA torch.cuda.max_memory_allocated over the timed calls
(the resident models included); on the CPU the process's maximum RSS over the timed
calls (resource.getrusage, its high-water mark reset after the warm-up through
/proc/self/clear_refs) minus the RSS before the first model was built. Where the
high-water mark cannot be reset, the maximum counts since the bench started, and the
entry's "peak" says so.

The protocol estimate (`protocol_hours`), stage by stage, from the measured rates r:
    lora_training        5 folds x 54,500 steps / r(fastest 224 px LoRA path, fold-steps/s)
    generation           54,500 images / r(pndm30_b1_512)
    classifier_training  450 trainings x 100 epochs x 1,090 images / r(classify_resnet34_224)
                         (1,090: the middle of 545 real to 1,635 real + synthetic images;
                         ResNet34's rate stands for all three networks)
    fid_features         (54,500 synthetic + 5 x 545 real) images / r(fid_features)
                         (features are cached by content: each image is embedded once)
The weights are random, so only speed and memory mean anything here.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import statistics
import tempfile
import time
from enum import Enum
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from meddap.device import DEVICE_HELP, check_device_name, check_dtype_name, resolve_device, resolve_dtype
from meddap.errors import MeddapError
from meddap.settings import add_command, at_least, from_args, setting

GiB = 2**30
PROMPT_CLASSES = ("benign", "malignant", "normal")

# The busi-sd14 protocol (meddap/pipeline/configs/busi-sd14.toml, MEDDAP section 4).
PROTOCOL_FOLDS = 5
PROTOCOL_LORA_STEPS = 54_500            # per fold: 100 epochs x 545 images, batch 1
PROTOCOL_IMAGES = 54_500                # synthetic images, PNDM-30 at 512 px
PROTOCOL_TRAININGS = 450                # classifier trainings (networks x conditions x folds)
PROTOCOL_EPOCHS = 100
PROTOCOL_TRAIN_IMAGES = 1_090           # the middle of 545 (real) to 1,635 (real + 2x synthetic)
PROTOCOL_FID_IMAGES = PROTOCOL_IMAGES + PROTOCOL_FOLDS * 545


class Baseline(Enum):
    NONE = "none"
    DIFFUSERS = "diffusers"       # diffusers + peft, the authors' stack


def _check_model(name) -> str | None:
    from meddap.models.config import CONFIGS
    return None if name in CONFIGS else f"is not a model config; choose one of {', '.join(sorted(CONFIGS))}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """One `meddap bench` run."""
    model: str = setting("sd-v1.4", check=_check_model,
                         help="random weights of this config: sd-v1.4 (full sizes) or tiny (small sizes)")
    device: str | None = setting(None, check=check_device_name, help=DEVICE_HELP)
    dtype: str | None = setting(None, check=check_dtype_name,
                                help="SD weights' dtype (empty: fp16 on CUDA as busi-sd14, fp32 on the CPU)")
    repeats: int = setting(5, check=at_least(1), help="timed calls per path (the median counts)")
    quick: bool = setting(False, help="one timed call, few sampler steps, small batches")
    baseline: Baseline = setting(Baseline.NONE, help="also time this implementation in the same process")
    as_json: bool = setting(False, flag="--json", help="print one JSON object")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Pixel sizes, sampler steps and batches of the paths (their names give the full ones).

    (`duplicates` pairs this with models/config.py's UNetConfig: both are plain frozen
    dataclasses of integer fields, alike in shape only; they share no value or meaning.)"""
    lora_low: int = 224
    lora_high: int = 512
    sample: int = 512
    pndm_steps: int = 30
    ddim_steps: int = 50
    ddim_batch: int = 8
    classify: int = 224
    classify_batch: int = 32
    fid_batch: int = 50


def sizes_for(cfg: BenchConfig) -> Sizes:
    sizes = Sizes() if cfg.model == "sd-v1.4" else Sizes(lora_low=64, lora_high=128, sample=64, classify=64)
    if cfg.quick:
        sizes = dataclasses.replace(sizes, pndm_steps=4, ddim_steps=4, ddim_batch=2, classify_batch=4,
                                    fid_batch=1)
    return sizes


@dataclasses.dataclass(frozen=True)
class Work:
    """One prepared path: `step()` does `items` units of work."""
    step: Callable[[], object]
    items: int
    unit: str
    size: int
    batch: int
    fast: bool
    note: str


# ---------------------------------------------------------------- timing and memory

def _rss_bytes() -> int:
    """The process's resident set size now (Linux /proc/self/statm), or its maximum elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux 4.0+); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(work: Work, device: torch.device, repeats: int, rss_start: int) -> dict:
    """Warm up once, time `repeats` calls: {"per_s", "unit", "peak_gib", "peak", ...}."""
    work.step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        peak_kind = "cuda_max_memory_allocated"
    else:
        peak_kind = "rss_max_minus_start" if _reset_rss_peak() else "rss_max_since_bench_start"
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        work.step()
        _sync(device)
        seconds.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_start)
    median = statistics.median(seconds)
    return {"per_s": work.items / median, "unit": work.unit, "peak_gib": peak / GiB, "peak": peak_kind,
            "median_s": median, "size": work.size, "batch": work.batch, "fast": work.fast,
            "note": work.note}


# ---------------------------------------------------------------- meddap's paths

class Bench:
    """The models and inputs the paths share, built once on `device` in `dtype`."""

    def __init__(self, cfg: BenchConfig, device: torch.device, dtype: torch.dtype, folder: Path):
        from meddap import build_stable_diffusion
        self.cfg, self.device, self.dtype, self.sizes = cfg, device, dtype, sizes_for(cfg)
        self.sd = build_stable_diffusion(cfg.model, device=device, dtype=dtype)
        self.sd.requires_grad_(False)
        self.folder = folder                                  # image_folder/ and the joint folds' out/ folders
        self.image_folder = _write_images(folder / "images", self.sizes.lora_high)

    def plain_unet(self) -> None:
        """Take the previous path's adapters out of the UNet; its base tensors stay in place."""
        from meddap.lora.adapter import lora_layers, remove_lora
        from meddap.lora.joint import detach_folds

        detach_folds(self.sd.unet)
        if lora_layers(self.sd.unet):
            remove_lora(self.sd.unet)

    # -- LoRA training (meddap.lora.train, meddap.lora.fast)

    def lora(self, size: int, fast: bool) -> Work:
        """One train_lora step at `size` px, batch 1: lora_loss + apply_gradients with a VAE encode
        every step, or with `fast` the FastStep that train_lora builds for --fast (which needs
        --cache-latents: the latents are cached)."""
        from meddap.lora.adapter import AdapterConfig, inject_lora, lora_parameters
        from meddap.lora.fast import WARMUP_STEPS
        from meddap.lora.train import TrainImages, lora_loss, make_update
        from meddap.data.datasets import resolve_training_images
        from meddap.sampling.schedule import NoiseSchedule

        sd, device = self.sd, self.device
        self.plain_unet()                                     # the previous path's adapters
        adapters = AdapterConfig()                            # the paper's rank 4, cross-attention
        rng = torch.Generator().manual_seed(42)
        inject_lora(sd.unet, adapters.rank, adapters.alpha, adapters.targets, generator=rng)
        params = lora_parameters(sd.unet)
        images = TrainImages(resolve_training_images(str(self.image_folder)), size, show_progress=False)
        contexts = images.embed_prompts(sd.text_encoder, as_released=False)      # (n_classes + 1, 77, C)
        if fast:
            images.cache_latents(sd.vae, show_progress=False)
        # train_lora's update: its AdamW, fused (and capturable when captured) with --fast.
        update = make_update(params, 1e-4, device, loss_scaling=self.dtype is torch.float16, fast=fast)
        schedule = NoiseSchedule.sd_v1()
        state = {"k": 0}

        def next_batch() -> torch.Tensor:
            state["k"] += 1
            return torch.tensor([(state["k"] - 1) % len(images)])                # (1,) image index

        if not fast:
            def step():
                loss = lora_loss(sd, schedule, images, contexts, next_batch(), rng, device, self.dtype)
                update(loss)
                return loss.item()                            # the step's wait for the device, as train_lora's log
            return Work(step, 1, "steps", size, 1, False, "lora_loss + apply_gradients, VAE encode every step")

        # train_lora's --fast step (the bench has no gradient checkpointing). Timed is FastStep
        # itself: what SelfCheckedStep runs after its first CHECK_STEPS steps.
        static = update.fast_step(sd, schedule, images, contexts, 1, device, self.dtype)

        def fast_step():
            static.draw(next_batch(), rng)
            return static.run()                               # the device loss; measure() waits for it
        for _ in range(WARMUP_STEPS if static.capture else 0):
            fast_step()                                       # then measure()'s warm-up captures the graph
        if static.capture:
            kernels = "CUDA graph replay, fused AdamW"
        elif device.type == "cuda":
            kernels = "no CUDA graph (fp16 loss scaling is not graph-safe), fused AdamW"
        else:
            kernels = "eager kernels on the CPU (no graph capture), torch's AdamW"
        return Work(fast_step, 1, "steps", size, 1, True, f"FastStep, cached latents, {kernels}")

    # -- LoRA training of several folds at once (meddap.lora.joint)

    def joint(self, size: int, folds: int) -> Work:
        """One train_lora_joint step of `folds` folds at batch 1 on cached latents (unit: fold-steps)."""
        from meddap.lora.joint import attach_folds, joint_step
        from meddap.lora.train import LoRARunConfig
        from meddap.sampling.schedule import NoiseSchedule

        sd, device, dtype = self.sd, self.device, self.dtype
        self.plain_unet()
        cfgs = [LoRARunConfig(checkpoint="random-weights", data=str(self.image_folder),
                              out=str(self.folder / "folds" / str(k)), resolution=size, cache_latents=True,
                              show_progress=False) for k in range(folds)]
        for cfg in cfgs:
            Path(cfg.out).mkdir(parents=True, exist_ok=True)
        fs = attach_folds(sd, cfgs, device)                   # train_lora_joint's steps 3 and 4
        schedule = NoiseSchedule.sd_v1()
        every = list(range(folds))

        def step():
            _, losses = joint_step(sd, schedule, fs, every, device, dtype)   # log.csv, checkpoints not written
            return [loss.item() for loss in losses.values()]                # each fold's log value, as train_lora_joint
        note = f"joint folds: one batch-{folds} UNet pass, then each fold's clip and AdamW"
        if dtype is torch.float16:
            note += " (fp16 without loss scaling: train_lora_joint refuses fp16 loss scaling)"
        return Work(step, folds, "fold-steps", size, 1, False, note)

    # -- sampling (meddap.sampling.text_to_image)

    def sample(self, sampler: str, steps: int, batch: int) -> Work:
        from meddap.data.prompts import prompt_for
        from meddap.sampling.generation import GenerationConfig
        from meddap.sampling.samplers import Sampler
        from meddap.sampling.text_to_image import TextToImage

        self.plain_unet()                                     # sample the plain base, as the baseline does
        size = self.sizes.sample
        t2i = TextToImage(self.sd, GenerationConfig(sampler=Sampler.parse(sampler), steps=steps,
                                                    height=size, width=size, batch_size=batch))
        prompts = [prompt_for(PROMPT_CLASSES[b % 3]) for b in range(batch)]
        return Work(lambda: t2i(prompts, list(range(batch))), batch, "images", size, batch, False,
                    f"TextToImage, {sampler} {steps} steps, guidance 7.5, PNGs not written")

    # -- classifier training (the step of meddap.classify.train.train_classifier)

    def classify(self) -> Work:
        from meddap.classify.networks import Arch, build_network
        from meddap.classify.train import normalise

        device, size, batch = self.device, self.sizes.classify, self.sizes.classify_batch
        on_cuda = device.type == "cuda"
        model = build_network(Arch.RESNET34, len(PROMPT_CLASSES)).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type, enabled=on_cuda)
        g = torch.Generator().manual_seed(0)
        x_u8 = torch.randint(0, 256, (batch, 3, size, size), generator=g, dtype=torch.uint8).to(device)
        y = torch.randint(0, len(PROMPT_CLASSES), (batch,), generator=g).to(device)   # (B,)

        def step():
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=on_cuda):
                loss = F.cross_entropy(model(normalise(x_u8)).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return Work(step, batch, "images", size, batch, False,
                    "train_classifier's step (Adam, fp16 autocast on CUDA), data on the device")

    # -- FID features (meddap.fid.inception)

    def fid(self) -> Work:
        from meddap.fid.inception import FIDInception, InceptionGraph, InceptionV3, fid_extractor

        net = InceptionV3(InceptionGraph.FID_TF2015).eval().requires_grad_(False).to(self.device)
        extractor = fid_extractor(FIDInception(net, Path("random-weights"), "random-weights"))
        batch = self.sizes.fid_batch
        x = torch.rand(batch, 3, 299, 299, generator=torch.Generator().manual_seed(0))   # (B, 3, 299, 299)
        return Work(lambda: extractor.embed(x), batch, "images", 299, batch, False,
                    "fid_extractor's embed of decoded images (file decoding not timed)")


def _write_images(folder: Path, side: int) -> Path:
    """Two class folders of one random grey image each, wider than high (so crops move)."""
    rng = np.random.default_rng(0)
    for name in PROMPT_CLASSES[:2]:
        (folder / name).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (side, side + side // 4), dtype=np.uint8)     # (H, W)
        Image.fromarray(pixels).save(folder / name / "image.png")
    return folder


# The paths: name -> how to prepare it on a Bench.
PATHS: dict[str, Callable[[Bench], Work]] = {
    "train_lora_224": lambda b: b.lora(b.sizes.lora_low, fast=False),
    "train_lora_224_fast": lambda b: b.lora(b.sizes.lora_low, fast=True),
    "train_lora_512_fast": lambda b: b.lora(b.sizes.lora_high, fast=True),
    "train_lora_224_5folds": lambda b: b.joint(b.sizes.lora_low, PROTOCOL_FOLDS),
    "pndm30_b1_512": lambda b: b.sample("pndm", b.sizes.pndm_steps, 1),
    "ddim50_b8_512": lambda b: b.sample("ddim", b.sizes.ddim_steps, b.sizes.ddim_batch),
    "classify_resnet34_224": lambda b: b.classify(),
    "fid_features": lambda b: b.fid(),
}
LORA_224_PATHS = ("train_lora_224", "train_lora_224_fast", "train_lora_224_5folds")


# ---------------------------------------------------------------- the diffusers (+ peft) baseline

def _baselines():
    """scripts/bench_baselines.py: the diffusers (+ peft) and pytorch-fid equivalents of the paths.
    They live outside meddap/ because nothing under meddap/ imports the test-only oracles; it needs a
    repository checkout (the editable install README gives) and `pip install -e '.[test]'`."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_baselines.py"
    if not path.is_file():
        raise MeddapError(f"--baseline diffusers needs {path} from the meddap repository (an editable "
                          f"install of a checkout); run the bench from a checkout.")
    spec = importlib.util.spec_from_file_location("meddap_bench_baselines", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def protocol_hours(paths: dict) -> dict:
    """Hours of each busi-sd14 stage from the measured rates (formulas in the module docstring)."""
    rate = {name: entry["meddap"]["per_s"] for name, entry in paths.items()}
    hours = {
        "lora_training": PROTOCOL_FOLDS * PROTOCOL_LORA_STEPS / max(rate[n] for n in LORA_224_PATHS),
        "generation": PROTOCOL_IMAGES / rate["pndm30_b1_512"],
        "classifier_training": PROTOCOL_TRAININGS * PROTOCOL_EPOCHS * PROTOCOL_TRAIN_IMAGES
                               / rate["classify_resnet34_224"],
        "fid_features": PROTOCOL_FID_IMAGES / rate["fid_features"],
    }
    hours = {k: v / 3600 for k, v in hours.items()}
    return {**hours, "total": sum(hours.values())}


def bench(cfg: BenchConfig) -> dict:
    """Run every path of PATHS (and its baseline when asked): the object `--json` prints."""
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype or ("fp16" if device.type == "cuda" else "fp32"), device)
    if dtype is not torch.float32 and device.type != "cuda":
        raise MeddapError(f"--dtype {cfg.dtype} needs a CUDA device (train-lora's mixed precision does); "
                          f"on {device} the bench runs in fp32 (--dtype fp32).")
    repeats = 1 if cfg.quick else cfg.repeats
    baselines = _baselines() if cfg.baseline is Baseline.DIFFUSERS else None
    rss_start = _rss_bytes()
    paths = {}
    with tempfile.TemporaryDirectory(prefix="meddap-bench-") as folder:
        b = Bench(cfg, device, dtype, Path(folder))
        for name, prepare in PATHS.items():
            work = prepare(b)
            ours = measure(work, device, repeats, rss_start)
            base, why_none = None, None
            if cfg.baseline is Baseline.DIFFUSERS:
                other, note = baselines.baseline_work(name, b, work)
                if other is None:
                    why_none = note
                else:
                    base = measure(other, device, repeats, rss_start)
                del other
            paths[name] = {"meddap": ours, "baseline": base,
                           "ratio": ours["per_s"] / base["per_s"] if base else None, "baseline_note": why_none}
            del work
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch": torch.__version__, "paths": paths, "protocol_hours": protocol_hours(paths)}


def print_report(result: dict, cfg: BenchConfig) -> None:
    print(f"meddap bench: {cfg.model}, {result['device']}, torch {result['torch']}")
    for name, entry in result["paths"].items():
        m = entry["meddap"]
        line = (f"  {name:23s} {m['per_s']:10.3f} {m['unit']}/s  peak {m['peak_gib']:6.2f} GiB"
                f"  size {m['size']}  batch {m['batch']}  fast {str(m['fast']).lower()}")
        if entry["ratio"] is not None:
            line += f"  baseline {entry['baseline']['per_s']:.3f}/s, ratio meddap/baseline {entry['ratio']:.2f}"
        elif entry["baseline_note"]:
            line += f"  baseline: none ({entry['baseline_note']})"
        print(line)
    h = result["protocol_hours"]
    print("busi-sd14 wall time on this machine, from the rates above (hours):")
    rows = [("LoRA training", "5 x 54,500 steps / fastest 224 px LoRA rate", "lora_training"),
            ("generation", "54,500 images / pndm30_b1_512", "generation"),
            ("classifier training", "450 x 100 epochs x 1,090 images / classify", "classifier_training"),
            ("FID features", f"{PROTOCOL_FID_IMAGES:,} images / fid_features", "fid_features"),
            ("total", "", "total")]
    for label, formula, key in rows:
        print(f"  {label:20s} {formula:46s} {h[key]:10.1f}")
    if cfg.model != "sd-v1.4" or cfg.quick:
        print("  (measured at reduced sizes or steps: this is not the protocol's cost)")


def register(subparsers) -> None:
    add_command(subparsers, "bench", BenchConfig, _run,
                help="throughput and peak memory of the hot paths; protocol wall time",
                description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)


def _run(args: argparse.Namespace) -> int:
    cfg = from_args(BenchConfig, args)
    result = bench(cfg)
    if cfg.as_json:
        print(json.dumps(result, indent=2))
    else:
        print_report(result, cfg)
    return 0
