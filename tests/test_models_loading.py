"""Loading SD v1: the full-size reference layout, memory, diffusers folders, save/load, the API."""
import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.io import sha256_file
from meddap.models.checkpoint import PREFIXES, read_state_dict, write_safetensors
from meddap.models.config import get_config
from meddap.models.stable_diffusion import (build_stable_diffusion, checkpoint_state_dict,
                                            load_stable_diffusion, resolve_dtype, save_stable_diffusion)
from meddap.models.text_encoder import tokenize
from sd_files import bigmem_lock, random_state_dict, reference_shapes, transformers_text_model, write_random_checkpoint

# Parameter counts of SD v1 (reference sd_v1_checkpoint_keys.json "about").
COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}


@pytest.fixture(scope="module")
def full_file(tmp_path_factory, reference_dir):
    """A random fp16 file (2.1 GB) with exactly the reference names and shapes, plus the optional keys."""
    with bigmem_lock():                      # this module peaks near 7 GB of RAM
        path = tmp_path_factory.mktemp("full") / "sd-v1-random.safetensors"
        write_safetensors(path, random_state_dict("sd-v1.4", torch.float16, optional=True))
        yield path


def test_full_size_reference_layout_loads_strictly(full_file, capsys):
    model = load_stable_diffusion(full_file, dtype=torch.float16)
    assert model.config == get_config("sd-v1.4") and model.dtype == torch.float16
    for name in COUNTS:
        assert sum(p.numel() for p in getattr(model, name).parameters()) == COUNTS[name]
    # every tensor is the file's, under its own name
    on_disk = read_state_dict(full_file)
    loaded = checkpoint_state_dict(model)
    assert loaded.keys() == reference_shapes().keys()
    assert all(torch.equal(loaded[k], on_disk[k]) for k in loaded)
    # a real forward pass of the full-size text encoder: (1, 77) -> (1, 77, 768)
    with torch.no_grad():
        text = model.text_encoder.float()(tokenize(["an ultrasound image of benign tumor in the breast"]))
    assert text.shape == (1, 77, 768) and torch.isfinite(text).all()
    del model, loaded, on_disk
    assert main(["inspect-checkpoint", str(full_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {c: report[c]["parameters"] for c in COUNTS} == COUNTS
    assert report["config"] == "sd-v1.4" and len(report["optional"]) == 16


def test_fp16_load_of_fp32_file_stays_within_1_5x_file_size(tmp_path, reference_dir):
    """Peak RSS of a fresh process loading a full-size fp32 file to fp16 (never an fp32 model copy).

    The peak is the child's VmHWM (high-water RSS of its own address space, counting the
    file's mapped pages). Not ru_maxrss: Linux carries the parent's peak over fork and exec.
    """
    with bigmem_lock():
        path = tmp_path / "sd-v1-fp32.safetensors"
        write_safetensors(path, random_state_dict("sd-v1.4", torch.float32))
        child = textwrap.dedent(f"""
            import torch
            from meddap.models.stable_diffusion import load_stable_diffusion
            model = load_stable_diffusion({str(path)!r}, dtype=torch.float16)
            assert model.dtype == torch.float16
            status = open("/proc/self/status").read()
            print(next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")))
        """)
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    peak, size = int(out.stdout.split()[-1]) * 1024, path.stat().st_size      # VmHWM is in KiB
    print(f"peak RSS {peak / 2**30:.2f} GiB = {peak / size:.2f} x file size {size / 2**30:.2f} GiB")
    assert peak <= 1.5 * size, f"peak RSS {peak / 2**30:.2f} GiB for a {size / 2**30:.2f} GiB file"


# ---- diffusers folders ------------------------------------------------------------------
def write_diffusers_folder(folder, state_dict, config, text_prefix=""):
    """Our checkpoint tensors -> a diffusers SD folder written by diffusers and transformers themselves."""
    from oracles import diffusers_unet_from_ours, diffusers_vae_from_ours
    from meddap.models.text_encoder import TextEncoder, hf_to_open_clip
    diffusers_unet_from_ours(state_dict, config.unet).save_pretrained(folder / "unet")
    diffusers_vae_from_ours(state_dict, config.vae).save_pretrained(folder / "vae")
    text = TextEncoder(config.text)
    prefix = PREFIXES["text_encoder"]
    text.load_state_dict(hf_to_open_clip({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}))
    transformers_text_model(text).save_pretrained(folder / "text_encoder")
    if text_prefix:                                  # older transformers wrote `text_model.` names
        file = folder / "text_encoder" / "model.safetensors"
        write_safetensors(file, {text_prefix + k: v for k, v in read_state_dict(file).items()})


@pytest.mark.parametrize("text_prefix", ["", "text_model."])
def test_diffusers_folder_round_trip(tmp_path, text_prefix):
    sd = random_state_dict("tiny")
    write_diffusers_folder(tmp_path, sd, get_config("tiny"), text_prefix)
    model = load_stable_diffusion(tmp_path)
    assert model.config.name == "tiny"
    loaded = checkpoint_state_dict(model)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    files = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "text_encoder/model.safetensors"]
    lines = "".join(f"{f} {sha256_file(tmp_path / f)}\n" for f in files)
    assert model.source_sha256 == hashlib.sha256(lines.encode()).hexdigest()


def test_diffusers_names_cover_the_full_size_layout(reference_dir):
    """diffusers' own full-size SD v1 UNet and VAE (on meta), renamed by our map, give the reference keys."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from oracles import diffusers_unet_config, diffusers_vae_config
    from meddap.models import diffusers_names
    config = get_config("sd-v1.4")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**diffusers_unet_config(config.unet)).state_dict()
        vae = AutoencoderKL(**diffusers_vae_config(config.vae)).state_dict()
    renamed = {}
    rules = diffusers_names.unet_prefixes(list(unet))
    renamed.update({PREFIXES["unet"] + diffusers_names.rename(k, rules): list(v.shape) for k, v in unet.items()})
    rules = diffusers_names.vae_prefixes(list(vae))
    for k, v in vae.items():
        new = PREFIXES["vae"] + diffusers_names.rename(k, rules)
        renamed[new] = list(v.shape) + ([1, 1] if ".mid.attn_1." in new and v.dim() == 2 else [])
    expected = {k: s for k, s in reference_shapes().items() if k.startswith((PREFIXES["unet"], PREFIXES["vae"]))}
    assert renamed == expected


def test_diffusers_folder_missing_or_foreign_component(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(MeddapError, match=r"no unet/diffusion_pytorch_model\.safetensors"):
        load_stable_diffusion(tmp_path)
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                      ("text_encoder", "model")):
        write_safetensors(tmp_path / sub / f"{name}.safetensors", {"transformer.blocks.0.weight": torch.zeros(2)})
    with pytest.raises(MeddapError, match=r"diffusion_pytorch_model\.safetensors: has no down_blocks"):
        load_stable_diffusion(tmp_path)


# ---- save / build / API -----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_round_trip(tmp_path, dtype):
    torch.manual_seed(0)
    model = build_stable_diffusion("tiny", dtype=dtype)
    assert model.source_sha256 is None
    path = tmp_path / "tiny.safetensors"
    save_stable_diffusion(model, path, metadata={"note": "random"})
    with safe_open(path, "pt") as f:                 # an ordinary SD v1-layout safetensors file
        assert f.metadata()["meddap_config"] == "tiny" and f.metadata()["note"] == "random"
        assert PREFIXES["text_encoder"] + "encoder.layers.0.self_attn.q_proj.weight" in f.keys()
    back = load_stable_diffusion(path, dtype=dtype)
    a, b = checkpoint_state_dict(model), checkpoint_state_dict(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert back.source_sha256 == sha256_file(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]     # atomic write
    with pytest.raises(MeddapError, match=r"writes \.safetensors files"):
        save_stable_diffusion(model, tmp_path / "tiny.ckpt")


def test_loaded_model_runs_end_to_end(tmp_path):
    path = write_random_checkpoint(tmp_path / "sd.ckpt", fmt="ckpt")
    sd = load_stable_diffusion(path, device="cpu", dtype="bf16")
    assert sd.device == torch.device("cpu") and sd.dtype == torch.bfloat16
    with torch.no_grad():
        context = sd.text_encoder(tokenize(["dark ultrasound image of no tumor in the breast"]))
        eps = sd.unet(torch.randn(1, 4, 28, 28, dtype=torch.bfloat16), torch.tensor([500]), context)
        mean, logvar = sd.vae.encode(torch.rand(1, 3, 64, 64, dtype=torch.bfloat16) * 2 - 1)
    assert context.shape == (1, 77, 64) and eps.shape == (1, 4, 28, 28) and mean.shape == (1, 4, 8, 8)


def test_build_and_dtypes():
    assert resolve_dtype(None) == torch.float32 and resolve_dtype("fp16") == torch.float16
    assert resolve_dtype("bfloat16") == torch.bfloat16 and resolve_dtype(torch.float16) == torch.float16
    model = build_stable_diffusion("tiny", dtype="fp16")
    assert model.dtype == torch.float16 and model.config.name == "tiny"
    with pytest.raises(MeddapError, match="unknown model config 'sd-v2'"):
        build_stable_diffusion("sd-v2")
    with pytest.raises(MeddapError, match=r"dtype torch\.int8 is not supported"):
        build_stable_diffusion("tiny", dtype=torch.int8)
