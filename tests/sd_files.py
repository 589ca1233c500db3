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
import json
import sys
import types
from pathlib import Path

import torch

from meddap.models.checkpoint import PREFIXES, write_safetensors
from meddap.models.stable_diffusion import build_stable_diffusion, checkpoint_state_dict

REFERENCE_KEYS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "sd_v1_checkpoint_keys.json"
POSITION_IDS = PREFIXES["text_encoder"] + "embeddings.position_ids"


def reference_shapes(section: str = "required") -> dict[str, list[int]]:
    return json.loads(REFERENCE_KEYS.read_text())[section]


def random_state_dict(config: str = "tiny", dtype=torch.float32, seed: int = 0,
                      optional: bool = False) -> dict[str, torch.Tensor]:
    """Random tensors under SD v1 checkpoint names; optional=True adds the schedule
    buffers (meddap's values), logvar, EMA scalars and position_ids."""
    g = torch.Generator().manual_seed(seed)
    if config == "sd-v1.4":
        out = {}
        for name, shape in reference_shapes().items():
            t = torch.empty(shape, dtype=dtype)
            t.uniform_(-0.05, 0.05, generator=g) if "norm" not in name else t.uniform_(0.9, 1.1, generator=g)
            out[name] = t
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


def save_ckpt(path, state_dict: dict[str, torch.Tensor], lightning: bool = True) -> Path:
    """A legacy-style SD .ckpt: {"state_dict": ..., "global_step": ..., "callbacks": {ModelCheckpoint: {...}}}."""
    obj = {"state_dict": state_dict, "global_step": 470000, "epoch": 5}
    if not lightning:
        torch.save(obj, path)
        return Path(path)
    with lightning_lookalike() as ModelCheckpoint:
        callback = ModelCheckpoint()
        callback.monitor, callback.best_model_score = None, torch.tensor(0.5)
        obj["callbacks"] = {ModelCheckpoint: {"best_model_path": "", "best_model_score": None}}
        obj["checkpoint_callback"] = callback
        obj["pytorch-lightning_version"] = "1.4.2"
        torch.save(obj, path)
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
