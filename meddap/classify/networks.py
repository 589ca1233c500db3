"""The three downstream classifiers of MEDDAP (section 4, Tables 2-3) and their
initial weights.

ResNet34, SqueezeNet1.1 and DenseNet121 are torchvision's architectures with
the classification head built for k classes (k = the number of training
classes). Module names are torchvision's, so torchvision's ImageNet files load
with `load_state_dict(strict=True)` apart from the head, whose tensors are the
only ones whose shape depends on k (`head_keys` of the table below).

The networks are one table, `ARCHITECTURES`: a record per network holds its
builder, its ImageNet file, its head keys, its Grad-CAM layer and the fix of
old checkpoint keys it needs. `Arch` (the command-line names), `parse_arch`,
the head replacement, Grad-CAM's layer and the CLI choices all read it, so a
new network is one record (and its tests).

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
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from meddap.errors import MeddapError
from meddap.io import UnreadableTorchFile, load_torch, read_torch_state_dict, save_torch_atomic, sha256_file

# Old DenseNet checkpoints (including torchvision's own densenet121-a639ec97.pth)
# name a dense layer's modules `norm.1`, `conv.2`, ...; today's modules are
# `norm1`, `conv2`. Same pattern as torchvision.models.densenet._load_state_dict.
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def rename_old_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`features.denseblock1.denselayer1.norm.1.weight` -> `...denselayer1.norm1.weight`;
    other keys unchanged."""
    out = {}
    for key, value in state.items():
        m = _DENSENET_OLD_KEY.match(key)
        out[m.group(1) + m.group(2) if m else key] = value
    return out


def _resnet34(num_classes: int) -> nn.Module:
    from torchvision.models import resnet34
    return resnet34(weights=None, num_classes=num_classes)


def _squeezenet1_1(num_classes: int) -> nn.Module:
    from torchvision.models import squeezenet1_1
    return squeezenet1_1(weights=None, num_classes=num_classes)


def _densenet121(num_classes: int) -> nn.Module:
    from torchvision.models import densenet121
    return densenet121(weights=None, num_classes=num_classes)


@dataclass(frozen=True)
class ArchSpec:
    """One downstream network.

    build(k): torchvision's network with a k-class head, random init.
    imagenet_file: torchvision's file name, as in the URL of its IMAGENET1K_V1
        weights (https://download.pytorch.org/models/<name>); the 8 hex digits
        after the last '-' start the file's SHA-256, which torchvision checks
        and so do we.
    head_keys: the parameters built for k classes (not copied from ImageNet).
    gradcam_layer: the module whose output is Grad-CAM's A (gradcam.py).
    rename_old_keys: the fix of the ImageNet file's key names, if it needs one.
    """
    build: Callable[[int], nn.Module]
    imagenet_file: str
    head_keys: tuple[str, ...]
    gradcam_layer: str
    rename_old_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None

    @property
    def hash_prefix(self) -> str:
        """'b627a593' of 'resnet34-b627a593.pth'."""
        return self.imagenet_file.rsplit("-", 1)[1].split(".")[0]


# The networks, by command-line name. Head shapes (k classes) and Grad-CAM's A
# for an input (B, 3, H, W):
#   resnet34       fc.weight (k, 512), fc.bias (k,);        layer4 (B, 512, H/32, W/32)
#   squeezenet1.1  classifier.1.weight (k, 512, 1, 1), classifier.1.bias (k,);
#                  features (B, 512, ~H/16, ~W/16), the last Fire module's concat
#   densenet121    classifier.weight (k, 1024), classifier.bias (k,);
#                  features (B, 1024, H/32, W/32), norm5's output
ARCHITECTURES: dict[str, ArchSpec] = {
    "resnet34": ArchSpec(build=_resnet34, imagenet_file="resnet34-b627a593.pth",
                         head_keys=("fc.weight", "fc.bias"), gradcam_layer="layer4"),
    "squeezenet1.1": ArchSpec(build=_squeezenet1_1, imagenet_file="squeezenet1_1-b8a52dc0.pth",
                              head_keys=("classifier.1.weight", "classifier.1.bias"),
                              gradcam_layer="features"),
    "densenet121": ArchSpec(build=_densenet121, imagenet_file="densenet121-a639ec97.pth",
                            head_keys=("classifier.weight", "classifier.bias"),
                            gradcam_layer="features", rename_old_keys=rename_old_densenet_keys),
}


class _ArchName(Enum):
    @property
    def spec(self) -> ArchSpec:
        """This network's record in ARCHITECTURES."""
        return ARCHITECTURES[self.value]


# The command-line names as an enum, made from the table:
# Arch.RESNET34 = "resnet34", Arch.SQUEEZENET1_1 = "squeezenet1.1", Arch.DENSENET121 = "densenet121".
Arch = _ArchName("Arch", {name.upper().replace(".", "_"): name for name in ARCHITECTURES},
                 module=__name__)


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
    if num_classes < 2:
        raise MeddapError(f"a classifier needs at least 2 classes; got {num_classes}.")
    return arch.spec.build(num_classes)


def network_from_state(arch: Arch, num_classes: int, state: dict[str, torch.Tensor]) -> nn.Module:
    """The network holding copies of `state`'s tensors (strict: every key, every shape).

    Built on the meta device, so torchvision's random initialisation, which `state`
    would overwrite, is never computed (about 1 s for resnet34 on the 2-core CPU)."""
    with torch.device("meta"):
        model = build_network(arch, num_classes)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:                          # a non-persistent buffer: the state cannot hold it
        raise MeddapError(f"{arch.value}: tensors {left} are not in a state_dict; build this network "
                          f"with build_network and load the state into it.")
    return model


def read_imagenet_state(arch: Arch, path: Path, check_hash: bool = True) -> dict[str, torch.Tensor]:
    """Read a torchvision ImageNet file; check its SHA-256 prefix against the
    file name like torchvision does; DenseNet keys renamed to today's names."""
    path = Path(path)
    spec = arch.spec
    expected = spec.imagenet_file
    if check_hash:
        prefix = spec.hash_prefix
        digest = sha256_file(path)
        if not digest.startswith(prefix):
            raise MeddapError(
                f"weight file {path} is corrupt or not torchvision's file: its SHA-256 "
                f"starts {digest[:8]}, the name promises {prefix}; put the file from "
                f"https://download.pytorch.org/models/{expected} there, or remove it to "
                f"start from random init.")
    state = read_torch_state_dict(path, what="weight file", expected=f"torchvision's {expected}")
    return spec.rename_old_keys(state) if spec.rename_old_keys else state


def load_imagenet_body(model: nn.Module, arch: Arch, state: dict[str, torch.Tensor],
                       source: str) -> None:
    """Copy every ImageNet tensor except the 1000-class head into `model`;
    the key sets must match exactly and every body shape must agree."""
    head = set(arch.spec.head_keys)
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
    path = Path(weights_dir) / arch.spec.imagenet_file if weights_dir is not None else None
    if path is not None and path.is_file():
        load_imagenet_body(model, arch, read_imagenet_state(arch, path), str(path))
        weights_file, sha = path.name, sha256_file(path)
    return InitialState(arch, tuple(classes), seed, weights_file is not None, weights_file, sha,
                        {k: v.clone() for k, v in model.state_dict().items()})


def save_initial_state(init: InitialState, path: str | Path) -> None:
    save_torch_atomic({**init.provenance(), "state_dict": init.state_dict}, path)


def load_initial_state(path: str | Path) -> InitialState:
    """The InitialState that `save_initial_state` wrote, read with torch.load(weights_only=True)
    (tensors and plain values only, never pickled code), or a MeddapError naming the file."""
    path = Path(path)
    redo = "delete it to make a new one, or give another --init file"
    try:
        blob = load_torch(path)
    except UnreadableTorchFile as e:
        raise MeddapError(f"initial-weights file {path} is not a meddap init.pt: {e.reason}; {redo}.") from None
    try:
        return InitialState(parse_arch(blob["arch"]), tuple(blob["classes"]), int(blob["seed"]),
                            bool(blob["imagenet_init"]), blob["weights_file"],
                            blob["weights_sha256"], blob["state_dict"])
    except MeddapError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        what = f"no entry {e.args[0]!r}" if isinstance(e, KeyError) else "entries of the wrong type"
        raise MeddapError(f"initial-weights file {path} is not a meddap init.pt ({what}; one holds "
                          f"arch, classes, seed, imagenet_init, weights_file, weights_sha256 and "
                          f"state_dict); {redo}.") from None


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
