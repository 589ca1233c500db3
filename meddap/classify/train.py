"""Training a downstream classifier (MEDDAP section 4; the authors' evaluate_new.py).

Defaults are the authors': Adam at lr 1e-3, batch 32 with drop_last, 100
epochs, images resized to 224 x 224, ImageNet mean/std, no augmentation,
cross-entropy, and the checkpoint of best validation accuracy is kept.
`--augment classic` adds the usual baseline the paper does not report (see
`augment_batch`): the "classic" condition of the result tables.

The loop reads as numbered steps: 1. data, 2. initial weights (shared by all
conditions, see networks.py), 3. optimiser and resume, 4. epochs, 5. result.

Output folder:
    init.pt    the initial weights (unless --init names a shared file)
    state.pt   the resumable checkpoint, rewritten atomically every --checkpoint-every
               epochs, after the last one, and when a SIGTERM or SIGINT stops the run:
               model, optimiser, grad scaler, torch RNG states, epoch, best, log, and
               for a stop inside an epoch the batch reached (`partial`)
    best.pt    the weights of best validation accuracy (+ arch, classes, size)
    log.csv    one row per epoch, metrics only (the seconds per epoch are in
               train.json), so a resumed run writes the same bytes
    train.json the summary, written last; its presence means "finished"

A run killed at any point and started again with the same command continues
from its last state.pt, redoing the epochs after it; on the CPU (with the same
number of threads) the result, best.pt and log.csv included, is bitwise the
one of an uninterrupted run (the shuffle of epoch e comes from its own
generator seeded by stream_seed(seed, e), dropout from the saved torch RNG
state; classic augmentation draws from that same epoch generator, after the
shuffle, and a stop inside an epoch saves that generator's state). SIGTERM and
SIGINT (Ctrl-C) lose nothing: the run finishes its batch, saves its state and
stops with `TrainingStopped`; a second signal stops at once, unsaved.

Arithmetic: on the CPU float32 in torch's default layout. Adam is torch's fused
kernel wherever torch has one (`_adam`). On CUDA (`Compute`) the images stay on
the GPU as uint8, the network and its inputs are channels_last and the forward
runs under autocast (--precision fp16, with a gradient scaler, or bf16). There the bitwise
claim holds only with cudnn.benchmark off (`train_classifier` pins it) and
torch.use_deterministic_algorithms(True), and is not guaranteed even then:
cuDNN backward uses atomics and adaptive_avg_pool2d's backward (in all three
networks) has no deterministic CUDA kernel (see meddap.device). Re-running with a larger --epochs extends a
finished run.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import signal
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from meddap.classify.networks import (Arch, InitialState, network_from_state, obtain_initial_state,
                                      parse_arch)
from meddap.data.datasets import ImageSet, load_rgb, resolve_images, resolve_training_images
from meddap.device import DEVICE_HELP, check_device_name, pin_cudnn, resolve_device, resolve_dtype
from meddap.errors import MeddapError
from meddap.io import (dataset_sha256, save_torch_atomic, stream_seed, write_json_atomic,
                       write_text_atomic)
from meddap.progress import Progress
from meddap.settings import above, at_least, setting

# torchvision's ImageNet statistics (torchvision.transforms._presets.ImageClassification),
# used by the released code's transforms.Normalize.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Augment(Enum):
    """Training-image augmentation: none (as released) or classic (`augment_batch`)."""
    NONE = "none"
    CLASSIC = "classic"


class Precision(Enum):
    """The arithmetic of the forward pass on CUDA; the CPU always computes in float32."""
    FP16 = "fp16"                 # autocast to float16, with a gradient scaler
    BF16 = "bf16"                 # autocast to bfloat16 (float32's range: no scaler)
    FP32 = "fp32"                 # no autocast


# Measured on the 2-core development CPU, resnet34 at 64 px, batch 32 (224 px was too slow to
# time there): one state.pt save (256 MB: weights and Adam's two moments) took 1.7-2.3 s, one
# epoch of a BUSI fold (545 training images = 17 steps, 115 validation images) 84 s. Saving
# every 3 epochs keeps the saves under 1% of the time; at 224 px an epoch is about 12 times
# longer (pixels), on a GPU far shorter (raise it there). A kill redoes at most 2 epochs;
# SIGTERM and SIGINT save at once, whatever this is.
CHECKPOINT_EVERY = 3


def _adam(model: nn.Module, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel (one pass over all tensors) wherever this torch has it:
    CUDA, and the CPU from torch 2.4 on; torch's default loop elsewhere. Same update rule;
    measured on the 2-core AVX-512 CPU, resnet34 (21.8M parameters): a step took 14 ms fused,
    48 ms with the default, a fifth of a training step at batch 16 and 48 px."""
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except RuntimeError:                # "fused=True requires ... supported devices" (torch 2.3 on the CPU)
        return torch.optim.Adam(model.parameters(), lr=lr)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One classifier training (`meddap classify train`); defaults are the authors'
    (evaluate_new.py)."""
    arch: Arch = setting(parse=parse_arch,
                         help=f"network: {', '.join(a.value for a in Arch)}")
    train: tuple[str, ...] = setting(nargs="append", help="class folder or SPLIT.json:FOLD:PART; "
                                     "repeat to pool (real + synthetic)")
    val: str = setting(help="class folder or SPLIT.json:FOLD:PART")
    out: Path = setting(help="output folder (resumed if it holds a run)")
    epochs: int = setting(100, check=at_least(1), help="training epochs")
    batch_size: int = setting(32, check=at_least(1), help="drop_last, as released")
    lr: float = setting(1e-3, check=above(0), help="Adam learning rate; default betas")
    seed: int = setting(0, check=at_least(0),
                        help="seed of the initial weights, the shuffles and dropout")
    size: int = setting(224, check=at_least(32), help="square input size in pixels")
    augment: Augment = setting(Augment.NONE, help="training augmentation: none (as released) or "
                               "classic (flip, rotation ±10°, resized crop 0.8-1, brightness/"
                               "contrast ±0.2)")
    precision: Precision = setting(Precision.FP16, help="forward pass on CUDA: fp16 autocast with a "
                                   "gradient scaler, bf16 autocast, or fp32; the CPU computes in float32")
    checkpoint_every: int = setting(CHECKPOINT_EVERY, check=at_least(1),
                                    help="write the resumable state.pt every N epochs (and after the "
                                    "last, and on SIGTERM/SIGINT); a kill redoes at most N - 1 epochs")
    device: str | None = setting(None, check=check_device_name, help=DEVICE_HELP)
    init: Path | None = setting(None, help="shared initial weights file, made if absent; "
                                "not given: OUT/init.pt")
    weights_dir: Path = setting(Path("weights"), help="folder with torchvision's ImageNet files "
                                "(random init without them)")
    show_progress: bool = setting(True, cli=False, help="draw a progress bar (CLI: --quiet turns it off)")

    def settings(self) -> dict:
        """What must not change when a run is resumed (epochs may grow)."""
        return {"arch": self.arch.value, "train": list(self.train), "val": self.val,
                "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed, "size": self.size,
                "augment": self.augment.value, "precision": self.precision.value}


def saved_settings(saved: dict) -> dict:
    """Settings read from a state.pt or train.json; runs made before --augment
    existed saved no `augment` and ran without augmentation, runs made before
    --precision existed ran fp16 autocast on CUDA."""
    return {"augment": Augment.NONE.value, "precision": Precision.FP16.value, **saved}


# ---------------------------------------------------------------- 1. data

@dataclass
class TensorSet:
    """Images resized to (size, size), kept as uint8; labels index `classes`."""
    images: torch.Tensor            # (N, 3, S, S) uint8
    labels: torch.Tensor            # (N,) int64
    classes: list[str]
    paths: list[str] = field(default_factory=list)


_CACHE: OrderedDict = OrderedDict()   # (path, mtime_ns, bytes, size) -> (3, S, S) uint8
_CACHE_LIMIT_BYTES = 1 << 30          # ~1 GiB: real images re-read across conditions


def load_image_tensor(path: Path, size: int) -> torch.Tensor:
    """RGB image -> (3, size, size) uint8, PIL bilinear resize to a square
    (224 x 224 as released; aspect ratio not kept), memoised in a bounded LRU cache."""
    try:
        st = path.stat()
    except OSError as e:
        raise MeddapError(f"cannot read image {path}: {e.strerror}; was it moved or deleted?") from e
    key = (str(path), st.st_mtime_ns, st.st_size, size)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    im = load_rgb(path).resize((size, size), resample=Image.Resampling.BILINEAR)
    t = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)  # (H,W,3)->(3,H,W)
    _CACHE[key] = t
    while len(_CACHE) * t.numel() > _CACHE_LIMIT_BYTES:
        _CACHE.popitem(last=False)
    return t


def to_tensor_set(sets: list[ImageSet], classes: list[str], size: int) -> TensorSet:
    index = {c: i for i, c in enumerate(classes)}
    items = [it for s in sets for it in s.items]
    images = [load_image_tensor(it.path, size) for it in items]
    stack = torch.stack(images) if images else torch.zeros(0, 3, size, size, dtype=torch.uint8)
    return TensorSet(stack, torch.tensor([index[it.label] for it in items], dtype=torch.int64),
                     list(classes), [str(it.path) for it in items])


def imagenet_statistics(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet (mean, std), each (1, 3, 1, 1) float32 on `device`; build them once per run."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def normalise(images_u8: torch.Tensor,
              statistics: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, 3, S, S) uint8 -> float32 (x/255 - mean) / std, ImageNet statistics
    (`imagenet_statistics`, built here when not given)."""
    mean, std = statistics if statistics is not None else imagenet_statistics(images_u8.device)
    return (images_u8.float() / 255.0 - mean) / std


@dataclass(frozen=True)
class Compute:
    """How a classifier computes on `device`, fixed once per run.

    CPU: float32, torch's default layout (bitwise the arithmetic of earlier runs).
    CUDA: channels_last network and inputs (cuDNN's NHWC kernels) and autocast to
    `autocast` (None: float32).
    """
    device: torch.device
    autocast: torch.dtype | None
    memory_format: torch.memory_format
    statistics: tuple[torch.Tensor, torch.Tensor]      # ImageNet (mean, std), (1, 3, 1, 1) each

    @classmethod
    def on(cls, device: torch.device, precision: Precision = Precision.FP16) -> "Compute":
        on_cuda = device.type == "cuda"
        autocast = None
        if on_cuda and precision is not Precision.FP32:
            autocast = resolve_dtype(precision.value, device, "--precision")
        return cls(device, autocast,
                   torch.channels_last if on_cuda else torch.contiguous_format,
                   imagenet_statistics(device))

    def inputs(self, images_u8: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 on the device -> normalised float32 in this memory format."""
        return normalise(images_u8, self.statistics).contiguous(memory_format=self.memory_format)

    def forward_context(self):
        """The autocast region of a forward pass (disabled on the CPU and for fp32)."""
        return torch.autocast(device_type=self.device.type, dtype=self.autocast or torch.float32,
                              enabled=self.autocast is not None)


def load_training_data(cfg: TrainConfig) -> tuple[TensorSet, TensorSet, str]:
    """(train, val, the training images' dataset_sha256)."""
    train_sets = [resolve_training_images(s) for s in cfg.train]
    val_set = resolve_images(cfg.val)
    classes = sorted({c for s in train_sets for c in s.classes})
    unknown = [c for c in val_set.classes if c not in classes]
    if unknown:
        raise MeddapError(f"validation data {cfg.val} has class(es) {unknown} that the training "
                          f"data {', '.join(cfg.train)} lacks; training classes: {classes}.")
    n_train = sum(len(s.items) for s in train_sets)
    if n_train < cfg.batch_size:
        raise MeddapError(f"training data {', '.join(cfg.train)} has {n_train} images, fewer than "
                          f"one batch of {cfg.batch_size}; incomplete batches are dropped (drop_last, "
                          f"as released), so no step would run. Use --batch-size {max(n_train, 1)} "
                          f"or less, or add images.")
    if not val_set.items:
        raise MeddapError(f"validation data {cfg.val} holds no images.")
    return (to_tensor_set(train_sets, classes, cfg.size),
            to_tensor_set([val_set], classes, cfg.size),
            dataset_sha256([it for s in train_sets for it in s.items]))


# ---------------------------------------------------------------- classic augmentation

# torchvision.transforms' usual ranges for an augmentation baseline
FLIP_P = 0.5                      # RandomHorizontalFlip(p=0.5)
ROTATION_DEG = 10.0               # RandomRotation(10): angle ~ U(-10°, 10°)
CROP_SCALE = (0.8, 1.0)           # RandomResizedCrop(scale=(0.8, 1.0)), area fraction
JITTER = 0.2                      # ColorJitter(brightness=0.2, contrast=0.2): factor ~ U(0.8, 1.2)


def augment_batch(images_u8: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Classic augmentation of uint8 images (B, 3, S, S) -> (B, 3, S, S) uint8,
    each image with its own parameters, all drawn from `gen` (CPU) as one
    (B, 7) uniform draw, so a seeded generator gives the same batch again.

    Per image, in this order: horizontal flip with p = 0.5; rotation by
    U(-10°, 10°) (bilinear, black corners); a crop of area fraction
    U(0.8, 1) at a uniform position, resized back to S x S (bilinear,
    antialiased); brightness then contrast factors U(0.8, 1.2).
    Note: torchvision's RandomResizedCrop also varies the aspect ratio in
    [3/4, 4/3] and ColorJitter shuffles its order; our crop is square (the
    inputs are square) and the order is fixed.
    """
    # torchvision is imported here, not at the top: importing it pulls in torch._dynamo
    # (about 1.4 s), and every `meddap` command's parser imports this module.
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    b, _, s, _ = images_u8.shape
    u = torch.rand(b, 7, generator=gen, dtype=torch.float64).tolist()          # (B, 7)
    out = []
    for img, (flip, angle, scale, top, left, bright, contrast) in zip(images_u8, u):
        if flip < FLIP_P:
            img = TF.horizontal_flip(img)
        img = TF.rotate(img, ROTATION_DEG * (2 * angle - 1), interpolation=InterpolationMode.BILINEAR)
        side = max(1, round(s * math.sqrt(CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * scale)))
        t, l = int(top * (s - side + 1)), int(left * (s - side + 1))
        img = TF.resized_crop(img, t, l, side, side, [s, s], antialias=True)    # (3, S, S)
        img = TF.adjust_brightness(img, 1 + JITTER * (2 * bright - 1))
        img = TF.adjust_contrast(img, 1 + JITTER * (2 * contrast - 1))
        out.append(img)
    return torch.stack(out)


# ---------------------------------------------------------------- helpers

@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int, compute: Compute
            ) -> torch.Tensor:
    """Class logits (N, k) float32 on the device of uint8 images (N, 3, S, S) (on the
    device already, or copied batch by batch), model in eval mode."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = compute.inputs(images[i:i + batch_size].to(compute.device))     # (B, 3, S, S)
        with compute.forward_context():
            out.append(model(x).float())                                    # (B, k)
    return torch.cat(out) if out else torch.zeros(0)


LOG_COLUMNS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
               "best_val_accuracy")


def _write_log(path: Path, rows: list[dict]) -> None:
    """log.csv: LOG_COLUMNS of `rows`; the rows' wall-clock "seconds" stay out of it."""
    if not rows:
        return
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=LOG_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


class TrainingStopped(KeyboardInterrupt):
    """A SIGTERM or SIGINT stopped training after its state was saved; the message
    says where. A KeyboardInterrupt, so the CLI reports it as one (exit 130)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_requests() -> Iterator[list[str]]:
    """For the block, SIGTERM and SIGINT append their name to the list yielded, so the
    loop can stop at a point of its choosing; a second signal raises KeyboardInterrupt
    at once. The previous handlers come back after the block. Outside the main thread
    Python cannot install handlers; there the list stays empty and signals act as usual."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _stopped(bar: Progress, where: str) -> TrainingStopped:
    """Close the bar, say where the run stopped, and return the exception to raise."""
    bar.close()
    message = f"{where}; re-run the same command to resume."
    print(f"classify: {message}")
    return TrainingStopped(message)


def _cpu_state_dict(model: nn.Module) -> dict:
    """The model's tensors on the CPU in the default layout (a CUDA run is channels_last)."""
    return {k: v.cpu().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- training

def train_classifier(cfg: TrainConfig) -> dict:
    """Train one classifier; returns (and writes) out/train.json."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    pin_cudnn()                            # the same convolution algorithms in every run
    summary_path, state_path = out / "train.json", out / "state.pt"
    if summary_path.exists():
        done = json.loads(summary_path.read_text(encoding="utf-8"))
        saved = saved_settings(done["config"])
        if (done.get("complete") and done["config"]["epochs"] == cfg.epochs
                and {k: saved.get(k) for k in cfg.settings()} == cfg.settings()):
            return done
    compute = Compute.on(device, cfg.precision)

    # 1. data (raises before anything is written when the input is wrong), kept on the device as uint8
    train, val, train_sha = load_training_data(cfg)

    # 2. initial weights, identical for every condition sharing the init file
    init: InitialState = obtain_initial_state(cfg.init or out / "init.pt", cfg.arch,
                                              train.classes, cfg.seed, cfg.weights_dir)
    print(f"classify: {cfg.arch.value}, classes {train.classes}, {init.describe()}")
    model = network_from_state(cfg.arch, len(train.classes), init.state_dict)
    model.to(device, memory_format=compute.memory_format)

    # 3. optimiser (Adam, as released), the gradient scaler of fp16 autocast, resume
    optimizer = _adam(model, cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=compute.autocast is torch.float16)
    torch.manual_seed(cfg.seed)
    start, best_acc, best_epoch, rows, partial = 0, -1.0, -1, [], None
    if state_path.exists():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise MeddapError(f"checkpoint {state_path} cannot be read ({type(e).__name__}); "
                              f"delete it to restart this run from epoch 0.") from e
        if saved_settings(state["settings"]) != cfg.settings():
            raise MeddapError(f"{out} holds a run with settings {state['settings']}; this command "
                              f"asks {cfg.settings()}. Use another --out folder.")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        start, best_acc, best_epoch, rows = (state["epoch"], state["best_acc"],
                                             state["best_epoch"], state["log"])
        partial = state.get("partial")          # None: saved at the end of epoch `start`
        if start > cfg.epochs:
            raise MeddapError(f"{out} holds a run of {start} epochs; --epochs {cfg.epochs} asks "
                              f"fewer. Use --epochs {start} or more, or another --out folder.")
        if start < cfg.epochs:
            where = f"batch {partial['batch']} of epoch {start + 1}" if partial else f"epoch {start}"
            print(f"classify: resuming {out} after {where}")

    def save_state(epochs_done: int, partial: dict | None = None) -> None:
        save_torch_atomic({"settings": cfg.settings(), "epoch": epochs_done, "best_acc": best_acc,
                           "best_epoch": best_epoch, "log": rows, "partial": partial,
                           "model": _cpu_state_dict(model),
                           "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                           "rng_cpu": torch.get_rng_state(),
                           "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None},
                          state_path)

    # 4. epochs; SIGTERM/SIGINT stop after the current batch with the state saved
    loss_fn = nn.CrossEntropyLoss()
    train_images, train_labels = train.images.to(device), train.labels.to(device)
    val_images, val_labels = val.images.to(device), val.labels.to(device)
    n_batches = train.images.shape[0] // cfg.batch_size            # drop_last
    bar = Progress(total=cfg.epochs * n_batches,                  # one unit per batch
                   initial=start * n_batches + (partial["batch"] if partial else 0),
                   desc=f"{cfg.arch.value}", enabled=cfg.show_progress)
    with stop_requests() as stop:
        for epoch in range(start, cfg.epochs):
            t0 = time.monotonic()
            model.train()
            gen = torch.Generator().manual_seed(stream_seed(cfg.seed, epoch))
            perm = torch.randperm(train.images.shape[0], generator=gen).to(device)  # (N,)
            first, seconds = 0, 0.0
            loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
            if partial is not None:             # a stop inside this epoch: continue after its batch
                first, seconds = partial["batch"], partial["seconds"]
                gen.set_state(partial["generator"])
                loss_sum, correct = partial["loss_sum"].to(device), partial["correct"].to(device)
                partial = None
            for b in range(first, n_batches):
                idx = perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]             # (B,)
                x_u8, y = train_images[idx], train_labels[idx]                      # (B, 3, S, S), (B,)
                if cfg.augment is Augment.CLASSIC:
                    x_u8 = augment_batch(x_u8, gen)
                x = compute.inputs(x_u8)                                            # (B, 3, S, S)
                with compute.forward_context():
                    logits = model(x)                                               # (B, k)
                    loss = loss_fn(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.detach()
                correct += (logits.argmax(1) == y).sum()
                bar.update(1)
                if stop and b + 1 < n_batches:
                    save_state(epoch, {"batch": b + 1, "generator": gen.get_state(),
                                       "loss_sum": loss_sum.cpu(), "correct": correct.cpu(),
                                       "seconds": seconds + time.monotonic() - t0})
                    raise _stopped(bar, f"{stop[0]}: stopped after batch {b + 1} of epoch "
                                        f"{epoch + 1}; the state is in {state_path}")
            model.eval()
            val_logits = predict(model, val_images, cfg.batch_size, compute)            # (N_val, k)
            val_loss = float(loss_fn(val_logits, val_labels))
            val_acc = float((val_logits.argmax(1) == val_labels).double().mean())
            if val_acc > best_acc:                                      # first best kept on ties
                best_acc, best_epoch = val_acc, epoch + 1
                save_torch_atomic({"arch": cfg.arch.value, "classes": train.classes, "size": cfg.size,
                                   "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                                   "epoch": best_epoch, "val_accuracy": best_acc,
                                   "imagenet_init": init.imagenet_init,
                                   "state_dict": _cpu_state_dict(model)},
                                  out / "best.pt")
            rows.append({"epoch": epoch + 1,
                         "train_loss": float(loss_sum) / max(n_batches, 1),
                         "train_accuracy": float(correct) / (n_batches * cfg.batch_size),
                         "val_loss": val_loss, "val_accuracy": val_acc, "best_val_accuracy": best_acc,
                         "seconds": round(seconds + time.monotonic() - t0, 3)})
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs or stop:
                save_state(epoch + 1)
            _write_log(out / "log.csv", rows)
            bar.update(0, postfix=f"epoch {epoch + 1}/{cfg.epochs} loss {rows[-1]['train_loss']:.3f} "
                                  f"val acc {val_acc:.3f} (best {best_acc:.3f} @ {best_epoch})")
            if stop and epoch + 1 < cfg.epochs:
                raise _stopped(bar, f"{stop[0]}: stopped after epoch {epoch + 1}; the state is in "
                                    f"{state_path}")
    bar.close()

    # 5. result
    summary = {"complete": True, "config": {**cfg.settings(), "epochs": cfg.epochs,
                                            "device": str(device),
                                            "mixed_precision": compute.autocast is not None},
               "classes": train.classes, "best_epoch": best_epoch,
               "best_val_accuracy": best_acc, "epochs_run": len(rows),
               "epoch_seconds": [r["seconds"] for r in rows],
               "n_train": int(train.images.shape[0]), "n_val": int(val.images.shape[0]),
               "train_manifest_sha256": train_sha, "init": init.provenance(),
               "imagenet_init": init.imagenet_init, "init_description": init.describe()}
    write_json_atomic(summary_path, summary)
    return summary
