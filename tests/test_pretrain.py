"""The tiny base: its captioned shapes domain, the exact latent rescaling, the shipped file
(SD v1 layout, fp16, <= 25 MB, read by the SD v1.4 loader) and the pretraining script's output."""
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from meddap.errors import MeddapError
from meddap.io import stream_seed
from meddap.models.config import SD_LATENT_SCALE
from meddap.models.stable_diffusion import build_stable_diffusion, load_stable_diffusion
from meddap.pretrain import shapes
from meddap.pretrain.train import (UNET_STREAM, PretrainConfig, _Log, _lr, _to_tensor, calibrate_latent_scale,
                                   pretrain_tiny, tune_decoder)

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "tiny-sd.safetensors"
MEDDAP_WORDS = ("ultrasound", "tumor", "breast", "benign", "malignant", "lesion")


def test_shapes_domain_is_deterministic_captioned_and_not_ultrasound():
    caps, images = shapes.batch(3, 10, 40)
    caps2, images2 = shapes.batch(3, 10, 40)
    assert caps == caps2 and np.array_equal(images, images2) and images.shape == (40, 64, 64, 3)
    assert shapes.batch(4, 10, 1)[0] != caps[:1] or not np.array_equal(shapes.batch(4, 10, 1)[1], images[:1])
    for c in caps:
        assert re.fullmatch(r"a (small|medium|large) [a-z ]+ [a-z]+( and a .+)? on an? [a-z ]+background", c), c
        assert any(s in c for s in shapes.SHAPES) and any(col in c for col in shapes.COLOURS)
        assert not any(w in c for w in MEDDAP_WORDS)


@torch.no_grad()
def test_latent_rescaling_keeps_the_autoencoder_and_gives_unit_variance():
    torch.manual_seed(0)
    sd = build_stable_diffusion("tiny")
    x = _to_tensor(shapes.batch(5, 0, 4, 32)[1])
    mean0, logvar0 = sd.vae.encode(x)
    recon0 = sd.vae.decode(mean0)
    cfg = PretrainConfig(size=32)
    c = calibrate_latent_scale(sd, cfg, n=64)
    mean1, logvar1 = sd.vae.encode(x)
    torch.testing.assert_close(mean1, c * mean0, rtol=1e-4, atol=1e-5)          # z' = c z
    torch.testing.assert_close(logvar1, logvar0 + 2 * np.log(c), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sd.vae.decode(mean1), recon0, rtol=1e-4, atol=1e-4)   # D'(c z) = D(z)
    _, images = shapes.batch(cfg.seed + 1, 0, 64, 32, cfg.field_fraction)      # the calibration batch
    m, lv = sd.vae.encode(_to_tensor(images))
    z = m + torch.exp(0.5 * lv) * torch.randn(m.shape, generator=torch.Generator().manual_seed(cfg.seed))
    assert abs((SD_LATENT_SCALE * z).std().item() - 1.0) < 1e-4


def test_shipped_tiny_base_loads_like_sd_v14():
    assert SHIPPED.stat().st_size <= 25 * 2 ** 20
    with safe_open(str(SHIPPED), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("model.diffusion_model.input_blocks.0.0.weight").dtype == torch.float16
        assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in f.keys())
    assert meta["meddap_config"] == "tiny" and meta["pretrain_seed"] == "0"
    assert "no ultrasound" in meta["pretrain_domain"]
    sd = load_stable_diffusion(SHIPPED)                 # the SD v1.4 loader, strict
    assert sd.config.name == "tiny" and sd.vae.scale == SD_LATENT_SCALE and sd.source_sha256


def test_pretrain_script_writes_a_loadable_checkpoint_and_resumes(tmp_path):
    cfg = PretrainConfig(vae_steps=2, vae_batch=2, decoder_steps=2, latent_images=4, unet_steps=2,
                         unet_batch=2, warmup_steps=1, checkpoint_every=1, size=32, vae_crop=16)
    out = pretrain_tiny(cfg, tmp_path / "work", tmp_path / "tiny.safetensors")
    assert load_stable_diffusion(out).config.name == "tiny"
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["pretrain_domain"] == ("meddap.pretrain.shapes (procedural shapes and grey "
                                                   "fields; no ultrasound)")
    rows = (tmp_path / "work" / "log.csv").read_text().splitlines()
    assert rows[0] == "stage,step,loss,lr" and len(rows) == 1 + 2 + 2 + 2
    assert [r.split(",")[0] for r in rows[1:]] == ["vae"] * 2 + ["decoder"] * 2 + ["unet"] * 2
    first = out.read_bytes()
    pretrain_tiny(cfg, tmp_path / "work", tmp_path / "again.safetensors")      # all stages done: resumed
    assert len((tmp_path / "work" / "log.csv").read_text().splitlines()) == 7
    assert (tmp_path / "again.safetensors").read_bytes() == first


def test_seed_streams_are_the_trained_rule():
    """The shipped file was trained with generators seeded seed * 1_000_003 + step (stage 1)
    and seed * 1_000_003 + 7 + step (stage 3); stream_seed gives the same integers."""
    for seed in (0, 1, 12345):
        for step in (0, 1, 1499):
            assert stream_seed(seed, step) == seed * 1_000_003 + step
            assert stream_seed(seed, UNET_STREAM + step) == seed * 1_000_003 + 7 + step


def test_pretrain_config_is_checked(tmp_path):
    with pytest.raises(MeddapError, match=r"^--size = 36 must be a positive multiple of 8 "
                                          r"\(the autoencoder downsamples by 8\)\.$"):
        pretrain_tiny(PretrainConfig(size=36), tmp_path / "work", tmp_path / "x.safetensors")
    with pytest.raises(MeddapError, match=r"^--vae-crop = 64 must be at most --size = 32 "):
        pretrain_tiny(PretrainConfig(size=32, vae_crop=64), tmp_path / "work", tmp_path / "x.safetensors")
    assert not (tmp_path / "work").exists()


def test_every_training_stage_warms_up_then_decays_by_cosine_to_a_tenth():
    """lr(s) = base (s + 1) / W for s < W, then base (0.1 + 0.45 (1 + cos(pi (s - W) / (S - W))))."""
    cfg = PretrainConfig(warmup_steps=50)
    assert _lr(cfg, 0, 1e-3, 2400) == pytest.approx(1e-3 / 50)
    assert _lr(cfg, 49, 1e-3, 2400) == pytest.approx(1e-3)
    assert _lr(cfg, 50, 1e-3, 2400) == pytest.approx(1e-3)                     # cos 0 = 1: the peak
    assert _lr(cfg, 50 + 1175, 1e-3, 2400) == pytest.approx(0.55e-3)             # half way: cos = 0
    assert _lr(cfg, 2400, 1e-3, 2400) == pytest.approx(1e-4)                     # the end: a tenth
    assert _lr(cfg, 775, 2e-3, 1500) == pytest.approx(1.1e-3)                    # another stage's length


def test_decoder_stage_moves_the_decoder_only_and_resumes(tmp_path):
    """Stage 1b trains D and post_quant_conv; q(z|x) (encoder, quant_conv) stays bitwise, so the
    latent space the UNet is trained on does not move. Killed after step 1, it resumes to the
    same weights as an uninterrupted run."""
    cfg = PretrainConfig(size=32, vae_crop=16, vae_batch=2, decoder_steps=2, warmup_steps=1,
                         checkpoint_every=1)
    torch.manual_seed(0)
    sd = build_stable_diffusion("tiny")
    before = {k: v.clone() for k, v in sd.vae.state_dict().items()}
    tune_decoder(sd, cfg, tmp_path, _Log(tmp_path / "log.csv"))
    after = sd.vae.state_dict()
    frozen = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    trained = [k for k in before if k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and trained and len(frozen) + len(trained) == len(before)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert not torch.equal(before["decoder.conv_out.weight"], after["decoder.conv_out.weight"])

    torch.manual_seed(0)
    part = build_stable_diffusion("tiny")
    (tmp_path / "b").mkdir()
    tune_decoder(part, replace(cfg, decoder_steps=1), tmp_path / "b", _Log(tmp_path / "b.csv"))
    torch.manual_seed(0)
    resumed = build_stable_diffusion("tiny")                     # a fresh process: stage 1's weights
    tune_decoder(resumed, cfg, tmp_path / "b", _Log(tmp_path / "b.csv"))
    assert all(torch.equal(after[k], v) for k, v in resumed.vae.state_dict().items())
    assert (tmp_path / "b.csv").read_text() == (tmp_path / "log.csv").read_text()
