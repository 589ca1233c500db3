"""Text-to-image on the tiny config: seeds, guidance, PNG provenance and `meddap sample`."""
import json
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from meddap.cli import main
from meddap.errors import MeddapError
from meddap.io import read_jsonl, sha256_file
from meddap.models.stable_diffusion import build_stable_diffusion, save_stable_diffusion
from meddap.sampling.text_to_image import (encode_prompts, generate, guided_eps, image_seed,
                                           read_png_metadata, write_png)

SIZE = dict(height=16, width=40)          # latents (4, 2, 5): the odd width exercises the UNet's resizing


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return build_stable_diffusion("tiny")


@pytest.fixture(scope="module")
def tiny_sd64():
    """float64 copy. In float32, a batched matmul can round a row differently from a
    single-row one (e.g. time_embed: GEMM for B > 1, GEMV for B = 1), and a random
    network amplifies that; in float64 those roundings vanish, so a difference
    between batch sizes could only come from rows sharing noise or conditioning."""
    torch.manual_seed(0)
    return build_stable_diffusion("tiny").to(torch.float64)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_sd):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_stable_diffusion(tiny_sd, path)
    return path


def _pixels(results):
    return [np.asarray(r.image) for r in results]


def test_image_seed_formula():
    assert [image_seed(0, k) for k in range(3)] == [0, 1, 2]
    assert image_seed(1, 0) == 1_000_003 and image_seed(7, 5) == 7 * 1_000_003 + 5
    assert image_seed(2 ** 62, 1) == (2 ** 62 * 1_000_003 + 1) % 2 ** 63


def test_image_k_is_the_same_for_batch_sizes_1_and_4(tiny_sd64):
    """DDPM: both the initial noise and the noise of every step come from image k's generator."""
    prompts = ["benign tumor", "malignant tumor", "no tumor", "benign tumor"]
    seeds = [image_seed(3, k) for k in range(4)]
    kw = dict(sampler="ddpm", steps=2, guidance=7.5, show_progress=False, height=16, width=24)
    batched = _pixels(generate(tiny_sd64, prompts, seeds, batch_size=4, **kw))
    single = [_pixels(generate(tiny_sd64, [p], [s], batch_size=1, **kw))[0]
              for p, s in zip(prompts, seeds)]
    for k in range(4):
        assert np.array_equal(batched[k], single[k]), f"image {k} depends on the batch size"
    assert not np.array_equal(batched[0], batched[3])     # same prompt, other seed


def test_float32_batches_differ_by_rounding_only_on_the_shipped_tiny_base():
    """The same property in float32 with trained weights (the shipped tiny base): batched and
    single-row kernels may round differently, which moves no pixel by more than one grey
    level; sharing noise or conditioning between rows would move them by far more."""
    from pathlib import Path

    from meddap.models.stable_diffusion import load_stable_diffusion
    sd = load_stable_diffusion(Path(__file__).resolve().parents[1] / "weights/tiny/tiny-sd.safetensors")
    prompts = ["ultrasound image of benign tumor in the breast", "a small red ellipse on a striped blue background",
               "ultrasound image of no tumor in the breast", "ultrasound image of benign tumor in the breast"]
    seeds = [image_seed(3, k) for k in range(4)]
    kw = dict(sampler="ddpm", steps=10, height=64, width=64, show_progress=False)
    batched = _pixels(generate(sd, prompts, seeds, batch_size=4, **kw))
    for k in range(4):
        single = _pixels(generate(sd, [prompts[k]], [seeds[k]], batch_size=1, **kw))[0]
        assert np.abs(batched[k].astype(int) - single.astype(int)).max() <= 1, f"image {k}"
    assert np.abs(batched[0].astype(int) - batched[3].astype(int)).max() > 1   # same prompt, other seed


@pytest.mark.parametrize("scale,which", [(1.0, "cond"), (0.0, "uncond")])
def test_guidance_endpoints(tiny_sd64, scale, which):
    """ε̂ = ε_u + s(ε_c − ε_u): s = 1 gives the conditional prediction, s = 0 the unconditional."""
    _, cond = encode_prompts(tiny_sd64, ["benign tumor", "no tumor"])       # (2, 77, 64)
    _, uncond = encode_prompts(tiny_sd64, ["", ""])
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 4, 5, generator=g)
    t = torch.tensor([981, 500])
    guided = guided_eps(tiny_sd64.unet, uncond, cond, scale)(z, t)
    with torch.no_grad():
        direct = tiny_sd64.unet(z.double(), t, cond if which == "cond" else uncond).float()
    assert guided.dtype == torch.float32
    torch.testing.assert_close(guided, direct, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cond, uncond)


def test_guidance_combines_both_predictions(tiny_sd64):
    _, cond = encode_prompts(tiny_sd64, ["malignant tumor"])
    _, uncond = encode_prompts(tiny_sd64, ["blurry"])
    z = torch.randn(1, 4, 4, 5, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([301])
    with torch.no_grad():
        e_c = tiny_sd64.unet(z.double(), t, cond)
        e_u = tiny_sd64.unet(z.double(), t, uncond)
    expected = (e_u + 7.5 * (e_c - e_u)).float()
    torch.testing.assert_close(guided_eps(tiny_sd64.unet, uncond, cond, 7.5)(z, t), expected,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampler,steps", [("pndm", 3), ("ddpm", 2)])
def test_matches_diffusers_stable_diffusion_pipeline(sampler, steps):
    """End to end against diffusers' StableDiffusionPipeline holding the same weights
    (converted by diffusers' own single-file code) and SD v1.4's scheduler: same CFG
    batch order and formula, initial noise and DDPM step noise from the same per-image
    generators, latent scale, decode and 8-bit conversion.

    The UNet's last conv is scaled by 0.05: a random UNet under guidance 7.5 is so
    chaotic that a 1e-7 change of z_T moves the latents by ~10% after 3 steps, which
    would hide any comparison; a small ε keeps the dynamics tame.
    """
    from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline
    from oracles import diffusers_unet_from_ours, diffusers_vae_from_ours
    torch.manual_seed(0)
    sd = build_stable_diffusion("tiny")
    with torch.no_grad():
        sd.unet.out[2].weight.mul_(0.05)
        sd.unet.out[2].bias.mul_(0.05)
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1)
    scheduler = (PNDMScheduler(**config, set_alpha_to_one=False, skip_prk_steps=True)
                 if sampler == "pndm" else DDPMScheduler(**config, clip_sample=False))
    pipe = StableDiffusionPipeline(
        vae=diffusers_vae_from_ours(sd.vae.state_dict(), sd.config.vae),
        unet=diffusers_unet_from_ours(sd.unet.state_dict(), sd.config.unet),
        text_encoder=None, tokenizer=None, scheduler=scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["benign tumor", "no tumor"], [image_seed(0, k) for k in range(2)]
    ours = _pixels(generate(sd, prompts, seeds, sampler=sampler, steps=steps, guidance=7.5,
                            batch_size=2, show_progress=False, height=16, width=24))
    ref = pipe(prompt_embeds=encode_prompts(sd, prompts)[1],
               negative_prompt_embeds=encode_prompts(sd, ["", ""])[1],
               num_inference_steps=steps, guidance_scale=7.5, height=16, width=24,
               generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    ref = (ref * 255).round().astype(int)                      # diffusers' numpy_to_pil
    assert np.abs(np.stack(ours).astype(int) - ref).max() <= 1
    assert ref.std() > 10                                      # not a flat image


def test_empty_prompt_tokens_and_metadata(tiny_sd):
    tokens, _ = encode_prompts(tiny_sd, [""])
    assert tokens[0].tolist() == [49406] + [49407] * 76       # SD's unconditional prompt
    result = generate(tiny_sd, ["benign tumor"], [5], negative="blurry", sampler="ddim",
                      steps=1, guidance=3.0, show_progress=False, **SIZE)[0]
    assert result.image.mode == "RGB" and result.image.size == (SIZE["width"], SIZE["height"])
    meta = result.metadata
    assert meta["token_ids"] == encode_prompts(tiny_sd, ["benign tumor"])[0][0].tolist()
    assert {k: meta[k] for k in ("prompt", "negative_prompt", "seed", "sampler", "steps",
                                 "guidance", "height", "width", "lora_sha256")} == {
        "prompt": "benign tumor", "negative_prompt": "blurry", "seed": 5, "sampler": "ddim",
        "steps": 1, "guidance": 3.0, **SIZE, "lora_sha256": None}


def test_low_precision_runs(tiny_sd):
    bf16 = build_stable_diffusion("tiny", dtype=torch.bfloat16)
    image = generate(bf16, ["benign tumor"], [0], steps=1, show_progress=False, height=8, width=16)[0]
    assert image.image.size == (16, 8)


def test_long_prompt_warning_names_the_dropped_words(tiny_sd):
    words = ["breast"] * 74 + ["ultrasound", "zebra", "giraffe"]
    with pytest.warns(UserWarning, match=r"longer than the text encoder's 77 tokens.*'zebra giraffe'"):
        encode_prompts(tiny_sd, [" ".join(words)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(tiny_sd, [" ".join(words[:75])])


def test_png_metadata_round_trip(tmp_path):
    image = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    meta = {"prompt": "bénign tumour", "negative_prompt": "", "token_ids": [49406, 320, 49407],
            "seed": 2 ** 62 + 1, "guidance": 7.5, "lora_sha256": None, "prompt_cjk": "乳腺超声",
            "sampler": "pndm"}
    path = tmp_path / "x.png"
    write_png(path, image, meta)
    assert read_png_metadata(path) == meta
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    with Image.open(path) as im:
        assert json.loads(im.text["prompt"]) == "bénign tumour"
    path.write_bytes(path.read_bytes()[:-30])                  # a torn file
    with pytest.raises(MeddapError, match="not a complete PNG"):
        read_png_metadata(path)


def _sample_args(checkpoint, out, *extra):
    return ["sample", "--checkpoint", str(checkpoint), "--prompt", "benign tumor",
            "--n", "3", "--steps", "2", "--sampler", "ddim", "--height", "16", "--width", "24",
            "--batch-size", "2", "--seed", "4", "--out", str(out), "--quiet", *extra]


def test_cli_writes_images_and_manifest_and_resumes(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "gen"
    assert main(_sample_args(tiny_checkpoint, out)) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == ["00000.png", "00001.png", "00002.png"]
    rows = read_jsonl(out / "manifest.jsonl")
    assert [r["file"] for r in rows] == names
    assert [r["seed"] for r in rows] == [image_seed(4, k) for k in range(3)]
    meta = read_png_metadata(out / "00001.png")
    assert meta["checkpoint_sha256"] == sha256_file(tiny_checkpoint)
    assert meta["index"] == 1 and meta["base_seed"] == 4 and meta["prompt"] == "benign tumor"
    assert {k: v for k, v in rows[1].items() if k not in ("file", "sha256")} == meta
    assert rows[1]["sha256"] == sha256_file(out / "00001.png")

    first = np.asarray(Image.open(out / "00001.png"))
    (out / "00001.png").unlink()
    assert main(_sample_args(tiny_checkpoint, out)) == 0          # resume: only 00001 again
    assert np.array_equal(np.asarray(Image.open(out / "00001.png")), first)
    assert [r["file"] for r in read_jsonl(out / "manifest.jsonl")] == names + ["00001.png"]

    # Killed between a PNG and its manifest line: the line is restored, nothing resampled.
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(manifest)[:2]))
    mtime = (out / "00002.png").stat().st_mtime_ns
    assert main(_sample_args(tiny_checkpoint, out)) == 0
    assert [r["file"] for r in read_jsonl(manifest)] == ["00000.png", "00001.png", "00002.png"]
    assert (out / "00002.png").stat().st_mtime_ns == mtime

    capsys.readouterr()
    args = _sample_args(tiny_checkpoint, out)
    args[args.index("benign tumor")] = "malignant tumor"
    assert main(args) == 2
    assert "was made with other settings (prompt: 'benign tumor'" in capsys.readouterr().err


def test_cli_with_lora_records_its_hash(tiny_checkpoint, tmp_path):
    from meddap.lora import inject_lora, save_lora
    unet = build_stable_diffusion("tiny").unet
    inject_lora(unet, rank=2, targets="cross", generator=torch.Generator().manual_seed(0))
    lora = tmp_path / "adapter.safetensors"
    save_lora(unet, lora)
    out = tmp_path / "gen"
    args = _sample_args(tiny_checkpoint, out, "--lora", str(lora))
    args[args.index("--n") + 1] = "1"
    assert main(args) == 0
    assert read_png_metadata(out / "00000.png")["lora_sha256"] == sha256_file(lora)


@pytest.mark.parametrize("extra,message", [
    (["--height", "100"], r"--height = 100 must be a positive multiple of 8 \(SD's VAE maps 8 x 8 pixels"),
    (["--width", "0"], r"--width = 0 must be a positive multiple of 8"),
    (["--steps", "0"], r"--steps = 0 is out of range; use a value from 1 to 1000\."),
    (["--steps", "1001"], r"--steps = 1001 is out of range"),
    (["--dtype", "fp8"], r"--dtype = 'fp8' is not a dtype; choose one of fp32, fp16, bf16\."),
    (["--guidance", "-5"], r"--guidance = -5 is out of range; use a value from 0 to 100\."),
    (["--guidance", "nan"], r"--guidance = nan is not a finite number\."),
    (["--seed", "-1"], r"--seed = -1 must be at least 0\."),
    (["--n", "0"], r"--n = 0 must be at least 1\."),
    (["--sampler", "pndm", "--eta", "0.5"],
     r"--eta = 0.5 applies to the ddim sampler only; --sampler = 'pndm' takes no eta \(leave it at 0\)\."),
])
def test_cli_bad_input(tiny_checkpoint, tmp_path, capsys, extra, message):
    args = _sample_args(tiny_checkpoint, tmp_path / "gen") + extra   # the last occurrence wins
    assert main(args) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "gen").exists()                           # refused before any work


def test_cli_unwritable_output_folder(tiny_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(_sample_args(tiny_checkpoint, blocker / "gen")) == 2
    assert "cannot create output folder" in capsys.readouterr().err
