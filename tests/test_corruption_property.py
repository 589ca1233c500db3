"""Property test: damaged files are refused with a MeddapError, never another exception.

200 seeded random corruptions of each of a safetensors file, a torch `.ckpt` and a PNG:
truncations, byte flips and header edits, fed to the loaders users reach (the SD checkpoint
reader, the adapter reader, the image reader). A corruption that leaves a valid file of the
same format (a flipped tensor byte: safetensors and torch files carry no checksum of their
data) may load; it must then load to something, never crash. Every other one is a
MeddapError. The structural corruptions (truncations, header and chunk edits) must all be
refused, and the test counts them.
"""
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddap.data.datasets import load_rgb
from meddap.errors import MeddapError
from meddap.lora.files import read_lora_file
from meddap.models.checkpoint import open_checkpoint, write_safetensors

N = 200
SEED = 20261201


def _safetensors(tmp: Path) -> Path:
    path = tmp / "lora.safetensors"
    g = torch.Generator().manual_seed(0)
    layer = "input_blocks.1.1.transformer_blocks.0.attn2.to_q"
    write_safetensors(path, {f"{layer}.lora_down": torch.randn(4, 320, generator=g),
                             f"{layer}.lora_up": torch.zeros(320, 4)},
                      {"meddap_format": "meddap-lora", "meddap_rank": "4", "meddap_alpha": "4.0"})
    return path


def _ckpt(tmp: Path) -> Path:
    path = tmp / "model.ckpt"
    g = torch.Generator().manual_seed(0)
    torch.save({"state_dict": {"model.diffusion_model.time_embed.0.weight": torch.randn(8, 4, generator=g),
                               "first_stage_model.encoder.conv_in.weight": torch.randn(4, 3, 3, 3, generator=g)},
                "global_step": 7}, path)
    return path


def _png(tmp: Path) -> Path:
    path = tmp / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
    return path


def _header_end(kind: str, data: bytes) -> int:
    """Bytes that hold structure, not tensor data: the safetensors JSON header, the zip's central
    directory (from its last local entry), the whole PNG (every chunk has a CRC)."""
    if kind == "safetensors":
        return 8 + int.from_bytes(data[:8], "little")
    return len(data)


def corruptions(kind: str, data: bytes, rng: random.Random):
    """(name, bytes, structural) for N corruptions of `data`."""
    end = _header_end(kind, data)
    for i in range(N):
        how = i % 4
        if how == 0:                                                # truncation anywhere
            cut = rng.randrange(0, len(data))
            yield f"truncate@{cut}", data[:cut], True
        elif how == 1:                                              # byte flips in the structure
            b = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(0, end) if kind != "ckpt" else rng.randrange(len(b) - 200, len(b))
                b[pos] ^= 1 << rng.randrange(8)
            yield f"flip-structure@{i}", bytes(b), kind == "png"
        elif how == 2:                                              # byte flips anywhere
            b = bytearray(data)
            pos = rng.randrange(0, len(b))
            b[pos] ^= 0xFF
            yield f"flip@{pos}", bytes(b), False
        else:                                                       # header edits
            b = bytearray(data)
            if kind == "safetensors":
                n = int.from_bytes(b[:8], "little")
                edit = rng.choice([n + rng.randint(1, 9), max(0, n - rng.randint(1, 9)), 2 ** 40, 0])
                b[:8] = edit.to_bytes(8, "little")
            elif kind == "ckpt":
                b[:4] = bytes(rng.randrange(256) for _ in range(4))      # the zip's local-header magic
            else:
                b[1:4] = b"GIF" if rng.random() < 0.5 else bytes(rng.randrange(256) for _ in range(3))
            yield f"header@{i}", bytes(b), True


LOADERS = {
    "safetensors": [lambda p: open_checkpoint(p), lambda p: read_lora_file(p)],
    "ckpt": [lambda p: open_checkpoint(p)],
    "png": [lambda p: load_rgb(p).load()],
}
MAKERS = {"safetensors": _safetensors, "ckpt": _ckpt, "png": _png}


@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_every_corruption_is_a_meddap_error_or_a_valid_file(tmp_path, kind):
    data = MAKERS[kind](tmp_path).read_bytes()
    rng = random.Random(f"{SEED}-{kind}")
    refused = structural = 0
    for name, damaged, must_refuse in corruptions(kind, data, rng):
        path = tmp_path / f"damaged.{'ckpt' if kind == 'ckpt' else kind}"
        path.write_bytes(damaged)
        for load in LOADERS[kind]:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    load(path)
            except MeddapError:
                refused += 1
                structural += must_refuse
                continue
            except Exception as e:                                  # the property under test
                raise AssertionError(f"{kind} {name}: {type(e).__name__}: {e}") from e
            assert not must_refuse, f"{kind} {name}: a structurally damaged file loaded"
    assert refused >= N // 2 * len(LOADERS[kind]), refused
