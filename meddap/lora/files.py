"""Adapter files: meddap's own safetensors format and the diffusers
attention-processor format that the MEDDAP authors published.

Own format (`LoRAFormat.MEDDAP`): a safetensors file with float32 tensors named
as in the adapted UNet's state_dict,

    input_blocks.1.1.transformer_blocks.0.attn2.to_q.lora_down   (r, k)
    input_blocks.1.1.transformer_blocks.0.attn2.to_q.lora_up     (d, r)

optionally the rows of new tokens (meddap.lora.new_tokens: prompt words the base's
text tower never trained, learned beside the adapters),

    new_tokens.ids    (n,) int64: token ids
    new_tokens.rows   (n, D) float32: their token-embedding rows

and string metadata in the spirit of kohya's `ss_*` keys:

    meddap_format          "meddap-lora" (identifies the format)
    meddap_format_version  "1"
    meddap_rank            r, e.g. "4"
    meddap_alpha           alpha, e.g. "4.0"; ΔW = (alpha/r) · up · down
    meddap_targets         JSON: "cross", "all" or a list of layer-name patterns
    meddap_base_sha256     SHA-256 of the base checkpoint trained on ("" if unknown)
    meddap_base_config     "sd-v1.4" or "tiny" ("" if unknown)
    meddap_training_args   JSON object of the training run config ("{}" if none)
    meddap_step            optimisation steps taken ("" if unknown)

Diffusers format (`LoRAFormat.DIFFUSERS`, `LoRAAttnProcessor` weights, scale 1):

    down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight  (r, k)
    down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight    (d, r)

Its block names are diffusers' (`DIFFUSERS_TO_COMPVIS_BLOCKS`), `to_out_lora`
is CompVis' `to_out.0`, and the update is W0 + up·down: on export the scale
alpha/r is folded into `up`; on import alpha = r. It has no place for new tokens.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from meddap.errors import MeddapError
from meddap.io import sha256_file
from meddap.lora.adapter import TARGET_PRESETS, LoRALinear, inject_lora, lora_layers, lora_state_dict
from meddap.models.checkpoint import read_safetensors, write_safetensors


class LoRAFormat(Enum):
    MEDDAP = "meddap"
    DIFFUSERS = "diffusers"


FORMAT_TAG = "meddap-lora"
FORMAT_VERSION = "1"
NEW_TOKEN_IDS, NEW_TOKEN_ROWS = "new_tokens.ids", "new_tokens.rows"

# --- diffusers <-> CompVis block names --------------------------------------
# SD v1's UNet has two ResBlocks per resolution level (num_res_blocks = 2), so
# CompVis numbers three input blocks per level: two ResBlock(+SpatialTransformer)
# blocks and one Downsample (input_blocks.0 is conv_in); on the way up, three
# output blocks per level, each ResBlock(+SpatialTransformer)(+Upsample).
# diffusers' down_blocks.0-2 / up_blocks.1-3 are the levels that attend:
#   down_blocks.i.attentions.j  ->  input_blocks.{3i + j + 1}.1   (i = 0..2, j = 0..1)
#   mid_block.attentions.0      ->  middle_block.1
#   up_blocks.i.attentions.j    ->  output_blocks.{3i + j}.1      (i = 1..3, j = 0..2)
# e.g. down_blocks.1.attentions.1 -> input_blocks.5.1, up_blocks.3.attentions.2 -> output_blocks.11.1.
_BLOCKS_PER_LEVEL = 3   # num_res_blocks + 1


def _build_block_table() -> dict[str, str]:
    table = {}
    for i in range(3):
        for j in range(2):
            table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{_BLOCKS_PER_LEVEL * i + j + 1}.1"
    table["mid_block.attentions.0"] = "middle_block.1"
    for i in range(1, 4):
        for j in range(3):
            table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{_BLOCKS_PER_LEVEL * i + j}.1"
    return table


DIFFUSERS_TO_COMPVIS_BLOCKS: dict[str, str] = _build_block_table()
COMPVIS_TO_DIFFUSERS_BLOCKS: dict[str, str] = {v: k for k, v in DIFFUSERS_TO_COMPVIS_BLOCKS.items()}

# down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight
_DIFFUSERS_KEY = re.compile(
    r"^(?P<block>(?:down|up)_blocks\.\d+\.attentions\.\d+|mid_block\.attentions\.0)"
    r"\.(?P<inner>transformer_blocks\.\d+\.attn[12])\.processor"
    r"\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
# input_blocks.1.1.transformer_blocks.0.attn1.to_q  (+ .lora_down / .lora_up)
_COMPVIS_LAYER = re.compile(
    r"^(?P<block>input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)"
    r"\.(?P<inner>transformer_blocks\.\d+\.attn[12])\.(?P<proj>to_q|to_k|to_v|to_out\.0)$")


def diffusers_key_to_meddap(key: str) -> str | None:
    """diffusers processor key -> our tensor key, or None if it is not one."""
    m = _DIFFUSERS_KEY.match(key)
    if m is None or m["block"] not in DIFFUSERS_TO_COMPVIS_BLOCKS:
        return None
    proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
    return f"{DIFFUSERS_TO_COMPVIS_BLOCKS[m['block']]}.{m['inner']}.{proj}.lora_{m['part']}"


def meddap_key_to_diffusers(key: str) -> str:
    """Our tensor key -> diffusers processor key; an error for layers the
    processor format cannot hold (anything but attention q/k/v/out)."""
    layer, _, part = key.rpartition(".lora_")
    m = _COMPVIS_LAYER.match(layer)
    if m is None or part not in ("down", "up"):
        raise MeddapError(f"adapter tensor {key!r} is not on an attention projection "
                          f"(to_q/to_k/to_v/to_out.0 of attn1/attn2); the diffusers "
                          f"attention-processor format cannot hold it. Keep the meddap format.")
    proj = "to_out" if m["proj"] == "to_out.0" else m["proj"]
    return f"{COMPVIS_TO_DIFFUSERS_BLOCKS[m['block']]}.{m['inner']}.processor.{proj}_lora.{part}.weight"


# --- reading -----------------------------------------------------------------
@dataclass
class LoRAFile:
    """An adapter file's content in our naming, whatever format it came in."""
    format: LoRAFormat
    tensors: dict[str, torch.Tensor]   # "{layer}.lora_down" (r, k), "{layer}.lora_up" (d, r)
    rank: int
    alpha: float
    metadata: dict[str, str] = field(default_factory=dict)   # meddap_* keys, as stored
    new_tokens: tuple[torch.Tensor, torch.Tensor] | None = None   # (ids (n,), rows (n, D)), meddap format

    def layers(self) -> list[str]:
        return sorted({k.rpartition(".lora_")[0] for k in self.tensors})


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise MeddapError(f"adapter file {path} does not exist.")
    try:
        return read_safetensors(path)
    except (MeddapError, OSError) as e:
        detail = str(e).removeprefix(f"{path}: ")
        raise MeddapError(f"adapter file {path} is not a readable safetensors file ({detail}); "
                          f"expected a meddap or diffusers LoRA .safetensors file.") from None


def _check_pairs(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """Every layer has a (r, k) down and a (d, r) up of one rank r; return r."""
    ranks = set()
    for layer in {k.rpartition(".lora_")[0] for k in tensors}:
        down, up = tensors.get(f"{layer}.lora_down"), tensors.get(f"{layer}.lora_up")
        if down is None or up is None or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise MeddapError(f"adapter file {path}: layer {layer} needs a down (r, k) and an up "
                              f"(d, r) matrix; found down {None if down is None else list(down.shape)}, "
                              f"up {None if up is None else list(up.shape)}.")
        ranks.add(down.shape[0])
    if len(ranks) != 1:
        raise MeddapError(f"adapter file {path} mixes ranks {sorted(ranks)}; expected one rank.")
    return ranks.pop()


def _pop_new_tokens(path: Path, raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Take the new-token tensors out of `raw`: both or neither, (n,) integer ids and (n, D) rows."""
    ids, rows = raw.pop(NEW_TOKEN_IDS, None), raw.pop(NEW_TOKEN_ROWS, None)
    if ids is None and rows is None:
        return None
    if (ids is None or rows is None or ids.ndim != 1 or ids.dtype.is_floating_point or rows.ndim != 2
            or rows.shape[0] != ids.shape[0]):
        raise MeddapError(f"adapter file {path}: new tokens need {NEW_TOKEN_IDS!r} (n,) integer ids and "
                          f"{NEW_TOKEN_ROWS!r} (n, D) rows; found "
                          f"{None if ids is None else list(ids.shape)} and {None if rows is None else list(rows.shape)}.")
    return ids.long(), rows.float()


def read_lora_file(path: str | Path) -> LoRAFile:
    """Read a meddap or diffusers adapter file (detected from its metadata and keys)."""
    path = Path(path)
    raw, meta = _read_safetensors(path)
    if not raw:
        raise MeddapError(f"adapter file {path} holds no tensors.")
    if meta.get("meddap_format") == FORMAT_TAG:
        new_tokens = _pop_new_tokens(path, raw)
        bad = [k for k in raw if not (k.endswith(".lora_down") or k.endswith(".lora_up"))]
        if bad:
            raise MeddapError(f"adapter file {path}: tensor {bad[0]!r} is not a '.lora_down' or "
                              f"'.lora_up' adapter matrix.")
        tensors = {k: v.float() for k, v in raw.items()}
        rank = _check_pairs(path, tensors)
        if meta.get("meddap_rank") != str(rank):
            raise MeddapError(f"adapter file {path}: metadata meddap_rank={meta.get('meddap_rank')!r} "
                              f"but the tensors have rank {rank}.")
        try:
            alpha = float(meta["meddap_alpha"])
        except (KeyError, ValueError):
            raise MeddapError(f"adapter file {path}: metadata meddap_alpha="
                              f"{meta.get('meddap_alpha')!r} is not a number.") from None
        return LoRAFile(LoRAFormat.MEDDAP, tensors, rank, alpha,
                        {k: v for k, v in meta.items() if k.startswith("meddap_")}, new_tokens)
    tensors = {}
    for k, v in raw.items():
        ours = diffusers_key_to_meddap(k)
        if ours is None:
            raise MeddapError(f"adapter file {path}: tensor {k!r} is neither meddap-format (no "
                              f"'meddap_format' metadata) nor a diffusers attention-processor key "
                              f"such as 'down_blocks.0.attentions.0.transformer_blocks.0.attn1."
                              f"processor.to_q_lora.down.weight'.")
        tensors[ours] = v.float()
    rank = _check_pairs(path, tensors)
    # The processor format has no alpha: W = W0 + up·down, i.e. alpha = r.
    return LoRAFile(LoRAFormat.DIFFUSERS, tensors, rank, float(rank), {})


# --- writing -----------------------------------------------------------------
def describe_targets(layers: list[str]) -> str | list[str]:
    """A preset name ('cross', 'all') when the layers are exactly those of the preset in
    SD v1, else the layer names (a pattern list that selects exactly these layers)."""
    for name, patterns in TARGET_PRESETS.items():
        expected = {f"{b}.transformer_blocks.0.{p.removeprefix('*.')}" for b in COMPVIS_TO_DIFFUSERS_BLOCKS
                    for p in patterns}
        if set(layers) == expected:
            return name
    return sorted(layers)


def meddap_metadata(rank: int, alpha: float, targets, base_sha256: str | None = None,
                    base_config: str | None = None, training_args: dict | None = None,
                    step: int | None = None) -> dict[str, str]:
    """The metadata block of the own format (all values are strings)."""
    return {
        "meddap_format": FORMAT_TAG,
        "meddap_format_version": FORMAT_VERSION,
        "meddap_rank": str(rank),
        "meddap_alpha": repr(float(alpha)),
        "meddap_targets": json.dumps(targets),
        "meddap_base_sha256": base_sha256 or "",
        "meddap_base_config": base_config or "",
        "meddap_training_args": json.dumps(training_args or {}, sort_keys=True),
        "meddap_step": "" if step is None else str(step),
    }


def write_lora_file(path: str | Path, lora: LoRAFile, to: LoRAFormat | str) -> None:
    """Write `lora` in format `to`, atomically (a crash leaves no partial file)."""
    to = LoRAFormat(to)
    if to is LoRAFormat.MEDDAP:
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in lora.tensors.items()}
        if lora.new_tokens is not None:
            ids, rows = lora.new_tokens
            tensors[NEW_TOKEN_IDS] = ids.detach().long().contiguous().cpu()
            tensors[NEW_TOKEN_ROWS] = rows.detach().float().contiguous().cpu()
        meta = lora.metadata if lora.metadata.get("meddap_format") == FORMAT_TAG else meddap_metadata(
            lora.rank, lora.alpha, describe_targets(lora.layers()))
    else:
        if lora.new_tokens is not None:
            raise MeddapError(f"{path}: the adapter carries {len(lora.new_tokens[0])} new-token "
                              f"embeddings, which the diffusers attention-processor format cannot "
                              f"hold. Keep the meddap format.")
        scale = lora.alpha / lora.rank   # fold alpha/r into up: the processor format has scale 1
        tensors = {}
        for k, v in lora.tensors.items():
            v = v.detach().float().cpu()
            if k.endswith(".lora_up") and scale != 1.0:
                v = v * scale
            tensors[meddap_key_to_diffusers(k)] = v.contiguous()
        meta = {"format": "pt"}   # what the authors' file (and diffusers) carries
    write_safetensors(path, tensors, meta)


# --- the UNet-facing API -------------------------------------------------------
_SAVE_KEYS = ("targets", "base_sha256", "base_config", "training_args", "step")


def save_lora(unet: nn.Module, path: str | Path, metadata: dict | None = None,
              to: LoRAFormat | str = LoRAFormat.MEDDAP,
              new_tokens: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Write the UNet's adapters (atomically) in format `to`. `metadata` may give
    `targets`, `base_sha256`, `base_config`, `training_args` (a dict) and `step`;
    the diffusers format keeps none of it. `new_tokens`: (ids, rows) of the text
    tower's new tokens (meddap format only)."""
    metadata = dict(metadata or {})
    unknown = sorted(set(metadata) - set(_SAVE_KEYS))
    if unknown:
        raise MeddapError(f"unknown adapter metadata keys {unknown}; accepted: {', '.join(_SAVE_KEYS)}.")
    layers = lora_layers(unet)
    if not layers:
        raise MeddapError("this UNet carries no LoRA adapters to save.")
    (rank,) = {m.rank for m in layers.values()}
    (alpha,) = {m.alpha for m in layers.values()}
    targets = metadata.pop("targets", None) or describe_targets(list(layers))
    if not isinstance(targets, str):
        targets = list(targets)
    lora = LoRAFile(LoRAFormat.MEDDAP, lora_state_dict(unet), rank, alpha,
                    meddap_metadata(rank, alpha, targets, **metadata), new_tokens)
    write_lora_file(path, lora, to)


@torch.no_grad()
def load_lora(unet: nn.Module, path: str | Path) -> dict:
    """Load a meddap or diffusers adapter file into `unet`, injecting adapters
    first if it has none. The file must fit this UNet: every layer must exist
    with matching widths (an SD 2 adapter, say, has 1024-wide k/v inputs where
    SD v1 has 768), and adapters already present must be the same layers, rank
    and alpha. Returns a summary: format, rank, alpha, layers, metadata, sha256, and
    new_tokens ((ids, rows) or None: the text tower's, for `apply_new_tokens`)."""
    path = Path(path)
    lora = read_lora_file(path)
    modules = dict(unet.named_modules())
    for layer in lora.layers():
        m = modules.get(layer)
        if not isinstance(m, (nn.Linear, LoRALinear)):
            raise MeddapError(f"adapter file {path} adapts layer {layer!r}, which this UNet "
                              f"{'does not have' if m is None else 'has but not as a linear layer'}; "
                              f"the adapter was made for another architecture.")
        down, up = lora.tensors[f"{layer}.lora_down"], lora.tensors[f"{layer}.lora_up"]
        want_down, want_up = (lora.rank, m.in_features), (m.out_features, lora.rank)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise MeddapError(f"adapter file {path}, layer {layer}: down {list(down.shape)} and up "
                              f"{list(up.shape)} do not fit a {m.in_features} -> {m.out_features} "
                              f"projection (expected {list(want_down)} and {list(want_up)}); the "
                              f"adapter was made for another architecture.")
    present = lora_layers(unet)
    if not present:
        # A private generator: the random init is overwritten below and the global RNG stays untouched.
        inject_lora(unet, lora.rank, lora.alpha, targets=lora.layers(), generator=torch.Generator())
    else:
        sample = next(iter(present.values()))
        if (sorted(present) != lora.layers() or sample.rank != lora.rank or sample.alpha != lora.alpha
                or any(m.merged for m in present.values())):
            raise MeddapError(f"this UNet already carries other (or merged) adapters ({len(present)} "
                              f"layers, rank {sample.rank}, alpha {sample.alpha:g}) than {path} "
                              f"({len(lora.layers())} layers, rank {lora.rank}, alpha {lora.alpha:g}); "
                              f"call meddap.lora.remove_lora first.")
    for layer, m in lora_layers(unet).items():
        m.lora_down.copy_(lora.tensors[f"{layer}.lora_down"])
        m.lora_up.copy_(lora.tensors[f"{layer}.lora_up"])
    return {"path": str(path), "sha256": sha256_file(path), "format": lora.format.value,
            "rank": lora.rank, "alpha": lora.alpha, "layers": len(lora.layers()),
            "metadata": lora.metadata, "new_tokens": lora.new_tokens}
