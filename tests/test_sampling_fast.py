"""The sampling fast path: merged adapters, GroupNorm32's CUDA road, one negative-prompt
encoding, step noise drawn up front, PNGs written off the main thread, the compile flag.

Each piece keeps the CPU results it had: bitwise where the arithmetic is the same
(GroupNorm32 on the CPU, the step noise, the files and the manifest), within a
measured float32 tolerance where it is not (merged adapters)."""
import dataclasses
import json
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from fake_cuda import fake_cuda, line_of
from meddap.errors import MeddapError
from meddap.io import append_jsonl, read_jsonl, sha256_file
from meddap.lora import disable_lora, enable_lora, inject_lora, lora_layers, merge_lora
from meddap.models.attention import GroupNorm32
from meddap.models.config import TINY
from meddap.models.stable_diffusion import StableDiffusion, build_stable_diffusion
from meddap.models.unet import UNetModel
from meddap.sampling import samplers, text_to_image
from meddap.sampling.generation import GenerationConfig, ImageJob, SampleConfig, write_images
from meddap.sampling.samplers import Sampler, denoise, draw_noise, draw_step_noise
from meddap.sampling.schedule import NoiseSchedule
from meddap.sampling.text_to_image import (TextToImage, encode_prompts, generate, guided_eps, image_seed,
                                           read_png_metadata, write_png)
from meddap.settings import from_table

CFG = GenerationConfig(sampler=Sampler.DDIM, steps=2, height=16, width=16, batch_size=2)
CUDA = torch.device("cuda", 0)
SAMPLERS = "meddap/sampling/samplers.py"
# Sampling under fake CUDA: the noise of all steps is one copy per run, made before the first step.
STEP_NOISE = ("cpu->cuda", line_of(SAMPLERS, "return torch.stack(steps).to(device=like.device, dtype=like.dtype)"))


def adapted_sd(up_std: float = 0.05):
    """Tiny SD (seed 0) with rank-4 adapters on every target and random `up` (ΔW ≠ 0)."""
    torch.manual_seed(0)
    sd = build_stable_diffusion("tiny")
    inject_lora(sd.unet, rank=4, targets="all", generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    for m in lora_layers(sd.unet).values():
        m.lora_up.data.normal_(0.0, up_std, generator=g)
    return sd


@pytest.fixture(scope="module")
def tiny_sd():
    torch.manual_seed(0)
    return build_stable_diffusion("tiny")


def _jobs(n=5):
    return [ImageJob(file=f"{k:05d}.png", prompt="benign tumor", seed=image_seed(3, k), meta={"index": k})
            for k in range(n)]


def _pngs(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


# ---------------------------------------------------------------- 1. merged adapters

def _ddim_latents(sd, size=16):
    """z_0 of 4 DDIM steps, guidance 7.5, two prompts, latents (2, 4, size, size), seeds 5 and 6."""
    _, uncond = encode_prompts(sd, [""])
    _, cond = encode_prompts(sd, ["benign tumor", "malignant tumor"])
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    z_T = draw_noise(torch.empty(2, 4, size, size), gens)
    return denoise(guided_eps(sd.unet, uncond.expand(2, -1, -1), cond, 7.5), z_T, "ddim", 4, 0.0, gens)


def test_merged_sampling_equals_unmerged_within_float32_rounding():
    """Measured on this set-up: |merged − unmerged| ≤ 3e-5 (latents up to ~17), while the
    adapters move the latents by more than 1; one UNet call differs by ~1e-6.
    Note: at 2 x 2 latents the tiny UNet's GroupNorms see near-zero variances and
    amplify any rounding (up to 1e0), so the comparison uses 16 x 16."""
    sd = adapted_sd()
    disable_lora(sd.unet)
    base = _ddim_latents(sd)
    enable_lora(sd.unet)
    unmerged = _ddim_latents(sd)
    merge_lora(sd.unet)
    merged = _ddim_latents(sd)
    assert (unmerged - base).abs().max() > 1.0                       # ΔW matters
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-4)


def test_write_images_merges_by_default_and_records_it(tmp_path):
    cfg = dataclasses.replace(CFG, height=64, width=64)
    merged_sd, separate_sd = adapted_sd(), adapted_sd()
    merged = write_images(merged_sd, cfg, _jobs(2), tmp_path / "merged", quiet=True)
    separate = write_images(separate_sd, dataclasses.replace(cfg, merge=False), _jobs(2), tmp_path / "separate",
                            quiet=True)
    assert all(m.merged for m in lora_layers(merged_sd.unet).values())
    assert not any(m.merged for m in lora_layers(separate_sd.unet).values())
    for rows, value, folder in ((merged, True, "merged"), (separate, False, "separate")):
        assert [r["lora_merged"] for r in rows.values()] == [value, value]
        assert read_png_metadata(tmp_path / folder / "00000.png")["lora_merged"] is value
    for file in merged:                                                # at most one grey level apart
        a, b = (np.asarray(Image.open(tmp_path / f / file), dtype=int) for f in ("merged", "separate"))
        assert np.abs(a - b).max() <= 1
    # Without adapters there is nothing to merge: lora_merged is false whatever cfg.merge.
    torch.manual_seed(0)
    rows = write_images(build_stable_diffusion("tiny"), cfg, _jobs(1), tmp_path / "base", quiet=True)
    assert rows["00000.png"]["lora_merged"] is False


def _drop_key(manifest, key):
    lines = read_jsonl(manifest)
    manifest.write_text("".join(json.dumps({k: v for k, v in r.items() if k != key}) + "\n" for r in lines))


def test_a_line_from_before_lora_merged_reads_as_not_merged(tmp_path):
    """Older versions never merged: their lines resume a base run and an adapted run with
    merge off; an adapted run with merge on stops, naming the setting."""
    torch.manual_seed(0)
    base = build_stable_diffusion("tiny")
    write_images(base, CFG, _jobs(2), tmp_path / "base", quiet=True)
    _drop_key(tmp_path / "base" / "manifest.jsonl", "lora_merged")
    before = _pngs(tmp_path / "base")
    rows = write_images(base, CFG, _jobs(2), tmp_path / "base", quiet=True)
    assert "lora_merged" not in rows["00000.png"] and _pngs(tmp_path / "base") == before   # kept

    separate = dataclasses.replace(CFG, merge=False)
    write_images(adapted_sd(), separate, _jobs(2), tmp_path / "adapted", quiet=True)
    _drop_key(tmp_path / "adapted" / "manifest.jsonl", "lora_merged")
    write_images(adapted_sd(), separate, _jobs(2), tmp_path / "adapted", quiet=True)
    with pytest.raises(MeddapError) as e:
        write_images(adapted_sd(), CFG, _jobs(2), tmp_path / "adapted", quiet=True)
    assert str(e.value) == (f"{tmp_path / 'adapted' / '00000.png'} was made with other settings "
                            f"(lora_merged: False, this run: True); use another --out folder or delete it.")


def test_merge_and_compile_are_settings_on_the_cli_and_in_toml():
    import argparse
    from meddap.settings import add_arguments, from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser, SampleConfig)
    required = ["--checkpoint", "c", "--prompt", "p", "--out", "o"]
    assert from_args(SampleConfig, parser.parse_args(required)).merge is True
    assert from_args(SampleConfig, parser.parse_args(required + ["--no-merge"])).merge is False
    assert from_args(SampleConfig, parser.parse_args(required)).compile is False
    assert from_table(GenerationConfig, {"merge": False}, "generate").merge is False
    with pytest.raises(MeddapError, match=r"^\[generate\] compile = true works on CUDA only; "
                                          r"\[generate\] device = 'cpu' \(leave \[generate\] compile off there\)\.$"):
        from_table(GenerationConfig, {"compile": True, "device": "cpu"}, "generate")
    with pytest.raises(MeddapError, match=r"^--compile = true works on CUDA only; --device = 'cpu'"):
        from_args(SampleConfig, parser.parse_args(required + ["--compile", "--device", "cpu"]))


def test_compile_is_refused_on_the_cpu(tiny_sd):
    """The compiled road is CUDA only and is not run by these tests."""
    with pytest.raises(MeddapError, match=r"^compile = true works on CUDA only; this model is on cpu "
                                          r"\(leave compile off there\)\.$"):
        TextToImage(tiny_sd, dataclasses.replace(CFG, compile=True))


# ---------------------------------------------------------------- 2. GroupNorm32

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_norm32_on_the_cpu_is_the_float32_upcast_bitwise(dtype):
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
        norm.bias.copy_(torch.randn(16, generator=g))
    norm.to(dtype)
    x = (3 * torch.randn(2, 16, 5, 7, generator=g) + 1).to(dtype)    # (B, C, H, W)
    y = norm(x)
    if dtype == torch.float32:
        expected = F.group_norm(x, 4, norm.weight, norm.bias, 1e-6)
    else:
        expected = F.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), 1e-6).to(dtype)
    assert y.dtype == dtype and torch.equal(y, expected)


class CastCounter(TorchDispatchMode):
    """Counts aten._to_copy calls (every .float(), .to(dtype) and device copy)."""

    def __init__(self):
        super().__init__()
        self.casts = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.casts += 1
        return func(*args, **(kwargs or {}))


def _upcast_forward(self, x):
    """GroupNorm32's CPU road, forced here on fake CUDA: the forward it had before on CUDA too."""
    if x.dtype == torch.float32:
        return torch.nn.GroupNorm.forward(self, x)
    return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def _unet_forward_casts(unet, calls):
    x = torch.randn(2, 4, 8, 8).to(CUDA)                               # (B, 4, h, w)
    context = torch.randn(2, 77, TINY.unet.context_dim).to(CUDA)       # (B, 77, D)
    t = torch.tensor([500, 500]).to(CUDA)
    counter = CastCounter()
    with torch.no_grad(), counter:
        eps = unet(x, t, context)
    assert (eps.dtype, eps.device) == (torch.float16, CUDA)
    return counter.casts


def test_group_norm32_on_cuda_in_fp16_calls_the_native_kernel(monkeypatch):
    """One tiny UNet forward in fp16 on fake CUDA, 8 x 8 latents, B = 2. Recorded:
    with the upcast 406 casts, native 162: 4 fewer per GroupNorm32 call (61 calls)."""
    with fake_cuda(torch.float16):
        with torch.device("cuda"):
            unet = UNetModel(TINY.unet).eval()
        calls = []
        for m in unet.modules():
            if isinstance(m, GroupNorm32):
                m.register_forward_hook(lambda mod, inp, out: calls.append(out.dtype))
        native = _unet_forward_casts(unet, calls)
        n = len(calls)
        monkeypatch.setattr(GroupNorm32, "forward", _upcast_forward)
        upcast = _unet_forward_casts(unet, calls)
    assert set(calls) == {torch.float16} and len(calls) == 2 * n
    assert upcast - native == 4 * n                  # x.float(), weight.float(), bias.float(), .to(fp16)
    assert (n, upcast, native) == (61, 406, 162)


# ---------------------------------------------------------------- 3. one negative-prompt encoding

def test_the_negative_prompt_is_encoded_once_per_run(tiny_sd, tmp_path):
    texts = []

    def record(module, args):
        texts.append(args[0].shape[0])                                  # rows of token ids

    hook = tiny_sd.text_encoder.register_forward_pre_hook(record)
    try:
        write_images(tiny_sd, dataclasses.replace(CFG, negative="blurry"), _jobs(5), tmp_path, quiet=True)
        run = list(texts)
        texts.clear()
        generate(tiny_sd, ["a", "b", "c"], [0, 1, 2], steps=1, height=16, width=16, batch_size=2,
                 show_progress=False)
    finally:
        hook.remove()
    assert run == [1, 2, 2, 1]                         # the negative, then one call per chunk of 2, 2, 1
    assert texts == [1, 2, 1]


# ---------------------------------------------------------------- 4. step noise up front

def _generators(rows: int, single: bool):
    return torch.Generator().manual_seed(7) if single else [torch.Generator().manual_seed(10 + b)
                                                            for b in range(rows)]


def _states(generator):
    return [g.get_state() for g in (generator if isinstance(generator, list) else [generator])]


@pytest.mark.parametrize("single", [False, True])
@pytest.mark.parametrize("rows", [1, 3])
def test_step_noise_is_the_sequence_of_per_step_draws_bitwise(rows, single):
    """(B, 4, 5, 3): 60 values a row, not a multiple of 16, where torch's CPU normal sampler
    changes code path; the up-front draws still equal the per-step ones."""
    shape = (rows, 4, 5, 3)
    generator, twin = _generators(rows, single), _generators(rows, single)
    up_front = draw_step_noise(torch.empty(shape), generator, 4)           # (4, B, 4, 5, 3)
    per_step = torch.stack([draw_noise(torch.empty(shape), twin) for _ in range(4)])
    assert up_front.shape == (4, *shape) and torch.equal(up_front, per_step)
    assert all(torch.equal(a, b) for a, b in zip(_states(generator), _states(twin)))
    assert draw_step_noise(torch.empty(shape), generator, 0).shape == (0, *shape)
    assert all(torch.equal(a, b) for a, b in zip(_states(generator), _states(twin)))   # nothing drawn


def _per_step_sampler(sampler, eps_fn, x, timesteps, eta, generator):
    """DDPM / DDIM as they were with one draw_noise call per noisy step (the oracle)."""
    ab = NoiseSchedule.sd_v1().alphas_cumprod.tolist()
    for i, t in enumerate(timesteps):
        ab_t = ab[t]
        last = i + 1 == len(timesteps)
        eps = eps_fn(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x0_hat = (x - (1.0 - ab_t) ** 0.5 * eps) / ab_t ** 0.5
        if sampler == "ddpm":
            ab_prev = 1.0 if last else ab[timesteps[i + 1]]
            beta = 1.0 - ab_t / ab_prev
            x = ((ab_prev ** 0.5 * beta / (1.0 - ab_t)) * x0_hat
                 + ((1.0 - beta) ** 0.5 * (1.0 - ab_prev) / (1.0 - ab_t)) * x)
            post_var = (1.0 - ab_prev) / (1.0 - ab_t) * beta
            if post_var > 0:
                x = x + post_var ** 0.5 * draw_noise(x, generator)
        else:
            ab_prev = ab[0] if last else ab[timesteps[i + 1]]
            sigma = eta * ((1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev)) ** 0.5
            x = ab_prev ** 0.5 * x0_hat + (1.0 - ab_prev - sigma ** 2) ** 0.5 * eps
            if eta > 0:
                x = x + sigma * draw_noise(x, generator)
    return x


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 0.5), ("ddim", 1.0)])
def test_up_front_step_noise_gives_the_same_latents_bitwise(tiny_sd, sampler, eta):
    _, uncond = encode_prompts(tiny_sd, [""])
    _, cond = encode_prompts(tiny_sd, ["benign tumor", "malignant tumor"])
    eps_fn = guided_eps(tiny_sd.unet, uncond.expand(2, -1, -1), cond, 7.5)
    results = []
    for run in (denoise, _per_step_sampler):
        gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
        z_T = draw_noise(torch.empty(2, 4, 3, 5), gens)
        if run is denoise:
            z0 = denoise(eps_fn, z_T, sampler, 3, eta, gens)
        else:
            z0 = _per_step_sampler(sampler, eps_fn, z_T, samplers.leading_timesteps(3), eta, gens)
        results.append((z0, [g.get_state() for g in gens]))
    (ours, our_states), (oracle, oracle_states) = results
    assert torch.equal(ours, oracle)
    assert all(torch.equal(a, b) for a, b in zip(our_states, oracle_states))   # the same draws


GUIDED_STEP_KERNELS = 2730   # tiny UNet on the stacked [uncond; cond] batch + the guidance arithmetic


@pytest.mark.parametrize("sampler, steps, eta, expected", [
    ("ddpm", 3, 0.0, {STEP_NOISE: 1}), ("ddpm", 1, 0.0, {}),      # one step: σ = 0, nothing drawn
    ("ddim", 3, 0.5, {STEP_NOISE: 1}), ("ddim", 3, 0.0, {}), ("pndm", 3, 0.0, {})])
def test_on_fake_cuda_the_steps_upload_nothing(sampler, steps, eta, expected):
    """Replaces test_cuda_fake_paths' per-step expectation ({NOISE: 1} per noisy step): the
    noise of all steps is one copy before the first step; the steps copy nothing."""
    B = 2
    with fake_cuda(torch.float16) as fc:
        with torch.device("cuda"):
            sd = StableDiffusion(TINY).eval()
        _, uncond = encode_prompts(sd, [""])
        _, cond = encode_prompts(sd, ["benign", "malignant"])
        generators = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
        z_T = draw_noise(torch.empty((B, 4, 8, 8), device=sd.device, dtype=torch.float32), generators)
        eps_fn = guided_eps(sd.unet, uncond.expand(B, -1, -1), cond, 7.5)
        per_call, kernels = [], []

        def counted(z, t):
            per_call.append(sum(fc.syncs.values()))
            before = sum(fc.kernels.values())
            eps = eps_fn(z, t)
            kernels.append(sum(fc.kernels.values()) - before)
            return eps

        fc.reset()
        z0 = denoise(counted, z_T, sampler, steps, eta, generators)
        assert (z0.shape, z0.dtype, z0.device) == (z_T.shape, torch.float32, CUDA)
        assert fc.syncs == Counter(expected)
        assert len(set(per_call)) == 1                 # nothing copied between the first call and the last
        # kernel-launching CUDA operators of one guided UNet call (fp16, tiny config), recorded
        assert set(kernels) == {GUIDED_STEP_KERNELS}, kernels


# ---------------------------------------------------------------- 5. PNGs written off the main thread

def _one_thread_writer(sd, cfg, jobs, out):
    """write_images as it was before the writer threads, for a fresh folder: chunk by chunk,
    write each PNG, hash it, append its line (the oracle)."""
    out.mkdir(parents=True)
    t2i = TextToImage(sd, cfg)
    for s in range(0, len(jobs), cfg.batch_size):
        chunk = jobs[s:s + cfg.batch_size]
        for job, result in zip(chunk, t2i([j.prompt for j in chunk], [j.seed for j in chunk])):
            meta = {**result.metadata, **job.meta}
            write_png(out / job.file, result.image, meta)
            append_jsonl(out / "manifest.jsonl", {"file": job.file, "sha256": sha256_file(out / job.file), **meta})


def test_written_files_and_manifest_are_the_bytes_of_a_one_thread_writer(tiny_sd, tmp_path, monkeypatch):
    _one_thread_writer(tiny_sd, CFG, _jobs(5), tmp_path / "oracle")
    threads, real_write_png = [], text_to_image.write_png

    def slow_first(path, image, meta):              # the first file of each chunk finishes last
        threads.append(threading.current_thread().name)
        if meta["index"] % 2 == 0:
            time.sleep(0.2)
        real_write_png(path, image, meta)

    def verified_append(path, row):                 # a line only for bytes on disk that hash to it
        assert sha256_file(path.parent / row["file"]) == row["sha256"]
        append_jsonl(path, row)

    monkeypatch.setattr(text_to_image, "write_png", slow_first)
    monkeypatch.setattr("meddap.io.append_jsonl", verified_append)
    out = tmp_path / "threads"
    rows = write_images(tiny_sd, CFG, _jobs(5), out, quiet=True)
    assert list(rows) == [f"{k:05d}.png" for k in range(5)]
    assert _pngs(out) == _pngs(tmp_path / "oracle")
    assert (out / "manifest.jsonl").read_bytes() == (tmp_path / "oracle" / "manifest.jsonl").read_bytes()
    assert len(threads) == 5 and all(name.startswith("png") for name in threads)

    # Resume: in chunk 1, job 2 lost its line (adopted) and job 3 its file (new). A one-thread
    # writer appends chunk 0's nothing, then the adopted line, then the new one.
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines(keepends=True)
    manifest.write_text("".join(lines[:2] + lines[4:]))
    (out / "00003.png").unlink()
    write_images(tiny_sd, CFG, _jobs(5), out, quiet=True)
    assert manifest.read_text().splitlines(keepends=True) == lines[:2] + lines[4:] + [lines[2], lines[3]]
    assert _pngs(out) == _pngs(tmp_path / "oracle")


def test_a_failed_write_stops_the_run_without_a_line_for_it(tiny_sd, tmp_path, monkeypatch):
    def full_disk(path, image, meta):
        if meta["index"] == 3:
            raise OSError("No space left on device")
        write_png(path, image, meta)

    monkeypatch.setattr(text_to_image, "write_png", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_images(tiny_sd, CFG, _jobs(5), tmp_path, quiet=True)
    assert [r["file"] for r in read_jsonl(tmp_path / "manifest.jsonl")] == ["00000.png", "00001.png"]
    assert not (tmp_path / "00003.png").exists()
    for row in read_jsonl(tmp_path / "manifest.jsonl"):
        assert sha256_file(tmp_path / row["file"]) == row["sha256"]
