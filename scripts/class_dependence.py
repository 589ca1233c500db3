"""How much a (LoRA-adapted) UNet's noise prediction depends on the class prompt.

    python scripts/class_dependence.py --data DIR|SPLIT.json:FOLD:PART [--lora FILE]
        [--checkpoint weights/tiny/tiny-sd.safetensors] [--per-class 8] [--timesteps 200 500 800]
        [--resolution 64] [--seed 0] [--json OUT.json]

The demo's check asks whether samples of each class prompt look like that class.
This measures the cause one level down, without sampling or a classifier: on
real images of the training set, noised to step t, the UNet predicts the noise
once per prompt, and the table gives

    d_t(a, b) = rms(ε_θ(z_t, t, τ(p_a)) − ε_θ(z_t, t, τ(p_b))) / rms(ε_θ(z_t, t, τ(p_a)))

for every pair of class prompts p_a, p_b (the training prompts, `prompt_for`) and
for each class against the empty prompt ∅ (the prediction that guidance
subtracts). 0 means the prompt is ignored. Each prompt sees the same z_t:

    z_0 = vae.scale · mean(q(z | x))            the posterior mean (no sample), center crop
    z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε               ε ~ N(0, I) from a generator seeded with seed + t

so d_t differs from 0 only through the context. The rms run over all images
(the first `--per-class` of each class in path order), channels and pixels.
README's demo section quotes this measure for the demo's adapters.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

from meddap.data.datasets import ImageSet, resolve_training_images
from meddap.io import write_json_atomic
from meddap.lora.train import TrainImages
from meddap.sampling.generation import load_model
from meddap.sampling.schedule import NoiseSchedule

EMPTY = "∅"


def first_per_class(image_set: ImageSet, per_class: int) -> ImageSet:
    """The first `per_class` images of each class (path order), classes as in `image_set`."""
    items = [it for c in image_set.classes
             for it in sorted((it for it in image_set.items if it.label == c), key=lambda it: it.path)[:per_class]]
    return ImageSet(root=image_set.root, classes=list(image_set.classes), items=items)


@torch.no_grad()
def class_dependence(sd, images: TrainImages, timesteps: list[int], seed: int = 0) -> dict:
    """{t: {"a|b": d_t(a, b)}} over the class pairs and each class against ∅ (module docstring)."""
    images.cache_latents(sd.vae, show_progress=False)
    z0 = sd.vae.scale * torch.stack([m[0, 0] for m in images.moments])        # (N, 4, h, w), unflipped
    contexts = images.embed_prompts(sd.text_encoder, as_released=False)        # (n_classes + 1, 77, C)
    names = list(images.classes) + [EMPTY]
    pairs = list(itertools.combinations(images.classes, 2)) + [(c, EMPTY) for c in images.classes]
    schedule = NoiseSchedule.sd_v1()
    dtype = next(sd.unet.parameters()).dtype
    out = {}
    for t in timesteps:
        tt = torch.full((len(z0),), t, dtype=torch.long)
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + t))
        z_t = schedule.q_sample(z0, tt, noise).to(sd.device, dtype)            # the same z_t for every prompt
        eps = {name: sd.unet(z_t, tt.to(sd.device), contexts[i].expand(len(z0), -1, -1)).float()
               for i, name in enumerate(names)}                                # (N, 4, h, w) each
        rms = {name: e.pow(2).mean().sqrt() for name, e in eps.items()}
        out[t] = {f"{a}|{b}": ((eps[a] - eps[b]).pow(2).mean().sqrt() / rms[a]).item() for a, b in pairs}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="class folders or SPLIT.json:FOLD:PART (the adapters' training set)")
    p.add_argument("--checkpoint", default="weights/tiny/tiny-sd.safetensors", help="SD v1 base")
    p.add_argument("--lora", default=None, help="adapter file (none: the base alone)")
    p.add_argument("--per-class", type=int, default=8, help="images per class (default: 8)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[200, 500, 800], help="steps t in [0, 999]")
    p.add_argument("--resolution", type=int, default=64, help="Resize + center crop side, px (default: 64)")
    p.add_argument("--seed", type=int, default=0, help="the noise of step t is drawn with seed + t")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the table here")
    args = p.parse_args(argv)
    bad = [t for t in args.timesteps if not 0 <= t < 1000]
    if bad or args.per_class < 1:
        p.error(f"--timesteps must lie in [0, 999] (got {bad})" if bad else "--per-class must be at least 1")

    sd = load_model(args.checkpoint, args.lora, device=args.device)
    images = TrainImages(first_per_class(resolve_training_images(args.data), args.per_class),
                         args.resolution, show_progress=False)
    table = class_dependence(sd, images, args.timesteps, args.seed)
    pairs = list(next(iter(table.values())))
    print("| t | " + " | ".join(pairs) + " |")
    print("|---|" + "---|" * len(pairs))
    for t, row in table.items():
        print(f"| {t} | " + " | ".join(f"{100 * row[k]:.2f}%" for k in pairs) + " |")
    if args.json:
        write_json_atomic(Path(args.json), {"args": vars(args), "lora_sha256": getattr(sd, "lora_sha256", None),
                                            "n_images": len(images), "d": {str(t): r for t, r in table.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
