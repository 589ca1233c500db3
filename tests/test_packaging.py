"""setup.cfg states what the code needs: the Python and numpy lower bounds, and
scikit-learn only as a test oracle. Building the command line stays light."""
import configparser
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _options():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg", encoding="utf-8")
    return cfg


def _requirements(text: str) -> dict[str, tuple[int, ...]]:
    """'numpy>=2.0' lines -> {'numpy': (2, 0)}."""
    out = {}
    for line in filter(None, (ln.strip() for ln in text.splitlines())):
        name, low = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", line).groups()
        out[name] = tuple(int(x) for x in low.split("."))
    return out


def test_python_bound_allows_tomllib():
    low = re.fullmatch(r">=(\d+)\.(\d+)", _options()["options"]["python_requires"]).groups()
    assert tuple(map(int, low)) >= (3, 11)             # tomllib is new in Python 3.11


def test_numpy_bound_has_bitwise_count():
    reqs = _requirements(_options()["options"]["install_requires"])
    assert reqs["numpy"] >= (2, 0)                     # np.bitwise_count is new in numpy 2.0
    assert hasattr(np, "bitwise_count")


def test_scikit_learn_is_a_test_oracle_only():
    cfg = _options()
    assert "scikit-learn" not in _requirements(cfg["options"]["install_requires"])
    assert "scikit-learn" in _requirements(cfg["options.extras_require"]["test"])
    importers = [p for p in (ROOT / "meddap").rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+sklearn\b", p.read_text(encoding="utf-8"), re.M)]
    assert importers == []


def test_building_the_command_line_imports_neither_torchvision_nor_scipy():
    """Importing them cost every command about 2 s of start-up (torchvision pulls in
    torch._dynamo; a CPU A/B of `meddap sample`). Every command's parser imports its
    module, so those modules import the two inside the functions that use them."""
    probe = ("import sys; from meddap.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torchvision', 'scipy', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_loading_sd_and_encoding_a_prompt_stays_light():
    """Loading the tiny base and encoding a prompt (what every generating and training
    command does first) imports neither the open_clip package (its __init__ imports
    torchvision and, where installed, transformers: 2.2 s per process on a 2-core AMD EPYC)
    nor torch._dynamo (torch's `meta` kernel of normal_ imports it, about 1 s). Only
    open_clip's tokenizer.py is loaded, on its own."""
    probe = ("import sys; from meddap.models.stable_diffusion import load_stable_diffusion; "
             "sd = load_stable_diffusion('weights/tiny/tiny-sd.safetensors'); "
             "sd.text_encoder(sd.text_encoder.tokenize(['ultrasound image of benign tumor in the breast'])); "
             "print(sorted(m for m in ('open_clip', 'torchvision', 'transformers', 'torch._dynamo') "
             "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
