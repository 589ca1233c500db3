"""USLoRA: low-rank adapters on the UNet's attention projections (MEDDAP section 3.1, Eq. 3).

MEDDAP Eq. 3 (after LoRA, Hu et al. 2021, arXiv 2106.09685, Eq. 3) adapts a
frozen projection W0 by a product of two thin matrices:

    W = W0 + A B,   A ∈ R^{d×r}, B ∈ R^{r×k}, r ≪ min(d, k)

and here, as in microsoft/loralib, with the scale α/r of LoRA section 4.1:

    W = W0 + (alpha / r) · up · down

    code        paper  shape                                 init
    weight      W0     (d, k) = (out_features, in_features)  the base checkpoint, frozen
    bias        b0     (d,) or None                          the base checkpoint, frozen
    lora_up     A      (d, r)                                zeros
    lora_down   B      (r, k)                                N(0, (1/r)^2)
    scaling     α/r    scalar                                alpha defaults to r: scale 1

(The LoRA paper itself writes W0 + BA with B ∈ R^{d×r}; MEDDAP swaps the
letters. `up`/`down` are diffusers' names, used by the authors' released file.)

`LoRALinear` replaces an `nn.Linear` at the same module path and keeps its
`weight` and `bias` parameters (the very same tensors), so the UNet's
state_dict keys for the base are unchanged: a base checkpoint still loads
after injection (`load_base_state_dict`), and the adapters add exactly the
keys `<layer>.lora_down` and `<layer>.lora_up`.

Init: `down` follows diffusers' `LoRALinearLayer` (normal, std 1/r), which
the authors trained with; loralib uses a Kaiming-uniform `down` instead. `up`
is zero, so the adapted UNet starts as the base one, bit for bit (see
`LoRALinear.forward`).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from meddap.errors import MeddapError
from meddap.settings import above, in_range, setting

# --- target presets ------------------------------------------------------------
# The named sets of adapted layers: `--targets cross`, `[lora] targets = "all"`.
# This table is the only list of them; the CLI help, the parse rule and
# `target_patterns` read it. Patterns are shell-style globs (Python `fnmatch`,
# case-sensitive) over the full dotted names of the UNet's `nn.Linear`
# modules; `*` also matches dots.
_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    # MEDDAP section 3.1: cross-attention W_q, W_k, W_v, W_o (SD v1: 64 layers in its 16 attn2)
    "cross": tuple(f"*.attn2.{p}" for p in _PROJECTIONS),
    # the authors' released weights: self- and cross-attention (SD v1: 128 layers in 16 attn1 + 16 attn2)
    "all": tuple(f"*.{a}.{p}" for a in ("attn1", "attn2") for p in _PROJECTIONS),
}


def _preset_names() -> str:
    """The preset names, for messages: 'cross', 'all'."""
    return ", ".join(repr(name) for name in TARGET_PRESETS)


def parse_targets(value):
    """What the user wrote -> a preset name or a tuple of patterns (the parse rule of
    `targets`): "cross" and ["cross"] -> "cross"; ["all"] -> "all"; a pattern or a list
    of patterns -> a tuple of them. Anything else is returned as is, for `check_targets`."""
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, (list, tuple)):
        return value
    if len(values) == 1 and values[0] in TARGET_PRESETS:
        return values[0]
    return tuple(values)


def check_targets(value) -> str | None:
    """A settings check: None for a preset name or a non-empty tuple of non-empty patterns."""
    if isinstance(value, str):
        if value in TARGET_PRESETS:
            return None
        return (f"is not a target preset ({_preset_names()}); give a preset or a list of "
                f"layer-name patterns such as '*.attn2.to_k'")
    if isinstance(value, tuple) and value and all(isinstance(p, str) and p for p in value):
        return None
    return (f"must be a preset ({_preset_names()}) or a non-empty list of layer-name patterns "
            f"such as '*.attn2.to_k'")


def target_patterns(targets: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name ('cross', 'all', ...) or a list of glob patterns -> the patterns."""
    if isinstance(targets, str):
        if targets not in TARGET_PRESETS:
            raise MeddapError(f"unknown LoRA target set {targets!r}; give a preset "
                              f"({_preset_names()}: meddap.lora.TARGET_PRESETS) or a list of "
                              f"layer-name patterns such as '*.attn2.to_k'.")
        return TARGET_PRESETS[targets]
    patterns = tuple(targets)
    complaint = check_targets(patterns)
    if complaint:
        raise MeddapError(f"LoRA targets {targets!r} {complaint}.")
    return patterns


_TARGETS_HELP = ("a preset (" + "; ".join(f"{name}: {' '.join(patterns)}" for name, patterns in
                                          TARGET_PRESETS.items())
                 + ") or fnmatch patterns over layer names, e.g. '*.attn2.to_k'")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """The adapters' shape, MEDDAP Eq. 3: rank r, alpha (scale alpha/r) and the adapted
    layers. `meddap lora-info` reads these settings; `LoRARunConfig` extends them."""
    rank: int = setting(4, help="LoRA rank r (paper: 4)", check=in_range(1, 1024, " (the paper uses 4)"))
    alpha: float | None = setting(None, help="LoRA alpha; the update is scaled by alpha/rank "
                                             "(None: alpha = rank, scale 1, as the authors' weights)",
                                  check=above(0))
    targets: str | tuple[str, ...] = setting("cross", help=_TARGETS_HELP, check=check_targets,
                                             parse=parse_targets, nargs="+")


class LoRALinear(nn.Module):
    """y = W0 x + b0 + (alpha/r) · up(down(x)), the base kept intact (MEDDAP Eq. 3).

    x: (..., k) -> y: (..., d). The adapter weights are float32 whatever the
    base dtype; see `forward`.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight   # W0: (d, k), the same Parameter as the base layer's
        self.bias = base.bias       # b0: (d,) or None
        self.rank = rank
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / rank   # α/r (LoRA section 4.1); the only place it is formed
        self.multiplier = 1.0              # user strength on top of α/r (set_lora_scale)
        self.enabled = True
        self.merged = False
        # Drawn on the CPU, so a seed gives the same init on every device.
        down = torch.empty(rank, self.in_features).normal_(0.0, 1.0 / rank, generator=generator)
        device = base.weight.device
        self.lora_down = nn.Parameter(down.to(device))                                     # B: (r, k)
        self.lora_up = nn.Parameter(torch.zeros(self.out_features, rank, device=device))   # A: (d, r)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (alpha/r) · multiplier · up @ down: (d, r) @ (r, k) -> (d, k), float32."""
        return (self.scaling * self.multiplier) * (self.lora_up @ self.lora_down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)       # (..., d): exactly nn.Linear's forward
        if self.merged or not self.enabled:
            return y
        # The adapter branch runs in float32 on a float32 copy of x and is added
        # back in the base dtype. With up = 0 it adds exact zeros, so y keeps its bits.
        h = F.linear(x.float(), self.lora_down)       # (..., r)
        delta = F.linear(h, self.lora_up)             # (..., d)
        return y + ((self.scaling * self.multiplier) * delta).to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, alpha={self.alpha:g}, "
                f"enabled={self.enabled}, merged={self.merged}")


def find_targets(unet: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Names of the `nn.Linear` (or already adapted) layers matched by `targets`,
    in module order. A pattern that matches no layer is an error naming it."""
    patterns = target_patterns(targets)
    linear = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, LoRALinear))]
    for p in patterns:
        if not fnmatch.filter(linear, p):
            raise MeddapError(f"LoRA target pattern {p!r} matches no linear layer of the UNet; "
                              f"patterns are fnmatch globs over names such as "
                              f"'input_blocks.1.1.transformer_blocks.0.attn2.to_k' "
                              f"(e.g. '*.attn2.to_k', '*.attn1.to_out.0').")
    return [n for n in linear if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def check_rank_alpha(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise MeddapError(f"LoRA rank {rank!r} is not a positive integer; the paper uses 4 "
                          f"(and compares 2, 4 and 8).")
    if alpha is not None and not (isinstance(alpha, (int, float)) and 0 < alpha < float("inf")):
        raise MeddapError(f"LoRA alpha {alpha!r} is not a positive number; leave it unset for "
                          f"alpha = rank (scale 1, as the authors' weights).")


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)   # nn.Sequential children are named "0", "1", ...


def inject_lora(unet: nn.Module, rank: int = 4, alpha: float | None = None,
                targets: str | Sequence[str] = "cross",
                generator: torch.Generator | None = None) -> list[str]:
    """Replace each targeted `nn.Linear` by a `LoRALinear` around it; return their names.

    Freezes every base parameter of `unet`: afterwards exactly the adapters
    (float32, on the base weights' device) require gradients. `generator`, a
    CPU torch.Generator, draws the random `down` init (the global RNG if None).
    """
    check_rank_alpha(rank, alpha)
    if lora_layers(unet):
        raise MeddapError("this UNet already carries LoRA adapters; call meddap.lora.remove_lora "
                          "first to replace them.")
    names = find_targets(unet, targets)
    unet.requires_grad_(False)
    for name in names:
        _set_submodule(unet, name, LoRALinear(unet.get_submodule(name), rank, alpha, generator))
    return names


def lora_layers(unet: nn.Module) -> dict[str, LoRALinear]:
    """Adapted layers by module name, in module order."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters: every layer's `lora_down` and `lora_up`."""
    return [p for m in lora_layers(unet).values() for p in (m.lora_down, m.lora_up)]


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """`{layer}.lora_down` (r, k) and `{layer}.lora_up` (d, r), as in unet.state_dict()."""
    out = {}
    for name, m in lora_layers(unet).items():
        out[f"{name}.lora_down"] = m.lora_down.detach()
        out[f"{name}.lora_up"] = m.lora_up.detach()
    return out


def count_parameters(unet: nn.Module) -> tuple[int, int]:
    """(adapter parameters, base UNet parameters). Works on the meta device."""
    adapter = sum(p.numel() for p in lora_parameters(unet))
    total = sum(p.numel() for p in unet.parameters())
    return adapter, total - adapter


def load_base_state_dict(unet: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load base (non-adapter) weights into an adapted UNet: strict on every
    base key; the adapter keys are the only ones allowed to be absent."""
    if any(m.merged for m in lora_layers(unet).values()):
        raise MeddapError("cannot load base weights while adapters are merged into them; "
                          "call meddap.lora.unmerge_lora first.")
    missing, unexpected = unet.load_state_dict(state_dict, strict=False)
    adapter_keys = set(lora_state_dict(unet))
    missing = [k for k in missing if k not in adapter_keys]
    if missing or unexpected:
        raise MeddapError(f"base state dict does not fit this UNet: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]} (showing at most 5 of each).")


def _layers_or_error(unet: nn.Module) -> dict[str, LoRALinear]:
    layers = lora_layers(unet)
    if not layers:
        raise MeddapError("this UNet carries no LoRA adapters; inject or load some first "
                          "(meddap.lora.inject_lora / load_lora).")
    return layers


@torch.no_grad()
def merge_lora(unet: nn.Module) -> None:
    """W0 <- W0 + ΔW in every adapted layer (MEDDAP Eq. 3 folded into the base
    weight), so inference costs nothing extra. In fp16/bf16 this rounds ΔW to
    the base dtype; undo with `unmerge_lora`."""
    for m in _layers_or_error(unet).values():
        if not m.merged:
            m.weight.add_(m.delta_weight().to(m.weight.dtype))
            m.merged = True


@torch.no_grad()
def unmerge_lora(unet: nn.Module) -> None:
    """W0 + ΔW <- W0: subtract what `merge_lora` added (equal up to rounding)."""
    for m in _layers_or_error(unet).values():
        if m.merged:
            m.weight.sub_(m.delta_weight().to(m.weight.dtype))
            m.merged = False


def _require_unmerged(layers: dict[str, LoRALinear], what: str) -> None:
    if any(m.merged for m in layers.values()):
        raise MeddapError(f"cannot {what} while adapters are merged into the base weights; "
                          f"call meddap.lora.unmerge_lora first.")


def enable_lora(unet: nn.Module) -> None:
    for m in _layers_or_error(unet).values():
        m.enabled = True


def disable_lora(unet: nn.Module) -> None:
    """Run the base UNet alone (adapters kept, skipped)."""
    layers = _layers_or_error(unet)
    _require_unmerged(layers, "disable adapters")
    for m in layers.values():
        m.enabled = False


def set_lora_scale(unet: nn.Module, multiplier: float) -> None:
    """ΔW = multiplier · (alpha/r) · up · down; 1 is the trained strength, 0 the base."""
    layers = _layers_or_error(unet)
    _require_unmerged(layers, "change the adapter scale")
    for m in layers.values():
        m.multiplier = float(multiplier)


def remove_lora(unet: nn.Module) -> None:
    """Put plain `nn.Linear` layers (the same base tensors) back in place of the adapters."""
    layers = lora_layers(unet)
    _require_unmerged(layers, "remove adapters")
    for name, m in layers.items():
        base = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        base.weight, base.bias = m.weight, m.bias
        _set_submodule(unet, name, base)
