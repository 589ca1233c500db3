"""The CLIP ViT-L/14 text encoder that conditions SD v1, and its tokenizer.

SD v1 (CompVis `FrozenCLIPEmbedder`) feeds the prompt through OpenAI CLIP's
text transformer and conditions the UNet's cross-attention on the *last
hidden state after the final LayerNorm*, all 77 positions, not on CLIP's
pooled, projected text feature. So this module stops at `ln_final` and has
no `text_projection` (SD v1 files do not carry one).

The transformer blocks below are written as open_clip's are
(`open_clip.transformer.Transformer`: pre-LayerNorm residual blocks,
`nn.MultiheadAttention` with a fused q/k/v `in_proj`, a QuickGELU MLP), with
the same module paths, so our parameter names are open_clip's. SD v1
checkpoints store the same weights under Hugging Face `CLIPTextModel` names;
`hf_to_open_clip` / `open_clip_to_hf` below are the one name map of the
project (STYLE.md habit 1), tested in both directions.

Of open_clip we use its tokenizer and vocabulary file only, and load its
`tokenizer.py` alone (`_open_clip_tokenizer`): `import open_clip.<anything>`
first runs the package's `__init__`, which imports torchvision and, where it
is installed, transformers. That cost 2.2 s per process on a 2-core AMD EPYC
(AVX-512), 65% of what loading SD's modules took, and every meddap command
and test subprocess paid it.
"""
from __future__ import annotations

import functools
import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn

from meddap.models.config import TextConfig

# Special tokens of OpenAI CLIP's BPE vocabulary (open_clip `bpe_simple_vocab_16e6.txt.gz`):
# 256 byte symbols + their 256 end-of-word forms + 48,894 merges = 49,406 entries,
# then <|startoftext|> = 49406 and <|endoftext|> = 49407 (vocab_size 49408).
START_OF_TEXT = 49406
END_OF_TEXT = 49407
# SD v1 pads with the end token, as Hugging Face's CLIPTokenizer for
# openai/clip-vit-large-patch14 does (pad_token "<|endoftext|>").
# Note: open_clip's own tokenizer pads with 0; SD v1 never saw that.
PAD = END_OF_TEXT


@functools.lru_cache(maxsize=1)
def _open_clip_tokenizer():
    """open_clip's `tokenizer.py`, executed as a module of its own (it has no relative
    imports), without running the `open_clip` package's `__init__`: `find_spec` of a
    top-level package only locates it. Its `default_bpe()` finds the vocabulary file
    next to the module file, as when imported normally."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed; pip install open-clip-torch (a meddap dependency)")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("meddap.models._open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.lru_cache(maxsize=1)
def _bpe():
    """open_clip's BPE (`SimpleTokenizer`) over its shipped vocabulary; text is cleaned
    (ftfy, html unescape, whitespace) and lower-cased, as OpenAI CLIP does."""
    return _open_clip_tokenizer().SimpleTokenizer(context_length=None)


def tokenize_with_dropped(texts: list[str], context_length: int = 77
                          ) -> tuple[torch.Tensor, list[str]]:
    """Tokenize as SD v1 was trained, and say what truncation cut off.

    Each row is [49406, up to 75 BPE tokens, 49407, 49407 ...] of length 77.
    Returns (tokens (B, 77) int64, dropped): dropped[b] is the text of the BPE
    tokens beyond the 75 that fit ("" when the prompt fit), for a warning.
    """
    if isinstance(texts, str):
        texts = [texts]
    room = context_length - 2                       # 75 between start and end
    tokens = torch.full((len(texts), context_length), PAD, dtype=torch.long)
    dropped = []
    for b, text in enumerate(texts):
        ids = _bpe().encode(text)
        kept, cut = ids[:room], ids[room:]
        row = [START_OF_TEXT, *kept, END_OF_TEXT]
        tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        dropped.append(_bpe().decode(cut).strip() if cut else "")
    return tokens, dropped


def tokenize(texts: list[str], context_length: int = 77) -> torch.Tensor:
    """(B, 77) int64 token ids; see `tokenize_with_dropped`."""
    return tokenize_with_dropped(texts, context_length)[0]


class QuickGELU(nn.Module):
    """QuickGELU(x) = x * sigmoid(1.702 x), OpenAI CLIP's activation (openai/CLIP clip/model.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LayerNorm block (open_clip `ResidualAttentionBlock`, no layer scale), x: (B, L, D):

    x = x + attn(ln_1(x), mask)          nn.MultiheadAttention, fused q/k/v `in_proj`
    x = x + c_proj(QuickGELU(c_fc(ln_2(x))))    MLP width 4D
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)             # eps 1e-5, as CLIP's layer_norm_eps
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask.to(x.dtype))[0]   # (B, L, D)
        return x + self.mlp(self.ln_2(x))                                                # (B, L, D)


class Transformer(nn.Module):
    """`layers` ResidualAttentionBlocks in sequence, at the module paths `resblocks.{i}` (open_clip's)."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class TextEncoder(nn.Module):
    """CLIP text transformer: tokens (B, 77) -> hidden states (B, 77, width).

    h_0 = token_embedding[tokens] + positional_embedding
    h_l = block_l(h_{l-1}) with a causal mask (position i attends to j <= i)
    out = ln_final(h_L)
    All 77 positions are used, padding included, exactly as SD v1 did.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        # Built under torch.device("meta") (the strict loader's build), there is nothing to draw,
        # and torch's `meta` kernel of normal_ imports torch._dynamo: about 1 s per process.
        # So on meta the embedding gets an empty weight and neither init runs.
        on_meta = torch.empty(0).is_meta
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width,
                                            _weight=torch.empty(cfg.vocab_size, cfg.width) if on_meta else None)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads)
        self.ln_final = nn.LayerNorm(cfg.width)     # eps 1e-5, as CLIP's layer_norm_eps
        if not on_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random weights at CLIP's initial scales (open_clip `TextTransformer.init_parameters`)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """(B, 77) int64 ids on the CPU; `forward` moves them to the weights' device."""
        return tokenize(texts, self.config.context_length)

    def tokenize_with_dropped(self, texts: list[str]) -> tuple[torch.Tensor, list[str]]:
        return tokenize_with_dropped(texts, self.config.context_length)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (B, L) int64 on any device, L <= 77 -> (B, L, width) in the weights' dtype and on their device."""
        tokens = tokens.to(self.token_embedding.weight.device)   # no copy when they are there already
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]   # (B, L, D)
        # Additive causal mask (L, L): 0 on and below the diagonal, -inf above.
        mask = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        x = self.transformer(x, attn_mask=mask)                             # (B, L, D)
        return self.ln_final(x)                                             # (B, L, D)


# ---- The name map: Hugging Face CLIPTextModel <-> open_clip -----------------------
# Keys are relative to `cond_stage_model.transformer.text_model.` (HF) and to
# the TextEncoder (ours). Per layer i, HF's separate q/k/v projections are
# stacked into open_clip's fused in_proj: in_proj_weight = cat(q, k, v) on dim 0.
# Each (HF, ours) pair is a plain substring replacement (`str.replace`), applied
# in list order, not a match of whole dotted components; the dots that start
# and end most patterns keep them from matching inside a longer name.
_RENAMES = [  # (HF, ours)
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
    ("encoder.layers.", "transformer.resblocks."),
    (".self_attn.out_proj.", ".attn.out_proj."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
]
_QKV = ("q_proj", "k_proj", "v_proj")


def hf_to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text names -> TextEncoder names (fusing q/k/v). Unknown keys are kept as they are."""
    out = {}
    for name, t in hf.items():
        parts = name.rsplit(".", 2)                 # [..."encoder.layers.i.self_attn", "q_proj", "weight"]
        if len(parts) == 3 and parts[1] in _QKV and parts[0].endswith(".self_attn"):
            if parts[1] == "q_proj":
                head = parts[0]                     # "encoder.layers.i.self_attn"
                fused = torch.cat([hf[f"{head}.{p}.{parts[2]}"] for p in _QKV], dim=0)  # (3D, D) or (3D,)
                out[_rename(f"{head}.in_proj_{parts[2]}", forward=True)] = fused
            continue
        out[_rename(name, forward=True)] = t
    return out


def open_clip_to_hf(ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """TextEncoder names -> HF CLIP text names (splitting in_proj into q/k/v)."""
    out = {}
    for name, t in ours.items():
        hf = _rename(name, forward=False)
        if ".self_attn.in_proj_" in hf:
            head, kind = hf.rsplit(".in_proj_", 1)  # "encoder.layers.i.self_attn", "weight"|"bias"
            for p, chunk in zip(_QKV, t.chunk(3, dim=0)):   # each (D, D) or (D,)
                out[f"{head}.{p}.{kind}"] = chunk
            continue
        out[hf] = t
    return out


def _rename(name: str, forward: bool) -> str:
    for hf, ours in _RENAMES:
        src, dst = (hf, ours) if forward else (ours, hf)
        name = name.replace(src, dst)
    # the fused projection sits on `attn` in open_clip and on `self_attn` in HF
    return name.replace(".self_attn.in_proj_", ".attn.in_proj_") if forward \
        else name.replace(".attn.in_proj_", ".self_attn.in_proj_")
