"""scripts/class_dependence.py: the relative change of the UNet's noise prediction between
prompts, on the shipped tiny base and fabricated images.

- A UNet whose cross-attention values are zero cannot see the context: every entry is 0
  exactly (so the prompts share z_t, t and ε, and nothing else differs between them).
- On the base itself, the entries equal the module docstring's formula computed here by
  another route (PIL images, encode_prompts, a direct q_sample), and they are not 0.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from meddap.data.prompts import prompt_for
from meddap.sampling.generation import load_model
from meddap.sampling.schedule import NoiseSchedule
from meddap.sampling.text_to_image import encode_prompts

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "weights" / "tiny" / "tiny-sd.safetensors"
_spec = importlib.util.spec_from_file_location("class_dependence", REPO / "scripts" / "class_dependence.py")
class_dependence = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(class_dependence)

CLASSES = ["benign", "malignant", "normal"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Three class folders of 64 px grey images with a dark disc (3 per class; the script takes 2)."""
    root = tmp_path_factory.mktemp("classes")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for k, c in enumerate(CLASSES):
        (root / c).mkdir()
        for i in range(3):
            grey = rng.normal(150, 25, (64, 64))
            if c != "normal":
                grey[(yy - 20 - 8 * i) ** 2 + (xx - 32) ** 2 < (6 + 4 * k) ** 2] = 30
            Image.fromarray(grey.clip(0, 255).astype(np.uint8)).convert("RGB").save(root / c / f"{c} ({i + 1}).png")
    return root


def _images(data: Path):
    subset = class_dependence.first_per_class(class_dependence.resolve_training_images(str(data)), 2)
    return class_dependence.TrainImages(subset, 64, show_progress=False)


def test_a_context_blind_unet_gives_exactly_zero(data):
    sd = load_model(str(TINY), device="cpu")
    for name, m in sd.unet.named_modules():
        if name.endswith("attn2"):
            torch.nn.init.zeros_(m.to_v.weight)          # softmax(QK^T) V = 0 whatever the context
    table = class_dependence.class_dependence(sd, _images(data), [100, 900])
    assert set(table) == {100, 900}
    assert set(table[100]) == {"benign|malignant", "benign|normal", "malignant|normal",
                               "benign|∅", "malignant|∅", "normal|∅"}
    assert all(v == 0.0 for row in table.values() for v in row.values())


def test_equals_the_formula_computed_another_way(data):
    sd = load_model(str(TINY), device="cpu")
    t, seed = 400, 3
    got = class_dependence.class_dependence(sd, _images(data), [t], seed)[t]

    files = [data / c / f"{c} ({i + 1}).png" for c in CLASSES for i in range(2)]       # path order
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32))
                     for f in files]).permute(0, 3, 1, 2) / 127.5 - 1                # (6, 3, 64, 64)
    with torch.no_grad():
        z0 = sd.vae.scale * sd.vae.encode(x)[0]                                      # posterior mean
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed + t))
        tt = torch.full((len(z0),), t)
        z_t = NoiseSchedule.sd_v1().q_sample(z0, tt, noise)
        _, ctx = encode_prompts(sd, [prompt_for(c, stage="train") for c in CLASSES] + [""])
        eps = {name: sd.unet(z_t, tt, ctx[i].expand(len(z0), -1, -1))
               for i, name in enumerate(CLASSES + ["∅"])}
    rms = lambda e: e.pow(2).mean().sqrt().item()
    for key, value in got.items():
        a, b = key.split("|")
        want = rms(eps[a] - eps[b]) / rms(eps[a])
        assert value == pytest.approx(want, rel=1e-4, abs=1e-7), key
        assert value > 1e-4, key                                  # the base reads the prompt


def test_command_line_writes_the_table(data, tmp_path, capsys):
    out = tmp_path / "d.json"
    assert class_dependence.main(["--data", str(data), "--checkpoint", str(TINY), "--per-class", "1",
                                  "--timesteps", "300", "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["n_images"] == 3 and saved["lora_sha256"] is None
    printed = capsys.readouterr().out
    assert "| t | benign|malignant |" in printed
    assert f"| 300 | {100 * saved['d']['300']['benign|malignant']:.2f}% |" in printed
    with pytest.raises(SystemExit):
        class_dependence.main(["--data", str(data), "--timesteps", "1000"])
    with pytest.raises(SystemExit):
        class_dependence.main(["--help"])
    assert "d_t(a, b) = rms(" in capsys.readouterr().out       # --help gives the formula
