"""The three downstream classifiers of MEDDAP (section 4, Tables 2-3) and their
initial weights.

ResNet34, SqueezeNet1.1 and DenseNet121 are torchvision's architectures with
the classification head built for k classes (k = the number of training
classes). Module names are torchvision's, so torchvision's ImageNet files load
with `load_state_dict(strict=True)` apart from the head, which is the only
tensor whose shape depends on k:

    resnet34       fc.weight (k, 512), fc.bias (k,)
    squeezenet1.1  classifier.1.weight (k, 512, 1, 1), classifier.1.bias (k,)
    densenet121    classifier.weight (k, 1024), classifier.bias (k,)

ImageNet initialisation (what the released code used) is read from
`weights/<torchvision file name>` when that file is there; nothing is ever
downloaded. Without it the network starts from torchvision's random init,
and every log line and result file says so (`imagenet_init: false`).

Every condition of an experiment must start from the same weights. The
released `evaluate_new.py` reused one network across conditions, so each
condition began where the previous one ended (../shared/reference/
paper_facts.md, "The classifier protocol in the released code"). Here the
initial state is a pure function of (architecture, k, seed, ImageNet file),
saved once as `init.pt` and loaded by every condition.
"""
from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from meddap.errors import MeddapError
from meddap.io import sha256_file, write_bytes_atomic


class Arch(Enum):
    """The command-line names of the three networks."""
    RESNET34 = "resnet34"
    SQUEEZENET1_1 = "squeezenet1.1"
    DENSENET121 = "densenet121"


# torchvision's file names, as in the URLs of
# torchvision.models.{ResNet34,SqueezeNet1_1,DenseNet121}_Weights.IMAGENET1K_V1
# (https://download.pytorch.org/models/<name>). The 8 hex digits are the start
# of the file's SHA-256, which torchvision checks and so do we.
IMAGENET_FILES: dict[Arch, str] = {
    Arch.RESNET34: "resnet34-b627a593.pth",
    Arch.SQUEEZENET1_1: "squeezenet1_1-b8a52dc0.pth",
    Arch.DENSENET121: "densenet121-a639ec97.pth",
}

HEAD_KEYS: dict[Arch, tuple[str, str]] = {
    Arch.RESNET34: ("fc.weight", "fc.bias"),
    Arch.SQUEEZENET1_1: ("classifier.1.weight", "classifier.1.bias"),
    Arch.DENSENET121: ("classifier.weight", "classifier.bias"),
}

# Old DenseNet checkpoints (including torchvision's own densenet121-a639ec97.pth)
# name a dense layer's modules `norm.1`, `conv.2`, ...; today's modules are
# `norm1`, `conv2`. Same pattern as torchvision.models.densenet._load_state_dict.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def parse_arch(name: str | Arch) -> Arch:
    if isinstance(name, Arch):
        return name
    for arch in Arch:
        if name == arch.value:
            return arch
    raise MeddapError(f"unknown architecture {name!r}; accepted: "
                      f"{', '.join(a.value for a in Arch)}.")


def build_network(arch: Arch, num_classes: int) -> nn.Module:
    """torchvision's network with a k-class head, random init (uses the global
    torch RNG; call under a seeded `torch.random.fork_rng`)."""
    from torchvision import models
    if num_classes < 2:
        raise MeddapError(f"a classifier needs at least 2 classes; got {num_classes}.")
    if arch is Arch.RESNET34:
        return models.resnet34(weights=None, num_classes=num_classes)
    if arch is Arch.SQUEEZENET1_1:
        return models.squeezenet1_1(weights=None, num_classes=num_classes)
    return models.densenet121(weights=None, num_classes=num_classes)


def rename_old_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`features.denseblock1.denselayer1.norm.1.weight` -> `...denselayer1.norm1.weight`;
    other keys unchanged."""
    out = {}
    for key, value in state.items():
        m = _DENSENET_OLD_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def read_imagenet_state(arch: Arch, path: Path, check_hash: bool = True) -> dict[str, torch.Tensor]:
    """Read a torchvision ImageNet file; check its SHA-256 prefix against the
    file name like torchvision does; DenseNet keys renamed to today's names."""
    path = Path(path)
    expected = IMAGENET_FILES[arch]
    if check_hash:
        prefix = expected.rsplit("-", 1)[1].split(".")[0]
        digest = sha256_file(path)
        if not digest.startswith(prefix):
            raise MeddapError(
                f"weight file {path} is corrupt or not torchvision's file: its SHA-256 "
                f"starts {digest[:8]}, the name promises {prefix}; put the file from "
                f"https://download.pytorch.org/models/{expected} there, or remove it to "
                f"start from random init.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle/zip/runtime errors for broken files
        raise MeddapError(f"weight file {path} is not a readable torch checkpoint "
                          f"({type(e).__name__}: {e}); expected torchvision's {expected}.") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MeddapError(f"weight file {path} does not hold a state dict of tensors; "
                          f"expected torchvision's {expected}.")
    return rename_old_densenet_keys(state) if arch is Arch.DENSENET121 else state


def load_imagenet_body(model: nn.Module, arch: Arch, state: dict[str, torch.Tensor],
                       source: str) -> None:
    """Copy every ImageNet tensor except the 1000-class head into `model`;
    the key sets must match exactly and every body shape must agree."""
    head = set(HEAD_KEYS[arch])
    ours = model.state_dict()
    # Files saved before PyTorch 0.4.1 (densenet121-a639ec97.pth among them) lack
    # BatchNorm's `num_batches_tracked`; BatchNorm fills it with 0 on load, as do we.
    state = {**{k: torch.zeros((), dtype=torch.long) for k in ours
                if k.endswith(".num_batches_tracked") and k not in state}, **state}
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise MeddapError(f"weight file {source} does not match torchvision's {arch.value}: "
                          f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected "
                          f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}.")
    for key, value in state.items():
        if key not in head and value.shape != ours[key].shape:
            raise MeddapError(f"weight file {source}, tensor {key}: shape {tuple(value.shape)}, "
                              f"{arch.value} needs {tuple(ours[key].shape)}.")
    body = {k: v for k, v in state.items() if k not in head}
    model.load_state_dict({**ours, **body}, strict=True)


@dataclass(frozen=True)
class InitialState:
    """The weights every condition of one (architecture, k) starts from."""
    arch: Arch
    classes: tuple[str, ...]
    seed: int
    imagenet_init: bool            # False: torchvision random init (stated in results)
    weights_file: str | None       # the ImageNet file's name, when used
    weights_sha256: str | None
    state_dict: dict[str, torch.Tensor]

    def describe(self) -> str:
        if self.imagenet_init:
            return f"ImageNet init from {self.weights_file} (sha256 {self.weights_sha256[:12]})"
        return f"random init (seed {self.seed}; no ImageNet file in the weights folder)"

    def provenance(self) -> dict:
        return {"arch": self.arch.value, "classes": list(self.classes), "seed": self.seed,
                "imagenet_init": self.imagenet_init, "weights_file": self.weights_file,
                "weights_sha256": self.weights_sha256, "init_sha256": state_sha256(self.state_dict)}


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """A hash of the tensors' names and values (to show two runs started alike)."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def make_initial_state(arch: Arch, classes: list[str], seed: int,
                       weights_dir: str | Path | None) -> InitialState:
    """Random init from `seed` (head included), then the ImageNet body when
    `weights_dir/<torchvision name>` exists."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_network(arch, len(classes))
    weights_file = sha = None
    path = Path(weights_dir) / IMAGENET_FILES[arch] if weights_dir is not None else None
    if path is not None and path.is_file():
        load_imagenet_body(model, arch, read_imagenet_state(arch, path), str(path))
        weights_file, sha = path.name, sha256_file(path)
    return InitialState(arch, tuple(classes), seed, weights_file is not None, weights_file, sha,
                        {k: v.clone() for k, v in model.state_dict().items()})


def save_initial_state(init: InitialState, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save({**init.provenance(), "state_dict": init.state_dict}, buf)
    write_bytes_atomic(path, buf.getvalue())


def load_initial_state(path: str | Path) -> InitialState:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return InitialState(parse_arch(blob["arch"]), tuple(blob["classes"]), int(blob["seed"]),
                            bool(blob["imagenet_init"]), blob["weights_file"],
                            blob["weights_sha256"], blob["state_dict"])
    except MeddapError:
        raise
    except Exception as e:
        raise MeddapError(f"initial-weights file {path} is not a meddap init.pt "
                          f"({type(e).__name__}: {e}); delete it to make a new one.") from e


def obtain_initial_state(path: str | Path, arch: Arch, classes: list[str], seed: int,
                         weights_dir: str | Path | None) -> InitialState:
    """Load `path` if it exists (it must be for this architecture and these
    classes), else make the initial state and save it there."""
    path = Path(path)
    if path.exists():
        init = load_initial_state(path)
        if init.arch is not arch or list(init.classes) != list(classes):
            raise MeddapError(f"initial-weights file {path} is for {init.arch.value} with classes "
                              f"{list(init.classes)}; this run needs {arch.value} with classes "
                              f"{list(classes)}. Use another --init file.")
        return init
    init = make_initial_state(arch, classes, seed, weights_dir)
    save_initial_state(init, path)
    return init
