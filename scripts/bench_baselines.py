"""The baselines of `meddap bench --baseline diffusers`: diffusers (+ peft) and pytorch-fid doing
the work of each bench path, timed by meddap.bench in the same process. These are test-only
oracles (setup.cfg's `test` extra), so this file lives outside meddap/ and meddap.bench loads
it from the checkout."""
from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F

from meddap.bench import Bench, Work

def _diffusers_models(sd, dtype):
    """diffusers' UNet2DConditionModel and AutoencoderKL of the same shape as `sd` (random weights).
    Note: diffusers is a test extra; it is imported only here, for `--baseline diffusers`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    u, v = sd.config.unet, sd.config.vae
    attends = [2**i in u.attention_resolutions for i in range(len(u.channel_mult))]
    unet = UNet2DConditionModel(
        sample_size=64, in_channels=u.in_channels, out_channels=u.out_channels,
        block_out_channels=tuple(u.model_channels * m for m in u.channel_mult),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        layers_per_block=u.num_res_blocks, attention_head_dim=u.num_heads, cross_attention_dim=u.context_dim,
        norm_num_groups=u.norm_groups)
    vae = AutoencoderKL(
        in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
        block_out_channels=tuple(v.ch * m for m in v.ch_mult), layers_per_block=v.num_res_blocks,
        down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
        up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult), norm_num_groups=v.norm_groups,
        scaling_factor=v.latent_scale)
    unet, vae = unet.to(sd.device).requires_grad_(False), vae.to(sd.device).requires_grad_(False)
    if dtype is not torch.float32:            # (diffusers warns about a cast of a model built in Python)
        unet, vae = unet.to(dtype), vae.to(dtype)
    return unet, vae


def _sd_scheduler(cls):
    """A diffusers scheduler with SD v1.4's scheduler_config.json (CompVis/stable-diffusion-v1-4)."""
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "steps_offset": 1}
    extra = {"PNDMScheduler": {"skip_prk_steps": True, "set_alpha_to_one": False},
             "DDIMScheduler": {"clip_sample": False, "set_alpha_to_one": False},
             "DDPMScheduler": {"clip_sample": False}}[cls.__name__]
    return cls(**config, **extra)


def baseline_work(name: str, bench: Bench, work: Work) -> tuple[Work | None, str]:
    """The diffusers (+ peft) equivalent of path `name` and what it times, or None and why not."""
    import importlib.util

    if name == "classify_resnet34_224":
        return None, "no diffusers equivalent: meddap trains torchvision's network itself"
    if name == "fid_features":
        if importlib.util.find_spec("pytorch_fid") is None:
            return None, "pytorch-fid is not installed"
        note = "pytorch-fid's InceptionV3 (the FID reference), random weights"
        return _pytorch_fid(bench, work, note), note
    if importlib.util.find_spec("diffusers") is None:
        return None, "diffusers is not installed (pip install meddap[test])"
    if name.startswith("train_lora"):
        if importlib.util.find_spec("peft") is None:
            return None, "peft is not installed; diffusers' LoRA training needs it"
        note = "diffusers UNet + peft LoRA (attn2 q, k, v, out), AdamW"
        return _diffusers_lora(bench, work, encode_every_step=name == "train_lora_224", note=note), note
    note = "StableDiffusionPipeline (prompt embeddings given), PIL output"
    pndm = name == "pndm30_b1_512"
    steps = bench.sizes.pndm_steps if pndm else bench.sizes.ddim_steps
    return _diffusers_sample(bench, work, pndm, steps, note), note


def _diffusers_lora(bench: Bench, work: Work, encode_every_step: bool, note: str) -> Work:
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from meddap.lora.train import ADAM_BETAS, ADAM_EPS, ADAM_WEIGHT_DECAY, MAX_GRAD_NORM

    device, dtype, size = bench.device, bench.dtype, work.size
    unet, vae = _diffusers_models(bench.sd, dtype)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=r".*attn2\.(to_q|to_k|to_v|to_out\.0)"))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()                               # adapters in float32, as meddap's
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=ADAM_WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    noise_scheduler = _sd_scheduler(DDPMScheduler)
    context = torch.randn(1, 77, bench.sd.config.unet.context_dim, device=device, dtype=dtype)  # (1, 77, C)
    x = torch.rand(1, 3, size, size, device=device, dtype=dtype) * 2 - 1                       # (1, 3, s, s)
    with torch.no_grad():
        cached = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor               # (1, 4, s/8, s/8)

    def step():
        for _ in range(work.items):
            with torch.no_grad():
                z0 = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor if encode_every_step else cached
            noise = torch.randn_like(z0, dtype=torch.float32)
            t = torch.randint(0, 1000, (1,), device=device)
            z_t = noise_scheduler.add_noise(z0.float(), noise, t)
            loss = F.mse_loss(unet(z_t.to(dtype), t, context).sample.float(), noise)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            scaler.step(optimizer)
            scaler.update()
        return loss.item()
    return Work(step, work.items, work.unit, size, 1, False, note)


def _diffusers_sample(bench: Bench, work: Work, pndm: bool, steps: int, note: str) -> Work:
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    unet, vae = _diffusers_models(bench.sd, bench.dtype)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=_sd_scheduler(PNDMScheduler if pndm else DDIMScheduler), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    B, C = work.batch, bench.sd.config.unet.context_dim
    embeds = torch.randn(2, B, 77, C, device=bench.device, dtype=bench.dtype)           # cond, uncond
    return Work(lambda: pipe(prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1],
                             num_inference_steps=steps, guidance_scale=7.5, height=work.size,
                             width=work.size, output_type="pil"),
                B, work.unit, work.size, B, False, note)


def _pytorch_fid(bench: Bench, work: Work, note: str) -> Work:
    import pytorch_fid.inception as pf

    from meddap.fid.inception import InceptionGraph, InceptionV3

    ours = InceptionV3(InceptionGraph.FID_TF2015).state_dict()
    # Patch (baseline only, scoped): pytorch-fid downloads its weight file; it gets the
    # random weights of our network, whose tensor names are the file's.
    with mock.patch.object(pf, "load_state_dict_from_url", lambda *a, **k: ours):
        net = pf.InceptionV3([pf.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval().to(bench.device)
    x = torch.rand(work.batch, 3, 299, 299, generator=torch.Generator().manual_seed(0))

    def step():
        with torch.inference_mode():
            return net(x.to(bench.device))[0].cpu().numpy()   # (B, 2048, 1, 1)
    return Work(step, work.batch, work.unit, 299, work.batch, False, note)


# ---------------------------------------------------------------- the run

