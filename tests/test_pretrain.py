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
from meddap.data.prompts import prompt_for
from meddap.pretrain.train import (UNET_STREAM, PretrainConfig, _Log, _lr, _to_tensor, calibrate_latent_scale,
                                   LATENT_IMAGES, pretrain_tiny, redraw_file_token_rows, redraw_unseen_token_rows,
                                   seen_tokens, tune_decoder)

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


class _Tower(torch.nn.Module):
    """What stage 3b touches of a text tower: its token embedding."""

    def __init__(self, vocab: int, width: int):
        super().__init__()
        self.token_embedding = torch.nn.Embedding(vocab, width)


def test_unseen_token_rows_are_draws_of_the_seen_rows_normal():
    """Stage 3b: seen rows keep their bytes; the others are N(μ, Σ) of the seen rows, so over
    30,000 draws their sample mean and covariance approach μ and Σ (tolerances: 6 standard
    errors); the draw is one seeded stream."""
    g = torch.Generator().manual_seed(1)
    tower = _Tower(30_050, 4)
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 2.0, 0.0, 0.0], [0.0, -1.0, 0.3, 0.0], [0.2, 0.0, 0.0, 0.1]])
    seen = torch.arange(0, 30_050, 601)                                            # 50 ids
    with torch.no_grad():
        tower.token_embedding.weight[seen] = torch.tensor([3.0, -1.0, 0.5, 2.0]) + torch.randn(50, 4, generator=g) @ a.T
    before = tower.token_embedding.weight.detach().clone()
    assert redraw_unseen_token_rows(tower, seen, seed=0) == 30_000
    w = tower.token_embedding.weight.detach().double()
    assert torch.equal(w[seen].float(), before[seen])
    rows = w[torch.isin(torch.arange(30_050), seen, invert=True)]
    mu, sigma = before[seen].double().mean(0), torch.cov(before[seen].double().T)
    se = (sigma.diag() / 30_000).sqrt()
    assert ((rows.mean(0) - mu).abs() <= 6 * se).all()
    cov = torch.cov(rows.T)
    scale = (sigma.diag()[:, None] * sigma.diag()[None, :]).sqrt()                 # |Σ_ij| <= this
    assert ((cov - sigma).abs() <= 6 * scale * (2 / 30_000) ** 0.5).all()
    again = _Tower(30_050, 4)
    again.token_embedding.weight.data.copy_(before)
    redraw_unseen_token_rows(again, seen, seed=0)
    assert torch.equal(again.token_embedding.weight, tower.token_embedding.weight)
    redraw_unseen_token_rows(again, seen, seed=1)
    assert not torch.equal(again.token_embedding.weight, tower.token_embedding.weight)


def test_with_fewer_seen_rows_than_dimensions_the_draws_stay_on_their_affine_span():
    """Σ of 3 rows in 8 dimensions has rank 2: every draw is μ + a combination of the two
    centred rows' directions (no jitter leaks into the other 6)."""
    tower = _Tower(500, 8)
    seen = torch.tensor([0, 7, 42])
    tower.token_embedding.weight.data[seen] = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    redraw_unseen_token_rows(tower, seen, seed=0)
    w = tower.token_embedding.weight.detach().double()
    base = w[seen]
    span = torch.linalg.qr((base[1:] - base[0]).T).Q                                # (8, 2)
    off = w - base[0]
    residual = off - off @ span @ span.T
    assert residual.abs().max() < 1e-5
    assert (off @ span).std(0).min() > 0.1                                         # and they do spread on it


def test_stage_3b_alone_on_a_stage_3_file_changes_token_rows_only(tmp_path):
    """`--redraw-tokens-of`: the token rows of a stage-3 file are redrawn from the captions its
    metadata names (rebuilt, not stored); every other tensor keeps its bytes; the rows equal a
    one-run pretraining's up to the fp16 rounding of the file they start from; a mismatched
    setting or a file already redrawn is refused, naming the key."""
    cfg = PretrainConfig(vae_steps=2, vae_batch=2, decoder_steps=2, latent_images=4, unet_steps=2,
                         unet_batch=2, warmup_steps=1, checkpoint_every=1, size=32, vae_crop=16)
    stage3 = pretrain_tiny(cfg, tmp_path / "work", tmp_path / "s3.safetensors")      # 3b is off by default
    out = redraw_file_token_rows(cfg, stage3, tmp_path / "s3b.safetensors")
    with safe_open(str(stage3), "pt") as a, safe_open(str(out), "pt") as b:
        changed = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
        meta = b.metadata()
        emb = b.get_tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    assert changed == ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    assert meta["pretrain_redraw_unseen_tokens"] == "True" and meta["pretrain_unet_steps"] == "2"
    assert int(meta["token_rows_redrawn"]) > 49_000 and "s3.safetensors (SHA-256 " in meta["token_rows_redrawn_in"]
    whole = pretrain_tiny(replace(cfg, redraw_unseen_tokens=True), tmp_path / "work",
                          tmp_path / "one.safetensors")                         # stages 1-3 resumed, then 3b
    with safe_open(str(whole), "pt") as f:
        one = f.get_tensor("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight")
    assert torch.allclose(one.float(), emb.float(), rtol=0.02, atol=2e-3)
    with pytest.raises(MeddapError, match=r"metadata pretrain_latent_images = '4', but the settings say '5'"):
        redraw_file_token_rows(replace(cfg, latent_images=5), stage3, tmp_path / "x.safetensors")
    with pytest.raises(MeddapError, match=r"already redrawn"):
        redraw_file_token_rows(cfg, out, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def _class_context_change(text) -> float:
    """rms(τ(benign prompt) - τ(malignant prompt)) / rms(τ(benign prompt)) over the 77 x 64 context."""
    with torch.no_grad():
        c = text(text.tokenize([prompt_for("benign"), prompt_for("malignant")]))
    return float(((c[0] - c[1]).pow(2).mean() / c[0].pow(2).mean()).sqrt())


def test_shipped_tower_is_deaf_to_the_class_words_until_stage_3b():
    """The shipped file is without stage 3b: the rows no caption used are at their init
    (norm about 0.16, trained rows 0.28), and the benign and malignant prompts differ by
    under 12% of the context's rms (8.8%). Stage 3b with the recipe's seed makes the
    unseen rows as long as the trained ones and the two prompts >= 20% apart (42.5%;
    trained pairs such as "large"/"small": 32-42%), changing no trained row."""
    with safe_open(str(SHIPPED), "pt") as f:
        assert "pretrain_redraw_unseen_tokens" not in f.metadata()
    text = load_stable_diffusion(SHIPPED).text_encoder
    cfg = PretrainConfig()                                      # the captions of stage 3, exactly
    captions, _ = shapes.batch(cfg.seed, LATENT_IMAGES, cfg.latent_images, cfg.size, cfg.field_fraction)
    seen = seen_tokens({"tokens": text.tokenize(captions)}, text)
    unseen = torch.isin(torch.arange(text.token_embedding.num_embeddings), seen, invert=True)
    before = text.token_embedding.weight.detach().clone()
    norms = before.norm(dim=1)
    assert norms[unseen].mean() < 0.7 * norms[seen].mean()
    assert _class_context_change(text) < 0.12
    redraw_unseen_token_rows(text, seen, seed=0)
    norms = text.token_embedding.weight.detach().norm(dim=1)
    assert norms[unseen].mean() == pytest.approx(norms[seen].mean().item(), rel=0.1)
    assert torch.equal(text.token_embedding.weight[seen], before[seen])
    assert _class_context_change(text) >= 0.20
