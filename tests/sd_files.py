"""Test helpers: random SD v1 files of any config, format and dtype.

`write_random_checkpoint(path, config="tiny" | "sd-v1.4", fmt="safetensors" | "ckpt", dtype=...)`
writes a file in the original CompVis layout. The "sd-v1.4" file is built from
`../shared/reference/sd_v1_checkpoint_keys.json` (names and shapes that nobody
on this project wrote), not from our modules, so loading it checks our names.
The "tiny" file comes from `build_stable_diffusion("tiny")`.

`lightning=True` pickles, like the legacy SD `.ckpt` files, a
`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint` object and class
(Lightning is not installed: a look-alike class is registered under that name
only while torch.save runs).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import sys
import types
from pathlib import Path

import numpy
import torch

from meddap.models.checkpoint import PREFIXES, write_safetensors
from meddap.models.stable_diffusion import build_stable_diffusion, checkpoint_state_dict

BIGMEM_LOCK = "/tmp/meddap-bigmem.lock"   # one job above 3 GB of RAM at a time on shared machines
REFERENCE_KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "sd_v1_checkpoint_keys.json"
POSITION_IDS = PREFIXES["text_encoder"] + "embeddings.position_ids"


def reference_shapes(section: str = "required") -> dict[str, list[int]]:
    return json.loads(REFERENCE_KEYS.read_text())[section]


POOL = 1 << 24


def _fill_from(flat: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    """flat[:] = pool[offset:], pool[:], pool[:], ... (wrapping around)."""
    done = 0
    while done < flat.numel():
        n = min(flat.numel() - done, pool.numel() - offset)
        flat[done:done + n] = pool[offset:offset + n]
        done, offset = done + n, 0


def random_state_dict(config: str = "tiny", dtype=torch.float32, seed: int = 0,
                      optional: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under SD v1 checkpoint names; optional=True adds the schedule
    buffers (meddap's values), logvar, EMA scalars and position_ids."""
    g = torch.Generator().manual_seed(seed)
    if config == "sd-v1.4":
        # Full size: slices of one random pool at a different offset per tensor (fast, and
        # tensors of equal shape still differ, so a swapped name would show).
        pool = torch.rand(POOL + (1 << 20), generator=g) * 0.1 - 0.05
        out = {}
        for i, (name, shape) in enumerate(reference_shapes().items()):
            t = torch.empty(shape, dtype=dtype)
            _fill_from(t.view(-1), pool, offset=(i * 1_000_003) % POOL)
            out[name] = t + 1 if "norm" in name else t
    else:
        torch.manual_seed(seed)
        out = {k: v.to(dtype) for k, v in checkpoint_state_dict(build_stable_diffusion(config)).items()}
        for v in out.values():                      # norms and biases away from 1 and 0
            if v.ndim == 1:
                v.add_(0.1 * torch.randn(v.shape, generator=g).to(dtype))
    if optional:
        from meddap.sampling.schedule import sd_checkpoint_buffers
        out.update(sd_checkpoint_buffers())
        out["logvar"] = torch.zeros(1000)
        out["model_ema.decay"] = torch.tensor(0.9999)
        out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
        out[POSITION_IDS] = torch.arange(77, dtype=torch.int64)[None]
    return out


@contextlib.contextmanager
def lightning_lookalike():
    """Register a class at pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint (for torch.save)."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    module = types.ModuleType(names[-1])
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    module.ModelCheckpoint = cls
    for n in names:
        sys.modules[n] = module if n == names[-1] else types.ModuleType(n)
    try:
        yield cls
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def save_ckpt(path, state_dict: dict[str, torch.Tensor], lightning: bool = True,
              zip_format: bool = True) -> Path:
    """A legacy-style SD .ckpt: {"state_dict": ..., "global_step": ..., "callbacks": {ModelCheckpoint: {...}}}.

    zip_format=False writes torch's pre-1.6 (non-zip) serialization."""
    obj = {"state_dict": state_dict, "global_step": 470000, "epoch": 5}
    if lightning:
        with lightning_lookalike() as ModelCheckpoint:
            callback = ModelCheckpoint()
            callback.monitor, callback.best_model_score = None, torch.tensor(0.5)
            obj["callbacks"] = {ModelCheckpoint: {"best_model_path": "", "best_k_models": {"a.ckpt": numpy.float64(0.5)}}}
            obj["checkpoint_callback"] = callback
            obj["pytorch-lightning_version"] = "1.4.2"
            torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return Path(path)


def write_random_checkpoint(path, config: str = "tiny", fmt: str = "safetensors", dtype=torch.float32,
                            seed: int = 0, optional: bool = False, extra: dict | None = None,
                            drop: tuple[str, ...] = (), lightning: bool = True) -> Path:
    """Write a random SD v1 file (CompVis names); `extra` adds tensors, `drop` removes keys."""
    sd = random_state_dict(config, dtype, seed, optional)
    sd.update(extra or {})
    for key in drop:
        del sd[key]
    if fmt == "safetensors":
        write_safetensors(path, sd)
    elif fmt == "ckpt":
        save_ckpt(path, sd, lightning)
    else:
        raise ValueError(fmt)
    return Path(path)


_held = [0]                                   # nesting depth of bigmem_lock in this process


@contextlib.contextmanager
def bigmem_lock():
    """Hold the machine-wide lock for jobs that need more than 3 GB of RAM.

    Re-entrant within one process (a second flock on a new file description
    would wait for ourselves).
    """
    if _held[0]:
        _held[0] += 1
        try:
            yield
        finally:
            _held[0] -= 1
        return
    with open(BIGMEM_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        _held[0] = 1
        try:
            yield
        finally:
            _held[0] = 0
            fcntl.flock(f, fcntl.LOCK_UN)


def transformers_text_model(ours):
    """transformers `CLIPTextModel` (SD v1's `FrozenCLIPEmbedder` transformer) holding the
    weights of our TextEncoder `ours`, converted by our name map."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from meddap.models.text_encoder import open_clip_to_hf
    c = ours.config
    config = CLIPTextConfig(vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=4 * c.width,
                            num_hidden_layers=c.layers, num_attention_heads=c.heads,
                            max_position_embeddings=c.context_length, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    hf = {k: v.detach().clone() for k, v in open_clip_to_hf(ours.state_dict()).items()}
    prefix = "text_model." if any(k.startswith("text_model.") for k in model.state_dict()) else ""
    missing, unexpected = model.load_state_dict({prefix + k: v for k, v in hf.items()}, strict=False, assign=True)
    assert not unexpected and not missing, (missing, unexpected)
    # the one buffer, HF's non-persistent position ids 0..76, is still on `meta`
    (name, _), = model.named_buffers()
    owner, _, buffer = name.rpartition(".")
    model.get_submodule(owner).register_buffer(buffer, torch.arange(c.context_length)[None], persistent=False)
    return model.eval()
