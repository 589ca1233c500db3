"""The hot paths on a fake CUDA device (tests/fake_cuda.py): one LoRA training step, sampler
steps with classifier-free guidance, the classifiers' forward pass.

Each test states every host<->device copy and sync of one step, by the meddap
line that issues it (named by its code text, `line_of`). A change that adds a
copy or a `.item()` to a step fails here with the line that added it. The fake
device also applies a GPU's device rules, so a CPU tensor meeting CUDA weights
raises as it would on a GPU. Backward does not run under the fake mode; the
backward and AdamW half of the training step runs on the `meta` device.
"""
import inspect
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fake_cuda import cuda_autocast, fake_cuda, line_of
from meddap.classify.networks import Arch, build_network
from meddap.classify.train import TrainConfig, normalise, train_classifier
from meddap.data.datasets import resolve_training_images
from meddap.device import pin_cudnn
from meddap.lora import train as lora_train
from meddap.lora.adapter import LoRALinear, inject_lora, lora_parameters
from meddap.lora.train import LoRARunConfig, TrainImages, apply_gradients, lora_loss, train_lora
from meddap.models.config import TINY
from meddap.models.stable_diffusion import StableDiffusion
from meddap.sampling import generation
from meddap.sampling.generation import GenerationConfig, ImageJob, write_images
from meddap.sampling.samplers import denoise, draw_noise
from meddap.sampling.schedule import NoiseSchedule
from meddap.sampling.text_to_image import encode_prompts, guided_eps

TRAIN, SAMPLERS = "meddap/lora/train.py", "meddap/sampling/samplers.py"
CUDA = torch.device("cuda", 0)
RESOLUTION = 32                  # pixels; latents 4 x 4
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# ---------------------------------------------------------------- expectations
# One training step (lora_loss), uncached: every copy is host-to-device, none waits for the GPU.
PIXELS = ("cpu->cuda", line_of(TRAIN, "mean, logvar = vae.encode(x.to(p.device, p.dtype))"))
POSTERIOR_NOISE = ("cpu->cuda", line_of("meddap/models/vae.py",
                                        "return mean + torch.exp(0.5 * logvar) * eps.to(mean.device)"))
EPS_NOISE = ("cpu->cuda", line_of(TRAIN, "noise = torch.randn(z0.shape, generator=rng).to(device)"))
LABELS = ("cpu->cuda", line_of(TRAIN, "context = contexts.index_select(0, rows.to(contexts.device))"))
UNET_T = ("cpu->cuda", line_of(TRAIN, "eps = sd.unet(z_t.to(dtype), t.to(device), context)"))
# q_sample extracts √ᾱ_t and √(1 − ᾱ_t): each copies its (1000,) table and t to the device.
SCHEDULE = ("cpu->cuda", line_of("meddap/sampling/schedule.py",
                                 "values = table.to(like.device)[t.to(like.device)]"))
TRAINING_STEP_SYNCS = {PIXELS: 1, POSTERIOR_NOISE: 1, EPS_NOISE: 1, LABELS: 1, UNET_T: 1, SCHEDULE: 4}
# With cached latents the VAE does not run in the step: the pixels are not copied.
CACHED_TRAINING_STEP_SYNCS = {k: v for k, v in TRAINING_STEP_SYNCS.items() if k != PIXELS}
# The loop around it waits for the device once per step, for the logged loss.
LOSS_VALUE = ("item", line_of(TRAIN, "value = loss.item()"))

# Sampling: the prompt's token ids once per encode_prompts call; one copy per run of all
# the steps' CPU-drawn noise (drawn up front) when any step draws noise, nothing otherwise.
TOKENS = ("cpu->cuda", line_of("meddap/sampling/text_to_image.py",
                               "hidden = sd.text_encoder(tokens.to(sd.device))"))
NOISE = ("cpu->cuda", line_of(SAMPLERS, "return z.to(device=like.device, dtype=like.dtype)"))
STEP_NOISE = ("cpu->cuda", line_of(SAMPLERS, "return torch.stack(steps).to(device=like.device, dtype=like.dtype)"))
SAMPLER_RUN_SYNCS = {"ddpm": {STEP_NOISE: 1}, "ddim": {STEP_NOISE: 1}, "pndm": {}}   # ddim with eta > 0
# DDPM's last step has σ = 0 and draws nothing; PNDM makes n + 1 UNet calls for n steps.

# Classifiers: normalise builds the ImageNet mean and std from Python tuples, on the device.
NORMALISE = {("cpu->cuda", line_of("meddap/classify/train.py", "mean = torch.tensor(IMAGENET_MEAN")): 1,
             ("cpu->cuda", line_of("meddap/classify/train.py", "std = torch.tensor(IMAGENET_STD")): 1}


# ---------------------------------------------------------------- LoRA training step

@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two classes of one 40 x 32 image each (the random crop moves down), resized for 32 px."""
    root = tmp_path_factory.mktemp("fake_cuda_images")
    for c, level in (("benign", 60), ("malignant", 180)):
        (root / c).mkdir()
        a = np.full((40, 32, 3), level, np.uint8)                          # (H, W, 3)
        a[10:20, 8:16] = 255 - level
        Image.fromarray(a).save(root / c / f"{c}_0.png")
    return TrainImages(resolve_training_images(str(root)), RESOLUTION, show_progress=False)


def adapted_model(device: torch.device, base_dtype: torch.dtype | None = None, seed: int = 0):
    """Tiny SD built on `device` in the default dtype (or cast to `base_dtype`: not under fake_cuda,
    whose parameters Module.to cannot swap), frozen, with float32 adapters on all targets."""
    with torch.device(device):
        sd = StableDiffusion(TINY).eval()
    if base_dtype is not None:
        sd.to(base_dtype)
    sd.requires_grad_(False)
    rng = torch.Generator().manual_seed(seed)
    base_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)     # as in a run: the adapters are float32
    try:
        inject_lora(sd.unet, 4, 4.0, "all", generator=rng)
    finally:
        torch.set_default_dtype(base_dtype)
    return sd, rng


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_step_forward_on_cuda_copies_only_cpu_draws_and_never_waits(images, dtype, cached):
    batch = torch.tensor([1, 0])
    with fake_cuda(dtype) as fc:
        sd, rng = adapted_model(CUDA)
        assert {p.dtype for p in lora_parameters(sd.unet)} == {torch.float32}
        assert {p.dtype for p in sd.parameters() if not p.requires_grad} == {dtype}
        contexts = images.embed_prompts(sd.text_encoder, as_released=False)  # (2, 77, C) on the device
        if cached:
            images.cache_latents(sd.vae, show_progress=False)
        fc.reset()
        try:
            loss = lora_loss(sd, NoiseSchedule.sd_v1(), images, contexts, batch, rng, CUDA, dtype)
        finally:
            images.moments = None
        assert (loss.shape, loss.dtype, loss.device) == ((), torch.float32, CUDA)
        assert fc.syncs == Counter(CACHED_TRAINING_STEP_SYNCS if cached else TRAINING_STEP_SYNCS)
    fake_draws = rng.get_state()

    # The same step on the CPU draws the same numbers from the run's generator.
    sd, rng = adapted_model(torch.device("cpu"))
    contexts = images.embed_prompts(sd.text_encoder, as_released=False)
    lora_loss(sd, NoiseSchedule.sd_v1(), images, contexts, batch, rng, torch.device("cpu"), torch.float32)
    assert torch.equal(rng.get_state(), fake_draws)


def test_the_training_loop_waits_for_the_device_once_per_step():
    loop = inspect.getsource(train_lora)
    assert loop.count(".item()") == 1 and "value = loss.item()" in loop
    assert inspect.getsource(lora_loss).count(".item()") == 0
    assert LOSS_VALUE[1].startswith(TRAIN)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_training_step_backward_and_adamw_on_meta(images, dtype, checkpointing):
    meta = torch.device("meta")
    sd, rng = adapted_model(meta, dtype)
    params = lora_parameters(sd.unet)
    sd.unet.gradient_checkpointing = checkpointing
    contexts = images.embed_prompts(sd.text_encoder, as_released=False)
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=lora_train.ADAM_BETAS, eps=lora_train.ADAM_EPS,
                                  weight_decay=lora_train.ADAM_WEIGHT_DECAY)
    scaler = torch.amp.GradScaler("meta", enabled=False)   # loss scaling needs values (.item())
    loss = lora_loss(sd, NoiseSchedule.sd_v1(), images, contexts, torch.tensor([0, 1]), rng, meta, dtype)
    apply_gradients(loss, params, optimizer, scaler)
    assert len(params) == 2 * sum(isinstance(m, LoRALinear) for m in sd.unet.modules())   # down, up
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.shape == p.shape
               for p in params)
    frozen = [p for p in sd.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen) and {p.dtype for p in frozen} == {dtype}
    assert len(optimizer.state) == len(params)
    assert all(set(optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in params)


# ---------------------------------------------------------------- sampler steps with guidance

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", 3, 0.0), ("ddim", 3, 0.5), ("pndm", 3, 0.0)])
def test_guided_sampler_steps_copy_only_their_noise(dtype, sampler, steps, eta):
    B = 2
    with fake_cuda(dtype) as fc:
        with torch.device("cuda"):
            sd = StableDiffusion(TINY).eval()
        fc.reset()
        _, uncond = encode_prompts(sd, [""])                               # (1, 77, D)
        tokens, cond = encode_prompts(sd, ["benign", "malignant"])         # (B, 77), (B, 77, D)
        assert tokens.device.type == "cpu" and cond.device == CUDA and cond.dtype == dtype
        assert fc.syncs == Counter({TOKENS: 2})
        fc.reset()
        generators = [torch.Generator("cpu").manual_seed(s) for s in (11, 12)]
        z_T = draw_noise(torch.empty((B, 4, 8, 8), device=sd.device, dtype=torch.float32), generators)
        assert (z_T.dtype, z_T.device) == (torch.float32, CUDA) and fc.syncs == Counter({NOISE: 1})

        calls = []
        eps_fn = guided_eps(sd.unet, uncond.expand(B, -1, -1), cond, 7.5)

        def counted(z, t):
            assert t.device == CUDA and t.shape == (B,)                     # built on the device
            calls.append(t)
            eps = eps_fn(z, t)
            assert (eps.shape, eps.dtype, eps.device) == (z.shape, torch.float32, CUDA)
            return eps

        fc.reset()
        z0 = denoise(counted, z_T, sampler, steps, eta, generators)
        assert (z0.shape, z0.dtype, z0.device) == (z_T.shape, torch.float32, CUDA)
        noisy_steps = {"ddpm": steps - 1, "ddim": steps, "pndm": 0}[sampler]
        assert fc.syncs == Counter(SAMPLER_RUN_SYNCS[sampler] if noisy_steps else {})
        assert len(calls) == steps + (sampler == "pndm")


def test_a_cpu_drawn_batch_of_noise_is_one_copy_and_the_same_numbers():
    generators = [torch.Generator("cpu").manual_seed(s) for s in (3, 4, 5)]
    expected = torch.cat([torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(s))
                          for s in (3, 4, 5)])
    assert torch.equal(draw_noise(torch.empty(3, 4, 2, 2), generators), expected)
    with fake_cuda() as fc:
        z = draw_noise(torch.empty(3, 4, 2, 2, device="cuda"), [torch.Generator().manual_seed(3)] * 3)
    assert z.device == CUDA and fc.syncs == Counter({NOISE: 1})


# ---------------------------------------------------------------- classifiers

@pytest.mark.parametrize("amp", [False, True])
@pytest.mark.parametrize("arch", list(Arch))
def test_classifier_forward_at_64_px_stays_on_the_device(arch, amp):
    k = 3
    with fake_cuda() as fc:
        with torch.device("cuda"):
            model = build_network(arch, k).eval()
        x_u8 = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8).to("cuda")   # (B, 3, S, S)
        y = torch.tensor([0, 2], device="cuda")
        fc.reset()
        x = normalise(x_u8)
        assert (x.dtype, x.device) == (torch.float32, CUDA) and fc.syncs == Counter(NORMALISE)
        fc.reset()
        autocast = cuda_autocast(torch.float16) if amp else torch.autocast("cuda", enabled=False)
        with torch.no_grad(), autocast:
            logits = model(x)                                               # (B, k)
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
        expected_dtype = torch.float16 if amp else torch.float32
        assert (logits.shape, logits.dtype, logits.device) == ((2, k), expected_dtype, CUDA)
        assert (loss.dtype, loss.device) == (torch.float32, CUDA)
        assert fc.syncs == Counter()


# ---------------------------------------------------------------- the cuDNN pin of the bitwise claims

class Pinned(Exception):
    pass


def test_pin_cudnn_turns_the_autotuner_off(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    pin_cudnn()
    assert torch.backends.cudnn.benchmark is False


def _stop(*args):
    raise Pinned


def test_train_lora_pins_cudnn_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(lora_train, "pin_cudnn", _stop)
    cfg = LoRARunConfig(checkpoint=str(tmp_path / "missing.safetensors"), data=str(tmp_path / "none"),
                        out=str(tmp_path / "out"), device="cpu", show_progress=False)
    with pytest.raises(Pinned):
        train_lora(cfg)


def test_train_classifier_pins_cudnn_before_any_work(monkeypatch, tmp_path):
    from meddap.classify import train as classify_train

    monkeypatch.setattr(classify_train, "pin_cudnn", _stop)
    cfg = TrainConfig(arch=Arch.RESNET34, train=(str(tmp_path / "none"),), val=str(tmp_path / "none"),
                      out=tmp_path / "out", device="cpu", show_progress=False)
    with pytest.raises(Pinned):
        train_classifier(cfg)
    assert not (tmp_path / "out").exists()


def test_write_images_pins_cudnn_before_any_work(monkeypatch, tmp_path):
    monkeypatch.setattr(generation, "pin_cudnn", _stop)
    with pytest.raises(Pinned):
        write_images(None, GenerationConfig(), [ImageJob("a.png", "benign", 0)], tmp_path / "out")
    assert not (tmp_path / "out").exists()
